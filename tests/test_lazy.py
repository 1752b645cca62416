"""moeviz.compression.lazy: lazy per-expert compression equals the materialised model (also offloaded,
transposed layouts, export), the runtime modules instead of patched forwards, and its memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rss_scripts import preamble, skip_without_disk
from tiny_models import FAMILIES

from moeviz.calibration.collect import calibrate
from moeviz.compression import threshold_table
from moeviz.compression.apply import Compressor
from moeviz.compression.plan import CompressionPlan, Override, PruningSettings, QuantSettings
from moeviz.data import tokenize_documents
from moeviz.evaluation import EvalSettings, Evaluator
from moeviz.models.runtime import experts_runtime, patched_forwards
from moeviz.recovery.distill import RecoverySettings, recover
from documents import varied_documents

ALL = list(FAMILIES)
DOCS = varied_documents(12, 8)


def _removal(family, n_layers):
    # DeepSeek-V3 group routing: one expert from each of the 2 groups of 4.
    return [(l, e) for l in range(n_layers) for e in ((1, 6) if family == "deepseek_v3" else (2,))]


def _plans(family, lm):
    n = len(lm.layers)
    mixed = CompressionPlan(
        pruning=PruningSettings(metric="moe_pruner", sparsity=0.5),
        quant=QuantSettings(bits=16, group_size=-1),
        overrides=[Override(layer=0, expert=1, bits=4), Override(layer=n - 1, expert=0, sparsity=0.0)],
        activation_bits=8,
    )
    if lm.info.expert_removal:
        mixed.removed_experts = _removal(family, n)
    nm = CompressionPlan(pruning=PruningSettings(metric="wanda", structure="2:4"), quant=QuantSettings(bits=4, group_size=8))
    return dict(mixed=mixed, nm=nm, magnitude=CompressionPlan(pruning=PruningSettings(sparsity=0.3)))


@pytest.mark.parametrize("family", ALL)
def test_lazy_evaluation_equals_the_materialised_model(family, loaded_tiny, monkeypatch):
    """Same logits (<= 1e-5), same masks, same expert table, and no expert tensor replaced."""
    from moeviz.compression import steps

    monkeypatch.setattr(steps, "BLOCK_ELEMENTS", 40)  # the lazy path prunes rows in several blocks here too
    lm = loaded_tiny(family)
    samples = tokenize_documents(DOCS, lm.tokenizer, 4, 16)
    stats = calibrate(lm, samples, batch_size=4)
    comp = Compressor(lm, stats)
    for name, plan in _plans(family, lm).items():
        eager = comp.apply(plan, keep_masks=True)
        lazy = comp.apply(plan, lazy=True)
        assert lazy.lazy and not eager.lazy
        assert not any(".experts." in t for t in lazy.replaced_tensors), name  # nothing materialised
        for la, lb in zip(lazy.layers, lm.layers):  # the lazy copy computes from the base's own tensors
            assert la.experts.down_proj is lb.experts.down_proj
        with torch.no_grad():
            want = eager.model(input_ids=samples.input_ids, use_cache=False).logits
            got = lazy.model(input_ids=samples.input_ids, use_cache=False).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{family} {name}")
        assert [e.zero_fraction for e in lazy.experts] == [e.zero_fraction for e in eager.experts]
        for layer in lazy.layers:
            provider = experts_runtime(layer.experts).weights
            for e in range(layer.num_experts):
                for proj, keep in provider.masks(layer.experts, e).items():
                    want_keep = eager.masks.get(f"{layer.index}.{proj}")
                    want_keep = torch.ones_like(keep) if want_keep is None else want_keep[e]
                    assert torch.equal(keep, want_keep), (family, name, layer.index, e, proj)
                w_in, w_out = provider(layer.experts, e)
                ref = eager.layers[layer.index].experts
                assert torch.equal(w_out, ref.down_proj[e])
                assert torch.equal(w_in, (ref.gate_up_proj if layer.has_gate else ref.up_proj)[e])


def test_lazy_evaluation_gives_the_same_result(loaded_tiny):
    lm = loaded_tiny("qwen3_moe")
    samples = tokenize_documents(DOCS, lm.tokenizer, 4, 16)
    stats = calibrate(lm, samples, batch_size=4)
    evaluator = Evaluator(lm, samples, EvalSettings(measure_latency=False, batch_size=2))
    plan = CompressionPlan(pruning=PruningSettings(metric="wanda", sparsity=0.5), removed_experts=[(0, 3), (1, 3)])
    a = evaluator.evaluate(Compressor(lm, stats).apply(plan)).to_dict()
    b = evaluator.evaluate(Compressor(lm, stats).apply(plan, lazy=True)).to_dict()
    assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-5)
    for da, db in zip(a["drift"], b["drift"]):
        assert da == pytest.approx(db, rel=1e-4, abs=1e-6)
    assert a["utilization"] == b["utilization"] and a["compression"] == b["compression"]
    timed = Evaluator(lm, samples, EvalSettings(batch_size=2, latency_prompt_tokens=8, latency_decode_tokens=1,
                                                latency_repeats=1))
    r = timed.evaluate(Compressor(lm, stats).apply(plan, lazy=True))  # timing a lazy model would time compression
    assert r.latency_measured is None and "lazily compressed" in r.latency_unavailable


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_nothing_monkey_patches_forward(family, loaded_tiny):
    """After calibrate, apply (eager and lazy), evaluate and recover, no module of the base or of a
    compressed copy has a `forward` in its instance dict: runtime modules carry the behaviour."""
    lm = loaded_tiny(family)
    samples = tokenize_documents(DOCS, lm.tokenizer, 4, 16)
    stats = calibrate(lm, samples, batch_size=4)
    plan = CompressionPlan(pruning=PruningSettings(metric="wanda", sparsity=0.5), activation_bits=8,
                           removed_experts=_removal(family, len(lm.layers)))
    comp = Compressor(lm, stats)
    eager, lazy = comp.apply(plan), comp.apply(plan, lazy=True)
    evaluator = Evaluator(lm, samples, EvalSettings(measure_latency=False, batch_size=2))
    evaluator.evaluate(eager)
    evaluator.evaluate(lazy)
    recovered, _ = recover(comp, plan, samples, RecoverySettings(steps=1, batch_size=2))
    for model in (lm.model, eager.model, lazy.model, recovered.model):
        assert patched_forwards(model) == []
    # ...and the runtime state is typed, on the copies only.
    assert all(experts_runtime(l.experts) is None for l in lm.layers)
    assert all(experts_runtime(l.experts).input_transform is not None for l in lazy.layers)
    assert all(not experts_runtime(l.experts).observers for l in lazy.layers + recovered.layers)


MEMORY_SCRIPT = preamble() + r"""
lm = moeviz.load_model(folder)
ids = torch.randint(3, 128, (4, 64), generator=torch.Generator().manual_seed(0))
samples = TokenSamples(ids, ["text"] * 4, "random", 0, "random-4x64", ["text"])
stats = moeviz.calibrate(lm, samples, batch_size=4)
evaluator = Evaluator(lm, samples, EvalSettings(measure_latency=False, batch_size=4))
gc.collect()
after_load = rss()
peak = [after_load]  # sampled every 2 ms below
stop = False
def sample():
    while not stop:
        peak[0] = max(peak[0], rss()); time.sleep(0.002)
