"""A uniform description of every MoE layer of a model, whatever the family.

`find_moe_layers(model)` walks the module tree and returns one `MoELayer` per MoE block. Expert
weights are exposed as *views* of the fused 3-D parameters in one orientation, [E, out, in] like
`nn.Linear.weight`, so pruning and quantization code never needs to know the storage layout:

    layout            gate_up_proj       down_proj     gate / up views        down view
    standard (v5)     [E, 2I, H]         [E, H, I]     rows :I / I: of dim 1  as stored
    GPT-OSS           [E, H, 2I] (T)     [E, I, H] (T) cols ::2 / 1::2, .mT   .mT
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from moeviz.errors import NotAnMoEModelError
from moeviz.models.adapters import FamilyAdapter, adapter_for

ROUTER_ATTRS = ("gate", "router")
PROJECTIONS = ("gate", "up", "down")


@dataclass
class MoELayer:
    """One MoE block. The module references are live (not copies); `to_dict` gives the JSON view."""

    index: int  # position among the model's MoE layers (0..n_moe-1)
    layer_idx: int  # decoder layer number in the model
    path: str  # module path of the MoE block, e.g. "model.layers.3.mlp"
    router_path: str
    experts_path: str
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    routing_rule: str
    transposed: bool  # GPT-OSS stores expert weights as [E, in, out]
    interleaved: bool  # GPT-OSS interleaves gate and up columns instead of concatenating them
    has_bias: bool
    has_gate: bool  # False for families whose experts have a single up projection
    router_has_bias: bool
    shared_expert_paths: list[str] = field(default_factory=list)
    block: nn.Module | None = field(default=None, repr=False, compare=False)
    router: nn.Module | None = field(default=None, repr=False, compare=False)
    experts: nn.Module | None = field(default=None, repr=False, compare=False)
    adapter: FamilyAdapter | None = field(default=None, repr=False, compare=False)

    # ---- expert weights as [E, out, in] views of the fused parameters ----
    def weight(self, projection: str) -> torch.Tensor:
        """All experts' weight for one projection as a view [E, out, in] (writes go to the model)."""
        return self.view(projection, getattr(self.experts, self.fused_name(projection)))

    def fused_name(self, projection: str) -> str:
        """Attribute of the experts module that stores `projection`: gate_up_proj, up_proj or down_proj."""
        if projection == "down":
            return "down_proj"
        if projection not in ("gate", "up"):
            raise ValueError(f"unknown projection {projection!r}; expected one of {PROJECTIONS}")
        if not self.has_gate:
            if projection == "gate":
                raise ValueError(f"{self.path}: experts have no gate projection")
            return "up_proj"
        return "gate_up_proj"

    def view(self, projection: str, fused: torch.Tensor) -> torch.Tensor:
        """The [E, out, in] view of `projection` inside `fused`, a tensor laid out like the experts
        module's `fused_name(projection)` (the parameter itself, a mask or a gradient)."""
        I = self.intermediate_size
        if projection == "down" or not self.has_gate:
            self.fused_name(projection)  # validates the name
            return fused.mT if self.transposed else fused
        if self.transposed:  # [E, H, 2I] -> columns -> [E, I, H]
            cols = slice(0, None, 2) if projection == "gate" else slice(1, None, 2)
            if not self.interleaved:
                cols = slice(0, I) if projection == "gate" else slice(I, 2 * I)
            return fused[:, :, cols].mT
        rows = slice(0, I) if projection == "gate" else slice(I, 2 * I)
        if self.interleaved:
            rows = slice(0, None, 2) if projection == "gate" else slice(1, None, 2)
        return fused[:, rows, :]

    def expert_weight(self, projection: str, expert: int) -> torch.Tensor:
        """One expert's weight [out, in] (a view)."""
        return self.weight(projection)[expert]

    def projections(self) -> tuple[str, ...]:
        return PROJECTIONS if self.has_gate else ("up", "down")

    def expert_param_count(self) -> int:
        """Weights (not biases) of one expert over all its projections."""
        return sum(self.weight(p)[0].numel() for p in self.projections())

    def to_dict(self) -> dict:
        skip = {"block", "router", "experts", "adapter"}
        d = {k: v for k, v in self.__dict__.items() if k not in skip}
        d["family"] = self.adapter.name if self.adapter else None
        d["expert_shapes"] = {p: list(self.weight(p).shape[1:]) for p in self.projections()}
        return d


