"""Choosing whole experts to remove, from calibration statistics.

Scores (higher = more important, the lowest are removed first):
- "frequency": share of the layer's top-k assignments the expert received.
- "reap": router-weighted output norm, mean over the tokens routed to the expert of
  gate · ‖expert output‖ (REAP-style; Llama 4 applies the gate to the expert's input, so there it is
  ‖expert output‖ alone, see `moeviz.calibration.stats`); an expert never routed scores 0.
"""

from __future__ import annotations

import torch

from moeviz.calibration.stats import CalibrationStats
from moeviz.errors import PlanError

REMOVAL_SCORES = ("frequency", "reap")


def expert_importance(stats: CalibrationStats, score: str = "frequency") -> list[torch.Tensor]:
    """Per layer, a [E] tensor of importance scores."""
    if score == "frequency":
        return [l.utilization() for l in stats.layers]
    if score == "reap":
        return [l.gate_output_norm / l.routed_counts.clamp_min(1) for l in stats.layers]
    raise PlanError(f"expert removal score {score!r} is unknown; choose one of {', '.join(REMOVAL_SCORES)}")


def experts_to_remove(stats: CalibrationStats, per_layer: int, score: str = "frequency") -> list[tuple[int, int]]:
    """The `per_layer` least important experts of every layer, as (layer, expert) pairs."""
    if per_layer < 0:
        raise PlanError(f"number of experts to remove per layer must be >= 0, got {per_layer}")
    out = []
    for layer, scores in enumerate(expert_importance(stats, score)):
        E, k = stats.layers[layer].num_experts, stats.layers[layer].top_k
        if per_layer > E - k:
            raise PlanError(
                f"removing {per_layer} experts per layer would leave layer {layer} with {E - per_layer} experts, "
                f"fewer than its top-k of {k}; remove at most {E - k}"
            )
        # Stable order: ties broken by expert index so the choice is reproducible.
        order = sorted(range(E), key=lambda e: (float(scores[e]), e))
        out.extend((layer, e) for e in sorted(order[:per_layer]))
    return out
