"""Per-expert Hessians of the layer-wise reconstruction problem, collected one decoder layer at a time.

For expert e of an MoE layer, the model adds g_t · y_e(x_t) to token t's residual stream (g_t = the
routing weight it multiplies expert e's output by). The error a compressed projection adds to that sum
is Σ_t g_t² ‖ΔW x_t‖², so the Hessian of expert e's projection with inputs x_t is

    router_weighted:  H_e = Σ_{t routed to e} g_t² x_t x_tᵀ          plain:  H_e = Σ_{t routed to e} x_t x_tᵀ

(gate/up: x = the expert's input [H]; down: x = act(gate x)·(up x) [I] of the already compressed gate/up).
Experts called by dense dispatch (Llama 4) receive g_t·x_t as their input, so there g_t is already in x
and the weight is 1 (for both settings: "plain" is router-weighted there, the unscaled x is never seen).

Layer inputs come from `DecoderInputs`: one truncated forward records, per decoder layer, the
arguments it is called with (masks, position embeddings: they do not depend on the hidden states) and
the hidden states entering the first one; then each decoder layer is called directly on the outputs
of the previous (already compressed) one. Nothing is monkey-patched: the routed inputs are seen by an
expert observer on the experts runtime (`moeviz.models.runtime`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

HESSIANS = ("router_weighted", "plain")


class _Stop(Exception):
    """Raised by the capture hook to end the forward once the last needed decoder layer is reached."""


@dataclass
class DecoderInputs:
    """Per batch, how each decoder layer 0..last of `blocks` is called (hidden states left out)."""

    blocks: nn.ModuleList
    calls: list[list[tuple[tuple, dict, bool]]]  # [layer][batch] -> (other args, kwargs, hidden is positional)
    first_hidden: list[torch.Tensor]  # [batch] hidden states [B, S, H] entering blocks[0]
    shared: bool = False  # every layer is called with the same arguments (captured from blocks[0] only)

    def run(self, j: int, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """Decoder layer j on each batch's hidden states; its outputs (the next layer's inputs)."""
        outs = []
        for h, (args, kwargs, positional) in zip(hidden, self.calls[j]):
            out = self.blocks[j](h, *args, **kwargs) if positional else self.blocks[j](*args, hidden_states=h, **kwargs)
            outs.append(out[0] if isinstance(out, tuple) else out)
        return outs


@torch.no_grad()
def capture_decoder_inputs(model: nn.Module, blocks: nn.ModuleList, last: int,
                           batches: list[torch.Tensor]) -> DecoderInputs:
    """How each decoder layer 0..last is called, per batch. The first batch runs up to blocks[last]; when
    every decoder layer got the very same arguments as the first (Mixtral and most families: one mask,
    one position embedding per forward), the other batches stop at blocks[0] and reuse its arguments for
    every layer; otherwise (e.g. GPT-OSS: sliding and full attention masks) they run up to blocks[last] too."""
    calls: list[list] = [[] for _ in range(last + 1)]
    first: list[torch.Tensor] = []
    stop_at = {"j": last}

    def hook(j):
        def record(module, args, kwargs):
            kwargs = dict(kwargs)
            if args:
                hidden, rest, positional = args[0], tuple(args[1:]), True
            else:
                hidden, rest, positional = kwargs.pop("hidden_states"), (), False
            calls[j].append((rest, kwargs, positional))
            if j == 0:
                first.append(hidden)
            if j == stop_at["j"]:
                raise _Stop
        return record

    handles = [blocks[j].register_forward_pre_hook(hook(j), with_kwargs=True) for j in range(last + 1)]
    try:
        for b, ids in enumerate(batches):
            try:
                model(input_ids=ids, use_cache=False)
            except _Stop:
                pass
            if b == 0 and all(_same_call(calls[j][0], calls[0][0]) for j in range(1, last + 1)):
                stop_at["j"] = 0
    finally:
        for h in handles:
            h.remove()
    if stop_at["j"] == 0:
        calls = [[calls[j][0]] + calls[0][1:] for j in range(last + 1)]
    return DecoderInputs(blocks, calls, first, stop_at["j"] == 0)


def _same_call(a, b) -> bool:
    """The same arguments (tensors and tuples by identity, other values by equality)."""
    (ra, ka, pa), (rb, kb, pb) = a, b
    if pa != pb or len(ra) != len(rb) or ka.keys() != kb.keys():
        return False
    va, vb = list(ra) + [ka[k] for k in ka], list(rb) + [kb[k] for k in ka]
    return all(x is y or (not isinstance(x, (torch.Tensor, tuple, list, dict)) and type(x) is type(y) and x == y)
               for x, y in zip(va, vb))


class RoutedInputs:
    """Expert observer (see `moeviz.models.experts.ExpertObserver`): keeps, per expert (of `experts`, default
    all), the inputs x [n, H] of its routed tokens and their routing weights g [n], over all batches of one layer."""

    def __init__(self, num_experts: int, experts=None):
        self.x: list[list[torch.Tensor]] = [[] for _ in range(num_experts)]
        self.g: list[list[torch.Tensor]] = [[] for _ in range(num_experts)]
        self.experts = None if experts is None else set(experts)  # None: all; else only these are kept

    def __call__(self, e, token_idx, gate, x, h, y) -> None:
        if self.experts is not None and e not in self.experts:
            return
        self.x[e].append(x.detach())
        self.g[e].append(gate.detach())

    def tokens(self, e: int) -> int:
        return sum(int(x.shape[0]) for x in self.x[e])

    def inputs(self, e: int, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [n, H], g [n]) of expert e (n may be 0)."""
        if not self.x[e]:
            return torch.zeros(0, width, device=device), torch.zeros(0, device=device)
        return torch.cat(self.x[e]), torch.cat(self.g[e])


def token_weights(gate: torch.Tensor, kind: str, gate_on_input: bool = False) -> torch.Tensor:
    """[n] weight of each routed token in the Hessian: g² (router_weighted) or 1 (plain, or when the
    model already scaled the expert's input by g)."""
    if kind not in HESSIANS:
        raise ValueError(f"unknown Hessian {kind!r}; choose one of {', '.join(HESSIANS)}")
    if kind == "plain" or gate_on_input:
        return torch.ones_like(gate, dtype=torch.float32)
    return gate.float().square()


def expert_hessian(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_t w_t x_t x_tᵀ, float32 [d, d], from x [n, d] and w [n]."""
    xf = x.float()
    return (xf * weights[:, None]).T @ xf
