"""Page 4 — build a compression plan (down to per-expert ratios and bits) and evaluate it."""

import contextlib
import time

import pandas as pd
import streamlit as st

from moeviz import figures
from moeviz.compression.deployability import export_note
from moeviz.figures._common import readable
from moeviz.compression.apply import check_plan_fits
from moeviz.compression.plan import (
    ALLOCATIONS, HESSIANS, METRICS, QUANT_METHODS, SUPPORTED_BITS, CompressionPlan,
)
from moeviz.compression.plan_form import (
    FORM_GROUP_SIZES, FORM_STRUCTURES, form_values, methods_in_use, plan_from_form,
)
from moeviz.compression.preview import expert_bytes, format_bytes, plan_storage
from moeviz.compression.proxy import layer_errors
from moeviz.compression.proxy import weighted_mean as proxy_mean
from moeviz.evaluation.sweep import use_lazy
from moeviz.figures.proxy import proxy_per_layer
from moeviz.compression.removal import REMOVAL_SCORES, experts_to_remove
from moeviz.compression.table import (
    apply_table_edits, expert_table, format_ratio, ignored_override_note, overridden_cells, parse_ratio,
    prune_below_utilization, set_layer,
)
from moeviz.errors import MoevizError
from moeviz.evaluation.tasks import INSTALL_HINT, TaskSettings, lm_eval_available
from moeviz.figures.units import bits_label, format_time_ms
from moeviz.figures.latency import latency_spread_chart
from moeviz.compression.packed import packed_note
from moeviz.latency_ab import verdict as latency_verdict
from moeviz.recovery import RecoverySettings, gap_recovered, recover_and_evaluate
from moeviz.qualityview import interval_caption, task_rows
from moeviz.runview import second_order_settings
from moeviz.store import plan_key
from pages._state import (
    compressor, current_plan, evaluate_or_reuse, require_model, require_stats, run_store, session, set_plan,
    user_errors,
)

st.header("Compress")
st.write("Choose how to prune and quantize the experts and edit any expert by hand: every change updates the plan "
         "and its size at once. Evaluate measures the compressed copy against the base model on held-out text and "
         "stores it as a run. The base model is never modified.")

s = st.session_state
lm = require_model()
dtype_bits_label = lambda b: bits_label(b, lm.info.dtype)  # noqa: E731  "unquantized (float32)"
stats = require_stats(lm)
plan = current_plan()
dims = ([l.num_experts for l in lm.layers], [l.top_k for l in lm.layers])
n_layers = max(len(lm.layers), 1)
max_remove = min(l.num_experts - l.top_k for l in lm.layers)

with st.expander("Load a plan (JSON)"):
    upload = st.file_uploader("Plan JSON (from Export, the CLI or a run)", type=["json"], key="plan_upload")
    if upload is not None and s.get("_plan_upload_done") != (upload.file_id if hasattr(upload, "file_id") else upload.name):
        try:
            uploaded = CompressionPlan.from_json(upload.getvalue().decode("utf-8", errors="replace"))
            check_plan_fits(uploaded, lm.layers)
        except MoevizError as e:
            st.error(f"{upload.name}: {e}")
        else:
            s._plan_upload_done = upload.file_id if hasattr(upload, "file_id") else upload.name
            set_plan(uploaded)
            plan = uploaded
            st.success(f"Loaded the plan from {upload.name}.")

# The controls show the plan; a plan set elsewhere (a run, an upload, a link) refills them, and so does
# coming back to this page (Streamlit drops a widget's state while the widget is not shown).
# Widgets shown only when they matter (GPTQ options only for quantized weights, ...) lose their state while
# hidden: those are refilled one by one from the plan, so that a hidden widget never resets the others.
plan_values = {f"pw_{k}": v for k, v in form_values(plan, n_layers, max_remove).items()}
if s.get("_plan_widgets_for") != plan.to_json():
    s.update(plan_values)
    s._plan_widgets_for = plan.to_json()
else:
    for k, v in plan_values.items():
        if k not in s:
            s[k] = v


def _repick_removal():
    s._repick_removal = True


c1, c2, c3, c4 = st.columns(4)
c1.selectbox("Pruning metric", METRICS, key="pw_metric",
             help="magnitude |W|; Wanda |W|·‖X‖; MoE-Pruner |W|·‖X·gate‖ (router-weighted); SparseGPT: second "
                  "order, weights updated to compensate (runs as a job, then cached)")
c2.slider("Global sparsity", 0.0, 0.95, step=0.05, key="pw_sparsity", format="percent")
c3.selectbox("Structure", FORM_STRUCTURES, key="pw_structure",
             help="N:M zeroes N of every M consecutive input weights of a row (2:4 and 4:8 both prune 50 %)")
c4.selectbox("Allocation", ALLOCATIONS, key="pw_allocation",
             help="uniform: same ratio everywhere; utilization: less-used experts pruned more")