def _is_fused_experts(module: nn.Module) -> bool:
    for name in ("gate_up_proj", "up_proj"):
        p = getattr(module, name, None)
        if isinstance(p, torch.Tensor) and p.dim() == 3:
            return True
    return False


def _layer_number(path: str, fallback: int) -> int:
    m = re.search(r"layers\.(\d+)\.", path + ".")
    return int(m.group(1)) if m else fallback


def find_moe_layers(model: nn.Module, model_type: str | None = None) -> list[MoELayer]:
    """Every MoE block of `model`, in module order. Works on meta-device models too (no weights)."""
    model_type = model_type or getattr(getattr(model, "config", None), "model_type", "")
    adapter = adapter_for(model_type)
    layers: list[MoELayer] = []
    for path, block in model.named_modules():
        experts = getattr(block, "experts", None)
        if not isinstance(experts, nn.Module) or not _is_fused_experts(experts):
            continue
        router_attr = next(
            (a for a in ROUTER_ATTRS if isinstance(getattr(block, a, None), nn.Module)
             and isinstance(getattr(getattr(block, a), "weight", None), torch.Tensor)),
            None,
        )
        if router_attr is None:
            continue
        router = getattr(block, router_attr)
        num_experts, hidden = router.weight.shape
        has_gate = bool(getattr(experts, "has_gate", hasattr(experts, "gate_up_proj")))
        transposed = bool(getattr(experts, "is_transposed", False))
        fused = experts.gate_up_proj if has_gate else experts.up_proj
        out_dim = fused.shape[2] if transposed else fused.shape[1]
        intermediate = out_dim // 2 if has_gate else out_dim
        router_bias = getattr(router, "bias", None)
        shared = [f"{path}.{a}" for a in adapter.shared_attrs if isinstance(getattr(block, a, None), nn.Module)]
        layers.append(
            MoELayer(
                index=len(layers),
                layer_idx=_layer_number(path, len(layers)),
                path=path,
                router_path=f"{path}.{router_attr}",
                experts_path=f"{path}.experts",
                num_experts=int(num_experts),
                top_k=int(getattr(router, "top_k", getattr(block, "top_k", 0))),
                hidden_size=int(hidden),
                intermediate_size=int(intermediate),
                routing_rule=adapter.routing_rule,
                transposed=transposed,
                interleaved=not bool(getattr(experts, "is_concatenated", True)),
                has_bias=bool(getattr(experts, "has_bias", False)),
                has_gate=has_gate,
                router_has_bias=isinstance(router_bias, torch.Tensor),
                shared_expert_paths=shared,
                block=block,
                router=router,
                experts=experts,
                adapter=adapter,
            )
        )
    return layers


def require_moe_layers(model: nn.Module) -> list[MoELayer]:
    """`find_moe_layers`, or a NotAnMoEModelError that says what was found instead."""
    layers = find_moe_layers(model)
    if layers:
        return layers
    arch = type(model).__name__
    routers = sum(1 for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in ROUTER_ATTRS)
    unfused = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n.endswith("experts")]
    hint = ""
    if unfused:
        hint = (
            f"; {len(unfused)} 'experts' module list(s) with one nn.Module per expert were found "
            f"(e.g. {unfused[0]}), but moeviz needs transformers-5 fused expert tensors"
        )
    raise NotAnMoEModelError(
        f"{arch} has no MoE layers: found {routers} router modules and 0 fused expert modules{hint}. "
        "Choose a Mixture-of-Experts causal LM (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, GraniteMoE, PhiMoE, GPT-OSS)."
    )
