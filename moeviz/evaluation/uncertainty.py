"""Confidence intervals for the quality figures: a seeded bootstrap over held-out windows.

Tokens inside one window are not independent (one topic, one file), so the unit resampled is the
window: the evaluation keeps, per window, the summed NLL, the number of predicted tokens, the number
predicted right, and the summed routing drift of its recorded tokens. A bootstrap replicate draws the
windows with replacement (`bootstrap_counts`: how often each window is drawn) and recomputes each
figure as the ratio of sums the evaluation itself uses (perplexity = exp(Σ nll / Σ tokens), accuracy =
Σ correct / Σ tokens, mean KL = Σ kl / Σ tokens, ...); the interval is the percentile interval of the
replicates (95 % by default).

Paired figures (compressed vs its base; run b vs run a on the same windows) use the *same* draw for
both sides, so the window-to-window variation they share cancels: a difference whose interval excludes
0 is beyond the noise of the held-out sample. Pure functions of tensors and lists; no model is run.
"""

from __future__ import annotations

import math

import torch

from moeviz.evaluation.metrics import KL_EPSILON, kl_rows

DEFAULT_ITERS = 1000
DEFAULT_LEVEL = 0.95
DEFAULT_SEED = 0
DRIFT_KEYS = ("kl", "overlap", "top1_change")
# EvalResult.metrics() names of the drift figures
DRIFT_METRICS = {"kl": "mean_kl", "overlap": "mean_topk_overlap", "top1_change": "mean_top1_change"}


def per_token_drift(base_topk: torch.Tensor, comp_topk: torch.Tensor, base_probs: torch.Tensor,
                    comp_probs: torch.Tensor, base_top1: torch.Tensor, comp_top1: torch.Tensor,
                    eps: float = KL_EPSILON) -> dict[str, torch.Tensor]:
    """[N] per-token routing drift of one layer, the terms whose means `metrics.routing_drift` reports:
    top-k overlap |S_base ∩ S_comp| / k, top-1 changed (0/1), KL(P_base ‖ P_comp) (clamped at eps)."""
    n, k = base_topk.shape
    if n == 0:
        return {key: torch.zeros(0, dtype=torch.float64) for key in DRIFT_KEYS}
    E = max(base_probs.shape[1], int(base_topk.max()) + 1, int(comp_topk.max()) + 1)

    def chosen(ids):  # [N, E] one True per chosen expert
        return torch.zeros(n, E, dtype=torch.bool).scatter_(1, ids.long().cpu(), True)

    return dict(
        overlap=(chosen(base_topk) & chosen(comp_topk)).sum(-1).double() / k,
        top1_change=(base_top1.long().cpu() != comp_top1.long().cpu()).double(),
        kl=kl_rows(base_probs.cpu(), comp_probs.cpu(), eps),
    )


def window_sums(values: torch.Tensor, seq_len: int) -> list[float]:
    """Sums of consecutive `seq_len` values (token t of the record belongs to window t // seq_len; the
    record holds the first tokens of the held-out windows in order, a last window possibly in part)."""
    n = values.shape[0]
    if n == 0:
        return []
    w = torch.arange(n) // seq_len
    return torch.zeros(int(w[-1]) + 1, dtype=torch.float64).index_add_(0, w, values.double()).tolist()


def drift_windows(per_layer: list[dict[str, torch.Tensor]], seq_len: int) -> dict[str, list[float]]:
    """Per window: Σ over its recorded tokens of the layer-mean drift terms, and its token count. Every
    layer records the same tokens, so Σ kl / Σ tokens over all windows is the mean over layers of each
    layer's mean KL: `EvalResult.metrics()["mean_kl"]` (likewise overlap, top-1 change)."""
    if not per_layer or per_layer[0]["kl"].numel() == 0:
        return {**{k: [] for k in DRIFT_KEYS}, "tokens": []}
    out = {k: window_sums(torch.stack([d[k] for d in per_layer]).mean(0), seq_len) for k in DRIFT_KEYS}
    out["tokens"] = window_sums(torch.ones(per_layer[0]["kl"].shape[0]), seq_len)
    return out


def bootstrap_counts(n_windows: int, iters: int = DEFAULT_ITERS, seed: int = DEFAULT_SEED) -> torch.Tensor:
    """[iters, n_windows] float64: how many times each window is drawn in each replicate (rows sum to
    n_windows). Seeded: the same seed and window count give the same replicates everywhere."""
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(0, n_windows, (iters, n_windows), generator=g)  # [iters, W] drawn window ids
    return torch.zeros(iters, n_windows, dtype=torch.float64).scatter_add_(
        1, idx, torch.ones(iters, n_windows, dtype=torch.float64))


def _ratio(counts: torch.Tensor, num, den) -> torch.Tensor:
    """[iters] Σ_w c_w num_w / Σ_w c_w den_w per replicate."""
    num = torch.as_tensor(num, dtype=torch.float64)
    den = torch.as_tensor(den, dtype=torch.float64)
    return (counts @ num) / (counts @ den).clamp_min(1e-300)


def _interval(replicates: torch.Tensor, value: float, level: float) -> dict:
    r = replicates[torch.isfinite(replicates)]
    if r.numel() == 0:
        return dict(value=value, lo=None, hi=None)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(r, q).tolist()
    return dict(value=value, lo=lo, hi=hi)


def _stats(counts: torch.Tensor, w: dict) -> dict[str, torch.Tensor]:
    """Replicates of the loss figures of one model's windows {nll, tokens, correct}."""
    mean_nll = _ratio(counts, w["nll"], w["tokens"])
    return dict(perplexity=mean_nll.exp(), accuracy=_ratio(counts, w["correct"], w["tokens"]))


