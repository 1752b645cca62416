"""Session state, caches and error display shared by the Streamlit pages (Streamlit glue only;
every computation is a `moeviz` library call).

- The base model is loaded once per (source, dtype, device) with `st.cache_resource` and shared by
  every browser session; nothing ever mutates it (compression works on structural copies).
- The evaluator (the base model's outputs on the held-out text) is shared the same way.
- Calibration statistics are cached on disk by fingerprint (`moeviz.workspace`).
- Each session has its own plan, its own `Compressor` (rank caches) and its own results; results
  belong to the model they were computed on (`MODEL_SCOPED`) and are dropped when the model changes.
"""

from __future__ import annotations

import contextlib

import streamlit as st

import moeviz
from moeviz.compression.apply import Compressor
from moeviz.compression.plan import CompressionPlan, PruningSettings
from moeviz.errors import MoevizError, PlanError
from moeviz.evaluation import EvalSettings, Evaluator, load_eval_samples
from moeviz.store import RunStore

DEFAULTS = dict(
    model_source="",  # empty = bundled demo MoE
    dtype="auto",
    device="cpu",
    trust_remote_code=False,
    stats=None,
    # A newcomer's first "Evaluate" shows a real trade-off: 50 % router-weighted (MoE-Pruner) pruning.
    plan=CompressionPlan(pruning=PruningSettings(metric="moe_pruner", sparsity=0.5)).to_dict(),
    last_result=None,
    last_run_id=None,
    sweep_df=None,
    calibration_samples=None,  # the TokenSamples behind `stats` (recovery and sequential plans train / re-calibrate on them)
    recovery=None,  # last recovery: {"run_id", "parent_run_id", "plan", "summary", "history", "result"}
    recovered_model=None,  # its CompressedModel (one per session), for export
    selected_run_id=None,
    explorer_text="def greet(name):\n    return f'Hello, {name}!'\n\nThe interpreter reads the source file.",
    results_model=None,  # fingerprint of the model the MODEL_SCOPED entries belong to
)
# Session entries computed on one model: after a switch (another folder, dtype or device) they would
# show, export or recover another model's evaluation or weights.
MODEL_SCOPED = ("last_result", "last_run_id", "recovery", "recovered_model", "sweep_df", "selected_run_id")
EVAL_SEQ_LEN = 256


def init_session() -> None:
    for key, value in DEFAULTS.items():
        st.session_state.setdefault(key, value)


@st.cache_resource(show_spinner="Loading the model…", max_entries=2)
def load_base_model(source: str, dtype: str, device: str, trust_remote_code: bool):
    return moeviz.load_model(source or None, dtype=dtype, device=device, trust_remote_code=trust_remote_code)


@st.cache_resource(show_spinner="Evaluating the base model on the held-out text (once per model)…", max_entries=2)
def base_evaluator(model_fingerprint: str, _loaded, measure_latency: bool = True) -> Evaluator:
    context = _loaded.max_context or EVAL_SEQ_LEN  # a model built for shorter windows is evaluated on its context
    samples = load_eval_samples(_loaded.tokenizer, seq_len=min(EVAL_SEQ_LEN, context), max_samples=64,
                                max_seq_len=_loaded.max_context)
    settings = EvalSettings(measure_latency=measure_latency, latency_decode_tokens=8, latency_repeats=2)
    return Evaluator(_loaded, samples, settings)


@st.cache_resource
def run_store() -> RunStore:
    return RunStore()


def current_model():
    """The session's base model (the demo MoE unless the user chose another)."""
    s = st.session_state
    return load_base_model(s.model_source, s.dtype, s.device, s.trust_remote_code)


def current_plan() -> CompressionPlan:
    return CompressionPlan.from_dict(st.session_state.plan)


def set_plan(plan: CompressionPlan) -> None:
    st.session_state.plan = plan.to_dict()


def compressor(loaded, stats) -> Compressor:
    """This session's Compressor for (model, stats); rebuilt when either changes."""
    key = (loaded.fingerprint, stats.fingerprint if stats is not None else None)
    if st.session_state.get("_compressor_key") != key:
        st.session_state._compressor = Compressor(loaded, stats, cache_ranks=True)  # slider: one comparison per plan
        st.session_state._compressor_key = key
    return st.session_state._compressor


def stats_for(loaded):
    """The session's calibration statistics if they belong to the loaded model, else None."""
    stats = st.session_state.stats
    return stats if stats is not None and stats.model_fingerprint == loaded.fingerprint else None


def calibration_samples(loaded, stats):
    """The token windows the statistics were computed on: kept from calibration in this session,
    else rebuilt from the bundled text with the statistics' settings (same fingerprint)."""
    samples = st.session_state.get("calibration_samples")
    if samples is not None and samples.fingerprint == stats.data_fingerprint:
        return samples
    import moeviz

    return moeviz.load_calibration_data(loaded.tokenizer, None, n_samples=stats.settings["n_samples"],
                                        seq_len=stats.settings["seq_len"], seed=stats.settings["seed"],
                                        max_seq_len=loaded.max_context)


def plan_samples(loaded, stats, plan: CompressionPlan):
    """What `Compressor.apply` needs besides the plan: the calibration windows for a sequential plan
    (it re-calibrates layer by layer on them), None otherwise."""
    if not plan.sequential:
        return None
    if stats is None:
        raise PlanError("sequential: re-calibrating layer by layer needs calibration; run it on the "
                        "Model & calibration page first")
    return calibration_samples(loaded, stats)


def scope_results_to(loaded) -> None:
    """Drop the MODEL_SCOPED entries when they belong to another model than `loaded`. Dropping, not
    keeping a set per model, also frees a recovered model (its tensors and its base)."""
    s = st.session_state
    if s.get("results_model") != loaded.fingerprint:
        for key in MODEL_SCOPED:
            s[key] = DEFAULTS[key]
        s.results_model = loaded.fingerprint


@contextlib.contextmanager
def user_errors():
    """Show library errors as `st.error` with the library's message; the app stays usable."""
    try:
        yield
    except MoevizError as e:
        st.error(str(e))
        st.stop()


def require_model():
    with user_errors():
        loaded = current_model()
    scope_results_to(loaded)
    return loaded


def require_stats(loaded):
    stats = stats_for(loaded)
    if stats is None:
        st.info("Run calibration on the **Model & calibration** page first: these views come from its statistics.")
        st.page_link("pages/1_model_and_calibration.py", label="Go to Model & calibration", icon="➡️")
        st.stop()
    return stats
