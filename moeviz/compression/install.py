"""Putting a resolved layer into a structural copy: compressed expert tensors, then the steps every
path shares after the experts' weights (re-routing around removed experts, router compression,
activation quantization). Used by `Compressor.apply` (materialised and lazy) and by second-order
compression, which installs a layer's routing before collecting the next layer's Hessians."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeviz.compression.masks import unstructured_row_mask
from moeviz.compression.plan import CompressionPlan
from moeviz.compression.quantize import fake_quantize_activations, quantize_weight
from moeviz.compression.resolve import group_size_for
from moeviz.compression.scores import importance_scores
from moeviz.compression.steps import LayerSettings
from moeviz.models.layers import MoELayer
from moeviz.models.offload import install_tensor, module_weights
from moeviz.models.runtime import install_experts_runtime, install_router_runtime


@dataclass(frozen=True)
class ActivationQuantizer:
    """Input transform of an experts runtime: fake-quantize each expert's input to `bits`."""

    bits: int

    def __call__(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize_activations(x, self.bits)


def install_experts(layer: MoELayer, new: dict[str, torch.Tensor]) -> list[str]:
    """Put compressed fused tensors (name -> [E, ...]) into `layer`'s experts module as frozen
    parameters; rows beyond E (zero-compute experts) are kept from the current tensor."""
    replaced = []
    for name, t in new.items():
        current = getattr(layer.experts, name)
        if t.shape[0] != current.shape[0]:
            full = current.detach().clone()
            full[: t.shape[0]] = t
            t = full
        install_tensor(layer.experts, name, t)
        replaced.append(f"{layer.experts_path}.{name}")
    return replaced


def install_layer_routing(layer: MoELayer, plan: CompressionPlan, s: LayerSettings, masks: dict | None) -> list[str]:
    """Steps after the experts' weights: re-routing, router compression, activation quantization.
    masks: where given, receives the router's keep-mask ("layer.router" -> bool [E, H])."""
    if s.removed.any():
        install_router_runtime(layer).allowed = torch.as_tensor(~s.removed)
    replaced = compress_router(layer, plan, masks)
    if plan.activation_bits < 16:
        install_experts_runtime(layer).input_transform = ActivationQuantizer(plan.activation_bits)
    return replaced


def compress_router(layer: MoELayer, plan: CompressionPlan, masks: dict | None) -> list[str]:
    """Magnitude pruning within each expert's router row, then RTN quantization; returns the replaced path."""
    if not (plan.router_sparsity > 0 or plan.router_bits < 16):
        return []
    with module_weights(layer.router_proj):
        w = layer.router_weight.detach().clone()
    if plan.router_sparsity > 0:
        keep = unstructured_row_mask(importance_scores(w, "magnitude"), plan.router_sparsity)
        w.mul_(keep)
        if masks is not None:
            masks[f"{layer.index}.router"] = keep
    if plan.router_bits < 16:
        w = quantize_weight(w, plan.router_bits, group_size_for(plan.quant.group_size, w.shape[-1], "router", layer),
                            plan.quant.symmetric).dequantized
    install_tensor(layer.router_proj, layer.router_weight_name, w)
    return [layer.router_weight_path]
