"""One-pass calibration statistics: invariants, brute-force recomputation, the base model untouched."""

import pytest
import torch

from moeviz.calibration import CalibrationStats, calibrate
from moeviz.calibration.collect import _LayerCollector
from moeviz.calibration.stats import stats_fingerprint
from moeviz.data import tokenize_documents
from moeviz.models.experts import experts_forward, gate_on_input
from moeviz.models.layers import find_moe_layers
from moeviz.models.routing import full_distribution
from moeviz.models.views import structural_copy
from tiny_models import FAMILIES
from documents import varied_documents

ALL = list(FAMILIES)
DOCS = varied_documents(12, 8)


def samples_for(lm, n=6, seq_len=16, seed=0):
    return tokenize_documents(DOCS, lm.tokenizer, n, seq_len, seed=seed, source="test docs")


@pytest.mark.parametrize("family", ALL)
def test_invariants_and_base_untouched(family, loaded_tiny):
    lm = loaded_tiny(family)
    samples = samples_for(lm)
    before = {n: p.clone() for n, p in lm.model.state_dict().items()}
    logits_before = lm.model(input_ids=samples.input_ids).logits
    calls = []
    stats = calibrate(lm, samples, batch_size=4, record_tokens=50, progress=lambda d, t: calls.append((d, t)))
    T = samples.n_tokens
    assert calls[-1] == (samples.n_samples, samples.n_samples) and [c[0] for c in calls] == sorted(c[0] for c in calls)
    for l in stats.layers:
        k, E = l.top_k, l.num_experts
        assert l.routed_counts.sum() == T * k
        assert l.top1_counts.sum() == T
        torch.testing.assert_close(l.prob_sum.sum().item(), float(T), rtol=1e-5, atol=1e-3)
        assert torch.equal(l.coactivation.diag(), l.routed_counts)
        assert torch.equal(l.coactivation, l.coactivation.T)
        # Each token contributes k·(k-1) ordered pairs off the diagonal.
        assert (l.coactivation.sum() - l.coactivation.diag().sum()) == T * k * (k - 1)
        assert torch.equal(l.domain_counts.sum(0), l.routed_counts)
        assert l.prob_hist.sum() == T * E
        assert l.record_topk.shape == (50, k) and l.record_probs.shape == (50, E)
        assert torch.isclose(l.utilization().sum(), torch.tensor(1.0, dtype=l.utilization().dtype))
    assert stats.record_token_ids.shape == (50,)
    assert sum(stats.domain_tokens) == T
    after = lm.model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert torch.equal(lm.model(input_ids=samples.input_ids).logits, logits_before)
    assert "forward" not in vars(lm.layers[0].experts)  # the base's experts were never patched


@pytest.mark.parametrize("family", ALL)
def test_instrumented_forward_gives_the_same_logits(family, loaded_tiny):
    lm = loaded_tiny(family)
    samples = samples_for(lm)
    view = structural_copy(lm.model)
    for layer in find_moe_layers(view):
        c = _LayerCollector(layer, len(samples.domain_names), 10, 0, "cpu")
        c.token_domain = torch.zeros(samples.n_tokens, dtype=torch.long)
        layer.router.register_forward_hook(c.router_hook)
        layer.experts.forward = c.experts_forward
    ours = view(input_ids=samples.input_ids).logits
    base = lm.model(input_ids=samples.input_ids).logits
    torch.testing.assert_close(ours, base, rtol=1e-5, atol=1e-5)


def block_io(lm, samples) -> dict:
    """layer -> [(MoE block input [S, H], its output [S, H]) per sample], from hooks on the base model."""
    seen = {}
    hooks = [layer.block.register_forward_hook(
        lambda m, args, out, i=i: seen.setdefault(i, []).append((args[0].detach().reshape(-1, args[0].shape[-1]),
                                                                 out[0].detach().reshape(-1, args[0].shape[-1]))))
        for i, layer in enumerate(lm.layers)]
    try:
        for row in samples.input_ids:
            lm.model(input_ids=row[None])
    finally:
        for h in hooks:
            h.remove()
    return seen


