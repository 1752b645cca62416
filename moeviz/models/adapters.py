"""Routing rules, kept in small adapters instead of if-chains across the code.

Every transformers-5 MoE block has the same skeleton: a router module whose output is a tuple that
starts with the router logits [T, E] and contains the top-k weights [T, k] and expert ids [T, k]
that the fused experts module then receives as `experts(hidden [T, H], top_k_index, top_k_weights)`.
What differs per family is how logits become top-k weights. An adapter says exactly that, and it is
never chosen from the `model_type` string: `moeviz.models.verify.detect_routing` runs the model once
and keeps the first rule that reproduces, for every layer, the ids and weights the experts actually
received. A router no known rule reproduces gets `GENERIC`: no re-routing, and a "selected"
distribution (the top-k weights only), labelled as such.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from moeviz.models import routing

# distribution kinds (see moeviz.models.routing): "softmax" / "sigmoid" are full distributions over all
# experts; "selected" is only the chosen experts' weights (the rule is unknown).
DISTRIBUTIONS = ("softmax", "sigmoid", "probs", "selected")  # "probs": the router returns probabilities


@dataclass(frozen=True)
class FamilyAdapter:
    """A routing rule with its parameters, verified against one model's router.

    name: the rule's short name (shown as the model's "family" of routing).
    routing_rule: a short human description of logits -> top-k weights, shown in the app.
    distribution: how the full router distribution is formed ("softmax", "sigmoid" or "selected").
    rule / params: which function of `moeviz.models.routing` and its arguments.
    output_slots: positions of (weights, indices) in the router module's output tuple.
    logits_slot: position of the logits in that tuple (0, or 1 for dense routers).
    dense: the router returns dense scores [T, E] (0 for unchosen experts) at position 0 instead of
        top-k weights and ids (Llama 4).
    """

    name: str
    routing_rule: str
    distribution: str = "selected"
    rule: str = ""
    params: dict = field(default_factory=dict, compare=False)
    output_slots: tuple[int, int] = (1, 2)
    verified: bool = False
    logits_slot: int = 0
    dense: bool = False

    @property
    def supports_rerouting(self) -> bool:
        return bool(self.rule) and self.verified

    def route(
        self, router: nn.Module | None, logits: torch.Tensor, allowed: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k `(weights [T, k], indices [T, k])` from logits [T, E]; `allowed` [E] bool forbids experts."""
        p = self.params
        if self.rule == "score_topk":
            return routing.score_topk(logits, p["top_k"], p["score"], p.get("bias"), p["normalize"], p["scale"], allowed,
                                      p.get("bias_on_logits", False), p.get("expert_scale"))
        if self.rule == "topk_softmax":
            w, i = routing.topk_then_softmax(logits.float(), p["top_k"], allowed)
            return w * p["scale"], i
        if self.rule == "sigmoid_group":
            w, i = routing.sigmoid_group_topk(logits.float(), p["top_k"], p["n_group"], p["topk_group"], p.get("bias"),
                                              p["normalize"], 1.0, allowed)
            return w * p["scale"], i
        if self.rule == "sparsemixer":
            return routing.sparsemixer_topk(logits, p["top_k"], p["jitter"], allowed)
        raise NotImplementedError(f"{self.name}: the routing rule of this router is unknown; re-routing is not possible")

    def router_logits(self, router: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [T, E] exactly as the router module returns them (its first output)."""
        out = router(hidden)
        logits = out[0] if isinstance(out, (tuple, list)) else out
        return logits.reshape(-1, logits.shape[-1])

    def with_params(self, **params) -> "FamilyAdapter":
        return replace(self, params={**self.params, **params})


GENERIC = FamilyAdapter(
    "generic",
    "the model's own router (its rule matched none moeviz knows: probabilities shown are the chosen experts' "
    "weights only, and experts cannot be removed)",
)


def rule_templates(top_k: int, biases: dict[str, torch.Tensor], group: tuple[int, int] | None,
                   jitter: float | None, probs: bool = False) -> list[FamilyAdapter]:
    """Every known rule, with each candidate per-expert vector [E] of the router / block as a selection
    bias or as a per-expert weight scale, for one router (a constant scale is fitted later).

    Order matters: the simplest rule that reproduces the router wins."""
    out = []
    bias_items = [(None, None)] + list(biases.items())
    for score in ("softmax", "sigmoid"):
        for bias_name, bias in bias_items:
            for on_logits in ((False, True) if bias_name else (False,)):
                for normalize in (False, True):
                    where = "logits" if on_logits else "scores"
                    desc = f"{score} scores" + (f" (choice on {where} + {bias_name})" if bias_name else "") + " → top-k"
                    desc += " → renormalise" if normalize else ""
                    out.append(FamilyAdapter(
                        f"{score}_topk", desc, score, "score_topk",
                        dict(top_k=top_k, score=score, bias=bias, normalize=normalize, scale=1.0,
                             bias_on_logits=on_logits)))
    if probs:  # first output = probabilities: only renormalised top-k stays the same when experts are removed
        out.append(FamilyAdapter("probs_topk", "router probabilities → top-k → renormalise", "probs", "score_topk",
                                 dict(top_k=top_k, score="probs", bias=None, normalize=True, scale=1.0)))
        for name, vec in biases.items():
            out.append(FamilyAdapter(
                "probs_topk", f"router probabilities → top-k → renormalise × {name}[expert]", "probs", "score_topk",
                dict(top_k=top_k, score="probs", bias=None, normalize=True, scale=1.0, expert_scale=vec)))
    for score in ("softmax", "sigmoid"):  # a learned per-expert weight scale instead of a choice bias
        for name, vec in biases.items():
            for normalize in (True, False):
                out.append(FamilyAdapter(
                    f"{score}_topk", f"{score} scores → top-k{' → renormalise' if normalize else ''} × {name}[expert]",
                    score, "score_topk",
                    dict(top_k=top_k, score=score, bias=None, normalize=normalize, scale=1.0, expert_scale=vec)))
    out.append(FamilyAdapter("topk_softmax", "top-k of logits → softmax over the k", "softmax", "topk_softmax",
                             dict(top_k=top_k, scale=1.0)))
    if group is not None and group[0] > 1:
        for bias_name, bias in bias_items:
            for normalize in (True, False):
                out.append(FamilyAdapter(
                    "sigmoid_group_topk",
                    f"sigmoid scores{f' (+ {bias_name} for the choice)' if bias_name else ''} → best "
                    f"{group[1]} of {group[0]} expert groups → top-k{' → renormalise' if normalize else ''}",
                    "sigmoid", "sigmoid_group",
                    dict(top_k=top_k, n_group=group[0], topk_group=group[1], bias=bias, normalize=normalize, scale=1.0)))
    if jitter is not None:
        out.append(FamilyAdapter("sparsemixer", "sparsemixer: top-1 logit, then best of the rest (eval mode)",
                                 "softmax", "sparsemixer", dict(top_k=top_k, jitter=float(jitter), scale=1.0)))
    return out


def describe(adapter: FamilyAdapter) -> str:
    """The rule's description with its fitted scale (shown in the app)."""
    scale = adapter.params.get("scale", 1.0)
    return adapter.routing_rule + (f" × {scale:.4g}" if adapter.rule and abs(scale - 1.0) > 1e-6 else "")


def supported_model_types() -> list[str]:
    """Routing rules moeviz can reproduce (the model type itself is never used to choose one)."""
    return ["softmax_topk", "sigmoid_topk", "topk_softmax", "sigmoid_group_topk", "sparsemixer"]
