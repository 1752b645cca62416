"""Session state, caches and error display shared by the Streamlit pages (Streamlit glue only;
every computation is a `moeviz` library call).

- The base model is loaded once per (source, dtype, device) with `st.cache_resource` and shared by
  every browser session; nothing ever mutates it (compression works on structural copies).
- The evaluator (the base model's outputs on the held-out text) is shared the same way.
- Calibration statistics are cached on disk by fingerprint (`moeviz.workspace`).
- Each session has its own plan, its own `Compressor` (cached column factors and second-order results) and its own
  results; results belong to the model they were computed on (`MODEL_SCOPED`) and are dropped when the
  model changes.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import re
import zlib

import streamlit as st

import moeviz
from moeviz.compression.apply import Compressor
from moeviz.compression.plan import CompressionPlan, PruningSettings
from moeviz.errors import MoevizError, PlanError
from moeviz.evaluation import EvalSettings, Evaluator, load_eval_samples
from moeviz.session import Session
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
    calibration_settings=None,  # {"n_samples", "seq_len", "seed"} of a calibration on the bundled text (URL-restorable)
    sensitivity=None,  # the ExpertSensitivity shown on the Sensitivity page
    sensitivity_settings=None,  # {"metric", "group_size", "n_windows"} of that measurement (URL-restorable: on disk)
)
# Every other key a page keeps in st.session_state, with what it holds (tests/test_structure.py fails on a key
# spelled in a page and declared neither here nor in DEFAULTS; a widget's `key=` declares itself). No default:
# a page tests for the key's absence (`s.get`, `in s`).
SESSION_KEYS = {
    "_url_restored": "True once the URL was read for this browser session",
    "_restore_calibration": "the URL named a calibration still to load from the on-disk cache",
    "_url_run": "the run id the URL selected, applied once the model is loaded",
    "_url_problems": "what could not be restored from the URL, shown once as warnings",
    "_compressor": "this session's Compressor (its caches: column factors, second-order results)",
    "_compressor_key": "(model, statistics) fingerprints _compressor was built for",
    "calibration_source": "the name of the text the statistics were computed on (bundled, a file)",
    "_model_form_for": "the (source, dtype, device) the model form's widgets were filled from",
    "_plan_upload_done": "the uploaded plan file already loaded (a rerun does not load it again)",
    "_plan_widgets_for": "the plan JSON the plan widgets show (another plan refills them)",
    "_repick_removal": "the removal count / score changed: pick the experts to remove again",
    "_proxy": "the live quality proxy's per-layer errors for _proxy_for",
    "_proxy_for": "(model, statistics, plan key) _proxy was computed for",
    "_bulk_note": "the note of the last bulk edit of the expert table, shown once",
    "_auto_eval": "the person's choice: evaluate on every plan change",
    "_last_eval_s": "seconds the last evaluation took (a fast model defaults to auto-evaluate)",
    "_task_eval": "the person's choice: also run the lm-eval tasks",
    "_task_limit": "items per task for the lm-eval tasks (0 or None: all)",
    "_base_evaluated": "fingerprints of the models whose base this session has seen evaluated",
    "_reused": "last_result is a stored run reused, not a new evaluation",
    "_sweep_running": "a sweep started in this script run (a rerun without it means it was stopped)",
    "_sel_*": "the last selection of a chart / table (per chart key), so a rerun does not re-select",
    "_loaded_note": "the note after loading a run's plan into Compress, shown once",
    "sensitivity": "the Sensitivity page's last measured per-expert sensitivity",
    "budget_result": "the Sensitivity page's last budgeted plan and its predicted loss",
    "optimised_runs": "the Sensitivity page's evaluated budget plans (table rows)",
    "sequential_comparison": "the Sensitivity page's one-pass vs sequential comparison",
}
# Session entries computed on one model: after a switch (another folder, dtype or device) they would
# show, export or recover another model's evaluation or weights.
MODEL_SCOPED = ("last_result", "last_run_id", "recovery", "recovered_model", "sweep_df", "selected_run_id")
EVAL_SEQ_LEN = 256


def init_session() -> None:
    for key, value in DEFAULTS.items():
        st.session_state.setdefault(key, copy.deepcopy(value))


# ---------------------------------------------------------------------------- state in the URL
# ?model=<folder or hub id>&dtype=…&device=…&calib=<n>x<seq>s<seed>&plan=<z:base64 of the plan>
# (or &plan_id=<id of a plan stored in the run store>, for a plan too long for a URL)&run=<selected run>.
# The page is the URL's path (Streamlit's own). Restored once per browser session, written on every run.
URL_PLAN_MAX = 1500  # characters of the encoded plan above which the plan is stored and referenced by id


def encode_plan(plan: dict) -> str:
    raw = json.dumps(plan, separators=(",", ":"), sort_keys=True).encode()
    return "z" + base64.urlsafe_b64encode(zlib.compress(raw, 9)).decode().rstrip("=")


def decode_plan(text: str) -> dict:
    try:
        if not text.startswith("z"):
            raise ValueError("unknown encoding")
        body = text[1:] + "=" * (-(len(text) - 1) % 4)
        return json.loads(zlib.decompress(base64.urlsafe_b64decode(body.encode())))
    except (ValueError, zlib.error) as e:
        raise PlanError(f"the plan in this link cannot be read ({e}); the default plan is used") from None


def url_state() -> dict:
    """What the URL should say for this session's state (reads only: a plan too long for a URL is left out
    here and stored, then referenced by id, by `sync_url`)."""
    s = st.session_state
    q = {"model": s.model_source or "demo"}
    if s.dtype != "auto":
        q["dtype"] = s.dtype
    if s.device != "cpu":
        q["device"] = s.device
    c = s.get("calibration_settings")
    if c and (s.get("stats") is not None or s.get("_restore_calibration")):
        q["calib"] = f"{c['n_samples']}x{c['seq_len']}s{c['seed']}"
    m = s.get("sensitivity_settings")
    if m:
        q["sens"] = f"{m['metric']}.{m['group_size']}.{m['n_windows']}"
    encoded = encode_plan(s.plan)
    if len(encoded) <= URL_PLAN_MAX:
        q["plan"] = encoded
    if s.get("selected_run_id") is not None:
        q["run"] = str(s.selected_run_id)
    return q


def sync_url() -> None:
    q = url_state()
    if "plan" not in q:
        q["plan_id"] = run_store().save_plan(st.session_state.plan)
    if st.query_params.to_dict() != q:
        st.query_params.from_dict(q)


def restore_from_url() -> None:
    """Once per browser session: model source, calibration settings, plan and selected run from the URL
    (a refresh or a shared link). Calibration is restored from the on-disk cache by `require_stats`."""
    s = st.session_state
    if s.get("_url_restored"):
        return
    s._url_restored = True
    q = st.query_params.to_dict()
    if not q:
        return
    problems = []
    if "model" in q:
        s.model_source = "" if q["model"] == "demo" else q["model"]
    if q.get("dtype") in ("auto", "float32", "bfloat16", "float16"):
        s.dtype = q["dtype"]
    if q.get("device"):
        s.device = q["device"]
    m = re.fullmatch(r"(\d+)x(\d+)s(\d+)", q.get("calib", ""))
    if m:
        s.calibration_settings = dict(n_samples=int(m[1]), seq_len=int(m[2]), seed=int(m[3]))
        s._restore_calibration = True
    m = re.fullmatch(r"([a-z_]+)\.(-?\d+)\.(\d+)", q.get("sens", ""))
    if m:  # the Sensitivity page reloads this measurement from its on-disk cache
        s.sensitivity_settings = dict(metric=m[1], group_size=int(m[2]), n_windows=int(m[3]))
    try:
        if "plan" in q:
            s.plan = CompressionPlan.from_dict(decode_plan(q["plan"])).validate().to_dict()
        elif "plan_id" in q:
            s.plan = CompressionPlan.from_dict(run_store().get_plan(q["plan_id"])).validate().to_dict()
    except (MoevizError, KeyError) as e:
        problems.append(str(e).strip("'\""))
    if q.get("run", "").isdigit():
        s._url_run = int(q["run"])
    s._url_problems = problems


def restore_calibration(loaded) -> None:
    """A calibration named by the URL, loaded from the on-disk cache (never recomputed on its own)."""
    s = st.session_state
    if not s.pop("_restore_calibration", False) or stats_for(loaded) is not None:
        return
    c = s.calibration_settings
    from moeviz.workspace import calibrate_cached

    with user_errors():
        samples = moeviz.load_calibration_data(loaded.tokenizer, None, n_samples=c["n_samples"], seq_len=c["seq_len"],
                                               seed=c["seed"], max_seq_len=loaded.max_context)
        stats, _ = calibrate_cached(loaded, samples, cache_only=True)
    if stats is None:
        s.calibration_settings = None
        s.setdefault("_url_problems", []).append(
            "the calibration in this link is not in this machine's cache; run calibration again")
    else:
        s.stats, s.calibration_samples, s.calibration_source = stats, samples, "the bundled text"
    sync_url()


@st.cache_resource(show_spinner="Loading the model…", max_entries=2)
def load_base_model(source: str, dtype: str, device: str, trust_remote_code: bool):
    return moeviz.load_model(source or None, dtype=dtype, device=device, trust_remote_code=trust_remote_code)


@st.cache_resource(show_spinner="Evaluating the base model on the held-out text (once per model)…", max_entries=2)
def base_evaluator(model_fingerprint: str, _loaded, measure_latency: bool = True) -> Evaluator:
    context = _loaded.max_context or EVAL_SEQ_LEN  # a model built for shorter windows is evaluated on its context
    samples = load_eval_samples(_loaded.tokenizer, seq_len=min(EVAL_SEQ_LEN, context), max_samples=64,
                                max_seq_len=_loaded.max_context)
    settings = EvalSettings(measure_latency=measure_latency, latency_decode_tokens=8, latency_repeats=5)
    return Evaluator(_loaded, samples, settings)


@st.cache_resource
def run_store() -> RunStore:
    return RunStore()


def try_load(source: str, dtype: str, device: str, trust_remote_code: bool) -> str | None:
    """Load a model the user asked for before the session switches to it: None when it loaded (it is then
    cached), else the library's message (the session keeps its model)."""
    try:
        load_base_model(source, dtype, device, trust_remote_code)
    except MoevizError as e:
        return str(e)
    return None