def brute_force_stats(lm, samples):
    """Recompute every statistic with plain Python loops over tokens and their chosen experts."""
    captured = {i: [x for x, _ in pairs] for i, pairs in block_io(lm, samples).items()}
    domains = samples.domain_index().repeat_interleave(samples.seq_len)
    out = []
    for i, layer in enumerate(lm.layers):
        hidden = torch.cat(captured[i])  # [T, H] in sample order
        E, H, I = layer.num_experts, layer.hidden_size, layer.intermediate_size
        r = dict(in_sq=torch.zeros(E, H, dtype=torch.float64), in_sq_w=torch.zeros(E, H, dtype=torch.float64),
                 down_sq=torch.zeros(E, I, dtype=torch.float64), down_sq_w=torch.zeros(E, I, dtype=torch.float64),
                 routed=torch.zeros(E, dtype=torch.float64), gate_sum=torch.zeros(E, dtype=torch.float64),
                 gate_out=torch.zeros(E, dtype=torch.float64),
                 domain=torch.zeros(len(samples.domain_names), E, dtype=torch.float64),
                 prob_sum=torch.zeros(E, dtype=torch.float64))
        logits, weights, indices = layer.router(hidden)
        probs = full_distribution(logits, layer.adapter.distribution)
        for t in range(hidden.shape[0]):
            x = hidden[t].double()
            r["prob_sum"] += probs[t].double()
            for s in range(layer.top_k):
                e, g = int(indices[t, s]), float(weights[t, s])
                gate_up = layer.experts.gate_up_proj[e]
                if layer.transposed:
                    pre = hidden[t] @ gate_up + layer.experts.gate_up_proj_bias[e]
                else:
                    pre = torch.nn.functional.linear(hidden[t], gate_up)
                h = layer.experts._apply_gate(pre[None])[0].double()
                down = layer.experts.down_proj[e].double()
                y = h @ down + layer.experts.down_proj_bias[e] if layer.transposed else down @ h  # [H]
                r["routed"][e] += 1
                r["gate_sum"][e] += g
                r["gate_out"][e] += g * y.norm()  # the model adds g·y to the residual stream
                r["domain"][domains[t], e] += 1
                for j in range(H):
                    r["in_sq"][e, j] += x[j] ** 2
                    r["in_sq_w"][e, j] += (g * x[j]) ** 2
                for j in range(I):
                    r["down_sq"][e, j] += h[j] ** 2
                    r["down_sq_w"][e, j] += (g * h[j]) ** 2
        out.append(r)
    return out


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "phimoe"])
def test_norms_equal_brute_force(family, loaded_tiny):
    lm = loaded_tiny(family)
    samples = samples_for(lm, n=3, seq_len=8)
    stats = calibrate(lm, samples, batch_size=2)
    for layer_stats, ref in zip(stats.layers, brute_force_stats(lm, samples)):
        assert torch.equal(layer_stats.routed_counts, ref["routed"])
        torch.testing.assert_close(layer_stats.domain_counts, ref["domain"])
        for ours, key in [("input_sq", "in_sq"), ("input_sq_weighted", "in_sq_w"), ("down_sq", "down_sq"),
                          ("down_sq_weighted", "down_sq_w"), ("gate_sum", "gate_sum"), ("prob_sum", "prob_sum"),
                          ("gate_output_norm", "gate_out")]:
            torch.testing.assert_close(getattr(layer_stats, ours), ref[key], rtol=2e-4, atol=1e-5, msg=ours)


def test_weighted_norms_equal_plain_norms_times_gate_when_gates_constant(loaded_tiny):
    """With equal routing weights g for every token, Σ(g·x)² = g²·Σx²: the MoE-Pruner statistic
    reduces to Wanda's (up to a constant), as the two metrics should."""
    lm = loaded_tiny("granitemoe")  # top-k then softmax: we force equal logits among the chosen k
    layer = lm.layers[0]
    view = structural_copy(lm.model)
    vlayer = find_moe_layers(view)[0]
    samples = samples_for(lm, n=2, seq_len=8)
    c = _LayerCollector(vlayer, len(samples.domain_names), 10, 0, "cpu")
    c.token_domain = torch.zeros(samples.n_tokens, dtype=torch.long)
    torch.manual_seed(0)
    hidden = torch.randn(samples.n_tokens, layer.hidden_size)
    c.logits = torch.zeros(samples.n_tokens, layer.num_experts)
    idx = torch.stack([torch.randperm(layer.num_experts)[: layer.top_k] for _ in range(samples.n_tokens)])
    g = 1.0 / layer.top_k
    c.experts_forward(hidden, idx, torch.full(idx.shape, g))
    # Equal up to float32 summation order (the per-batch sums are float32, see collect.observe).
    torch.testing.assert_close(c.in_sq_w, c.in_sq * g**2, rtol=1e-6, atol=0)
    torch.testing.assert_close(c.down_sq_w, c.down_sq * g**2, rtol=1e-6, atol=0)


