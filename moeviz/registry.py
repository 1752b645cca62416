"""The named things moeviz knows, each defined once: pruning methods, N:M patterns, result metrics.

* A new pruning method starts here (one `PruningMethod` line), then gets its score in
  `compression/scores.py` (first order) or its kernel in `compression/obs.py` (second order); plans,
  the CLI's help and the app's choices read the names from here.
* A new result metric (a number an evaluation reports) gets one `ResultMetric` line: figures take its
  axis title, display scale and direction (which way is better) from here.

Pure data: importing this module imports nothing heavy (the CLI builds its help from it).
"""

from __future__ import annotations

from dataclasses import dataclass

from moeviz.errors import PlanError


@dataclass(frozen=True)
class PruningMethod:
    name: str  # as written in a plan (`pruning.metric`)
    label: str  # as a person reads it
    needs_stats: bool  # scores weights with calibration statistics (input norms)
    second_order: bool  # OBS with per-expert Hessians, layer by layer (needs calibration samples)


METHODS: tuple[PruningMethod, ...] = (
    PruningMethod("magnitude", "Magnitude |W|", needs_stats=False, second_order=False),
    PruningMethod("wanda", "Wanda |W|·‖X‖", needs_stats=True, second_order=False),
    PruningMethod("moe_pruner", "MoE-Pruner |W|·‖X·gate‖", needs_stats=True, second_order=False),
    PruningMethod("sparsegpt", "SparseGPT (second order)", needs_stats=False, second_order=True),
)
METRICS = tuple(m.name for m in METHODS)  # every `pruning.metric` a plan may name
SCORE_METRICS = tuple(m.name for m in METHODS if not m.second_order)  # scored weight by weight (`scores.py`)

# N:M patterns the app offers ("N of every M consecutive input weights of a row are zeroed"); a plan may
# name any N:M with 0 < N < M whose M divides the pruned rows.
NM_PATTERNS = ("2:4", "4:8")
STRUCTURES = ("unstructured",) + NM_PATTERNS


def method(name: str) -> PruningMethod:
    for m in METHODS:
        if m.name == name:
            return m
    raise PlanError(f"pruning.metric: unknown metric {name!r}; choose one of {', '.join(METRICS)}")


def metric_needs_stats(name: str) -> bool:
    return method(name).needs_stats


def parse_nm(structure: str, name: str = "pruning.structure") -> tuple[int, int]:
    """(N, M) of an "N:M" structure; PlanError naming `name` for anything else."""
    try:
        n, m = (int(v) for v in str(structure).split(":"))
    except ValueError:
        raise PlanError(f"{name}: {structure!r} is neither 'unstructured' nor 'N:M' (e.g. '2:4')") from None
    if not 0 < n < m:
        raise PlanError(f"{name}: {structure!r} needs 0 < N < M (N of every M weights are zeroed)")
    return n, m


def nm_of(structure: str, name: str = "pruning.structure") -> tuple[int, int] | None:
    """(N, M) for an N:M structure, None for "unstructured"."""
    return None if structure == "unstructured" else parse_nm(structure, name)


# ---------------------------------------------------------------------------- result metrics

@dataclass(frozen=True)
class ResultMetric:
    name: str  # key in an evaluation's metrics and the run store's column
    label: str  # axis title, with its unit
    scale: float  # displayed value = stored value × scale (shares are stored as fractions, shown in %)
    higher_is_better: bool


RESULT_METRICS: tuple[ResultMetric, ...] = (
    ResultMetric("accuracy", "Next-token accuracy (%)", 100.0, True),
    ResultMetric("perplexity", "Perplexity (held-out, exp of mean NLL; lower is better)", 1.0, False),
    ResultMetric("perplexity_increase", "Perplexity increase over base (%)", 100.0, False),
    ResultMetric("compression_ratio", "Compression ratio on paper (× smaller, documented formats vs the checkpoint dtype)",
                 1.0, True),
    ResultMetric("compression_ratio_bf16", "Compression ratio on paper vs bf16 (× smaller, how papers count)", 1.0, True),
    ResultMetric("export_compression_ratio", "Compression ratio of the best exportable format (× smaller, bytes written)",
                 1.0, True),
    ResultMetric("experts_compression_ratio", "Experts compression ratio (× smaller, expert weight bytes)", 1.0, True),
    ResultMetric("projected_decode_ms", "Decode latency, projected (device) (ms/token)", 1.0, False),
    ResultMetric("measured_decode_ms", "Decode latency, measured (this machine) (ms/token)", 1.0, False),
    ResultMetric("interleaved_decode_ms", "Decode latency, measured back to back with base (ms/token)", 1.0, False),
    ResultMetric("mean_cv", "Load-balance CV, mean over layers (std/mean, unitless)", 1.0, False),
    ResultMetric("mean_topk_overlap", "Top-k overlap with base, mean over layers (%)", 100.0, True),
    ResultMetric("mean_top1_change", "Top-1 change rate vs base, mean over layers (%)", 100.0, False),
    ResultMetric("mean_kl", "Router KL(base ‖ compressed), mean over layers (nats)", 1.0, False),
    ResultMetric("parameter_bytes", "Stored parameters (bytes)", 1.0, False),
    ResultMetric("sparsity", "Sparsity (%)", 100.0, True),
)
RESULT_METRIC = {m.name: m for m in RESULT_METRICS}


def method_label(name: str) -> str:
    """A pruning metric as a person reads it ("moe_pruner" -> "MoE-Pruner |W|·‖X·gate‖"); an unknown name
    (an old run's plan) as it is written."""
    return next((m.label for m in METHODS if m.name == name), name)


def method_display(series: str) -> str:
    """A run's method as `compression.plan.method_name` writes it (an identifier, maybe with suffixes:
    "moe_pruner + gptq · optimised"), as a person reads it: "MoE-Pruner |W|·‖X·gate‖ + GPTQ · optimised".
    For legends, filters and tables; the identifier stays the key that groups and colours runs."""
    head, sep, rest = series.partition(" ")
    return method_label(head) + sep + rest.replace("+ gptq", "+ GPTQ")
