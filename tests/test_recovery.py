"""Recovery by expert-wise knowledge distillation: loss terms, format invariants, the base untouched,
a real improvement on the demo model, the run linked to its parent."""

import hashlib

import pytest
import torch
from torch.nn.utils import parametrize

from moeviz.calibration import calibrate
from moeviz.compression import CompressionPlan, PruningSettings, QuantSettings
from moeviz.compression.apply import Compressor
from moeviz.compression.quantize import quantize_weight
from moeviz.data import tokenize_documents
from moeviz.recovery import DistillationSession, RecoveryError, RecoverySettings, recover
from moeviz.recovery.losses import balanced_lambda, expert_mse, next_token_cross_entropy, router_kl
from documents import documents

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "granitemoe", "phimoe", "gpt_oss"]
DOCS = documents(30)


def fingerprint(model) -> str:
    """Hash of every parameter and buffer (names, shapes, bytes): equal iff the model is bit-identical."""
    h = hashlib.sha256()
    for name, t in sorted(list(model.state_dict(keep_vars=True).items())):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def removal_for(family, n_layers=2):
    # DeepSeek-V3 group routing: remove one expert from each of the 2 groups of 4 (export needs evenness).
    return [(l, e) for l in range(n_layers) for e in ((1, 6) if family == "deepseek_v3" else (2,))]


# ----------------------------------------------------------------------------- pure loss terms
def test_router_kl_brute_force_and_removed_experts():
    torch.manual_seed(0)
    t, s = torch.randn(5, 6), torch.randn(5, 6)
    p, q = t.softmax(-1), s.softmax(-1)
    brute = sum(float((p[i] * (p[i] / q[i]).log()).sum()) for i in range(5)) / 5
    assert router_kl(t, s, "softmax").item() == pytest.approx(brute, rel=1e-5)
    # Sigmoid routers: scores normalised to sum to 1.
    ps, qs = t.sigmoid() / t.sigmoid().sum(-1, keepdim=True), s.sigmoid() / s.sigmoid().sum(-1, keepdim=True)
    brute = float((ps * (ps / qs).log()).sum(-1).mean())
    assert router_kl(t, s, "sigmoid").item() == pytest.approx(brute, rel=1e-5)
    # A removed expert (-inf in the student) is left out of both, which are renormalised: finite, and
    # equal to the KL over the surviving columns only.
    allowed = torch.tensor([True, True, False, True, True, True])
    s_removed = s.masked_fill(~allowed, float("-inf"))
    kl = router_kl(t, s_removed, "softmax", allowed)
    assert torch.isfinite(kl) and kl.item() == pytest.approx(router_kl(t[:, allowed], s[:, allowed], "softmax").item())
    assert router_kl(t, t, "softmax").item() == pytest.approx(0.0, abs=1e-7)


def test_expert_mse_cross_entropy_and_balancing():
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    assert expert_mse(a, b).item() == pytest.approx(float(((a - b) ** 2).sum() / 12), rel=1e-6)
    logits, ids = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    brute = -sum(float(logits[b, t].log_softmax(-1)[ids[b, t + 1]]) for b in range(2) for t in range(4)) / 8
    assert next_token_cross_entropy(logits, ids).item() == pytest.approx(brute, rel=1e-5)
    assert balanced_lambda(3.0, 0.5) == 6.0  # λ·term = CE
    assert balanced_lambda(3.0, 0.0) == 1.0 and balanced_lambda(3.0, float("nan")) == 1.0


