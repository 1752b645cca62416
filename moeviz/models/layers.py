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

from moeviz.errors import NotAnMoEModelError, PlanError
from moeviz.models.adapters import GENERIC, FamilyAdapter
from moeviz.models.experts import takes_routing

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
    router_weight_path: str = ""  # the router's [rows, H] projection weight (rows >= E)
    calls_with_routing: bool = True  # experts called as experts(hidden, top_k_index, top_k_weights); False: dense dispatch
    block: nn.Module | None = field(default=None, repr=False, compare=False)
    router: nn.Module | None = field(default=None, repr=False, compare=False)
    router_proj: nn.Module | None = field(default=None, repr=False, compare=False)  # owns the router weight
    experts: nn.Module | None = field(default=None, repr=False, compare=False)
    adapter: FamilyAdapter | None = field(default=None, repr=False, compare=False)

    @property
    def router_weight_name(self) -> str:
        return self.router_weight_path.rpartition(".")[2]

    @property
    def router_weight(self) -> torch.Tensor:
        """The router's projection weight [rows, H] (rows = E, or more if it also scores shared experts)."""
        return getattr(self.router_proj, self.router_weight_name)

    @property
    def distribution(self) -> str:
        return self.adapter.distribution if self.adapter else "selected"

    def per_expert_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """(full name, tensor) of every parameter / buffer that may hold one entry per expert outside
        the experts module: the router's (weight, bias, correction bias, per-expert scale) and the
        block's own direct ones (e.g. AFMoE's expert_bias). Not the block's other children (the block
        can be a whole decoder layer, as in Gemma 4, whose attention norms may have E entries too)."""
        prefix = f"{self.path}." if self.path else ""
        router_prefix = self.router_path[len(prefix):]
        out = [(f"{prefix}{n}", t) for n, t in list(self.block.named_parameters(recurse=False))
               + list(self.block.named_buffers(recurse=False))]
        out += [(f"{self.router_path}.{n}", t) for n, t in list(self.router.named_parameters())
                + list(self.router.named_buffers())]
        assert router_prefix  # the router is a child of the block
        return out

    # ---- expert weights as [E, out, in] views of the fused parameters ----
    def weight(self, projection: str) -> torch.Tensor:
        """All experts' weight for one projection as a view [E, out, in] (writes go to the model)."""
        fused = getattr(self.experts, self.fused_name(projection))
        # [E_total, ...] -> [E, ...]: some families append zero-compute experts' rows to gate_up_proj.
        return self.view(projection, fused[: self.num_experts])

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
        skip = {"block", "router", "router_proj", "experts", "adapter"}
        d = {k: v for k, v in self.__dict__.items() if k not in skip}
        d["family"] = self.adapter.name if self.adapter else None
        d["distribution"] = self.distribution
        d["supports_rerouting"] = bool(self.adapter and self.adapter.supports_rerouting)
        d["expert_shapes"] = {p: list(self.weight(p).shape[1:]) for p in self.projections()}
        return d


def _fused(module: nn.Module, name: str) -> torch.Tensor | None:
    p = getattr(module, name, None)
    return p if isinstance(p, torch.Tensor) and p.dim() == 3 else None


def _is_fused_experts(module: nn.Module) -> bool:
    return _fused(module, "down_proj") is not None and (
        _fused(module, "gate_up_proj") is not None or _fused(module, "up_proj") is not None
    )


def _layer_number(path: str, fallback: int) -> int:
    m = re.search(r"layers\.(\d+)\.", path + ".")
    return int(m.group(1)) if m else fallback


def _router(block: nn.Module, experts_name: str, E: int, H: int) -> tuple[str, str] | None:
    """(router child name, path of its [rows, H] projection weight inside the block) or None.

    The router is the block's child called `gate` / `router` (else any other child that is not the
    experts or a shared expert); its projection is the 2-D weight with H inputs and E rows (or the
    fewest rows above E: some routers also score shared / skip experts), possibly in a grandchild."""
    names = [n for n in ROUTER_ATTRS if isinstance(getattr(block, n, None), nn.Module)]
    names += [n for n, _ in block.named_children() if n not in names and n != experts_name and "shared" not in n]
    for name in names:
        child = getattr(block, name)
        weights = [(n, p) for n, p in child.named_parameters() if p.dim() == 2 and p.shape[1] == H and p.shape[0] >= E]
        if weights:
            wname, _ = min(weights, key=lambda np_: (np_[1].shape[0] != E, np_[1].shape[0]))
            return name, f"{name}.{wname}"
    return None


def _layout(experts: nn.Module, H: int) -> tuple[bool, bool, int]:
    """(has_gate, transposed, intermediate size) read from the tensor shapes against the hidden size.

    standard: gate_up [E, 2I, H], down [E, H, I];  transposed: gate_up [E, H, 2I], down [E, I, H].
    With a gate both cannot hold at once (2I = H and I = H); without one they do when I = H, and the
    module's own `is_transposed` flag decides."""
    has_gate = _fused(experts, "gate_up_proj") is not None
    w_in = experts.gate_up_proj if has_gate else experts.up_proj
    down = experts.down_proj
    standard = w_in.shape[2] == H and down.shape[1] == H
    transposed = w_in.shape[1] == H and down.shape[2] == H
    if standard and transposed:
        transposed = bool(getattr(experts, "is_transposed", False))
    elif not (standard or transposed):
        raise NotAnMoEModelError(
            f"experts tensors {tuple(w_in.shape)} / {tuple(down.shape)} do not match the hidden size {H}"
        )
    out_dim = w_in.shape[2] if transposed else w_in.shape[1]
    return has_gate, transposed, out_dim // 2 if has_gate else out_dim


