"""Recovery by distillation on the demo model at 50 % MoE-Pruner sparsity (2 CPU cores in CI).

Reports held-out perplexity (16k tokens) of the base, the pruned model, and the recovered model
after a fixed number of steps and after a wall-clock budget of a few minutes, as the fraction of the
pruning gap won back: (ppl_pruned − ppl_recovered) / (ppl_pruned − ppl_base). Two controls, so the
number is not mistaken for something else: the same training with the distillation terms off
(λ = 0: plain fine-tuning on the calibration text), and the same training applied to the dense
model (does the base itself improve with more training on this text?).

    python -m benchmarks --only recovery          # BUDGET_S=60 for a quicker run
"""

from __future__ import annotations

import os
import resource

import moeviz
from moeviz.compression import CompressionPlan, PruningSettings
from moeviz.compression.apply import Compressor
from moeviz.evaluation import EvalSettings, Evaluator, load_eval_samples
from moeviz.recovery import RecoverySettings, gap_recovered, recover

STEPS = 100
BUDGET_S = float(os.environ.get("BUDGET_S", 180))


def run() -> dict:
    lm = moeviz.load_model()
    cal = moeviz.load_calibration_data(lm.tokenizer, n_samples=128, seq_len=256, seed=0)
    stats = moeviz.calibrate(lm, cal)
    ev = Evaluator(lm, load_eval_samples(lm.tokenizer, seq_len=256, max_samples=64), EvalSettings(measure_latency=False))
    comp = Compressor(lm, stats)
    plan = CompressionPlan(pruning=PruningSettings(metric="moe_pruner", sparsity=0.5))
    base = ev.base.loss["perplexity"]
    pruned = ev.evaluate(comp.apply(plan)).perplexity

    def recovered(settings, p=plan):
        model, result = recover(comp, p, cal, settings)
        ppl = ev.evaluate(model).perplexity
        return dict(perplexity=ppl, gap_recovered=gap_recovered(pruned, ppl, base),
                    trained_bytes=result.trained_bytes, steps=result.steps_done,
                    train_seconds=round(result.seconds, 2), tokens=result.tokens_seen,
                    lambda_expert=result.lambda_expert, lambda_router=result.lambda_router,
                    first_losses={k: result.history[0][k] for k in ("ce", "expert_mse", "router_kl")},
                    last_losses={k: result.history[-1][k] for k in ("ce", "expert_mse", "router_kl")})

    out = dict(model="demo-moe", plan="moe_pruner 50% unstructured", eval_tokens=ev.samples.n_tokens,
               train_windows=f"{cal.n_samples} x {cal.seq_len}", base_perplexity=base, pruned_perplexity=pruned)
    # Memory: the base's parameter bytes, and this process's peak RSS (ru_maxrss, KiB on Linux) before and
    # after the first recovery (the student's copies + gradients + AdamW state come on top of the base).
    out["base_parameter_bytes"] = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    out["peak_rss_mib_before_recovery"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out[f"recovered_{STEPS}_steps"] = recovered(RecoverySettings(steps=STEPS))
    out["peak_rss_mib_after_first_recovery"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out[f"recovered_{BUDGET_S:.0f}_s_budget"] = recovered(RecoverySettings(steps=100_000, max_seconds=BUDGET_S))
    out[f"control_ce_only_{STEPS}_steps"] = recovered(RecoverySettings(steps=STEPS, lambda_expert=0.0, lambda_router=0.0))
    dense_model, _ = recover(comp, CompressionPlan(), cal, RecoverySettings(steps=STEPS))
    out[f"control_dense_{STEPS}_steps_perplexity"] = ev.evaluate(dense_model).perplexity
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