# ----------------------------------------------------------------------------- on tiny models of every family
@pytest.mark.parametrize("family", FAMILIES)
def test_each_distillation_term_is_zero_when_student_equals_teacher(family, loaded_tiny):
    lm = loaded_tiny(family)
    samples = tokenize_documents(DOCS, lm.tokenizer, 2, 16)
    with torch.no_grad(), DistillationSession(Compressor(lm), CompressionPlan(), train_router=True) as session:
        terms = session.terms(samples.input_ids)
        teacher_ce = next_token_cross_entropy(lm.model(input_ids=samples.input_ids).logits, samples.input_ids)
    assert terms["expert_mse"].item() == 0.0  # same weights, same inputs: exactly equal outputs
    assert terms["router_kl"].item() == pytest.approx(0.0, abs=1e-6)  # teacher runs the fused kernel: float noise only
    assert terms["ce"].item() == pytest.approx(teacher_ce.item(), rel=1e-4)  # the LM term is the base's own CE
    # ... and after compression, the distillation terms are no longer zero.
    plan = CompressionPlan(pruning=PruningSettings(metric="magnitude", sparsity=0.5))
    with torch.no_grad(), DistillationSession(Compressor(lm), plan) as session:
        terms = session.terms(samples.input_ids)
    assert terms["expert_mse"].item() > 0 and terms["router_kl"].item() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_recovery_keeps_the_plan_format_and_never_touches_the_base(family, loaded_tiny):
    """Masks hold exactly, removed experts stay zero and unrouted, quantized experts stay on their
    grid, the pruned router keeps its zeros, the base is bit-identical, the weights did change."""
    lm = loaded_tiny(family)
    samples = tokenize_documents(DOCS, lm.tokenizer, 8, 16)
    stats = calibrate(lm, samples, batch_size=4)
    before = fingerprint(lm.model)
    plan = CompressionPlan(pruning=PruningSettings(metric="moe_pruner", sparsity=0.5),
                           quant=QuantSettings(bits=4, group_size=-1), removed_experts=removal_for(family),
                           router_sparsity=0.25)
    comp = Compressor(lm, stats)
    reference = comp.apply(plan, keep_masks=True)
    recovered, result = recover(comp, plan, samples, RecoverySettings(steps=3, learning_rate=1e-2, batch_size=2,
                                                                      train="experts+router"))
    assert fingerprint(lm.model) == before
    assert result.steps_done == 3 and len(result.history) == 3 and result.stopped_early is None
    base_ptrs = {p.data_ptr() for p in lm.model.parameters()}
    for layer, ref in zip(recovered.layers, reference.layers):
        assert not parametrize.is_parametrized(layer.experts) and not parametrize.is_parametrized(layer.router)
        assert all(not p.requires_grad for p in recovered.model.parameters())
        removed = [e for (l, e) in plan.removed_experts if l == layer.index]
        changed = False
        for proj in layer.projections():
            w, keep = layer.weight(proj), reference.masks[f"{layer.index}.{proj}"]
            assert w.data_ptr() not in base_ptrs
            assert bool((w[~keep] == 0).all()), "a pruned weight came back"
            assert bool((w[removed] == 0).all()), "a removed expert came back"
            # Every surviving expert's rows are on their 4-bit grid: re-quantizing changes nothing.
            assert torch.equal(quantize_weight(w, 4, -1).dequantized, w)
            changed |= not torch.equal(w, ref.weight(proj))
        assert changed, "recovery did not change the expert weights"
        router_keep = reference.masks[f"{layer.index}.router"]
        assert bool((layer.router.weight[~router_keep] == 0).all())
        assert not torch.equal(layer.router.weight, ref.router.weight)
    # Removed experts are never routed to by the recovered model.
    from moeviz.models.loading import LoadedModel

    routing = calibrate(LoadedModel(recovered.model, lm.tokenizer, recovered.layers, lm.info), samples)
    for l, e in plan.removed_experts:
        assert routing.layers[l].routed_counts[e] == 0


def test_untouched_layers_are_cloned_before_training(loaded_tiny):
    """An identity plan shares every tensor with the base; training must write to copies."""
    lm = loaded_tiny("mixtral")
    samples = tokenize_documents(DOCS, lm.tokenizer, 4, 16)
    before = fingerprint(lm.model)
    recovered, _ = recover(Compressor(lm), CompressionPlan(), samples,
                           RecoverySettings(steps=2, learning_rate=1e-2, batch_size=2, train="experts+router"))
    assert fingerprint(lm.model) == before
    assert not torch.equal(recovered.layers[0].weight("up"), lm.layers[0].weight("up"))
    assert not torch.equal(recovered.layers[0].router.weight, lm.layers[0].router.weight)


def test_cancel_time_budget_and_bad_settings(loaded_tiny):
    lm = loaded_tiny("qwen2_moe")
    samples = tokenize_documents(DOCS, lm.tokenizer, 4, 16)
    plan = CompressionPlan(pruning=PruningSettings(metric="magnitude", sparsity=0.5))
    seen = []
    recovered, result = recover(Compressor(lm), plan, samples, RecoverySettings(steps=50, batch_size=2),
                                progress=lambda s, n, row: seen.append((s, n, sorted(row))),
                                should_stop=lambda: len(seen) >= 2)
    assert result.steps_done == 2 and result.stopped_early == "cancelled"
    assert seen[0][:2] == (1, 50) and {"ce", "expert_mse", "router_kl", "loss"} <= set(seen[0][2])
    assert not any(p.requires_grad for p in recovered.model.parameters())  # released even when cancelled
    _, result = recover(Compressor(lm), plan, samples, RecoverySettings(steps=10_000, batch_size=2, max_seconds=0.5))
    assert result.stopped_early == "time budget" and 0 < result.steps_done < 10_000
    for bad, field in [(dict(steps=0), "steps"), (dict(learning_rate=0), "learning_rate"), (dict(batch_size=0), "batch_size"),
                       (dict(lambda_expert=-1), "lambda_expert"), (dict(train="everything"), "train"),
                       (dict(max_seconds=0), "max_seconds")]:
        with pytest.raises(RecoveryError, match=field):
            recover(Compressor(lm), plan, samples, RecoverySettings(**bad))
    with pytest.raises(RecoveryError, match="batch_size 64 is larger than the 4 training windows"):
        recover(Compressor(lm), plan, samples, RecoverySettings(batch_size=64))


