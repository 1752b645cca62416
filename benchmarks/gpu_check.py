"""One prepared CUDA check of the packed low-bit runtime, an evaluation and the latency measurement.

Run wherever a CUDA device is available (no downloads: the bundled demo model and a random OLMoE-1B-7B-shaped
model built locally, as `bench_scale` builds it); it finishes in a few minutes (each part is capped, under
8 minutes in all) and writes its JSON next to the other results:

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check.json]

What it measures (every figure on the CUDA device named in the output):

1. which low-bit kernels this device and torch build offer (`packed.kernel_problem`: int8 per channel,
   int4 grouped, symmetric and asymmetric, bf16), each checked against the dense product of its codes;
2. one [1024 × 2048] projection at batch 1: bf16 F.linear vs int8 / int4 g128 (CUDA-synchronised medians);
3. the demo model on CUDA (bf16): `Evaluator.evaluate` of an int8-channel and an int4-g128 plan (perplexity on
   the reference path, latency timed back to back on the packed runtime), packed logits vs the reference;
4. the OLMoE-shaped model (2 layers, bf16) on CUDA: decode latency compressed / base back to back for both plans,
   resident packed bytes vs the storage report, packed logits vs the reference.

Without a CUDA device it says so and exits with status 2 (nothing is measured).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's moeviz and benchmarks
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tiny_tokenizer for the random model

PLANS = {"int8 channel": dict(quant=dict(bits=8, group_size=-1)), "int4 g128": dict(quant=dict(bits=4, group_size=128))}
BUDGET_S = 7 * 60  # parts are skipped (and say so) once this much time has passed


def _cuda_us(fn, n=100) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


def kernels(dev) -> dict:
    from moeviz.compression.packed import kernel_problem

    return {f"{bits}-bit {'sym' if sym else 'asym'}": kernel_problem(bits, sym, dev, torch.bfloat16) or "ok"
            for bits in (8, 4) for sym in (True, False)}


def projection(dev) -> dict:
    from moeviz.compression.packed import NoKernel, pack_codes
    from moeviz.compression.quantize import quantize_codes

    g = torch.Generator().manual_seed(0)
    w = torch.randn(1024, 2048, generator=g)
    x = torch.randn(1, 2048, generator=g).to(dev, torch.bfloat16)
    wb = w.to(dev, torch.bfloat16)
    out = dict(bf16_linear_us=_cuda_us(lambda: torch.nn.functional.linear(x, wb)))
    for name, (bits, gs) in (("int8_channel_us", (8, -1)), ("int4_g128_us", (4, 128))):
        try:
            p = pack_codes(quantize_codes(w, bits, gs), torch.bfloat16, dev)
            out[name] = _cuda_us(lambda: p(x))
        except (NoKernel, RuntimeError, NotImplementedError) as e:
            out[name] = f"no kernel: {str(e).splitlines()[0][:160]}"
    return out


def _logits(cm, pm, ids) -> dict:
    from benchmarks.bench_kernels import _logit_diff

    with torch.no_grad():
        return _logit_diff(pm.model(input_ids=ids).logits.float(), cm.model(input_ids=ids).logits.float())


def demo_evaluation(dev) -> dict:
    import moeviz
    from moeviz.compression import CompressionPlan
    from moeviz.compression.apply import Compressor
    from moeviz.compression.packed import pack_compressed
    from moeviz.evaluation import EvalSettings, Evaluator, load_eval_samples
    from moeviz.models import DEMO_MODEL_DIR

    lm = moeviz.load_model(DEMO_MODEL_DIR, dtype="bfloat16", device=str(dev))
    samples = load_eval_samples(lm.tokenizer, seq_len=128, max_samples=16)
    ev = Evaluator(lm, samples, EvalSettings(latency_decode_tokens=16, latency_repeats=7))
    comp = Compressor(lm)
    out = {}
    for label, d in PLANS.items():
        cm = comp.apply(CompressionPlan.from_dict(d))
        r = ev.evaluate(cm)
        row = dict(perplexity=r.perplexity, base_perplexity=r.base_perplexity, latency_unavailable=r.latency_unavailable,
                   packed=r.packed, eval_seconds=r.seconds)
        if r.latency_ab:
            row.update(compressed_ms=r.latency_ab["compressed"]["median"], base_ms=r.latency_ab["base"]["median"],
                       ratio=r.latency_ab["compressed"]["median"] / r.latency_ab["base"]["median"],
                       runtime=r.latency_ab.get("runtime"), busy=r.latency_ab["busy"])
        row.update(_logits(cm, pack_compressed(cm), samples.input_ids[:2, :32].to(dev)))
        out[label] = row
    return out


def olmoe_shape(dev) -> dict:
    import moeviz
    from benchmarks.bench_scale import _build
    from moeviz.compression import CompressionPlan
    from moeviz.compression.apply import Compressor
    from moeviz.compression.packed import pack_compressed
    from moeviz.latency_ab import interleaved_decode_latency

    folder = Path(tempfile.mkdtemp(prefix="moeviz-gpu-")) / "olmoe"
    _build("olmoe-1b-7b", 2, folder)
    lm = moeviz.load_model(folder, dtype="bfloat16", device=str(dev))
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 512, (64,), generator=g)
    ids = torch.randint(3, 512, (2, 32), generator=g).to(dev)
    comp = Compressor(lm)
    out = {}
    for label, d in PLANS.items():
        cm = comp.apply(CompressionPlan.from_dict(d), lazy=True)
        t0 = time.perf_counter()
        pm = pack_compressed(cm)
        pack_s = time.perf_counter() - t0
        ab = interleaved_decode_latency(lm.model, pm.model, prompt, 16, 7)
        out[label] = dict(ratio=ab["compressed"]["median"] / ab["base"]["median"], compressed_ms=ab["compressed"]["median"],
                          base_ms=ab["base"]["median"], compressed_iqr_ms=[ab["compressed"]["q1"], ab["compressed"]["q3"]],
                          base_iqr_ms=[ab["base"]["q1"], ab["base"]["q3"]], kernels=pm.report.kernels,
                          resident_over_storage=pm.report.resident_bytes / pm.report.storage_bytes, pack_seconds=pack_s,
                          **_logits(cm, pm, ids))
        del cm, pm
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/gpu_check.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here: not measured")
        return 2
    dev = torch.device("cuda")
    start = time.perf_counter()
    result = dict(device=torch.cuda.get_device_name(dev), capability=list(torch.cuda.get_device_capability(dev)),
                  torch=torch.__version__)
    for name, part in (("kernels", kernels), ("projection_1024x2048_batch1", projection),
                       ("demo_evaluation", demo_evaluation), ("olmoe_1b_7b_2_layers", olmoe_shape)):
        if time.perf_counter() - start > BUDGET_S:
            result[name] = "skipped: the time budget was spent"
            continue
        t0 = time.perf_counter()
        try:
            result[name] = part(dev)
        except Exception as e:  # one part's failure is reported, the others still run
            result[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        print(f"{name} ({time.perf_counter() - t0:.0f} s): {json.dumps(result[name])}", flush=True)
        torch.cuda.empty_cache()
    result["wall_seconds"] = time.perf_counter() - start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
