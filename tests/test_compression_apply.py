"""Applying compression plans: masks, allocation, quantization, expert removal, router settings,
the sequential option, plan validation, and the base model left bit-identical."""

import math

import pytest
import torch
import transformers

from moeviz.calibration import calibrate
from moeviz.compression import CompressionPlan, Override, PruningSettings, QuantSettings
from moeviz.compression.apply import Compressor
from moeviz.compression.removal import experts_to_remove
from moeviz.data import tokenize_documents
from moeviz.errors import PlanError
from documents import varied_documents

DOCS = varied_documents(12, 8)


@pytest.fixture(scope="module")
def mixtral(loaded_tiny):
    lm = loaded_tiny("mixtral")
    samples = tokenize_documents(DOCS, lm.tokenizer, 8, 16, seed=0)
    return lm, samples, calibrate(lm, samples, batch_size=4)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def plan(**kw):
    pruning = {k: kw.pop(k) for k in list(kw) if k in PruningSettings.__dataclass_fields__}
    quant = {k[2:]: kw.pop(k) for k in list(kw) if k.startswith("q_")}
    return CompressionPlan(pruning=PruningSettings(**pruning), quant=QuantSettings(**quant), **kw)


def test_plan_json_round_trip():
    p = plan(metric="wanda", sparsity=0.3, structure="2:4", projections=["gate", "down"], q_bits=4,
             q_group_size=64, q_symmetric=False, overrides=[Override(1, 2, sparsity=0.1, bits=8), Override(0, bits=3)],
             removed_experts=[(0, 3)], router_sparsity=0.2, router_bits=8, activation_bits=8, sequential=True, name="x")
    back = CompressionPlan.from_json(p.to_json())
    assert back == p and back.to_dict() == p.to_dict()


@pytest.mark.parametrize("kw, message", [
    (dict(sparsity=1.0), r"pruning.sparsity: 1.0 is outside \[0, 1\)"),
    (dict(sparsity=-0.1), r"pruning.sparsity: -0.1 is outside"),
    (dict(metric="obc"), r"pruning.metric: unknown metric 'obc'"),
    (dict(structure="4:4"), r"pruning.structure: '4:4' needs 0 < N < M"),
    (dict(structure="2-4"), r"pruning.structure: '2-4' is neither"),
    (dict(q_bits=5), r"quant.bits: 5 bits is not supported; choose one of 2, 3, 4, 8, 16"),
    (dict(router_bits=1), r"router_bits: 1 bits"),
    (dict(activation_bits=6), r"activation_bits: 6 bits"),
    (dict(router_sparsity=1.5), r"router_sparsity: 1.5 is outside"),
    (dict(removed_experts=[(0, 0), (0, 1), (0, 2), (0, 3)]), r"every expert of layer 0 would be removed"),
    (dict(removed_experts=[(1, 0), (1, 1), (1, 2)]), r"layer 1 would keep 1 experts, fewer than its top-k of 2"),
    (dict(removed_experts=[(5, 0)]), r"layer 5 does not exist; the model has 2 MoE layers"),
    (dict(overrides=[Override(0, 9, sparsity=0.2)]), r"expert 9 does not exist; layer 0 has 4 experts"),
    (dict(overrides=[Override(0, 1, sparsity=2.0)]), r"overrides\[0\] \(layer 0, expert 1\).sparsity: 2.0"),
    (dict(projections=["gate", "qkv"]), r"pruning.projections: \['qkv'\]"),
    (dict(q_bits=4, q_group_size=0), r"quant.group_size: must be a positive integer or -1"),
])
def test_invalid_plans_name_the_field(mixtral, kw, message):
    lm, _, stats = mixtral
    with pytest.raises(PlanError, match=message):
        Compressor(lm, stats).apply(plan(**kw))


