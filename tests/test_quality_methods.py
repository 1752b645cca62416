"""Second-order methods in plans (SparseGPT pruning, GPTQ quantization, router-weighted Hessians):
Hessians against a brute-force sum over routed tokens, masks / grids / storage / export of a plan, the
base model untouched, and the behaviour that justifies the methods (they beat the first-order ones)."""

import numpy as np
import pytest
import torch
import transformers

import moeviz
from moeviz.compression import CompressionPlan, PruningSettings, QuantSettings
from moeviz.compression.apply import Compressor
from moeviz.compression.resolve import resolve_plan
from moeviz.compression.masks import prune_counts
from moeviz.compression.second_order import compress_second_order
from moeviz.data import tokenize_documents
from moeviz.errors import PlanError
from moeviz.evaluation import EvalSettings, Evaluator, load_eval_samples
from moeviz.export import export_model
from moeviz.models.runtime import install_experts_runtime
from moeviz.models.layers import find_moe_layers
from documents import documents

DOCS = documents(20)


def _brute_force_inputs(model, layers):
    """Per MoE layer, what its experts receive over one forward: [(hidden [T, H], ids [T, k], weights [T, k])]."""
    seen = {l.index: [] for l in layers}
    for l in layers:
        install_experts_runtime(l).routing_observers.append(
            lambda h, i, w, l=l.index: seen[l].append((h.detach().double(), i.clone(), w.detach().double())))
    return seen


def _expert_hidden(layer, e, x):
    """Expert e's down-projection input act(gate x)·(up x) [I] written plainly from the module's raw storage
    (GPT-OSS: [H, 2I] transposed, gate / up interleaved, biases, clamped SwiGLU as in transformers)."""
    ex = layer.experts
    if getattr(ex, "has_bias", False):  # gpt_oss
        gu = x @ ex.gate_up_proj[e].double() + ex.gate_up_proj_bias[e].double()
        gate, up = gu[::2].clamp(max=ex.limit), gu[1::2].clamp(min=-ex.limit, max=ex.limit)
        return (up + 1) * gate * torch.sigmoid(gate * ex.alpha)
    w_gate, w_up = layer.weight("gate")[e].double(), layer.weight("up")[e].double()
    return torch.nn.functional.silu(w_gate @ x) * (w_up @ x)


def _recorded_hessians_and_routed_inputs(lm, comp, plan, samples, keep_masks=False):
    """(the Hessians the second-order job recorded, the compressed model, what each of its experts received
    in a plain forward over the same windows: layer -> [(hidden, ids, gates)]), for brute-force sums."""
    record: dict = {}
    compress_second_order(comp, resolve_plan(plan, lm.layers, None), samples, batch_size=4, hessians=record)
    cm = comp.apply(plan, samples, keep_masks=keep_masks)
    seen = _brute_force_inputs(cm.model, cm.layers)
    with torch.no_grad():
        for i in range(0, samples.n_samples, 4):
            cm.model(input_ids=samples.input_ids[i:i + 4], use_cache=False)
    return record, cm, seen


