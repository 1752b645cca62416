"""Base and compressed decode latency measured back to back, under the same conditions.

Timing the base model once and each compressed model later lets a busy moment on a shared machine
land on one side only (the same plan measured 5 and 38 ms/token). Here both are timed in the same
loop, alternating A B B A …, each repeat one greedy generation with the KV cache through the same
code path as `moeviz.evaluation.latency.measure_latency` (`models.generation.timed_generation`), after
one discarded warm-up generation of each. Every evaluation measures this way (`Evaluator.evaluate`); the Compress page can
repeat it with more repeats. Reported per model: the median of the per-token decode times and the
spread (first and third quartiles, min and max), whether the two spreads overlap (then the difference
is within this machine's noise) and whether the machine looked busy (load average, or a spread wider
than a third of the median).
"""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path

import torch

from moeviz.models.generation import device_name, timed_generation
from moeviz.models.offload import execution_device

# A spread (IQR) wider than this share of the median, or a load average above this share of the
# CPUs before timing, marks the measurement as taken on a busy machine.
BUSY_SPREAD = 1 / 3
BUSY_LOAD = 0.8


def available_cpus(cgroup_root: str | Path = "/sys/fs/cgroup") -> int:
    """CPUs this process may run on: its affinity set (`os.sched_getaffinity`, else `os.cpu_count`),
    capped by the cgroup v2 CPU quota (`cpu.max`: "quota period", or "max" for none), rounded up.

    A container limited to 2 CPUs on a 64-core host has a load average measured against 2, not 64."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        n = os.cpu_count() or 1
    try:
        quota, period = Path(cgroup_root, "cpu.max").read_text().split()[:2]
        if quota != "max" and int(period) > 0:
            n = min(n, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):  # no cgroup v2 file, or not readable: the affinity set alone
        pass
    return max(1, n)


def _quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def summarize(samples_ms: list[float]) -> dict:
    q1, q3 = _quartiles(samples_ms)
    return dict(median=statistics.median(samples_ms), q1=q1, q3=q3, min=min(samples_ms), max=max(samples_ms),
                samples=list(samples_ms))


def compare(base_ms: list[float], compressed_ms: list[float], load_before: float | None = None,
            cpus: int | None = None) -> dict:
    """The summary of two sets of per-token decode times (ms), with the overlap and busy notes."""
    b, c = summarize(base_ms), summarize(compressed_ms)
    overlap = not (c["q3"] < b["q1"] or b["q3"] < c["q1"])
    wide = any((s["q3"] - s["q1"]) > s["median"] * BUSY_SPREAD for s in (b, c))
    cpus = cpus or available_cpus()
    loaded = load_before is not None and load_before > BUSY_LOAD * cpus
    busy = []
    if loaded:
        busy.append(f"load average {load_before:.1f} on {cpus} CPUs")  # before timing: the 1-minute average
    if wide:
        busy.append("repeats differ by more than a third of the median")
    return dict(base=b, compressed=c, speedup=b["median"] / c["median"] if c["median"] > 0 else None,
                spreads_overlap=overlap, busy=bool(busy), busy_reason="; ".join(busy) or None,
                load_average=load_before, cpus=cpus)


@torch.no_grad()
def interleaved_decode_latency(base_model, compressed_model, input_ids: torch.Tensor, decode_tokens: int = 8,
                               repeats: int = 5, progress=None) -> dict:
    """Median per-token decode latency (ms) and spread of both models, timed alternately (ABBA…)."""
    if decode_tokens < 1 or repeats < 1:
        raise ValueError("decode_tokens and repeats must be >= 1")
    device = execution_device(base_model)  # an offloaded model's parameters are meta placeholders
    ids = (input_ids.reshape(1, -1) if input_ids.dim() == 1 else input_ids).to(device)
    models = {"base": base_model, "compressed": compressed_model}
    states = {k: m.training for k, m in models.items()}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    times = {"base": [], "compressed": []}
    prefill = {"base": [], "compressed": []}
    try:
        for m in models.values():
            m.eval()
            timed_generation(m, ids, min(2, decode_tokens), device)  # warm-up, discarded
        for r in range(repeats):
            order = ("base", "compressed") if r % 2 == 0 else ("compressed", "base")
            for k in order:
                pre_s, dec_s = timed_generation(models[k], ids, decode_tokens, device)
                times[k].append(dec_s / decode_tokens * 1e3)
                prefill[k].append(pre_s * 1e3)
            if progress is not None:
                progress(r + 1, repeats)
    finally:
        for k, m in models.items():
            m.train(states[k])
    out = compare(times["base"], times["compressed"], load)
    for k in models:
        out[k]["prefill_ms"] = statistics.median(prefill[k])
    out.update(decode_tokens=decode_tokens, repeats=repeats, prompt_tokens=int(ids.shape[-1]),
               batch_size=int(ids.shape[0]), device=device_name(device), torch_threads=torch.get_num_threads(),
               dtype=str(next(base_model.parameters()).dtype).replace("torch.", ""))
    return out


def ab_metrics(ab: dict) -> dict:
    """The flat run-store metrics of a back-to-back measurement (numbers only; flags as 0.0 / 1.0)."""
    return dict(measured_decode_ms=ab["compressed"]["median"], base_measured_decode_ms=ab["base"]["median"],
                measured_decode_q1_ms=ab["compressed"]["q1"], measured_decode_q3_ms=ab["compressed"]["q3"],
                base_measured_decode_q1_ms=ab["base"]["q1"], base_measured_decode_q3_ms=ab["base"]["q3"],
                latency_busy=float(ab["busy"]), latency_spreads_overlap=float(ab["spreads_overlap"]))


def as_measured_latency(ab: dict, which: str) -> dict:
    """One side of a back-to-back measurement in the shape of `MeasuredLatency` (median decode and
    prefill) plus its spread: what `EvalResult.latency_measured` / `base_latency_measured` hold."""
    s = ab[which]
    b, p = ab.get("batch_size", 1), ab["prompt_tokens"]
    return dict(kind="measured", device=ab["device"], torch_threads=ab["torch_threads"], dtype=ab.get("dtype"),
                batch_size=b, prompt_tokens=p, decode_tokens=ab["decode_tokens"], repeats=ab["repeats"],
                prefill_ms=s["prefill_ms"], prefill_tokens_per_s=b * p / (s["prefill_ms"] / 1e3),
                decode_ms_per_token=s["median"], decode_tokens_per_s=b / (s["median"] / 1e3),
                decode_q1_ms=s["q1"], decode_q3_ms=s["q3"], interleaved=True, busy=ab["busy"],
                # the compressed side: "packed" (low-bit kernels, moeviz.compression.packed) or "dense"
                runtime="dense" if which == "base" else ab.get("runtime", "dense"))


def verdict(ab: dict) -> str:
    """One sentence a person can act on."""
    b, c = ab["base"]["median"], ab["compressed"]["median"]
    text = (f"Compressed {c:.3g} ms vs base {b:.3g} ms per token (medians of {ab['repeats']} interleaved repeats; "
            f"IQR {ab['compressed']['q1']:.3g}–{ab['compressed']['q3']:.3g} vs {ab['base']['q1']:.3g}–{ab['base']['q3']:.3g} ms).")
    if ab["spreads_overlap"]:
        text += " The spreads overlap: the difference is within this machine's noise."
    if ab["busy"]:
        text += f" The machine looked busy ({ab['busy_reason']}): measure again when it is idle."
    return text
