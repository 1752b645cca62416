"""Calibration cache on disk, the token explorer, and the per-expert table round trip."""

import math

import pytest
import torch

from moeviz.compression import CompressionPlan, PruningSettings, QuantSettings
from moeviz.compression.apply import Compressor
from moeviz.compression.table import apply_table_edits, expert_table
from moeviz.data import tokenize_documents
from moeviz.errors import CalibrationDataError
from moeviz.explorer import route_text
from moeviz.workspace import calibrate_cached
from documents import documents

DOCS = documents(20)


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
def test_token_explorer_shapes_and_errors(family, loaded_tiny):
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


def _moe_block_inputs(lm, layer: int, ids: torch.Tensor) -> torch.Tensor:
    """[T, H] hidden states entering MoE layer `layer` of the base model (forward pre-hook, removed after)."""
    seen = []
    handle = lm.layers[layer].block.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            lm.model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return seen[0].reshape(-1, seen[0].shape[-1]).float()


def _hand_routing(lm, layer: int, h: torch.Tensor):
    """Per token, [(expert, weight)] highest weight first: the family's routing rule in plain Python,
    from the router weights alone (Mixtral: softmax -> top-k -> renormalise; DeepSeek-V3: sigmoid,
    + correction bias for the choice, best topk_group of n_group groups by their top-2 sum, top-k
    within, weights = sigmoid scores renormalised x routed_scaling_factor)."""
    router, cfg = lm.layers[layer].router, lm.model.config
    logits = (h @ router.weight.float().T).tolist()
    k = lm.layers[layer].top_k
    out = []
    for row in logits:
        E = len(row)
        if cfg.model_type == "mixtral":
            z = [math.exp(v - max(row)) for v in row]
            probs = [v / sum(z) for v in z]
            chosen = sorted(range(E), key=lambda e: -probs[e])[:k]
            total = sum(probs[e] for e in chosen)
            out.append([(e, probs[e] / total) for e in chosen])
        else:
            bias = router.e_score_correction_bias.tolist()
            s = [1 / (1 + math.exp(-v)) for v in row]
            choice = [s[e] + bias[e] for e in range(E)]
            per_group = E // cfg.n_group
            groups = [list(range(g * per_group, (g + 1) * per_group)) for g in range(cfg.n_group)]
            group_score = [sum(sorted((choice[e] for e in g), reverse=True)[:2]) for g in groups]
            best = sorted(range(cfg.n_group), key=lambda g: -group_score[g])[: cfg.topk_group]
            allowed = [e for g in best for e in groups[g]]
            chosen = sorted(allowed, key=lambda e: -choice[e])[:k]
            total = sum(s[e] for e in chosen)
            out.append(sorted(((e, s[e] / total * cfg.routed_scaling_factor) for e in chosen), key=lambda t: -t[1]))
    return out


@pytest.mark.parametrize("family, layer", [("mixtral", 1), ("mixtral", 0), ("deepseek_v3", 1)])
def test_token_explorer_equals_routing_recomputed_by_hand(family, layer, loaded_tiny):
    """Each token's experts and weights equal those recomputed from the router weights and the hidden
    states entering the layer (captured on the base model), not just well-formed ones."""
    lm = loaded_tiny(family)
    text = "hello moe world, route me!"
    r = route_text(lm, text, layer=layer)
    ids = lm.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    expected = _hand_routing(lm, layer, _moe_block_inputs(lm, layer, ids))
    assert len(expected) == len(r.topk) == len(text)
    assert r.topk == [[e for e, _ in tok] for tok in expected]
    assert r.top1 == [tok[0][0] for tok in expected]
    for got, tok in zip(r.weights, expected):
        assert got == pytest.approx([w for _, w in tok], abs=1e-4)  # weights are rounded to 4 decimals
    assert len({tuple(t) for t in r.topk}) > 1  # the text really routes tokens differently


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
    cm = Compressor(lm, stats).apply(new)
    states = {(e.layer, e.expert): e for e in cm.experts}
    assert states[0, 1].zero_fraction > 0.85 and states[1, 3].removed
    assert apply_table_edits(plan, before, before) == plan  # no edit, same plan