# qwen2_moe has a shared expert; gpt_oss transposed [E, H, 2I] storage, interleaved gate / up, biases;
# deepseek_v3 a dense first layer, group routing with a scaling factor and a shared expert
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss", "deepseek_v3"])
@pytest.mark.parametrize("hessian", ["router_weighted", "plain"])
def test_hessians_equal_brute_force_sums_over_routed_tokens(family, hessian, loaded_tiny):
    lm = loaded_tiny(family)
    samples = tokenize_documents(DOCS, lm.tokenizer, 8, 16)
    # one removed expert per layer: its tokens are re-routed before the Hessians are collected
    plan = CompressionPlan(pruning=PruningSettings(metric="sparsegpt", sparsity=0.5), hessian=hessian,
                           removed_experts=[(0, 1), (1, 2)])
    comp = Compressor(lm, None)
    # The compressed model: layer 1's inputs come from the compressed layer 0 (sequential), and the down
    # projection's inputs from the compressed gate / up of the same expert.
    record, cm, seen = _recorded_hessians_and_routed_inputs(lm, comp, plan, samples)
    checked = 0
    for layer in cm.layers:
        hidden = torch.cat([h for h, _, _ in seen[layer.index]])
        ids = torch.cat([i for _, i, _ in seen[layer.index]])
        gates = torch.cat([w for _, _, w in seen[layer.index]])
        for e in range(layer.num_experts):
            H_in = torch.zeros(layer.hidden_size, layer.hidden_size, dtype=torch.float64)
            H_down = torch.zeros(layer.intermediate_size, layer.intermediate_size, dtype=torch.float64)
            for t in range(hidden.shape[0]):  # plainly, token by token and slot by slot
                for slot in range(ids.shape[1]):
                    if int(ids[t, slot]) != e:
                        continue
                    g2 = float(gates[t, slot]) ** 2 if hessian == "router_weighted" else 1.0
                    x = hidden[t]
                    h = _expert_hidden(layer, e, x)
                    H_in += g2 * torch.outer(x, x)
                    H_down += g2 * torch.outer(h, h)
            if (layer.index, e, "in") not in record:  # removed, or no token reached e: no Hessian
                assert H_in.abs().max() == 0
                continue
            torch.testing.assert_close(record[(layer.index, e, "in")].double(), H_in, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(record[(layer.index, e, "down")].double(), H_down, rtol=1e-3, atol=1e-5)
            checked += 1
    assert checked >= 4


def test_low_token_experts_are_listed_in_the_result(loaded_tiny):
    lm = loaded_tiny("mixtral")
    few = tokenize_documents(DOCS, lm.tokenizer, 1, 8)  # 8 tokens, top-2 of 4 experts: < 32 columns each
    cm = Compressor(lm, None).apply(CompressionPlan(pruning=PruningSettings(metric="sparsegpt", sparsity=0.5)), few)
    warned = {(w["layer"], w["expert"]) for w in cm.second_order["warnings"]}
    assert "(0, 0)" in __import__("moeviz.export", fromlist=["_report"])._report(lm, cm, None, [])
    assert warned == {(l.index, e) for l in lm.layers for e in range(l.num_experts)}
    assert all(w["tokens"] < w["columns"] for w in cm.second_order["warnings"])


def test_plan_settings_validate_and_stay_backwards_compatible():
    old = CompressionPlan.from_json('{"pruning": {"metric": "wanda", "sparsity": 0.5}, "quant": {"bits": 4}}')
    assert old.quant.method == "rtn" and old.hessian == "router_weighted" and not old.second_order()
    plan = CompressionPlan(pruning=PruningSettings(metric="sparsegpt", sparsity=0.5),
                           quant=QuantSettings(bits=3, method="gptq"), hessian="plain", act_order=True)
    assert CompressionPlan.from_json(plan.to_json()) == plan and plan.validate().second_order()
    for field, bad in (("hessian", "fisher"), ("obs_blocksize", 0), ("percdamp", 0.0), ("act_order", "yes")):
        with pytest.raises(PlanError, match=field):
            CompressionPlan(**{field: bad}).validate()
    with pytest.raises(PlanError, match="quant.method"):
        CompressionPlan(quant=QuantSettings(method="awq")).validate()


# ---------------------------------------------------------------------------------------------- demo

@pytest.fixture(scope="module")
def demo(demo_model):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as this module always ran (one thread); restored at its end
    lm = demo_model
    # 32 windows: with 16 (about 512 routed tokens per expert for 128 columns) GPTQ overfits them
    cal = moeviz.load_calibration_data(lm.tokenizer, n_samples=32, seq_len=128, seed=0)
    stats = moeviz.calibrate(lm, cal)
    ev = Evaluator(lm, load_eval_samples(lm.tokenizer, seq_len=128, max_samples=16), EvalSettings(measure_latency=False))
    yield lm, stats, cal, ev, Compressor(lm, stats)
    torch.set_num_threads(threads)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_sparsegpt_gptq_plan_masks_grid_storage_and_base(demo, structure):
    lm, stats, cal, _, comp = demo
    before = _snapshot(lm.model)
    plan = CompressionPlan(pruning=PruningSettings(metric="sparsegpt", sparsity=0.6 if structure == "unstructured" else 0,
                                                   structure=structure),
                           quant=QuantSettings(bits=3, group_size=64, method="gptq"))
    cm = comp.apply(plan, cal, keep_masks=True)
    for layer in cm.layers:
        for proj in layer.projections():
            w = layer.weight(proj).detach()  # [E, out, in]
            keep = cm.masks[f"{layer.index}.{proj}"]
            assert (w[~keep] == 0).all()  # pruned weights are exact zeros
            if structure == "unstructured":
                k = int(prune_counts(0.6, w.shape[-1], ()))
                assert ((~keep).sum(-1) == k).all()
            else:
                assert ((~keep).reshape(*keep.shape[:-1], -1, 4).sum(-1) == 2).all()
            # on the 3-bit symmetric grid: at most 2**3 - 1 levels per (row, group of 64)
            groups = w.reshape(*w.shape[:-1], -1, 64)
            levels = [torch.unique(g).numel() for g in groups.reshape(-1, 64)[::37]]  # a sample of groups
            assert max(levels) <= 7
    magnitude = CompressionPlan.from_dict({**plan.to_dict(), "pruning": {**plan.to_dict()["pruning"], "metric": "magnitude"},
                                           "quant": {**plan.to_dict()["quant"], "method": "rtn"}})
    ref = comp.apply(magnitude, cal)
    assert cm.storage.summary() == ref.storage.summary() and cm.storage.tensors == ref.storage.tensors
    for k, v in _snapshot(lm.model).items():
        assert torch.equal(v, before[k]), k


def test_second_order_plan_is_cached_and_exports_round_trip(demo, tmp_path):
    lm, _, cal, _, comp = demo
    plan = CompressionPlan(pruning=PruningSettings(metric="sparsegpt", sparsity=0.5),
                           quant=QuantSettings(bits=4, method="gptq"), removed_experts=[(l, 3) for l in range(4)])
    a = comp.apply(plan, cal)
    calls = []
    b = comp.apply(plan, cal, progress=lambda *x: calls.append(x))  # cached: no recomputation
    assert not calls
    for la, lb in zip(a.layers, b.layers):
        assert torch.equal(la.weight("down"), lb.weight("down"))
    assert (a.layers[1].weight("gate")[3] == 0).all()  # removal combines with the new method
    out = export_model(lm, a, tmp_path / "out")
    report = (out / "moeviz_report.md").read_text()
    assert "Second-order compression" in report and "block 128, percdamp 0.01, act-order off" in report
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = cal.input_ids[:2]
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, a.model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_sparsegpt_beats_magnitude_and_gptq_beats_rtn_on_the_demo(demo):
    lm, _, cal, ev, comp = demo

    def ppl(plan):
        return ev.evaluate(comp.apply(plan, cal)).perplexity

    mag = ppl(CompressionPlan(pruning=PruningSettings(metric="magnitude", sparsity=0.6)))
    sgpt = ppl(CompressionPlan(pruning=PruningSettings(metric="sparsegpt", sparsity=0.6)))
    base = ev.base.loss["perplexity"]
    assert sgpt - base < 0.75 * (mag - base)  # measured on the full windows: about half the damage
    rtn = ppl(CompressionPlan(quant=QuantSettings(bits=3)))
    gptq = ppl(CompressionPlan(quant=QuantSettings(bits=3, method="gptq")))
    assert gptq < rtn


def test_cli_evaluate_with_second_order_methods(tiny_model_dirs, tmp_path, capsys):
    import json

    from moeviz.cli import main

    data = tmp_path / "cal.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"calibration sentence {i} about experts. " * 6}) for i in range(30)))
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"pruning": {"sparsity": 0.5}, "quant": {"bits": 4, "group_size": -1}}))
    argv = ["evaluate", "--model", str(tiny_model_dirs["mixtral"]), "--data", str(data), "--samples", "4", "--seq-len",
            "16", "--eval-data", str(data), "--eval-seq-len", "16", "--eval-samples", "4", "--no-latency", "--no-store",
            "--plan", str(plan), "--json", str(tmp_path / "r.json")]
    assert main(argv + ["--method", "sparsegpt", "--quant-method", "gptq", "--hessian", "plain"]) == 0
    stored = json.loads((tmp_path / "r.json").read_text())["plan"]
    assert (stored["pruning"]["metric"], stored["quant"]["method"], stored["hessian"]) == ("sparsegpt", "gptq", "plain")
    assert json.loads(capsys.readouterr().out)["compression_ratio"] > 1
    assert main(argv + ["--method", "obc"]) == 2
    assert "pruning.metric: unknown metric 'obc'" in capsys.readouterr().err


