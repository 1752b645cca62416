"""Compressed experts on real low-bit kernels: decode latency of the packed model against its base, back to back.

On the demo model and on the OLMoE-1B-7B-shaped layer (random weights, `bench_scale`'s shapes, 2 decoder
layers, vocabulary 512), both in bf16, at MOEVIZ_BENCH_THREADS torch threads (default 1). Per plan:

* ``ratio``: median decode ms per token of the compressed model / the base's, timed back to back
  (`moeviz.latency_ab.interleaved_decode_latency`: ABBA repeats, one greedy generation each, KV cache),
  the compressed side being what an evaluation times: the packed runtime (`moeviz.compression.packed`)
  where the plan quantizes experts to a width with a kernel, else the compressed model itself (dense);
  with both sides' quartiles;
* ``resident_over_storage``: resident bytes of the packed experts / the storage report's expert bytes
  (`moeviz.compression.formats`);
* ``logits``: ‖packed − reference‖ / ‖reference‖ (relative RMS), max |packed − reference| / max |reference| on
  [2, 32] tokens and the share of positions whose top-1 token agrees (the reference: the same plan's
  dequantized weights, what quality is measured on);
* ``kernels``: experts per kernel label (dense ones say why).

Plans: int8 per channel, int4 g128 (both symmetric RTN), and two without a kernel, to show that latency stays
put where it should: 50 % unstructured magnitude pruning (dense) and 3-bit g128 (dense). Also one
[1024 × 2048] projection at batch 1 (the issue's micro-measurement): F.linear bf16, int8, int4 g128.

Targets (issue 24, OLMoE shape, 1 thread): int8 channel ≤ 0.65 ×, int4 g128 ≤ 0.9 × the base; resident packed
expert bytes within 5 % of the storage report (int8, int4 g128); packed logits within the bf16 bound below.

The bf16 logits bound: the reference computes each expert as bf16 F.linear on bf16 dequantized weights
(bf16(q·s): one rounding per weight) and rounds its outputs to bf16; the kernels use the same codes with the
scale of each row or group rounded to bf16 (2⁻⁹ relative: about one more rounding of each weight) and round their
outputs to bf16 after accumulating in another order. Both are compared with the *exact* quantized model (the same
base values and plan in float32: the same codes and scales, float32 weights and compute); the packed logits may be
at most twice as far from it as the reference's (relative RMS over [2, 32] tokens × vocabulary):
``packed_vs_exact ≤ 2 × reference_vs_exact``. The float32 bound (1e-4 of max |logits|: the packed values are
exactly the reference's there) is tests/test_packed_experts.py's.

    python -m benchmarks --only kernels
    MOEVIZ_KERNELS_MODELS=olmoe-1b-7b MOEVIZ_BENCH_THREADS=1 python -m benchmarks --only kernels
"""

from __future__ import annotations

import gc
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import verdict

THREADS = int(os.environ.get("MOEVIZ_BENCH_THREADS", "1"))
MODELS = os.environ.get("MOEVIZ_KERNELS_MODELS", "demo-moe,olmoe-1b-7b").split(",")
REPEATS = int(os.environ.get("MOEVIZ_KERNELS_REPEATS", "11"))
DECODE_TOKENS = 16
PROMPT_TOKENS = 64
PLANS = {
    "int8 channel": dict(quant=dict(bits=8, group_size=-1)),
    "int4 g128": dict(quant=dict(bits=4, group_size=128)),
    "50% unstructured (no kernel)": dict(pruning=dict(sparsity=0.5, metric="magnitude")),
    "3-bit g128 (no kernel)": dict(quant=dict(bits=3, group_size=128)),
}


def _median_us(fn, n=50) -> float:
    for _ in range(5):
        fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


def projection_us() -> dict:
    """One [1024 × 2048] projection (out × in) at batch 1, bf16 activations: the issue's micro-measurement."""
    from moeviz.compression.packed import pack_codes
    from moeviz.compression.quantize import quantize_codes

    g = torch.Generator().manual_seed(0)
    w = torch.randn(1024, 2048, generator=g)
    x = torch.randn(1, 2048, generator=g).bfloat16()
    wb = w.bfloat16()
    p8 = pack_codes(quantize_codes(w, 8, -1), torch.bfloat16)
    p4 = pack_codes(quantize_codes(w, 4, 128), torch.bfloat16)
    with torch.no_grad():
        return dict(bf16_linear_us=_median_us(lambda: torch.nn.functional.linear(x, wb)),
                    int8_channel_us=_median_us(lambda: p8(x)), int4_g128_us=_median_us(lambda: p4(x)))


def _logit_diff(got: torch.Tensor, ref: torch.Tensor) -> dict:
    """How far logits `got` are from `ref` (float32 tensors [B, T, V]): relative RMS, relative max, top-1 agreement."""
    return dict(logits_rel_rms=((got - ref).norm() / ref.norm()).item(),
                logits_max_rel_diff=((got - ref).abs().max() / ref.abs().max()).item(),
                top1_agreement=(got.argmax(-1) == ref.argmax(-1)).float().mean().item())


