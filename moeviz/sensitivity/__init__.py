"""Per-expert sensitivity (measured and estimated), a budget optimiser over the grid of per-expert
settings, and the one-pass vs sequential comparison. Pure library: no Streamlit. See docs/SENSITIVITY.md."""

from moeviz.sensitivity.budget import BUDGET_KINDS, Budget, BudgetResult, optimise_plan, solve_mckp
from moeviz.sensitivity.cache import sensitivity_cached
from moeviz.sensitivity.measure import (
    DEFAULT_BITS, DEFAULT_SPARSITIES, ExpertSensitivity, SensitivityGrid, first_windows, measure_sensitivity, spearman,
)
from moeviz.sensitivity.sequential import SequentialComparison, compare_one_pass_sequential

__all__ = ["BUDGET_KINDS", "Budget", "BudgetResult", "DEFAULT_BITS", "DEFAULT_SPARSITIES", "ExpertSensitivity",
           "SensitivityGrid", "SequentialComparison", "compare_one_pass_sequential", "first_windows",
           "measure_sensitivity", "optimise_plan", "sensitivity_cached", "solve_mckp", "spearman"]
