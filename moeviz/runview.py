"""Stored runs as a researcher looks at them: facets to filter by (method, bits, structure, sweep, tag),
and two runs side by side (what differs in their plans, how their metrics moved). Pure functions on
`RunStore.runs()` frames and plan dicts."""

from __future__ import annotations

import json
import math

import pandas as pd

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
    out["method"] = [p.get("pruning", {}).get("metric", "?") for p in plans]
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
