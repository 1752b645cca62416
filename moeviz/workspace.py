"""Caches that the app and the CLI share: calibration statistics on disk, keyed by fingerprints.

Calibrating the same model on the same data with the same settings again loads the saved
statistics instead of running the pass (`<data dir>/stats/<fingerprint>/`).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from moeviz.calibration.collect import calibrate, weight_rule_settings
from moeviz.calibration.stats import CalibrationStats, stats_fingerprint
from moeviz.data import TokenSamples, check_seq_len
from moeviz.models.loading import LoadedModel
from moeviz.store import data_dir


def stats_cache_dir() -> Path:
    return data_dir() / "stats"


def calibrate_cached(loaded: LoadedModel, samples: TokenSamples, batch_size: int = 8, hist_bins: int = 20,
                     record_tokens: int = 4096, progress=None, cache_dir: Path | None = None,
                     cache_only: bool = False) -> tuple[CalibrationStats | None, bool]:
    """(stats, loaded_from_cache). The settings that change the result are part of the key.
    cache_only: return (None, False) instead of calibrating when nothing is cached (the app restores
    a shared link's calibration from the cache, never by starting a long pass on its own)."""
    check_seq_len(samples.seq_len, loaded.max_context)  # windows past the context would be cached for good
    settings = dict(batch_size=batch_size, hist_bins=hist_bins, record_tokens=record_tokens,
                    n_samples=samples.n_samples, seq_len=samples.seq_len, seed=samples.seed,
                    # the verified routing rules decide how probabilities are formed: part of the key, as in calibrate
                    distributions=[l.distribution for l in loaded.layers], **weight_rule_settings(loaded.layers))
    folder = (cache_dir or stats_cache_dir()) / stats_fingerprint(loaded.fingerprint, samples.fingerprint, settings)
    if (folder / "stats.json").exists():
        try:
            return CalibrationStats.load(folder), True
        except (ValueError, OSError, KeyError):
            shutil.rmtree(folder, ignore_errors=True)  # stale or partial: recalibrate
    if cache_only:
        return None, False
    stats = calibrate(loaded, samples, batch_size=batch_size, hist_bins=hist_bins, record_tokens=record_tokens,
                      progress=progress)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    stats.save(tmp)
    try:
        tmp.rename(folder)  # atomic: a concurrent session either sees all of it or nothing
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another session saved it first
    return stats, False