def test_save_load_round_trip(loaded_tiny, tmp_path):
    lm = loaded_tiny("qwen3_moe")
    stats = calibrate(lm, samples_for(lm), batch_size=3, record_tokens=20)
    stats.save(tmp_path / "stats")
    back = CalibrationStats.load(tmp_path / "stats")
    assert back.fingerprint == stats.fingerprint and back.meta() == stats.meta()
    for a, b in zip(stats.layers, back.layers):
        for name in a.tensor_names():
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(back.record_token_ids, stats.record_token_ids)


def test_fingerprint_changes_with_data_and_settings(loaded_tiny):
    lm = loaded_tiny("mixtral")
    a = calibrate(lm, samples_for(lm, seed=0), batch_size=3)
    b = calibrate(lm, samples_for(lm, seed=1), batch_size=3)
    c = calibrate(lm, samples_for(lm, seed=0), batch_size=3, hist_bins=7)
    assert len({a.fingerprint, b.fingerprint, c.fingerprint}) == 3
    assert a.fingerprint == calibrate(lm, samples_for(lm, seed=0), batch_size=3).fingerprint


@pytest.fixture
def llama4(loaded_family):
    return loaded_family("llama4_text")


def test_llama4_weighted_norms_count_the_routing_weight_once(llama4):
    """Llama 4 (dense dispatch) multiplies each expert's *input* by its routing score g and adds the
    expert's output to the residual unscaled. So the expert sees x' = g·x and its contribution is y(x'):
    the router-weighted statistics must weight each token by 1 (input_sq_weighted = Σ x'², not Σ g²x'²;
    gate_output_norm = Σ ‖y‖, not Σ g‖y‖). Recomputed token by token from the router's scores and the raw
    [E, H, 2I] / [E, I, H] storage; the hand computation is checked to rebuild the block's output first."""
    lm = llama4
    assert not lm.layers[0].calls_with_routing
    samples = samples_for(lm, n=3, seq_len=8)
    seen = block_io(lm, samples)
    stats = calibrate(lm, samples, batch_size=2)
    checked = 0
    for i, (layer, ls) in enumerate(zip(lm.layers, stats.layers)):
        hidden = torch.cat([a for a, _ in seen[i]])  # [T, H] the block's input
        block_out = torch.cat([o for _, o in seen[i]])  # [T, H]
        E, H, I = layer.num_experts, layer.hidden_size, layer.intermediate_size
        in_sq, twice = torch.zeros(E, H, dtype=torch.float64), torch.zeros(E, H, dtype=torch.float64)
        down_sq = torch.zeros(E, I, dtype=torch.float64)
        out_norm = torch.zeros(E, dtype=torch.float64)
        with torch.no_grad():
            rebuilt = layer.block.shared_expert(hidden).double()  # [T, H]
            scores, _ = layer.block.router(hidden)  # [T, E]: sigmoid of the top-k logits, 0 elsewhere
        for t in range(hidden.shape[0]):
            for e in scores[t].nonzero().flatten().tolist():
                x = float(scores[t, e]) * hidden[t].double()  # what the expert receives
                gu = x @ layer.experts.gate_up_proj[e].double()  # [H] @ [H, 2I]
                h = layer.experts.act_fn(gu[:I]) * gu[I:]  # [I]
                y = h @ layer.experts.down_proj[e].double()  # [I] @ [I, H]
                rebuilt[t] += y  # added as is: no routing weight on the output
                in_sq[e] += x.square()
                twice[e] += float(scores[t, e]) ** 2 * x.square()
                down_sq[e] += h.square()
                out_norm[e] += y.norm()
        torch.testing.assert_close(rebuilt.float(), block_out, rtol=1e-4, atol=1e-5)
        for name, ref in [("input_sq_weighted", in_sq), ("input_sq", in_sq), ("down_sq_weighted", down_sq),
                          ("down_sq", down_sq), ("gate_output_norm", out_norm)]:
            torch.testing.assert_close(getattr(ls, name), ref, rtol=2e-4, atol=1e-6, msg=name)
        # the routing weights are far enough from 1 that weighting by g² once more would show
        assert not torch.allclose(ls.input_sq_weighted, twice, rtol=2e-4, atol=1e-6)
        checked += int((ls.routed_counts > 0).sum())
    assert checked >= 4


