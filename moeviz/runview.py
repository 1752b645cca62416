"""Stored runs as a researcher looks at them: facets to filter by (method, bits, structure, sweep, tag),
and two runs side by side (what differs in their plans, how their metrics moved). Pure functions on
`RunStore.runs()` frames and plan dicts."""

from __future__ import annotations

import json
import math

import pandas as pd

from moeviz.compression.plan import CompressionPlan, method_name

COMPARED_METRICS = ("perplexity", "accuracy", "compression_ratio", "experts_compression_ratio",
                    "projected_decode_ms", "measured_decode_ms", "mean_cv", "mean_topk_overlap")


def _plan(raw) -> dict:
    try:
        return json.loads(raw) if isinstance(raw, str) else dict(raw or {})
    except (TypeError, ValueError):
        return {}


def with_facets(df: pd.DataFrame) -> pd.DataFrame:
    """The frame plus ``method``, ``structure``, ``bits``, ``sparsity`` (from each plan) and ``tags``."""
    out = df.copy()
    plans = [_plan(v) for v in out["plan_json"]] if "plan_json" in out else [{} for _ in range(len(out))]
    out["method"] = [method_name(p) if p.get("pruning") else "?" for p in plans]
    out["structure"] = [p.get("pruning", {}).get("structure", "unstructured") for p in plans]
    out["bits"] = [int(p.get("quant", {}).get("bits", 16)) for p in plans]
    out["sparsity"] = [float(p.get("pruning", {}).get("sparsity", 0.0)) for p in plans]
    if "tags" not in out:
        out["tags"] = ""
    out["tags"] = out["tags"].fillna("")
    return out


def tag_list(value) -> list[str]:
    return [t.strip() for t in str(value or "").split(",") if t.strip()]


def filter_runs(df: pd.DataFrame, methods=(), bits=(), structures=(), sweeps=(), tags=()) -> pd.DataFrame:
    """Rows matching every non-empty filter (a run matches a tag filter when it has any of the tags)."""
    keep = pd.Series(True, index=df.index)
    if methods:
        keep &= df["method"].isin(list(methods))
    if bits:
        keep &= df["bits"].isin([int(b) for b in bits])
    if structures:
        keep &= df["structure"].isin(list(structures))
    if sweeps:
        keep &= df["sweep_id"].isin(list(sweeps))
    if tags:
        wanted = set(tags)
        keep &= df["tags"].map(lambda v: bool(wanted & set(tag_list(v))))
    return df[keep]


def _flat(d, prefix=""):
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def plan_diff(a: dict, b: dict) -> list[dict]:
    """[{"setting", "a", "b"}] for every plan setting that differs (nested keys dotted; lists compared
    whole: overrides and removed experts)."""
    fa, fb = _flat({k: v for k, v in a.items() if k != "name"}), _flat({k: v for k, v in b.items() if k != "name"})
    rows = []
    for key in sorted(set(fa) | set(fb)):
        va, vb = fa.get(key), fb.get(key)
        if va != vb:
            rows.append(dict(setting=key, a=json.dumps(va), b=json.dumps(vb)))
    return rows


def metric_diff(a: dict, b: dict, metrics=COMPARED_METRICS) -> list[dict]:
    """[{"metric", "a", "b", "b − a"}] for the metrics both runs have."""
    rows = []
    for m in metrics:
        va, vb = a.get(m), b.get(m)
        if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and math.isfinite(va) and math.isfinite(vb):
            rows.append({"metric": m, "a": va, "b": vb, "b − a": vb - va})
    return rows


def _col(df: pd.DataFrame, name: str) -> pd.Series:
    return pd.to_numeric(df[name], errors="coerce") if name in df.columns else pd.Series(float("nan"), index=df.index)


def with_measured_latency(df: pd.DataFrame) -> pd.DataFrame:
    """The frame plus what the trade-off chart draws for measured latency: ``measured_lo`` / ``measured_hi``
    (the quartiles of the back-to-back repeats, NaN for runs timed before that existed) and the base's
    median and quartiles from the same loops (``base_measured_decode_ms``, ``base_measured_lo`` / ``_hi``)."""
    return df.assign(measured_decode_ms=_col(df, "measured_decode_ms"),
                     measured_lo=_col(df, "measured_decode_q1_ms"), measured_hi=_col(df, "measured_decode_q3_ms"),
                     base_measured_decode_ms=_col(df, "base_measured_decode_ms"),
                     base_measured_lo=_col(df, "base_measured_decode_q1_ms"),
                     base_measured_hi=_col(df, "base_measured_decode_q3_ms"),
                     latency_busy=_col(df, "latency_busy"))


