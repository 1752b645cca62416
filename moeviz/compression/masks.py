"""Keep-masks from importance scores: unstructured per-row and semi-structured N:M.

All masks are boolean, ``True`` = keep, same shape as the scores ``[..., out, in]``. Leading dims
batch independent matrices (e.g. all experts of a layer, ``[E, out, in]``); every function works
row by row, so batching never mixes experts.

Ordering rule (shared by every function here, so results are reproducible and testable): entries of
a row are ranked by ``(score, column index)`` ascending, and the lowest-ranked ones are pruned. With
equal scores (e.g. an all-zero row) the entry with the *smaller column index* is pruned first. The
number pruned is therefore always exact, whatever the ties.

Per-row count: ``k = round(sparsity * in)`` with round-half-to-even (Python's ``round``, which is
also ``torch.round``), computed in float64.

Scores must not contain NaN (NaN has no place in an ordering); this is checked.

Speed (why three entry points): selecting the k-th value of each row (``np.partition`` on CPU,
``torch.topk`` elsewhere) costs several elementwise passes over the weights, because every row does
its own small quickselect. The UI changes sparsity far more often than scores, so
:func:`row_ranks` pays for one stable sort per score tensor, and :func:`mask_from_ranks` turns the
cached ranks into a mask at any sparsity with a single comparison (cheaper than ``abs(W)``, since it
reads int16 and writes bool). :func:`unstructured_row_mask` is the one-shot path
(per-row selection + exact tie fix-up), which is faster than a full sort when the scores are used once.
The thresholds of the app's slider sparsities are also kept per row, shared by the whole process
(`moeviz.compression.threshold_table`: O(rows), built from one sort per row), so a new sparsity there
needs no selection at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .allocation import validate_ratio

def _check_scores(scores: torch.Tensor) -> None:
    if scores.dim() < 2:
        raise ValueError(f"scores must be at least 2-D [..., out, in], got shape {tuple(scores.shape)}")
    if scores.is_floating_point() and bool(torch.isnan(scores).any()):
        raise ValueError("scores contain NaN; cannot rank them")


def prune_counts(sparsity: float | torch.Tensor, in_features: int, lead_shape: tuple[int, ...]) -> torch.Tensor:
    """Number of entries to prune per row, ``round(sparsity * in)``, as int64.

    ``sparsity`` is a float (same for every matrix) or a tensor of shape ``lead_shape`` (e.g. one
    ratio per expert, ``[E]``). Returns shape ``lead_shape`` (``[]`` for a float). Each ratio must
    lie in [0, 1).
    """
    if isinstance(sparsity, torch.Tensor):
        if tuple(sparsity.shape) != tuple(lead_shape):
            raise ValueError(
                f"per-matrix sparsity must have the scores' leading shape {tuple(lead_shape)}, "
                f"got {tuple(sparsity.shape)}"
            )
        s = sparsity.detach().to(dtype=torch.float64, device="cpu")
        if s.numel():
            bad = s[(s < 0) | (s >= 1) | torch.isnan(s)]
            if bad.numel():
                validate_ratio(float(bad[0]), "sparsity")  # raises with the offending value
        return torch.round(s * in_features).to(torch.int64)
    validate_ratio(sparsity, "sparsity")
    return torch.tensor(round(float(sparsity) * in_features), dtype=torch.int64)


@dataclass(frozen=True)
class RowThresholds:
    """What selecting ``k`` per row decided, in O(rows) memory: the mask is rebuilt from the scores
    with one comparison (plus a fix-up on the rare rows with ties at the threshold)."""

    k: int
    n: int
    v: torch.Tensor | None  # [..., out, 1] k-th smallest score of each row (None when k <= 0 or k >= n)
    bad: torch.Tensor | None  # [..., out] bool: rows with ties at v (keeping all of them would prune too few)
    need: torch.Tensor | None  # [..., out] entries equal to v to prune in each row, lowest column first


def _kth_and_next(scores: torch.Tensor, k: int, use_numpy: bool | None = None,
                  work: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k-th smallest score of each row ([..., out, 1]) and the (k+1)-th ([..., out]); 0 < k < n.

    On CPU (use_numpy None: float32/64 CPU tensors), numpy's `np.partition` (one selection per row)
    then the minimum of what lies above position k-1: measured about 4x faster than `torch.topk` and
    5x faster than `torch.kthvalue` on [2048, 2048] float32 at one thread, and this selection is most
    of the cost of compressing an expert. Elsewhere one `topk` of the k+1 smallest entries (or the
    n-k+1 largest, whichever set is smaller), then their two largest (smallest). Both give exact
    order statistics, so the masks do not depend on the path. work: optional CPU buffer of the
    scores' shape and dtype for the numpy path to select in (else it makes a copy)."""
    n = scores.shape[-1]
    if use_numpy is None:
        use_numpy = scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.float64)
    if use_numpy:
        rows = scores.detach().contiguous().reshape(-1, n).numpy()  # [R, n]: a view when contiguous
        if work is not None:  # select in place in a reused buffer (no fresh pages)
            part = work.reshape(-1, n).numpy()
            np.copyto(part, rows)
            part.partition(k - 1, axis=-1)
        else:
            part = np.partition(rows, k - 1, axis=-1)
        # Position k-1 now holds the k-th smallest of each row, and everything after it is >= it.
        v = torch.from_numpy(part[:, k - 1].copy()).reshape(*scores.shape[:-1], 1)
        v_next = torch.from_numpy(part[:, k:].min(axis=-1)).reshape(scores.shape[:-1])
        return v, v_next
    if k + 1 <= n - k + 1:
        part = torch.topk(scores, k + 1, dim=-1, largest=False, sorted=False).values  # [..., out, k+1]
        two = torch.topk(part, 2, dim=-1, largest=True, sorted=True).values  # [v_{k+1}, v_k]
        return two[..., 1:2], two[..., 0]
    part = torch.topk(scores, n - k + 1, dim=-1, largest=True, sorted=False).values  # [..., out, n-k+1]
    two = torch.topk(part, 2, dim=-1, largest=False, sorted=True).values  # [v_k, v_{k+1}]
    return two[..., 0:1], two[..., 1]


