"""What a compressed-tensors export writes for a plan: one scheme per MoE layer, and the packing of each
expert projection as the streamed export produces it (see `moeviz.export`, `moeviz.compression.ct_pack`).

The export streams one decoder layer at a time in checkpoint format (per-expert 2-D keys). `ExpertPacker`
plugs into that stream: `layout` turns a unit's planned meta tensors into the packed ones (so the shard
headers are written before any weight is computed), `pack` does the same to the real tensors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch

from moeviz.compression.apply import CompressedModel
from moeviz.compression.plan import CompressionPlan
from moeviz.compression.resolve import resolve_plan
from moeviz.compression.ct_pack import (EXPERT_KEY, PROJECTION_OF, PackScheme, expert_target, pack_projection, packed_layout,
                              quantization_config, unpack_projection)
from moeviz.compression.deployability import layer_schemes
from moeviz.errors import MoevizError
from moeviz.models.layers import MoELayer


def plan_bits(plan: CompressionPlan, layers: list[MoELayer]) -> tuple[np.ndarray, np.ndarray]:
    """Per-expert (bits [L, E], removed [L, E]) of a plan. Bits and removal do not depend on the pruning
    allocation, so the plan is resolved without its sparsity (no calibration statistics needed)."""
    d = plan.to_dict()
    d["pruning"]["sparsity"] = 0.0
    d["overrides"] = [dict(o, sparsity=None) for o in d["overrides"]]
    resolved = resolve_plan(CompressionPlan.from_dict(d), layers, None)
    return resolved.bits, resolved.removed


@dataclass
class ExpertPacker:
    """Packs the quantized experts of a compressed model into compressed-tensors tensors, unit by unit."""

    compressed: CompressedModel
    keep: dict[int, torch.Tensor]  # MoE layer -> experts kept in the file (original indices), when some are removed
    schemes: dict[int, PackScheme | None] = field(init=False)
    prefixes: dict[int, str] = field(init=False, default_factory=dict)  # MoE layer -> checkpoint `…experts` prefix
    packed_keys: int = field(init=False, default=0)
    # Largest |unpacked − evaluated| / |evaluated| over every packed weight: 0 for float32 checkpoints (exact);
    # for 16-bit ones, what storing the scale in the checkpoint dtype moves (about 2^-8 at most)
    max_relative_deviation: float = field(init=False, default=0.0)

    def __post_init__(self):
        bits, removed = plan_bits(self.compressed.plan, self.compressed.layers)
        self.schemes = layer_schemes(self.compressed.plan, self.compressed.layers, bits, removed)

    def _layer_of(self, model_keys: list[str]) -> MoELayer | None:
        for layer in self.compressed.layers:
            if any(k.startswith(layer.experts_path + ".") for k in model_keys):
                return layer
        return None

    def _targets(self, layer: MoELayer, keys, whole_unit: bool = False) -> dict[str, tuple[int, str]]:
        """Checkpoint key -> (original expert, projection) for the layer's per-expert keys to pack; with
        `whole_unit` (all of a decoder layer's keys), refuses a layer whose experts are saved fused."""
        if self.schemes.get(layer.index) is None:
            return {}
        found = {}
        for key in keys:
            m = EXPERT_KEY.match(key)
            if m and m.group("name") in PROJECTION_OF:
                e = int(m.group("expert"))
                keep = self.keep.get(layer.index)
                found[key] = (int(keep[e]) if keep is not None else e, PROJECTION_OF[m.group("name")])
                self.prefixes.setdefault(layer.index, m.group("prefix"))
        if whole_unit and not found:
            raise MoevizError(
                f"compressed-tensors export: {type(self.compressed.model).__name__} saves the experts of MoE layer "
                f"{layer.index} as fused tensors, not as per-expert 2-D projections, and compressed-tensors packs "
                "2-D weights only; export --format dense")
        return found

    def layout(self, model_keys: list[str], planned: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A unit's planned checkpoint meta tensors with its quantized experts replaced by their packed form."""
        layer = self._layer_of(model_keys)
        if layer is None:
            return planned
        targets = self._targets(layer, planned, whole_unit=True)
        scheme = self.schemes[layer.index]
        out = {}
        for key, t in planned.items():
            if key in targets:
                stem = key[: -len("weight")]
                for name, m in packed_layout(tuple(t.shape), scheme, t.dtype).items():
                    out[stem + name] = m
            else:
                out[key] = t
        return out

    def pack(self, model_keys: list[str], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The same for real tensors: each quantized expert projection packed (codes checked exactly)."""
        layer = self._layer_of(model_keys)
        if layer is None:
            return tensors
        targets = self._targets(layer, tensors)
        scheme = self.schemes[layer.index]
        out = {}
        for key in list(tensors):
            t = tensors.pop(key)  # popped: each dense expert copy is freed once packed
            if key not in targets:
                out[key] = t
                continue
            expert, proj = targets[key]
            stem = key[: -len("weight")]
            packed = pack_projection(t, scheme, self._grid(layer, proj, expert, scheme), what=key)
            if t.dtype != torch.float32:  # scales stored in the checkpoint dtype: measure what that moves
                dev = (unpack_projection(packed, scheme).to(torch.float32) - t.to(torch.float32)).abs()
                rel = float((dev / t.to(torch.float32).abs().clamp_min(1e-30))[t != 0].max()) if (t != 0).any() else 0.0
                self.max_relative_deviation = max(self.max_relative_deviation, rel)
            for name, v in packed.items():
                out[stem + name] = v
            self.packed_keys += 1
        return out

    def _grid(self, layer: MoELayer, proj: str, expert: int, scheme: PackScheme):
        """GPTQ's own grid of this expert projection, where GPTQ quantized it (else None: RTN, recomputed)."""
        g = self.compressed.grids.get(f"{layer.index}.{proj}")
        if g is None or int(g.bits[expert]) != scheme.bits:
            return None
        zeros = None if g.zero_points is None else g.zero_points[expert]
        return g.scales[expert], zeros

    def config(self) -> dict:
        """config.json's quantization_config: one group per scheme, targeting the experts of its layers."""
        used = {i: s for i, s in self.schemes.items() if s is not None}
        groups: dict[PackScheme, list[str]] = {}
        if len(set(used.values())) == 1 and len(used) == len(self.schemes):
            groups[next(iter(used.values()))] = [expert_target(None)]  # every MoE layer: one scheme
        else:
            for i, s in used.items():
                groups.setdefault(s, []).append(expert_target(self.prefixes.get(i, self.compressed.layers[i].experts_path)))
        routers = sorted({l.router_path.rsplit(".", 1)[-1] for l in self.compressed.layers})
        ignore = ["lm_head"] + [f"re:.*\\.{re.escape(r)}$" for r in routers]
        return quantization_config(groups, ignore)

    def describe(self) -> list[str]:
        """One line per distinct scheme: which MoE layers use it."""
        by: dict[str, list[int]] = {}
        for i, s in self.schemes.items():
            by.setdefault(s.label() if s else "unquantized (dense)", []).append(i)
        return [f"{label}: MoE layers {', '.join(map(str, ls))}" for label, ls in by.items()]