t = threading.Thread(target=sample); t.start()
plan = CompressionPlan(pruning=PruningSettings(metric=sys.argv[2], sparsity=0.5))
cm = Compressor(lm, stats).apply(plan, lazy=sys.argv[3] == "lazy")
evaluator.evaluate(cm)
stop = True; t.join()
shutil.rmtree(folder)
print(json.dumps(dict(params=params, after_load=after_load, peak=peak[0])))
"""


def _memory(mode: str) -> dict:
    skip_without_disk()
    # A fixed mmap threshold: glibc otherwise raises it after each large free and keeps later
    # per-expert temporaries in its heap, so RSS would count memory freed but not returned.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]),
               MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(Path(__file__).parent), "moe_pruner", mode],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_lazy_evaluation_of_a_half_pruned_plan_stays_within_1_3x_the_loaded_rss():
    """A ~100 M-parameter 2-layer model (float32, ~400 MB): evaluating a 50 % MoE-Pruner plan lazily
    must not materialise a compressed copy (RSS is sampled in its own process while apply + evaluate run)."""
    r = _memory("lazy")
    assert 90e6 < r["params"] < 200e6
    assert r["peak"] <= 1.3 * r["after_load"], r


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])
def test_export_of_a_lazy_model_equals_the_materialised_export(family, loaded_tiny, tmp_path):
    from safetensors.torch import load_file

    from moeviz.export import export_model

    lm = loaded_tiny(family)
    samples = tokenize_documents(DOCS, lm.tokenizer, 4, 16)
    stats = calibrate(lm, samples, batch_size=4)
    plan = CompressionPlan(pruning=PruningSettings(metric="wanda", sparsity=0.5), quant=QuantSettings(bits=4, group_size=8),
                           removed_experts=_removal(family, len(lm.layers)))
    comp = Compressor(lm, stats)
    a = export_model(lm, comp.apply(plan), tmp_path / "eager")
    b = export_model(lm, comp.apply(plan, lazy=True), tmp_path / "lazy")
    sa, sb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_offloaded_model_gives_the_same_numbers(family, tiny_model_dirs, tmp_path):
    """accelerate offload forced by `max_memory` (every weight on disk, loaded around each module's
    forward): load -> calibrate -> apply (lazy and materialised) -> evaluate -> export give the same
    numbers and the same files as the model in memory."""
    from safetensors.torch import load_file

    from moeviz.export import export_model
    from moeviz.models import load_model

    folder = tiny_model_dirs[family]
    a = load_model(folder)
    b = load_model(folder, max_memory={"cpu": "60KB"}, offload_folder=tmp_path / "offload")
    assert all(p.is_meta for p in b.model.parameters())  # really offloaded
    assert [l.routing_rule for l in a.layers] == [l.routing_rule for l in b.layers]
    samples = tokenize_documents(DOCS, a.tokenizer, 4, 16)
    sa, sb = calibrate(a, samples, batch_size=2), calibrate(b, samples, batch_size=2)
    for la, lb in zip(sa.layers, sb.layers):
        assert torch.equal(la.routed_counts, lb.routed_counts)
        torch.testing.assert_close(la.input_sq_weighted, lb.input_sq_weighted, rtol=1e-6, atol=0)
    plan = CompressionPlan(pruning=PruningSettings(metric="moe_pruner", sparsity=0.5), router_bits=8,
                           removed_experts=_removal(family, len(a.layers)))
    settings = EvalSettings(measure_latency=False, batch_size=2)
    ea, eb = Evaluator(a, samples, settings), Evaluator(b, samples, settings)
    assert ea.base.loss == eb.base.loss
    for lazy in (True, False):
        ra = ea.evaluate(Compressor(a, sa).apply(plan, lazy=lazy))
        rb = eb.evaluate(Compressor(b, sb).apply(plan, lazy=lazy))
        assert ra.perplexity == pytest.approx(rb.perplexity, rel=1e-6) and ra.drift == rb.drift
        assert ra.compression == rb.compression
    out_a = export_model(a, Compressor(a, sa).apply(plan, lazy=True), tmp_path / "a")
    out_b = export_model(b, Compressor(b, sb).apply(plan, lazy=True), tmp_path / "b")
    ta, tb = load_file(out_a / "model.safetensors"), load_file(out_b / "model.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_cli_evaluates_an_offloaded_model(tiny_model_dirs, tmp_path, capsys):
    from moeviz.cli import main

    data = tmp_path / "cal.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"calibration sentence {i} about experts. " * 6}) for i in range(30)))
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"pruning": {"metric": "wanda", "sparsity": 0.5}}))
    common = ["--model", str(tiny_model_dirs["mixtral"]), "--data", str(data), "--samples", "4", "--seq-len", "16",
              "--eval-data", str(data), "--eval-seq-len", "16", "--eval-samples", "4", "--no-latency",
              "--plan", str(plan), "--no-store"]
    assert main(["evaluate", *common]) == 0
    in_memory = capsys.readouterr().out
    assert main(["evaluate", *common, "--max-memory", "cpu=60KB", "--offload-folder", str(tmp_path / "off")]) == 0
    assert capsys.readouterr().out == in_memory and "perplexity" in in_memory
    assert any((tmp_path / "off").iterdir())  # the weights really went to disk


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_routing_only_pass_gives_the_same_routing_statistics(family, loaded_tiny):
    """Evaluation's pass (`expert_stats=False`: no expert observer, so the family's own experts forward
    runs on a base / materialised model) gives the routing statistics of the full calibration pass."""
    lm = loaded_tiny(family)
    samples = tokenize_documents(DOCS, lm.tokenizer, 4, 16)
    full = calibrate(lm, samples, batch_size=2)
    routing = calibrate(lm, samples, batch_size=2, expert_stats=False)
    for a, b in zip(full.layers, routing.layers):
        assert torch.equal(a.routed_counts, b.routed_counts) and torch.equal(a.top1_counts, b.top1_counts)
        assert torch.equal(a.record_topk, b.record_topk)
        torch.testing.assert_close(a.record_probs, b.record_probs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.coactivation, b.coactivation)
        assert float(b.input_sq.abs().sum()) == 0 and float(a.input_sq.sum()) > 0  # really no expert observer


def test_lazy_evaluation_compresses_each_expert_once(loaded_tiny, monkeypatch):
    """Evaluating a lazy model runs its windows in as few batches as the memory budget allows, so
    each reached expert is compressed once per evaluation, not once per batch of `batch_size`; a
    small `lazy_batch_tokens` gives more batches and the same result."""
    from moeviz.compression.lazy import LazyExpertWeights

    lm = loaded_tiny("mixtral")
    samples = tokenize_documents(DOCS, lm.tokenizer, 4, 16)
    assert samples.n_samples >= 4
    stats = calibrate(lm, samples, batch_size=4)
    plan = CompressionPlan(pruning=PruningSettings(metric="wanda", sparsity=0.5))
    calls: list[tuple[int, int]] = []
    real = LazyExpertWeights.__call__  # the forward asks for each expert's weights through it
    monkeypatch.setattr(LazyExpertWeights, "__call__",
                        lambda self, experts, e: calls.append((id(self), e)) or real(self, experts, e))
    one = Evaluator(lm, samples, EvalSettings(measure_latency=False, batch_size=1)).evaluate(
        Compressor(lm, stats).apply(plan, lazy=True))
    assert calls and len(calls) == len(set(calls))  # each (layer, expert) once
    calls.clear()
    many = Evaluator(lm, samples, EvalSettings(measure_latency=False, batch_size=1, lazy_batch_tokens=16)).evaluate(
        Compressor(lm, stats).apply(plan, lazy=True))
    assert len(calls) > len(set(calls))  # one window per batch: experts compressed again in every batch
    assert one.perplexity == pytest.approx(many.perplexity, rel=1e-5)
    assert one.utilization == many.utilization


def test_transposed_experts_are_pruned_in_a_row_major_copy_with_the_same_result(loaded_tiny, monkeypatch):
    """GPT-OSS stores experts [E, in, out]; the lazy path (reused buffers) prunes a row-major copy
    (`steps._rowmajor_copy`): the weights and masks equal the materialised model's bit for bit."""
    from moeviz.compression import steps
    from moeviz.compression.scratch import thread_scratch

    monkeypatch.setattr(steps, "BLOCK_ELEMENTS", 40)  # several row blocks
    monkeypatch.setattr(steps, "STRIP", 5)  # several copy strips, the last one shorter
    lm = loaded_tiny("gpt_oss")
    samples = tokenize_documents(DOCS, lm.tokenizer, 4, 16)
    stats = calibrate(lm, samples, batch_size=4)
    comp = Compressor(lm, stats)
    plan = CompressionPlan(pruning=PruningSettings(metric="moe_pruner", sparsity=0.5),
                           overrides=[Override(layer=0, expert=1, sparsity=0.0)])
    eager = comp.apply(plan, keep_masks=True)
    lazy = comp.apply(plan, lazy=True)
    # Empty threshold tables: the first use of each expert takes the row-major route (with tables in place it
    # would prune in the stored layout, the next test).
    monkeypatch.setattr(threshold_table, "TABLES", threshold_table.TableCache())
    checked = 0
    for layer in lazy.layers:
        assert layer.transposed
        provider = experts_runtime(layer.experts).weights
        ref = eager.layers[layer.index].experts
        for e in range(layer.num_experts):
            with torch.no_grad():  # the forward's path: this thread's scratch buffers
                w_in, w_out = provider(layer.experts, e)
                if provider.settings.sparsity[e] > 0:  # computed in the row-major buffer
                    assert w_in.stride(-2) == 1 and w_out.stride(-2) == 1
                    checked += 1
                assert torch.equal(w_in, ref.gate_up_proj[e]) and torch.equal(w_out, ref.down_proj[e])
                got = {}
                provider.compressed(layer.experts, e, got, scratch=thread_scratch())
            for proj, keep in got.items():
                assert torch.equal(keep[0], eager.masks[f"{layer.index}.{proj}"][e]), (layer.index, e, proj)
    assert checked > 0


