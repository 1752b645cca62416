"""Per-expert sparsity allocation: how a global pruning budget is split across experts.

Inputs are ``[L, E]`` arrays (layers x experts): ``param_counts`` (prunable parameters of each
expert) and ``utilization`` (share of the layer's routed tokens that reach each expert; any scale,
only ratios within a layer matter). The output ``r[L, E]`` always satisfies

    sum(r * p) == target * sum(p)            (parameter-weighted mean == target)

up to float64 rounding, so "50 % sparsity" means half of the expert parameters are removed,
whatever the split. Presets:

* ``uniform``: every expert gets ``target``.
* ``utilization``: rarely used experts are pruned harder, ``r_e = c * (u_mean / u_e) ** strength``
  where ``u_mean`` is the mean utilisation of the expert's layer and one global scale ``c`` is
  found by bisection so that, after clipping to ``bounds``, the weighted mean hits ``target``.
  ``strength=0`` reduces to uniform. Utilisation is floored at 0.1 % of the layer mean so an
  expert that saw no token gets a finite (the largest) weight instead of infinity.

Overrides: ``{(layer, expert): ratio}`` pins those experts (the ratio only has to lie in [0, 1),
bounds do not apply to an explicit choice). The free experts absorb the difference: their own
weighted mean becomes ``(target * P - sum_fixed r p) / P_free``. If that is outside ``bounds``
(or there is no free expert and the pinned ones miss the target), the target is infeasible:
with ``strict=True`` (default) a ``ValueError`` gives the achievable range of the global mean;
with ``strict=False`` the free experts are set to the nearest bound and the returned ratios have a
different global mean (check with :func:`weighted_mean`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

PRESETS = ("uniform", "utilization")
_UTIL_FLOOR = 1e-3  # fraction of the layer mean, see module docstring


def validate_ratio(r, name: str = "ratio") -> float:
    """Return ``r`` as a float if it lies in [0, 1), else raise ``ValueError`` naming the field."""
    try:
        f = float(r)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1), got {r!r}") from None
    if not 0.0 <= f < 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1), got {r!r}")
    return f


def weighted_mean(ratios, param_counts) -> float:
    """Parameter-weighted mean ``sum(r * p) / sum(p)``."""
    r = np.asarray(ratios, dtype=np.float64)
    p = np.asarray(param_counts, dtype=np.float64)
    return float((r * p).sum() / p.sum())


def _as_2d(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a [layers, experts] array, got shape {a.shape}")
    if not np.isfinite(a).all() or (a < 0).any():
        raise ValueError(f"{name} must be finite and non-negative")
    return a


def allocate_sparsity(
    param_counts,
    utilization,
    target: float,
    preset: str = "uniform",
    bounds: tuple[float, float] = (0.0, 0.95),
    strength: float = 1.0,
    overrides: Mapping[tuple[int, int], float] | None = None,
    strict: bool = True,
) -> np.ndarray:
    """Per-expert sparsity ratios ``[L, E]`` (float64) whose parameter-weighted mean is ``target``.

    Args:
        param_counts: ``[L, E]`` prunable parameters per expert.
        utilization: ``[L, E]`` token share per expert (ignored by ``uniform``, may be None then).
        target: global sparsity in [0, 1).
        preset: ``"uniform"`` or ``"utilization"`` (module docstring).
        bounds: ``(lo, hi)`` with ``0 <= lo <= hi < 1``, applied to non-overridden experts.
        strength: exponent of ``u_mean / u_e`` for ``utilization`` (>= 0).
        overrides: ``{(layer, expert): ratio}`` pinned ratios.
        strict: raise on an infeasible target (default) instead of returning the closest ratios.
    """
    target = validate_ratio(target, "target")
    if preset not in PRESETS:
        raise ValueError(f"unknown allocation preset {preset!r}; expected one of {PRESETS}")
    lo, hi = (float(b) for b in bounds)
    if not 0.0 <= lo <= hi < 1.0:
        raise ValueError(f"bounds must satisfy 0 <= lo <= hi < 1, got {tuple(bounds)}")
    if not (math.isfinite(strength) and strength >= 0):
        raise ValueError(f"strength must be a finite number >= 0, got {strength!r}")
    p = _as_2d(param_counts, "param_counts")
    total = p.sum()
    if total <= 0:
        raise ValueError("param_counts sum to zero; nothing to allocate")

    ratios = np.zeros_like(p)
    fixed = np.zeros(p.shape, dtype=bool)
    for key, value in (overrides or {}).items():
        layer, expert = key
        if not (0 <= layer < p.shape[0] and 0 <= expert < p.shape[1]):
            raise ValueError(f"override key {key!r} outside the [{p.shape[0]}, {p.shape[1]}] grid")
        ratios[layer, expert] = validate_ratio(value, f"override for (layer {layer}, expert {expert})")
        fixed[layer, expert] = True

    free = ~fixed
    p_free = p[free].sum()
    need = target * total - (ratios[fixed] * p[fixed]).sum()  # parameters the free experts remove
    # Achievable global means: every free expert at lo, or every free expert at hi.
    fixed_part = (ratios[fixed] * p[fixed]).sum()
    achievable = ((fixed_part + lo * p_free) / total, (fixed_part + hi * p_free) / total)
    tol = 1e-12 * total
    if not (lo * p_free - tol <= need <= hi * p_free + tol):
        if strict:
            raise ValueError(
                f"target sparsity {target} is infeasible: with bounds {(lo, hi)} and "
                f"{int(fixed.sum())} overridden expert(s) the parameter-weighted mean can only be "
                f"in [{achievable[0]:.6f}, {achievable[1]:.6f}]"
            )
        ratios[free] = hi if need > hi * p_free else lo
        return ratios
    if p_free <= 0:
        return ratios  # only pinned (or empty) experts carry parameters, and they already fit
    t_free = min(max(need / p_free, lo), hi)

    if preset == "uniform" or strength == 0:
        ratios[free] = t_free
        return ratios

    u = _as_2d(utilization, "utilization")
    if u.shape != p.shape:
        raise ValueError(f"utilization shape {u.shape} != param_counts shape {p.shape}")
    # A layer with no recorded traffic carries no signal: treat its experts as equally used.
    has_traffic = u.sum(axis=1, keepdims=True) > 0  # [L, 1]
    u = np.where(has_traffic, u, 1.0)
    u_mean = u.mean(axis=1, keepdims=True)  # [L, 1], > 0
    u = np.maximum(u, _UTIL_FLOOR * u_mean)
    raw = (u_mean / u) ** strength  # [L, E], > 0 and finite
    w, pf = raw[free], p[free]

    def removed(c: float) -> float:
        return float((np.clip(c * w, lo, hi) * pf).sum())

    # removed(c) is continuous and non-decreasing in c, from lo*P_free at c=0 to hi*P_free at
    # c_hi, so bisection finds the c that removes exactly `need` parameters.
    c_lo, c_hi = 0.0, hi / w.min() if hi > 0 else 0.0
    for _ in range(200):
        c_mid = 0.5 * (c_lo + c_hi)
        if removed(c_mid) < need:
            c_lo = c_mid
        else:
            c_hi = c_mid
        if c_hi - c_lo <= 1e-15 * max(c_hi, 1e-300):
            break
    r_free = np.clip(c_hi * w, lo, hi)
    # Bisection leaves a residual of a few ulps; hand it to the experts not sitting on a bound so
    # that the weighted mean is exact to float64 rounding.
    residual = need - float((r_free * pf).sum())
    inside = (r_free > lo) & (r_free < hi)
    if inside.any() and residual != 0.0:
        r_free[inside] = np.clip(r_free[inside] + residual / pf[inside].sum(), lo, hi)
    ratios[free] = r_free
    return ratios
