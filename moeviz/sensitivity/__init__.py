"""Per-expert sensitivity (measured and estimated), a budget optimiser over the grid of per-expert
settings, and the one-pass vs sequential comparison. Pure library: no Streamlit."""

from moeviz.sensitivity.measure import (
    DEFAULT_BITS, DEFAULT_SPARSITIES, ExpertSensitivity, SensitivityGrid, measure_sensitivity, spearman,
)

__all__ = ["DEFAULT_BITS", "DEFAULT_SPARSITIES", "ExpertSensitivity", "SensitivityGrid", "measure_sensitivity",
           "spearman"]