@pytest.mark.parametrize("metric,ties", [("moe_pruner", False), ("wanda", False), ("magnitude", True)])
def test_transposed_experts_with_known_thresholds_are_pruned_in_the_stored_layout(metric, ties, loaded_tiny,
                                                                                   tiny_model_dirs, monkeypatch):
    """GPT-OSS, lazy path, threshold tables in place (built by a first apply): each expert's gate_up / down is
    pruned in one fused pass over the stored [in, out] layout (`steps._prune_stored`: thresholds per stored
    column, gate and up interleaved), with no row-major copy; the weights equal the materialised model's
    bit for bit, for a dense expert too. ties: expert weights rounded to a few values, so most rows have
    ties at their threshold (redone with the tie rule after the pass)."""
    from moeviz.compression import fused_prune
    from moeviz.models import load_model

    monkeypatch.setattr(threshold_table, "TABLES", threshold_table.TableCache())
    lm = loaded_tiny("gpt_oss")
    if ties:
        lm = load_model(tiny_model_dirs["gpt_oss"])  # a private copy to round
        with torch.no_grad():
            for layer in lm.layers:
                for name in ("gate_up_proj", "down_proj"):
                    w = getattr(layer.experts, name)
                    step = float(w.std()) / 2
                    w.copy_((w / step).round() * step)  # a few distinct non-zero magnitudes per row
    stats = calibrate(lm, tokenize_documents(DOCS, lm.tokenizer, 4, 16), batch_size=4)
    comp = Compressor(lm, stats)
    plan = CompressionPlan(pruning=PruningSettings(metric=metric, sparsity=0.5),
                           overrides=[Override(layer=0, expert=1, sparsity=0.0)])
    eager = comp.apply(plan)  # builds the tables
    calls = []
    real = fused_prune.prune_known_columns
    monkeypatch.setattr(fused_prune, "prune_known_columns", lambda *a: calls.append(1) or real(*a))
    lazy = comp.apply(plan, lazy=True)
    for layer in lazy.layers:
        provider = experts_runtime(layer.experts).weights
        ref = eager.layers[layer.index].experts
        for e in range(layer.num_experts):
            with torch.no_grad():
                w_in, w_out = provider(layer.experts, e)
            if provider.settings.sparsity[e] > 0:
                assert w_in.stride(-1) == 1 and w_out.stride(-1) == 1  # the stored layout
            for got, want in ((w_in, ref.gate_up_proj[e]), (w_out, ref.down_proj[e])):
                assert torch.equal(got.view(torch.int16) if got.dtype == torch.bfloat16 else got, want
                                   if got.dtype != torch.bfloat16 else want.view(torch.int16)), (layer.index, e)
    assert len(calls) == 2 * sum(int((experts_runtime(l.experts).weights.settings.sparsity > 0).sum())
                                 for l in lazy.layers)
    if ties:  # the tie rule really ran
        assert any(bool(t.tie.any()) for t in threshold_table.TABLES._tables.values())


