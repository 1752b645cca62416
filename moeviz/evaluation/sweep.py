"""Sweeps: a list of plans evaluated in turn, with progress, cancellation and a run store.

A killed or cancelled sweep keeps every finished run: each is stored in its own transaction as soon
as it is evaluated.
"""

from __future__ import annotations

import copy
import time
from typing import Callable, Iterable, Sequence

import pandas as pd

from moeviz.compression.apply import Compressor
from moeviz.compression.plan import CompressionPlan, method_name
from moeviz.evaluation.evaluate import EvalResult, Evaluator
from moeviz.store import RunRecord, RunStore, new_sweep_id


def plan_label(plan: CompressionPlan) -> str:
    """Short human name: "moe_pruner 50% unstructured · 4-bit · −2 experts"."""
    if plan.name:
        return plan.name
    p = plan.pruning
    parts = []
    if p.structure != "unstructured":
        parts.append(f"{p.metric} {p.structure}")
    elif p.sparsity > 0:
        parts.append(f"{p.metric} {p.sparsity:.0%}" + (f" ({p.allocation})" if p.allocation != "uniform" else ""))
    if plan.quant.bits < 16:
        parts.append(f"{plan.quant.bits}-bit" + (" gptq" if plan.quant.method == "gptq" else ""))
    if plan.removed_experts:
        parts.append(f"−{len(plan.removed_experts)} experts")
    if plan.router_sparsity or plan.router_bits < 16:
        parts.append("router")
    if plan.activation_bits < 16:
        parts.append(f"A{plan.activation_bits}")
    if plan.overrides:
        parts.append(f"{len(plan.overrides)} overrides")
    return " · ".join(parts) or "dense (no compression)"


def grid_plans(methods: Sequence[str], sparsities: Iterable[float], bits: Iterable[int] = (16,),
               structure: str = "unstructured", base: CompressionPlan | None = None) -> list[CompressionPlan]:
    """The method × sparsity × bits grid, each a copy of `base` (default: an empty plan) with those
    three settings replaced. With an N:M structure the sparsity axis is ignored (it is N/M)."""
    base = base or CompressionPlan()
    sparsities = [0.0] if structure != "unstructured" else list(sparsities)
    plans = []
    for method in methods:
        for s in sparsities:
            for b in bits:
                plan = copy.deepcopy(base)
                plan.pruning.metric, plan.pruning.sparsity, plan.pruning.structure = method, float(s), structure
                plan.quant.bits = int(b)
                plan.name = ""
                plan.validate()
                plans.append(plan)
    return plans


def store_result(store: RunStore, result: EvalResult, plan: CompressionPlan, model_fingerprint: str,
                 calibration_fingerprint: str | None, sweep_id: str | None = None,
                 parent_run_id: int | None = None, duration_s: float | None = None,
                 name: str | None = None, extra_metrics: dict | None = None) -> int:
    metrics = {**result.metrics(), **(extra_metrics or {}), "details": result.to_dict()}
    if result.latency_ab:  # the back-to-back latency, where the Compress page's re-measurement also goes
        metrics.setdefault("latency_ab", result.latency_ab)
    return store.add_run(RunRecord(
        name=name or plan_label(plan), model_fingerprint=model_fingerprint, plan=plan.to_dict(), metrics=metrics,
        calibration_fingerprint=calibration_fingerprint, eval_fingerprint=result.eval_fingerprint,
        sweep_id=sweep_id, parent_run_id=parent_run_id, duration_s=duration_s,
    ))


# The one lazy rule (the app, the CLI, sweeps and exports all ask `use_lazy`): up to this many bytes of expert
# weights (the demo, tiny test models) a plan is applied to a materialised compressed copy; above it lazily, each
# expert compressed when the forward reaches it (O(one layer) of memory, the result bit-identical).
# Why materialise small models: `compression.packed.timing_model` can time a lazy model only when every compressed
# expert has a low-bit kernel, so a pruning-only plan gets a measured decode latency only when materialised; and a
# lazy model re-compresses each expert per forward batch, slower on small models. Why 256 MiB and not more: the app
# serves several browser sessions from one process and each evaluation's copy is held while it runs, so the limit
# is what many concurrent copies can afford (real MoE checkpoints, gigabytes of experts, are always lazy).
LAZY_ABOVE_BYTES = 256 * 2**20


def expert_bytes(loaded) -> int:
    """Bytes of every layer's expert weights, in the checkpoint's dtype."""
    return sum(l.expert_param_count() * l.num_experts * l.weight("down").element_size() for l in loaded.layers)


def use_lazy(loaded) -> bool:
    """Whether plans on `loaded` (a LoadedModel) are applied lazily: above LAZY_ABOVE_BYTES of experts."""
    return expert_bytes(loaded) > LAZY_ABOVE_BYTES


def calibration_fingerprint(compressor: Compressor, plan: CompressionPlan, samples=None) -> str | None:
    """The calibration a run of `plan` depends on, for the run store: the statistics' fingerprint, and
    for a plan compressed on calibration windows (sequential, SparseGPT / GPTQ) those windows when they
    are not the statistics' own (without statistics, the windows alone: else a plan run on other
    windows would be reused as if it were the same run)."""
    stats = compressor.stats
    fp = stats.fingerprint if stats is not None else None
    if samples is not None and (plan.sequential or plan.second_order()) and \
            (stats is None or samples.fingerprint != stats.data_fingerprint):
        fp = f"{fp or ''}|windows {samples.fingerprint}"
    return fp


