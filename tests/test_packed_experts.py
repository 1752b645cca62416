"""Packed low-bit experts (moeviz.compression.packed): the packed codes are moeviz's own grid, the kernels
compute what the codes say, the packed model's logits stay within the stated bound of the reference on
every family with a kernel path, settings without a kernel run dense and say so, the base is untouched,
and an evaluation times the packed model.

The logits bound. On these float32 models the packed projections hold exactly the reference's values
(codes × float32 scales: checked weight by weight below), so the only difference is the order in which
the kernels accumulate (int8 / int4 kernels sum blocks of the dot product in their own order; float32
round-off ~K·2⁻²⁴ relative per dot product, K ≤ 48 here) propagated through two layers: the bound is
|Δ logits| ≤ 1e-4 · max|logits| (observed ~1e-6, ~100× headroom). In bf16 the scales are rounded to bf16
(2⁻⁹ relative: about one more rounding of each weight than the reference's bf16(q·s)) and the kernels round
their outputs to bf16 like the reference, so against the exact quantized model (same codes and scales, float32)
the packed logits are at most twice as far as the bf16 reference's (relative RMS); checked here on a tiny
bf16 Mixtral and by `benchmarks/bench_kernels.py` on the demo and the OLMoE shape.
"""

import numpy as np
import pytest
import torch

from moeviz.compression import CompressionPlan
from moeviz.compression.apply import Compressor
from moeviz.compression.packed import (
    PackedExpertWeights, PackedLinear, dequantize, kernel_experts, kernel_problem, pack_codes, pack_compressed,
)
from moeviz.compression.quantize import codes_on_grid, quantize_codes, quantize_weight
from moeviz.models.runtime import experts_runtime
from tiny_models import FAMILIES

LOGITS_BOUND = 1e-4  # relative to max |logits|; see the module docstring


