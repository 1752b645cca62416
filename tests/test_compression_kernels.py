"""Tests of the pure tensor functions in moeviz.compression (fast: no model is loaded).

Every check recomputes the expected value independently (Python loops, hand arithmetic) rather
than comparing the code with itself.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import numpy as np
import pytest
import torch

from moeviz.compression import (
    allocate_sparsity,
    fake_quantize_activations,
    importance_scores,
    mask_from_ranks,
    nm_mask,
    quantize_weight,
    row_ranks,
    storage_for,
    unstructured_row_mask,
    validate_ratio,
    weighted_mean,
)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- brute-force references
def _bf_row_keep(row, k):
    """Prune the k entries with the lowest (score, index); pure Python."""
    order = sorted(range(len(row)), key=lambda j: (row[j], j))
    pruned = set(order[:k])
    return [j not in pruned for j in range(len(row))]


def _bf_unstructured(scores, sparsity):
    s = scores.reshape(-1, scores.shape[-1]).tolist()
    k = round(sparsity * scores.shape[-1])
    return torch.tensor([_bf_row_keep(r, k) for r in s]).reshape(scores.shape)


def _bf_nm(scores, n, m):
    rows = scores.reshape(-1, scores.shape[-1]).tolist()
    out = []
    for r in rows:
        keep = []
        for g in range(0, len(r), m):
            keep += _bf_row_keep(r[g : g + m], n)
        out.append(keep)
    return torch.tensor(out).reshape(scores.shape)


# ----------------------------------------------------------------------------------------- scores
def test_scores_match_brute_force():
    w = torch.randn(3, 5, generator=_gen(0))
    sq = torch.rand(5, generator=_gen(1)) * 4
    mag = importance_scores(w, "magnitude")
    wanda = importance_scores(w, "wanda", sq)
    for i in range(3):
        for j in range(5):
            assert mag[i, j].item() == pytest.approx(abs(w[i, j].item()))
            assert wanda[i, j].item() == pytest.approx(abs(w[i, j].item()) * math.sqrt(sq[j].item()), rel=1e-6)
    assert wanda.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("metric", ["magnitude", "wanda"])
def test_scores_batched_per_expert_norms_and_inputs_untouched(dtype, metric):
    w = torch.randn(2, 3, 4, generator=_gen(2)).to(dtype)
    w[0, 0, 0] = -1.5  # a negative weight: an in-place abs would show
    sq = torch.rand(2, 4, generator=_gen(3)) + 0.5  # sqrt changes every entry
    w_before, sq_before = w.clone(), sq.clone()  # copies taken *before* the call
    s = importance_scores(w, metric, sq if metric == "wanda" else None)
    assert s.dtype == torch.float32 and s.shape == (2, 3, 4)
    for e in range(2):
        for r in range(3):
            for j in range(4):
                factor = math.sqrt(sq_before[e, j].item()) if metric == "wanda" else 1.0
                assert s[e, r, j].item() == pytest.approx(abs(w_before[e, r, j].float().item()) * factor, rel=1e-6)
    assert torch.equal(w, w_before) and torch.equal(sq, sq_before)  # inputs untouched
    assert s.data_ptr() not in (w.data_ptr(), sq.data_ptr())


def test_moe_pruner_equals_wanda_when_gates_are_constant():
    # Gate-weighted norms with every gate = g: ||X_j * g||^2 = g^2 ||X_j||^2. Ranking and masks
    # must be identical to wanda's.
    x = torch.randn(50, 64, generator=_gen(4))  # [tokens, in]
    w = torch.randn(32, 64, generator=_gen(5))
    g = 0.37
    plain = (x**2).sum(0)
    gated = ((x * g) ** 2).sum(0)
    s_w = importance_scores(w, "wanda", plain)
    s_m = importance_scores(w, "moe_pruner", gated)
    assert torch.allclose(s_m, s_w * g, rtol=1e-5)
    assert torch.equal(unstructured_row_mask(s_w, 0.5), unstructured_row_mask(s_m, 0.5))
    assert torch.equal(nm_mask(s_w, 2, 4), nm_mask(s_m, 2, 4))


def test_moe_pruner_differs_from_wanda_with_varying_gates():
    x = torch.randn(40, 16, generator=_gen(6))
    gates = torch.rand(40, 1, generator=_gen(7))
    x[:20, :8] *= 10  # big activations on tokens that will get small gates
    gates[:20] = 0.01
    w = torch.randn(8, 16, generator=_gen(8))
    m_w = unstructured_row_mask(importance_scores(w, "wanda", (x**2).sum(0)), 0.5)
    m_m = unstructured_row_mask(importance_scores(w, "moe_pruner", ((x * gates) ** 2).sum(0)), 0.5)
    assert not torch.equal(m_w, m_m)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(metric="l2"), "unknown importance metric"),
        (dict(metric="wanda"), "needs col_sq_norm"),
        (dict(metric="moe_pruner", col_sq_norm=torch.ones(3)), "must have shape"),
        (dict(metric="wanda", col_sq_norm=-torch.ones(5)), "non-negative"),
        (dict(metric="magnitude", col_sq_norm=torch.ones(5)), "takes no col_sq_norm"),
    ],
)
def test_scores_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        importance_scores(torch.randn(4, 5), **kwargs)


# ---------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.25, 0.5, 0.7, 0.99])
def test_unstructured_exact_count_per_row(sparsity):
    s = torch.rand(3, 17, 40, generator=_gen(9))
    keep = unstructured_row_mask(s, sparsity)
    k = round(sparsity * 40)
    assert (keep.sum(-1) == 40 - k).all()
    # What is pruned is never scored above what is kept, row by row.
    pruned_max = torch.where(keep, torch.full_like(s, -1.0), s).amax(-1)
    kept_min = torch.where(keep, s, torch.full_like(s, 2.0)).amin(-1)
    assert (pruned_max <= kept_min).all()


def test_unstructured_ties_exact_and_by_index():
    s = torch.zeros(2, 3, 10)
    s[1, 2] = torch.tensor([1.0, 0, 0, 1, 1, 0, 2, 0, 1, 1])  # ties at the threshold value
    keep = unstructured_row_mask(s, 0.3)
    assert (keep.sum(-1) == 7).all()
    # all-zero rows: the three lowest column indices are pruned
    assert keep[0, 0].tolist() == [False] * 3 + [True] * 7
    # zeros at 1,2,5,7 -> four entries below the ones; prune the first 3 zeros by index
    assert keep[1, 2].tolist() == [True, False, False, True, True, False, True, True, True, True]


@pytest.mark.parametrize("seed", range(4))
def test_masks_equal_brute_force(seed):
    # Quantised random scores so that ties are frequent, plus continuous ones.
    g = _gen(seed)
    for s in (torch.randint(0, 4, (2, 5, 12), generator=g).float(), torch.rand(2, 5, 12, generator=g)):
        for sp in (0.25, 0.5, 0.6):
            expected = _bf_unstructured(s, sp)
            assert torch.equal(unstructured_row_mask(s, sp), expected)
            assert torch.equal(mask_from_ranks(row_ranks(s), sp), expected)
        for n, m in ((2, 4), (1, 4), (3, 4), (2, 3), (5, 12)):
            assert torch.equal(nm_mask(s, n, m), _bf_nm(s, n, m)), (n, m)


@pytest.mark.parametrize("use_numpy", [True, False])
def test_row_thresholds_both_selection_paths_equal_brute_force(use_numpy, monkeypatch):
    """Per-row thresholds (numpy selection on CPU, topk elsewhere) give the brute-force masks at every
    k from 1 to n-1, with many ties (integer scores) and without, and on bf16 scores (topk only)."""
    import moeviz.compression.masks as masks_mod

    real = masks_mod._kth_and_next
    monkeypatch.setattr(masks_mod, "_kth_and_next",
                        lambda s, k, work=None: real(s, k, use_numpy=use_numpy, work=work))
    g = _gen(7)
    cases = [torch.randint(0, 3, (3, 4, 11), generator=g).float(), torch.rand(3, 4, 11, generator=g).double()]
    if not use_numpy:
        cases.append(torch.randint(0, 5, (2, 3, 11), generator=g).to(torch.bfloat16))
    for s in cases:
        for k in range(1, 11):
            want = _bf_unstructured(s.float(), k / 11)
            t = masks_mod.row_thresholds(s, k)
            assert torch.equal(masks_mod.mask_from_thresholds(s, t), want), (s.dtype, k)
            # The lazy path's reused buffers: selection in a work buffer, a 0/1 mask in the weights' dtype.
            work = torch.full_like(s, 7.0) if use_numpy and s.dtype != torch.bfloat16 else None
            t = masks_mod.row_thresholds(s, k, work=work)
            out = torch.full(s.shape, 5.0, dtype=torch.bfloat16)
            assert torch.equal(masks_mod.mask_from_thresholds(s, t, out=out), want.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prune_rows_in_blocks_equals_brute_force(dtype, monkeypatch):
    """The lazy path's one-expert pruning (rows in blocks, reused buffers, thresholds kept for the
    next batch) zeroes exactly the brute-force mask's entries, and gives the same mask again from
    its cached thresholds."""
    from moeviz.compression import steps
    from moeviz.compression.scores import column_factor
    from moeviz.compression.scratch import Scratch

    monkeypatch.setattr(steps, "BLOCK_ELEMENTS", 25)  # 2 rows of 12 per block: several blocks
    g = _gen(3)
    w = (torch.randint(-3, 4, (7, 12), generator=g).float() / 4).to(dtype)  # many ties
    norm = torch.randint(1, 3, (12,), generator=g).float()
    scratch = Scratch()
    for metric, n in (("magnitude", None), ("wanda", norm)):
        factor = column_factor((7, 12), metric, n)
        want = _bf_unstructured(importance_scores(w, metric, n), 5 / 12)
        got, keep = w.clone(), torch.empty(w.shape, dtype=torch.bool)
        t = steps.prune_rows(got, factor, 5, None, scratch, keep)
        assert torch.equal(keep, want) and torch.equal(got, w * want)
        again = w.clone()
        assert steps.prune_rows(again, factor, 5, t, scratch) is t
        assert torch.equal(again, w * want)


def test_nm_mask_large_m_path_equals_brute_force():
    s = torch.randint(0, 3, (3, 4, 32), generator=_gen(10)).float()
    assert torch.equal(nm_mask(s, 6, 16), _bf_nm(s, 6, 16))


def test_nm_pattern_holds_in_every_group():
    s = torch.randn(4, 16, 64, generator=_gen(11)).abs()
    s[0] = 0.0  # all ties
    keep = nm_mask(s, 2, 4)
    groups = keep.reshape(4, 16, 16, 4)
    assert (groups.sum(-1) == 2).all()
    assert keep.float().mean().item() == 0.5


def test_per_expert_sparsity():
    s = torch.rand(3, 6, 20, generator=_gen(12))
    ratios = torch.tensor([0.1, 0.5, 0.5])
    keep = unstructured_row_mask(s, ratios)
    via_ranks = mask_from_ranks(row_ranks(s), ratios)
    assert torch.equal(keep, via_ranks)
    for e, r in enumerate(ratios.tolist()):
        assert torch.equal(keep[e], _bf_unstructured(s[e], r))
        assert (keep[e].sum(-1) == 20 - round(r * 20)).all()


def test_mask_errors():
    s = torch.rand(2, 4, 8)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got 1.0"):
        unstructured_row_mask(s, 1.0)
    with pytest.raises(ValueError, match="sparsity must be in"):
        unstructured_row_mask(s, torch.tensor([0.2, -0.1]))
    with pytest.raises(ValueError, match="leading shape"):
        unstructured_row_mask(s, torch.tensor([0.2, 0.1, 0.3]))
    with pytest.raises(ValueError, match="divisible by m"):
        nm_mask(torch.rand(4, 10), 2, 4)
    with pytest.raises(ValueError, match="0 < n < m"):
        nm_mask(s, 4, 4)
    with pytest.raises(ValueError, match="0 < n < m"):
        nm_mask(s, 0, 4)
    with pytest.raises(ValueError, match="NaN"):
        unstructured_row_mask(torch.tensor([[0.1, float("nan")]]), 0.5)


# ---------------------------------------------------------------------------------- quantization
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [16, -1])
def test_quantize_on_grid_and_half_step(bits, symmetric, group_size):
    w = torch.randn(2, 6, 64, generator=_gen(13))
    w[0, 0, :16] = 0.0  # zero-range group
    w[1, 1, :] = torch.rand(64, generator=_gen(14)) + 0.5  # all positive row (asymmetric range)
    qw = quantize_weight(w, bits, group_size, symmetric)
    gs = 64 if group_size == -1 else group_size
    deq = qw.dequantized
    assert deq.shape == w.shape and deq.dtype == w.dtype
    # [2, 6, 64] -> [2, 6, 64/gs, gs]
    d = deq.reshape(2, 6, 64 // gs, gs)
    x = w.reshape(2, 6, 64 // gs, gs)
    scale = qw.scales.unsqueeze(-1)
    q = d / scale
    if symmetric:
        assert qw.zero_points is None
        qmin, qmax = -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    else:
        q = q + qw.zero_points.unsqueeze(-1)
        qmin, qmax = 0, 2**bits - 1
    assert torch.allclose(q, q.round(), atol=1e-4)
    assert q.round().min() >= qmin and q.round().max() <= qmax
    assert ((d - x).abs() <= scale / 2 + 1e-6).all()
    # Recompute the scale from its definition.
    if symmetric:
        expected = x.abs().amax(-1, keepdim=True) / qmax
    else:
        expected = (x.amax(-1, keepdim=True).clamp(min=0) - x.amin(-1, keepdim=True).clamp(max=0)) / qmax
    expected = torch.where(expected > 0, expected, torch.ones_like(expected))
    assert torch.allclose(scale, expected)
    assert (deq[0, 0, :16] == 0).all()  # zero group stays exactly zero, no NaN
    assert not torch.isnan(deq).any()


def test_quantize_asymmetric_keeps_zero_exact_and_uses_full_range():
    w = torch.tensor([[0.0, 1.0, 2.0, 3.0, -1.0, 0.0, 0.5, 0.25]])
    qw = quantize_weight(w, 2, -1, symmetric=False)
    # range [-1, 3], 2 bits -> scale 4/3, zero round(0.75) = 1, grid {-4/3, 0, 4/3, 8/3}
    assert qw.scales.item() == pytest.approx(4 / 3)
    assert qw.zero_points.item() == 1
    assert qw.dequantized[0, 0].item() == 0.0 and qw.dequantized[0, 5].item() == 0.0
    assert sorted(set(round(v, 5) for v in qw.dequantized[0].tolist())) == [
        round(v, 5) for v in (-4 / 3, 0.0, 4 / 3, 8 / 3)
    ]


def test_quantize_16_bit_is_identity_copy():
    w = torch.randn(3, 8).to(torch.bfloat16)
    qw = quantize_weight(w, 16, 4, True)
    assert torch.equal(qw.dequantized, w) and qw.dequantized.data_ptr() != w.data_ptr()
    assert qw.scales is None
    x = torch.randn(5, 8)
    assert fake_quantize_activations(x, 16) is x


def test_quantize_bf16_roundtrip_dtype():
    w = torch.randn(4, 32).to(torch.bfloat16)
    deq = quantize_weight(w, 4, 8, True).dequantized
    assert deq.dtype == torch.bfloat16
    assert len(set(deq[0, :8].float().tolist())) <= 15


def test_fake_quantize_activations_per_token():
    x = torch.randn(6, 32, generator=_gen(15))
    x[2] = 0.0
    y = fake_quantize_activations(x, 4)
    scale = x.abs().amax(-1, keepdim=True) / 7
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = y / scale
    assert torch.allclose(q, q.round(), atol=1e-4) and q.abs().max() <= 7
    assert ((y - x).abs() <= scale / 2 + 1e-6).all()
    assert (y[2] == 0).all()


@pytest.mark.parametrize("bits", [1, 5, 32, 4.5, True])
def test_quantize_bad_bits(bits):
    with pytest.raises(ValueError, match=r"supported: \(2, 3, 4, 8, 16\)"):
        quantize_weight(torch.randn(2, 8), bits, -1, True)
    with pytest.raises(ValueError, match="supported"):
        fake_quantize_activations(torch.randn(2, 8), bits)


def test_quantize_bad_group_size():
    with pytest.raises(ValueError, match="must divide"):
        quantize_weight(torch.randn(2, 10), 4, 4, True)


# ---------------------------------------------------------------------------------------- storage
def test_storage_dense_and_removed():
    st = storage_for((3, 8), dtype_bytes=4)
    assert (st.format, st.bytes, st.dense_bytes, st.numel) == ("dense", 96, 96, 24)
    st = storage_for(torch.zeros(3, 8, dtype=torch.bfloat16))
    assert st.bytes == 48
    st = storage_for((3, 8), dtype_bytes=2, removed=True)
    assert (st.format, st.bytes, st.compression_ratio) == ("removed", 0, None)


def test_storage_unstructured_picks_smaller():
    # fp16 [10, 100], 50 %: 500 kept * 2 B + 1000 bits / 8 = 1000 + 125 = 1125 < 2000 dense
    st = storage_for((10, 100), dtype_bytes=2, sparsity=0.5, structure="unstructured")
    assert (st.format, st.bytes, st.value_bytes, st.metadata_bytes, st.nonzero) == ("bitmask", 1125, 1000, 125, 500)
    assert st.compression_ratio == pytest.approx(2000 / 1125)
    # 4-bit, 5 % sparse: sparse = 950*4/8 + 125 = 600 > dense 500 -> dense (scales 10 rows * 2 B)
    st = storage_for((10, 100), dtype_bytes=2, sparsity=0.05, structure="unstructured", bits=4)
    assert (st.format, st.bytes, st.scale_bytes, st.nonzero) == ("dense", 520, 20, 950)
    # exact nonzeros from a tensor
    t = torch.zeros(4, 8)
    t[0, :3] = 1.0
    st = storage_for(t, structure="unstructured", count_nonzero=True)
    assert (st.nonzero, st.bytes) == (3, 3 * 4 + 4)


def test_storage_nm_and_quantized():
    # 2:4 on fp16 [8, 16]: 64 kept * 2 B = 128, 32 groups * 3 bits = 96 bits = 12 B
    st = storage_for((8, 16), dtype_bytes=2, structure="n:m", n=2, m=4)
    assert (st.format, st.bytes, st.metadata_bytes) == ("n:m", 140, 12)
    st = storage_for((8, 16), dtype_bytes=2, structure="n:m", n=2, m=4, nm_metadata="per_value")
    assert st.metadata_bytes == 64 * 2 // 8  # 2 bits per kept value
    # 1:4 (keep 3 of 4): C(4,3) = 4 -> 2 bits per group
    st = storage_for((8, 16), dtype_bytes=4, structure="n:m", n=1, m=4)
    assert st.bytes == 96 * 4 + 32 * 2 // 8
    # 4-bit asymmetric, group 8, [4, 16] fp16: 64*4/8 = 32 B values, 8 groups * 2 B scales
    # + 8 zero points * 4 bits = 4 B
    st = storage_for((4, 16), dtype_bytes=2, bits=4, group_size=8, symmetric=False)
    assert (st.value_bytes, st.scale_bytes, st.bytes, st.bits) == (32, 20, 52, 4)
    # 2:4 + 4-bit symmetric per row: 32 kept * 4 bits = 16 B + 16 groups*3 bits = 6 B + 4 * 2 B
    st = storage_for((4, 16), dtype_bytes=2, bits=4, structure="n:m", n=2, m=4)
    assert (st.format, st.bytes) == ("n:m", 16 + 6 + 8)
    json.dumps(dataclasses.asdict(st))


def test_storage_errors():
    with pytest.raises(ValueError, match="supported"):
        storage_for((4, 16), dtype_bytes=2, bits=5)
    with pytest.raises(ValueError, match="dtype_bytes"):
        storage_for((4, 16), dtype_bytes=3)
    with pytest.raises(ValueError, match="structure"):
        storage_for((4, 16), dtype_bytes=2, structure="blocky")
    with pytest.raises(ValueError, match="divisible by m"):
        storage_for((4, 10), dtype_bytes=2, structure="n:m", n=2, m=4)
    with pytest.raises(ValueError, match="sparsity must be in"):
        storage_for((4, 16), dtype_bytes=2, structure="unstructured", sparsity=1.2)


# ------------------------------------------------------------------------------------- allocation
def _alloc_inputs(seed=0, L=3, E=8):
    rng = np.random.default_rng(seed)
    p = rng.integers(1000, 5000, size=(L, E)).astype(float)
    u = rng.dirichlet(np.ones(E), size=L)
    return p, u


def test_allocation_uniform():
    p, u = _alloc_inputs()
    r = allocate_sparsity(p, u, 0.4)
    assert np.allclose(r, 0.4)


@pytest.mark.parametrize("target", [0.1, 0.5, 0.8])
@pytest.mark.parametrize("strength", [0.5, 1.0, 3.0])
def test_allocation_utilization_hits_target_within_bounds(target, strength):
    p, u = _alloc_inputs(1)
    u[0, 3] = 0.0  # an unused expert
    r = allocate_sparsity(p, u, target, preset="utilization", bounds=(0.05, 0.9), strength=strength)
    assert abs((r * p).sum() - target * p.sum()) <= r.size
    assert weighted_mean(r, p) == pytest.approx(target, abs=1e-9)
    assert (r >= 0.05 - 1e-12).all() and (r <= 0.9 + 1e-12).all()
    # within each layer, less used experts are pruned at least as much
    for layer in range(p.shape[0]):
        order = np.argsort(u[layer])
        assert (np.diff(r[layer][order]) <= 1e-12).all()
    assert r[0, 3] == r[0].max()  # the unused expert is pruned hardest


def test_allocation_overrides_absorbed():
    p, u = _alloc_inputs(2)
    ov = {(0, 0): 0.0, (1, 5): 0.9}
    for preset in ("uniform", "utilization"):
        r = allocate_sparsity(p, u, 0.5, preset=preset, overrides=ov)
        assert r[0, 0] == 0.0 and r[1, 5] == 0.9
        assert abs((r * p).sum() - 0.5 * p.sum()) <= r.size


def test_allocation_infeasible():
    p, u = _alloc_inputs(3)
    with pytest.raises(ValueError, match="infeasible"):
        allocate_sparsity(p, u, 0.97, bounds=(0.0, 0.95))
    ov = {(l, e): 0.0 for l in range(3) for e in range(7)}
    with pytest.raises(ValueError, match="infeasible"):
        allocate_sparsity(p, u, 0.5, preset="utilization", overrides=ov)
    r = allocate_sparsity(p, u, 0.5, preset="utilization", overrides=ov, strict=False)
    assert np.allclose(r[:, 7], 0.95) and weighted_mean(r, p) < 0.5


@pytest.mark.parametrize("value", [1.0, -0.1, float("nan"), "abc", None])
def test_validate_ratio(value):
    with pytest.raises(ValueError, match=r"my_field must be"):
        validate_ratio(value, "my_field")
    assert validate_ratio(0.0, "x") == 0.0 and validate_ratio(0.999, "x") == 0.999


def test_allocation_errors():
    p, u = _alloc_inputs()
    with pytest.raises(ValueError, match="target must be in"):
        allocate_sparsity(p, u, 1.5)
    with pytest.raises(ValueError, match="unknown allocation preset"):
        allocate_sparsity(p, u, 0.5, preset="random")
    with pytest.raises(ValueError, match="bounds"):
        allocate_sparsity(p, u, 0.5, bounds=(0.5, 0.2))
    with pytest.raises(ValueError, match="override for \\(layer 0, expert 1\\)"):
        allocate_sparsity(p, u, 0.5, overrides={(0, 1): 1.0})
    with pytest.raises(ValueError, match="outside"):
        allocate_sparsity(p, u, 0.5, overrides={(9, 1): 0.1})
    with pytest.raises(ValueError, match="shape"):
        allocate_sparsity(p, u[:, :3], 0.5, preset="utilization")


def test_benchmark_runs_and_is_json():
    from benchmarks.bench_masks import run

    out = run(repeats=1, layers=1, experts=2)  # tiny: only checks it runs
    json.dumps(out)
    assert set(out["ratios"]) >= {"wanda_unstructured", "mask_from_ranks", "nm_2_4"}