def current_model():
    """The session's base model (the demo MoE unless the user chose another)."""
    s = st.session_state
    return load_base_model(s.model_source, s.dtype, s.device, s.trust_remote_code)


def current_plan() -> CompressionPlan:
    return CompressionPlan.from_dict(st.session_state.plan)


def set_plan(plan: CompressionPlan) -> None:
    st.session_state.plan = plan.to_dict()
    sync_url()


def session(loaded, stats) -> Session:
    """This browser session's `moeviz.session.Session`: the shared base model, evaluator and run store, this
    session's Compressor and calibration windows. Cheap (references only): built on every call."""
    samples = st.session_state.get("calibration_samples")
    keep = stats is not None and samples is not None and samples.fingerprint == stats.data_fingerprint
    return Session(loaded, base_evaluator(loaded.fingerprint, loaded), run_store(), stats,
                   samples=samples if keep else None, plan=current_plan(), compressor=compressor(loaded, stats))


def evaluate_or_reuse(loaded, stats, plan: CompressionPlan, progress=None, tasks=None):
    """(result dict, run id, reused): `Session.evaluate` (the stored run of this exact evaluation when there is
    one, else a new evaluation stored as a run). progress(stage, done, total, seconds left or None)."""
    done = session(loaded, stats).evaluate(plan, progress=progress, tasks=tasks)
    return done.result.to_dict(), done.run_id, done.reused


