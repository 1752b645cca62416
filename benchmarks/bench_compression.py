"""Compression engine on the demo model: building all masks from cached statistics at a new
sparsity vs one elementwise pass over the same weights (target ≤ 2×), and applying a new plan
(target ≤ 100 ms)."""

from __future__ import annotations

import numpy as np
import torch

import moeviz
from moeviz.compression import CompressionPlan, PruningSettings, importance_scores, mask_from_ranks, row_ranks
from moeviz.compression.apply import Compressor
from moeviz.compression.steps import layer_norms

from benchmarks.bench_masks import _times_ms


def _median(fn, repeats=7) -> float:
    """Median wall time in seconds (after a warm-up call), with bench_masks' timer."""
    return _times_ms(fn, repeats)[0] / 1e3


def run() -> dict:
    lm = moeviz.load_model()
    data = moeviz.load_calibration_data(lm.tokenizer, n_samples=32, seq_len=128)
    stats = moeviz.calibrate(lm, data)
    weights = [l.weight(p) for l in lm.layers for p in l.projections()]
    n_weights = sum(w.numel() for w in weights)

    def elementwise():
        for w in weights:
            torch.abs(w)

    # Masks from precomputed per-row ranks (the kernel `mask_from_ranks`; the engine itself keeps no rank
    # cache: the shared threshold tables serve a new sparsity, see docs/SCALE.md)
    ranks = []
    for layer in lm.layers:
        norms = layer_norms(stats.layers[layer.index], "moe_pruner", np.arange(layer.num_experts), "cpu")
        ranks += [row_ranks(importance_scores(layer.weight(p), "moe_pruner", norms(p))) for p in layer.projections()]
    comp = Compressor(lm, stats)
    comp.apply(CompressionPlan(pruning=PruningSettings(metric="moe_pruner", sparsity=0.3)))  # warm-up, fills the tables

    def masks_at_new_sparsity():
        for r in ranks:
            mask_from_ranks(r, 0.55)

    t_elem = _median(elementwise)
    t_masks = _median(masks_at_new_sparsity)
    sparsities = iter([0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.25, 0.35, 0.45, 0.55])
    t_apply = _median(lambda: comp.apply(CompressionPlan(pruning=PruningSettings(metric="moe_pruner",
                                                                                   sparsity=next(sparsities)))), 7)
    t_cold = _median(lambda: Compressor(lm, stats).apply(CompressionPlan(pruning=PruningSettings(metric="moe_pruner", sparsity=0.5))), 3)
    return dict(model="demo-moe", expert_weights=n_weights, elementwise_pass_ms=t_elem * 1e3,
                masks_new_sparsity_ms=t_masks * 1e3, mask_vs_elementwise=t_masks / t_elem, mask_target=2.0,
                apply_new_plan_ms=t_apply * 1e3, apply_target_ms=100.0,
                apply_cold_including_scores_and_ranks_ms=t_cold * 1e3, threads=torch.get_num_threads())


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
