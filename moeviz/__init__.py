"""moeviz: see how a Mixture-of-Experts model routes, compress it per expert, and measure the cost.

The public API, shared by the Streamlit app, the CLI and notebooks:

    import moeviz
    from moeviz import runtime_config; runtime_config.configure()  # optional: as the app and the CLI (memory)
    lm = moeviz.load_model()                            # the bundled demo MoE (or a folder / hub id)
    data = moeviz.load_calibration_data(lm.tokenizer)   # bundled text, a .txt/.jsonl file, documents
    stats = moeviz.calibrate(lm, data)                  # one streaming pass
    stats.utilization_matrix()                          # [layers, experts]

Names are imported lazily so `import moeviz` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "moeviz.models.loading",
    "LoadedModel": "moeviz.models.loading",
    "ModelInfo": "moeviz.models.loading",
    "MoELayer": "moeviz.models.layers",
    "find_moe_layers": "moeviz.models.layers",
    "supported_model_types": "moeviz.models.adapters",
    "Document": "moeviz.data",
    "TokenSamples": "moeviz.data",
    "load_calibration_data": "moeviz.data",
    "tokenize_documents": "moeviz.data",
    "documents_from_text": "moeviz.data",
    "documents_from_file": "moeviz.data",
    "documents_from_hf_dataset": "moeviz.data",
    "bundled_documents": "moeviz.data",
    "calibrate": "moeviz.calibration.collect",
    "CalibrationStats": "moeviz.calibration.stats",
    "LayerStats": "moeviz.calibration.stats",
    "MoevizError": "moeviz.errors",
    "recover": "moeviz.recovery.distill",
    "RecoverySettings": "moeviz.recovery.distill",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'moeviz' has no attribute {name!r}")


def __dir__():
    return __all__