def row_thresholds(scores: torch.Tensor, k: int, work: torch.Tensor | None = None) -> RowThresholds:
    """Per-row thresholds pruning exactly ``k`` entries of every row of ``scores`` ([rows..., in]).
    work: optional buffer like ``scores`` to select in (see `_kth_and_next`)."""
    n = scores.shape[-1]
    if k <= 0 or k >= n:
        return RowThresholds(k, n, None, None, None)
    v, v_next = _kth_and_next(scores, k, work=work)
    # v = k-th smallest score of each row: [..., out, 1]. Everything strictly above v is kept.
    # Without ties at v exactly n - k entries survive. A row where the (k+1)-th smallest equals v has
    # more than k entries <= v, so keeping only those above v would prune too many: there we prune
    # only the `need` lowest-index entries equal to v and keep the rest of them.
    bad = v_next == v[..., 0]
    need = torch.zeros(bad.shape, dtype=torch.int64, device=scores.device)
    if bool(bad.any()):
        need[bad] = k - (scores[bad] < v[bad]).sum(dim=-1)  # ties to prune per bad row, >= 1
    return RowThresholds(k, n, v, bad, need)


def mask_from_thresholds(scores: torch.Tensor, t: RowThresholds, out: torch.Tensor | None = None) -> torch.Tensor:
    """Keep-mask of ``scores`` from :func:`row_thresholds` of the same scores.

    out: optional buffer of the scores' shape to write the mask into, bool or a float dtype (1 =
    keep, 0 = prune: multiplying a weight by it is what multiplying by the bool mask does, and on CPU
    a bf16 x bf16 product is several times faster than a bf16 x bool one)."""
    if out is None:
        out = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    if t.k <= 0:
        return out.fill_(1)
    if t.k >= t.n:
        return out.fill_(0)
    keep = torch.gt(scores, t.v, out=out)
    if bool(t.bad.any()):
        rows_v = t.v[t.bad]  # [R, 1]
        rows_s = scores[t.bad]  # [R, in]
        eq = rows_s == rows_v
        # cumsum counts equal entries from the left, so the first `need` of them are pruned.
        keep_eq = eq & (torch.cumsum(eq, dim=-1) > t.need[t.bad][:, None])
        keep[t.bad] = (keep[t.bad].bool() | keep_eq).to(keep.dtype)
    return keep