def test_compress_page_runs_a_sparsegpt_gptq_plan(tiny_model_dirs):
    from test_app_pages import button, compress_page, ok

    at = compress_page(tiny_model_dirs)
    next(b for b in at.selectbox if b.label == "Pruning metric").set_value("sparsegpt").run()
    at.slider[0].set_value(0.5).run()
    next(b for b in at.selectbox if b.label == "Expert weight bits").set_value(4).run()
    next(b for b in at.selectbox if b.label == "Quantization method").set_value("gptq").run()
    ok(at)
    plan = at.session_state["plan"]
    assert (plan["pruning"]["metric"], plan["quant"]["method"], plan["hessian"]) == ("sparsegpt", "gptq", "router_weighted")
    button(at, "Evaluate").click().run()
    ok(at)
    result = at.session_state["last_result"]
    assert result["plan"]["pruning"]["metric"] == "sparsegpt" and result["second_order"]["seconds"] > 0


def test_auto_evaluation_never_starts_a_second_order_job(tiny_model_dirs):
    """"Re-evaluate on every change" (on for small models) re-runs cheap plans at once, but a SparseGPT /
    GPTQ plan is a layer-by-layer job: it waits for Evaluate (auto-evaluating it made every slider move a
    multi-second job)."""
    from test_app_pages import button, compress_page, ok

    at = compress_page(tiny_model_dirs)
    at.session_state["_auto_eval"] = True
    at.slider[0].set_value(0.3).run()
    ok(at)
    assert at.session_state["last_result"]["plan"]["pruning"]["sparsity"] == 0.3  # auto-evaluated
    next(b for b in at.selectbox if b.label == "Pruning metric").set_value("sparsegpt").run()
    at.slider[0].set_value(0.5).run()
    ok(at)
    assert at.session_state["last_result"]["plan"]["pruning"]["metric"] != "sparsegpt"  # not started
    button(at, "Evaluate").click().run()
    ok(at)
    assert at.session_state["last_result"]["plan"]["pruning"]["metric"] == "sparsegpt"


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])  # gpt_oss: per-layer masks (sliding / full attention)
def test_decoder_layers_called_one_by_one_reproduce_the_model(family, loaded_tiny):
    from moeviz.calibration.hessians import capture_decoder_inputs
    from moeviz.models.views import structural_copy
    from moeviz.models.layers import decoder_layers

    lm = loaded_tiny(family)
    samples = tokenize_documents(DOCS, lm.tokenizer, 4, 32)  # longer than gpt_oss's sliding window (16)
    view = structural_copy(lm.model)
    layers = find_moe_layers(view, lm.layers)
    blocks, _ = decoder_layers(view, layers)[0]
    batches = [samples.input_ids[:2], samples.input_ids[2:4]]
    last = len(blocks) - 1
    inputs = capture_decoder_inputs(view, blocks, last, batches)
    assert inputs.shared == (family == "mixtral")
    with torch.no_grad():
        hidden = inputs.first_hidden
        for j in range(last):
            hidden = inputs.run(j, hidden)
            for b, ids in enumerate(batches):  # hidden_states[j + 1] = output of decoder layer j
                ref = view(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states[j + 1]
                torch.testing.assert_close(hidden[b], ref, rtol=1e-5, atol=1e-5)


def test_overrides_and_router_settings_combine_and_the_job_reports_and_cancels(demo):
    from moeviz.compression.plan import Override
    from moeviz.compression.second_order import Cancelled

    lm, _, cal, _, comp = demo
    plan = CompressionPlan(pruning=PruningSettings(metric="sparsegpt", sparsity=0.5),
                           quant=QuantSettings(bits=4, method="gptq"), router_sparsity=0.2,
                           overrides=[Override(0, 2, sparsity=0.0, bits=16), Override(1, 5, sparsity=0.3),
                                      Override(2, None, bits=16)])
    calls = []
    cm = Compressor(lm, None).apply(plan, cal, keep_masks=True, progress=lambda *a: calls.append(a))
    assert [c[:2] for c in calls] == [(j + 1, 4) for j in range(4)] and all(c[2] >= 0 for c in calls)
    assert torch.equal(cm.layers[0].weight("down")[2], lm.layers[0].weight("down")[2])  # dense expert untouched
    keep = cm.masks["1.gate"][5]
    assert ((~keep).sum(-1) == int(prune_counts(0.3, keep.shape[-1], ()))).all()
    layer2 = cm.layers[2].weight("up")  # layer 2: pruned, not quantized -> many distinct values per row
    assert torch.unique(layer2[0, 0][layer2[0, 0] != 0]).numel() > 60
    assert (cm.layers[0].router_weight == 0).float().mean() >= 0.19  # router pruned as with any method
    with pytest.raises(Cancelled):
        Compressor(lm, None).apply(plan, cal, cancel=lambda: True)


def test_a_second_order_plan_that_compresses_nothing_with_it_takes_the_usual_path(loaded_tiny):
    lm = loaded_tiny("mixtral")
    cm = Compressor(lm, None).apply(CompressionPlan(pruning=PruningSettings(metric="sparsegpt"),
                                                    quant=QuantSettings(method="gptq"), router_bits=8))
    assert cm.second_order is None and cm.replaced_tensors == [l.router_weight_path for l in cm.layers]


def test_recovery_of_a_sparsegpt_plan_keeps_its_masks(loaded_tiny):
    from moeviz.recovery import RecoverySettings, recover

    lm = loaded_tiny("mixtral")
    samples = tokenize_documents(DOCS, lm.tokenizer, 8, 16)
    plan = CompressionPlan(pruning=PruningSettings(metric="sparsegpt", sparsity=0.5), quant=QuantSettings(bits=4, method="gptq"))
    comp = Compressor(lm, None)
    reference = comp.apply(plan, samples, keep_masks=True)
    recovered, result = recover(comp, plan, samples, RecoverySettings(steps=2, learning_rate=1e-2, batch_size=2))
    assert result.steps_done == 2
    for layer in recovered.layers:
        for proj in layer.projections():
            keep = reference.masks[f"{layer.index}.{proj}"]
            assert (layer.weight(proj)[~keep] == 0).all() and (~keep).any()


@pytest.mark.parametrize("projections", [["gate", "up"], ["down"], ["gate"]])
def test_sparsegpt_prunes_only_the_plans_projections(projections, loaded_tiny):
    lm = loaded_tiny("mixtral")
    samples = tokenize_documents(DOCS, lm.tokenizer, 8, 16)
    plan = CompressionPlan(pruning=PruningSettings(metric="sparsegpt", sparsity=0.5, projections=projections))
    cm = Compressor(lm, None).apply(plan, samples, keep_masks=True)
    for layer, base in zip(cm.layers, lm.layers):
        for proj in layer.projections():
            w = layer.weight(proj)
            if proj in projections:
                assert (w[~cm.masks[f"{layer.index}.{proj}"]] == 0).all() and (w == 0).float().mean() >= 0.5
            elif proj == "down" or not any(p in projections for p in ("gate", "up")):
                assert torch.equal(w, base.weight(proj))  # not pruned, no other change


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "granitemoe", "phimoe",
                                    "gpt_oss"])