def _ids(lm, n=2, t=12):
    return torch.randint(3, lm.model.config.vocab_size, (n, t), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("bits,gs,sym", [(8, -1, True), (8, -1, False), (8, 32, True), (4, 32, True),
                                         (4, 64, False), (3, 32, True), (2, -1, False)])
def test_codes_are_the_grid_quantize_weight_rounds_to(bits, gs, sym):
    w = torch.randn(3, 16, 128, generator=torch.Generator().manual_seed(0))
    q = quantize_codes(w, bits, gs, sym)
    ref = quantize_weight(w, bits, gs, sym)
    assert torch.equal(q.scales, ref.scales)
    assert (q.codes == q.codes.round()).all()
    lo, hi = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if sym else (0, 2**bits - 1)
    assert q.codes.min() >= lo and q.codes.max() <= hi
    # brute force: codes × scale (− zero) per group, written out element by element for one row
    g = q.group_size
    row = torch.tensor([(q.codes[1, 2, j] - (0 if sym else q.zero_points[1, 2, j // g])) * q.scales[1, 2, j // g]
                        for j in range(128)])
    assert torch.equal(row, ref.dequantized[1, 2])
    # on its own grid, the dequantized weight comes back to the same codes (GPTQ's kept grid is read this way)
    again = codes_on_grid(ref.dequantized[1], ref.scales[1], None if sym else ref.zero_points[1], bits)
    assert torch.equal(again.codes, q.codes[1])


@pytest.mark.parametrize("bits,gs,sym", [(8, -1, True), (8, -1, False), (4, 32, True), (4, 128, False),
                                         (4, -1, True), (4, 512, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_kernel_computes_what_its_codes_say(bits, gs, sym, dtype):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(48, 1024, generator=g)
    q = quantize_codes(w, bits, gs, sym)
    p = pack_codes(q, dtype)
    assert isinstance(p, PackedLinear) and p.out_features == 48 and p.in_features == 1024
    x = torch.randn(5, 1024, generator=g).to(dtype)
    ref = x.double() @ dequantize(q).double().T
    got = p(x)
    assert got.dtype == dtype and got.shape == (5, 48)
    err = (got.double() - ref).abs().max() / ref.abs().max()
    # float32: exact values, another summation order; bf16: scales (2^-9) and the output rounded to bf16
    assert err < (1e-5 if dtype == torch.float32 else 2e-2), err
    if dtype == torch.float32:  # the identity recovers the packed weights themselves: the reference's values
        # (asymmetric int4 is (u - 8) s + (8 - z) s in the kernel: one float32 rounding from (u - z) s)
        deq = dequantize(q)
        assert torch.allclose(p(torch.eye(1024)).T, deq, rtol=0, atol=1e-6 * deq.abs().max().item())


def test_settings_without_a_kernel_are_refused_with_the_reason():
    w = torch.randn(8, 64)
    for q, why in [(quantize_codes(w, 8, 32), "one scale per channel"), (quantize_codes(w, 3, 32), "3-bit"),
                   (quantize_codes(torch.randn(8, 48), 4, 16), "groups of 32, 64, 128 or 256")]:
        with pytest.raises(Exception, match=why):
            pack_codes(q, torch.float32)
    assert kernel_problem(8, True, "cpu", torch.float32) is None
    assert kernel_problem(4, False, "cpu", torch.bfloat16) is None
    assert "3-bit" in kernel_problem(3, True, "cpu", torch.float32)


def _packed_weights_equal_reference(cm, pm):
    """Every packed projection holds the reference compressed weights (identity through the kernel)."""
    checked = 0
    for ref_layer, layer in zip(cm.layers, pm.layers):
        prov = experts_runtime(layer.experts).weights
        assert isinstance(prov, PackedExpertWeights)
        ref_rt = experts_runtime(ref_layer.experts)
        for e, entry in enumerate(prov.experts):
            if entry is None:
                continue
            if ref_rt is not None and ref_rt.weights is not None:
                ref = tuple(t.clone() for t in ref_rt.weights(ref_layer.experts, e))
            else:
                names = ("gate_up_proj" if ref_layer.has_gate else "up_proj", "down_proj")
                ref = tuple(getattr(ref_layer.experts, n)[e] for n in names)
            for p, r in zip(entry, ref):
                if isinstance(p, PackedLinear):
                    logical = r.mT if ref_layer.transposed else r
                    w = p(torch.eye(p.in_features, dtype=logical.dtype)).T  # [out, in]
                    assert torch.allclose(w, logical, rtol=0, atol=1e-6 * logical.abs().max().item())
                    checked += 1
    return checked


def assert_packed_within_bound(lm, ids) -> dict:
    """int8 per channel (every projection has a kernel whatever its width) on `lm`: the packed logits within
    LOGITS_BOUND of the reference's, every expert on the kernel; tests/test_all_families.py runs it on every
    MoE family of the installed transformers."""
    cm = Compressor(lm).apply(CompressionPlan.from_dict(dict(quant=dict(bits=8, group_size=-1))))
    pm = pack_compressed(cm)
    with torch.no_grad():
        ref, got = cm.model(input_ids=ids, use_cache=False).logits, pm.model(input_ids=ids, use_cache=False).logits
    err = (got - ref).abs().max().item()
    assert err <= LOGITS_BOUND * ref.abs().max().item(), err
    assert pm.report.kernels == {"int8 channel": sum(l.num_experts for l in lm.layers)}, pm.report.kernels
    return pm.report.kernels


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_logits_within_bound_on_every_family(family, loaded_tiny):
    lm = loaded_tiny(family)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    comp = Compressor(lm)
    ids = _ids(lm)
    # int8 per channel: every projection on the kernel; int4 per channel (kernel group 32 on the hidden size
    # 32 of gate_up; the down projection's 16-48 columns take no kernel group: dense, labelled), asymmetric
    for quant, lazy in [(dict(bits=8, group_size=-1), False), (dict(bits=4, group_size=-1, symmetric=False), True)]:
        cm = comp.apply(CompressionPlan.from_dict(dict(quant=quant)), lazy=lazy)
        pm = pack_compressed(cm)
        assert _packed_weights_equal_reference(cm, pm) > 0
        with torch.no_grad():
            ref, got = cm.model(input_ids=ids).logits, pm.model(input_ids=ids).logits
        err = (got - ref).abs().max().item()
        assert err <= LOGITS_BOUND * ref.abs().max().item(), (family, quant, err)
        r = pm.report
        n = sum(l.num_experts for l in lm.layers)
        if quant["bits"] == 8:
            assert r.kernels == {"int8 channel": n} and r.packed_experts == n and r.dense_experts == 0
            # the scales are moeviz's own, computed from the (here unpruned) base weights, not re-derived from
            # the dequantized ones
            layer, packed = lm.layers[0], experts_runtime(pm.layers[0].experts).weights.experts[1][0]
            w = layer.experts.gate_up_proj[1] if layer.has_gate else layer.experts.up_proj[1]
            own = quantize_codes(w.mT if layer.transposed else w, 8, -1).scales[:, 0]
            assert torch.equal(packed.scales, own.to(packed.scales.dtype))
            # per channel: int8 codes + one scale per row; the storage report charges an fp16 scale, these are fp32
            assert abs(r.resident_bytes / r.storage_bytes - 1) < 0.2
        else:
            assert r.packed_experts + r.dense_experts == n
            assert all(k.startswith("int4") for k in r.kernels)
    for k, v in lm.model.state_dict().items():  # the base is untouched
        assert torch.equal(v, before[k]), k


def test_no_kernel_settings_run_dense_labelled_and_match_the_reference(loaded_tiny):
    lm = loaded_tiny("mixtral")
    comp = Compressor(lm)
    ids = _ids(lm)
    plans = {"dense: 3-bit": dict(quant=dict(bits=3, group_size=-1)),
             "dense: unstructured sparsity": dict(pruning=dict(sparsity=0.5, metric="magnitude")),
             "int8 channel (sparsity not exploited)": dict(pruning=dict(sparsity=0.5, metric="magnitude"),
                                                           quant=dict(bits=8, group_size=-1))}
    for label, d in plans.items():
        cm = comp.apply(CompressionPlan.from_dict(d), lazy=True)
        assert kernel_experts(cm) == (0 if label.startswith("dense") else 8)
        pm = pack_compressed(cm)
        assert all(k.startswith(label) for k in pm.report.kernels), pm.report.kernels
        with torch.no_grad():
            ref, got = cm.model(input_ids=ids).logits, pm.model(input_ids=ids).logits
        assert (got - ref).abs().max() <= LOGITS_BOUND * ref.abs().max()
    # removed experts hold nothing; untouched experts are the base's tensors, counted dense
    d = dict(quant=dict(bits=8, group_size=-1), removed_experts=[[0, 1]],
             overrides=[dict(layer=1, expert=2, bits=16)])
    pm = pack_compressed(comp.apply(CompressionPlan.from_dict(d)))
    by = {(r["layer"], r["expert"]): r for r in pm.report.experts}
    assert by[(0, 1)]["kernel"] == "removed" and by[(0, 1)]["bytes"] == 0
    assert by[(1, 2)]["kernel"] == "dense (not compressed)"
    assert by[(1, 2)]["bytes"] == lm.layers[1].expert_param_count() * 4
    with pytest.raises(Exception, match="3-bit"):
        pack_compressed(comp.apply(CompressionPlan.from_dict(plans["dense: 3-bit"]), lazy=True), allow_dense=False)


def test_gptq_experts_are_packed_on_gptqs_kept_grid(loaded_tiny):
    import moeviz
    from moeviz.data import Document, tokenize_documents

    lm = loaded_tiny("mixtral")
    docs = [Document("The quick brown fox jumps over the lazy dog. " * 8, "prose")]
    cal = tokenize_documents(docs, lm.tokenizer, 8, 32, seed=0)
    stats = moeviz.calibrate(lm, cal)
    cm = Compressor(lm, stats).apply(CompressionPlan.from_dict(dict(quant=dict(bits=8, group_size=-1, method="gptq"))),
                                     cal)
    assert cm.grids
    pm = pack_compressed(cm)
    assert _packed_weights_equal_reference(cm, pm) == 2 * sum(l.num_experts for l in lm.layers)
    with torch.no_grad():
        ref, got = cm.model(input_ids=_ids(lm)).logits, pm.model(input_ids=_ids(lm)).logits
    assert (got - ref).abs().max() <= LOGITS_BOUND * ref.abs().max()


def test_evaluation_times_the_packed_model_and_keeps_quality_on_the_reference(loaded_tiny):
    from moeviz.evaluation import EvalSettings, Evaluator
    from moeviz.data import Document, tokenize_documents

    lm = loaded_tiny("olmoe")
    docs = [Document("The quick brown fox jumps over the lazy dog. " * 8, "prose")]
    samples = tokenize_documents(docs, lm.tokenizer, 4, 24, seed=0)
    ev = Evaluator(lm, samples, EvalSettings(latency_prompt_tokens=8, latency_decode_tokens=2, latency_repeats=1))
    comp = Compressor(lm)
    plan = CompressionPlan.from_dict(dict(quant=dict(bits=8, group_size=-1)))
    calls = []
    original = PackedLinear.__call__
    for lazy in (False, True):
        cm = comp.apply(plan, lazy=lazy)
        try:  # count the packed kernel calls: only the timed decode runs them (quality runs the reference)
            PackedLinear.__call__ = lambda self, x: calls.append(1) or original(self, x)
            res = ev.evaluate(cm)
        finally:
            PackedLinear.__call__ = original
        assert len(calls) > 0
        calls.clear()
        assert res.latency_measured is not None, res.latency_unavailable  # a lazy model is timed packed too
        assert res.packed["kernels"] == {"int8 channel": 16} and res.latency_measured["runtime"] == "packed"
        assert res.metrics()["packed_expert_bytes"] == res.packed["resident_bytes"]
        # quality on the reference path: the same perplexity lazy or not, and not the packed model's
        with torch.no_grad():
            assert experts_runtime(cm.layers[0].experts) is None or \
                not isinstance(experts_runtime(cm.layers[0].experts).weights, PackedExpertWeights)
    ref = ev.evaluate(comp.apply(plan))
    assert res.perplexity == pytest.approx(ref.perplexity, rel=1e-6)
    # pruning alone has no kernel: the compressed model itself is timed (materialised), labelled dense
    res = ev.evaluate(comp.apply(CompressionPlan.from_dict(dict(pruning=dict(sparsity=0.5, metric="magnitude")))))
    assert res.latency_measured["runtime"] == "dense" and res.packed is None


def test_bf16_scales_are_moevizs_own_and_logits_within_bf16s_own_rounding(tiny_model_dirs):
    from moeviz.models import load_model

    lm = load_model(tiny_model_dirs["mixtral"], dtype="bfloat16")
    cm = Compressor(lm).apply(CompressionPlan.from_dict(dict(quant=dict(bits=8, group_size=-1))))
    pm = pack_compressed(cm)
    # the down projection's 24 input columns: the CPU int8 kernel reads bf16 16 columns at a time (garbage or a
    # crash otherwise, measured): dense, and the label says why
    assert list(pm.report.kernels) == ["int8 channel (part dense: 24 input columns: the CPU int8 kernel needs a "
                                       "multiple of 16 in bf16)"]
    for layer, packed_layer in zip(lm.layers, pm.layers):
        for e, (p_in, p_down) in enumerate(experts_runtime(packed_layer.experts).weights.experts):
            assert isinstance(p_in, PackedLinear) and isinstance(p_down, torch.Tensor)
            # RTN's scales of the base weights (not re-derived from the bf16-rounded dequantized ones)
            assert torch.equal(p_in.scales, quantize_codes(layer.experts.gate_up_proj[e], 8, -1).scales[:, 0].to(torch.bfloat16))
    ids = _ids(lm)
    # the exact quantized model: the same bf16 base values in float32, the same plan (same codes and scales)
    exact_lm = load_model(tiny_model_dirs["mixtral"], dtype="bfloat16")
    exact_lm.model.float()
    exact_cm = Compressor(exact_lm).apply(CompressionPlan.from_dict(dict(quant=dict(bits=8, group_size=-1))))
    with torch.no_grad():
        ref, got = cm.model(input_ids=ids).logits.float(), pm.model(input_ids=ids).logits.float()
        exact = exact_cm.model(input_ids=ids).logits
    # the bound in bf16 (docs/LATENCY.md): at most twice as far from the exact model as the bf16 reference is
    # (bf16 scales are about one more bf16 rounding of each weight; outputs rounded to bf16 like the reference's)
    assert (got - exact).norm() <= 2 * (ref - exact).norm()
    assert (ref - exact).norm() > 0  # the reference itself is not exact in bf16 (else the bound would say nothing)
