"""Model layer: loading, per-family adapters, and a uniform description of MoE layers."""

from moeviz.models.adapters import FamilyAdapter, supported_model_types
from moeviz.models.experts import experts_forward
from moeviz.models.layers import MoELayer, find_moe_layers, require_moe_layers
from moeviz.models.loading import DEMO_MODEL_DIR, LoadedModel, ModelInfo, describe_model, load_model

__all__ = [
    "DEMO_MODEL_DIR",
    "FamilyAdapter",
    "LoadedModel",
    "MoELayer",
    "ModelInfo",
    "describe_model",
    "experts_forward",
    "find_moe_layers",
    "load_model",
    "require_moe_layers",
    "supported_model_types",
]
