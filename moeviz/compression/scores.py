"""Per-weight importance scores for pruning.

A score says how much the layer output would suffer if a single weight were set to zero;
the masks in :mod:`moeviz.compression.masks` prune the lowest scores of each output row.

Three metrics, all returning float32 scores of the same shape as ``W`` ([..., out, in]):

* ``magnitude``   S_ij = |W_ij|
* ``wanda``       S_ij = |W_ij| * ||X_j||_2                          (Sun et al., arXiv 2306.11695)
* ``moe_pruner``  S_ij = |W_ij| * ||X_j * G_j||_2                    (Xie et al., arXiv 2410.12013)

``||X_j||_2`` is the L2 norm of input feature j over the tokens routed to this expert. The caller
passes its *square* ``col_sq_norm[j] = sum_t x_tj**2`` because squared norms add up across
calibration batches (norms do not). MoE-Pruner is the same formula where every token's activation
is first multiplied by the router gate weight that token gave this expert, so
``col_sq_norm[j] = sum_t (g_t * x_tj)**2``. The arithmetic is identical; both names exist so that a
plan records which statistic it was fed, and so a caller cannot silently pass ungated norms to
``moe_pruner``.
"""

from __future__ import annotations

import torch

from moeviz.registry import SCORE_METRICS as METRICS  # the first-order metrics scored here


def importance_scores(
    weight: torch.Tensor, metric: str, col_sq_norm: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Importance score of every weight, float32, shape of ``weight``.

    Args:
        weight: ``[..., out, in]`` (one row per output channel, like ``nn.Linear.weight``);
            leading dims batch several experts, e.g. ``[E, out, in]``.
        metric: one of ``"magnitude"``, ``"wanda"``, ``"moe_pruner"``.
        col_sq_norm: required for ``wanda``/``moe_pruner``; per-input-column squared L2 norm,
            shape ``[in]`` (shared by all rows/experts) or ``[..., in]`` matching the leading dims
            of ``weight`` (one statistic per expert). Must be non-negative.
        out: optional float32 buffer of ``weight``'s shape to write the scores into (the lazy path
            reuses one, `moeviz.compression.scratch`); the values are the same.
    """
    factor = column_factor(tuple(weight.shape), metric, col_sq_norm, weight.device)
    return scores_from_factor(weight, factor, out)


def column_factor(weight_shape: tuple[int, ...], metric: str, col_sq_norm: torch.Tensor | None,
                  device=None) -> torch.Tensor | None:
    """The validated per-column factor of ``metric`` for a weight of ``weight_shape``:
    ``sqrt(col_sq_norm)`` as ``[..., 1, in]`` float32 (None for magnitude). Arguments as in
    :func:`importance_scores`, which is ``scores_from_factor(weight, column_factor(...))``."""
    if metric not in METRICS:
        raise ValueError(f"unknown importance metric {metric!r}; expected one of {METRICS}")
    if len(weight_shape) < 2:
        raise ValueError(f"weight must be at least 2-D [..., out, in], got shape {tuple(weight_shape)}")
    if metric == "magnitude":
        if col_sq_norm is not None:
            raise ValueError("metric 'magnitude' takes no col_sq_norm (it would be ignored)")
        return None
    if col_sq_norm is None:
        raise ValueError(f"metric {metric!r} needs col_sq_norm (per-input-column squared L2 norms)")
    in_features = weight_shape[-1]
    lead = tuple(weight_shape[:-2])
    ok_shapes = {(in_features,), lead + (in_features,)}
    if tuple(col_sq_norm.shape) not in ok_shapes:
        raise ValueError(
            f"col_sq_norm for metric {metric!r} must have shape {sorted(ok_shapes, key=len)} "
            f"(weight is {tuple(weight_shape)}), got {tuple(col_sq_norm.shape)}"
        )
    norms = col_sq_norm.detach().to(device=device, dtype=torch.float32)
    if bool((norms < 0).any()) or bool(torch.isnan(norms).any()):
        raise ValueError(f"col_sq_norm must be non-negative and not NaN (metric {metric!r})")
    # [..., in] -> [..., 1, in]: the same column factor multiplies every output row.
    return norms.sqrt().unsqueeze(-2)


def scores_from_factor(weight: torch.Tensor, factor: torch.Tensor | None,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """``|W| * factor`` in float32 (``|W|`` for None); ``out``: optional float32 buffer like ``weight``."""
    # float32 even for bf16 weights: bf16 has 8 mantissa bits, so many scores would tie and the
    # ranking (hence the mask) would depend on rounding rather than on the weights.
    # abs before the cast: exact either way (it clears the sign bit), but on a bf16 tensor it halves
    # the bytes the abs pass touches and lets the cast allocate the only float32 tensor.
    if out is not None:
        scores = out.copy_(weight.detach()).abs_()  # the cast is exact, so abs after it gives the same
    else:
        scores = weight.detach().abs().to(torch.float32)
    # In place: ``scores`` is a fresh tensor (or the caller's buffer), so this saves an [out, in] allocation.
    return scores if factor is None else scores.mul_(factor)
