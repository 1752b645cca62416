"""Keep a compressed model in its plan's format while it trains.

Each trained tensor is re-parametrised (`torch.nn.utils.parametrize`): the optimiser updates a latent
float tensor W and the model computes with

    C(W) = Q(W ⊙ keep)   forward
    ∂C/∂W = keep         backward (straight-through through the rounding Q)

so pruned weights stay exactly zero (their gradient is masked, their value multiplied by 0), removed
experts stay all-zero (their keep rows are False), and quantized experts compute with weights on
their b-bit grid at every step (RTN keeps 0 exact). Two kinds of grid:

* RTN experts: the grid is re-computed from the latent weights at every step (`quantize_weight`),
  as RTN itself would store them;
* GPTQ experts (`CompressedModel.grids`): the grid is GPTQ's own, FIXED per (expert, row, group)
  scale / zero point, and the latent weights are rounded on it (`quantize_on_grid`). Re-computing
  RTN scales would move weights off GPTQ's result at step 0 (its scales are not the RTN scales of
  its weights); on the fixed grid step 0 reproduces the GPTQ model bit for bit, and the result lies
  on the grid the storage report and export describe.

At the end `release` writes the exact C(W) into a plain parameter: the model is again an ordinary
compressed copy with frozen weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from moeviz.compression.apply import CompressedModel
from moeviz.compression.resolve import group_size_for
from moeviz.compression.quantize import quantize_on_grid, quantize_weight
from moeviz.models.layers import MoELayer


@dataclass
class _QuantGroup:
    projection: str  # which [E, out, in] view of the fused tensor (None for a router)
    experts: torch.Tensor  # [n] expert indices quantized with these settings
    bits: int
    group_size: int
    symmetric: bool
    # A fixed grid (GPTQ's) for these experts: [n, out, G] float32 scales (and zero points, None =
    # symmetric); None: RTN, the grid re-computed from the weights
    scales: torch.Tensor | None = None
    zero_points: torch.Tensor | None = None


class ConstrainedWeight(nn.Module):
    """Parametrisation C(W) = Q(W ⊙ keep) with a straight-through gradient (see module docstring)."""

    def __init__(self, keep: torch.Tensor | None, quant: list[_QuantGroup], layer: MoELayer | None):
        super().__init__()
        self.register_buffer("keep", keep, persistent=False)  # bool, laid out like W; None = keep all
        self.quant = quant
        self.layer = layer  # to find the [E, out, in] views of a fused tensor

    def exact(self, w: torch.Tensor) -> torch.Tensor:
        """Q(W ⊙ keep) without gradient: the value the compressed model stores."""
        q = w.detach() * self.keep if self.keep is not None else w.detach().clone()
        for g in self.quant:
            # Fused [E, 2I, H] (or GPT-OSS [E, H, 2I]) -> the projection's [E, out, in] view, so the
            # groups run along each output row's inputs exactly as the plan quantized them.
            v = self.layer.view(g.projection, q) if g.projection is not None else q.unsqueeze(0)
            idx = g.experts.to(q.device)
            if g.scales is not None:
                v[idx] = quantize_on_grid(v[idx], g.scales, g.zero_points, g.bits)
            else:
                v[idx] = quantize_weight(v[idx], g.bits, g.group_size, g.symmetric).dequantized
        return q

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        masked = w * self.keep if self.keep is not None else w
        if not self.quant:
            return masked
        return masked + (self.exact(w) - masked).detach()  # value Q(W ⊙ keep), gradient keep


def _clone_if_shared(module: nn.Module, name: str, base_ptrs: set[int]) -> nn.Parameter:
    """Make `module.name` a trainable parameter that the student owns (never a base tensor)."""
    t = getattr(module, name)
    data = t.detach().clone() if t.data_ptr() in base_ptrs else t.detach()
    p = nn.Parameter(data, requires_grad=True)
    setattr(module, name, p)
    return p


def expert_constraints(compressed: CompressedModel, layer: MoELayer) -> dict[str, ConstrainedWeight | None]:
    """For each fused expert tensor of `layer`, the parametrisation its plan requires (None: none)."""
    states = [s for s in compressed.experts if s.layer == layer.index]
    removed = torch.tensor([s.removed for s in states])
    plan = compressed.plan
    out: dict[str, ConstrainedWeight | None] = {}
    for name in dict.fromkeys(layer.fused_name(p) for p in layer.projections()):
        fused = getattr(layer.experts, name)
        keep = None
        for proj in (p for p in layer.projections() if layer.fused_name(p) == name):
            mask = compressed.masks.get(f"{layer.index}.{proj}")
            if mask is not None or removed.any():
                keep = torch.ones_like(fused, dtype=torch.bool) if keep is None else keep
                view = layer.view(proj, keep)
                if mask is not None:
                    view.copy_(mask)
                view[removed.to(view.device)] = False
        quant = []
        for proj in (p for p in layer.projections() if layer.fused_name(p) == name):
            grid = compressed.grids.get(f"{layer.index}.{proj}")  # GPTQ's, if it quantized this projection
            for bits in sorted({s.bits for s in states if not s.removed} - {16}):
                experts = [s.expert for s in states if s.bits == bits and not s.removed]
                fixed = [e for e in experts if grid is not None and int(grid.bits[e]) == bits]
                rtn = [e for e in experts if e not in fixed]
                gs = group_size_for(plan.quant.group_size, layer.weight(proj).shape[-1], proj, layer)
                if rtn:
                    quant.append(_QuantGroup(proj, torch.tensor(rtn), bits, gs, plan.quant.symmetric))
                if fixed:
                    idx = torch.tensor(fixed)
                    sel = idx.to(grid.scales.device)
                    quant.append(_QuantGroup(proj, idx, bits, grid.group_size, grid.zero_points is None,
                                             grid.scales[sel], None if grid.zero_points is None
                                             else grid.zero_points[sel]))
        out[name] = ConstrainedWeight(keep, quant, layer) if keep is not None or quant else None
    return out


def router_constraint(compressed: CompressedModel, layer: MoELayer) -> ConstrainedWeight | None:
    plan = compressed.plan
    keep = compressed.masks.get(f"{layer.index}.router")
    quant = []
    if plan.router_bits < 16:
        w = layer.router_weight
        gs = group_size_for(plan.quant.group_size, w.shape[-1], "router", layer)
        quant.append(_QuantGroup(None, torch.tensor([0]), plan.router_bits, gs, plan.quant.symmetric))
    return ConstrainedWeight(keep, quant, None) if keep is not None or quant else None


def make_trainable(compressed: CompressedModel, base: nn.Module, train_router: bool) -> list[nn.Parameter]:
    """Turn the student's expert tensors (and routers) into owned, constrained, trainable parameters.

    Tensors still shared with the base model are cloned first, so training never writes to the base.
    Returns the latent parameters to optimise."""
    base_ptrs = {p.data_ptr() for p in base.parameters()} | {b.data_ptr() for b in base.buffers()}
    params: list[nn.Parameter] = []
    for layer in compressed.layers:
        targets: list[tuple[nn.Module, str, ConstrainedWeight | None]] = []
        for name, c in expert_constraints(compressed, layer).items():
            targets.append((layer.experts, name, c))
        for name in ("gate_up_proj_bias", "up_proj_bias", "down_proj_bias"):
            if isinstance(getattr(layer.experts, name, None), torch.Tensor):
                targets.append((layer.experts, name, None))
        if train_router:
            targets.append((layer.router_proj, layer.router_weight_name, router_constraint(compressed, layer)))
            if layer.router_has_bias:
                targets.append((layer.router_proj, "bias", None))
        for module, name, constraint in targets:
            p = _clone_if_shared(module, name, base_ptrs)
            if constraint is not None:
                constraint.to(p.device)
                parametrize.register_parametrization(module, name, constraint)
                p = getattr(module.parametrizations, name).original
            params.append(p)
    return params


def release(compressed: CompressedModel) -> None:
    """Write the exact constrained values C(W) into plain frozen parameters (undo `make_trainable`)."""
    for layer in compressed.layers:
        for module in (layer.experts, layer.router_proj):
            if parametrize.is_parametrized(module):
                for name in list(module.parametrizations.keys()):
                    plist = module.parametrizations[name]
                    value = plist[0].exact(plist.original)
                    parametrize.remove_parametrizations(module, name, leave_parametrized=False)
                    setattr(module, name, nn.Parameter(value, requires_grad=False))
            for name, p in list(module.named_parameters(recurse=False)):
                p.requires_grad_(False)
