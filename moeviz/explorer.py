"""Token explorer: how the router of one MoE layer routes each token of a piece of text."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeviz.errors import CalibrationDataError
from moeviz.models.layers import find_moe_layers
from moeviz.models.loading import LoadedModel
from moeviz.models.runtime import install_experts_runtime
from moeviz.models.views import structural_copy


@dataclass
class TokenRouting:
    tokens: list[str]  # decoded text of each token
    top1: list[int]  # highest-weight expert per token
    topk: list[list[int]]  # chosen experts, highest weight first
    weights: list[list[float]]  # their routing weights
    layer: int
    num_experts: int


@torch.no_grad()
def route_text(loaded: LoadedModel, text: str, layer: int = 0, max_tokens: int = 512) -> TokenRouting:
    """Run `text` through the model and record layer `layer`'s top-k choice for every token."""
    if not text or not text.strip():
        raise CalibrationDataError("type some text to explore: the text is empty")
    if not 0 <= layer < len(loaded.layers):
        raise CalibrationDataError(f"layer {layer} does not exist; the model has {len(loaded.layers)} MoE layers")
    ids = loaded.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :max_tokens]
    view = structural_copy(loaded.model)
    target = find_moe_layers(view, loaded.layers)[layer]
    captured = {}

    def routed(hidden, top_k_index, top_k_weights):  # what the experts receive, whatever the router returns
        captured["w"], captured["i"] = top_k_weights.detach().float(), top_k_index.detach()

    install_experts_runtime(target).routing_observers.append(routed)
    view(input_ids=ids.to(loaded.device), use_cache=False)
    w, idx = captured["w"].cpu(), captured["i"].cpu()
    order = w.argsort(dim=1, descending=True)  # sort each token's experts by weight
    w, idx = w.gather(1, order), idx.gather(1, order)
    tokens = [loaded.tokenizer.decode([t]) for t in ids[0].tolist()]
    return TokenRouting(tokens, idx[:, 0].tolist(), idx.tolist(), [[round(v, 4) for v in r] for r in w.tolist()],
                        layer, target.num_experts)
