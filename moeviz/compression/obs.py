"""Second-order (OBS) pruning and quantization of one linear map: SparseGPT and GPTQ.

Pure tensor functions, no model code. The caller collects ``H = sum_t x_t x_t^T`` ([in, in]) over
the inputs ``x_t`` this weight sees (for an expert: the tokens routed to it) and passes the weight
``W`` ([out, in], one row per output neuron, like ``nn.Linear.weight``).

Objective (per row ``w``): keep the layer output close, ``L(w') = 1/2 (w - w')^T H (w - w') ``.
Columns are fixed one at a time, left to right (Frantar & Alistarh, SparseGPT arXiv 2301.00774;
Frantar et al., GPTQ arXiv 2210.17323). When column ``j`` is set to its final value ``q_j``
(0 if pruned, its grid value if quantized), the still-free columns ``F = {j+1, ...}`` receive the
exact least-squares compensation given every fixed column,

    w_F -= (w_j - q_j) / [H_G^-1]_jj * [H_G^-1]_{j,F}      with G = {j} u F,

and the objective grows by ``(w_j - q_j)^2 / (2 [H_G^-1]_jj)``. Row ``j`` of the upper Cholesky
factor ``U`` of ``H^-1`` (``H^-1 = U^T U``) is exactly ``[H_G^-1]_{j,G} / sqrt([H_G^-1]_jj)``, so
all these updates come from one factorisation: with ``d_j = U_jj`` and
``err_j = (w_j - q_j) / d_j``, the update is ``w_F -= err_j * U_{j,F}`` and the cost ``err_j^2 / 2``.
Updates are applied lazily: inside a block of ``blocksize`` columns immediately, to the columns
after the block once per block (one matmul), which is what makes this fast.

Conventions shared with the rest of moeviz:

* Damping: ``H + damp * I`` with ``damp = percdamp * mean(diag H)``; columns with ``H_jj == 0``
  (inputs never seen) are "dead": their diagonal is set to 1 and, by default, their weights to 0
  (as the reference code does; ``zero_dead=False`` keeps them). See :func:`hessian_damped`.
  Exception: if *every* column is dead (``H == 0``: the weight saw no input, e.g. an expert no
  calibration token reached), nothing is zeroed, and the result is exactly magnitude pruning / RTN
  (``ObsResult.dead_columns == in`` tells the caller).
* Sparsity is per output row (unlike the reference's per-block global threshold): every row prunes
  exactly ``prune_counts(sparsity, in)`` weights, as :mod:`moeviz.compression.masks` does. Saliency
  of weight ``j`` is ``w_j^2 / d_j^2``; we rank by the equivalent ``|w_j| / d_j`` (monotone, fewer
  float ties), lowest first, ties to the lower column index (the masks' rule).
  Block rule: at the start of each block, all columns from the block on are up to date (the lazy
  updates of earlier blocks have been applied). Each row ranks *all its remaining columns* by
  saliency and prunes, in this block, those of its lowest ``k_remaining`` that fall in the block;
  ``k_remaining`` then drops by that number. The last block holds all remaining columns, so every
  row ends with exactly ``k`` zeros; with ``blocksize >= in`` this is one selection over the whole
  row (identity ``H``: exactly the magnitude mask of :func:`masks.unstructured_row_mask`).
* N:M (``nm=(n, m)``, ``n`` pruned of every ``m`` consecutive columns, as :func:`masks.nm_mask`):
  decided when the loop reaches the group's first column, from the updated weights, as the
  reference does (``prune_n``/``prune_m``). ``blocksize`` must be a multiple of ``m``.
* Quantization grids are RTN's (:mod:`moeviz.compression.quantize`): per row and group of
  ``group_size`` columns, ``scale`` (and ``zero``) are computed by :func:`quantize_weight` itself
  from the group's current (already updated) weights when the loop reaches the group's first column
  (reference GPTQ, ``static_groups=False``); weights already decided pruned count as 0 there.
  With ``act_order=True`` the grids are static: computed up front from the original ``W`` per
  group, then columns are processed in descending ``diag(H)`` order. Every output weight is
  ``(q - z) * scale`` computed with quantize.py's float32 ops, so it lies exactly on its group's
  grid (``ObsResult.scales`` / ``zero_points``, shapes as in :class:`QuantizedWeight`).

``ObsResult.loss`` is ``sum over rows of 1/2 (w - w')^T H_damped (w - w')`` where ``w`` is the input
row (dead columns zeroed when ``zero_dead``) -- the reference's ``Losses.sum()``. Because each OBS
step is exact, this equals the direct evaluation of that quadratic form on the result (tested).

Cost: one Cholesky, one inverse and one more Cholesky of ``[in, in]`` (``O(in^3)``) plus
``O(out * in^2)`` for the updates; per-row unstructured selection adds one selection (introselect,
linear time) over the remaining columns per block. ``refit`` adds ``O(out * |S|^3)``. Computation is float32 (float64 if ``W`` or ``H`` is float64); the result has
``W``'s dtype (for bf16/fp16 the final cast rounds, as quantize.py's does).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .masks import check_nm_shape, nm_mask, prune_counts
from .quantize import effective_group_size, check_bits, quantize_weight


@dataclass(frozen=True)
class QuantSpec:
    """Weight quantization grid, as :func:`quantize.quantize_weight` takes it.

    ``group_size``: columns per group (-1 or None: one group per row); must divide ``in``.
    ``bits=16`` means not quantized (as in quantize.py).
    """

    bits: int
    group_size: int | None = 128
    symmetric: bool = True

    def __post_init__(self):
        check_bits(self.bits)


@dataclass
class ObsResult:
    """Result of :func:`sparsegpt_prune` / :func:`gptq_quantize`.

    weight: [out, in], dtype of the input ``W``. mask: [out, in] bool keep-mask (True = kept; None
    for quantize-only). loss: see the module docstring. damp: value added to the diagonal.
    dead_columns: number of columns with ``H_jj == 0``. scales / zero_points: the grid of each
    (row, group), [out, in / group_size] float32 (zero_points None when symmetric; both None when
    not quantized); group_size: effective group size (None when not quantized).
    """

    weight: torch.Tensor
    mask: torch.Tensor | None
    loss: float
    damp: float
    dead_columns: int
    scales: torch.Tensor | None = None
    zero_points: torch.Tensor | None = None
    group_size: int | None = None


# -- helpers --------------------------------------------------------------------------------------


def _compute_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def hessian_damped(H: torch.Tensor, percdamp: float = 0.01, *, dtype: torch.dtype | None = None):
    """Damped copy of ``H``: ``(H_damped, damp, dead)``.

    dead: [in] bool, columns with ``H_jj == 0`` (inputs never seen); their diagonal is set to 1
    before damping, as in the reference code (the caller zeroes those weight columns).
    damp = ``percdamp * mean(diag)`` (after the dead fix), added to every diagonal entry.
    ``H`` is not modified. dtype: float32 unless ``H`` is float64 (or ``dtype`` says otherwise).
    """
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be a square [in, in] matrix, got shape {tuple(H.shape)}")
    if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or not percdamp >= 0:
        raise ValueError(f"percdamp must be a number >= 0, got {percdamp!r}")
    dtype = dtype or _compute_dtype(H)
    Hd = H.detach().to(dtype=dtype).clone()
    if not bool(torch.isfinite(Hd).all()):
        raise ValueError("H contains NaN or inf")
    diag = torch.diagonal(Hd)  # a view: writes go to Hd
    dead = diag == 0
    diag[dead] = 1.0
    damp = float(percdamp) * float(diag.mean()) if Hd.shape[0] else 0.0
    diag += damp
    return Hd, damp, dead


def _inverse_cholesky_upper(Hd: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``Hd^-1`` (``Hd^-1 = U^T U``)."""
    L, info = torch.linalg.cholesky_ex(Hd)
    if int(info) != 0:
        raise ValueError(
            "the damped Hessian is not positive definite (Cholesky failed); increase percdamp "
            "or collect more calibration tokens"
        )
    Hinv = torch.cholesky_inverse(L)
    U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
    if int(info) != 0:
        raise ValueError("the inverse damped Hessian is not positive definite; increase percdamp")
    return U