def test_sparsegpt_gptq_on_every_tiny_family(family, loaded_tiny):
    lm = loaded_tiny(family)
    before = _snapshot(lm.model)
    samples = tokenize_documents(DOCS, lm.tokenizer, 8, 16)
    plan = CompressionPlan(pruning=PruningSettings(metric="sparsegpt", sparsity=0.5),
                           quant=QuantSettings(bits=4, group_size=-1, method="gptq"))
    cm = Compressor(lm, None).apply(plan, samples, keep_masks=True)
    with torch.no_grad():
        assert torch.isfinite(cm.model(input_ids=samples.input_ids[:2]).logits).all()
    for layer in cm.layers:
        for proj in layer.projections():
            keep = cm.masks[f"{layer.index}.{proj}"]
            k = int(prune_counts(0.5, keep.shape[-1], ()))
            assert (layer.weight(proj)[~keep] == 0).all() and ((~keep).sum(-1) == k).all()  # per [out, in] row
    # Exactly the routed experts' fused tensors changed (not biases, shared experts, dense first layers,
    # attention, routers), and the base is bit-identical.
    after = _snapshot(cm.model)
    changed = {n for n in after if not torch.equal(after[n], before[n])}
    assert changed == {f"{l.experts_path}.{lm.layers[l.index].fused_name(p)}" for l in cm.layers for p in l.projections()}
    assert all(torch.equal(v, before[n]) for n, v in _snapshot(lm.model).items())


def test_second_order_plan_on_an_offloaded_model_matches_the_model_in_memory(tiny_model_dirs, tmp_path):
    """accelerate offload (every weight on disk): the second-order job must keep the real compressed
    tensors, not the module's meta placeholders, and give the in-memory model's weights and logits."""
    from moeviz.models import load_model
    from moeviz.models.offload import full_state_dict, module_weights

    a = load_model(tiny_model_dirs["mixtral"])
    b = load_model(tiny_model_dirs["mixtral"], max_memory={"cpu": "60KB"}, offload_folder=tmp_path / "offload")
    assert all(p.is_meta for p in b.model.parameters())
    before = full_state_dict(b.model)
    samples = tokenize_documents(DOCS, a.tokenizer, 8, 16)
    plan = CompressionPlan(pruning=PruningSettings(metric="sparsegpt", sparsity=0.5),
                           quant=QuantSettings(bits=4, group_size=-1, method="gptq"))
    ca, cb = Compressor(a, None).apply(plan, samples), Compressor(b, None).apply(plan, samples)
    for la, lb in zip(ca.layers, cb.layers):
        with module_weights(lb.experts):
            for proj in la.projections():
                assert torch.equal(la.weight(proj), lb.weight(proj)), (la.index, proj)
    with torch.no_grad():
        ids = samples.input_ids[:2]
        torch.testing.assert_close(cb.model(input_ids=ids).logits, ca.model(input_ids=ids).logits, rtol=0, atol=0)
    after = full_state_dict(b.model)
    assert all(torch.equal(after[k], before[k]) for k in before)  # the offloaded base is untouched