c1, c2, c3, c4 = st.columns(4)
c1.selectbox("Expert weight bits", SUPPORTED_BITS, key="pw_bits", format_func=dtype_bits_label)
c2.selectbox("Group size", FORM_GROUP_SIZES, key="pw_group", help="-1 = one group per row")
c3.checkbox("Symmetric", key="pw_symmetric")
c4.selectbox("Activation bits (expert inputs)", SUPPORTED_BITS, key="pw_act_bits", format_func=dtype_bits_label)
c1, c2, c3, c4 = st.columns(4)
c1.slider("Router sparsity", 0.0, 0.9, step=0.05, key="pw_router_sparsity", format="percent")
c2.selectbox("Router bits", SUPPORTED_BITS, key="pw_router_bits", format_func=dtype_bits_label)
c3.selectbox("Expert removal score", REMOVAL_SCORES, key="pw_removal_score", on_change=_repick_removal,
             help="frequency: share of tokens; reap: mean gate·‖expert output‖")
c4.number_input("Experts to remove per layer", 0, max_remove, key="pw_n_remove", on_change=_repick_removal,
                help="Picks the lowest-scoring experts of each layer; experts removed by hand in the table stay "
                     "removed until this number or the score changes.")
st.checkbox("Sequential (re-calibrate each layer on the compressed layers before it, as the reference Wanda / "
            "MoE-Pruner procedures do; slower)", key="pw_sequential")
quantized, uses_gptq, uses_sparsegpt = methods_in_use({k[3:]: s[k] for k in plan_values}, plan)
if quantized or uses_sparsegpt:
    # Second-order options, shown only where they act: GPTQ needs quantized weights, the Hessian and the
    # OBS settings a SparseGPT or GPTQ plan.
    slots = iter(st.columns(4))  # the options shown, left to right without gaps
    if quantized:
        next(slots).selectbox("Quantization method", QUANT_METHODS, key="pw_quant_method",
                     format_func={"rtn": "RTN (round to nearest)", "gptq": "GPTQ (second order)"}.get,
                     help="RTN rounds each weight to its grid on its own. GPTQ quantizes one input column at a time "
                          "and updates the columns not yet quantized to cancel the error on the calibration inputs "
                          "(runs as a job, then cached for this plan)")
    if uses_sparsegpt or uses_gptq:
        next(slots).selectbox("Hessian (SparseGPT / GPTQ)", HESSIANS, key="pw_hessian",
                     format_func={"router_weighted": "router-weighted (Σ g²·x·xᵀ)", "plain": "plain (Σ x·xᵀ)"}.get,
                     help="The inputs whose output error is minimised. router-weighted: each expert's tokens weighted "
                          "by the square of the routing weight g its output is multiplied by (the error the model "
                          "sees); plain: every routed token counts the same")
    if uses_gptq:
        next(slots).checkbox("GPTQ act-order", key="pw_act_order",
                    help="Quantize the columns with the largest Hessian diagonal (most active inputs) first, while "
                         "the most columns are left to absorb their error; often better at 3 bits, a little slower")
    if uses_sparsegpt:
        next(slots).checkbox("SparseGPT refit", key="pw_refit",
                    help="After the mask is chosen, re-solve each row's kept weights exactly (least squares on the "
                         "Hessian) for that mask; the usual SparseGPT update approximates this. Cost grows with "
                         "the cube of the kept columns: fine for small experts, too slow for 4096-wide rows")
    if uses_sparsegpt or uses_gptq:
        with st.expander("Second-order solver settings (block size, damping)"):
            o1, o2, _ = st.columns([1, 1, 2])
            o1.number_input("Block size (columns)", 1, 4096, key="pw_blocksize", step=32,
                            help="Columns processed together before the columns after them are updated (lazy "
                                 "batch updates). GPTQ and N:M: speed only (N:M needs a multiple of M). Unstructured "
                                 "SparseGPT re-chooses each row's mask at every block, so smaller blocks adapt "
                                 "more: better at high sparsity, slower (docs/QUALITY.md: 70 % on the demo, 16.3 "
                                 "perplexity at 128, 15.0 at 32)")
            o2.number_input("Damping (percdamp)", 0.0001, 1.0, key="pw_percdamp", step=0.005, format="%.4f",
                            help="Added to the Hessian's diagonal, as a fraction of its mean, so that it can be "
                                 "inverted. Experts with fewer routed calibration tokens than input columns are "
                                 "damped at least 0.1 and listed after the evaluation")
    if uses_sparsegpt or uses_gptq:
        st.caption("SparseGPT / GPTQ run layer by layer as a job when you press Evaluate (progress, time left and a "
                   "Stop button); the result is cached for this plan.")

removed = plan.removed_experts
if s.pop("_repick_removal", False):
    removed = experts_to_remove(stats, int(s.pw_n_remove), s.get("pw_removal_score", REMOVAL_SCORES[0]))
