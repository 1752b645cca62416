"""Model-independent evaluation: routing drift, load balance, perplexity/accuracy accumulation,
compression ratios, decode latency (measured here or projected by a roofline) and Pareto fronts.

Functions take tensors, numbers and DataFrames; the code that runs models and applies compression
plans builds on them. Only `measure_latency` runs a model (any transformers causal LM).
"""

from .latency import (
    ACCELERATORS,
    Accelerator,
    MeasuredLatency,
    ProjectedLatency,
    active_bytes_per_token,
    active_flops_per_token,
    measure_latency,
    projected_decode_latency,
)
from .metrics import (
    IGNORE_INDEX,
    KL_EPSILON,
    RoutingDrift,
    TokenLossAccumulator,
    accuracy,
    compression_summary,
    load_balance_cv,
    perplexity_from_nll,
    routing_drift,
    routing_drift_per_layer,
    utilization_shift,
)
from .pareto import mark_pareto, pareto_front, pareto_mask

__all__ = [
    "ACCELERATORS",
    "Accelerator",
    "IGNORE_INDEX",
    "KL_EPSILON",
    "MeasuredLatency",
    "ProjectedLatency",
    "RoutingDrift",
    "TokenLossAccumulator",
    "accuracy",
    "active_bytes_per_token",
    "active_flops_per_token",
    "compression_summary",
    "load_balance_cv",
    "mark_pareto",
    "measure_latency",
    "pareto_front",
    "pareto_mask",
    "perplexity_from_nll",
    "projected_decode_latency",
    "routing_drift",
    "routing_drift_per_layer",
    "utilization_shift",
]

from .evaluate import EvalResult, EvalSettings, Evaluator, load_eval_samples  # noqa: E402
from .sweep import evaluate_plan, grid_plans, plan_label, run_sweep  # noqa: E402

__all__ += ["EvalResult", "EvalSettings", "Evaluator", "evaluate_plan", "grid_plans", "load_eval_samples",
            "plan_label", "run_sweep"]