def mask_in_scores_(scores: torch.Tensor, t: RowThresholds) -> torch.Tensor:
    """:func:`mask_from_thresholds` written into ``scores`` itself (1 = keep, 0 = prune, in the scores'
    float dtype), which it returns: no other buffer, and the comparison runs in place in one dtype
    (see `steps.prune_rows`). ``scores`` are overwritten."""
    if t.k <= 0:
        return scores.fill_(1)
    if t.k >= t.n:
        return scores.fill_(0)
    fix = None
    if bool(t.bad.any()):  # rows with ties at the threshold, from the scores before they are overwritten
        rows_v = t.v[t.bad]  # [R, 1]
        rows_s = scores[t.bad]  # [R, in] (a copy)
        eq = rows_s == rows_v
        fix = (rows_s > rows_v) | (eq & (torch.cumsum(eq, dim=-1) > t.need[t.bad][:, None]))
    keep = scores.gt_(t.v)
    if fix is not None:
        keep[t.bad] = fix.to(keep.dtype)
    return keep


def _row_mask_fixed_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask pruning exactly ``k`` entries of every row of ``scores`` ([rows..., in])."""
    return mask_from_thresholds(scores, row_thresholds(scores, k))


def unstructured_row_mask(scores: torch.Tensor, sparsity: float | torch.Tensor) -> torch.Tensor:
    """Prune exactly ``round(sparsity * in)`` lowest-score entries in every row.

    Args:
        scores: ``[..., out, in]`` importance scores.
        sparsity: a ratio in [0, 1), or a tensor of shape ``scores.shape[:-2]`` with one ratio per
            matrix (e.g. per expert ``[E]`` for scores ``[E, out, in]``).

    Returns: bool keep-mask, shape of ``scores``.
    """
    _check_scores(scores)
    k = prune_counts(sparsity, scores.shape[-1], tuple(scores.shape[:-2]))
    if k.dim() == 0:
        return _row_mask_fixed_k(scores, int(k))
    # Per-matrix counts: the selection takes one k per call, so run once per distinct k (experts sharing
    # a ratio are done together). [..., out, in] -> [B, out, in], k [...] -> [B].
    flat = scores.reshape(-1, *scores.shape[-2:])
    k_flat = k.reshape(-1)
    keep = torch.empty(flat.shape, dtype=torch.bool, device=scores.device)
    for kv in torch.unique(k_flat).tolist():
        idx = (k_flat == kv).nonzero().squeeze(1).to(scores.device)
        keep[idx] = _row_mask_fixed_k(flat[idx], int(kv))
    return keep.reshape(scores.shape)


def row_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every entry within its row: 0 = pruned first, by ``(score, column index)``.

    Shape of ``scores``; int16 when ``in <= 32767`` (half the memory of int32, and the comparison
    in :func:`mask_from_ranks` is cheaper), else int32. Cache this per score tensor and call
    :func:`mask_from_ranks` for each new sparsity.
    """
    _check_scores(scores)
    n = scores.shape[-1]
    dtype = torch.int16 if n <= torch.iinfo(torch.int16).max else torch.int32
    # A stable sort orders equal scores by column index, which is exactly the tie rule.
    order = torch.sort(scores, dim=-1, stable=True).indices  # [..., out, in]: column at each rank
    ranks = torch.empty(scores.shape, dtype=dtype, device=scores.device)
    # Invert the permutation: ranks[..., order[r]] = r.
    ar = torch.arange(n, dtype=dtype, device=scores.device).expand(scores.shape)
    return ranks.scatter_(-1, order, ar)