def _grid(cur: torch.Tensor, spec: QuantSpec):
    """RTN grid of each row of ``cur`` [out, g] (one group per row): scale, zero [out] float32."""
    qw = quantize_weight(cur.to(torch.float32), spec.bits, -1, spec.symmetric)
    scale = qw.scales[:, 0]
    zero = None if qw.zero_points is None else qw.zero_points[:, 0]
    return scale, zero


def _quantize_col(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec):
    """Round one column ``w`` [out] on its rows' grids with exactly quantize.py's float32 ops."""
    wf = w.to(torch.float32)
    if zero is None:
        qmax = 2 ** (spec.bits - 1) - 1
        deq = torch.clamp(torch.round(wf / scale), -qmax, qmax) * scale
    else:
        qmax = 2**spec.bits - 1
        q = torch.clamp(torch.round(wf / scale) + zero, 0, qmax)
        deq = (q - zero) * scale
    return deq.to(w.dtype)


def _check_blocksize(blocksize) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize <= 0:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    return blocksize


def _check_w_h(W: torch.Tensor, H: torch.Tensor) -> None:
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        raise ValueError(f"W must be a 2-D [out, in] tensor, got shape {tuple(getattr(W, 'shape', ()))}")
    if not W.is_floating_point():
        raise ValueError(f"W must be a floating-point tensor, got {W.dtype}")
    if not isinstance(H, torch.Tensor) or tuple(H.shape) != (W.shape[1], W.shape[1]):
        raise ValueError(
            f"H must be [in, in] = {(W.shape[1], W.shape[1])} for W of shape {tuple(W.shape)}, "
            f"got {tuple(getattr(H, 'shape', ()))}"
        )
    if not bool(torch.isfinite(W).all()):
        raise ValueError("W contains NaN or inf")