live = plan_from_form({k[3:]: s[k] for k in plan_values}, plan, removed)
if live.to_dict() != plan.to_dict():
    try:
        check_plan_fits(live, lm.layers)
    except MoevizError as e:
        st.error(f"{e} (the plan keeps its last valid settings)")
    else:
        set_plan(live)
        plan = live
        s._plan_widgets_for = plan.to_json()
hand_removed = len(plan.removed_experts) - int(s.pw_n_remove) * n_layers
if hand_removed:
    st.caption(f"{len(plan.removed_experts)} experts removed in all ({hand_removed:+d} by hand in the table).")
note = ignored_override_note(plan)
if note:
    st.warning(note)

# Cheap, live: the plan's bytes from the weights' shapes (no compression run).
with user_errors():
    storage = plan_storage(compressor(lm, stats), plan)
summary = storage.summary()
c = st.columns(4)
c[0].metric("Compression ratio (plan)", f"{summary['compression_ratio']:.2f}×",
            help="Stored bytes of the base model / of the compressed model, from the plan alone (updates as you edit)")
c[1].metric("Experts ratio (plan)", f"{summary['experts_compression_ratio']:.2f}×")
c[2].metric("Model size (plan)", format_bytes(summary["compressed_bytes"]),
            help=f"Base model: {format_bytes(summary['base_bytes'])}")
c[3].metric("Expert weights (plan)", format_bytes(summary["experts_bytes"]),
            help=f"Base experts: {format_bytes(summary['experts_base_bytes'])}")
caption, export_warning = export_note(summary, storage.deployability)
st.caption(caption)
if export_warning:
    st.warning(export_warning)

# Cheap, live: a quality proxy from the weights and the calibration statistics (no forward pass). Only where
# a materialised apply is quick (the models evaluated without the lazy path); sequential plans as one-pass.
if plan.second_order():
    st.caption("Quality proxy (live): not computed for SparseGPT / GPTQ plans, whose weights come from a layer-by-layer "
               "job; Evaluate runs it (then cached for this plan) and measures perplexity.")
elif not use_lazy(lm):
    proxy_plan = CompressionPlan.from_dict({**plan.to_dict(), "sequential": False})
    proxy_key = (lm.fingerprint, stats.fingerprint, plan_key(proxy_plan.to_dict()))
    if s.get("_proxy_for") != proxy_key:
        with user_errors():
            s._proxy = layer_errors(lm.layers, compressor(lm, stats).apply(proxy_plan).layers, stats)
        s._proxy_for = proxy_key
    p1, p2 = st.columns([1, 3])
    p1.metric("Quality proxy (live)", f"{100 * proxy_mean(s._proxy):.3g} %",
              help="Gate-weighted reconstruction error of the expert outputs, mean over layers: the squared error the "
                   "plan adds to each expert's routed output on the calibration tokens (diagonal approximation), "
                   "relative to that output; removed experts count in full. Ranks plans while you edit; Evaluate "
                   "measures perplexity." + (" Sequential plans: shown as one-pass." if plan.sequential else ""))
    p2.plotly_chart(readable(proxy_per_layer(s._proxy)), width="stretch")

st.subheader("Per-expert settings")
st.caption("Edit sparsity (type 50 % or 0.5), bits or remove for any expert; edited cells become per-expert overrides "
           "of the plan at once. 'override' names the cells set by hand; bytes is the expert's stored size under the "
           "plan and share its part of the compressed model.")
with user_errors():
    table = expert_table(plan, lm.layers, stats)
sizes = expert_bytes(storage)
marked = overridden_cells(plan)
layers_shown = st.multiselect("Layers", list(range(len(lm.layers))), key="table_layers",
                              placeholder="all layers", help="Show only these layers in the table")
shown = [r for r in table if not layers_shown or r["layer"] in layers_shown]
display = [{**r, "sparsity": format_ratio(r["sparsity"]),
            "utilization": None if r["utilization"] is None else 100 * r["utilization"],
            "override": ", ".join(sorted(marked.get((r["layer"], r["expert"]), ()))),
            "bytes": format_bytes(sizes.get((r["layer"], r["expert"]), 0)),
            "share": f"{100 * sizes.get((r['layer'], r['expert']), 0) / max(summary['compressed_bytes'], 1):.2f} %"}
           for r in shown]


def _highlight_overrides(row):
    # Streamlit styles only the read-only columns of an editor: a row set by hand is tinted there.
    tint = "background-color: #fff3c4" if row["override"] else ""
    return [tint if c in ("layer", "expert", "override") else "" for c in row.index]


