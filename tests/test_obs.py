"""SparseGPT / GPTQ (moeviz.compression.obs) against moeviz's own kernels and brute-force loops.

Brute force here means the plain sequential definition, with none of the implementation's tricks
(no Cholesky factor, no lazy block updates): columns are fixed one at a time and the free columns
re-solved by least squares (or updated with the explicit inverse of the remaining sub-Hessian).
"""

from __future__ import annotations

import pytest
import torch

from moeviz.compression.masks import nm_mask, prune_counts, unstructured_row_mask
from moeviz.compression.obs import ObsResult, QuantSpec, gptq_quantize, hessian_damped, sparsegpt_prune
from moeviz.compression.quantize import quantize_weight
from moeviz.compression.scores import importance_scores


# -- fixtures / helpers ---------------------------------------------------------------------------


def _spd(n: int, seed: int, tokens: int = 64, corr: float = 0.0, dtype=torch.float64) -> torch.Tensor:
    """H = X^T X for random inputs X [tokens, n]; corr > 0 mixes the features (correlated inputs)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n, generator=g, dtype=dtype)
    if corr:
        X = X + corr * torch.randn(tokens, 1, generator=g, dtype=dtype) * torch.randn(1, n, generator=g, dtype=dtype)
        X = X @ (torch.eye(n, dtype=dtype) + 0.3 * torch.randn(n, n, generator=g, dtype=dtype))
    return X.T @ X


def _w(out: int, n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(out, n, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _err(W0: torch.Tensor, W: torch.Tensor, H: torch.Tensor) -> float:
    """sum over rows of 1/2 (w0 - w)^T H (w0 - w), in float64."""
    d = (W0 - W).to(torch.float64)
    return float(((d @ H.to(torch.float64)) * d).sum() / 2)


def _grid_of(cur: torch.Tensor, q: QuantSpec):
    """RTN grid (quantize.py) of each row of cur [out, g], one group per row."""
    qw = quantize_weight(cur.to(torch.float32), q.bits, -1, q.symmetric)
    return qw.scales[:, 0], (None if qw.zero_points is None else qw.zero_points[:, 0])


def _on_grid(w: torch.Tensor, scale: torch.Tensor, zero, q: QuantSpec) -> torch.Tensor:
    """Round w [out] (float32 ops, as quantize.py) on the grid (scale, zero) [out]."""
    wf = w.to(torch.float32)
    if zero is None:
        qmax = 2 ** (q.bits - 1) - 1
        return (torch.clamp(torch.round(wf / scale), -qmax, qmax) * scale).to(w.dtype)
    qmax = 2**q.bits - 1
    return ((torch.clamp(torch.round(wf / scale) + zero, 0, qmax) - zero) * scale).to(w.dtype)


def _brute_ls(W0: torch.Tensor, Hd: torch.Tensor, decide) -> torch.Tensor:
    """Fix columns 0..n-1 in turn to decide(j, Wc); after each, the free columns F = j+1.. are the
    least-squares optimum given all fixed columns: w_F = w0_F - H_FF^-1 H_F,fix (w_fix - w0_fix)."""
    n = W0.shape[1]
    Wc = W0.clone()
    for j in range(n):
        Wc[:, j] = decide(j, Wc)
        if j + 1 < n:
            d_fix = (Wc[:, : j + 1] - W0[:, : j + 1]).T  # [j+1, out]
            Wc[:, j + 1:] = W0[:, j + 1:] - torch.linalg.solve(Hd[j + 1:, j + 1:], Hd[j + 1:, : j + 1] @ d_fix).T
    return Wc


def _brute_obs(W0: torch.Tensor, Hd: torch.Tensor, decide) -> torch.Tensor:
    """Same sequence written as the OBS update with the explicit inverse of the remaining
    sub-Hessian, recomputed each step: w_G -= (w_j - q_j) / [Hinv]_jj * Hinv_{j,G}, G = {j, ...}."""
    n = W0.shape[1]
    Wc = W0.clone()
    for j in range(n):
        q = decide(j, Wc)
        Hinv = torch.linalg.inv(Hd[j:, j:])
        err = (Wc[:, j] - q) / Hinv[0, 0]
        Wc[:, j:] -= err[:, None] * Hinv[0][None, :]
        Wc[:, j] = q
    return Wc


def _saliency(Wc: torch.Tensor, Hd: torch.Tensor, cols) -> torch.Tensor:
    """|w_j| / sqrt([H_{j..}^-1]_jj) for the given columns: the OBS cost of pruning j now (sqrt)."""
    n = Hd.shape[0]
    d = torch.stack([torch.linalg.inv(Hd[j:, j:])[0, 0].sqrt() for j in cols])
    return Wc[:, list(cols)].abs() / d


# -- 1. diagonal Hessian: nothing to compensate, so moeviz's own kernels come out ------------------


@pytest.mark.parametrize("percdamp", [0.0, 0.01])
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.7])
@pytest.mark.parametrize("blocksize", [4, 128])
def test_identity_hessian_prune_is_magnitude_mask(percdamp, sparsity, blocksize):
    W = _w(12, 40, 1, torch.float32)
    r = sparsegpt_prune(W, torch.eye(40), sparsity, blocksize=blocksize, percdamp=percdamp)
    expect = unstructured_row_mask(importance_scores(W, "magnitude"), sparsity)
    assert torch.equal(r.mask, expect)
    assert torch.equal(r.weight, W * expect)
    assert r.weight.dtype == W.dtype


def test_identity_hessian_prune_ties_follow_mask_rule():
    # Equal magnitudes (and a zero row): the lower column index is pruned first, as in masks.py.
    W = torch.tensor([[1.0, -1.0, 1.0, 2.0, -1.0, 3.0], [0.0] * 6, [2.0, 2.0, -2.0, 2.0, 1.0, 1.0]])
    for s in (0.3, 0.5):
        for bs in (2, 6):
            r = sparsegpt_prune(W, torch.eye(6), s, blocksize=bs, percdamp=0.0)
            assert torch.equal(r.mask, unstructured_row_mask(W.abs(), s)), (s, bs)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [4, 8, -1])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_identity_hessian_gptq_is_rtn_bit_identical(symmetric, group, bits):
    W = _w(10, 32, 2, torch.float32)
    rtn = quantize_weight(W, bits, group, symmetric)
    r = gptq_quantize(W, torch.eye(32), QuantSpec(bits, group, symmetric), blocksize=8)
    assert torch.equal(r.weight, rtn.dequantized)
    assert torch.equal(r.scales, rtn.scales)
    if not symmetric:
        assert torch.equal(r.zero_points, rtn.zero_points)
    # Diagonal (not identity) H with act_order: columns reordered, static grids -> still RTN.
    Hdiag = torch.diag(torch.rand(32, generator=torch.Generator().manual_seed(3)) + 0.1)
    r2 = gptq_quantize(W, Hdiag, QuantSpec(bits, group, symmetric), blocksize=8, act_order=True)
    assert torch.equal(r2.weight, rtn.dequantized)


@pytest.mark.parametrize("symmetric", [True, False])
def test_identity_hessian_joint_prune_quant_is_prune_then_rtn(symmetric):
    # moeviz's pipeline: magnitude mask, then RTN of the pruned weight (its grid sees the zeros).
    W = _w(10, 32, 4, torch.float32)
    r = sparsegpt_prune(W, torch.eye(32), 0.5, blocksize=64, quant=QuantSpec(4, 8, symmetric))
    keep = unstructured_row_mask(W.abs(), 0.5)
    assert torch.equal(r.mask, keep)
    assert torch.equal(r.weight, quantize_weight(W * keep, 4, 8, symmetric).dequantized)


# -- 2. against the plain sequential definition ----------------------------------------------------


def _random_keep(out, n, seed, frac=0.5):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(out, n, generator=g).argsort(dim=1).argsort(dim=1) >= int(frac * n)


@pytest.mark.parametrize("blocksize", [3, 5, 16])
def test_fixed_mask_matches_brute_force_least_squares(blocksize):
    W, H = _w(6, 16, 5), _spd(16, 6)
    keep = _random_keep(6, 16, 7)
    r = sparsegpt_prune(W, H, None, mask=keep, blocksize=blocksize)
    Hd, _, _ = hessian_damped(H, 0.01)
    ref = _brute_ls(W, Hd, lambda j, Wc: torch.where(keep[:, j], Wc[:, j], 0.0))
    torch.testing.assert_close(r.weight, ref, rtol=0, atol=1e-9)
    assert torch.equal(r.mask, keep)
    assert r.loss == pytest.approx(_err(W, r.weight, Hd), rel=1e-9)


@pytest.mark.parametrize("blocksize", [3, 8, 16])
@pytest.mark.parametrize("sparsity", [0.3, 0.5])
def test_per_row_selection_matches_brute_force(blocksize, sparsity):
    """The block rule, restated plainly: at each block start every row ranks its remaining columns
    by OBS saliency (ties: lower column) and prunes those of its lowest k_remaining in the block."""
    out, n = 6, 16
    W, H = _w(out, n, 8), _spd(n, 9, corr=1.0)
    Hd, _, _ = hessian_damped(H, 0.01)
    k = int(prune_counts(sparsity, n, ()))
    pruned = torch.zeros(out, n, dtype=torch.bool)
    k_rem = [k] * out

    def decide(j, Wc):
        if j % blocksize == 0:
            sal = _saliency(Wc, Hd, range(j, n))
            for row in range(out):
                order = sorted(range(n - j), key=lambda c: (float(sal[row, c]), c))[: k_rem[row]]
                for c in order:
                    if c < blocksize:
                        pruned[row, j + c] = True
                        k_rem[row] -= 1
        return torch.where(pruned[:, j], 0.0, Wc[:, j])

    ref = _brute_ls(W, Hd, decide)
    r = sparsegpt_prune(W, H, sparsity, blocksize=blocksize)
    assert torch.equal(r.mask, ~pruned)
    torch.testing.assert_close(r.weight, ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_nm_matches_brute_force(nm):
    n_, m = nm
    out, n = 6, 16
    W, H = _w(out, n, 10), _spd(n, 11, corr=1.0)
    Hd, _, _ = hessian_damped(H, 0.01)
    pruned = torch.zeros(out, n, dtype=torch.bool)

    def decide(j, Wc):
        if j % m == 0:
            sal = _saliency(Wc, Hd, range(j, j + m))
            for row in range(out):
                for c in sorted(range(m), key=lambda c: (float(sal[row, c]), c))[:n_]:
                    pruned[row, j + c] = True
        return torch.where(pruned[:, j], 0.0, Wc[:, j])

    ref = _brute_ls(W, Hd, decide)
    r = sparsegpt_prune(W, H, None, nm=nm, blocksize=8)
    assert torch.equal(r.mask, ~pruned)
    torch.testing.assert_close(r.weight, ref, rtol=0, atol=1e-9)


def _quant_decide(q: QuantSpec, gs: int, keep=None):
    """Column decision of GPTQ (and joint prune + quant with a fixed keep-mask): the grid of a group
    is RTN's on the group's current weights (pruned ones as 0) when its first column is reached."""
    grid = {}

    def decide(j, Wc):
        if j % gs == 0:
            cur = Wc[:, j:j + gs].clone()
            if keep is not None:
                cur[~keep[:, j:j + gs]] = 0
            grid["g"] = _grid_of(cur, q)
        w = Wc[:, j] if keep is None else torch.where(keep[:, j], Wc[:, j], 0.0)
        return _on_grid(w, *grid["g"], q)

    return decide


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group,blocksize", [(4, 16), (8, 3), (-1, 5), (16, 4)])
def test_gptq_matches_brute_force_obs(symmetric, group, blocksize):
    W, H = _w(6, 16, 12), _spd(16, 13, corr=1.0)
    Hd, _, _ = hessian_damped(H, 0.01)
    q = QuantSpec(3, group, symmetric)
    gs = 16 if group == -1 else group
    ref = _brute_obs(W, Hd, _quant_decide(q, gs))
    r = gptq_quantize(W, H, q, blocksize=blocksize)
    torch.testing.assert_close(r.weight, ref, rtol=0, atol=1e-9)
    assert r.loss == pytest.approx(_err(W, r.weight, Hd), rel=1e-9)


def test_gptq_act_order_matches_brute_force_in_permuted_order():
    W, H = _w(6, 16, 14), _spd(16, 15, corr=1.0)
    q = QuantSpec(3, 4, False)
    Hd, _, _ = hessian_damped(H, 0.01)
    perm = torch.argsort(torch.diagonal(Hd), descending=True, stable=True)
    static = quantize_weight(W.to(torch.float32), 3, 4, False)  # grids of the original groups

    def decide(j, Wc):
        g = int(perm[j]) // 4
        return _on_grid(Wc[:, j], static.scales[:, g], static.zero_points[:, g], q)

    ref = _brute_obs(W[:, perm], Hd[perm][:, perm], decide)[:, torch.argsort(perm)]
    r = gptq_quantize(W, H, q, blocksize=5, act_order=True)
    torch.testing.assert_close(r.weight, ref, rtol=0, atol=1e-9)
    assert r.loss == pytest.approx(_err(W, r.weight, Hd), rel=1e-9)


def test_joint_prune_quant_fixed_mask_matches_brute_force():
    W, H = _w(6, 16, 16), _spd(16, 17, corr=1.0)
    keep = _random_keep(6, 16, 18)
    q = QuantSpec(4, 8, True)
    Hd, _, _ = hessian_damped(H, 0.01)
    ref = _brute_obs(W, Hd, _quant_decide(q, 8, keep))
    r = sparsegpt_prune(W, H, None, mask=keep, quant=q, blocksize=5)
    torch.testing.assert_close(r.weight, ref, rtol=0, atol=1e-9)
    assert bool((r.weight[~keep] == 0).all())


# -- 3. refit: the exact optimum for the mask --------------------------------------------------------


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_refit_is_least_squares_optimum(nm):
    W, H = _w(6, 16, 19), _spd(16, 20, corr=1.0)
    Hd, _, _ = hessian_damped(H, 0.01)
    sparsity = None if nm else 0.5
    plain = sparsegpt_prune(W, H, sparsity, nm=nm, blocksize=4)
    r = sparsegpt_prune(W, H, sparsity, nm=nm, blocksize=4, refit=True)
    assert torch.equal(r.mask, plain.mask)
    best = torch.zeros_like(W)
    for row in range(6):
        S = r.mask[row].nonzero().squeeze(1)
        best[row, S] = torch.linalg.solve(Hd[S][:, S], (Hd @ W[row])[S])
    torch.testing.assert_close(r.weight, best, rtol=0, atol=1e-9)
    assert r.loss == pytest.approx(_err(W, best, Hd), rel=1e-9)
    assert r.loss <= plain.loss + 1e-9
    assert plain.loss <= _err(W, W * plain.mask, Hd)


def test_refit_handles_rows_with_different_kept_counts():
    # A fixed mask with 3 different per-row counts: rows are batched per count.
    W, H = _w(5, 12, 21), _spd(12, 22)
    Hd, _, _ = hessian_damped(H, 0.01)
    keep = torch.ones(5, 12, dtype=torch.bool)
    keep[0, :6] = False
    keep[1, ::3] = False
    keep[3, 5:9] = False
    r = sparsegpt_prune(W, H, None, mask=keep, refit=True)
    for row in range(5):
        S = keep[row].nonzero().squeeze(1)
        torch.testing.assert_close(r.weight[row, S], torch.linalg.solve(Hd[S][:, S], (Hd @ W[row])[S]))
        assert bool((r.weight[row, ~keep[row]] == 0).all())


def test_lowest_per_row_selection_matches_sorting():
    """The one-threshold selection with a different k per row (many ties: small integers)."""
    from moeviz.compression.obs import _lowest_per_row

    g = torch.Generator().manual_seed(41)
    for trial in range(20):
        out, n = 7, int(torch.randint(1, 12, (1,), generator=g))
        sal = torch.randint(0, 4, (out, n), generator=g).to(torch.float32)
        k = torch.randint(0, n + 1, (out,), generator=g)
        c = int(torch.randint(1, n + 1, (1,), generator=g))
        for use_numpy in (True, False):  # the CPU path and the one other devices take
            got = _lowest_per_row(sal[:, :c], sal, k, use_numpy=use_numpy)
            for r in range(out):
                chosen = sorted(range(n), key=lambda j: (float(sal[r, j]), j))[: int(k[r])]
                assert got[r].tolist() == [j in chosen for j in range(c)], (trial, r, use_numpy)


# -- 4. invariants -------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.55, 0.9])
@pytest.mark.parametrize("blocksize", [1, 7, 128])
def test_exact_zeros_per_row(sparsity, blocksize):
    W, H = _w(9, 40, 23, torch.float32), _spd(40, 24, corr=2.0, dtype=torch.float32)
    r = sparsegpt_prune(W, H, sparsity, blocksize=blocksize)
    k = int(prune_counts(sparsity, 40, ()))
    assert torch.equal((~r.mask).sum(dim=1), torch.full((9,), k))
    assert torch.equal((r.weight == 0).sum(dim=1), torch.full((9,), k))


@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4)])
def test_nm_groups_have_exactly_n_zeros(nm):
    W, H = _w(9, 32, 25, torch.float32), _spd(32, 26, corr=2.0, dtype=torch.float32)
    r = sparsegpt_prune(W, H, None, nm=nm, blocksize=16)
    n_, m = nm
    assert torch.equal((~r.mask).reshape(9, -1, m).sum(-1), torch.full((9, 32 // m), n_))
    assert bool((r.weight[~r.mask] == 0).all()) and bool((r.weight[r.mask] != 0).all())


def _assert_on_grid(r: ObsResult, q: QuantSpec):
    """Every weight is (q - z) * scale of its (row, group): re-rounding it on that grid is exact."""
    out, n = r.weight.shape
    gs = r.group_size
    assert r.scales.shape == (out, n // gs)
    for g in range(n // gs):
        cols = r.weight[:, g * gs:(g + 1) * gs].to(torch.float32)
        zero = None if r.zero_points is None else r.zero_points[:, g]
        for c in range(gs):
            assert torch.equal(_on_grid(cols[:, c], r.scales[:, g], zero, q), cols[:, c])


@pytest.mark.parametrize("symmetric", [True, False])
def test_quantized_weights_lie_on_their_group_grid(symmetric):
    W, H = _w(8, 32, 27, torch.float32), _spd(32, 28, corr=2.0, dtype=torch.float32)
    q = QuantSpec(3, 8, symmetric)
    for r in (
        gptq_quantize(W, H, q, blocksize=5),
        gptq_quantize(W, H, q, blocksize=5, act_order=True),
        sparsegpt_prune(W, H, 0.5, quant=q, blocksize=8),
        sparsegpt_prune(W, H, None, nm=(2, 4), quant=q, blocksize=4),
    ):
        _assert_on_grid(r, q)
        # And the grid is not RTN's of W itself (the weights moved), yet stays a valid grid.
        assert not torch.equal(r.weight, quantize_weight(W, 3, 8, symmetric).dequantized)
    # Joint: pruned weights are exact zeros on the grid.
    r = sparsegpt_prune(W, H, 0.5, quant=q, blocksize=8)
    assert bool((r.weight[~r.mask] == 0).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_inputs_not_modified_and_dtype_kept(dtype):
    W = _w(8, 32, 29, torch.float32).to(dtype)
    H = _spd(32, 30, dtype=torch.float32)
    H[3, :] = 0  # a dead column: its weights are zeroed in the result, never in W
    H[:, 3] = 0
    W0, H0 = W.clone(), H.clone()
    for r in (
        sparsegpt_prune(W, H, 0.5, blocksize=8),
        sparsegpt_prune(W, H, 0.5, refit=True),
        gptq_quantize(W, H, QuantSpec(4, 8, False), act_order=True),
        sparsegpt_prune(W, H, None, nm=(2, 4), quant=QuantSpec(4, -1, True)),
    ):
        assert r.weight.dtype == dtype and r.weight.shape == W.shape
    assert torch.equal(W, W0) and torch.equal(H, H0)


def test_dead_columns():
    W, H = _w(6, 16, 31), _spd(16, 32)
    dead = torch.tensor([1, 7, 8])
    H[dead, :] = 0
    H[:, dead] = 0
    Hd, damp, is_dead = hessian_damped(H, 0.01)
    assert torch.equal(is_dead.nonzero().squeeze(1), dead)
    diag = torch.diagonal(H).clone()
    diag[dead] = 1.0  # the reference's dead fix comes before the mean
    assert damp == pytest.approx(0.01 * float(diag.mean()), rel=1e-12)
    torch.testing.assert_close(Hd - torch.diag(torch.diagonal(Hd)), H - torch.diag(torch.diagonal(H)), rtol=0, atol=0)
    assert torch.equal(torch.diagonal(Hd)[dead], torch.full((3,), 1.0 + damp, dtype=Hd.dtype))
    for r in (
        sparsegpt_prune(W, H, 0.5, blocksize=4),
        sparsegpt_prune(W, H, None, nm=(2, 4), refit=True),
        gptq_quantize(W, H, QuantSpec(3, 4, False), act_order=True),
        gptq_quantize(W, H, QuantSpec(3, 4, True)),
    ):
        assert r.dead_columns == 3 and r.damp == pytest.approx(damp)
        assert bool(torch.isfinite(r.weight).all())
        assert bool((r.weight[:, dead] == 0).all())
    # zero_dead=False keeps what the rows had there (identity-like H on those columns).
    r = gptq_quantize(W, H, QuantSpec(8, -1, True), zero_dead=False)
    assert bool((r.weight[:, dead] != 0).all())
    # A weight that saw no input at all (H == 0, e.g. an expert no calibration token reached) is
    # not deleted: all columns are dead and the result is magnitude pruning / RTN.
    Wf = W.to(torch.float32)
    r = sparsegpt_prune(Wf, torch.zeros(16, 16), 0.5)
    assert r.dead_columns == 16 and torch.equal(r.mask, unstructured_row_mask(Wf.abs(), 0.5))
    assert torch.equal(r.weight, Wf * r.mask)
    r = gptq_quantize(Wf, torch.zeros(16, 16), QuantSpec(3, 4, False))
    assert torch.equal(r.weight, quantize_weight(Wf, 3, 4, False).dequantized)


def test_input_errors():
    W, H = _w(4, 8, 33), _spd(8, 34)
    keep = torch.ones(4, 8, dtype=torch.bool)
    cases = [
        (lambda: sparsegpt_prune(W, H, 1.0), "sparsity"),
        (lambda: sparsegpt_prune(W, H, -0.1), "sparsity"),
        (lambda: sparsegpt_prune(W, H, None), "sparsity is required"),
        (lambda: sparsegpt_prune(W, H[:4, :4], 0.5), "H must be"),
        (lambda: sparsegpt_prune(W[0], H, 0.5), "W must be"),
        (lambda: sparsegpt_prune(W, H, 0.5, blocksize=0), "blocksize"),
        (lambda: sparsegpt_prune(W, H, None, nm=(2, 3)), "divisible"),
        (lambda: sparsegpt_prune(W, H, None, nm=(2, 4), blocksize=6), "multiple of m"),
        (lambda: sparsegpt_prune(W, H, 0.25, nm=(2, 4)), "contradicts"),
        (lambda: sparsegpt_prune(W, H, 0.5, mask=keep), "either mask"),
        (lambda: sparsegpt_prune(W, H, None, mask=keep[:, :4]), "keep-mask"),
        (lambda: sparsegpt_prune(W, H, 0.5, quant=QuantSpec(4, 8), refit=True), "refit"),
        (lambda: sparsegpt_prune(W, H, 0.5, percdamp=-1), "percdamp"),
        (lambda: sparsegpt_prune(W, -H, 0.5), "positive definite"),
        (lambda: gptq_quantize(W, H, QuantSpec(4, 3)), "group_size"),
        (lambda: QuantSpec(5, 8), "bit width"),
        (lambda: gptq_quantize(W, H, None), "QuantSpec"),
    ]
    for fn, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fn()


def test_zero_sparsity_is_a_copy():
    W, H = _w(4, 8, 42), _spd(8, 43)
    r = sparsegpt_prune(W, H, 0.0)
    assert torch.equal(r.weight, W) and bool(r.mask.all()) and r.loss == 0.0
    # Below half a weight per row rounds to zero pruned, as prune_counts says.
    assert torch.equal(sparsegpt_prune(W, H, 0.05).weight, W)


def test_sixteen_bits_means_unquantized():
    W, H = _w(4, 8, 35), _spd(8, 36)
    assert torch.equal(gptq_quantize(W, H, QuantSpec(16, -1)).weight, W)
    a = sparsegpt_prune(W, H, 0.5, quant=QuantSpec(16, -1))
    b = sparsegpt_prune(W, H, 0.5)
    assert torch.equal(a.weight, b.weight) and a.scales is None


# -- 5. behaviour: second order beats first order on correlated inputs -----------------------------


def test_sparsegpt_beats_magnitude_and_wanda_masks():
    out, n = 32, 64
    W = _w(out, n, 37, torch.float32)
    H = _spd(n, 38, tokens=512, corr=3.0, dtype=torch.float32)
    wanda = importance_scores(W, "wanda", torch.diagonal(H).clone())
    magnitude = importance_scores(W, "magnitude")
    for sparsity, nm in ((0.5, None), (None, (2, 4))):
        r = sparsegpt_prune(W, H, sparsity, nm=nm, blocksize=16)
        ours = _err(W, r.weight, H)
        for scores in (magnitude, wanda):
            keep = unstructured_row_mask(scores, 0.5) if nm is None else nm_mask(scores, *nm)
            assert ours < 0.8 * _err(W, W * keep, H), (sparsity, nm)


def test_gptq_beats_rtn_at_three_bits():
    out, n = 32, 64
    W = _w(out, n, 39, torch.float32)
    H = _spd(n, 40, tokens=512, corr=3.0, dtype=torch.float32)
    for group in (16, -1):
        for act_order in (False, True):
            q = QuantSpec(3, group, False)
            r = gptq_quantize(W, H, q, blocksize=16, act_order=act_order)
            rtn = quantize_weight(W, 3, group, False).dequantized
            assert _err(W, r.weight, H) < 0.8 * _err(W, rtn, H), (group, act_order)


# -- act-order with pruning (fixed mask, per-row selection) ------------------------------------------


def test_act_order_with_a_fixed_mask_matches_brute_force_in_permuted_order():
    """A fixed keep-mask + GPTQ in act-order: columns in descending diag(H), static grids of the masked
    original groups, written plainly as the OBS sequence in permuted order."""
    W, H = _w(6, 16, 21), _spd(16, 22, corr=1.0)
    keep = _random_keep(6, 16, 23)
    q = QuantSpec(3, 4, False)
    Hd, _, _ = hessian_damped(H, 0.01)
    perm = torch.argsort(torch.diagonal(Hd), descending=True, stable=True)
    static = quantize_weight((W * keep).to(torch.float32), 3, 4, False)
    keep_p = keep[:, perm]

    def decide(j, Wc):
        g = int(perm[j]) // 4
        return _on_grid(torch.where(keep_p[:, j], Wc[:, j], 0.0), static.scales[:, g], static.zero_points[:, g], q)

    ref = _brute_obs(W[:, perm], Hd[perm][:, perm], decide)[:, torch.argsort(perm)]
    r = sparsegpt_prune(W, H, None, mask=keep, quant=q, blocksize=5, act_order=True)
    torch.testing.assert_close(r.weight, ref, rtol=0, atol=1e-9)
    assert torch.equal(r.mask, keep) and bool((r.weight[~keep] == 0).all())
    assert torch.equal(r.scales, static.scales) and torch.equal(r.zero_points, static.zero_points)
    assert r.loss == pytest.approx(_err(W, r.weight, Hd), rel=1e-9)
    # Identity Hessian: no compensation, so act-order with a fixed mask is RTN of the masked weights.
    Wf = W.to(torch.float32)
    r = sparsegpt_prune(Wf, torch.eye(16), None, mask=keep, quant=QuantSpec(4, 8, True), act_order=True)
    assert torch.equal(r.weight, quantize_weight(Wf * keep, 4, 8, True).dequantized)


def test_act_order_with_per_row_selection_keeps_exact_counts_and_the_grid():
    W, H = _w(8, 32, 24, torch.float32), _spd(32, 25, corr=1.0, dtype=torch.float32)
    q = QuantSpec(4, 8, True)
    r = sparsegpt_prune(W, H, 0.5, quant=q, blocksize=8, act_order=True)
    plain = sparsegpt_prune(W, H, 0.5, quant=q, blocksize=8)
    assert bool(((~r.mask).sum(1) == 16).all()) and bool((r.weight[~r.mask] == 0).all())
    assert torch.equal(r.scales, quantize_weight(W, 4, 8, True).scales)  # static grids of the original groups
    _assert_on_grid(r, q)
    assert not torch.equal(r.weight, plain.weight)
    with pytest.raises(ValueError, match="act_order"):
        sparsegpt_prune(W, H, None, nm=(2, 4), quant=q, act_order=True)
    with pytest.raises(ValueError, match="act_order"):
        sparsegpt_prune(W, H, 0.5, act_order=True)