def _top_k(router: nn.Module, block: nn.Module, config) -> int:
    for owner in (router, block):
        k = getattr(owner, "top_k", None)
        if isinstance(k, int):
            return k
    for key in ("num_experts_per_tok", "top_k_experts", "moe_topk", "moe_k", "num_experts_per_token"):
        k = getattr(config, key, None) if config is not None else None
        if isinstance(k, int):
            return k
    return 0


def find_moe_layers(model: nn.Module, like: list[MoELayer] | None = None) -> list[MoELayer]:
    """Every MoE block of `model`, in module order. Works on meta-device models too (no weights).

    Structure only: routing rules need the weights, so each layer starts with the GENERIC adapter
    until `moeviz.models.verify.verify_layers` runs; pass `like` (the layers of the model this one
    is a structural copy of) to reuse their verified adapters."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers: list[MoELayer] = []
    for path, block in model.named_modules():
        experts_name = next((n for n, m in block.named_children() if _is_fused_experts(m)), None)
        if experts_name is None:
            continue
        experts = getattr(block, experts_name)
        E = int(experts.down_proj.shape[0])  # from the experts, never from the router (it may score extra experts)
        H = int(getattr(text_config, "hidden_size", 0) or 0)
        if H not in experts.down_proj.shape[1:]:
            H = int(experts.down_proj.shape[1])
        found = _router(block, experts_name, E, H)
        if found is None:
            continue
        router_name, weight_path = found
        router = getattr(block, router_name)
        has_gate, transposed, intermediate = _layout(experts, H)
        proj_path, _, weight_name = weight_path.rpartition(".")
        proj = block.get_submodule(proj_path)
        router_bias = getattr(proj, "bias", None)
        prefix = f"{path}." if path else ""
        # Shared experts: always-active MLPs beside the routed ones (a bare Linear such as Qwen2-MoE's
        # shared_expert_gate is their gate, not an expert).
        shared = [f"{prefix}{n}" for n, m in block.named_children()
                  if "shared" in n and n != experts_name and not isinstance(m, nn.Linear)]
        i = len(layers)
        layers.append(
            MoELayer(
                index=i,
                layer_idx=_layer_number(path, i),
                path=path,
                router_path=f"{prefix}{router_name}",
                experts_path=f"{prefix}{experts_name}",
                num_experts=E,
                top_k=_top_k(router, block, text_config),
                hidden_size=H,
                intermediate_size=int(intermediate),
                routing_rule=GENERIC.routing_rule,
                transposed=transposed,
                interleaved=not bool(getattr(experts, "is_concatenated", True)),
                has_bias=bool(getattr(experts, "has_bias", False)),
                has_gate=has_gate,
                router_has_bias=isinstance(router_bias, torch.Tensor) and weight_name == "weight",
                shared_expert_paths=shared,
                router_weight_path=f"{prefix}{weight_path}",
                calls_with_routing=takes_routing(experts),
                block=block,
                router=router,
                router_proj=proj,
                experts=experts,
                adapter=like[i].adapter if like is not None and i < len(like) else GENERIC,
            )
        )
        if like is not None and i < len(like):
            layers[-1].routing_rule = like[i].routing_rule
    return layers


def decoder_layers(model: nn.Module, layers) -> list[tuple[nn.ModuleList, int]]:
    """For each MoE layer, (the ModuleList of decoder layers, index of the decoder layer holding it)."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    found = []
    for layer in layers:
        best = None
        for name, ml in lists:
            prefix = f"{name}." if name else ""
            for i in range(len(ml)):
                p = f"{prefix}{i}"
                if layer.path == p or layer.path.startswith(p + "."):
                    if best is None or len(p) > len(best[2]):
                        best = (ml, i, p)
        if best is None:
            raise PlanError(f"sensitivity: cannot find the decoder layer that holds {layer.path}")
        found.append(best[:2])
    return found


def require_moe_layers(model: nn.Module) -> list[MoELayer]:
    """`find_moe_layers`, or a NotAnMoEModelError that says in one line what was found instead."""
    arch = type(model).__name__
    try:
        layers = find_moe_layers(model)
    except NotAnMoEModelError as e:
        raise NotAnMoEModelError(f"{arch}: {e}") from e
    if layers:
        return layers
    fused = [n for n, m in model.named_modules() if _is_fused_experts(m)]
    unfused = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n.endswith("experts")]
    if fused:
        what = f"fused experts at {fused[0]} but no router projection beside them"
    elif unfused:
        what = f"an 'experts' list of separate modules at {unfused[0]}, not transformers-5 fused expert tensors"
    else:
        what = "no module holds fused expert tensors (gate_up_proj / up_proj and down_proj, [E, ., .])"
    raise NotAnMoEModelError(f"{arch} has no MoE layers: {what}; choose a Mixture-of-Experts causal LM")