def _point(w: dict) -> dict[str, float]:
    ones = torch.ones(1, len(w["tokens"]), dtype=torch.float64)
    return {k: float(v[0]) for k, v in _stats(ones, w).items()}


def _drift_point(d: dict) -> dict[str, float]:
    t = sum(d["tokens"])
    return {DRIFT_METRICS[k]: (sum(d[k]) / t if t else float("nan")) for k in DRIFT_KEYS}


def quality_intervals(windows: dict, iters: int = DEFAULT_ITERS, level: float = DEFAULT_LEVEL,
                      seed: int = DEFAULT_SEED) -> dict:
    """Intervals of one evaluation from its per-window sums ``{"base": {nll, tokens, correct},
    "compressed": {...}, "drift": {kl, overlap, top1_change, tokens}, "seq_len"}``:
    perplexity, accuracy, base_perplexity, base_accuracy, the paired perplexity_increase (comp / base − 1)
    and accuracy_change (comp − base), and the drift means; each {value, lo, hi}, plus "settings"."""
    base, comp = windows["base"], windows["compressed"]
    W = len(comp["tokens"])
    if W != len(base["tokens"]):
        raise ValueError(f"base has {len(base['tokens'])} windows and the compressed model {W}: not the same text")
    counts = bootstrap_counts(W, iters, seed)
    b, c = _stats(counts, base), _stats(counts, comp)
    pb, pc = _point(base), _point(comp)
    out = dict(
        perplexity=_interval(c["perplexity"], pc["perplexity"], level),
        accuracy=_interval(c["accuracy"], pc["accuracy"], level),
        base_perplexity=_interval(b["perplexity"], pb["perplexity"], level),
        base_accuracy=_interval(b["accuracy"], pb["accuracy"], level),
        perplexity_increase=_interval(c["perplexity"] / b["perplexity"] - 1, pc["perplexity"] / pb["perplexity"] - 1,
                                      level),
        accuracy_change=_interval(c["accuracy"] - b["accuracy"], pc["accuracy"] - pb["accuracy"], level),
    )
    drift = windows.get("drift") or {}
    Wd = len(drift.get("tokens") or [])
    if Wd:
        dcounts = counts[:, :Wd] if Wd <= W else bootstrap_counts(Wd, iters, seed)
        point = _drift_point(drift)
        for k in DRIFT_KEYS:
            out[DRIFT_METRICS[k]] = _interval(_ratio(dcounts, drift[k], drift["tokens"]), point[DRIFT_METRICS[k]], level)
    out["settings"] = dict(method="percentile bootstrap over held-out windows", iters=iters, level=level, seed=seed,
                           n_windows=W, n_drift_windows=Wd)
    return out


def paired_differences(a: dict, b: dict, iters: int = DEFAULT_ITERS, level: float = DEFAULT_LEVEL,
                       seed: int = DEFAULT_SEED) -> list[dict]:
    """Run b − run a on the same held-out windows (two `EvalResult.windows`), one row per figure:
    {metric, a, b, difference, lo, hi, beyond_noise}; beyond_noise: the interval of the difference
    excludes 0. ValueError if the runs were not evaluated on the same windows."""
    if a.get("fingerprint") != b.get("fingerprint") or len(a["compressed"]["tokens"]) != len(b["compressed"]["tokens"]):
        raise ValueError("the two runs were not evaluated on the same held-out windows: no paired comparison")
    W = len(a["compressed"]["tokens"])
    counts = bootstrap_counts(W, iters, seed)
    ra, rb = _stats(counts, a["compressed"]), _stats(counts, b["compressed"])
    pa, pb = _point(a["compressed"]), _point(b["compressed"])
    reps = {k: (ra[k], rb[k], pa[k], pb[k]) for k in ("perplexity", "accuracy")}
    da, db = a.get("drift") or {}, b.get("drift") or {}
    Wd = min(len(da.get("tokens") or []), len(db.get("tokens") or []))
    if Wd and len(da["tokens"]) == len(db["tokens"]):
        dcounts = counts[:, :Wd] if Wd <= W else bootstrap_counts(Wd, iters, seed)
        qa, qb = _drift_point(da), _drift_point(db)
        for k in DRIFT_KEYS:
            name = DRIFT_METRICS[k]
            reps[name] = (_ratio(dcounts, da[k], da["tokens"]), _ratio(dcounts, db[k], db["tokens"]), qa[name], qb[name])
    rows = []
    for name, (xa, xb, va, vb) in reps.items():
        ci = _interval(xb - xa, vb - va, level)
        rows.append(dict(metric=name, a=va, b=vb, difference=vb - va, lo=ci["lo"], hi=ci["hi"],
                         beyond_noise=bool(ci["lo"] is not None and (ci["lo"] > 0 or ci["hi"] < 0))))
    return rows


def interval_metrics(intervals: dict | None) -> dict:
    """Flat `{metric}_lo` / `{metric}_hi` numbers of `quality_intervals` (for the run table / store)."""
    out = {}
    for name, iv in (intervals or {}).items():
        if name == "settings" or not isinstance(iv, dict):
            continue
        if iv.get("lo") is not None and math.isfinite(iv["lo"]):
            out[f"{name}_lo"], out[f"{name}_hi"] = iv["lo"], iv["hi"]
    return out


__all__ = ["DEFAULT_ITERS", "DEFAULT_LEVEL", "DEFAULT_SEED", "bootstrap_counts", "drift_windows", "interval_metrics",
           "paired_differences", "per_token_drift", "quality_intervals", "window_sums"]
