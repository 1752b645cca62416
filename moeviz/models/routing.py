"""How a router turns logits into top-k expert choices, as pure functions.

Every function takes `logits` of shape [T, E] (T tokens, E experts) and returns
`(weights [T, k], indices [T, k])`, mirroring the family's own router module so that moeviz can
re-route tokens when experts are removed (`allowed`: a bool mask [E], False for removed experts,
which can then never be chosen) and compute the full router distribution for drift metrics.

The family adapters in `moeviz.models.adapters` pick one of these and are tested to reproduce the
transformers router modules exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _mask_logits(logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    if allowed is None:
        return logits
    return logits.masked_fill(~allowed.to(logits.device), float("-inf"))


def topk_then_softmax(
    logits: torch.Tensor, top_k: int, allowed: torch.Tensor | None = None, weights_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """GraniteMoE, GPT-OSS: keep the k largest logits, softmax over those k only."""
    top_logits, indices = torch.topk(_mask_logits(logits, allowed), top_k, dim=-1)
    weights = F.softmax(top_logits, dim=-1, dtype=top_logits.dtype)
    if weights_dtype is not None:
        weights = weights.to(weights_dtype)
    return weights, indices


def sigmoid_group_topk(
    logits: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    correction_bias: torch.Tensor | None,
    normalize: bool,
    scaling: float,
    allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3: sigmoid scores, choose among the best `topk_group` of `n_group` expert groups.

    Selection uses scores + correction bias; the returned weights are the plain sigmoid scores of the
    chosen experts, optionally renormalised, times `routed_scaling_factor`.
    """
    T, E = logits.shape
    scores = logits.sigmoid()
    choice = scores if correction_bias is None else scores + correction_bias
    choice = _mask_logits(choice, allowed)
    # [T, E] -> [T, n_group, E/n_group]; a group's score is the sum of its two best experts.
    grouped = choice.view(T, n_group, E // n_group)
    group_scores = grouped.topk(min(2, E // n_group), dim=-1)[0].sum(dim=-1)  # [T, n_group]
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)
    choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    indices = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, indices)
    if normalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling, indices


def score_topk(
    logits: torch.Tensor,
    top_k: int,
    score: str,
    select_bias: torch.Tensor | None = None,
    normalize: bool = False,
    scale: float = 1.0,
    allowed: torch.Tensor | None = None,
    bias_on_logits: bool = False,
    expert_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score every expert (softmax or sigmoid of the logits, in float32), choose the top-k by
    score + `select_bias` (a load-balancing bias that steers the choice but not the weights), weight
    each chosen expert by its score, optionally renormalise, then multiply by `scale`.

    Mixtral / Qwen / OLMoE / HunYuan (softmax), AFMoE / GLM-4-MoE-like (sigmoid + bias), LongCat
    (softmax + bias + scale) are all instances; Kolibri adds its bias to the logits instead of the
    scores (`bias_on_logits`); Gemma 4 multiplies each chosen weight by a learned per-expert scale
    (`expert_scale` [E]). A removed expert gets a -inf logit, so a softmax is
    taken over the surviving experts, exactly as if its router row had been sliced out.
    """
    masked = _mask_logits(logits.float(), allowed)
    if score == "probs":  # the router's first output already holds probabilities (Gemma 4)
        masked = logits.float() if allowed is None else logits.float().masked_fill(~allowed.to(logits.device), 0.0)
        scores = masked
    else:
        scores = F.softmax(masked, dim=-1) if score == "softmax" else masked.sigmoid()
    base = masked if bias_on_logits else scores
    choice = base if select_bias is None else base + select_bias.float().to(scores.device)
    choice = _mask_logits(choice, allowed)
    indices = torch.topk(choice, top_k, dim=-1)[1]
    weights = scores.gather(1, indices)
    if normalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    if expert_scale is not None:
        weights = weights * expert_scale.float().to(weights.device)[indices]
    return weights * scale, indices


def full_distribution(logits: torch.Tensor, kind: str, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The router's full probability distribution over experts, [T, E] float32, rows summing to 1.

    `kind="softmax"`: softmax of the logits (softmax and top-k-softmax routers alike).
    `kind="sigmoid"`: sigmoid scores normalised to sum to 1 (DeepSeek-V3), so that routing drift
    (KL divergence) and probability histograms mean the same thing for every family.
    Routers whose rule moeviz could not verify have no full distribution: see `selected_distribution`.
    """
    if kind == "probs":  # the router returns probabilities: renormalised over the allowed experts
        p = logits.float().clamp_min(0)
        if allowed is not None:
            p = p.masked_fill(~allowed.to(p.device), 0.0)
        return p / p.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    logits = _mask_logits(logits.float(), allowed)
    if kind == "softmax":
        return F.softmax(logits, dim=-1)
    if kind == "sigmoid":
        scores = logits.sigmoid()
        return scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    raise ValueError(f"unknown router distribution kind {kind!r}; expected 'softmax', 'sigmoid' or 'probs'")


def selected_distribution(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[T, E] float32 for routers whose rule is unknown: each token's top-k weights (absolute values)
    scattered onto the chosen experts and normalised to sum to 1. Only what the experts received is
    known, so every unchosen expert gets 0; it is labelled "selected" wherever it is shown."""
    valid = top_k_index < num_experts  # sentinel / zero-compute expert ids are not experts
    out = torch.zeros(top_k_index.shape[0], num_experts, dtype=torch.float32, device=top_k_index.device)
    out.scatter_add_(1, top_k_index.clamp(max=num_experts - 1), top_k_weights.float().abs() * valid)
    total = out.sum(dim=-1, keepdim=True)
    # A token with all-zero weights (e.g. only a skip expert chosen) counts uniformly over its choices.
    return torch.where(total > 0, out / total.clamp_min(1e-20), torch.full_like(out, 1.0 / num_experts))


def sparsemixer_topk(
    logits: torch.Tensor, top_k: int, jitter: float, allowed: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's eval-mode sparsemixer: top-1 by logit, then the best of the rest, each weighted by a
    softmax over the experts within a jitter band of the chosen logit."""
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    return sparsemixer(_mask_logits(logits, allowed), jitter_eps=jitter, training=False, top_k=top_k)
