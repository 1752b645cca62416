"""A reference forward for fused experts modules that can be observed and altered per expert.

It performs the same operations, in the same order, as transformers' eager experts loop (Mixtral,
Qwen, OLMoE, DeepSeek-V3, GraniteMoE, PhiMoE and GPT-OSS alike), using the module's own layout flags
(`is_transposed`, `has_bias`, `has_gate`) and gating (`_apply_gate`, which knows GPT-OSS's clamped,
interleaved SwiGLU). Calibration uses it to see each expert's inputs, intermediate activations and
outputs in the same pass that computes them, so collecting statistics costs no extra matmuls.

Two ways to observe: a per-expert `ExpertObserver` (called once per expert with that expert's
tensors), or a `LayerObserver` (called once per call with every routed pair grouped by expert,
`GroupedActivations`; its statistics are segment reductions). With only a layer observer and nothing
per expert to alter (no weight provider, no input transform, no autograd), the experts are computed
as the families' grouped forward does (sort once, grouped matmuls): no Python loop over experts.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
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


@dataclass(frozen=True)
class GroupedActivations:
    """One experts call, every (token, slot) pair routed to a computing expert (ids 0..E-1), sorted by
    expert (stable: within an expert in the (slot, token) order the per-expert loop uses). Expert e's
    rows are the segment [starts[e], starts[e] + counts[e]) of every [S, ..] tensor."""

    counts: torch.Tensor  # [E] rows per expert (int64)
    expert: torch.Tensor  # [S] expert id of each row, non-decreasing
    token_idx: torch.Tensor  # [S] row of `hidden` each pair comes from
    gate: torch.Tensor  # [S] routing weight of each pair
    hidden: torch.Tensor  # [T, H] the call's hidden states
    x: torch.Tensor | None  # [S, H] expert inputs; None: exactly hidden[token_idx] (nothing altered them)
    h: torch.Tensor  # [S, I] input of the down projection
    y: torch.Tensor  # [S, H] expert output before the routing weight

    @property
    def starts(self) -> torch.Tensor:  # [E] first row of each expert's segment
        return torch.cumsum(self.counts, 0) - self.counts


LayerObserver = Callable[[GroupedActivations], None]


def _project(x: torch.Tensor, w, b: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    if not isinstance(w, torch.Tensor):  # a packed low-bit projection (moeviz.compression.packed): x Wᵀ itself
        out = w(x)
    else:
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


def padded_rows(n: int) -> int:
    """n rounded up to its shape bucket: multiples of 1/8 of n's octave (at least 16), so a padded
    matmul does at most 12.5 % more rows and at most 8 shapes per octave occur.

    Why: on CPU, oneDNN builds (JIT-compiles) a kernel per matmul shape, and the row count of an expert's
    matmul is its token count, which changes with every plan (routing changes). Measured: a bf16
    [n, 2048] x [2048, 2048] matmul, 2 threads, 1.0 ms with a row count seen before, 10.2 ms with a new
    one. With buckets a new plan meets shapes the earlier plans built."""
    step = max(16, 1 << max(0, n.bit_length() - 4))
    return -(-n // step) * step


def _bucketed(x: torch.Tensor) -> torch.Tensor:
    """x [n, H] with zero rows appended up to `padded_rows(n)`, for a half-precision CPU input only: a new
    float32 shape costs far less (0.88 vs 0.47 ms for [n, 256] x [256, 1024]), and padding the float32 demo
    made its new sparsity slower (1.23 vs 1.18x a forward). Each real row's result is the same as without
    the padding (rows of a matmul are independent; tests/test_expert_buckets.py checks the bits)."""
    n = x.shape[0]
    if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float16) or x.dim() != 2:
        return x
    m = padded_rows(n)
    if m == n:
        return x
    out = x.new_zeros(m, x.shape[1])
    out[:n] = x
    return out


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
    # xp: [m >= n, H]; the padding rows are dropped below. Packed low-bit kernels are not oneDNN's (no
    # kernel built per shape): not padded, a decode step's single row stays one row.
    n, xp = x.shape[0], (_bucketed(x) if isinstance(w_in, torch.Tensor) else x)
    h = _gated(experts, _project(xp, w_in, b_in[e] if b_in is not None else None, transposed))
    y = _project(h, w_out, b_out[e] if b_out is not None else None, transposed)
    return (h, y) if xp is x else (h[:n], y[:n])


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
    layer_observer: LayerObserver | None = None,
) -> torch.Tensor:
    """Eager MoE expert computation; `observer` sees every expert's tensors, `input_transform(e, x)`
    may replace an expert's input (used for activation fake-quantization), `weights(experts, e)` may
    provide expert e's weights (lazily compressed ones), asked for only when a token reaches e and
    dropped right after its use. `layer_observer` sees the whole call's tensors grouped by expert, once;
    when it is the only thing asked for, the grouped path runs (`_grouped_forward`)."""
    num_experts = experts.down_proj.shape[0]
    # Families with zero-compute experts (LongCat) give them ids E..total-1 and their own rows in
    # gate_up_proj; such an expert returns its input unchanged.
    total = max(num_experts, _input_weight(experts).shape[0])
    T = top_k_index.shape[0]
    scale_input = gate_on_input(experts)
    with torch.no_grad():
        # Group the (slot, token) pairs by expert once: flatten slot-major ([T, k] -> [k, T] -> [k*T],
        # position p = slot*T + token), stable-sort by expert id; expert e's pairs are then the
        # contiguous segment e of `order`, in the same (slot, token) order a per-expert search gives.
        # Id `total` is the sentinel some routers use for "no expert".
        flat = top_k_index.T.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts_t = torch.bincount(flat, minlength=total + 1)
        counts = counts_t.tolist()  # one host sync per call
        n_compute, n_routed = sum(counts[:num_experts]), sum(counts[:total])
        pos = order[:n_routed]  # sentinel pairs (sorted last) dropped
        token_all, slot_all = pos % T, pos // T  # [n_routed] each
    gate_all = top_k_weights[token_all, slot_all]  # [n_routed]
    if (layer_observer is not None and observer is None and input_transform is None and weights is None
            and not torch.is_grad_enabled() and _can_group(experts, hidden_states)):
        out = _grouped_forward(experts, hidden_states, T, top_k_weights.shape[1], order, flat[pos], token_all,
                               gate_all, counts_t[:num_experts], n_compute, scale_input, layer_observer)
        if out is not None:
            return out

    final = torch.zeros_like(hidden_states)
    grouped = _LoopRecord(hidden_states, n_compute, counts_t[:num_experts], flat[pos[:n_compute]],
                          token_all[:n_compute], gate_all[:n_compute]) if layer_observer is not None else None
    start = 0
    for e, n in enumerate(counts[:total]):
        if n == 0:
            continue
        token_idx, gate = token_all[start:start + n], gate_all[start:start + n]
        rows = slice(start, start + n)
        start += n
        x = hidden_states[token_idx]
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
        if grouped is not None:
            grouped.put(rows, x if (scale_input or input_transform is not None) else None, h, y)
        final.index_add_(0, token_idx, (y if scale_input else y * gate[:, None]).to(final.dtype))
    if grouped is not None:
        layer_observer(grouped.result())
    return final


def _input_weight(experts: nn.Module) -> torch.Tensor:
    return experts.gate_up_proj if _has_gate(experts) else experts.up_proj


class _LoopRecord:
    """The per-expert loop's tensors written into [S, ..] buffers in grouped order, for a layer observer."""

    def __init__(self, hidden, n, counts, expert, token_idx, gate):
        self.hidden, self.n, self.counts, self.expert, self.token_idx, self.gate = hidden, n, counts, expert, \
            token_idx, gate
        self.x = self.h = self.y = None

    def put(self, rows: slice, x: torch.Tensor | None, h: torch.Tensor, y: torch.Tensor) -> None:
        for name, t in (("x", x), ("h", h), ("y", y)):
            if t is None:
                continue
            t = t.detach()
            if getattr(self, name) is None:
                setattr(self, name, t.new_empty(self.n, t.shape[1]))
            getattr(self, name)[rows] = t

    def result(self) -> GroupedActivations:
        empty = self.hidden.new_zeros(0, 0)
        return GroupedActivations(self.counts, self.expert, self.token_idx, self.gate, self.hidden, self.x,
                                  self.h if self.h is not None else empty, self.y if self.y is not None else empty)