def compressor(loaded, stats) -> Compressor:
    """This session's Compressor for (model, stats); rebuilt when either changes."""
    key = (loaded.fingerprint, stats.fingerprint if stats is not None else None)
    if st.session_state.get("_compressor_key") != key:
        # slider: thresholds from the shared tables, one fused pass per expert
        st.session_state._compressor = Compressor(loaded, stats)
        st.session_state._compressor_key = key
    return st.session_state._compressor


def stats_for(loaded):
    """The session's calibration statistics if they belong to the loaded model, else None."""
    stats = st.session_state.stats
    return stats if stats is not None and stats.model_fingerprint == loaded.fingerprint else None


def calibration_samples(loaded, stats):
    """The token windows the statistics were computed on (`Session.calibration_windows`)."""
    return session(loaded, stats).calibration_windows()


def plan_samples(loaded, stats, plan: CompressionPlan):
    """The calibration windows a sequential or second-order plan is applied with, None for others
    (`Session.windows_for`)."""
    return session(loaded, stats).windows_for(plan)


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
    init_session()  # (the entry point runs these too; a rerun of one page may not run it)
    restore_from_url()
    with user_errors():
        loaded = current_model()
    scope_results_to(loaded)
    s = st.session_state
    for problem in s.pop("_url_problems", None) or []:
        st.warning(f"From the link: {problem}")
    if s.get("_url_run") is not None:
        run_id = s.pop("_url_run")
        with contextlib.suppress(KeyError):
            if run_store().get_run(run_id).model_fingerprint == loaded.fingerprint:
                s.selected_run_id = run_id
    sync_url()
    return loaded


def require_stats(loaded):
    restore_calibration(loaded)
    stats = stats_for(loaded)
    if stats is None:
        st.info("Run calibration on the **Model & calibration** page first: these views come from its statistics.")
        st.page_link("pages/1_model_and_calibration.py", label="Go to Model & calibration", icon="➡️")
        st.stop()
    return stats