edited = st.data_editor(
    pd.DataFrame(display).style.apply(_highlight_overrides, axis=1) if display else pd.DataFrame(display), hide_index=True, key=f"experts_{hash(plan.to_json())}_{layers_shown}",
    disabled=["layer", "expert", "utilization", "mean_gate", "override", "bytes", "share"],
    column_config={
        "utilization": st.column_config.NumberColumn("utilization", format="%.1f %%", help="share of top-k assignments"),
        "mean_gate": st.column_config.NumberColumn("mean gate weight", format="%.3f"),
        "sparsity": st.column_config.TextColumn("sparsity", help="50 %, 50% or 0.5; at most 99.99 %"),
        "bits": st.column_config.SelectboxColumn("bits", options=list(SUPPORTED_BITS), format_func=dtype_bits_label,
                                                 help="16 = unquantized: the checkpoint dtype", width="medium"),
        "layer": st.column_config.NumberColumn("layer", width="small"),
        "expert": st.column_config.NumberColumn("expert", width="small"),
        "remove": st.column_config.CheckboxColumn("remove"),
        "override": st.column_config.TextColumn("override", help="cells set by a per-expert override"),
        "bytes": st.column_config.TextColumn("bytes", help="stored bytes of the expert under this plan"),
        "share": st.column_config.TextColumn("share", help="the expert's part of the compressed model's bytes"),
    },
)
rows_after = [{k: v for k, v in r.items() if k not in ("override", "bytes", "share")} for r in edited.to_dict("records")]
rows_before = [{k: v for k, v in r.items() if k not in ("override", "bytes", "share")} for r in display]
if rows_after != rows_before:
    try:
        new = apply_table_edits(plan, shown, rows_after)
        check_plan_fits(new, lm.layers)
    except MoevizError as e:  # e.g. an emptied cell or 50 without %: say so, keep the last valid plan
        st.error(str(e))
    else:
        if new.to_dict() != plan.to_dict():  # an edit to the same value ("50.0 %" for 50 %) changes nothing
            set_plan(new)
            st.rerun()

with st.expander("Bulk edits"):
    b1, b2 = st.columns(2)
    with b1.form("bulk_layer_form"):
        st.markdown("**Set one layer**")
        l1, l2, l3 = st.columns(3)
        bl_layer = l1.selectbox("Layer", list(range(len(lm.layers))), key="bulk_layer")
        bl_sparsity = l2.text_input("Sparsity", "", placeholder="unchanged", key="bulk_layer_sparsity",
                                    help="e.g. 50 % or 0.5; empty keeps the layer's sparsity")
        bl_bits = l3.selectbox("Bits", [None, *SUPPORTED_BITS], key="bulk_layer_bits",
                               format_func=lambda b: "unchanged" if b is None else dtype_bits_label(b))
        if st.form_submit_button("Set layer"):
            with user_errors():
                sp = parse_ratio(bl_sparsity, "sparsity") if bl_sparsity.strip() else None
                new = set_layer(plan, int(bl_layer), sp, bl_bits)
                check_plan_fits(new, lm.layers)
            set_plan(new)
            st.rerun()
    with b2.form("bulk_util_form"):
        st.markdown("**Prune rarely used experts**")
        u1, u2 = st.columns(2)
        bu_util = u1.text_input("Utilization below", "10 %", key="bulk_util",
                                help="share of top-k assignments, e.g. 10 % or 0.1")
        bu_sparsity = u2.text_input("Prune by", "70 %", key="bulk_util_sparsity")
        if st.form_submit_button("Prune experts below"):
            with user_errors():
                new, n = prune_below_utilization(plan, table, parse_ratio(bu_util, "utilization"),
                                                 parse_ratio(bu_sparsity, "sparsity"))
                check_plan_fits(new, lm.layers)
            set_plan(new)
            s._bulk_note = f"{n} experts below {bu_util} set to {bu_sparsity}."
            st.rerun()
    if s.get("_bulk_note"):
        st.caption(s.pop("_bulk_note"))

with st.expander("Edit one expert by number"):
    with st.form("one_expert_form"):
        c1, c2, c3, c4, c5 = st.columns(5)
        e_layer = c1.number_input("Layer", 0, len(lm.layers) - 1, 0)
        e_expert = c2.number_input("Expert", 0, max(l.num_experts for l in lm.layers) - 1, 0)
        e_sparsity = c3.text_input("Sparsity", "50 %", help="50 %, 50% or 0.5")
        e_bits = c4.selectbox("Bits", SUPPORTED_BITS, index=SUPPORTED_BITS.index(16), format_func=dtype_bits_label)
        e_remove = c5.checkbox("Remove")
        if st.form_submit_button("Set expert"):
            i = next(i for i, r in enumerate(table) if r["layer"] == e_layer and r["expert"] == e_expert)
            with user_errors():
                edited_row = {**table[i], "sparsity": parse_ratio(e_sparsity, "sparsity"), "bits": int(e_bits),
                              "remove": bool(e_remove)}
                new = apply_table_edits(plan, table, table[:i] + [edited_row] + table[i + 1:])
                check_plan_fits(new, lm.layers)
            set_plan(new)
            st.rerun()
