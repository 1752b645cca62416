"""A reference forward for fused experts modules that can be observed and altered per expert.

It performs the same operations, in the same order, as transformers' eager experts loop (Mixtral,
Qwen, OLMoE, DeepSeek-V3, GraniteMoE, PhiMoE and GPT-OSS alike), using the module's own layout flags
(`is_transposed`, `has_bias`, `has_gate`) and gating (`_apply_gate`, which knows GPT-OSS's clamped,
interleaved SwiGLU). Calibration uses it to see each expert's inputs, intermediate activations and
outputs in the same pass that computes them, so collecting statistics costs no extra matmuls.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Protocol

import torch
from torch import nn


class ExpertObserver(Protocol):
    def __call__(
        self,
        expert: int,
        token_idx: torch.Tensor,  # [n] rows of hidden_states routed to this expert
        gate: torch.Tensor,  # [n] this expert's routing weight for each of those tokens
        x: torch.Tensor,  # [n, H] expert input
        h: torch.Tensor,  # [n, I] input of the down projection, act(gate) * up
        y: torch.Tensor,  # [n, H] expert output before the routing weight
    ) -> None: ...


def _project(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    out = x @ w if transposed else nn.functional.linear(x, w)
    return out + b if b is not None else out


def _gated(experts: nn.Module, proj: torch.Tensor) -> torch.Tensor:
    if not _has_gate(experts):
        return experts.act_fn(proj)
    if hasattr(experts, "_apply_gate"):
        return experts._apply_gate(proj)
    gate, up = proj.chunk(2, dim=-1)  # [n, 2I] -> [n, I] x 2, concatenated [gate; up]
    return experts.act_fn(gate) * up


def _has_gate(experts: nn.Module) -> bool:
    return bool(getattr(experts, "has_gate", isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor)))


def is_transposed(experts: nn.Module, hidden_size: int) -> bool:
    """[E, in, out] storage (GPT-OSS, Llama 4) rather than [E, out, in]: the module's flag if it has
    one, else read from the down projection's shape ([E, H, I] standard, [E, I, H] transposed)."""
    flag = getattr(experts, "is_transposed", None)
    if isinstance(flag, bool):
        return flag
    down = experts.down_proj
    return down.shape[2] == hidden_size and down.shape[1] != hidden_size


def expert_output(experts: nn.Module, e: int, x: torch.Tensor,
                  weights: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert `e` of a fused experts module on inputs x [n, H]: (h [n, I] = act(gate) * up, y [n, H]).

    weights: (input weight, down weight) of expert e in the module's storage layout, instead of the
    module's own `gate_up_proj[e]` / `down_proj[e]` (a weight provider's compressed tensors)."""
    has_gate = _has_gate(experts)
    has_bias = getattr(experts, "has_bias", False)
    transposed = is_transposed(experts, x.shape[-1])
    if weights is None:
        weights = ((experts.gate_up_proj if has_gate else experts.up_proj)[e], experts.down_proj[e])
    w_in, w_out = weights
    b_in = (experts.gate_up_proj_bias if has_gate else experts.up_proj_bias) if has_bias else None
    b_out = experts.down_proj_bias if has_bias else None
    h = _gated(experts, _project(x, w_in, b_in[e] if b_in is not None else None, transposed))
    y = _project(h, w_out, b_out[e] if b_out is not None else None, transposed)
    return h, y


@functools.lru_cache(maxsize=None)
def _class_takes_routing(cls: type) -> bool:
    try:
        params = list(inspect.signature(cls.forward).parameters.values())[1:]  # without self
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)


def takes_routing(experts: nn.Module) -> bool:
    """True if the experts class is called as experts(hidden, top_k_index, top_k_weights). False for
    dense dispatch (Llama 4): the block passes every token to every expert, pre-scaled by its routing
    score ([E*T, H], score 0 for unchosen experts), and sums the E outputs."""
    cls = type(experts)
    return _class_takes_routing(getattr(cls, "_moeviz_base", None) or cls)  # a runtime class: its family's


def gate_on_input(experts: nn.Module) -> bool:
    """Dense-dispatch experts apply the routing weight to the expert's input, not to its output."""
    return not takes_routing(experts)


def experts_forward(
    experts: nn.Module,
    hidden_states: torch.Tensor,  # [T, H]
    top_k_index: torch.Tensor,  # [T, k]
    top_k_weights: torch.Tensor,  # [T, k]
    observer: ExpertObserver | None = None,
    input_transform: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    weights: Callable[[nn.Module, int], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Eager MoE expert computation; `observer` sees every expert's tensors, `input_transform(e, x)`
    may replace an expert's input (used for activation fake-quantization), `weights(experts, e)` may
    provide expert e's weights (lazily compressed ones), asked for only when a token reaches e and
    dropped right after its use."""
    num_experts = experts.down_proj.shape[0]
    # Families with zero-compute experts (LongCat) give them ids E..total-1 and their own rows in
    # gate_up_proj; such an expert returns its input unchanged.
    total = max(num_experts, (experts.gate_up_proj if _has_gate(experts) else experts.up_proj).shape[0])

    final = torch.zeros_like(hidden_states)
    T = top_k_index.shape[0]
    scale_input = gate_on_input(experts)
    with torch.no_grad():
        # Group the (slot, token) pairs by expert once: flatten slot-major ([T, k] -> [k, T] -> [k*T],
        # position p = slot*T + token), stable-sort by expert id; expert e's pairs are then the
        # contiguous segment e of `order`, in the same (slot, token) order a per-expert search gives.
        # Id `total` is the sentinel some routers use for "no expert".
        flat = top_k_index.T.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=total + 1).tolist()  # one host sync per call
    start = 0
    for e, n in enumerate(counts):
        seg = order[start:start + n]
        start += n
        if n == 0 or e >= total:
            continue
        top_k_pos, token_idx = seg // T, seg % T
        x = hidden_states[token_idx]
        gate = top_k_weights[token_idx, top_k_pos]
        if scale_input:  # Llama 4: expert(x * w) instead of w * expert(x)
            x = x * gate[:, None].to(x.dtype)
        if e >= num_experts:  # zero-compute (identity) expert: nothing to observe or compress
            final.index_add_(0, token_idx, (x * gate[:, None]).to(final.dtype))
            continue
        if input_transform is not None:
            x = input_transform(e, x)
        h, y = expert_output(experts, e, x, weights(experts, e) if weights is not None else None)
        if observer is not None:
            observer(e, token_idx, gate, x, h, y)
        final.index_add_(0, token_idx, (y if scale_input else y * gate[:, None]).to(final.dtype))
    return final