def test_sparsegpt_n_m_needs_a_block_size_multiple_of_m():
    """An N:M group may not span two OBS blocks: refused by the plan (field-named), not deep in the job."""
    for structure, blocksize in (("2:4", 3), ("4:8", 4), ("2:4", 126)):
        with pytest.raises(PlanError, match="obs_blocksize"):
            CompressionPlan(pruning=PruningSettings(metric="sparsegpt", structure=structure),
                            obs_blocksize=blocksize).validate()
    CompressionPlan(pruning=PruningSettings(metric="sparsegpt", structure="2:4"), obs_blocksize=128).validate()
    CompressionPlan(pruning=PruningSettings(metric="magnitude", structure="2:4"), obs_blocksize=3).validate()


def test_stored_runs_are_reused_only_for_the_same_method_settings_and_calibration_windows(loaded_tiny, tmp_path):
    """find_run's key holds the second-order fields (a GPTQ plan never reuses an RTN run, nor another
    Hessian's), and a SparseGPT plan compressed without statistics (its result depends on the windows
    alone) never reuses a run compressed on other calibration windows."""
    from moeviz.evaluation import evaluate_plan
    from moeviz.store import RunStore

    lm = loaded_tiny("mixtral")
    store = RunStore(tmp_path / "runs.sqlite")
    ev = Evaluator(lm, tokenize_documents(DOCS, lm.tokenizer, 4, 16, seed=1), EvalSettings(measure_latency=False))
    comp = Compressor(lm, None)
    a, b = tokenize_documents(DOCS, lm.tokenizer, 4, 16, seed=0), tokenize_documents(DOCS[:1], lm.tokenizer, 4, 16, seed=3)
    assert a.fingerprint != b.fingerprint
    rtn = CompressionPlan(quant=QuantSettings(bits=4, group_size=-1))
    _, rtn_id = evaluate_plan(comp, ev, rtn, store, samples=a)
    gptq = CompressionPlan(quant=QuantSettings(bits=4, group_size=-1, method="gptq"))
    _, gptq_id = evaluate_plan(comp, ev, gptq, store, samples=a)
    assert gptq_id != rtn_id
    plain = CompressionPlan.from_dict({**gptq.to_dict(), "hessian": "plain"})
    _, plain_id = evaluate_plan(comp, ev, plain, store, samples=a)
    assert plain_id not in (rtn_id, gptq_id)
    assert evaluate_plan(comp, ev, gptq, store, samples=a)[1] == gptq_id  # unchanged: reused
    other, other_id = evaluate_plan(comp, ev, gptq, store, samples=b)
    assert other_id not in (rtn_id, gptq_id, plain_id)
    assert evaluate_plan(comp, ev, gptq, store, samples=b)[1] == other_id


@pytest.fixture
def llama4(loaded_family):
    return loaded_family("llama4_text")


