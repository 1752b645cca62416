"""Per-family knowledge, kept in small adapters instead of if-chains across the code.

Every transformers-5 MoE block has the same skeleton: a router module (`gate` or `router`, weight
[E, H]) that returns `(logits, top_k_weights, top_k_index)`, and a fused experts module called as
`experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])`. What differs per family is
how logits become top-k weights and whether there are shared experts; an adapter says exactly that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moeviz.models import routing


@dataclass(frozen=True)
class FamilyAdapter:
    """What moeviz needs to know about one model family's MoE block.

    routing_rule: a short human description of logits -> top-k weights, shown in the app.
    distribution: how the full router distribution is formed ("softmax" or "sigmoid").
    shared_attrs: names of shared-expert submodules on the MoE block (always active, not routed).
    """

    name: str
    model_types: tuple[str, ...]
    routing_rule: str
    distribution: str = "softmax"
    shared_attrs: tuple[str, ...] = ()
    supports_rerouting: bool = True

    def route(
        self, router: nn.Module, logits: torch.Tensor, allowed: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k `(weights [T, k], indices [T, k])` from logits [T, E]; `allowed` [E] bool forbids experts."""
        raise NotImplementedError(f"{self.name}: re-routing is not implemented for this family")

    def router_logits(self, router: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [T, E] exactly as the family's router computes them."""
        hidden = hidden.reshape(-1, router.weight.shape[1])
        bias = getattr(router, "bias", None)
        return nn.functional.linear(hidden, router.weight, bias if isinstance(bias, torch.Tensor) else None)


@dataclass(frozen=True)
class SoftmaxTopKAdapter(FamilyAdapter):
    # Mixtral keeps float32 weights and always renormalises; Qwen/OLMoE follow `norm_topk_prob`.
    always_normalize: bool = False
    cast_back: bool = True

    def route(self, router, logits, allowed=None):
        normalize = self.always_normalize or bool(getattr(router, "norm_topk_prob", False))
        return routing.softmax_then_topk(logits, router.top_k, normalize, allowed, cast_back=self.cast_back)


@dataclass(frozen=True)
class TopKSoftmaxAdapter(FamilyAdapter):
    float_logits: bool = False  # GraniteMoE computes logits in float32 and casts weights back

    def router_logits(self, router, hidden):
        logits = super().router_logits(router, hidden)
        return logits.float() if self.float_logits else logits

    def route(self, router, logits, allowed=None):
        dtype = router.weight.dtype if self.float_logits else None
        return routing.topk_then_softmax(logits, router.top_k, allowed, weights_dtype=dtype)


@dataclass(frozen=True)
class SigmoidGroupAdapter(FamilyAdapter):
    def router_logits(self, router, hidden):
        hidden = hidden.reshape(-1, router.weight.shape[1])
        return nn.functional.linear(hidden.float(), router.weight.float())

    def route(self, router, logits, allowed=None):
        return routing.sigmoid_group_topk(
            logits,
            router.top_k,
            router.num_group,
            router.topk_group,
            getattr(router, "e_score_correction_bias", None),
            bool(router.norm_topk_prob),
            float(router.routed_scaling_factor),
            allowed,
        )


@dataclass(frozen=True)
class SparseMixerAdapter(FamilyAdapter):
    def route(self, router, logits, allowed=None):
        # PhiMoE's eval-mode sparsemixer: top-1 by logit, then the best of the rest, each weighted by a
        # softmax over the experts within a jitter band of the chosen logit.
        from transformers.models.phimoe.modeling_phimoe import sparsemixer

        if allowed is not None:
            logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
        return sparsemixer(logits, jitter_eps=router.router_jitter_noise, training=False, top_k=router.top_k)


@dataclass(frozen=True)
class GenericAdapter(FamilyAdapter):
    """Unknown family with a fused experts module: calibration works through hooks; removing experts
    needs a known routing rule and is refused with a clear message."""

    supports_rerouting: bool = False


MIXTRAL = SoftmaxTopKAdapter(
    "mixtral", ("mixtral",), "softmax over all experts → top-k → renormalise", always_normalize=True, cast_back=False
)
QWEN_MOE = SoftmaxTopKAdapter(
    "qwen_moe",
    ("qwen2_moe", "qwen3_moe", "olmoe"),
    "softmax over all experts → top-k (renormalised if norm_topk_prob)",
    shared_attrs=("shared_expert",),
)
GRANITE_MOE = TopKSoftmaxAdapter(
    "granitemoe", ("granitemoe",), "top-k of logits → softmax over the k", float_logits=True
)
GPT_OSS = TopKSoftmaxAdapter("gpt_oss", ("gpt_oss",), "top-k of logits (with router bias) → softmax over the k")
DEEPSEEK_V3 = SigmoidGroupAdapter(
    "deepseek_v3",
    ("deepseek_v3",),
    "sigmoid scores (+ correction bias for choice) → best top_k_group of n_group groups → top-k → "
    "renormalise × routed_scaling_factor",
    distribution="sigmoid",
    shared_attrs=("shared_experts",),
)
PHIMOE = SparseMixerAdapter("phimoe", ("phimoe",), "sparsemixer: top-1 logit, then best of the rest (eval mode)")
GENERIC = GenericAdapter("generic", (), "the model's own router (unknown family)")

ADAPTERS: tuple[FamilyAdapter, ...] = (MIXTRAL, QWEN_MOE, GRANITE_MOE, GPT_OSS, DEEPSEEK_V3, PHIMOE)


def adapter_for(model_type: str) -> FamilyAdapter:
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    return GENERIC


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)