def has_tasks(result: EvalResult, tasks) -> bool:
    """Whether `result` holds task scores run with these TaskSettings (None: no tasks asked for)."""
    if tasks is None:
        return True
    stored = dict(result.task_settings or {})
    stored.pop("lm_eval_version", None)
    try:
        return bool(result.tasks) and type(tasks)(**stored).key() == tasks.key()
    except TypeError:
        return False


def stored_result(store: RunStore, compressor: Compressor, evaluator: Evaluator,
                  plan: CompressionPlan, samples=None, tasks=None) -> tuple[EvalResult, int] | None:
    """(EvalResult, run id) of the stored evaluation of this exact plan (its name aside) on the same model,
    calibration (`calibration_fingerprint`) and held-out text (`RunStore.find_run`), or None; with
    `tasks` (TaskSettings), only a run that has these tasks' scores."""
    found = store.find_run(compressor.loaded.fingerprint, plan.to_dict(),
                           calibration_fingerprint(compressor, plan, samples), evaluator.fingerprint)
    if found is None or not found.metrics.get("details"):
        return None
    try:
        result = EvalResult(**found.metrics["details"])
    except TypeError:  # stored by a moeviz whose EvalResult had other fields: evaluate again
        return None
    return (result, found.id) if has_tasks(result, tasks) else None


def evaluate_plan(compressor: Compressor, evaluator: Evaluator, plan: CompressionPlan,
                  store: RunStore | None = None, sweep_id: str | None = None, samples=None,
                  lazy: bool | None = None, reuse: bool = True, tasks=None, progress=None):
    """Apply + evaluate (+ store) one plan: returns (EvalResult, run id or None). The one evaluation path:
    `moeviz.session.Session.evaluate` (the app, the CLI) and `run_sweep` come here.
    tasks: TaskSettings to also run lm-eval tasks (moeviz.evaluation.tasks); a stored run is reused
    only if it has them.

    With a store and `reuse`, a plan already evaluated on this model, calibration and held-out text
    returns its stored run instead of storing a duplicate (the run keeps its own sweep id).
    lazy: compress each expert while the forward reaches it (None: `use_lazy`); the result is the same
    either way. progress(stage, done, total, seconds left or None): stage "apply" (layers of a sequential or
    second-order plan; (0, 1) when applying starts), then "evaluate" (held-out batches)."""
    if store is not None and reuse:
        found = stored_result(store, compressor, evaluator, plan, samples, tasks)
        if found is not None:
            return found
    start = time.perf_counter()
    if progress is not None:
        progress("apply", 0, 1)
    compressed = compressor.apply(plan, samples, lazy=use_lazy(compressor.loaded) if lazy is None else lazy,
                                  progress=(lambda d, t, left=None: progress("apply", d, t, left)) if progress else None)
    result = evaluator.evaluate(compressed, progress=(lambda d, t: progress("evaluate", d, t)) if progress else None,
                                tasks=tasks)
    run_id = None
    if store is not None:
        run_id = store_result(store, result, plan, compressor.loaded.fingerprint,
                              calibration_fingerprint(compressor, plan, samples), sweep_id,
                              duration_s=time.perf_counter() - start)
    return result, run_id


def run_sweep(compressor: Compressor, evaluator: Evaluator, plans: Sequence[CompressionPlan],
              store: RunStore | None = None, sweep_id: str | None = None,
              progress: Callable[[int, int, dict], None] | None = None,
              should_stop: Callable[[], bool] | None = None, samples=None, reuse: bool = True,
              tasks=None) -> pd.DataFrame:
    """Evaluate `plans` in order; one DataFrame row per finished plan.

    A plan evaluated before (same model, calibration, held-out text) reuses its stored run (column
    ``reused``): repeating a sweep stores no duplicates. tasks: TaskSettings to also run lm-eval tasks
    on every plan (columns task_acc[name], task_average, ... and their stderr).

    progress(done, total, row) after each plan; should_stop() is checked before each plan and a
    True stops the sweep (the returned frame then has `attrs["cancelled"] = True`).
    """
    sweep_id = sweep_id or (new_sweep_id() if store is not None else None)
    rows, task_rows, cancelled = [], [], False
    for i, plan in enumerate(plans):
        if should_stop is not None and should_stop():
            cancelled = True
            break
        found = stored_result(store, compressor, evaluator, plan, samples, tasks) if store is not None and reuse else None
        reused = found is not None
        result, run_id = found or evaluate_plan(compressor, evaluator, plan, store, sweep_id, samples, reuse=False,
                                                tasks=tasks)
        row = dict(run_id=run_id, reused=reused, name=plan_label(plan), method=method_name(plan.to_dict()), structure=plan.pruning.structure,
                   sparsity=plan.pruning.sparsity if plan.nm() is None else plan.nm()[0] / plan.nm()[1],
                   bits=plan.quant.bits, removed_experts=len(plan.removed_experts), **result.metrics(),
                   plan_json=plan.to_json(indent=None))
        rows.append(row)
        if result.tasks:
            task_rows.append(dict(name=row["name"], run_id=run_id, tasks=result.tasks, base_tasks=result.base_tasks,
                                  task_settings=result.task_settings))
        if progress is not None:
            progress(i + 1, len(plans), row)
    df = pd.DataFrame(rows)
    df.attrs.update(cancelled=cancelled, sweep_id=sweep_id, task_results=task_rows)
    return df