if plan.overrides and st.button("Clear per-expert overrides"):
    plan.overrides = []
    set_plan(plan)
    st.rerun()

last = s.last_result
is_stale = last is not None and plan_key(last["plan"]) != plan_key(plan.to_dict())
if "_auto_eval" not in s and s.get("_last_eval_s") is not None:
    s._auto_eval = s._last_eval_s < 2.0  # a model this small re-evaluates on every change by default
s.auto_eval_toggle = bool(s.get("_auto_eval", False))  # the person's choice, kept across pages


def _auto_eval_changed():
    s._auto_eval = s.auto_eval_toggle


has_lm_eval = lm_eval_available()
s.task_eval_toggle = bool(s.get("_task_eval", False)) and has_lm_eval  # kept across pages


def _task_eval_changed():
    s._task_eval = s.task_eval_toggle


# Task accuracy asked for but the result shown has none (or other items): Evaluate adds it (a new run).
tasks = TaskSettings(limit=s.get("_task_limit") or None) if s.task_eval_toggle else None
missing_tasks = (tasks is not None and last is not None and not is_stale
                 and (not last.get("tasks") or (last.get("task_settings") or {}).get("limit") != tasks.limit))
c1, c2 = st.columns([1, 3])
go_eval = c1.button("Evaluate", type="primary", disabled=last is not None and not is_stale and not missing_tasks,
                    help="The result shown is this plan's" if last is not None and not is_stale else None)
c2.toggle("Re-evaluate on every change", key="auto_eval_toggle", on_change=_auto_eval_changed,
          help="On by default when evaluating a plan of this model took under 2 s. Not for SparseGPT / GPTQ plans: "
               "each is a layer-by-layer job, started with Evaluate")
c2.toggle("Task accuracy (lm-eval-harness on the bundled multiple-choice tasks)", key="task_eval_toggle",
          on_change=_task_eval_changed, disabled=not has_lm_eval,
          help=("Also runs lm-eval-harness on the compressed model in memory (and once on the base): the tasks "
                "moeviz builds from its held-out text (sample_data/tasks, 4 choices, chance 25 %), zero-shot, "
                "acc and acc_norm with their standard error. Several seconds per evaluation." if has_lm_eval else
                f"Needs lm-eval-harness, not installed here: {INSTALL_HINT}"))
if s.task_eval_toggle:
    c2.number_input("Items per task (0 = all)", min_value=0, value=int(s.get("_task_limit") or 0), step=10,
                    key="task_limit_input", on_change=lambda: s.__setitem__("_task_limit", s.task_limit_input),
                    help="The first N items of each task (lm-eval's --limit): a quick look; report all items")
job_hint = st.empty()  # cleared once this plan is evaluated
if plan.second_order() and (last is None or is_stale):
    # The time of the last SparseGPT / GPTQ job on this model (any plan): said before a long job starts.
    with contextlib.suppress(Exception), job_hint.container():
        past = run_store().runs(model_fingerprint=lm.fingerprint)
        col = "details.second_order.seconds"
        past = past[past[col].notna()] if col in past else past.iloc[0:0]
        if not past.empty:
            st.caption(f"Evaluate runs a layer-by-layer job: the last SparseGPT / GPTQ job on this model took "
                       f"{float(past[col].iloc[-1]):.1f} s (run #{int(past['id'].iloc[-1])}), then evaluation. "
                       "Progress, time left and a Stop button are shown while it runs.")
        else:
            st.caption("Evaluate runs a layer-by-layer job (the first SparseGPT / GPTQ job on this model): time "
                       "left is shown from the first layer on, with a Stop button.")
if go_eval or (s.get("_auto_eval", False) and not plan.second_order() and (last is None or is_stale)):
    base_known = lm.fingerprint in s.get("_base_evaluated", set())
    message = ("Applying the plan and evaluating on held-out text…" if base_known else
               "First evaluation of this model: the base model is evaluated once first (then cached), then the plan…")
    stop_slot = st.empty()
    if plan.sequential or plan.second_order() or not base_known:
        stop_slot.button("Stop", help="Cancels this evaluation; nothing is stored")
    bar = st.empty()
    t_eval = {}

    def eval_progress(stage, done, total, left=None):
        start = t_eval.setdefault(stage, time.perf_counter())
        if left is None:
            left = (time.perf_counter() - start) / max(done, 1) * (total - done)
        eta = f" · about {left:.0f} s left" if done else ""
        if stage == "apply":
            what = ("SparseGPT / GPTQ layer by layer" if plan.second_order() else
                    "re-calibrating and compressing layer by layer" if plan.sequential else "compressing")
            bar.progress(done / max(total, 1), text=f"Applying the plan ({what}): layer {done}/{total}{eta}")
        else:
            bar.progress(done / max(total, 1), text=f"Evaluating on held-out text: {done}/{total} batches{eta}, "
                                                    "then timing base and compressed back to back")

    with user_errors(), st.spinner(message + (" Sequential plans re-calibrate layer by layer: slower." if plan.sequential else "")):
        result_dict, run_id, reused = evaluate_or_reuse(lm, stats, plan, progress=eval_progress, tasks=tasks)
    stop_slot.empty()
    bar.empty()
    job_hint.empty()
    if not reused:  # the plan's apply + evaluation, not the one-off base evaluation
        s._last_eval_s = result_dict["seconds"] + result_dict["apply_seconds"]
    s.setdefault("_base_evaluated", set()).add(lm.fingerprint)
    s.last_result, s.last_run_id, s._reused = result_dict, run_id, reused
    last, is_stale = result_dict, False