def _load(name: str, tmp: Path):
    import moeviz

    if name == "demo-moe":
        from moeviz.models import DEMO_MODEL_DIR

        return moeviz.load_model(DEMO_MODEL_DIR, dtype="bfloat16")
    from benchmarks.bench_scale import _build

    folder = tmp / name
    _build(name, 2, folder)
    return moeviz.load_model(folder, dtype="bfloat16")


def measure_model(name: str) -> dict:
    from moeviz.compression import CompressionPlan
    from moeviz.compression.apply import Compressor
    from moeviz.compression.packed import kernel_experts, pack_compressed
    from moeviz.latency_ab import interleaved_decode_latency

    lm = _load(name, Path(tempfile.mkdtemp(prefix="moeviz-kernels-")))
    vocab = lm.model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, vocab, (PROMPT_TOKENS,), generator=g)
    ids = torch.randint(3, vocab, (2, 32), generator=g)
    comp = Compressor(lm)
    logits = {}  # plan -> (reference logits, packed logits), float32 [2, 32, V]
    out = dict(dtype="bfloat16", layers=len(lm.layers), experts=lm.layers[0].num_experts, top_k=lm.layers[0].top_k,
               plans={})
    for label, d in PLANS.items():
        plan = CompressionPlan.from_dict(d)
        kernel = kernel_experts(comp.apply(plan, lazy=True)) > 0
        # as an evaluation does: a plan with kernels is packed from the lazy model (no dense copy), a plan
        # without is timed on its materialised compressed copy
        cm = comp.apply(plan, lazy=kernel)
        t0 = time.perf_counter()
        pm = pack_compressed(cm, allow_dense=False) if kernel else None
        pack_s = time.perf_counter() - t0
        target = pm.model if pm is not None else cm.model
        ab = interleaved_decode_latency(lm.model, target, prompt, DECODE_TOKENS, REPEATS)
        row = dict(ratio=ab["compressed"]["median"] / ab["base"]["median"],
                   compressed_ms=ab["compressed"]["median"], base_ms=ab["base"]["median"],
                   compressed_iqr_ms=[ab["compressed"]["q1"], ab["compressed"]["q3"]],
                   base_iqr_ms=[ab["base"]["q1"], ab["base"]["q3"]], spreads_overlap=ab["spreads_overlap"],
                   busy=ab["busy"], busy_reason=ab["busy_reason"],
                   runtime="packed" if pm is not None else "dense", storage_expert_bytes=cm.storage.experts_bytes)
        if pm is not None:
            r = pm.report
            with torch.no_grad():
                ref = cm.model(input_ids=ids).logits.float()
                got = pm.model(input_ids=ids).logits.float()
            logits[label] = (ref, got)
            row.update(kernels=r.kernels, pack_seconds=pack_s, resident_expert_bytes=r.resident_bytes,
                       resident_over_storage=r.resident_bytes / r.storage_bytes,
                       **_logit_diff(got, ref))
        out["plans"][label] = row
        del cm, pm, target
        gc.collect()
    # The exact quantized model: the same base values in float32, the same plan (the same codes and scales:
    # the grid is computed in float32 either way), float32 compute. The bf16 reference and the packed model are
    # each compared with it; the packed one may be at most twice as far (bf16 scales ~ one more bf16 rounding of
    # each weight, bf16 outputs as the reference's).
    lm.model.float()
    exact_comp = Compressor(lm)
    for label, (ref, got) in logits.items():
        with torch.no_grad():
            exact = exact_comp.apply(CompressionPlan.from_dict(PLANS[label]), lazy=True).model(input_ids=ids).logits
        row = out["plans"][label]
        row["reference_vs_exact"], row["packed_vs_exact"] = _logit_diff(ref, exact), _logit_diff(got, exact)
    del lm, comp, exact_comp
    gc.collect()
    return out


def run() -> dict:
    torch.set_num_threads(THREADS)
    result = dict(torch_threads=torch.get_num_threads(), device="cpu", projection_1024x2048_batch1=projection_us(),
                  models={})
    for name in MODELS:
        result["models"][name] = measure_model(name)
    targets = {}
    for name, m in result["models"].items():
        p = m["plans"]
        if name == "olmoe-1b-7b":
            targets["olmoe int8 channel <= 0.65x base"] = verdict(p["int8 channel"]["ratio"] <= 0.65)
            targets["olmoe int4 g128 <= 0.9x base"] = verdict(p["int4 g128"]["ratio"] <= 0.9)
        for plan in ("int8 channel", "int4 g128"):
            targets[f"{name} {plan} resident within 5% of storage"] = verdict(
                abs(p[plan]["resident_over_storage"] - 1) <= 0.05)
            targets[f"{name} {plan} logits within bound"] = verdict(
                p[plan]["packed_vs_exact"]["logits_rel_rms"] <= 2 * p[plan]["reference_vs_exact"]["logits_rel_rms"])
    result["targets"] = targets
    return result
