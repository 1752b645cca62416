"""Errors that moeviz raises for bad input.

Every message says what was found and what to do, so the app can show it verbatim with `st.error`
and the CLI can print it as one line.
"""


class MoevizError(Exception):
    """Base class: a user-facing problem (bad input, unsupported model), not a bug."""


class ModelSourceError(MoevizError):
    """The model source (folder or hub id) cannot be used: missing, no config, offline, unsafe weights."""


class NotAnMoEModelError(MoevizError):
    """The model loaded but has no Mixture-of-Experts layers that moeviz understands."""


class InsufficientMemoryError(MoevizError):
    """The model's estimated size does not fit in the memory available on the chosen device."""


class CalibrationDataError(MoevizError):
    """Calibration or evaluation text is empty, too short or malformed."""


class PlanError(MoevizError):
    """A compression plan is invalid; the message names the field and the reason."""


class SettingsError(MoevizError):
    """An evaluation or run setting is invalid (unknown accelerator, non-positive count, ...)."""