def _grouped_mm_fn():
    return getattr(nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


_GROUPED_FAILED: set[tuple[str, torch.dtype]] = set()  # (device type, dtype) where grouped_mm raised once


def _can_group(experts: nn.Module, hidden: torch.Tensor) -> bool:
    w = experts.down_proj
    if _grouped_mm_fn() is None or (w.device.type, w.dtype) in _GROUPED_FAILED or hidden.dtype != w.dtype:
        return False
    if w.device.type == "cuda":
        return w.dtype == torch.bfloat16 and torch.cuda.get_device_capability(w.device) >= (8, 0)
    # CPU kernels of older torch need 16-byte aligned operands (memory-mapped weights may not be).
    return w.device.type == "cpu" and all(t.data_ptr() % 16 == 0 for t in (w, _input_weight(experts), hidden))


def _grouped_project(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, transposed: bool,
                     offs: torch.Tensor) -> torch.Tensor:
    """Rows x [S, in] sorted by expert times each row's expert's weight w [E, out, in] ([E, in, out]
    transposed); offs [E] int32: end row of each expert's segment."""
    out = _grouped_mm_fn()(x, w if transposed else w.transpose(-2, -1), offs=offs)
    return out + b if b is not None else out


def _grouped_forward(experts, hidden, T, k, order, expert, token_idx, gate, counts, n_compute, scale_input,
                     layer_observer) -> torch.Tensor | None:
    """Every expert at once, as transformers' grouped forward: rows sorted by expert (the first
    n_compute are computing experts, then zero-compute ones), two grouped matmuls, the weighted rows
    put back at their (slot, token) position and summed over the k slots in float32 (no per-expert
    index_add_). None (nothing observed) where the grouped matmul kernel fails."""
    num_experts = counts.shape[0]
    pos = order[:token_idx.shape[0]]  # (slot, token) position of each routed row; sentinels sorted after
    x = hidden[token_idx]  # [n_routed, H]
    if scale_input:  # Llama 4: expert(x * w) instead of w * expert(x)
        x = x * gate[:, None].to(x.dtype)
    xc, ec = x[:n_compute], expert[:n_compute]
    has_gate, has_bias = _has_gate(experts), getattr(experts, "has_bias", False)
    transposed = is_transposed(experts, hidden.shape[-1])
    offs = torch.cumsum(counts, 0).to(torch.int32)
    try:
        b_in = (experts.gate_up_proj_bias if has_gate else experts.up_proj_bias)[ec] if has_bias else None
        h = _gated(experts, _grouped_project(xc, _input_weight(experts)[:num_experts], b_in, transposed, offs))
        y = _grouped_project(h, experts.down_proj, experts.down_proj_bias[ec] if has_bias else None, transposed, offs)
    except (RuntimeError, NotImplementedError):  # no grouped kernel for this device / dtype: the loop, from now on
        _GROUPED_FAILED.add((hidden.device.type, hidden.dtype))
        return None
    layer_observer(GroupedActivations(counts, ec, token_idx[:n_compute], gate[:n_compute], hidden,
                                      x[:n_compute] if scale_input else None, h, y))
    rows = y if scale_input else y * gate[:n_compute, None]  # [n_compute, H]
    if n_compute < x.shape[0]:  # zero-compute (identity) experts' rows follow
        rows = torch.cat([rows, x[n_compute:] * gate[n_compute:, None]])
    out = rows.new_empty(k * T, hidden.shape[-1])  # [k*T, H] at position slot*T + token
    out[pos] = rows
    if pos.shape[0] < k * T:  # sentinel pairs contribute nothing
        out[order[pos.shape[0]:]] = 0
    return out.view(k, T, -1).sum(0).to(hidden.dtype)
