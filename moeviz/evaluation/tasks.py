"""Task accuracy as papers report it: lm-eval-harness run on a (compressed) model held in memory.

lm-eval-harness is an optional extra (`pip install 'moeviz[eval]'`); nothing else in moeviz imports it.
`evaluate_tasks` wraps the model as lm-eval's `HFLM(pretrained=model, tokenizer=tok)`, which calls it only
as `model(input_ids).logits`: a compressed copy whose MoE blocks are runtime subclasses, a lazily
compressed model or an offloaded one are evaluated as they are, never saved first (the agreement with
lm-eval run on the exported folder is tested: tests/test_tasks.py).

Tasks are lm-eval task names or tags: the bundled ones (`sample_data/tasks`, see `bundled_tasks`; the
alias "bundled" names them all), those of a folder given as `include_path` (as lm-eval's
`--include_path`), and lm-eval's standard tasks when their data sets can be loaded (online or cached).
Every score is recorded with what a paper needs to state it: task version, items (n), few-shot count,
seed, item limit, and its standard error (lm-eval's; for acc the sample standard error of the mean).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from moeviz.errors import MoevizError, SettingsError

BUNDLED_ALIAS = "bundled"
INSTALL_HINT = "pip install 'moeviz[eval]'"
# Windows per forward batch of a lazily compressed model: each batch compresses every expert it reaches
# again (see evaluate.lazy_batch_size), so a lazy model gets fewer, larger batches.
LAZY_BATCH_SIZE = 128


class TasksUnavailableError(MoevizError):
    """lm-eval-harness (the `eval` extra) is not installed, or a task cannot be loaded."""


def require_lm_eval():
    """The lm_eval module, or one clear line naming the extra to install."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError:
        raise TasksUnavailableError(
            f"task accuracy needs lm-eval-harness, which is not installed: {INSTALL_HINT}") from None
    return lm_eval


def lm_eval_available() -> bool:
    try:
        require_lm_eval()
        return True
    except TasksUnavailableError:
        return False


