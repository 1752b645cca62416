"""The three terms of the recovery loss, as pure tensor functions.

    loss = CE + λ_expert · Σ_layers Σ_experts MSE(y_teacher, y_student) + λ_router · Σ_layers KL(P_teacher ‖ P_student)

* CE: next-token cross-entropy of the student on the training tokens (the language-modelling loss).
* Expert MSE: for every expert and the tokens routed to it, the mean squared difference between the
  student expert's output and the teacher's same expert on the *same input* (the student's hidden
  state). Comparing on the same input makes the term a per-expert reconstruction error that is zero
  exactly when the expert's weights are the teacher's, and needs no mapping of tokens between two
  routings that may differ.
* Router KL: KL(P_teacher ‖ P_student) of the full router distributions per token, teacher on its own
  hidden states, student on its own (the routing behaviour, end to end). Removed experts can never be
  chosen by the student, so both distributions are taken over the surviving experts only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def next_token_cross_entropy(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean CE of predicting token t+1 from positions ≤ t. logits [B, S, V], input_ids [B, S]."""
    # [B, S-1, V] -> [B*(S-1), V] against the next tokens [B*(S-1)]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten().to(logits.device))


def expert_mse(y_student: torch.Tensor, y_teacher: torch.Tensor) -> torch.Tensor:
    """Mean over tokens and features of (y_student - y_teacher)²; both [n, H] for one expert."""
    return (y_student.float() - y_teacher.float()).square().mean()


def _log_distribution(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """log P [T, E] of the router's full distribution (see moeviz.models.routing.full_distribution)."""
    if kind == "softmax":
        return F.log_softmax(logits.float(), dim=-1)
    if kind == "sigmoid":
        log_scores = F.logsigmoid(logits.float())
        return log_scores - torch.logsumexp(log_scores, dim=-1, keepdim=True)
    if kind == "probs":  # the router returns probabilities itself (removed experts: 0, so log 0 = -inf)
        p = logits.float().clamp_min(0)
        return torch.log(p / p.sum(dim=-1, keepdim=True).clamp_min(1e-20))
    raise ValueError(f"unknown router distribution kind {kind!r}; expected 'softmax', 'sigmoid' or 'probs'")


def router_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, kind: str,
              allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over tokens of KL(P_teacher ‖ P_student); logits [T, E]. `allowed` [E] bool restricts
    both distributions to the surviving experts (renormalised), so removed experts (−inf logits in
    the student) do not make the divergence infinite."""
    if allowed is not None and not bool(allowed.all()):
        cols = allowed.to(teacher_logits.device).nonzero().squeeze(1)
        teacher_logits, student_logits = teacher_logits[:, cols], student_logits[:, cols]
    log_p = _log_distribution(teacher_logits, kind)
    log_q = _log_distribution(student_logits, kind)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def balanced_lambda(ce: float, term: float) -> float:
    """λ such that λ·term = CE at the start of recovery (the terms then weigh equally, as the
    MoE-Pruner recipe balances them); 1.0 when the term is zero or not finite (nothing to balance)."""
    if not (math.isfinite(term) and term > 0 and math.isfinite(ce)):
        return 1.0
    return ce / term