def mask_from_ranks(ranks: torch.Tensor, sparsity: float | torch.Tensor) -> torch.Tensor:
    """Keep-mask from :func:`row_ranks` output; identical to :func:`unstructured_row_mask`.

    ``sparsity`` as in :func:`unstructured_row_mask`. One elementwise comparison.
    """
    if ranks.dim() < 2:
        raise ValueError(f"ranks must be at least 2-D [..., out, in], got shape {tuple(ranks.shape)}")
    k = prune_counts(sparsity, ranks.shape[-1], tuple(ranks.shape[:-2]))
    if k.dim() == 0:
        return ranks >= int(k)
    # [...] -> [..., 1, 1] so each matrix compares against its own count.
    return ranks >= k.to(device=ranks.device, dtype=ranks.dtype)[..., None, None]


def check_nm_shape(n: int, m: int, in_features: int) -> None:
    """ValueError unless N:M (0 < n < m, integers) fits rows of `in_features` columns (m divides it)."""
    if not (isinstance(n, int) and isinstance(m, int)) or isinstance(n, bool) or isinstance(m, bool):
        raise ValueError(f"N:M needs integer n and m, got n={n!r}, m={m!r}")
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < n < m (n = entries pruned per group of m), got n={n}, m={m}")
    if in_features % m != 0:
        raise ValueError(
            f"N:M with m={m} needs the input dimension to be divisible by m, got in={in_features}"
        )


# Up to this group size the pairwise-comparison kernel is used; above it, a stable sort.
_PAIRWISE_MAX_M = 8


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M keep-mask: in each group of ``m`` consecutive inputs of a row, prune the ``n`` lowest.

    Note the convention: ``n`` is the number *pruned* per group, so ``nm_mask(s, 2, 4)`` is the
    usual 2:4 pattern (50 %), and ``nm_mask(s, 1, 4)`` keeps 3 of every 4. Requires ``0 < n < m``
    and ``in % m == 0``. Ties: lower column index pruned first (module docstring).
    """
    _check_scores(scores)
    check_nm_shape(n, m, scores.shape[-1])
    # [..., out, in] -> [..., out, in/m, m]: one group per last-dim slice.
    groups = scores.reshape(*scores.shape[:-1], scores.shape[-1] // m, m)
    if m > _PAIRWISE_MAX_M:
        # Rank inside each group via a stable argsort, then keep ranks >= n.
        return (row_ranks(groups) >= n).reshape(scores.shape)

    # Small m: rank_i = #{j < i: s_j <= s_i} + #{j > i: s_j < s_i}, i.e. how many entries of the
    # group come before entry i in (score, index) order. One comparison per unordered pair
    # (m(m-1)/2 in all, 6 for m=4): c = (s_j <= s_i) for j < i says j precedes i, and its negation
    # says i precedes j. Elementwise ops on [..., out, in/m] slices; no per-group selection calls,
    # which is what makes this several times faster than topk over tiny groups.
    cols = [groups[..., i] for i in range(m)]  # m strided views, each [..., out, in/m]
    rank = [torch.zeros(cols[0].shape, dtype=torch.uint8, device=scores.device) for _ in range(m)]
    for i in range(m):
        for j in range(i):
            j_before_i = cols[j] <= cols[i]
            rank[i] += j_before_i
            rank[j] += ~j_before_i
    keep = torch.stack([r >= n for r in rank], dim=-1)  # [..., out, in/m, m]
    return keep.reshape(scores.shape)