result = s.last_result
if result is not None:
    st.subheader("Result (compressed vs base)")
    if is_stale:
        st.warning(f"**Stale**: these results are for run #{s.last_run_id}'s plan, not the plan above. "
                   "Evaluate to measure the plan as it is now.", icon="⚠️")
    m = result
    stale = " (stale)" if is_stale else ""
    c = st.columns(5)
    c[0].metric("Perplexity" + stale, f"{m['perplexity']:.2f}", f"{m['perplexity'] - m['base_perplexity']:+.2f} vs base",
                delta_color="inverse")
    c[1].metric("Next-token accuracy" + stale, f"{m['accuracy']:.1%}",
                f"{(m['accuracy'] - m['base_accuracy']) * 100:+.1f} pts")
    c[2].metric("Compression ratio" + stale, f"{m['compression']['compression_ratio']:.2f}×",
                f"experts {m['compression']['experts_compression_ratio']:.2f}×", delta_color="off", delta_arrow="off")
    # Measured on this machine first (the packed low-bit runtime where the plan has kernels); the roofline
    # projection beside it names its accelerator in the label itself.
    proj, base_proj = m["latency_projected"], m["base_latency_projected"]
    if m["latency_measured"]:
        lat, base_measured = m["latency_measured"], m.get("base_latency_measured")
        spread = (f" · IQR {format_time_ms(lat['decode_q1_ms'])}–{format_time_ms(lat['decode_q3_ms'])}"
                  if lat.get("interleaved") else "")
        c[3].metric("Decode, measured" + stale, format_time_ms(lat["decode_ms_per_token"]),
                    (f"base {format_time_ms(base_measured['decode_ms_per_token'])}"
                     + (" · within noise" if (m.get("latency_ab") or {}).get("spreads_overlap") else ""))
                    if base_measured else "base unavailable",
                    delta_color="off", delta_arrow="off",
                    help="Per generated token, wall clock on this machine: median of base and compressed timed "
                         f"alternately in one loop ({lat['repeats']} repeats each){spread}. Quantized experts run "
                         "on low-bit kernels where one exists (int8 per channel, int4 in groups of 32-256); "
                         "zeroed weights run the dense kernel and bring no speed-up; removed experts can.")
    elif m.get("latency_unavailable"):
        c[3].metric("Decode, measured", "unavailable", help=m["latency_unavailable"])
        st.caption(f"Measured latency is unavailable for this model: {m['latency_unavailable']}")
    c[4].metric(f"Decode, projected on {proj['device']}" + stale, format_time_ms(proj["ms_per_token"]),
                f"base {format_time_ms(base_proj['ms_per_token'])}", delta_color="off", delta_arrow="off",
                help=f"Per generated token. Roofline model for {proj['device']}: active weight bytes / bandwidth "
                     "vs FLOPs / peak. A projection, not a measurement.")
    if m.get("packed"):
        st.caption(packed_note(m["packed"]))
    reused_note = " (this plan was evaluated before: its stored run is reused, no duplicate stored)" if s.get("_reused") else ""
    st.caption(f"Stored as run #{s.last_run_id}{reused_note}. Evaluated on {m['eval_tokens']:,} held-out tokens in "
               f"{m['seconds']:.1f} s (apply " + (f"{m['apply_seconds']:.1f} s)." if m["apply_seconds"] >= 1
                                                else f"{m['apply_seconds'] * 1000:.0f} ms)."))
    caption = interval_caption(m)
    if caption:
        st.caption(caption)
    if m.get("tasks"):
        ts = m.get("task_settings") or {}
        st.markdown("**Task accuracy** (lm-eval-harness " + str(ts.get("lm_eval_version", "")) + ", "
                    f"{ts.get('num_fewshot', 0)}-shot, seed {ts.get('seed')}; ± one standard error)")
        st.dataframe(pd.DataFrame(task_rows(m)), hide_index=True, width="stretch", column_config={
            c: st.column_config.NumberColumn(c.replace("_", " "), format="%.1f %%")
            for c in ("accuracy", "stderr", "base_accuracy", "base_stderr", "difference", "acc_norm")})
    so = m.get("second_order")
    rs = second_order_settings(CompressionPlan.from_dict(m["plan"])) if so else None
    if rs is not None:
        opts = [f"Hessian {rs['hessian']}", f"block {rs['block']}", f"percdamp {rs['percdamp']:g}"]
        opts += ["act-order"] * rs["act_order"] + ["refit"] * rs["refit"]
        st.caption(f"{' + '.join(rs['methods'])}: {so['seconds']:.1f} s layer by layer at {so['threads']} torch thread(s) · "
                   + " · ".join(opts) + ". Cached for this plan in this session.")
        if so.get("warnings"):
            warned = so["warnings"]
            experts = sorted({(w["layer"], w["expert"]) for w in warned})
            st.warning(f"{len(experts)} expert(s) got fewer routed calibration tokens than their input columns "
                       f"({len(warned)} projection(s)): their Hessian is rank-deficient, so it was damped more "
                       "(or replaced by the identity when no token reached the expert) and their weights are "
                       "closer to plain magnitude / RTN. More calibration windows (page 1) fix this.", icon="⚠️")
            with st.expander("Experts with a damped Hessian"):
                st.dataframe(pd.DataFrame(warned), hide_index=True, width="stretch")
    c1, c2 = st.columns(2)
    c1.plotly_chart(readable(figures.drift_per_layer(m)), width="stretch")
    c2.plotly_chart(readable(figures.load_balance_comparison(m)), width="stretch")
    per_domain = pd.DataFrame({d: {"perplexity": v["perplexity"], "accuracy": 100 * v["accuracy"],
                                   "base perplexity": m["base_per_domain"][d]["perplexity"],
                                   "base accuracy": 100 * m["base_per_domain"][d]["accuracy"]}
                               for d, v in m["per_domain"].items()}).T
    st.dataframe(per_domain, width="stretch", column_config={
        c: st.column_config.NumberColumn(c, format="%.1f %%" if "accuracy" in c else "%.2f") for c in per_domain.columns})
    st.caption("Decode latencies are per generated token; µs below 1 ms, ms above.")

    st.markdown("**Measured latency, base vs this plan, back to back**")
    st.caption("Every evaluation times the base and the compressed model in one loop, alternating, so a busy "
               "moment on this machine hits both: median and quartiles of the per-token decode time, stored with "
               "the run. Measure again with more repeats for a tighter spread.")
    stored_ab = None if is_stale else m.get("latency_ab")
    if s.last_run_id is not None and not is_stale:
        with contextlib.suppress(KeyError):
            stored_ab = run_store().get_run(s.last_run_id).metrics.get("latency_ab") or stored_ab
    with st.form("latency_ab_form"):
        l1, l2, l3 = st.columns([1, 1, 2])
        ab_repeats = l1.number_input("Repeats", 3, 101, 9, help="Each repeat times base and compressed once")
        ab_tokens = l2.number_input("Decode tokens per repeat", 1, 256, 8)
        go_ab = l3.form_submit_button("Measure base and compressed back to back", disabled=is_stale)
    if go_ab:
        with user_errors():
            bar = st.progress(0.0, text="Timing base and compressed, interleaved…")
            t0 = time.perf_counter()

            def ab_progress(r, n):
                left = (time.perf_counter() - t0) / r * (n - r)
                bar.progress(r / n, text=f"Repeat {r}/{n} · about {left:.0f} s left")

            stored_ab = session(lm, stats).measure_latency(plan, int(ab_tokens), int(ab_repeats), ab_progress,
                                                           run_id=s.last_run_id)
            bar.empty()
    if stored_ab:
        b, cc = stored_ab["base"], stored_ab["compressed"]
        l = st.columns([1, 1, 2])
        l[0].metric("Decode, compressed (back to back)", format_time_ms(cc["median"]),
                    f"IQR {format_time_ms(cc['q1'])}–{format_time_ms(cc['q3'])}", delta_color="off", delta_arrow="off")
        l[1].metric("Decode, base (back to back)", format_time_ms(b["median"]),
                    f"IQR {format_time_ms(b['q1'])}–{format_time_ms(b['q3'])}", delta_color="off", delta_arrow="off")
        l[2].plotly_chart(readable(latency_spread_chart(stored_ab)), width="stretch",
                          config={"displayModeBar": False})  # a small chart: the toolbar would sit on its title
        (st.warning if stored_ab["busy"] or stored_ab["spreads_overlap"] else st.caption)(latency_verdict(stored_ab))

