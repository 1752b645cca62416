"""What the Compress and Trade-offs pages show of a run's quality uncertainty and task accuracy: the
accuracy axes a run table offers, their error-bar columns, the task table of one result, the interval
caption and the paired comparison of two runs. Pure functions of result dicts and run tables."""

from __future__ import annotations

import math
import re

import pandas as pd

from moeviz.evaluation.tasks import task_average
from moeviz.evaluation.uncertainty import paired_differences

NEXT_TOKEN = "accuracy"
TASK_AVERAGE = "task_average"
_TASK_COL = re.compile(r"^task_acc\[(.+)\]$")


def task_names(df: pd.DataFrame) -> list[str]:
    """Tasks with an accuracy column in a run table (`RunStore.runs()` or a sweep frame)."""
    return sorted(m.group(1) for c in df.columns if (m := _TASK_COL.match(c)) and df[c].notna().any())


def accuracy_choices(df: pd.DataFrame) -> dict[str, str]:
    """{column: label} of the accuracies a chart can plot: next-token accuracy, the task average (runs
    evaluated on several tasks) and each task."""
    out = {NEXT_TOKEN: "next-token accuracy (held-out text, 95 % bootstrap interval)"}
    tasks = task_names(df)
    if len(tasks) > 1 and TASK_AVERAGE in df.columns and df[TASK_AVERAGE].notna().any():
        out[TASK_AVERAGE] = f"task average ({len(tasks)} tasks, ± stderr)"
    out.update({f"task_acc[{t}]": f"task: {t} (acc ± stderr)" for t in tasks})
    return out


def with_accuracy_spread(df: pd.DataFrame, col: str) -> tuple[pd.DataFrame, tuple[str, str] | None]:
    """(df with low / high columns of `col` and of its base, those two column names) for error bars:
    next-token accuracy: its 95 % bootstrap interval (accuracy_lo / _hi); a task or the task average:
    ± one standard error (lm-eval's stderr). None when the runs have no spread for it."""
    if col == NEXT_TOKEN:
        cols = ("accuracy_lo", "accuracy_hi")
        return (df, cols) if all(c in df.columns for c in cols) else (df, None)
    stderr = "task_average_stderr" if col == TASK_AVERAGE else col.replace("task_acc[", "task_acc_stderr[", 1)
    if col not in df.columns or stderr not in df.columns:
        return df, None
    lo, hi = f"{col}__lo", f"{col}__hi"
    value, se = pd.to_numeric(df[col], errors="coerce"), pd.to_numeric(df[stderr], errors="coerce")
    out = df.assign(**{lo: value - se, hi: value + se})
    if f"base_{col}" in df.columns and f"base_{stderr}" in df.columns:
        bv, bse = pd.to_numeric(df[f"base_{col}"], errors="coerce"), pd.to_numeric(df[f"base_{stderr}"], errors="coerce")
        out = out.assign(**{f"base_{lo}": bv - bse, f"base_{hi}": bv + bse})
    return out, (lo, hi)


def task_rows(result: dict) -> list[dict]:
    """One row per task of an evaluation result (EvalResult.to_dict()) plus the average: accuracy ± stderr
    of the compressed and the base model (in %), the difference, and what a paper states with it."""
    tasks, base = result.get("tasks") or {}, result.get("base_tasks") or {}
    rows = []
    for name, t in sorted(tasks.items()):
        b = base.get(name, {})
        rows.append(dict(
            task=name, accuracy=_pct(t.get("acc")), stderr=_pct(t.get("acc_stderr")),
            base_accuracy=_pct(b.get("acc")), base_stderr=_pct(b.get("acc_stderr")),
            difference=_pct(t["acc"] - b["acc"]) if t.get("acc") is not None and b.get("acc") is not None else None,
            acc_norm=_pct(t.get("acc_norm")), n=t.get("n"), version=t.get("version"), few_shot=t.get("num_fewshot"),
            seed=t.get("seed"), limit=t.get("limit"),
        ))
    if len(tasks) > 1:
        (a, se), (ba, bse) = task_average(tasks), task_average(base) if base else (None, None)
        rows.append(dict(task=f"average of {len(tasks)} tasks", accuracy=_pct(a), stderr=_pct(se),
                         base_accuracy=_pct(ba), base_stderr=_pct(bse),
                         difference=_pct(a - ba) if a is not None and ba is not None else None,
                         n=sum(t.get("n") or 0 for t in tasks.values())))
    return rows


def _pct(v):
    return None if v is None else 100.0 * v


def interval_caption(result: dict) -> str | None:
    """One line of the 95 % intervals of a result, or None for a result stored without them."""
    iv = result.get("intervals") or {}
    if not iv.get("perplexity"):
        return None

    def span(name, scale=1.0, unit="", fmt=".2f"):
        x = iv.get(name) or {}
        if x.get("lo") is None:
            return None
        return f"{x['lo'] * scale:{fmt}}–{x['hi'] * scale:{fmt}}{unit}"

    st = iv.get("settings", {})
    parts = [f"perplexity {span('perplexity')} (base {span('base_perplexity')})",
             f"next-token accuracy {span('accuracy', 100, ' %', '.1f')} (base {span('base_accuracy', 100, ' %', '.1f')})",
             f"perplexity increase {span('perplexity_increase', 100, ' %', '+.1f')} (paired)"]
    if span("mean_kl", fmt=".3g"):
        parts.append(f"router KL {span('mean_kl', fmt='.3g')}")
    return (f"{int(st.get('level', 0.95) * 100)} % intervals, bootstrap over {st.get('n_windows')} held-out windows "
            f"({st.get('iters')} draws, seed {st.get('seed')}): " + " · ".join(parts))


def paired_rows(metrics_a: dict, metrics_b: dict) -> list[dict] | None:
    """Paired differences (b − a) of two stored runs on the same held-out windows (their metrics, with
    "details" as `store_result` keeps them), or None when either lacks windows or they differ."""
    wa = (metrics_a.get("details") or {}).get("windows")
    wb = (metrics_b.get("details") or {}).get("windows")
    if not wa or not wb:
        return None
    try:
        rows = paired_differences(wa, wb)
    except ValueError:
        return None
    for r in rows:
        r["verdict"] = "beyond noise" if r.pop("beyond_noise") else "within noise"
        for k in ("a", "b", "difference", "lo", "hi"):
            if isinstance(r[k], float) and not math.isfinite(r[k]):
                r[k] = None
    return rows


__all__ = ["NEXT_TOKEN", "TASK_AVERAGE", "accuracy_choices", "interval_caption", "paired_rows", "task_names",
           "task_rows", "with_accuracy_spread"]
