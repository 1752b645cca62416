"""The uniform MoE layer description, the routing adapters and the reference experts forward,
checked on a tiny random model of every supported family loaded through moeviz.load_model."""

import pytest
import torch

from moeviz.models.experts import experts_forward
from tiny_models import FAMILIES, NUM_MOE_LAYERS, tiny_config

ALL = list(FAMILIES)


def expected(family):
    c = tiny_config(family)
    experts = getattr(c, "num_local_experts", None) or getattr(c, "num_experts", None) or c.n_routed_experts
    inter = getattr(c, "moe_intermediate_size", None) or c.intermediate_size
    return experts, c.num_experts_per_tok, inter, c.hidden_size


@pytest.mark.parametrize("family", ALL)
def test_layer_description(family, loaded_tiny):
    lm = loaded_tiny(family)
    E, k, I, H = expected(family)
    assert len(lm.layers) == NUM_MOE_LAYERS.get(family, 2)
    assert lm.info.num_moe_layers == len(lm.layers) and lm.info.model_type == family
    for layer in lm.layers:
        assert (layer.num_experts, layer.top_k, layer.intermediate_size, layer.hidden_size) == (E, k, I, H)
        assert layer.weight("gate").shape == (E, I, H)
        assert layer.weight("up").shape == (E, I, H)
        assert layer.weight("down").shape == (E, H, I)
        assert layer.router.weight.shape == (E, H)
        assert f"layers.{layer.layer_idx}." in layer.path + "."
    shared = {"qwen2_moe": "shared_expert", "deepseek_v3": "shared_experts"}
    if family in shared:
        assert all(p.endswith(shared[family]) for l in lm.layers for p in l.shared_expert_paths)
        assert all(l.shared_expert_paths for l in lm.layers)
    else:
        assert not any(l.shared_expert_paths for l in lm.layers)
    assert lm.layers[0].transposed == (family == "gpt_oss")
    assert lm.layers[0].has_bias == (family == "gpt_oss")


@pytest.mark.parametrize("family", ALL)
def test_weight_views_alias_the_fused_parameters(family, loaded_tiny):
    """Views are views: an element written through a view shows up at the documented place of the
    fused tensor (tested on a clone of the parameter, so the cached model is not modified)."""
    layer = loaded_tiny(family).layers[0]
    I = layer.intermediate_size
    gate = layer.weight("gate")
    up = layer.weight("up")
    down = layer.weight("down")
    gu, dp = layer.experts.gate_up_proj, layer.experts.down_proj
    e, o, i = 1, 2, 3
    if family == "gpt_oss":  # [E, H, 2I] interleaved gate/up columns; down [E, I, H]
        assert gate[e, o, i] == gu[e, i, 2 * o] and up[e, o, i] == gu[e, i, 2 * o + 1]
        assert down[e, i, o] == dp[e, o, i]
    else:  # [E, 2I, H] = [gate; up]; down [E, H, I]
        assert gate[e, o, i] == gu[e, o, i] and up[e, o, i] == gu[e, I + o, i]
        assert down[e, o, i] == dp[e, o, i]
    assert gate.data_ptr() == gu.data_ptr()  # shares storage, no copy


def _expert_by_hand(layer, e, x):
    """One expert's output from the [out, in] views with a plain formula (brute force)."""
    g = x @ layer.weight("gate")[e].T
    u = x @ layer.weight("up")[e].T
    if layer.has_bias:  # GPT-OSS: interleaved biases, clamped SwiGLU with alpha, (up + 1)
        b = layer.experts.gate_up_proj_bias[e]
        g, u = g + b[::2], u + b[1::2]
        g = g.clamp(max=layer.experts.limit)
        u = u.clamp(-layer.experts.limit, layer.experts.limit)
        h = (u + 1) * g * torch.sigmoid(g * layer.experts.alpha)
        return h @ layer.weight("down")[e].T + layer.experts.down_proj_bias[e]
    return (layer.experts.act_fn(g) * u) @ layer.weight("down")[e].T


@pytest.mark.parametrize("family", ALL)
def test_reference_experts_forward_matches_module_and_hand_formula(family, loaded_tiny):
    layer = loaded_tiny(family).layers[0]
    torch.manual_seed(0)
    T, E, k = 12, layer.num_experts, layer.top_k
    hidden = torch.randn(T, layer.hidden_size)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    w = torch.rand(T, k)
    ours = experts_forward(layer.experts, hidden, idx, w)
    theirs = layer.experts(hidden, idx, w)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    by_hand = torch.zeros_like(hidden)
    for t in range(T):
        for s in range(k):
            by_hand[t] += w[t, s] * _expert_by_hand(layer, int(idx[t, s]), hidden[t:t + 1])[0]
    torch.testing.assert_close(ours, by_hand, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ALL)
def test_adapter_routing_reproduces_the_router(family, loaded_tiny):
    layer = loaded_tiny(family).layers[0]
    torch.manual_seed(1)
    hidden = torch.randn(40, layer.hidden_size)
    logits, weights, indices = layer.router(hidden)
    our_logits = layer.adapter.router_logits(layer.router, hidden)
    torch.testing.assert_close(our_logits, logits)
    w2, i2 = layer.adapter.route(layer.router, our_logits)
    # Same expert sets, and the same weight for each chosen expert.
    order1, order2 = indices.argsort(dim=1), i2.argsort(dim=1)
    assert torch.equal(indices.gather(1, order1), i2.gather(1, order2))
    torch.testing.assert_close(weights.gather(1, order1).float(), w2.gather(1, order2).float())


@pytest.mark.parametrize("family", ALL)
def test_rerouting_never_picks_a_forbidden_expert(family, loaded_tiny):
    layer = loaded_tiny(family).layers[0]
    torch.manual_seed(2)
    hidden = torch.randn(64, layer.hidden_size)
    logits = layer.adapter.router_logits(layer.router, hidden)
    allowed = torch.ones(layer.num_experts, dtype=torch.bool)
    _, before = layer.adapter.route(layer.router, logits)
    banned = int(torch.bincount(before.reshape(-1)).argmax())  # the busiest expert
    allowed[banned] = False
    weights, indices = layer.adapter.route(layer.router, logits, allowed)
    assert not (indices == banned).any()
    assert indices.shape == before.shape and torch.isfinite(weights).all()
