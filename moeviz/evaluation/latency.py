"""Decode latency, measured on this machine or projected onto an accelerator with a roofline.

The two kinds are never mixed up: every result carries ``kind`` ("measured" or "projected") in a
field and in its ``label()``.

Projected (roofline) decode latency
-----------------------------------
Generating one token at batch size 1 reads every *active* weight once and does 2 FLOPs (one
multiply, one add) per active multiply-accumulate::

    t_step = max(bytes_per_step / memory_bandwidth, batch_size * flops_per_token / peak_flops)
    ms_per_token = 1000 * t_step          (each of the batch's sequences gets one token per step)
    bound = "memory" if the bytes term is the larger one, else "compute"

* Active weights = attention, embeddings/LM head, norms and routers (dense non-expert bytes) plus
  the top-k experts the token is routed to, each in its *stored* format: quantized values, sparse
  masks / N:M indices, scales and zero points (:mod:`moeviz.compression.formats`). Sparsity and
  quantization therefore reduce the bytes, because the compressed weights really are stored in
  those formats.
* FLOPs are those of the dense weights: no compute speed-up is claimed for sparsity or low-bit
  formats (kernels that exploit them exist only for some formats and devices), and the peak is the
  dense FP16/BF16 tensor-core figure.
* KV-cache and activation traffic, kernel launch overheads and the fact that no kernel reaches
  peak bandwidth are ignored: the projection is a lower bound on latency, useful for comparing
  plans on one device, not a benchmark.
* For batch size B > 1 pass the bytes read per decode step: the union of the experts the B tokens
  choose (`active_bytes_per_token(..., batch_size=B)` gives its expectation).

Measured latency
----------------
`measure_latency` times the model's real forward passes on this machine (prefill, then greedy
decode with the KV cache), median over repeats after a warm-up.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Sequence

import torch

from moeviz.models.generation import device_name, timed_generation


@dataclass(frozen=True)
class Accelerator:
    name: str
    memory_bandwidth_gbs: float  # GB/s (1e9 bytes/s)
    peak_tflops: float  # dense FP16/BF16 tensor throughput, TFLOP/s (no structured-sparsity doubling)
    int8_tops: float | None  # dense INT8 tensor throughput, TOP/s (informative; not used by the roofline)
    memory_gb: float | None
    source: str


ACCELERATORS: dict[str, Accelerator] = {
    a.name: a
    for a in (
        Accelerator(
            name="NVIDIA H100 SXM",
            memory_bandwidth_gbs=3350.0,
            peak_tflops=989.4,
            int8_tops=1978.9,
            memory_gb=80.0,
            source="NVIDIA H100 Tensor Core GPU datasheet (SXM5: 3.35 TB/s HBM3; BF16/FP16 Tensor Core "
            "1,979 TFLOPS and INT8 3,958 TOPS are with sparsity, dense = half)",
        ),
        Accelerator(
            name="NVIDIA A100 80GB SXM",
            memory_bandwidth_gbs=2039.0,
            peak_tflops=312.0,
            int8_tops=624.0,
            memory_gb=80.0,
            source="NVIDIA A100 Tensor Core GPU datasheet (80GB SXM: 2,039 GB/s HBM2e; BF16/FP16 Tensor Core "
            "312 TFLOPS dense, 624 with sparsity; INT8 624 TOPS dense)",
        ),
        Accelerator(
            name="NVIDIA GeForce RTX 4090",
            memory_bandwidth_gbs=1008.0,
            peak_tflops=165.2,
            int8_tops=660.6,
            memory_gb=24.0,
            source="NVIDIA Ada Lovelace architecture whitepaper, RTX 4090 (1,008 GB/s GDDR6X; FP16 Tensor "
            "TFLOPS with FP32 accumulate 165.2 dense; 330.3 with FP16 accumulate; INT8 660.6 TOPS dense). "
            "The FP32-accumulate figure is used because that is how fp16/bf16 LLM matmuls run.",
        ),
        Accelerator(
            name="Laptop CPU (assumed)",
            memory_bandwidth_gbs=60.0,
            peak_tflops=1.0,
            int8_tops=None,
            memory_gb=32.0,
            source="Assumption, not a datasheet: dual-channel DDR5-5600 peaks at 89.6 GB/s, ~60 GB/s is "
            "typically achievable; ~1 TFLOP/s fp32 for an 8-16 core laptop CPU with AVX2/AVX-512 FMA.",
        ),
    )
}


def _device(device: Accelerator | str) -> Accelerator:
    if isinstance(device, Accelerator):
        return device
    if device in ACCELERATORS:
        return ACCELERATORS[device]
    raise ValueError(f"unknown device {device!r}; choose one of {sorted(ACCELERATORS)} or pass an Accelerator")


@dataclass
class ProjectedLatency:
    kind: str  # always "projected"
    device: str
    ms_per_token: float
    bound: str  # "memory" | "compute"
    memory_ms: float
    compute_ms: float
    bytes_per_step: float
    flops_per_token: float
    batch_size: int
    formula: str

    def label(self) -> str:
        return f"{self.ms_per_token:.3g} ms/token (projected, {self.device}, {self.bound}-bound, roofline)"


def projected_decode_latency(
    active_weight_bytes_per_token: float,
    flops_per_token: float,
    device: Accelerator | str,
    batch_size: int = 1,
) -> ProjectedLatency:
    """Roofline decode latency (see the module docstring): max(bytes / bandwidth, flops / peak).

    ``active_weight_bytes_per_token`` is the bytes read per decode step (at batch 1, per token);
    ``flops_per_token`` is per sequence, multiplied by ``batch_size``.
    """
    dev = _device(device)
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    memory_s = float(active_weight_bytes_per_token) / (dev.memory_bandwidth_gbs * 1e9)
    compute_s = float(flops_per_token) * batch_size / (dev.peak_tflops * 1e12)
    step_s = max(memory_s, compute_s)
    return ProjectedLatency(
        kind="projected",
        device=dev.name,
        ms_per_token=step_s * 1e3,
        bound="memory" if memory_s >= compute_s else "compute",
        memory_ms=memory_s * 1e3,
        compute_ms=compute_s * 1e3,
        bytes_per_step=float(active_weight_bytes_per_token),
        flops_per_token=float(flops_per_token),
        batch_size=batch_size,
        formula=(
            f"max({active_weight_bytes_per_token:.4g} B / {dev.memory_bandwidth_gbs:g} GB/s, "
            f"{batch_size} x {flops_per_token:.4g} FLOP / {dev.peak_tflops:g} TFLOP/s)"
        ),
    )


def _per_layer_k(top_k, n_layers: int) -> list[int]:
    ks = [int(top_k)] * n_layers if isinstance(top_k, int) else [int(k) for k in top_k]
    if len(ks) != n_layers:
        raise ValueError(f"{len(ks)} top-k values for {n_layers} layers")
    return ks


def _expected_per_expert(per_layer_values, top_k, utilization, batch_size: int) -> float:
    """Σ_layers Σ_experts P(expert e runs in a decode step) × value_e (see `active_bytes_per_token`)."""
    n_layers = len(per_layer_values)
    if len(utilization) != n_layers:
        raise ValueError(f"{len(utilization)} utilization vectors for {n_layers} layers")
    total = 0.0
    for values, util, k in zip(per_layer_values, utilization, _per_layer_k(top_k, n_layers)):
        v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
        u = torch.as_tensor(util, dtype=torch.float64).reshape(-1)
        if v.shape != u.shape:
            raise ValueError(f"{v.numel()} per-expert values but {u.numel()} utilization entries")
        u = u / u.sum().clamp_min(1e-300)  # shares of the top-k assignments
        p_token = (u * k).clamp(max=1.0)
        p_step = 1.0 - (1.0 - p_token) ** batch_size
        total += float((p_step * v).sum())
    return total


def active_bytes_per_token(
    expert_bytes: Sequence[Sequence[float]],
    top_k: int | Sequence[int],
    utilization: Sequence[Sequence[float]],
    dense_bytes: float,
    batch_size: int = 1,
) -> float:
    """Expected weight bytes read per decode step.

    Args:
        expert_bytes: per MoE layer, the stored bytes of each expert (all its matrices, incl.
            scales and sparsity metadata; 0 for a removed expert).
        top_k: experts per token, one int or one per layer.
        utilization: per layer, each expert's share of the top-k assignments (normalised here to sum
            to 1; use the compressed model's routing, where removed experts have share 0).
        dense_bytes: everything read for every token regardless of routing (attention, embedding
            row + LM head, norms, routers, shared experts), stored densely.
        batch_size: tokens decoded per step.

    A token uses k of the E experts and an expert's share u_e of all top-k assignments means it is
    chosen by a fraction k × u_e of tokens (Σ_e k × u_e = k), so at batch 1
    ``expected bytes = dense_bytes + Σ_layers Σ_e min(1, k × u_e) × bytes_e``. For a batch of B
    tokens, assumed to route independently, an expert is read once per step if any token chose it:
    P = 1 - (1 - k × u_e)^B.
    """
    return float(dense_bytes) + _expected_per_expert(expert_bytes, top_k, utilization, batch_size)


def active_flops_per_token(
    expert_macs: Sequence[Sequence[float]],
    top_k: int | Sequence[int],
    utilization: Sequence[Sequence[float]],
    dense_macs: float,
) -> float:
    """Expected FLOPs per token: 2 × (dense_macs + Σ_layers Σ_e min(1, k × u_e) × macs_e).

    ``expert_macs``: per layer, the multiply-accumulates of each expert for one token, i.e. the
    number of weights in its matrices (0 for a removed expert); sparsity does not reduce it (no
    compute speed-up is claimed). ``dense_macs``: non-expert weights used per token (attention
    projections, LM head, routers, shared experts); attention score FLOPs (∝ context length) are
    left out, as in the byte count.
    """
    return 2.0 * (float(dense_macs) + _expected_per_expert(expert_macs, top_k, utilization, 1))


# -- measured --------------------------------------------------------------------------------------


@dataclass
class MeasuredLatency:
    kind: str  # always "measured"
    device: str
    torch_threads: int
    dtype: str
    batch_size: int
    prompt_tokens: int
    decode_tokens: int
    repeats: int
    prefill_ms: float  # median over repeats
    prefill_tokens_per_s: float  # batch_size × prompt_tokens / prefill time
    decode_ms_per_token: float  # median over repeats of (decode time / decode_tokens)
    decode_tokens_per_s: float  # batch_size / decode_ms_per_token, all sequences together

    def label(self) -> str:
        return (f"{self.decode_ms_per_token:.3g} ms/token decode, {self.prefill_tokens_per_s:.4g} tok/s prefill "
                f"(measured, {self.device}, {self.torch_threads} threads)")


def measure_latency(model, input_ids: torch.Tensor, decode_tokens: int = 16, repeats: int = 3) -> MeasuredLatency:
    """Wall-clock prefill throughput and greedy decode latency of any transformers causal LM, here.

    ``input_ids`` [B, S] (or [S]) is the prompt. One warm-up generation (allocations, lazy init,
    caches) is discarded; then ``repeats`` generations are timed with ``time.perf_counter`` and the
    median is reported, which is robust to a noisy, shared machine.
    """
    if decode_tokens < 1 or repeats < 1:
        raise ValueError("decode_tokens and repeats must be >= 1")
    param = next(model.parameters())
    device = param.device
    ids = input_ids.reshape(1, -1) if input_ids.dim() == 1 else input_ids
    ids = ids.to(device)
    was_training = model.training
    model.eval()
    try:
        timed_generation(model, ids, min(2, decode_tokens), device)  # warm-up
        runs = [timed_generation(model, ids, decode_tokens, device) for _ in range(repeats)]
    finally:
        model.train(was_training)
    prefill_s = statistics.median(r[0] for r in runs)
    decode_s = statistics.median(r[1] / decode_tokens for r in runs)
    b, s = ids.shape
    return MeasuredLatency(
        kind="measured",
        device=device_name(device),
        torch_threads=torch.get_num_threads(),
        dtype=str(param.dtype).replace("torch.", ""),
        batch_size=b,
        prompt_tokens=s,
        decode_tokens=decode_tokens,
        repeats=repeats,
        prefill_ms=prefill_s * 1e3,
        prefill_tokens_per_s=b * s / prefill_s,
        decode_ms_per_token=decode_s * 1e3,
        decode_tokens_per_s=b / decode_s,
    )


__all__ = [
    "ACCELERATORS",
    "Accelerator",
    "MeasuredLatency",
    "ProjectedLatency",
    "active_bytes_per_token",
    "active_flops_per_token",
    "measure_latency",
    "projected_decode_latency",
]
