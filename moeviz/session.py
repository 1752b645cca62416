"""One person's working set, without Streamlit: the model, its calibration, the plan, and one way to evaluate.

The app (`pages/_state.session`), the CLI (`moeviz evaluate`, `moeviz sweep`) and sweeps evaluate a plan
through `Session.evaluate` / `Session.sweep`, so they share one set of rules (all in
`moeviz.evaluation.sweep`, the one evaluation path):

- **lazy or materialised**: `use_lazy` (above `LAZY_ABOVE_BYTES` of experts: lazy; the reason is beside it);
- **which calibration a run depends on**: `calibration_fingerprint` (the statistics, plus the calibration
  windows of a sequential / second-order plan when they are not the statistics' own);
- **when a stored run is reused**: `stored_result` (same model, plan, calibration and held-out text, and the
  task scores asked for).

A session owns its `Compressor` (per-session caches: column factors, second-order results); the base model,
the `Evaluator` (the base model's outputs, shared read-only across sessions) and the `RunStore` may be shared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import pandas as pd

from moeviz.calibration.stats import CalibrationStats
from moeviz.compression.apply import Compressor
from moeviz.compression.plan import CompressionPlan
from moeviz.data import TokenSamples, load_calibration_data
from moeviz.errors import MoevizError, PlanError
from moeviz.evaluation.evaluate import EvalResult, Evaluator, back_to_back_latency
from moeviz.evaluation.sweep import evaluate_plan, run_sweep, stored_result
from moeviz.latency_ab import ab_metrics
from moeviz.models.loading import LoadedModel
from moeviz.store import RunStore


class Evaluation(NamedTuple):
    result: EvalResult
    run_id: int | None  # None without a store
    reused: bool  # True: the stored run of this plan, nothing evaluated


@dataclass
class Session:
    loaded: LoadedModel
    evaluator: Evaluator  # the base model on the held-out text; may be shared between sessions (read-only)
    store: RunStore | None = None  # None: nothing stored, nothing reused
    stats: CalibrationStats | None = None
    samples: TokenSamples | None = None  # the windows `stats` came from; rebuilt from the bundled text if None
    plan: CompressionPlan = field(default_factory=CompressionPlan)
    compressor: Compressor | None = None  # built for (loaded, stats) when not given

    def __post_init__(self):
        if self.compressor is None:
            self.compressor = Compressor(self.loaded, self.stats)
        fingerprints = lambda loaded, stats: (loaded.fingerprint, stats.fingerprint if stats is not None else None)  # noqa: E731
        if fingerprints(self.compressor.loaded, self.compressor.stats) != fingerprints(self.loaded, self.stats):
            raise ValueError("Session: the compressor was built for another model or calibration")

    def windows_for(self, plan: CompressionPlan) -> TokenSamples | None:
        """What `Compressor.apply` needs besides the plan: the calibration windows for a sequential or
        second-order plan (it re-calibrates / collects Hessians layer by layer on them), None otherwise."""
        if not (plan.sequential or plan.second_order()):
            return None
        if self.samples is not None:
            return self.samples
        if self.stats is None:
            raise PlanError("sequential / SparseGPT / GPTQ: layer-by-layer calibration needs calibration windows; "
                            "calibrate first")
        return self.calibration_windows()

    def calibration_windows(self) -> TokenSamples:
        """The windows the statistics were computed on: the kept ones, else rebuilt from the bundled text with the
        statistics' settings (their fingerprint then tells whether they are the same windows)."""
        if self.samples is not None and self.samples.fingerprint == self.stats.data_fingerprint:
            return self.samples
        s = self.stats.settings
        return load_calibration_data(self.loaded.tokenizer, None, n_samples=s["n_samples"], seq_len=s["seq_len"],
                                     seed=s["seed"], max_seq_len=self.loaded.max_context)

    def evaluate(self, plan: CompressionPlan | None = None, progress=None, tasks=None,
                 reuse: bool = True) -> Evaluation:
        """Evaluate `plan` (default: the session's) against the base, stored as a run; the stored run of the same
        evaluation instead when there is one (`reuse`). progress(stage, done, total, seconds left or None), stages
        "apply" then "evaluate"; tasks: TaskSettings to also run lm-eval tasks (a run without them is not reused)."""
        plan = plan or self.plan
        samples = self.windows_for(plan)
        if self.store is not None and reuse:
            found = stored_result(self.store, self.compressor, self.evaluator, plan, samples, tasks)
            if found is not None:
                return Evaluation(*found, reused=True)
        result, run_id = evaluate_plan(self.compressor, self.evaluator, plan, self.store, samples=samples,
                                       reuse=False, tasks=tasks, progress=progress)
        return Evaluation(result, run_id, reused=False)

    def measure_latency(self, plan: CompressionPlan, decode_tokens: int, repeats: int, progress=None,
                        run_id: int | None = None) -> dict:
        """Base and `plan` timed back to back again (more repeats than an evaluation's), on a materialised copy;
        stored with run `run_id` when given. progress(repeat, repeats). MoevizError when the plan's model cannot
        be timed."""
        compressed = self.compressor.apply(plan, self.windows_for(plan))
        ab, why, _ = back_to_back_latency(self.loaded.model, compressed, self.evaluator.latency_prompt(),
                                          decode_tokens, repeats, progress)
        if ab is None:
            raise MoevizError(why)
        if run_id is not None and self.store is not None:
            self.store.update_metrics(run_id, {"latency_ab": ab, **ab_metrics(ab)})
        return ab

    def sweep(self, plans: Sequence[CompressionPlan], progress: Callable[[int, int, dict], None] | None = None,
              should_stop: Callable[[], bool] | None = None, tasks=None, reuse: bool = True) -> pd.DataFrame:
        """`run_sweep` over `plans` with this session's model, calibration, evaluator and store."""
        samples = self.samples
        if samples is None and any(p.sequential or p.second_order() for p in plans):
            samples = self.windows_for(next(p for p in plans if p.sequential or p.second_order()))
        return run_sweep(self.compressor, self.evaluator, plans, self.store, progress=progress,
                         should_stop=should_stop, samples=samples, reuse=reuse, tasks=tasks)
