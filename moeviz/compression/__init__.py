"""Pure tensor functions of the compression engine: scores, masks, quantization, storage, allocation.

Nothing here touches a model or a module; :mod:`moeviz.compression.plan` and
:mod:`moeviz.compression.apply` build on these functions.
"""

from .allocation import PRESETS, allocate_sparsity, validate_ratio, weighted_mean
from .formats import NM_METADATA, TensorStorage, storage_for
from .masks import mask_from_ranks, nm_mask, prune_counts, row_ranks, unstructured_row_mask
from .quantize import (
    SUPPORTED_BITS,
    QuantizedWeight,
    check_bits,
    fake_quantize_activations,
    quantize_weight,
)
from .scores import METRICS, importance_scores
from .plan import CompressionPlan, Override, PruningSettings, QuantSettings

__all__ = [
    "METRICS",
    "NM_METADATA",
    "PRESETS",
    "SUPPORTED_BITS",
    "QuantizedWeight",
    "TensorStorage",
    "allocate_sparsity",
    "check_bits",
    "fake_quantize_activations",
    "importance_scores",
    "mask_from_ranks",
    "nm_mask",
    "prune_counts",
    "quantize_weight",
    "row_ranks",
    "storage_for",
    "unstructured_row_mask",
    "validate_ratio",
    "weighted_mean",
]

__all__ += ["CompressionPlan", "Override", "PruningSettings", "QuantSettings"]