def _check_quant(quant, in_features: int):
    """QuantSpec (bits 16 -> None) and its effective group size."""
    if quant is None:
        return None, None
    if not isinstance(quant, QuantSpec):
        raise ValueError(f"quant must be a QuantSpec, got {type(quant).__name__}")
    if quant.bits == 16:
        return None, None
    return quant, effective_group_size(quant.group_size, in_features)


def _lowest_per_row(head: torch.Tensor, sal: torch.Tensor, k: torch.Tensor, use_numpy: bool | None = None) -> torch.Tensor:
    """Which of the first columns ``head = sal[:, :c]`` are among the ``k[r]`` lowest of row ``r`` of
    ``sal`` [out, n] (non-negative), ranked by ``(value, column)`` as in :mod:`masks`. [out, c] bool.

    A threshold per row, ``v[r]`` = the ``k[r]``-th smallest of the row; entries below ``v`` are
    selected and, of those equal to ``v``, the first ``k - #below`` (lowest column first). One
    selection serves all rows although ``k`` differs per row: each row is padded with
    ``kmax - k[r]`` entries of -1 (below every saliency) and ``k[r] - kmin`` of +inf, so the
    ``kmax``-th smallest of a padded row is the ``k[r]``-th smallest of the row.
    use_numpy: the numpy path (default on CPU) or the torch path (other devices).
    """
    out, n = sal.shape
    kmin, kmax = int(k.min()), int(k.max())
    sel = torch.zeros(head.shape, dtype=torch.bool, device=sal.device)
    if kmax <= 0:
        return sel
    if kmin >= n:
        return ~sel
    pad = kmax - kmin
    fill = None
    if pad:
        p = torch.arange(pad, device=sal.device)[None, :]
        fill = torch.where(p < (kmax - k)[:, None], -1.0, float("inf")).to(sal.dtype)  # [out, pad]
    if sal.device.type == "cpu" if use_numpy is None else use_numpy:
        # numpy: introselect is ~10x faster than torch.kthvalue, and counting a comparison ~8x
        # faster than torch's bool sum (measured, 1 thread, [2048, 1024]).
        a = np.ascontiguousarray(sal.numpy())
        padded = np.concatenate([a, fill.numpy()], axis=1) if pad else a.copy()
        padded.partition(kmax - 1, axis=1)  # in place on the fresh copy
        v_np = padded[:, kmax - 1:kmax]  # [out, 1]
        below = torch.from_numpy(np.count_nonzero(a < v_np, axis=1)).to(k.dtype)
        v = torch.from_numpy(v_np.copy())
    else:
        padded = torch.cat([sal, fill], dim=1) if pad else sal
        v = torch.kthvalue(padded, kmax, dim=1, keepdim=True).values
        below = (sal < v).sum(dim=1)
    # Rows with k[r] == 0 get v = -1: nothing below, nothing equal, nothing selected.
    need = k - below  # [out] entries equal to v to select, lowest column first
    eq = head == v
    return (head < v) | (eq & (torch.cumsum(eq, dim=1) <= need[:, None]))