def test_materialised_and_exported_transposed_layers_equal_the_strided_steps(loaded_tiny, monkeypatch):
    """GPT-OSS ([E, in, out] storage): the materialised apply and export's `layer_tensors` prune row-major
    copies a few experts at a time (`steps._compress_transposed`), written back in strips; weights and masks
    equal, bit for bit, the steps run on strided views of a clone of the whole layer (the reference)."""
    import numpy as np

    from moeviz.compression import steps
    from moeviz.compression.resolve import resolve_plan

    monkeypatch.setattr(steps, "BLOCK_ELEMENTS", 40)  # several row blocks
    monkeypatch.setattr(steps, "STRIP", 5)  # several strips, the last one shorter
    monkeypatch.setattr(steps, "ROWMAJOR_CHUNK_BYTES", 1)  # one expert per row-major round
    lm = loaded_tiny("gpt_oss")
    samples = tokenize_documents(DOCS, lm.tokenizer, 4, 16)
    stats = calibrate(lm, samples, batch_size=4)
    comp = Compressor(lm, stats)
    plan = CompressionPlan(pruning=PruningSettings(metric="moe_pruner", sparsity=0.5),
                           overrides=[Override(layer=0, expert=1, sparsity=0.0), Override(layer=1, expert=2, bits=4),
                                      Override(layer=1, expert=3, sparsity=0.7)],
                           removed_experts=[(0, 2)])
    resolved = resolve_plan(plan, lm.layers, stats)
    rounds = []  # experts per row-major copy: the materialising paths take the row-major route
    rowmajor_copy = steps._rowmajor_copy
    monkeypatch.setattr(steps, "_rowmajor_copy", lambda part, buf: rounds.append(len(part)) or rowmajor_copy(part, buf))
    eager = comp.apply(plan, keep_masks=True)
    assert rounds and set(rounds) == {1}
    lazy = comp.apply(plan, lazy=True)
    for layer in lm.layers:
        assert layer.transposed
        s = resolved.layer(layer)
        sel = np.arange(layer.num_experts)
        norms = steps.layer_norms(stats.layers[layer.index], s.metric, sel, "cpu")
        # Reference: the steps on strided [E, out, in] views of clones of the stored tensors.
        want = {n: getattr(layer.experts, n).detach()[: layer.num_experts].clone() for n in s.touched_names(layer)}
        want_masks = {}
        steps.prune(layer, want, sel, s, norms, want_masks)
        steps.quantize(layer, want, sel, s)
        steps.remove(layer, want, sel, s)
        assert set(want) == {"gate_up_proj", "down_proj"} and set(want_masks) == {"gate", "up", "down"}
        got_layer = eager.layers[layer.index].experts
        rounds.clear()
        # Empty threshold tables: the row-major route (with the tables the first call builds, a second call
        # prunes in the stored layout: `_prune_stored`, also checked).
        monkeypatch.setattr(threshold_table, "TABLES", threshold_table.TableCache())
        provider = experts_runtime(lazy.layers[layer.index].experts).weights
        exported = provider.layer_tensors(layer.experts, chunk_bytes=1)
        assert len(rounds) >= layer.num_experts - 1  # one per pruned expert and pruned fused tensor
        rounds.clear()
        exported_stored = provider.layer_tensors(layer.experts, chunk_bytes=1)
        assert not rounds  # no row-major copy: every pruned expert had its thresholds in the tables
        for name, w in want.items():
            assert torch.equal(getattr(got_layer, name), w), (layer.index, name)  # materialised apply
            assert torch.equal(exported[name], w), (layer.index, name)  # export of a lazy model
            assert torch.equal(exported_stored[name], w), (layer.index, name)
        for proj, keep in want_masks.items():
            assert torch.equal(eager.masks[f"{layer.index}.{proj}"], keep), (layer.index, proj)
        assert (want["down_proj"] == 0).any() and not torch.equal(want["down_proj"], getattr(layer.experts, "down_proj"))
