"""Shared per-row threshold tables (moeviz.compression.threshold_table): the masks they give are the
on-the-fly masks (brute force, ties, every count in and out of the grid), and a table is built once
per (base weights, column factor) and shared by every Compressor / session."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import FAMILIES  # noqa: F401  (conftest fixtures)

from moeviz.compression import steps, threshold_table
from moeviz.compression.scores import column_factor, importance_scores
from moeviz.compression.scratch import Scratch
from moeviz.compression.threshold_table import TableCache, grid_counts, slot


def _bf_keep(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Prune the k entries of each row with the lowest (score, column); pure Python."""
    out = []
    for row in scores.tolist():
        pruned = set(sorted(range(len(row)), key=lambda j: (row[j], j))[:k])
        out.append([j not in pruned for j in range(len(row))])
    return torch.tensor(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_table_masks_equal_brute_force_for_every_count(dtype, monkeypatch):
    """n = 48 columns: the grid holds 19 of the 47 counts. For every k, pruning while building the
    table, from the table (k in the grid: no selection at all) and with the table present but k
    outside it give the brute-force mask; the table's thresholds are the rows' order statistics."""
    monkeypatch.setattr(steps, "BLOCK_ELEMENTS", 100)  # 2 rows of 48 per block: several blocks
    g = torch.Generator().manual_seed(5)
    n = 48
    w = (torch.randint(-4, 5, (9, n), generator=g).float() / 4).to(dtype)  # many ties at every threshold
    w[3] = 0  # a row of equal scores
    norm = torch.randint(1, 3, (n,), generator=g).float()
    ks = grid_counts(n).tolist()
    assert 0 < len(ks) < n - 1
    scratch = Scratch()
    real_select = steps.row_thresholds
    for metric, nrm in (("magnitude", None), ("moe_pruner", norm)):
        factor = column_factor((9, n), metric, nrm)
        scores = importance_scores(w, metric, nrm)
        srt = scores.sort(dim=-1).values
        for k in range(1, n):
            want = _bf_keep(scores, k)
            cache = TableCache()
            s = slot(w, "up", 0, factor, cache)
            built, keep = w.clone(), torch.empty(w.shape, dtype=torch.bool)
            steps.prune_rows(built, factor, k, None, scratch, keep, s)  # empty slot: sorts and fills it
            assert torch.equal(keep, want) and torch.equal(built, w * want), (metric, k)
            table = s.get()
            assert table is not None and cache.builds == 1 and list(table.ks) == ks
            assert torch.equal(table.v, srt[:, np.array(ks) - 1])
            assert torch.equal(table.tie, srt[:, np.array(ks)] == srt[:, np.array(ks) - 1])
            if k in ks:  # from the table: no per-row selection may run
                monkeypatch.setattr(steps, "row_thresholds", lambda *a, **kw: pytest.fail("selected"))
            got, keep = w.clone(), torch.empty(w.shape, dtype=torch.bool)
            steps.prune_rows(got, factor, k, None, scratch, keep, s)
            monkeypatch.setattr(steps, "row_thresholds", real_select)
            assert torch.equal(keep, want) and torch.equal(got, w * want), (metric, k)
            assert cache.builds == 1


def test_table_key_is_the_base_tensor_and_the_factor():
    """Another column factor (other statistics) or an in-place edit of the base is another table; the
    same content from another statistics object is the same one; a freed base drops its tables."""
    w = torch.randn(4, 40)
    f1, f2 = torch.rand(1, 40) + 0.1, torch.rand(1, 40) + 0.1
    cache = TableCache()
    steps.prune_rows(w.clone(), f1, 20, None, Scratch(), table=slot(w, "up", 0, f1, cache))
    assert slot(w, "up", 0, f1.clone(), cache).get() is not None  # same values, another tensor
    assert slot(w, "up", 0, f2, cache).get() is None
    assert slot(w, "up", 1, f1, cache).get() is None and slot(w, "gate", 0, f1, cache).get() is None
    w2 = w.clone()
    steps.prune_rows(w2.clone(), f1, 20, None, Scratch(), table=slot(w2, "up", 0, f1, cache))
    assert cache.builds == 2 and cache.nbytes > 0
    w2.mul_(2)  # the base changed in place: its old table no longer answers
    assert slot(w2, "up", 0, f1, cache).get() is None
    del w2
    import gc

    gc.collect()
    assert cache.builds == 2 and len(cache._tables) == 1  # the freed tensor's table is gone


@torch.no_grad()  # as in an evaluation: the provider computes in its reused buffers (hence the clones)
def _lazy_weights(cm):
    from moeviz.models.runtime import experts_runtime

    out = {}
    for layer in cm.layers:
        rt = experts_runtime(layer.experts)
        if rt is None or rt.weights is None:
            continue
        for e in range(layer.num_experts):
            w_in, w_out = rt.weights(layer.experts, e)
            out[(layer.index, e)] = (w_in.clone(), w_out.clone())
    return out


def test_table_is_shared_across_compressors_and_gives_the_same_weights(loaded_tiny, monkeypatch):
    """A second Compressor (another browser session) with another statistics object of the same
    calibration builds no table; its lazy and materialised weights equal those selected on the fly
    (no table), for slider sparsities, an off-grid one, a per-expert override and N:M."""
    from moeviz.calibration.collect import calibrate
    from moeviz.calibration.stats import CalibrationStats
    from moeviz.compression.apply import Compressor
    from moeviz.compression.plan import CompressionPlan, Override, PruningSettings
    from moeviz.data import Document, tokenize_documents

    cache = TableCache()
    monkeypatch.setattr(threshold_table, "TABLES", cache)
    lm = loaded_tiny("mixtral")
    docs = [Document("The quick brown fox jumps over the lazy dog. " * 20, "prose")]
    samples = tokenize_documents(docs, lm.tokenizer, 4, 16)
    stats = calibrate(lm, samples, batch_size=4)
    plans = [CompressionPlan(pruning=PruningSettings(metric="moe_pruner", sparsity=0.5)),
             CompressionPlan(pruning=PruningSettings(metric="moe_pruner", sparsity=0.6),
                             overrides=[Override(layer=0, expert=1, sparsity=0.33)]),
             CompressionPlan(pruning=PruningSettings(metric="moe_pruner", sparsity=0.37)),
             CompressionPlan(pruning=PruningSettings(metric="wanda", structure="2:4")),
             CompressionPlan(pruning=PruningSettings(metric="magnitude", sparsity=0.3))]
    Compressor(lm, stats).apply(plans[0], lazy=True)  # installing builds nothing: the forward does
    assert cache.builds == 0
    _lazy_weights(Compressor(lm, stats).apply(plans[0], lazy=True))
    builds = cache.builds
    assert builds > 0
    import tempfile

    with tempfile.TemporaryDirectory() as d:  # another session loads the same calibration from disk
        from pathlib import Path

        stats.save(Path(d))
        other = CalibrationStats.load(Path(d))
    comp = Compressor(lm, other)
    for plan in plans[:4]:
        with_table = _lazy_weights(comp.apply(plan, lazy=True))
        materialised = comp.apply(plan)
        monkeypatch.setattr(threshold_table, "TABLES", None)  # compress_experts: no table, select on the fly
        fresh = _lazy_weights(Compressor(lm, stats).apply(plan, lazy=True))
        monkeypatch.setattr(threshold_table, "TABLES", cache)
        assert with_table.keys() == fresh.keys()
        for key in fresh:
            assert all(torch.equal(a, b) for a, b in zip(with_table[key], fresh[key])), (plan.pruning, key)
        for layer in materialised.layers:
            for proj in ("gate", "up", "down"):
                if proj in layer.projections():
                    w = layer.weight(proj)
                    for e in range(layer.num_experts):
                        i = 0 if proj != "down" else 1
                        ref = fresh[(layer.index, e)][i]
                        assert torch.equal(layer.view(proj, ref[None])[0], w[e]), (plan.pruning, proj, e)
    assert cache.builds == builds  # the moe_pruner tables were shared: nothing rebuilt
    _lazy_weights(comp.apply(plans[4], lazy=True))
    assert cache.builds > builds  # magnitude scores are other scores: their own tables


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_table_served_expert_equals_the_general_path_bit_for_bit(family, tiny_model_dirs, monkeypatch):
    """Once the tables hold a slider sparsity, the lazy provider serves a pruned-only expert straight
    from them (`LazyExpertWeights._from_tables`, skipping the general path's bookkeeping): every expert's
    weights equal the general path's and the materialised model's (which materialises through the same
    provider, a dense expert included), bit for bit, on bf16 weights with ties at the thresholds; a
    quantized expert and an off-grid sparsity take the general path."""
    from moeviz.calibration.collect import calibrate
    from moeviz.compression.apply import Compressor
    from moeviz.compression.lazy import LazyExpertWeights
    from moeviz.compression.plan import CompressionPlan, Override, PruningSettings
    from moeviz.data import Document, tokenize_documents
    from moeviz.models import load_model

    cache = TableCache()
    monkeypatch.setattr(threshold_table, "TABLES", cache)
    lm = load_model(tiny_model_dirs[family], dtype="bfloat16")  # this test's own copy: its weights are edited
    with torch.no_grad():  # a coarse grid: many equal |w| in a row, so thresholds tie
        for layer in lm.layers:
            for name in {layer.fused_name(p) for p in layer.projections()}:
                t = getattr(layer.experts, name)
                t.copy_((t / t.abs().max() * 8).round() / 8)
    samples = tokenize_documents([Document("The quick brown fox jumps over the lazy dog. " * 20, "prose")],
                                 lm.tokenizer, 4, 16)
    comp = Compressor(lm, calibrate(lm, samples, batch_size=4))
    served: list[bool] = []
    real = LazyExpertWeights._from_tables
    monkeypatch.setattr(LazyExpertWeights, "_from_tables",
                        lambda self, *a, **k: served.append(r := real(self, *a, **k)) or r)  # noqa: B023
    n_experts = sum(layer.num_experts for layer in lm.layers)
    tied = 0
    for metric in ("moe_pruner", "magnitude"):
        _lazy_weights(comp.apply(CompressionPlan(pruning=PruningSettings(metric=metric, sparsity=0.5)), lazy=True))
        plan = CompressionPlan(pruning=PruningSettings(metric=metric, sparsity=0.6),
                               overrides=[Override(layer=0, expert=2, sparsity=0.0)])  # one dense expert
        served.clear()
        fast = _lazy_weights(comp.apply(plan, lazy=True))
        # every pruned expert from the tables (the dense one never asks: it keeps the base's tensors)
        assert len(served) == n_experts - 1 and all(r is not None for r in served)
        monkeypatch.setattr(LazyExpertWeights, "_from_tables", lambda self, *a, **k: None)
        general = _lazy_weights(comp.apply(plan, lazy=True))
        monkeypatch.setattr(LazyExpertWeights, "_from_tables", lambda self, *a, **k: served.append(r := real(self, *a, **k)) or r)  # noqa: B023,E501
        served.clear()
        materialised = comp.apply(plan)
        assert len(served) == n_experts and all(r is not None for r in served)  # materialised from the tables
        assert fast.keys() == general.keys() and len(fast) == n_experts
        for key in general:
            assert all(torch.equal(a, b) for a, b in zip(fast[key], general[key])), (metric, key)
        for layer in materialised.layers:
            for proj in layer.projections():
                for e in range(layer.num_experts):
                    ref = general[(layer.index, e)][0 if proj != "down" else 1]
                    assert torch.equal(layer.view(proj, ref[None])[0], layer.weight(proj)[e]), (metric, proj, e)
        tied += sum(bool(t.tie.any()) for t in cache._tables.values())
    assert tied > 0  # the tie rule was exercised
    served.clear()
    quantized = CompressionPlan(pruning=PruningSettings(metric="moe_pruner", sparsity=0.6),
                                overrides=[Override(layer=0, expert=1, bits=4)])
    _lazy_weights(comp.apply(quantized, lazy=True))
    assert served.count(None) == 1 and len(served) == n_experts
    served.clear()
    _lazy_weights(comp.apply(CompressionPlan(pruning=PruningSettings(metric="moe_pruner", sparsity=0.37)), lazy=True))
    assert len(served) == n_experts and all(r is None for r in served)  # off the grid: selection


def test_forward_pass_runs_on_one_thread_for_small_experts_only(loaded_tiny, monkeypatch):
    """Inside the forward the table-served pass of a small expert runs on one thread (torch's OpenMP thread
    spins on the other core between matmuls), of a large one on all threads (`lazy.SPLIT_MIN_ELEMENTS`)."""
    from moeviz.calibration.collect import calibrate
    from moeviz.compression import fused_prune, lazy
    from moeviz.compression.apply import Compressor
    from moeviz.compression.plan import CompressionPlan, PruningSettings
    from moeviz.data import Document, tokenize_documents

    monkeypatch.setattr(threshold_table, "TABLES", TableCache())
    lm = loaded_tiny("mixtral")
    samples = tokenize_documents([Document("The quick brown fox jumps over the lazy dog. " * 20, "prose")],
                                 lm.tokenizer, 4, 16)
    comp = Compressor(lm, calibrate(lm, samples, batch_size=4))
    plan = CompressionPlan(pruning=PruningSettings(metric="moe_pruner", sparsity=0.5))
    _lazy_weights(comp.apply(plan, lazy=True))  # builds the tables
    seen = []
    real = fused_prune.prune_known_rows
    monkeypatch.setattr(fused_prune, "prune_known_rows", lambda *a: seen.append(a[4]) or real(*a))
    with torch.no_grad():
        _lazy_weights(comp.apply(plan, lazy=True))
        assert seen and set(seen) == {1}
        seen.clear()
        monkeypatch.setattr(lazy, "SPLIT_MIN_ELEMENTS", 1)  # every expert counts as large
        _lazy_weights(comp.apply(plan, lazy=True))
        assert seen and set(seen) == {None}