def latency_notes(df: pd.DataFrame) -> str:
    """One sentence on how far the measured latencies of these runs can be trusted."""
    measured = _col(df, "measured_decode_ms").notna()
    ab = measured & _col(df, "measured_decode_q1_ms").notna()
    parts = []
    if ab.any():
        overlap = int((_col(df, "latency_spreads_overlap")[ab] == 1).sum())
        parts.append(f"{int(ab.sum())} run(s) timed back to back with the base; in {overlap} of them the compressed "
                     "and base spreads overlap (no measurable difference on this machine)")
        busy = int((_col(df, "latency_busy")[ab] == 1).sum())
        if busy:
            parts.append(f"{busy} timed while the machine was busy (open diamonds)")
    old = int((measured & ~ab).sum())
    if old:
        parts.append(f"{old} run(s) from before back-to-back timing (base timed once, separately): no spread")
    return ("; ".join(parts) + ".") if parts else ""


# (column, CSV header, scale): shares in % (×100), times in ms per token (one unit per column: a CSV column
# cannot switch between µs and ms), ratios as ×.
CSV_COLUMNS = (
    ("id", "run", 1), ("name", "name", 1), ("tags", "tags", 1), ("created_at", "created (UTC)", 1),
    ("sweep_id", "sweep", 1), ("parent_run_id", "recovered from run", 1), ("method", "method", 1),
    ("structure", "structure", 1), ("bits", "bits (16 = unquantized)", 1), ("sparsity", "sparsity (%)", 100),
    ("perplexity", "perplexity", 1), ("base_perplexity", "base perplexity", 1),
    ("accuracy", "next-token accuracy (%)", 100), ("base_accuracy", "base next-token accuracy (%)", 100),
    ("compression_ratio", "compression ratio, on paper vs the checkpoint dtype (×)", 1),
    ("compression_ratio_bf16", "compression ratio, on paper vs bf16 (×)", 1),
    ("export_compression_ratio", "compression ratio of the best exportable format (×)", 1),
    ("experts_compression_ratio", "experts compression ratio (×)", 1),
    ("parameter_bytes", "stored parameter bytes", 1),
    ("projected_decode_ms", "decode, projected (ms/token)", 1),
    ("base_projected_decode_ms", "base decode, projected (ms/token)", 1),
    ("measured_decode_ms", "decode, measured median (ms/token)", 1),
    ("measured_decode_q1_ms", "decode, measured Q1 (ms/token)", 1),
    ("measured_decode_q3_ms", "decode, measured Q3 (ms/token)", 1),
    ("base_measured_decode_ms", "base decode, measured back to back, median (ms/token)", 1),
    ("latency_spreads_overlap", "measured spreads overlap base (1 = yes)", 1),
    ("latency_busy", "machine busy while timing (1 = yes)", 1),
    ("mean_cv", "load-balance CV, mean over layers", 1),
    ("mean_topk_overlap", "top-k overlap with base (%)", 100), ("mean_top1_change", "top-1 change rate (%)", 100),
    ("mean_kl", "router KL (nats)", 1), ("plan_json", "plan (JSON)", 1),
)


def runs_csv(df: pd.DataFrame) -> str:
    """The run table as a CSV a person can read: the summary columns with units in their headers, shares
    in %, the plan as JSON (the store's flattened details are left out)."""
    df = with_facets(df)
    out = pd.DataFrame(index=df.index)
    for col, header, scale in CSV_COLUMNS:
        if col in df.columns:
            out[header] = pd.to_numeric(df[col], errors="coerce") * scale if scale != 1 else df[col]
    return out.to_csv(index=False)


def second_order_settings(plan: CompressionPlan) -> dict | None:
    """The SparseGPT / GPTQ settings that act on `plan`, None for a plan with neither: methods (["SparseGPT",
    "GPTQ"]), hessian ("router-weighted"), block, percdamp, act_order (GPTQ's only), refit (SparseGPT's only)."""
    if not plan.second_order():
        return None
    sparsegpt, gptq = plan.pruning.metric == "sparsegpt", plan.quant.method == "gptq"
    return dict(methods=[m for m, on in (("SparseGPT", sparsegpt), ("GPTQ", gptq)) if on],
                hessian=plan.hessian.replace("_", "-"), block=plan.obs_blocksize, percdamp=plan.percdamp,
                act_order=plan.act_order and gptq, refit=plan.refit and sparsegpt)


def second_order_label(plan_json) -> str:
    """A run's SparseGPT / GPTQ settings for the runs table, e.g. "router-weighted · block 128 · damp 0.01 ·
    act-order"; "" for a plan with neither or an unreadable stored plan."""
    try:
        s = second_order_settings(CompressionPlan.from_json(plan_json))
    except Exception:  # an unreadable stored plan: nothing to show
        return ""
    if s is None:
        return ""
    parts = [s["hessian"], f"block {s['block']}", f"damp {s['percdamp']:g}"]
    return " · ".join(parts + ["act-order"] * s["act_order"] + ["refit"] * s["refit"])
