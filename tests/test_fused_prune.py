"""The fused pruning kernel (moeviz.compression.fused_prune): where a row's threshold is known (a
threshold-table hit or this plan's thresholds), `steps.prune_rows` prunes in one numba pass. Its
weights must be the torch path's bit for bit (signed zeros included), equal a brute-force mask, and
the kernel must really run (not silently fall back)."""

from __future__ import annotations

import pytest
import torch

from moeviz import runtime_config
from moeviz.compression import fused_prune, steps
from moeviz.compression.scores import column_factor, importance_scores
from moeviz.compression.scratch import Scratch
from moeviz.compression.threshold_table import TableCache, grid_counts, slot



@pytest.fixture
def kernels(monkeypatch):
    """set(fused=...): the runtime configuration's one switch between the kernel and the torch path, for
    this test only."""
    def set(fused: bool = True, threads: int = 0):
        monkeypatch.setattr(runtime_config, "current", lambda: runtime_config.RuntimeConfig(
            plain_reads=False, fixed_mmap_threshold=False, fused_kernels=fused, prune_threads=threads))
    return set


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def _brute_keep(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Prune the k entries of each row with the lowest (score, column), the masks module's order."""
    keep = torch.ones(scores.shape, dtype=torch.bool)
    for i, row in enumerate(scores.tolist()):
        for j in sorted(range(len(row)), key=lambda j: (row[j], j))[:k]:
            keep[i, j] = False
    return keep


def _prune(base, factor, k, *, fused: bool, kernels, inplace: bool, plan_t: bool = False):
    """prune_rows from a built table (k on the grid), or with this plan's thresholds `t` (plan_t)."""
    kernels(fused)
    cache, scratch = TableCache(), Scratch()
    s = slot(base, "gate", 0, factor, cache)
    first = torch.empty_like(base)
    t = steps.prune_rows(first, factor, k, None, scratch, table=s, src=base)  # builds the table (then fused)
    assert s.get() is not None
    w = base.clone() if inplace else torch.empty_like(base)
    if inplace and not base.is_contiguous():  # keep the row stride for the in-place kernel too
        w = torch.cat([base, base], dim=1)[:, :base.shape[1]]
    got_t = steps.prune_rows(w, factor, k, t if plan_t else None, scratch, table=s,
                             src=None if inplace else base)
    assert torch.equal(_bits(first), _bits(w))  # the building call prunes the same way
    return w, got_t


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("metric", ["magnitude", "moe_pruner"])
@pytest.mark.parametrize("row_stride", [1, 2])
def test_fused_equals_torch_path_bit_for_bit_and_brute_force(dtype, ties, metric, row_stride, monkeypatch, kernels):
    """row_stride 2: rows of a wider tensor (row-strided views, the kernel's second compiled layout)."""
    g = torch.Generator().manual_seed(3)
    n = 96
    base = torch.randn(40, n * row_stride, generator=g)
    if ties:  # few distinct values: ties at the threshold in most rows
        base = (base * 2).round() / 2
    base[0, :7] = -0.0  # signed zeros must stay what w * 0 gives
    base = base.to(dtype)[:, :n]
    norm = None if metric == "magnitude" else (torch.rand(n, generator=g) * 3).round() + 1
    factor = column_factor(tuple(base.shape), metric, norm)
    scores = importance_scores(base, metric, norm)
    calls = []
    real = fused_prune.prune_known_rows
    monkeypatch.setattr(fused_prune, "prune_known_rows", lambda *a: calls.append(1) or real(*a))
    for k in grid_counts(n).tolist()[::3]:
        want = base * _brute_keep(scores, k)
        for inplace in (False, True):
            for plan_t in (False, True):
                calls.clear()
                got, t = _prune(base, factor, k, fused=True, kernels=kernels, inplace=inplace, plan_t=plan_t)
                assert calls, "the fused kernel did not run"
                ref, t_ref = _prune(base, factor, k, fused=False, kernels=kernels, inplace=inplace,
                                    plan_t=plan_t)
                assert torch.equal(_bits(got), _bits(ref)), (k, inplace, plan_t)
                assert torch.equal(_bits(got), _bits(want)), (k, inplace, plan_t)
                assert torch.equal(t.v, t_ref.v) and torch.equal(t.bad, t_ref.bad) and torch.equal(t.need, t_ref.need)


def test_non_finite_weights_take_the_torch_path(monkeypatch, kernels):
    """A NaN or inf weight: the table records it and the torch path (NaN * 0 = NaN) runs, not the kernel."""
    base = torch.randn(6, 64).to(torch.bfloat16)
    base[1, 2], base[4, 5] = float("nan"), float("inf")
    monkeypatch.setattr(fused_prune, "prune_known_rows", lambda *a: pytest.fail("kernel used on non-finite weights"))
    got, _ = _prune(base, None, 32, fused=True, kernels=kernels, inplace=False)
    assert torch.isnan(got[1, 2])  # pruned (a NaN score is never kept) and NaN, as torch's product gives


def test_kernel_switch_and_shapes(kernels):
    """The runtime configuration's fused_kernels=False turns it off; only CPU bf16 / float32 with contiguous rows is taken."""
    w = torch.zeros(4, 8, dtype=torch.bfloat16)
    assert fused_prune.supports(w, w)
    assert not fused_prune.supports(w.half(), w.half())
    assert not fused_prune.supports(w.mT, w.mT)  # strided rows
    kernels(fused=False)
    assert not fused_prune.enabled() and not fused_prune.supports(w, w)


def test_rows_split_across_threads_give_the_same_weights(monkeypatch, kernels):
    """With several torch threads the rows are split over a pool: the same bits as one call."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(37, 64, generator=g).to(torch.bfloat16)
    factor, v = torch.rand(1, 64, generator=g) + 0.1, torch.rand(37, generator=g)
    one, split = torch.empty_like(base), torch.empty_like(base)
    kernels(threads=1)
    fused_prune.prune_known_rows(one, base, factor, v)
    kernels(threads=3)
    monkeypatch.setattr(fused_prune, "PARALLEL_MIN_ELEMENTS", 1)
    assert fused_prune._parts(37, base.numel()) == [(0, 12), (12, 24), (24, 37)]
    assert fused_prune._parts(37, base.numel(), threads=1) == [(0, 37)]  # an explicit count wins (lazy forward)
    fused_prune.prune_known_rows(split, base, factor, v)
    assert torch.equal(_bits(one), _bits(split)) and bool((one == 0).any()) and bool((one != 0).any())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_stored_layout_pass_equals_the_row_pass_on_the_transpose(dtype):
    """`prune_known_columns` on W^T stored [in, out] (factor per stored row, threshold per stored column,
    -inf = keep the column) gives the bits `prune_known_rows` gives on W [out, in]."""
    g = torch.Generator().manual_seed(6)
    w = torch.randn(24, 40, generator=g).to(dtype)  # [out, in]
    w[0, :3] = -0.0
    factor = torch.rand(1, 40, generator=g) + 0.1
    scores = w.float().abs() * factor  # [out, in]
    v = scores.sort(dim=-1).values[:, 19].clone()  # each row's 20th smallest score, as a table holds it
    v[5] = float("-inf")
    want = w * (scores > v[:, None]).to(dtype)  # torch: the reference bits
    rows = torch.empty_like(w)
    fused_prune.prune_known_rows(rows, w, factor, v)
    stored = w.mT.contiguous()  # [in, out]
    cols = torch.empty_like(stored)
    fused_prune.prune_known_columns(cols, stored, factor, v)
    assert torch.equal(_bits(cols.mT.contiguous()), _bits(want)) and torch.equal(_bits(rows), _bits(want))
    assert bool((rows == 0).any()) and torch.equal(rows[5], w[5])