def test_unknown_plan_field_and_bad_json():
    with pytest.raises(PlanError, match="unknown field"):
        CompressionPlan.from_dict({"sparsity": 0.5})
    with pytest.raises(PlanError, match="not valid JSON"):
        CompressionPlan.from_json("{")


def test_metric_needing_stats_without_stats(mixtral):
    lm, _, _ = mixtral
    with pytest.raises(PlanError, match="needs calibration statistics"):
        Compressor(lm, None).apply(plan(metric="wanda", sparsity=0.5))
    assert Compressor(lm, None).apply(plan(metric="magnitude", sparsity=0.5)).storage.experts_bytes > 0


@pytest.mark.parametrize("metric", ["magnitude", "wanda", "moe_pruner"])
def test_unstructured_exact_fraction_per_row_and_masks_equal_brute_force(mixtral, metric):
    lm, _, stats = mixtral
    cm = Compressor(lm, stats).apply(plan(metric=metric, sparsity=0.5))
    norms = {"wanda": ("input_sq", "down_sq"), "moe_pruner": ("input_sq_weighted", "down_sq_weighted")}
    for layer, base_layer, ls in zip(cm.layers, lm.layers, stats.layers):
        for proj in ("gate", "up", "down"):
            w, w0 = layer.weight(proj), base_layer.weight(proj)
            n_in = w.shape[-1]
            zeros_per_row = (w == 0).sum(-1)
            assert (zeros_per_row == round(0.5 * n_in)).all()
            for e in range(layer.num_experts):
                if metric == "magnitude":
                    col = torch.ones(n_in, dtype=torch.float64)
                else:
                    col = getattr(ls, norms[metric][proj == "down"])[e].sqrt()
                for r in range(w.shape[1]):
                    scores = [(abs(float(w0[e, r, j])) * float(col[j]), j) for j in range(n_in)]
                    pruned = {j for _, j in sorted(scores)[: round(0.5 * n_in)]}
                    got = {j for j in range(n_in) if w[e, r, j] == 0}
                    assert got == pruned, (proj, e, r)
                    kept = [j for j in range(n_in) if j not in pruned]
                    assert torch.equal(w[e, r, kept], w0[e, r, kept])