def test_zero_router_lambda_skips_the_teacher_pass(loaded_tiny):
    lm = loaded_tiny("mixtral")
    samples = tokenize_documents(DOCS, lm.tokenizer, 4, 16)
    _, result = recover(Compressor(lm), CompressionPlan(pruning=PruningSettings(metric="magnitude", sparsity=0.5)), samples,
                        RecoverySettings(steps=2, batch_size=2, lambda_router=0.0, lambda_expert=2.0))
    assert result.lambda_router == 0 and result.lambda_expert == 2.0
    assert all(row["router_kl"] == 0 for row in result.history)


# ----------------------------------------------------------------------------- the demo model
@pytest.fixture(scope="module")
def demo(demo_model):
    import moeviz
    from moeviz.evaluation import EvalSettings, Evaluator, load_eval_samples

    lm = demo_model
    cal = moeviz.load_calibration_data(lm.tokenizer, None, n_samples=64, seq_len=256, seed=0)
    stats = calibrate(lm, cal)
    evaluator = Evaluator(lm, load_eval_samples(lm.tokenizer, seq_len=256, max_samples=16),
                          EvalSettings(measure_latency=False))
    return lm, cal, stats, evaluator


def test_short_recovery_of_50pct_moe_pruner_lowers_heldout_perplexity(demo):
    from moeviz.evaluation import evaluate_plan
    from moeviz.figures import tradeoff_chart
    from moeviz.recovery import recover_and_evaluate
    from moeviz.store import RunStore

    lm, cal, stats, evaluator = demo
    before = fingerprint(lm.model)
    plan = CompressionPlan(pruning=PruningSettings(metric="moe_pruner", sparsity=0.5))
    comp = Compressor(lm, stats)
    store = RunStore()
    pruned, parent = evaluate_plan(comp, evaluator, plan, store)
    masks = comp.apply(plan, keep_masks=True).masks
    recovery, recovered, run_id, model = recover_and_evaluate(
        comp, evaluator, plan, cal, RecoverySettings(steps=30, learning_rate=3e-4, batch_size=4),
        store=store, parent_run_id=parent)
    from moeviz.recovery import gap_recovered

    base_ppl = evaluator.base.loss["perplexity"]
    gap_closed = gap_recovered(pruned.perplexity, recovered.perplexity, base_ppl)
    assert gap_closed == pytest.approx((pruned.perplexity - recovered.perplexity) / (pruned.perplexity - base_ppl))
    # A real improvement: at least a quarter of the perplexity lost to pruning is won back
    # (measured: about 60 % after these 30 steps).
    assert gap_closed > 0.25, (base_ppl, pruned.perplexity, recovered.perplexity)
    assert recovered.compression == pruned.compression  # same storage format, same ratio
    for key, keep in masks.items():
        layer, proj = key.split(".")
        w = model.layers[int(layer)].weight(proj)
        assert int((w == 0).sum()) >= int((~keep).sum()) and bool((w[~keep] == 0).all())
    assert fingerprint(lm.model) == before
    # Stored as a run linked to its parent: the trade-off chart draws one recovery arrow.
    record = store.get_run(run_id)
    assert record.parent_run_id == parent and "KD recovery (30 steps)" in record.name
    assert record.metrics["recovery"]["steps_done"] == 30
    runs = store.runs(model_fingerprint=lm.fingerprint)
    fig = tradeoff_chart(runs[runs["id"].isin([parent, run_id])])
    assert sum(1 for a in fig.layout.annotations if a.showarrow) == 1


def test_recovery_keeps_the_n_m_pattern(loaded_tiny):
    lm = loaded_tiny("mixtral")
    samples = tokenize_documents(DOCS, lm.tokenizer, 4, 16)
    plan = CompressionPlan(pruning=PruningSettings(metric="magnitude", structure="2:4"))
    recovered, _ = recover(Compressor(lm), plan, samples, RecoverySettings(steps=3, learning_rate=1e-2, batch_size=2))
    for layer in recovered.layers:
        for proj in plan.pruning.projections:
            w = layer.weight(proj)  # [E, out, in] -> groups of 4 consecutive inputs
            zeros = (w.reshape(*w.shape[:-1], -1, 4) == 0).sum(-1)
            assert bool((zeros >= 2).all())