st.subheader("Recover by distillation")
if result is None or plan_key(result["plan"]) != plan_key(plan.to_dict()):
    st.info("Evaluate the plan first: recovery fine-tunes this plan's compressed model and is compared against it.")
    st.stop()
st.caption("Fine-tunes the compressed experts against the base model on the calibration text: cross-entropy + "
           "λ_expert · expert-output MSE + λ_router · KL(router teacher ‖ student). Pruned weights stay zero, removed "
           "experts stay removed, quantized experts are re-quantized every step. The base model is not modified.")
with st.form("recovery_form"):
    c1, c2, c3, c4 = st.columns(4)
    steps = c1.number_input("Steps", 1, 5000, 50)
    lr = c2.select_slider("Learning rate", [1e-5, 3e-5, 1e-4, 3e-4, 1e-3], value=3e-4, format_func=lambda v: f"{v:g}")
    batch = c3.number_input("Batch size (windows)", 1, 64, 4)
    budget = c4.number_input("Time budget (s)", 5, 3600, 120, help="Training stops here and the result is kept")
    c1, c2, c3 = st.columns(3)
    train = c1.radio("Train", ["experts", "experts+router"], horizontal=True)
    lam_e = c2.number_input("λ expert", 0.0, 1e6, value=None, placeholder="balanced at the start",
                            help="Empty: chosen at the first step so that λ·MSE equals the cross-entropy; 0 turns the term off")
    lam_r = c3.number_input("λ router", 0.0, 1e6, value=None, placeholder="balanced at the start",
                            help="Empty: chosen at the first step so that λ·KL equals the cross-entropy; 0 turns the term off")
    go = st.form_submit_button("Recover", type="primary")
