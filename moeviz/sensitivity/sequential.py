"""One-pass vs sequential compression of the same plan, side by side.

One-pass scores every layer with the statistics of the base model; sequential (``plan.sequential``)
re-calibrates each layer on the outputs of the already-compressed layers before it. Both are applied
with ``keep_masks=True``; per MoE layer we report the share of pruning-mask entries (expert projections)
that differ, and both variants are evaluated on the held-out text (perplexity, routing drift).
Layer 0 sees the same inputs in both, so its masks are identical by construction.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

from moeviz.compression.apply import Compressor
from moeviz.compression.plan import CompressionPlan
from moeviz.data import TokenSamples
from moeviz.evaluation import Evaluator


@dataclass
class SequentialComparison:
    layers: list[dict]  # per MoE layer: layer, mask_entries, differing, share_differing
    one_pass: dict  # perplexity, accuracy, mean_kl, mean_topk_overlap, mean_top1_change
    sequential: dict
    perplexity_difference: float  # sequential − one-pass
    base_perplexity: float

    def to_dict(self) -> dict:
        return asdict(self)


def _summary(result) -> dict:
    m = result.metrics()
    return {k: m[k] for k in ("perplexity", "accuracy", "mean_kl", "mean_topk_overlap", "mean_top1_change")}


def mask_differences(a: dict, b: dict, n_layers: int) -> list[dict]:
    """Per layer, entries of the expert-projection keep-masks ("layer.proj") that differ between a and b."""
    rows = []
    for layer in range(n_layers):
        total = differ = 0
        for key, ma in a.items():
            lay, what = key.split(".", 1)
            if int(lay) != layer or what == "router":
                continue
            mb = b[key]
            total += ma.numel()
            differ += int((ma != mb).sum())
        rows.append(dict(layer=layer, mask_entries=total, differing=differ,
                         share_differing=differ / total if total else 0.0))
    return rows


def compare_one_pass_sequential(compressor: Compressor, evaluator: Evaluator, plan: CompressionPlan,
                                samples: TokenSamples, progress=None) -> SequentialComparison:
    """progress(stage, done, total) with stage one of "one-pass apply", "sequential apply" (layers),
    "one-pass evaluation", "sequential evaluation" (held-out windows), for a progress bar and an ETA."""
    def report(stage):
        return None if progress is None else (lambda d, t: progress(stage, d, t))

    one, seq = copy.deepcopy(plan), copy.deepcopy(plan)
    one.sequential, seq.sequential = False, True
    a = compressor.apply(one, keep_masks=True, progress=report("one-pass apply"))
    b = compressor.apply(seq, samples, keep_masks=True, progress=report("sequential apply"))
    layers = mask_differences(a.masks, b.masks, len(a.layers))
    ra = evaluator.evaluate(a, progress=report("one-pass evaluation"))
    rb = evaluator.evaluate(b, progress=report("sequential evaluation"))
    return SequentialComparison(layers=layers, one_pass=_summary(ra), sequential=_summary(rb),
                                perplexity_difference=rb.perplexity - ra.perplexity, base_perplexity=ra.base_perplexity)
