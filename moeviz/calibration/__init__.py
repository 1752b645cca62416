"""One-pass calibration statistics (routing, co-activation, per-expert input norms)."""

from moeviz.calibration.collect import calibrate
from moeviz.calibration.stats import CalibrationStats, LayerStats

__all__ = ["CalibrationStats", "LayerStats", "calibrate"]
