"""Timing one greedy generation of any transformers causal LM: the shared core of measured latency
(`evaluation.latency.measure_latency`) and of base-vs-compressed timing back to back (`latency_ab`)."""

from __future__ import annotations

import platform
import time

import torch


def device_name(device: torch.device) -> str:
    """"cuda: <GPU name>", or "cpu: <processor>" — what a latency was measured on."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    return f"{device.type}: {cpu}" if cpu else device.type


def synchronize(device: torch.device) -> None:
    # CUDA/MPS kernels run asynchronously; without a sync the clock would stop before they finish.
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@torch.no_grad()
def timed_generation(model, input_ids: torch.Tensor, decode_tokens: int, device: torch.device) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one greedy generation with the KV cache."""
    synchronize(device)
    t0 = time.perf_counter()
    out = model(input_ids=input_ids, use_cache=True)
    next_ids = out.logits[:, -1, :].argmax(-1, keepdim=True)
    synchronize(device)
    t1 = time.perf_counter()
    cache = out.past_key_values
    for _ in range(decode_tokens):
        out = model(input_ids=next_ids, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        next_ids = out.logits[:, -1, :].argmax(-1, keepdim=True)
    synchronize(device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1