if go:
    settings = RecoverySettings(steps=int(steps), learning_rate=float(lr), batch_size=int(batch), train=train,
                                lambda_expert=None if lam_e is None else float(lam_e),
                                lambda_router=None if lam_r is None else float(lam_r),
                                max_seconds=float(budget))
    with user_errors():
        bar = st.progress(0.0, text="Recovery: starting…")
        hint = st.empty()
        hint.button("Stop recovery", help="Cancels the training; nothing is stored then")
        live, so_far = st.empty(), []
        t_start = time.perf_counter()

        def show_progress(i, n, r):
            left = min((time.perf_counter() - t_start) / i * (n - i), float(budget) - (time.perf_counter() - t_start))
            bar.progress(i / n, text=f"Recovery step {i}/{n} · about {max(left, 0):.0f} s left · CE {r['ce']:.3f} · "
                                     f"expert MSE {r['expert_mse']:.4g} · router KL {r['router_kl']:.4g}")
            so_far.append(r)
            if i % 10 == 0:  # redraw the curves every 10 steps
                live.plotly_chart(readable(figures.recovery_losses(so_far)), width="stretch")

        sess = session(lm, stats)
        recovery, recovered, run_id, model = recover_and_evaluate(
            sess.compressor, sess.evaluator, plan, sess.calibration_windows(), settings, store=sess.store,
            parent_run_id=st.session_state.last_run_id, progress=show_progress)
        for placeholder in (bar, hint, live):
            placeholder.empty()
    st.session_state.recovery = dict(run_id=run_id, parent_run_id=st.session_state.last_run_id, plan=plan.to_dict(),
                                     summary=recovery.summary(), history=recovery.history,
                                     result=recovered.to_dict())
    st.session_state.recovered_model = model

rec = st.session_state.recovery
if rec is not None and rec["plan"] == plan.to_dict():
    r, summ = rec["result"], rec["summary"]
    c = st.columns(4)
    c[0].metric("Perplexity after recovery", f"{r['perplexity']:.2f}", f"{r['perplexity'] - result['perplexity']:+.2f} vs unrecovered",
                delta_color="inverse")
    c[1].metric("Accuracy after recovery", f"{r['accuracy']:.1%}", f"{(r['accuracy'] - result['accuracy']) * 100:+.1f} pts")
    won_back = gap_recovered(result["perplexity"], r["perplexity"], r["base_perplexity"])
    c[2].metric("Perplexity gap recovered", "n/a" if won_back is None else f"{won_back:.0%}",
                help="(unrecovered − recovered) / (unrecovered − base), on the held-out text")
    c[3].metric("Training steps", summ["steps_done"], help="Steps run (fewer than asked when cancelled or out of time)")
    st.plotly_chart(readable(figures.recovery_losses(rec["history"], summ["lambda_expert"], summ["lambda_router"])), width="stretch")
    stopped = f", stopped early ({summ['stopped_early']})" if summ["stopped_early"] else ""
    st.caption(f"Trained {summ['steps_done']} steps in {summ['seconds']:.1f} s on {summ['tokens_seen']:,} calibration tokens{stopped}; "
               f"λ_expert {summ['lambda_expert']:.3g}, λ_router {summ['lambda_router']:.3g}. Stored as run #{rec['run_id']}, "
               f"linked to run #{rec['parent_run_id']}: the Trade-offs page draws the recovery as an arrow. The Export "
               "page can write the recovered model (kept in this session until the next recovery).")