def test_llama4_stats_fingerprint_names_the_weight_rule(llama4, loaded_tiny, tmp_path):
    """Llama 4 statistics carry the gate-on-input weight rule in their settings, so ones calibrated before
    the rule (g counted twice) have another fingerprint (not reused from the cache or the run store); the
    on-disk cache keys them the same way. A standard family's settings, hence fingerprints, are unchanged."""
    from moeviz.workspace import calibrate_cached

    samples = samples_for(llama4, n=2, seq_len=8)
    a, cached_a = calibrate_cached(llama4, samples, batch_size=2, cache_dir=tmp_path)
    b, cached_b = calibrate_cached(llama4, samples, batch_size=2, cache_dir=tmp_path)
    assert (cached_a, cached_b) == (False, True) and b.fingerprint == a.fingerprint
    assert (tmp_path / a.fingerprint / "stats.json").exists()  # the cache's key is the stats' fingerprint
    assert a.settings["gate_weight"] == "on_input"
    old = {k: v for k, v in a.settings.items() if k != "gate_weight"}
    assert stats_fingerprint(a.model_fingerprint, a.data_fingerprint, old) != a.fingerprint
    lm = loaded_tiny("mixtral")
    assert "gate_weight" not in calibrate(lm, samples_for(lm, n=2, seq_len=8), batch_size=2).settings


def _per_expert_sums(layer, hidden, idx, w):
    """Float64 statistics from the per-expert observer of the reference loop (one call per expert)."""
    E, H, I = layer.num_experts, layer.hidden_size, layer.intermediate_size
    z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
    r = dict(in_sq=z(E, H), in_sq_w=z(E, H), down_sq=z(E, I), down_sq_w=z(E, I), gate_sum=z(E), gate_out=z(E))

    on_input = gate_on_input(layer.experts)  # Llama 4: g is already in x, h and y, so the weight is 1

    def seen(e, token_idx, gate, x, h, y):
        g, x2, h2 = gate.double(), x.double() ** 2, h.double() ** 2
        wt = torch.ones_like(g) if on_input else g
        r["in_sq"][e] += x2.sum(0)
        r["in_sq_w"][e] += wt**2 @ x2
        r["down_sq"][e] += h2.sum(0)
        r["down_sq_w"][e] += wt**2 @ h2
        r["gate_sum"][e] += g.sum()
        r["gate_out"][e] += wt @ y.double().norm(dim=1)

    with torch.no_grad():
        out = experts_forward(layer.experts, hidden, idx, w, observer=seen)
    return r, out


@pytest.mark.parametrize("model_type", ["qwen2_moe", "gpt_oss", "longcat_flash", "llama4_text"])
def test_grouped_statistics_equal_per_expert_sums(model_type, loaded_family, monkeypatch):
    """The layer observer's segment reductions (grouped path and per-expert loop fallback) equal per-expert
    float64 sums, with shared experts (qwen2_moe), biases (gpt_oss), zero-compute experts and sentinel ids
    (longcat_flash) and the routing weight on the expert's input (llama4_text); outputs match the loop."""
    import moeviz.models.experts as ex

    layer = loaded_family(model_type).layers[0]
    E, k = layer.num_experts, layer.top_k
    total = max(E, ex._input_weight(layer.experts).shape[0])
    torch.manual_seed(0)
    T = 24
    hidden = torch.randn(T, layer.hidden_size)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    if total > E:  # zero-compute experts (ids E..total-1) in every third token's last slot
        idx[::3, -1] = E + torch.arange(0, T, 3) % (total - E)
    idx[::5, 0] = total  # sentinel: "no expert"
    idx[idx == 1] = total  # expert 1 gets no token
    w = torch.rand(T, k)
    ref, out_loop = _per_expert_sums(layer, hidden, idx, w)
    grouped_calls = []
    real = ex._grouped_forward
    monkeypatch.setattr(ex, "_grouped_forward", lambda *a: grouped_calls.append(1) or real(*a))
    for grad, want_grouped in [(False, True), (True, False)]:  # autograd on: the loop builds the grouped record
        c = _LayerCollector(layer, 1, 10, 0, "cpu")
        grouped_calls.clear()
        with torch.set_grad_enabled(grad):
            out = experts_forward(layer.experts, hidden, idx, w, layer_observer=c.observe_layer)
        assert bool(grouped_calls) == want_grouped
        torch.testing.assert_close(out.detach(), out_loop, rtol=1e-5, atol=1e-6)
        for name, key in [("in_sq", "in_sq"), ("in_sq_w", "in_sq_w"), ("down_sq", "down_sq"),
                          ("down_sq_w", "down_sq_w"), ("gate_sum", "gate_sum"), ("gate_out", "gate_out")]:
            assert getattr(c, name).abs().sum() > 0, name
            torch.testing.assert_close(getattr(c, name), ref[key], rtol=1e-5, atol=1e-6, msg=f"{name} grad={grad}")
