"""Recover, evaluate and store: one recovery run linked to its unrecovered parent run."""

from __future__ import annotations

import time
from typing import Callable

from moeviz.compression.apply import Compressor
from moeviz.compression.plan import CompressionPlan
from moeviz.data import TokenSamples
from moeviz.evaluation.evaluate import EvalResult, Evaluator
from moeviz.evaluation.sweep import plan_label, store_result
from moeviz.recovery.distill import RecoveryResult, RecoverySettings, recover
from moeviz.store import RunStore


def gap_recovered(unrecovered: float, recovered: float, base: float) -> float | None:
    """Share of the perplexity lost to compression that recovery won back:
    (unrecovered − recovered) / (unrecovered − base); None when compression lost nothing."""
    gap = unrecovered - base
    return (unrecovered - recovered) / gap if gap > 0 else None


def recovery_label(plan: CompressionPlan, result: RecoveryResult) -> str:
    return f"{plan_label(plan)} + KD recovery ({result.steps_done} steps)"


def recover_and_evaluate(
    compressor: Compressor,
    evaluator: Evaluator,
    plan: CompressionPlan,
    samples: TokenSamples,
    settings: RecoverySettings | None = None,
    store: RunStore | None = None,
    parent_run_id: int | None = None,
    progress: Callable[[int, int, dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
):
    """Recover `plan` on `samples`, evaluate the recovered model like any plan and store it as a run
    whose parent is `parent_run_id` (the unrecovered plan's run, drawn as an arrow on Trade-offs).

    Returns (RecoveryResult, EvalResult, run id or None, recovered CompressedModel)."""
    start = time.perf_counter()
    recovered, recovery = recover(compressor, plan, samples, settings, progress, should_stop)
    result: EvalResult = evaluator.evaluate(recovered)
    run_id = None
    if store is not None:
        run_id = store_result(
            store, result, plan, compressor.loaded.fingerprint,
            compressor.stats.fingerprint if compressor.stats else None,
            parent_run_id=parent_run_id, duration_s=time.perf_counter() - start,
            name=recovery_label(plan, recovery),
            extra_metrics=dict(recovery_steps=recovery.steps_done, recovery_seconds=recovery.seconds,
                               recovery=recovery.summary()),
        )
    return recovery, result, run_id, recovered