@dataclass
class TaskSettings:
    """Which tasks and how: the same for the base and every plan, so their scores compare."""

    tasks: list[str] = field(default_factory=lambda: [BUNDLED_ALIAS])
    include_path: str | None = None  # a folder of lm-eval task YAMLs (lm-eval's --include_path)
    limit: int | None = None  # the first N items of each task (lm-eval's --limit); None: all
    num_fewshot: int = 0
    seed: int = 1234  # lm-eval's random / numpy / torch / few-shot seeds
    batch_size: int = 32

    @classmethod
    def from_cli(cls, tasks: str | None, include_path: str | None = None, limit: int | None = None,
                 num_fewshot: int = 0, seed: int = 1234) -> "TaskSettings | None":
        """From "a,b" (None or "": no tasks)."""
        names = [t.strip() for t in (tasks or "").split(",") if t.strip()]
        if not names:
            if include_path or limit is not None:
                raise SettingsError("--include-path / --limit need --tasks (e.g. --tasks bundled)")
            return None
        return cls(tasks=names, include_path=include_path, limit=limit, num_fewshot=num_fewshot, seed=seed).validate()

    def validate(self) -> "TaskSettings":
        if not self.tasks or not all(isinstance(t, str) and t.strip() for t in self.tasks):
            raise SettingsError(f"tasks: give at least one task name, got {self.tasks!r}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise SettingsError(f"limit: must be a positive integer or None, got {self.limit!r}")
        for name in ("num_fewshot", "seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise SettingsError(f"{name}: must be a non-negative integer, got {getattr(self, name)!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise SettingsError(f"batch_size: must be a positive integer, got {self.batch_size!r}")
        if self.include_path is not None and not Path(self.include_path).expanduser().is_dir():
            raise SettingsError(f"include_path: {self.include_path} is not a folder of lm-eval task YAML files")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    def key(self) -> str:
        """What the scores depend on (not the batch size): base results are cached and stored runs
        matched by it."""
        d = {k: v for k, v in self.to_dict().items() if k != "batch_size"}
        return json.dumps(d, sort_keys=True)


@dataclass
class TaskResults:
    """{task: {acc, acc_stderr, acc_norm, acc_norm_stderr, n, version, num_fewshot, seed, limit}}; stderr
    None where lm-eval gives none (one item). `samples`: per task, per item, the loglikelihood of every
    choice (only when asked for: they are large and not stored with runs)."""

    tasks: dict
    settings: dict
    lm_eval_version: str
    seconds: float
    samples: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _number(v):
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
        return float(v)
    return None  # lm-eval writes "N/A" for a stderr it cannot compute


_MANAGERS: dict = {}


def task_manager(include_path: str | None, defaults: bool):
    """lm-eval's TaskManager over the bundled tasks, `include_path` and (if `defaults`) lm-eval's own
    tasks. Indexing lm-eval's ~15k standard tasks takes seconds, so they are indexed only when a task
    is not found among the others, and each manager is built once per process."""
    from lm_eval.tasks import TaskManager

    from moeviz.evaluation.bundled_tasks import BUNDLED_TASKS_DIR

    paths = [str(BUNDLED_TASKS_DIR)] + ([str(Path(include_path).expanduser().resolve())] if include_path else [])
    key = (tuple(paths), defaults)
    if key not in _MANAGERS:
        _MANAGERS[key] = TaskManager(include_path=paths, include_defaults=defaults)
    return _MANAGERS[key]


def resolve_tasks(settings: TaskSettings):
    """(task names as lm-eval knows them, TaskManager): "bundled" → the bundled tag; a name not found
    → SettingsError listing the closest available ones."""
    from moeviz.evaluation.bundled_tasks import TAG

    names = [TAG if t == BUNDLED_ALIAS else t for t in settings.tasks]
    manager = task_manager(settings.include_path, defaults=False)
    if any(n not in manager.all_tasks for n in names):
        manager = task_manager(settings.include_path, defaults=True)
    missing = [n for n in names if n not in manager.all_tasks]
    if missing:
        import difflib

        close = sorted({c for n in missing for c in difflib.get_close_matches(n, manager.all_tasks, n=3)})
        raise SettingsError(f"unknown task(s) {', '.join(missing)}: not a bundled task ('{BUNDLED_ALIAS}'), "
                            "not in --include-path and not an lm-eval task"
                            + (f"; did you mean {', '.join(close)}?" if close else ""))
    return names, manager


def _task_names(results: dict) -> list[str]:
    """Leaf tasks of an lm-eval result (groups and tags expanded to the tasks they ran)."""
    return sorted(t for t in results["results"] if t in results.get("n-samples", {}))


def evaluate_tasks(model, tokenizer, settings: TaskSettings, lazy: bool = False,
                   keep_samples: bool = False) -> TaskResults:
    """Run lm-eval's `simple_evaluate` on `model` (a transformers causal LM in memory, any device) with
    `settings`. The caller's random-number state (Python, numpy, torch) is restored afterwards: lm-eval
    seeds them globally."""
    lm_eval = require_lm_eval()
    settings.validate()
    import random

    import numpy as np
    import torch
    from lm_eval.models.huggingface import HFLM

    from moeviz.models.offload import execution_device

    names, manager = resolve_tasks(settings)
    import lm_eval.evaluator as lm_evaluator

    start = time.perf_counter()
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    # simple_evaluate records the environment (torch's collect_env runs pip, conda, nvidia-smi, git in
    # subprocesses: ~1 s per call, more than 3 items of the demo take) into results moeviz does not keep.
    env_info = lm_evaluator.add_env_info, lm_evaluator.get_git_commit_hash
    lm_evaluator.add_env_info, lm_evaluator.get_git_commit_hash = (lambda results: None), (lambda: None)
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer,
                  batch_size=max(settings.batch_size, LAZY_BATCH_SIZE) if lazy else settings.batch_size)
        # HFLM sends the inputs to `model.device`, its first parameter's: "meta" for a model offloaded by
        # accelerate. Its hooks compute on their execution device: the inputs go there.
        lm._device = execution_device(model)
        out = lm_eval.simple_evaluate(
            model=lm, tasks=names, task_manager=manager, num_fewshot=settings.num_fewshot, limit=settings.limit,
            log_samples=keep_samples, random_seed=settings.seed, numpy_random_seed=settings.seed,
            torch_random_seed=settings.seed, fewshot_random_seed=settings.seed, verbosity="ERROR")
    except MoevizError:
        raise
    except AssertionError as e:  # lm-eval's checks on an item, with no message
        context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        raise TasksUnavailableError(
            f"lm-eval refused an item of {', '.join(settings.tasks)}: an answer longer than the model's context "
            f"({context} tokens) or a context that is blank; choose tasks whose items fit this model") from e
    except Exception as e:  # a data set that cannot be loaded (offline, gated), a malformed YAML, ...
        first = (str(e).splitlines() or [type(e).__name__])[0][:300]
        raise TasksUnavailableError(f"lm-eval could not run {', '.join(settings.tasks)}: {type(e).__name__}: "
                                    f"{first}") from e
    finally:
        lm_evaluator.add_env_info, lm_evaluator.get_git_commit_hash = env_info
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
    tasks = {}
    for name in _task_names(out):
        r = out["results"][name]
        n = out["n-samples"][name]
        tasks[name] = dict(
            acc=_number(r.get("acc,none")), acc_stderr=_number(r.get("acc_stderr,none")),
            acc_norm=_number(r.get("acc_norm,none")), acc_norm_stderr=_number(r.get("acc_norm_stderr,none")),
            n=int(n.get("effective", n.get("original", 0))), version=out.get("versions", {}).get(name),
            num_fewshot=out.get("n-shot", {}).get(name, settings.num_fewshot), seed=settings.seed,
            limit=settings.limit,
        )
    samples = None
    if keep_samples:
        samples = {name: [dict(doc_id=s["doc_id"], target=s["target"],
                               loglikelihoods=[float(r[0]) for r in s["filtered_resps"]])
                          for s in sorted(out["samples"][name], key=lambda s: s["doc_id"])]
                   for name in tasks}
    return TaskResults(tasks=tasks, settings=settings.to_dict(), lm_eval_version=lm_eval.__version__,
                       seconds=time.perf_counter() - start, samples=samples)


def task_average(tasks: dict, metric: str = "acc") -> tuple[float | None, float | None]:
    """(unweighted mean of `metric` over tasks, its standard error): each task counts once, as papers
    average tasks; the tasks' errors are independent, so se = sqrt(Σ se²) / T (None if one is missing)."""
    values = [t.get(metric) for t in tasks.values()]
    if not values or any(v is None for v in values):
        return None, None
    errors = [t.get(f"{metric}_stderr") for t in tasks.values()]
    se = math.sqrt(sum(e * e for e in errors)) / len(errors) if all(e is not None for e in errors) else None
    return sum(values) / len(values), se


def task_metrics(tasks: dict | None, prefix: str = "") -> dict:
    """Flat numbers of a run's task scores: task_acc[name], task_acc_stderr[name], task_acc_norm[name],
    task_average, task_average_stderr (prefix "base_" for the base model's)."""
    if not tasks:
        return {}
    m = {}
    for name, t in tasks.items():
        for k in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
            if t.get(k) is not None:
                m[f"{prefix}task_{k}[{name}]"] = t[k]
    avg, se = task_average(tasks)
    if avg is not None:
        m[f"{prefix}task_average"] = avg
        if se is not None:
            m[f"{prefix}task_average_stderr"] = se
    return m


__all__ = ["BUNDLED_ALIAS", "INSTALL_HINT", "TaskResults", "TaskSettings", "TasksUnavailableError", "evaluate_tasks",
           "lm_eval_available", "require_lm_eval", "resolve_tasks", "task_average", "task_metrics"]