@pytest.mark.parametrize("hessian", ["router_weighted", "plain"])
def test_llama4_hessians_use_the_expert_inputs_the_model_already_scaled_by_g(hessian, llama4):
    """Llama 4 (dense dispatch, transposed [E, H, 2I] storage, a shared expert) multiplies each expert's
    *input* by its routing score g: the expert sees g·x, so its Hessian is Σ (g x)(g x)ᵀ with no extra g²
    (for either setting), recomputed here token by token from the raw storage; the base stays bit-identical."""
    lm = llama4
    assert not lm.layers[0].calls_with_routing
    before = _snapshot(lm.model)
    samples = tokenize_documents(DOCS, lm.tokenizer, 8, 16)
    plan = CompressionPlan(pruning=PruningSettings(metric="sparsegpt", sparsity=0.5), hessian=hessian)
    comp = Compressor(lm, None)
    record, cm, seen = _recorded_hessians_and_routed_inputs(lm, comp, plan, samples, keep_masks=True)
    checked = 0
    for layer in cm.layers:
        hidden = torch.cat([h for h, _, _ in seen[layer.index]])
        ids = torch.cat([i for _, i, _ in seen[layer.index]])
        gates = torch.cat([w for _, _, w in seen[layer.index]])
        I = layer.intermediate_size
        for e in range(layer.num_experts):
            H_in = torch.zeros(layer.hidden_size, layer.hidden_size, dtype=torch.float64)
            H_down = torch.zeros(I, I, dtype=torch.float64)
            for t in range(hidden.shape[0]):
                for slot in range(ids.shape[1]):
                    if int(ids[t, slot]) != e:
                        continue
                    x = float(gates[t, slot]) * hidden[t]  # what the expert receives
                    gu = x @ layer.experts.gate_up_proj[e].double()  # [H] @ [H, 2I]
                    h = torch.nn.functional.silu(gu[:I]) * gu[I:]
                    H_in += torch.outer(x, x)
                    H_down += torch.outer(h, h)
            if (layer.index, e, "in") not in record:
                continue
            torch.testing.assert_close(record[(layer.index, e, "in")].double(), H_in, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(record[(layer.index, e, "down")].double(), H_down, rtol=1e-3, atol=1e-6)
            checked += 1
        for proj in layer.projections():
            keep = cm.masks[f"{layer.index}.{proj}"]
            assert ((~keep).sum(-1) == int(prune_counts(0.5, keep.shape[-1], ()))).all()
            assert (layer.weight(proj)[~keep] == 0).all()
    assert checked >= 4
    assert all(torch.equal(v, before[k]) for k, v in _snapshot(lm.model).items())


def test_sparsegpt_gptq_on_a_bf16_model(tiny_model_dirs):
    """bf16 weights: OBS runs in float32 and the compressed experts come back in bf16 (masks exact zeros,
    at most 2**4 - 1 levels per row of a 4-bit symmetric whole-row grid), the base bit-identical."""
    from moeviz.models import load_model

    lm = load_model(tiny_model_dirs["mixtral"], dtype=torch.bfloat16)
    before = _snapshot(lm.model)
    samples = tokenize_documents(DOCS, lm.tokenizer, 8, 16)
    plan = CompressionPlan(pruning=PruningSettings(metric="sparsegpt", sparsity=0.5),
                           quant=QuantSettings(bits=4, group_size=-1, method="gptq"))
    cm = Compressor(lm, None).apply(plan, samples, keep_masks=True)
    for layer in cm.layers:
        for proj in layer.projections():
            w = layer.weight(proj)
            assert w.dtype == torch.bfloat16
            keep = cm.masks[f"{layer.index}.{proj}"]
            assert (w[~keep] == 0).all() and ((~keep).sum(-1) == int(prune_counts(0.5, w.shape[-1], ()))).all()
            assert max(torch.unique(r[r != 0]).numel() for r in w.reshape(-1, w.shape[-1])) <= 14
    with torch.no_grad():
        assert torch.isfinite(cm.model(input_ids=samples.input_ids[:2]).logits).all()
    assert all(torch.equal(v, before[k]) for k, v in _snapshot(lm.model).items())


def test_quality_proxy_of_an_offloaded_model_equals_the_model_in_memory(tiny_model_dirs, tmp_path):
    """The live proxy reads expert weights: on an offloaded model (meta placeholders) it must load them."""
    from moeviz.calibration import calibrate
    from moeviz.compression.proxy import layer_errors
    from moeviz.models import load_model

    a = load_model(tiny_model_dirs["mixtral"])
    b = load_model(tiny_model_dirs["mixtral"], max_memory={"cpu": "60KB"}, offload_folder=tmp_path / "offload")
    samples = tokenize_documents(DOCS, a.tokenizer, 4, 16)
    sa, sb = calibrate(a, samples, batch_size=2), calibrate(b, samples, batch_size=2)
    plan = CompressionPlan(pruning=PruningSettings(metric="wanda", sparsity=0.5), quant=QuantSettings(bits=4))
    ea = layer_errors(a.layers, Compressor(a, sa).apply(plan).layers, sa)
    eb = layer_errors(b.layers, Compressor(b, sb).apply(plan).layers, sb)
    assert eb == pytest.approx(ea, rel=1e-6) and all(0 < e < 1 for e in ea)


def test_a_plan_stored_before_the_second_order_fields_is_the_same_plan_for_reuse(tmp_path):
    """An RTN plan stored without quant.method / hessian / percdamp … is found for the same plan written
    today (no duplicate run after an upgrade), never for a GPTQ plan."""
    from moeviz.store import RunRecord, RunStore, plan_key

    store = RunStore(tmp_path / "runs.sqlite")
    old = {"pruning": {"metric": "wanda", "sparsity": 0.5}, "quant": {"bits": 4, "group_size": 128}, "name": "old"}
    run_id = store.add_run(RunRecord(name="old", model_fingerprint="m", plan=old, metrics={"perplexity": 12.0},
                                     calibration_fingerprint="c", eval_fingerprint="e"))
    same = CompressionPlan(pruning=PruningSettings(metric="wanda", sparsity=0.5), quant=QuantSettings(bits=4))
    assert plan_key(old) == plan_key(same.to_dict())
    assert store.find_run("m", same.to_dict(), "c", "e").id == run_id
    gptq = CompressionPlan(pruning=PruningSettings(metric="wanda", sparsity=0.5), quant=QuantSettings(bits=4, method="gptq"))
    assert store.find_run("m", gptq.to_dict(), "c", "e") is None
    assert store.find_run("m", CompressionPlan.from_dict({**same.to_dict(), "percdamp": 0.1}).to_dict(), "c", "e") is None


def test_old_metric_mask_with_gptq_is_compensated_from_the_base_weights(loaded_tiny):
    """Wanda's mask + GPTQ: the mask stays fixed and OBS compensates the pruning *and* the rounding, i.e.
    each expert projection is `sparsegpt_prune(base W, H, mask=Wanda's mask, quant=…)` on its own Hessian
    (not a GPTQ of the already-zeroed weights, which would compensate the rounding only)."""
    from moeviz.calibration import calibrate
    from moeviz.compression.obs import QuantSpec, sparsegpt_prune

    lm = loaded_tiny("mixtral")
    samples = tokenize_documents(DOCS, lm.tokenizer, 16, 32)
    comp = Compressor(lm, calibrate(lm, samples, batch_size=4))
    plan = CompressionPlan(pruning=PruningSettings(metric="wanda", sparsity=0.5),
                           quant=QuantSettings(bits=4, group_size=-1, method="gptq"))
    record: dict = {}
    result = compress_second_order(comp, resolve_plan(plan, lm.layers, comp.stats), samples, batch_size=4,
                                   hessians=record)
    assert not result.warnings  # enough tokens per expert: no extra damping below
    cm = comp.apply(plan, samples, keep_masks=True)
    spec = QuantSpec(4, -1, True)
    checked = 0
    for layer, base in zip(cm.layers, lm.layers):
        for e in range(layer.num_experts):
            if (layer.index, e, "in") not in record:
                continue
            for projs, h in ((["gate", "up"], "in"), (["down"], "down")):
                W = torch.cat([base.weight(p)[e] for p in projs]).float()
                keep = torch.cat([cm.masks[f"{layer.index}.{p}"][e] for p in projs])
                want = sparsegpt_prune(W, record[(layer.index, e, h)], None, mask=keep, blocksize=plan.obs_blocksize,
                                       percdamp=plan.percdamp, quant=spec).weight
                got = torch.cat([layer.weight(p)[e] for p in projs])
                torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
                checked += 1
    assert checked >= 8


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_routed_inputs_held_for_a_group_of_experts_at_a_time_give_the_same_result(family, loaded_tiny, monkeypatch):
    """Above ROUTED_INPUT_BYTES of routed inputs per layer, the experts are compressed in groups (the layer
    runs once per group, only the group's inputs kept): bit-identical tensors and masks, bounded memory."""
    import moeviz.compression.second_order as so
    from moeviz.calibration.hessians import RoutedInputs

    lm = loaded_tiny(family)
    samples = tokenize_documents(DOCS, lm.tokenizer, 8, 16)
    plan = CompressionPlan(pruning=PruningSettings(metric="sparsegpt", sparsity=0.5),
                           quant=QuantSettings(bits=4, group_size=-1, method="gptq"), removed_experts=[(0, 1)])
    resolved = resolve_plan(plan, lm.layers, None)
    whole = compress_second_order(Compressor(lm, None), resolved, samples)
    held = []

    class Spy(RoutedInputs):
        def __call__(self, e, *args):
            super().__call__(e, *args)
            held.append(sum(bool(x) for x in self.x))  # experts with inputs held now

    monkeypatch.setattr(so, "RoutedInputs", Spy)
    monkeypatch.setattr(so, "ROUTED_INPUT_BYTES", 1)  # one expert per group
    assert [len(g) for g in so.expert_groups(lm.layers[0], samples.n_tokens, 4)] == [1] * lm.layers[0].num_experts
    grouped = compress_second_order(Compressor(lm, None), resolved, samples)
    assert held and max(held) == 1
    assert whole.tensors.keys() == grouped.tensors.keys() and whole.masks.keys() == grouped.masks.keys()
    for l in whole.tensors:
        for n in whole.tensors[l]:
            assert torch.equal(whole.tensors[l][n], grouped.tensors[l][n]), (l, n)
    assert all(torch.equal(whole.masks[k], grouped.masks[k]) for k in whole.masks)


def test_second_order_cache_is_bounded_by_bytes(loaded_tiny):
    """Each cached result is a copy of the touched experts (+ masks): the Compressor drops older ones to stay
    under second_order_cache_bytes, always keeping the newest."""
    lm = loaded_tiny("mixtral")
    samples = tokenize_documents(DOCS, lm.tokenizer, 8, 16)
    comp = Compressor(lm, None)
    plans = [CompressionPlan(pruning=PruningSettings(metric="sparsegpt", sparsity=s)) for s in (0.3, 0.5, 0.7)]
    first = comp.second_order(plans[0], samples)
    assert first.nbytes() == sum(t.numel() * t.element_size() for d in first.tensors.values() for t in d.values()) + \
        sum(m.numel() for m in first.masks.values()) > 0
    comp.second_order_cache_bytes = int(first.nbytes() * 2.5)  # room for two results
    for plan in plans[1:]:
        comp.second_order(plan, samples)
    assert len(comp._second_order) == 2 and comp.second_order(plans[2], samples) is list(comp._second_order.values())[-1]
    comp.second_order_cache_bytes = 1  # not even one: the newest is still kept
    comp.second_order(plans[0], samples)
    assert len(comp._second_order) == 1


# ---------------------------------------------------------------------------------------------- review fixes
def test_second_order_is_true_only_when_sparsegpt_prunes_or_gptq_quantizes(loaded_tiny):
    """plan.second_order() says whether SparseGPT prunes / GPTQ quantizes some expert (including overrides),
    never False where Compressor.apply takes the second-order path, and False where it compresses nothing."""
    from moeviz.compression.plan import Override

    lm = loaded_tiny("mixtral")
    samples = tokenize_documents(DOCS, lm.tokenizer, 8, 16)
    S, G = "sparsegpt", "gptq"
    cases = [  # (plan, second_order expected)
        (CompressionPlan(pruning=PruningSettings(metric=S), quant=QuantSettings(method=G)), False),
        (CompressionPlan(pruning=PruningSettings(metric=S), quant=QuantSettings(bits=4)), False),  # RTN
        (CompressionPlan(pruning=PruningSettings(metric="magnitude", sparsity=0.5), quant=QuantSettings(method=G)),
         False),  # GPTQ at 16 bits
        (CompressionPlan(pruning=PruningSettings(metric=S, sparsity=0.5)), True),
        (CompressionPlan(pruning=PruningSettings(metric=S, structure="2:4")), True),
        (CompressionPlan(pruning=PruningSettings(metric=S), overrides=[Override(1, 3, sparsity=0.5)]), True),
        (CompressionPlan(quant=QuantSettings(bits=4, method=G)), True),
        (CompressionPlan(quant=QuantSettings(method=G), overrides=[Override(0, bits=4)]), True),
        (CompressionPlan(pruning=PruningSettings(metric=S), quant=QuantSettings(method=G),
                         overrides=[Override(0, 2, bits=8)]), True),
    ]
    comp = Compressor(lm, None)
    for plan, expected in cases:
        assert plan.second_order() == expected, plan
        cm = comp.apply(plan, samples)
        assert (cm.second_order is not None) == expected, plan
        if not expected:
            comp.apply(plan)  # the usual path: no calibration windows needed
    # Conservative, never wrong the dangerous way: every layer overridden back to 16 bits still says True.
    undone = CompressionPlan(quant=QuantSettings(bits=4, method=G), overrides=[Override(l, bits=16) for l in range(len(lm.layers))])
    assert undone.second_order() and comp.apply(undone).second_order is None


def test_refit_is_refused_with_gptq_and_above_its_size_limit(loaded_tiny, monkeypatch):
    import moeviz.compression.second_order as so
    from moeviz.compression.second_order import REFIT_MAX_COLUMNS, check_refit_cost

    with pytest.raises(PlanError, match="refit.*gptq"):
        CompressionPlan(pruning=PruningSettings(metric="sparsegpt", sparsity=0.5),
                        quant=QuantSettings(bits=4, method="gptq"), refit=True).validate()
    from moeviz.compression.plan import Override
    with pytest.raises(PlanError, match="refit"):  # GPTQ through an override only
        CompressionPlan(pruning=PruningSettings(metric="sparsegpt", sparsity=0.5), quant=QuantSettings(method="gptq"),
                        overrides=[Override(0, 1, bits=3)], refit=True).validate()
    # GPTQ quantizing nothing, or RTN after the refit: allowed
    CompressionPlan(pruning=PruningSettings(metric="sparsegpt", sparsity=0.5), quant=QuantSettings(method="gptq"),
                    refit=True).validate()
    CompressionPlan(pruning=PruningSettings(metric="sparsegpt", sparsity=0.5), quant=QuantSettings(bits=4),
                    refit=True).validate()

    class Layer:  # shapes only: 4 experts of [8, 2048] gate rows
        index, path, num_experts = 0, "model.layers.0.mlp", 4

        def projections(self):
            return ["gate"]

        def weight(self, p):
            return torch.empty(4, 8, 2048, device="meta")

    plan = CompressionPlan(pruning=PruningSettings(metric="sparsegpt", sparsity=0.5, projections=["gate"]), refit=True)
    removed = np.zeros((1, 4), dtype=bool)
    check_refit_cost(plan, [Layer()], np.full((1, 4), 0.5), removed)  # 1024 kept columns: at the limit
    with pytest.raises(PlanError, match=r"refit: .*keeps 1229 of its 2048 columns.*limit 1024.*floating-point"):
        check_refit_cost(plan, [Layer()], np.array([[0.5, 0.4, 0.5, 0.5]]), removed)
    check_refit_cost(plan, [Layer()], np.array([[0.5, 0.4, 0.5, 0.5]]), np.array([[False, True, False, False]]))
    check_refit_cost(CompressionPlan(pruning=plan.pruning), [Layer()], np.full((1, 4), 0.1), removed)  # refit off
    assert REFIT_MAX_COLUMNS == 1024
    # Through Compressor.apply, before any Hessian is collected (tiny rows: a lowered limit)
    lm = loaded_tiny("mixtral")
    samples = tokenize_documents(DOCS, lm.tokenizer, 4, 16)
    monkeypatch.setattr(so, "REFIT_MAX_COLUMNS", 4)
    monkeypatch.setattr(so, "capture_decoder_inputs", lambda *a, **k: pytest.fail("ran a forward before refusing"))
    with pytest.raises(PlanError, match="refit"):
        Compressor(lm, None).apply(CompressionPlan(pruning=PruningSettings(metric="sparsegpt", sparsity=0.5), refit=True),
                                   samples)


def test_act_order_applies_to_an_old_metric_mask_with_gptq(loaded_tiny):
    """magnitude's fixed mask + GPTQ act-order: each expert projection is
    `sparsegpt_prune(base W, H, mask=…, quant=…, act_order=True)` (not silently the column order), the
    mask holds and every weight lies on the grid the compressed model keeps. SparseGPT's own N:M with
    GPTQ act-order is refused (its groups are consecutive columns)."""
    from moeviz.compression.obs import QuantSpec, sparsegpt_prune
    from moeviz.compression.quantize import quantize_on_grid

    lm = loaded_tiny("mixtral")
    samples = tokenize_documents(DOCS, lm.tokenizer, 16, 32)
    comp = Compressor(lm, None)
    plan = CompressionPlan(pruning=PruningSettings(metric="magnitude", sparsity=0.5),
                           quant=QuantSettings(bits=3, group_size=8, symmetric=False, method="gptq"), act_order=True)
    record: dict = {}
    compress_second_order(comp, resolve_plan(plan, lm.layers, None), samples, batch_size=4, hessians=record)
    cm = comp.apply(plan, samples, keep_masks=True)
    plain = comp.apply(CompressionPlan.from_dict({**plan.to_dict(), "act_order": False}), samples)
    spec = QuantSpec(3, 8, False)
    checked = 0
    for layer, base, other in zip(cm.layers, lm.layers, plain.layers):
        for p in layer.projections():
            grid, w = cm.grids[f"{layer.index}.{p}"], layer.weight(p)
            assert torch.equal(quantize_on_grid(w, grid.scales, grid.zero_points, 3), w)
            assert bool((w[~cm.masks[f"{layer.index}.{p}"]] == 0).all())
        assert not torch.equal(layer.weight("up"), other.weight("up"))
        for e in range(layer.num_experts):
            if (layer.index, e, "in") not in record or record[(layer.index, e, "in")].shape[0] == 0:
                continue
            W = torch.cat([base.weight(p)[e] for p in ("gate", "up")]).float()
            keep = torch.cat([cm.masks[f"{layer.index}.{p}"][e] for p in ("gate", "up")])
            if any(w_["expert"] == e and w_["layer"] == layer.index for w_ in cm.second_order["warnings"]):  # damped more
                continue
            want = sparsegpt_prune(W, record[(layer.index, e, "in")], None, mask=keep, blocksize=plan.obs_blocksize,
                                   percdamp=plan.percdamp, quant=spec, act_order=True).weight
            got = torch.cat([layer.weight(p)[e] for p in ("gate", "up")])
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
            checked += 1
    assert checked >= 4
    with pytest.raises(PlanError, match="act_order"):
        CompressionPlan(pruning=PruningSettings(metric="sparsegpt", structure="2:4"),
                        quant=QuantSettings(bits=4, method="gptq"), act_order=True).validate()
    CompressionPlan(pruning=PruningSettings(metric="magnitude", structure="2:4"),  # a fixed N:M mask: fine
                    quant=QuantSettings(bits=4, method="gptq"), act_order=True).validate()
