"""On-disk cache of per-expert sensitivity, keyed like the calibration statistics: the model's, the
statistics' and the calibration data's fingerprints and the grid (`<data dir>/sensitivity/<fp>/`)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from moeviz.calibration.stats import CalibrationStats
from moeviz.data import TokenSamples
from moeviz.models.loading import LoadedModel
from moeviz.sensitivity.measure import ExpertSensitivity, SensitivityGrid, measure_sensitivity, sensitivity_fingerprint
from moeviz.store import data_dir


def sensitivity_cache_dir() -> Path:
    return data_dir() / "sensitivity"


def sensitivity_cached(loaded: LoadedModel, stats: CalibrationStats | None, samples: TokenSamples,
                       grid: SensitivityGrid | None = None, batch_size: int = 16, progress=None, cancel=None,
                       cache_dir: Path | None = None, measure: bool = True,
                       cache_only: bool = False) -> tuple[ExpertSensitivity | None, bool]:
    """(sensitivity, loaded_from_cache). Measured once per (model, stats, data, grid); measure=False
    computes only the one-backward proxies (for models where the measured loop is too slow).
    cache_only=True never measures: (None, False) when this measurement is not in the cache (a page
    reloading a measurement after a browser refresh)."""
    grid = (grid or SensitivityGrid()).validate()
    key = grid.to_dict() | dict(batch_size=batch_size, measure=measure)  # batching decides float rounding, so it is part of the key
    fp = sensitivity_fingerprint(loaded.fingerprint, stats.fingerprint if stats is not None else None,
                                 samples.fingerprint, key)
    folder = (cache_dir or sensitivity_cache_dir()) / fp
    if (folder / "sensitivity.json").exists():
        try:
            return ExpertSensitivity.load(folder), True
        except (ValueError, OSError, KeyError):
            shutil.rmtree(folder, ignore_errors=True)  # stale or partial: measure again
    if cache_only:
        return None, False
    sens = measure_sensitivity(loaded, stats, samples, grid, batch_size=batch_size, measure=measure,
                               progress=progress, cancel=cancel)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    sens.save(tmp)
    try:
        tmp.rename(folder)  # atomic: a concurrent session sees all of it or nothing
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return sens, False