def test_gap_recovered():
    from moeviz.recovery import gap_recovered

    assert gap_recovered(13.0, 12.0, 11.0) == 0.5
    assert gap_recovered(13.0, 10.0, 11.0) == 1.5  # better than the base
    assert gap_recovered(11.0, 11.5, 11.0) is None  # compression lost nothing: no gap to recover


# ----------------------------------------------------------------------------- GPTQ plans: GPTQ's own grid
def _codes_on_grid(w, scales, zeros, bits) -> bool:
    """Brute force, independent of quantize.py: every w = (q - z)·scale with an integer code q in range."""
    G = scales.shape[-1]
    groups = w.float().reshape(*w.shape[:-1], G, -1)  # [E, out, G, gs]
    code = groups / scales[..., None] + (0 if zeros is None else zeros[..., None])
    lo, hi = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if zeros is None else (0, 2 ** bits - 1)
    return bool(((code - code.round()).abs() < 1e-3).all() and (code.round() >= lo).all() and (code.round() <= hi).all())


def test_quantize_on_a_given_grid_is_rtn_on_rtn_grids_and_moves_onto_the_grid():
    from moeviz.compression.quantize import quantize_on_grid

    w = torch.randn(3, 5, 16)
    for symmetric in (True, False):
        qw = quantize_weight(w, 3, 8, symmetric)
        assert torch.equal(quantize_on_grid(w, qw.scales, qw.zero_points, 3), qw.dequantized)
        moved = quantize_on_grid(w * 0.7 + 0.01, qw.scales, qw.zero_points, 3)  # other weights, same grid
        assert _codes_on_grid(moved, qw.scales, qw.zero_points, 3) and not _codes_on_grid(w * 0.7 + 0.01, qw.scales,
                                                                                          qw.zero_points, 3)


@pytest.mark.parametrize("family,symmetric", [("mixtral", True), ("mixtral", False), ("gpt_oss", False)])
def test_recovery_of_a_gptq_plan_starts_from_the_gptq_model_and_stays_on_its_grid(family, symmetric, loaded_tiny):
    """Step 0 is the GPTQ model bit for bit (no RTN re-quantization with scales computed from the weights);
    after training every weight lies on GPTQ's kept grid (per expert, row and group) and pruned weights stay 0."""
    from moeviz.compression.quantize import quantize_on_grid

    lm = loaded_tiny(family)  # gpt_oss: [E, in, out] fused layout
    samples = tokenize_documents(DOCS, lm.tokenizer, 8, 16)
    stats = calibrate(lm, samples, batch_size=4)
    plan = CompressionPlan(pruning=PruningSettings(metric="magnitude", sparsity=0.5),
                           quant=QuantSettings(bits=3, group_size=8, symmetric=symmetric, method="gptq"))
    comp = Compressor(lm, stats)
    reference = comp.apply(plan, samples, keep_masks=True)
    assert reference.grids, "the compressed model keeps GPTQ's grids"
    ids = samples.input_ids[:2]
    with torch.no_grad():
        ref_logits = reference.model(input_ids=ids).logits
    # A learning rate far below one float step of the weights: the latent weights stay where they are.
    still, _ = recover(comp, plan, samples, RecoverySettings(steps=1, learning_rate=1e-12, batch_size=2,
                                                            lambda_router=0.0))
    for layer, ref in zip(still.layers, reference.layers):
        for proj in layer.projections():
            assert torch.equal(layer.weight(proj), ref.weight(proj)), f"layer {layer.index} {proj} moved at step 0"
    with torch.no_grad():
        assert torch.equal(still.model(input_ids=ids).logits, ref_logits)

    trained, result = recover(comp, plan, samples, RecoverySettings(steps=3, learning_rate=1e-2, batch_size=2))
    assert result.steps_done == 3
    changed = False
    for layer, ref in zip(trained.layers, reference.layers):
        for proj in layer.projections():
            grid = reference.grids[f"{layer.index}.{proj}"]
            assert bool((grid.bits == 3).all()) and (grid.zero_points is None) == symmetric
            w, keep = layer.weight(proj), reference.masks[f"{layer.index}.{proj}"]
            assert torch.equal(quantize_on_grid(ref.weight(proj), grid.scales, grid.zero_points, 3), ref.weight(proj))
            assert torch.equal(quantize_on_grid(w, grid.scales, grid.zero_points, 3), w), "a weight left GPTQ's grid"
            assert _codes_on_grid(w, grid.scales, grid.zero_points, 3)
            assert bool((w[~keep] == 0).all()), "a pruned weight came back"
            changed |= not torch.equal(w, ref.weight(proj))
    assert changed, "recovery did not change the expert weights"