@pytest.mark.parametrize("structure", ["2:4", "4:8", "1:4"])
def test_nm_pattern_in_every_group(mixtral, structure):
    lm, _, stats = mixtral
    n, m = map(int, structure.split(":"))
    cm = Compressor(lm, stats).apply(plan(metric="moe_pruner", structure=structure))
    for layer in cm.layers:
        for proj in ("gate", "up", "down"):
            w = layer.weight(proj)
            groups = (w == 0).reshape(*w.shape[:-1], w.shape[-1] // m, m).sum(-1)
            assert (groups == n).all(), (proj, structure)


def test_moe_pruner_equals_wanda_when_gate_weights_are_equal(mixtral):
    lm, _, stats = mixtral
    import copy

    equal = copy.deepcopy(stats)
    for ls in equal.layers:  # as if every routed token had gate weight 0.5: Σ(g x)² = 0.25 Σ x²
        ls.input_sq_weighted = ls.input_sq * 0.25
        ls.down_sq_weighted = ls.down_sq * 0.25
    a = Compressor(lm, equal).apply(plan(metric="moe_pruner", sparsity=0.6))
    b = Compressor(lm, equal).apply(plan(metric="wanda", sparsity=0.6))
    c = Compressor(lm, stats).apply(plan(metric="moe_pruner", sparsity=0.6))
    for la, lb, lc in zip(a.layers, b.layers, c.layers):
        assert torch.equal(la.experts.gate_up_proj, lb.experts.gate_up_proj)
        assert torch.equal(la.experts.down_proj, lb.experts.down_proj)
    # ...and with the real (unequal) gate weights the metric does make a difference.
    assert any(not torch.equal(la.experts.down_proj, lc.experts.down_proj) for la, lc in zip(a.layers, c.layers))


@pytest.mark.parametrize("allocation", ["uniform", "utilization"])
def test_allocation_hits_global_target(mixtral, allocation):
    lm, _, stats = mixtral
    cm = Compressor(lm, stats).apply(plan(metric="wanda", sparsity=0.4, allocation=allocation,
                                    allocation_bounds=(0.05, 0.9)))
    per_expert = lm.layers[0].expert_param_count()
    ratios = torch.tensor([e.sparsity for e in cm.experts], dtype=torch.float64)
    assert math.isclose(float(ratios.mean()), 0.4, abs_tol=1e-9)  # equal sizes: weighted mean = mean
    zeros = sum(int((l.weight(p) == 0).sum()) for l in cm.layers for p in ("gate", "up", "down"))
    total = per_expert * len(cm.experts)
    n_rows = sum(l.weight(p).shape[0] * l.weight(p).shape[1] for l in cm.layers for p in ("gate", "up", "down"))
    assert abs(zeros - 0.4 * total) <= 0.5 * n_rows  # each row rounds its count by at most half a weight
    if allocation == "utilization":
        for layer_i, ls in enumerate(stats.layers):
            r = ratios[layer_i * 4:(layer_i + 1) * 4]
            u = ls.utilization()
            busiest, idlest = int(u.argmax()), int(u.argmin())
            assert r[busiest] <= r[idlest]  # less-used experts are pruned more


def test_overrides_win_and_quantization_is_on_the_grid(mixtral):
    lm, _, stats = mixtral
    p = plan(metric="magnitude", sparsity=0.5, q_bits=4, q_group_size=8,
             overrides=[Override(0, sparsity=0.25), Override(0, 2, sparsity=0.0, bits=16), Override(1, 3, bits=2)])
    cm = Compressor(lm, stats).apply(p)
    table = {(e.layer, e.expert): e for e in cm.experts}
    assert table[0, 0].sparsity == 0.25 and table[0, 2].sparsity == 0.0 and table[0, 2].bits == 16
    assert table[1, 3].bits == 2 and table[1, 0].bits == 4 and table[1, 0].sparsity == 0.5
    assert torch.equal(cm.layers[0].weight("gate")[2], lm.layers[0].weight("gate")[2])  # untouched expert
    for (layer, e), bits in [((1, 0), 4), ((1, 3), 2)]:
        w = cm.layers[layer].weight("up")[e].reshape(-1, 8)  # [rows·groups, 8]
        for group in w:
            assert len(torch.unique(group)) <= 2**bits  # symmetric RTN: at most 2^b - 1 levels (+ zero)


def test_all_16_bit_zero_sparsity_is_identity_and_shares_every_tensor(mixtral):
    lm, samples, stats = mixtral
    cm = Compressor(lm, stats).apply(CompressionPlan())
    assert cm.replaced_tensors == []
    for (n, p), (_, q) in zip(lm.model.named_parameters(), cm.model.named_parameters()):
        assert p is q, n  # shared, not copied
    assert torch.equal(cm.model(input_ids=samples.input_ids).logits, lm.model(input_ids=samples.input_ids).logits)
    assert cm.storage.summary()["compression_ratio"] == 1.0


def test_only_touched_tensors_are_copied(mixtral):
    lm, _, stats = mixtral
    cm = Compressor(lm, stats).apply(plan(metric="magnitude", overrides=[Override(1, 0, sparsity=0.5)]))
    assert cm.replaced_tensors == ["model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"]
    assert cm.layers[0].experts.gate_up_proj is lm.layers[0].experts.gate_up_proj
    assert cm.layers[1].experts.gate_up_proj is not lm.layers[1].experts.gate_up_proj


def test_base_model_bit_identical_after_apply_evaluate_discard(mixtral):
    lm, samples, stats = mixtral
    before = snapshot(lm.model)
    logits = lm.model(input_ids=samples.input_ids).logits
    for p in [plan(metric="moe_pruner", sparsity=0.7, q_bits=3, q_group_size=8, removed_experts=[(0, 1), (1, 2)],
                   router_sparsity=0.5, router_bits=4, activation_bits=4),
              plan(structure="2:4", metric="wanda", sequential=True)]:
        cm = Compressor(lm, stats).apply(p, samples=samples)
        cm.model(input_ids=samples.input_ids)
        calibrate_after = calibrate(lm, samples, batch_size=4)  # the base still calibrates the same
        del cm
    after = snapshot(lm.model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert torch.equal(lm.model(input_ids=samples.input_ids).logits, logits)
    assert torch.equal(calibrate_after.layers[0].input_sq, stats.layers[0].input_sq)
    assert all("forward" not in vars(l.router) and "forward" not in vars(l.experts) for l in lm.layers)


def _physically_removed(lm, removed_by_layer):
    """A Mixtral built with fewer experts, weights sliced from the base (brute-force reference)."""
    config = transformers.MixtralConfig(**{**lm.model.config.to_dict(), "num_local_experts": 3})
    model = transformers.MixtralForCausalLM(config).eval()
    state = lm.model.state_dict()
    for i, layer in enumerate(lm.layers):
        keep = [e for e in range(layer.num_experts) if e not in removed_by_layer[i]]
        for name in ("experts.gate_up_proj", "experts.down_proj", "gate.weight"):
            key = f"{layer.path}.{name}"
            state[key] = state[key][keep]
    model.load_state_dict(state)
    return model


def test_expert_removal_reroutes_and_equals_a_physically_smaller_model(mixtral):
    lm, samples, stats = mixtral
    removed = experts_to_remove(stats, 1, "frequency")
    assert len(removed) == 2 and {l for l, _ in removed} == {0, 1}
    for layer, e in removed:  # the least used expert of its layer
        assert stats.layers[layer].utilization()[e] == stats.layers[layer].utilization().min()
    cm = Compressor(lm, stats).apply(plan(removed_experts=removed))
    from moeviz.models.loading import LoadedModel

    comp_stats = calibrate(LoadedModel(cm.model, lm.tokenizer, cm.layers, lm.info), samples, batch_size=4)
    for layer, e in removed:
        assert comp_stats.layers[layer].routed_counts[e] == 0
        assert comp_stats.layers[layer].routed_counts.sum() == samples.n_tokens * 2  # re-routed, not dropped
    reference = _physically_removed(lm, {l: {e} for l, e in removed})
    torch.testing.assert_close(cm.model(input_ids=samples.input_ids).logits,
                               reference(input_ids=samples.input_ids).logits, rtol=1e-5, atol=1e-5)
    summary = cm.storage.summary()
    assert summary["experts_compression_ratio"] == pytest.approx(4 / 3)


def test_reap_scores_pick_lowest_router_weighted_output_norm(mixtral):
    lm, _, stats = mixtral
    chosen = experts_to_remove(stats, 2, "reap")
    for layer in range(2):
        ls = stats.layers[layer]
        score = ls.gate_output_norm / ls.routed_counts.clamp_min(1)
        expected = set(torch.argsort(score)[:2].tolist())
        assert {e for l, e in chosen if l == layer} == expected
    with pytest.raises(PlanError, match="remove at most 2"):
        experts_to_remove(stats, 3)


def test_router_pruning_and_quantization(mixtral):
    lm, _, stats = mixtral
    cm = Compressor(lm, stats).apply(plan(router_sparsity=0.5, router_bits=8, q_group_size=-1))
    for layer, base in zip(cm.layers, lm.layers):
        w = layer.router.weight
        assert ((w == 0).sum(1) == w.shape[1] // 2).all()
        kept = w != 0
        # Kept entries are the larger-magnitude half, quantized to 8 bits (within half a step).
        step = base.router.weight.abs().amax(1, keepdim=True) / 127
        assert ((w - base.router.weight).abs()[kept] <= (step / 2 + 1e-7).expand_as(w)[kept]).all()
        assert layer.router.weight is not base.router.weight


def test_activation_quantization_changes_outputs_but_not_weights(mixtral):
    lm, samples, stats = mixtral
    cm = Compressor(lm, stats).apply(plan(activation_bits=4))
    assert cm.replaced_tensors == []
    out = cm.model(input_ids=samples.input_ids).logits
    base = lm.model(input_ids=samples.input_ids).logits
    assert not torch.equal(out, base) and torch.isfinite(out).all()
    assert torch.equal(Compressor(lm, stats).apply(plan(activation_bits=16)).model(input_ids=samples.input_ids).logits, base)


def test_sequential_recalibrates_later_layers(mixtral):
    lm, samples, stats = mixtral
    one_pass = Compressor(lm, stats).apply(plan(metric="wanda", sparsity=0.5))
    seq = Compressor(lm, stats).apply(plan(metric="wanda", sparsity=0.5, sequential=True), samples=samples)
    assert torch.equal(one_pass.layers[0].experts.down_proj, seq.layers[0].experts.down_proj)  # same inputs
    assert not torch.equal(one_pass.layers[1].experts.down_proj, seq.layers[1].experts.down_proj)
    with pytest.raises(PlanError, match="needs the calibration samples"):
        Compressor(lm, stats).apply(plan(metric="wanda", sparsity=0.5, sequential=True))


def _hand_keep(w0: torch.Tensor, col_sq: torch.Tensor, structure: str) -> torch.Tensor:
    """Wanda / MoE-Pruner keep mask by brute force: in every row of every expert ("0.5") or every
    group of m consecutive inputs ("n:m"), prune the weights with the lowest |w| x sqrt(column norm)
    (ties: lower index first): round(0.5 x in) per row, or n per group."""
    E, rows, n_in = w0.shape
    keep = torch.ones(E, rows, n_in, dtype=torch.bool)
    if ":" in structure:
        n_prune, m = map(int, structure.split(":"))
    else:
        n_prune, m = round(float(structure) * n_in), n_in
    for e in range(E):
        col = col_sq[e].double().sqrt().tolist()
        for r in range(rows):
            for start in range(0, n_in, m):
                scores = sorted((abs(float(w0[e, r, j])) * col[j], j) for j in range(start, start + m))
                for _, j in scores[:n_prune]:
                    keep[e, r, j] = False
    return keep


@pytest.mark.parametrize("metric, structure", [("wanda", "0.5"), ("moe_pruner", "0.5"), ("wanda", "2:4")])
def test_sequential_equals_layer_by_layer_recalibration_by_hand(mixtral, metric, structure):
    """Reference written out: prune layer 0 with the base statistics; build a copy of the base whose
    layer 0 is pruned that way; calibrate that copy with the public `calibrate`; prune layer 1 with
    the statistics of its new inputs. The sequential plan must give exactly these masks."""
    import copy

    from moeviz.models.layers import find_moe_layers
    from moeviz.models.loading import LoadedModel

    lm, samples, stats = mixtral
    norm = {"wanda": ("input_sq", "down_sq"), "moe_pruner": ("input_sq_weighted", "down_sq_weighted")}[metric]
    settings = dict(structure=structure) if ":" in structure else dict(sparsity=float(structure))
    comp = Compressor(lm, stats)
    one_pass = comp.apply(plan(metric=metric, **settings))  # warms the score/mask caches first
    seq = comp.apply(plan(metric=metric, sequential=True, **settings), samples=samples)
    again = comp.apply(plan(metric=metric, **settings))  # ...and sequential must not pollute them
    for lo, la in zip(one_pass.layers, again.layers):
        assert torch.equal(lo.experts.down_proj, la.experts.down_proj)

    partial = copy.deepcopy(lm.model)
    partial_layers = find_moe_layers(partial, lm.layers)
    layer_stats = stats.layers[0]
    for i, base_layer in enumerate(lm.layers):
        if i > 0:  # statistics of layer i's inputs, as produced by the already-pruned layers before it
            layer_stats = calibrate(LoadedModel(partial, lm.tokenizer, partial_layers, lm.info), samples,
                                    record_tokens=0).layers[i]
        for proj in ("gate", "up", "down"):
            w0 = base_layer.weight(proj)
            keep = _hand_keep(w0, getattr(layer_stats, norm[proj == "down"]), structure)
            got = seq.layers[i].weight(proj) != 0  # base weights have no exact zeros
            assert torch.equal(got, keep), (metric, i, proj)
            with torch.no_grad():
                partial_layers[i].weight(proj).mul_(keep)
    # The re-calibrated statistics of layer 1 really differ from the one-pass ones (else the test is moot).
    assert not torch.allclose(layer_stats.input_sq, stats.layers[1].input_sq)
    if ":" not in structure:  # a second sequential plan on the same Compressor re-calibrates afresh
        other = plan(metric=metric, sparsity=0.3, sequential=True)
        fresh = Compressor(lm, stats).apply(other, samples=samples)
        assert torch.equal(comp.apply(other, samples=samples).layers[1].experts.gate_up_proj,
                           fresh.layers[1].experts.gate_up_proj)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "gpt_oss", "phimoe", "granitemoe", "olmoe", "qwen3_moe"])
def test_every_family_compresses_and_removes_experts(family, loaded_tiny):
    lm = loaded_tiny(family)
    samples = tokenize_documents(DOCS, lm.tokenizer, 4, 16, seed=0)
    stats = calibrate(lm, samples, batch_size=4)
    removed = experts_to_remove(stats, 1, "reap")
    cm = Compressor(lm, stats).apply(plan(metric="moe_pruner", sparsity=0.5, q_bits=4, q_group_size=-1,
                                    removed_experts=removed))
    out = cm.model(input_ids=samples.input_ids).logits
    assert torch.isfinite(out).all()
    from moeviz.models.loading import LoadedModel

    comp = calibrate(LoadedModel(cm.model, lm.tokenizer, cm.layers, lm.info), samples, batch_size=4)
    for layer, e in removed:
        assert comp.layers[layer].routed_counts[e] == 0
    assert cm.storage.summary()["compression_ratio"] > 1.5


def test_stats_of_another_model_are_refused(mixtral, loaded_tiny):
    _, _, stats = mixtral
    with pytest.raises(PlanError, match="belong to model"):
        Compressor(loaded_tiny("olmoe"), stats)


def test_group_size_matters_only_for_quantized_tensors(loaded_tiny):
    # GPT-OSS-20B has 2880 input columns, which the default group size 128 does not divide: a plan
    # that quantizes nothing must still work there, and one that quantizes must be refused.
    from moeviz.compression.apply import check_plan_fits

    lm = loaded_tiny("mixtral")  # hidden 32, intermediate 24: 20 divides neither
    prune_only = CompressionPlan(pruning=PruningSettings(metric="magnitude", sparsity=0.5),
                                 quant=QuantSettings(bits=16, group_size=20))
    check_plan_fits(prune_only, lm.layers)
    cm = Compressor(lm, None).apply(prune_only)
    assert cm.storage.summary()["experts_compression_ratio"] > 1.0
    for quantizing in (CompressionPlan(quant=QuantSettings(bits=4, group_size=20)),
                       CompressionPlan(quant=QuantSettings(bits=16, group_size=20), overrides=[Override(layer=1, expert=2, bits=4)]),
                       CompressionPlan(quant=QuantSettings(bits=16, group_size=20), router_bits=8)):
        with pytest.raises(PlanError, match="does not divide"):
            check_plan_fits(quantizing, lm.layers)
        with pytest.raises(PlanError, match="does not divide"):
            Compressor(lm, None).apply(quantizing)
