"""Calibration cache on disk, the token explorer, and the per-expert table round trip."""

import pytest
import torch

from moeviz.compression import CompressionPlan, PruningSettings, QuantSettings
from moeviz.compression.apply import apply_plan
from moeviz.compression.table import apply_table_edits, expert_table
from moeviz.data import Document, tokenize_documents
from moeviz.errors import CalibrationDataError
from moeviz.explorer import route_text
from moeviz.workspace import calibrate_cached

DOCS = [Document("The quick brown fox jumps over the lazy dog. " * 20, "prose"),
        Document("x = [i * i for i in range(10)]\n" * 20, "code")]


def test_calibration_cache_reuses_saved_stats(loaded_tiny, tmp_path, monkeypatch):
    lm = loaded_tiny("mixtral")
    samples = tokenize_documents(DOCS, lm.tokenizer, 4, 16)
    a, cached_a = calibrate_cached(lm, samples, cache_dir=tmp_path)
    b, cached_b = calibrate_cached(lm, samples, cache_dir=tmp_path)
    assert (cached_a, cached_b) == (False, True)
    assert b.fingerprint == a.fingerprint and torch.equal(b.layers[1].input_sq, a.layers[1].input_sq)
    c, cached_c = calibrate_cached(lm, tokenize_documents(DOCS, lm.tokenizer, 4, 16, seed=9), cache_dir=tmp_path)
    assert not cached_c and c.fingerprint != a.fingerprint
    assert len(list(tmp_path.iterdir())) == 2  # no temporary folders left behind


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_token_explorer_matches_router(family, loaded_tiny):
    lm = loaded_tiny(family)
    r = route_text(lm, "hello moe world", layer=1)
    assert len(r.tokens) == len(r.top1) == len(r.topk) == 15  # character-level tokenizer
    layer = lm.layers[1]
    for ks, ws, t1 in zip(r.topk, r.weights, r.top1):
        assert len(ks) == layer.top_k and ws == sorted(ws, reverse=True) and t1 == ks[0]
        assert all(0 <= k < layer.num_experts for k in ks)
    with pytest.raises(CalibrationDataError, match="text is empty"):
        route_text(lm, "   ")
    with pytest.raises(CalibrationDataError, match="layer 7 does not exist"):
        route_text(lm, "hi", layer=7)


def test_table_edits_become_overrides_and_removals(loaded_tiny):
    lm = loaded_tiny("mixtral")
    samples = tokenize_documents(DOCS, lm.tokenizer, 4, 16)
    from moeviz.calibration import calibrate

    stats = calibrate(lm, samples)
    plan = CompressionPlan(pruning=PruningSettings(metric="wanda", sparsity=0.5), quant=QuantSettings(bits=8, group_size=-1))
    before = expert_table(plan, lm.layers, stats)
    assert len(before) == 8 and all(r["sparsity"] == 0.5 and r["bits"] == 8 and not r["remove"] for r in before)
    assert sum(r["utilization"] for r in before if r["layer"] == 0) == pytest.approx(1.0, abs=1e-3)
    after = [dict(r) for r in before]
    after[1]["sparsity"] = 0.9
    after[2]["bits"] = 4
    after[7]["remove"] = True
    new = apply_table_edits(plan, before, after)
    assert new.removed_experts == [(1, 3)]
    assert {(o.layer, o.expert, o.sparsity, o.bits) for o in new.overrides} == {(0, 1, 0.9, None), (0, 2, None, 4)}
    rows = expert_table(new, lm.layers, stats)
    assert rows[1]["sparsity"] == 0.9 and rows[2]["bits"] == 4 and rows[7]["remove"] and rows[0]["sparsity"] == 0.5
    cm = apply_plan(lm, stats, new)
    states = {(e.layer, e.expert): e for e in cm.experts}
    assert states[0, 1].zero_fraction > 0.85 and states[1, 3].removed
    assert apply_table_edits(plan, before, before) == plan  # no edit, same plan