# -- the OBS loop ---------------------------------------------------------------------------------


def _obs_loop(W, U, *, blocksize, pruned=None, k_row=None, nm=None, quant=None, gs=None, static=None):
    """Sequential OBS over the columns of ``W`` [out, in] (compute dtype, overwritten with the result).

    U: upper Cholesky factor of the inverse damped Hessian [in, in] (in processing order).
    pruned: [out, in] bool, True = pruned: a fixed mask (k_row and nm None) or all False, filled in
    as decisions are made. k_row: [out] int64 zeros per row (per-row unstructured selection).
    nm: (n, m). quant/gs: grid spec and group size; static: (scales [out, G], zeros [out, G] | None,
    group_of_col [in] int64) for precomputed grids, else grids are computed dynamically per group.
    Returns (losses [out], scales [out, G] | None, zeros [out, G] | None).

    Internally the weight is held transposed, ``WT`` [in, out], so that the column being fixed and
    the in-block update ``WT[i:] -= U[i, i:, None] * err`` touch contiguous memory (about 1.5-2x
    faster on CPU than strided columns of [out, in]).
    """
    out, n_cols = W.shape
    WT = W.T.contiguous()  # [in, out]
    PT = None if pruned is None else pruned.T.contiguous()  # [in, out]
    diag_u = torch.diagonal(U)
    losses = torch.zeros(out, dtype=W.dtype, device=W.device)
    k_rem = None if k_row is None else k_row.clone()
    scales = zeros = None
    if quant is not None and static is None:
        n_groups = n_cols // gs
        scales = torch.empty(out, n_groups, dtype=torch.float32, device=W.device)
        zeros = None if quant.symmetric else torch.empty_like(scales)
    scale = zero = None

    for i1 in range(0, n_cols, blocksize):
        i2 = min(i1 + blocksize, n_cols)
        count = i2 - i1
        W1 = WT[i1:i2].clone()  # [count, out]: updated column by column inside the block
        Err1 = torch.zeros_like(W1)  # [count, out]: (w - q) / d of each fixed column
        U1 = U[i1:i2, i1:i2]

        if k_rem is not None:
            # All columns i1.. are up to date here. Each row's lowest k_rem remaining columns by
            # saliency |w|/d (ties: lower column) are its prune candidates; those inside this
            # block are pruned now.
            sal = (WT[i1:].abs() / diag_u[i1:, None]).T.contiguous()  # [out, in - i1]
            sel = _lowest_per_row(sal[:, :count], sal, k_rem)  # [out, count]
            PT[i1:i2] = sel.T
            k_rem -= sel.sum(dim=1)

        for i in range(count):
            j = i1 + i
            if nm is not None and i % nm[1] == 0:
                m = nm[1]
                sal = (W1[i:i + m].abs() / diag_u[j:j + m, None]).T  # [out, m]
                PT[j:j + m] = ~nm_mask(sal, nm[0], m).T
            if quant is not None:
                if static is not None:
                    g = int(static[2][j])
                    scale = static[0][:, g]
                    zero = None if static[1] is None else static[1][:, g]
                elif j % gs == 0:
                    # Current values of group [j, j + gs): inside the block from W1, after it from
                    # WT minus this block's pending lazy update. Already-pruned entries count as 0.
                    g_end = j + gs
                    cur = W1[i:min(count, i + gs)]  # [<= gs, out]
                    if g_end > i2:
                        beyond = WT[i2:g_end] - U[i1:i2, i2:g_end].T @ Err1
                        cur = torch.cat([cur, beyond], dim=0)
                    if PT is not None:
                        cur = cur.masked_fill(PT[j:g_end], 0.0)
                    scale, zero = _grid(cur.T, quant)
                    scales[:, j // gs] = scale
                    if zeros is not None:
                        zeros[:, j // gs] = zero
            w = W1[i]
            q = w.masked_fill(PT[j], 0.0) if PT is not None else w
            if quant is not None:
                q = _quantize_col(q, scale, zero, quant)
            err = (w - q) / diag_u[j]  # [out]
            # OBS compensation of the block's later columns: [count - i, 1] x [1, out]. Row i
            # itself becomes q (up to rounding); it is overwritten with q exactly below.
            W1[i:] -= U1[i, i:, None] * err[None, :]
            W1[i] = q
            Err1[i] = err
        WT[i1:i2] = W1
        losses += (Err1 * Err1).sum(dim=0) / 2  # OBS cost of each column: (w - q)^2 / (2 d^2)
        WT[i2:] -= U[i1:i2, i2:].T @ Err1  # lazy update of everything after the block
    W.copy_(WT.T)
    if pruned is not None:
        pruned.copy_(PT.T)
    if static is not None:
        scales, zeros = static[0], static[1]
    return losses, scales, zeros


def _refit(W0: torch.Tensor, Hd: torch.Tensor, keep: torch.Tensor, max_elems: int = 1 << 26) -> torch.Tensor:
    """Exact least-squares optimum of every row for its keep-mask.

    Minimises ``(w0 - w)^T Hd (w0 - w)`` over ``w`` with ``w[~keep] = 0``: ``Hd_SS w_S = (Hd w0)_S``
    per row, S = kept columns. Rows with the same |S| are solved together (batched Cholesky),
    in chunks of at most ``max_elems`` matrix entries. Cost O(out * |S|^3) time.
    """
    out, n = W0.shape
    W = torch.zeros_like(W0)
    rhs_full = W0 @ Hd  # [out, in]: (Hd w0) per row (Hd symmetric)
    counts = keep.sum(dim=1)
    # Kept column indices first, ascending (stable sort of "pruned" flags): [out, in].
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    for s in torch.unique(counts).tolist():
        if s == 0:
            continue
        rows = (counts == s).nonzero().squeeze(1)
        chunk = max(1, max_elems // (s * s))
        for c0 in range(0, rows.numel(), chunk):
            r = rows[c0:c0 + chunk]
            idx = order[r, :s]  # [R, s]
            Hss = Hd[idx[:, :, None], idx[:, None, :]]  # [R, s, s]
            b = torch.gather(rhs_full[r], 1, idx)  # [R, s]
            L, info = torch.linalg.cholesky_ex(Hss)
            if bool((info != 0).any()):
                raise ValueError("refit: a kept sub-Hessian is not positive definite; increase percdamp")
            ws = torch.cholesky_solve(b[:, :, None], L)[:, :, 0]  # [R, s]
            W[r] = W[r].scatter(1, idx, ws)
    return W


def _quadratic_loss(W0: torch.Tensor, W: torch.Tensor, Hd: torch.Tensor) -> float:
    """sum over rows of 1/2 (w0 - w)^T Hd (w0 - w)."""
    d = W0 - W
    return float(((d @ Hd) * d).sum() / 2)


def _prepare(W, H, percdamp, zero_dead):
    """Compute-dtype copy of W (dead columns zeroed) and the damped Hessian.

    An all-zero H (the weight saw no input at all, e.g. an expert no calibration token reached)
    makes every column dead; zeroing them all would delete the weight on the strength of no data,
    so then nothing is zeroed and H_damped = (1 + percdamp) I: the result is exactly magnitude
    pruning / RTN (``dead_columns == in`` tells the caller).
    """
    dtype = _compute_dtype(W, H)
    Hd, damp, dead = hessian_damped(H.to(W.device), percdamp, dtype=dtype)
    W0 = W.detach().to(dtype).clone()
    if zero_dead and not bool(dead.all()):
        W0[:, dead] = 0
    return W0, Hd, damp, dead


# -- public API -----------------------------------------------------------------------------------


def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float | None,
    *,
    nm: tuple[int, int] | None = None,
    mask: torch.Tensor | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    quant: QuantSpec | None = None,
    refit: bool = False,
    zero_dead: bool = True,
    act_order: bool = False,
) -> ObsResult:
    """SparseGPT: prune ``W`` [out, in] with OBS compensation from ``H`` [in, in].

    Exactly one of: ``sparsity`` (per-row unstructured, ``prune_counts`` zeros per row), ``nm``
    (``(n, m)``: ``n`` pruned of every ``m``; ``sparsity`` then None or ``n/m``), ``mask`` ([out, in]
    bool keep-mask fixed by the caller; ``sparsity`` None). ``quant``: joint pruning + GPTQ
    quantization of the kept weights (SparseGPT paper section 3.4). ``refit``: after the mask is
    chosen, replace each row's kept weights by the exact least-squares optimum for that mask
    (``H_SS w_S = (H w)_S`` with the damped H; cost O(out * |S|^3), only sensible for small ``in``;
    not with ``quant``). ``act_order`` (with ``quant``; not with ``nm``, whose groups are consecutive
    columns): process columns in descending ``diag(H)`` order on static grids, as
    :func:`gptq_quantize` does; the grids come from the weights before OBS (with a fixed ``mask``: its
    pruned weights as 0; with ``sparsity``: the whole row, the mask being chosen along the way), and
    the per-row selection ranks the remaining columns in the processing order. ``zero_dead``: zero the columns whose inputs were never seen (reference
    behaviour); False keeps them (they are then pruned or kept by saliency with ``H_jj = 1``).
    If *every* column is dead (``H == 0``), nothing is zeroed: the result is magnitude pruning.
    """
    _check_w_h(W, H)
    out, n_cols = W.shape
    blocksize = _check_blocksize(blocksize)
    quant, gs = _check_quant(quant, n_cols)
    if refit and quant is not None:
        raise ValueError("refit=True cannot be combined with quant (the refit would leave the grid)")
    if act_order and (quant is None or nm is not None):
        raise ValueError("act_order needs quant and cannot be combined with nm (N:M groups are consecutive columns)")
    k_row = None
    pruned = None
    if mask is not None:
        if sparsity is not None or nm is not None:
            raise ValueError("pass either mask or sparsity/nm, not both (sparsity must be None with mask)")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(W.shape):
            raise ValueError(f"mask must be a bool keep-mask of W's shape {tuple(W.shape)}")
        pruned = ~mask.to(W.device)
    elif nm is not None:
        if not isinstance(nm, (tuple, list)) or len(nm) != 2:
            raise ValueError(f"nm must be a pair (n, m), got {nm!r}")
        n_, m_ = nm
        check_nm_shape(n_, m_, n_cols)
        if sparsity is not None and abs(float(sparsity) - n_ / m_) > 1e-9:
            raise ValueError(f"sparsity {sparsity!r} contradicts nm={n_}:{m_} (pass None or {n_ / m_})")
        if blocksize % m_ != 0:
            raise ValueError(f"blocksize {blocksize} must be a multiple of m={m_} so no N:M group spans two blocks")
        nm = (int(n_), int(m_))
        pruned = torch.zeros(W.shape, dtype=torch.bool, device=W.device)
    else:
        if sparsity is None:
            raise ValueError("sparsity is required (a ratio in [0, 1)) unless nm or mask is given")
        k = int(prune_counts(sparsity, n_cols, ()))
        pruned = torch.zeros(W.shape, dtype=torch.bool, device=W.device)
        k_row = torch.full((out,), k, dtype=torch.int64, device=W.device)

    W0, Hd, damp, dead = _prepare(W, H, percdamp, zero_dead)
    if k_row is not None and int(k_row[0]) == 0 and quant is None:
        # Nothing to prune or round: every OBS step would be a no-op.
        return ObsResult(W0.to(W.dtype), ~pruned, 0.0, damp, int(dead.sum()))
    Hp, Wc, static, perm = Hd, W0.clone(), None, None
    if act_order:
        # Static grids per (row, group) of the original columns, then columns in descending diag(H)
        # (stable: equal diagonals keep column order); W, H and the mask permuted alike, undone below.
        src = W0.masked_fill(pruned, 0.0) if mask is not None else W0
        qw = quantize_weight(src.to(torch.float32), quant.bits, gs, quant.symmetric)
        perm = torch.sort(torch.diagonal(Hd), descending=True, stable=True).indices
        static = (qw.scales, qw.zero_points, perm // gs)
        Hp, Wc, pruned = Hd[perm][:, perm], W0[:, perm].clone(), pruned[:, perm].contiguous()
    U = _inverse_cholesky_upper(Hp)
    losses, scales, zeros = _obs_loop(Wc, U, blocksize=blocksize, pruned=pruned, k_row=k_row, nm=nm,
                                      quant=quant, gs=gs, static=static)
    if perm is not None:
        inv = torch.argsort(perm)
        Wc, pruned = Wc[:, inv], pruned[:, inv]
    keep = ~pruned
    loss = float(losses.sum())
    if refit:
        Wc = _refit(W0, Hd, keep)
        loss = _quadratic_loss(W0, Wc, Hd)
    return ObsResult(Wc.to(W.dtype), keep, loss, damp, int(dead.sum()), scales, zeros, gs)


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    quant: QuantSpec,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    zero_dead: bool = True,
) -> ObsResult:
    """GPTQ: quantize ``W`` [out, in] on RTN grids with OBS error compensation from ``H`` [in, in].

    Grids: dynamic per group (computed from the updated weights at the group's first column), or,
    with ``act_order``, static (from the original ``W``) with columns processed in descending
    ``diag(H)`` order (ties: lower column first). ``quant.bits == 16`` returns a copy of ``W``.
    ``zero_dead`` as in :func:`sparsegpt_prune` (``H == 0``: the result is RTN).
    """
    _check_w_h(W, H)
    out, n_cols = W.shape
    blocksize = _check_blocksize(blocksize)
    if quant is None:
        raise ValueError("gptq_quantize needs a QuantSpec")
    spec, gs = _check_quant(quant, n_cols)
    W0, Hd, damp, dead = _prepare(W, H, percdamp, zero_dead)
    if spec is None:  # 16 bits: not quantized
        return ObsResult(W.detach().clone(), None, 0.0, damp, int(dead.sum()))

    static = None
    perm = None
    if act_order:
        # Static grids from the original (dead-zeroed) weights, one per (row, group): [out, G].
        qw = quantize_weight(W0.to(torch.float32), spec.bits, gs, spec.symmetric)
        # Descending diag(H); stable so equal diagonals keep column order.
        perm = torch.sort(torch.diagonal(Hd), descending=True, stable=True).indices
        static = (qw.scales, qw.zero_points, perm // gs)  # group of each column in processing order
        Hd_p = Hd[perm][:, perm]
        Wc = W0[:, perm].clone()
    else:
        Hd_p = Hd
        Wc = W0.clone()
    U = _inverse_cholesky_upper(Hd_p)
    losses, scales, zeros = _obs_loop(Wc, U, blocksize=blocksize, quant=spec, gs=gs, static=static)
    if perm is not None:
        Wc = Wc[:, torch.argsort(perm)]
    return ObsResult(Wc.to(W.dtype), None, float(losses.sum()), damp, int(dead.sum()), scales, zeros, gs)
