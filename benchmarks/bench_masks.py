"""How long mask building takes compared with one elementwise pass over the same weights.

Weights are shaped like a small Mixtral: 4 layers x 8 experts, each expert with a fused gate/up
projection [512, 128] and a down projection [128, 256], float32 (about 3.1 M weights), plus
random per-column squared norms. Timed (median of several repeats, after one warm-up):

* ``elementwise``: ``torch.abs(w)`` over all weights -- the reference cost of touching every weight.
* ``wanda_unstructured``: wanda scores + per-row unstructured masks, one shot (kthvalue path).
* ``wanda_ranks``: wanda scores + :func:`row_ranks` (the one-off cost of the cached path).
* ``mask_from_ranks``: masks at a new sparsity from cached ranks (what a sparsity slider pays).
* ``mask_from_ranks_per_expert``: same with a different ratio for every expert.
* ``nm_2_4``: 2:4 masks from cached wanda scores.
* ``wanda_nm_2_4``: wanda scores + 2:4 masks.

``ratios`` divides each median by the ``elementwise`` median; ``ms_min``/``ratios_min`` do the same
with the fastest repeat, which is less disturbed by other processes. CPU timings on a shared
machine are noisy; the thread count is recorded.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from moeviz.compression import importance_scores, mask_from_ranks, nm_mask, row_ranks, unstructured_row_mask

LAYERS, EXPERTS, HIDDEN, INTERMEDIATE = 4, 8, 128, 256


def _weights(seed: int = 0, layers: int = LAYERS, experts: int = EXPERTS):
    g = torch.Generator().manual_seed(seed)
    mats = []  # one [E, out, in] tensor per (layer, projection): all experts of a layer batched
    for _ in range(layers):
        for out_f, in_f in ((2 * INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)):
            w = torch.randn(experts, out_f, in_f, generator=g) * 0.02
            norms = torch.rand(experts, in_f, generator=g) * 10.0  # per expert, per input column
            mats.append((w, norms))
    return mats


def _times_ms(fn, repeats: int) -> tuple[float, float]:
    """(median, min) wall time in ms, after one warm-up call (allocator, lazy init)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, min(times) * 1e3


def run(repeats: int = 7, seed: int = 0, layers: int = LAYERS, experts: int = EXPERTS) -> dict:
    """Time the cases listed in the module docstring; returns a JSON-serialisable dict."""
    mats = _weights(seed, layers, experts)
    scores = [importance_scores(w, "wanda", n) for w, n in mats]
    ranks = [row_ranks(s) for s in scores]
    per_expert = torch.linspace(0.3, 0.65, experts)

    cases = {
        "elementwise": lambda: [torch.abs(w) for w, _ in mats],
        "wanda_unstructured": lambda: [
            unstructured_row_mask(importance_scores(w, "wanda", n), 0.6) for w, n in mats
        ],
        "wanda_ranks": lambda: [row_ranks(importance_scores(w, "wanda", n)) for w, n in mats],
        "mask_from_ranks": lambda: [mask_from_ranks(r, 0.6) for r in ranks],
        "mask_from_ranks_per_expert": lambda: [mask_from_ranks(r, per_expert) for r in ranks],
        "nm_2_4": lambda: [nm_mask(s, 2, 4) for s in scores],
        "wanda_nm_2_4": lambda: [nm_mask(importance_scores(w, "wanda", n), 2, 4) for w, n in mats],
    }
    measured = {name: _times_ms(fn, repeats) for name, fn in cases.items()}
    times = {k: v[0] for k, v in measured.items()}
    mins = {k: v[1] for k, v in measured.items()}
    return {
        "shape": {
            "layers": layers,
            "experts": experts,
            "gate_up": [2 * INTERMEDIATE, HIDDEN],
            "down": [HIDDEN, INTERMEDIATE],
            "dtype": "float32",
            "weights": sum(w.numel() for w, _ in mats),
        },
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "ms": {k: round(v, 3) for k, v in times.items()},
        "ratios": {k: round(v / times["elementwise"], 3) for k, v in times.items() if k != "elementwise"},
        # Minimums are less sensitive to other processes on a shared CPU than medians.
        "ms_min": {k: round(v, 3) for k, v in mins.items()},
        "ratios_min": {k: round(v / mins["elementwise"], 3) for k, v in mins.items() if k != "elementwise"},
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
