"""Page 5 — sweeps over sparsity and bits, trade-off curves, Pareto fronts, all stored runs."""

import time

import pandas as pd
import streamlit as st

from moeviz import figures
from moeviz.figures._common import readable
from moeviz.compression.plan import METRICS, SUPPORTED_BITS, CompressionPlan
from moeviz.evaluation import grid_plans
from moeviz.evaluation.tasks import INSTALL_HINT, TaskSettings, lm_eval_available
from moeviz.figures.units import bits_label, eta_text, format_time_ms
from moeviz.qualityview import accuracy_choices, paired_rows, with_accuracy_spread
from moeviz.runview import (
    filter_runs, latency_notes, metric_diff, plan_diff, second_order_label, tag_list, with_facets,
    with_measured_latency,
)
from pages._state import (
    require_model, require_stats, run_store, session, set_plan, user_errors,
)

st.header("Trade-offs")
st.write("Sweep pruning methods × sparsity × bits and see what each setting costs: accuracy and latency against "
         "compression ratio, perplexity, load balance and routing drift. Every run is stored. Click a point on any "
         "chart or a row of the run table to select a run and load its plan into the Compress page.")

s = st.session_state
lm = require_model()
dtype_bits_label = lambda b: bits_label(b, lm.info.dtype)  # noqa: E731  "unquantized (float32)"
stats = require_stats(lm)
store = run_store()


with st.form("sweep_form"):
    c1, c2, c3 = st.columns(3)
    methods = c1.multiselect("Methods", METRICS, default=["magnitude", "moe_pruner"])
    sparsities = c2.multiselect("Sparsities", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], default=[0.3, 0.5, 0.7],
                                format_func=lambda v: f"{v:.0%}")
    bits = c3.multiselect("Bits", SUPPORTED_BITS, default=[16], format_func=dtype_bits_label)
    has_lm_eval = lm_eval_available()
    with_tasks = st.checkbox(
        "Task accuracy (lm-eval-harness on the bundled multiple-choice tasks)", value=False, disabled=not has_lm_eval,
        help=("Each plan (and the base, once) is also scored on moeviz's offline tasks: acc ± stderr per task; "
              "several seconds per plan" if has_lm_eval else f"Needs lm-eval-harness: {INSTALL_HINT}"))
    task_limit = st.number_input("Items per task (0 = all)", min_value=0, value=0, step=10, disabled=not has_lm_eval,
                                 help="The first N items of each task (lm-eval's --limit): a quick look")
    go = st.form_submit_button("Run sweep", type="primary")
if s.pop("_sweep_running", None) is not None and not go:
    # The last run of this script was a sweep interrupted by "Stop sweep" (or by another click).
    st.warning("Sweep stopped. The plans it finished are stored and shown below.")
if go:
    with user_errors():
        plans = grid_plans(methods, sparsities, bits, base=CompressionPlan())
        bar = st.progress(0.0, text=f"Sweep: 0/{len(plans)} plans")
        stop = st.empty()
        stop.button("Stop sweep", help="Stops after the plan being evaluated; finished runs are already stored")
        s._sweep_running = True
        start = time.perf_counter()
        df = session(lm, stats).sweep(
            plans, tasks=TaskSettings(limit=int(task_limit) or None) if with_tasks and has_lm_eval else None,
            progress=lambda d, t, row: bar.progress(
                d / t, text=f"Sweep: {d}/{t} plans · {row['name']}{eta_text(time.perf_counter() - start, d, t)}"))
        bar.empty()
        stop.empty()
        s.pop("_sweep_running", None)
    s.sweep_df = df
    n_reused = int(df["reused"].sum()) if "reused" in df else 0
    st.success(f"{len(df) - n_reused} plans evaluated and stored (sweep {df.attrs.get('sweep_id')})"
               + (f"; {n_reused} evaluated before: their stored runs are reused, no duplicates." if n_reused else "."))

runs = store.runs(model_fingerprint=lm.fingerprint)
if runs.empty:
    st.info("No runs yet for this model: run a sweep above or evaluate a plan on the Compress page.")
    st.stop()
runs = with_facets(runs)

st.subheader("Runs shown")
f = st.columns(5)
sel_methods = f[0].multiselect("Method", sorted(runs["method"].unique()), placeholder="all")
sel_bits = f[1].multiselect("Bits", sorted(runs["bits"].unique()), placeholder="all", format_func=dtype_bits_label)
sel_structures = f[2].multiselect("Structure", sorted(runs["structure"].unique()), placeholder="all")
sweeps = [v for v in runs["sweep_id"].dropna().unique()]
last_sweep = s.sweep_df.attrs.get("sweep_id") if s.sweep_df is not None else None
sel_sweeps = f[3].multiselect("Sweep", sweeps, placeholder="all",
                              format_func=lambda v: ("last sweep · " if v == last_sweep else "") + v.split("-", 1)[-1])
all_tags = sorted({t for v in runs["tags"] for t in tag_list(v)})
sel_tags = f[4].multiselect("Tag", all_tags, placeholder="all", disabled=not all_tags,
                            help="Tag runs in the selected-run panel below")
df = filter_runs(runs, sel_methods, sel_bits, sel_structures, sel_sweeps, sel_tags)
if df.empty:
    st.info("No run matches these filters.")
    st.stop()
st.caption(f"{len(df)} of {len(runs)} runs. A line joins runs whose plans differ in sparsity alone; every other "
           "run is a point.")


def take_selection(key: str, event, rows_to_ids=None):
    """Select a run from a chart or the table, acting only on a selection that changed (every chart keeps
    its last selection across reruns)."""
    if event is None:
        return
    sel = event.get("selection", {}) if isinstance(event, dict) else event.selection
    if rows_to_ids is not None:  # the signature is the rows clicked: a filter that reorders the table selects nothing
        signature = tuple(sel.get("rows") or [])
        picked = [rows_to_ids[i] for i in signature if 0 <= i < len(rows_to_ids)]
    else:
        picked = [p["customdata"][0] for p in (sel.get("points") or []) if p.get("customdata")]
        signature = tuple(picked)
    if s.get(f"_sel_{key}") == signature:
        return
    s[f"_sel_{key}"] = signature
    if picked and picked[0] is not None:
        select_run(int(picked[0]))


def select_run(run_id: int):
    """Select a run and load its plan (and its evaluation, when it is one) into Compress."""
    record = store.get_run(run_id)
    s.selected_run_id = run_id
    with user_errors():
        set_plan(CompressionPlan.from_dict(record.plan))
    if record.parent_run_id is None and record.metrics.get("details"):
        s.last_result, s.last_run_id, s._reused = record.metrics["details"], run_id, True
    s._loaded_note = f"Plan of run #{run_id} loaded into Compress."


# Measured first (the default): quantized experts run on low-bit kernels there, so the number moves with the format.
LATENCIES = {"measured_decode_ms": "measured, back to back with the base, on this machine (median, IQR bars)",
             "projected_decode_ms": f"projected on {figures.projected_device(df) or 'an accelerator'} (roofline)"}
latency = st.radio("Latency", list(LATENCIES), horizontal=True, format_func=LATENCIES.get,
                   help="Measured: each evaluation times its base and compressed model alternately in one loop "
                        "(the Compress page can repeat it with more repeats); median and quartiles of the repeats. "
                        "The compressed model runs its quantized experts on packed low-bit kernels where one exists "
                        "(int8 per channel, int4 groups); pruned-only experts run the dense kernel. Projected: a "
                        "roofline model of the named accelerator, not a measurement")
spread = None
if latency == "measured_decode_ms":
    df = with_measured_latency(df)
    spread = ("measured_lo", "measured_hi")
    note = latency_notes(df)
    if note:
        st.caption(note)
RATIOS = {"compression_ratio": "on paper (checkpoint dtype)", "compression_ratio_bf16": "on paper vs bf16",
          "export_compression_ratio": "best exportable format (bytes written)"}
ratio = st.radio("Compression ratio", [r for r in RATIOS if r in df.columns and df[r].notna().any()] or
                 ["compression_ratio"], horizontal=True, format_func=RATIOS.get,
                 help="On paper: the documented formats (sparse formats included) against the checkpoint as stored; "
                      "vs bf16: the same counted on a bf16 checkpoint; exportable: what `moeviz export` writes for the "
                      "smallest format a target can hold (pruning counts nothing there)")
choices = accuracy_choices(df)
accuracy_col = st.selectbox("Accuracy", list(choices), format_func=choices.get,
                            help="Next-token accuracy on the held-out text with its 95 % bootstrap interval, or the "
                                 "accuracy of an lm-eval task (or the average of the tasks) ± its standard error: "
                                 "error bars; a series whose bars all overlap is drawn as points")
df_acc, accuracy_spread = with_accuracy_spread(df, accuracy_col)
take_selection("tradeoff", st.plotly_chart(readable(figures.tradeoff_chart(
    df_acc, accuracy_col=accuracy_col, accuracy_spread=accuracy_spread,
    latency_col=latency, latency_kind="projected" if latency.startswith("projected") else "measured",
    latency_spread=spread, ratio_col=ratio)), width="stretch",
                                           on_select="rerun", selection_mode="points", key="tradeoff"))
log_y = st.checkbox("Log scale for perplexity", value=True)  # above both columns: the two charts' titles align
c1, c2 = st.columns(2)
take_selection("ppl", c1.plotly_chart(readable(figures.perplexity_vs_ratio(df, log_y=log_y, ratio_col=ratio)), width="stretch",
                                      on_select="rerun", selection_mode="points", key="ppl"))
take_selection("cv", c2.plotly_chart(readable(figures.cv_vs_ratio(df, ratio_col=ratio)), width="stretch", on_select="rerun",
                                     selection_mode="points", key="cv"))

st.subheader("Pareto front")
c1, c2 = st.columns(2)
y = c1.selectbox("Quality axis", [*choices, "perplexity"], format_func=lambda c: choices.get(c, c))
x = c2.selectbox("Cost axis", [ratio, "projected_decode_ms", "measured_decode_ms"],
                 format_func=lambda c: {ratio: f"compression ratio, {RATIOS[ratio]}",
                                        "projected_decode_ms": "decode latency, projected",
                                        "measured_decode_ms": "decode latency, measured"}[c])
take_selection("pareto", st.plotly_chart(readable(figures.pareto_chart(df, x=x, y=y)), on_select="rerun",
                                         selection_mode="points", key="pareto"))

st.subheader("All runs")


df = df.assign(second_order=[second_order_label(v) for v in df["plan_json"]]) if "plan_json" in df else df
if "second_order" in df and not df["second_order"].astype(bool).any():  # no SparseGPT / GPTQ run: no empty column
    df = df.drop(columns="second_order")
cols = ["id", "parent_run_id", "name", "method", "second_order", "tags", "perplexity", "accuracy", "compression_ratio", "experts_compression_ratio",
        "projected_decode_ms", "measured_decode_ms", "mean_cv", "mean_topk_overlap", "created_at"]
table = df[[c for c in cols if c in df]].sort_values("id", ascending=False).reset_index(drop=True)
shown = table.assign(parent_run_id=pd.to_numeric(table["parent_run_id"], errors="coerce").map(
                         lambda v: "" if pd.isna(v) else f"#{int(v)}"),
                     accuracy=table["accuracy"] * 100, mean_topk_overlap=table.get("mean_topk_overlap", pd.Series(dtype=float)) * 100,
                     projected_decode_ms=table["projected_decode_ms"].map(format_time_ms),
                     measured_decode_ms=table["measured_decode_ms"].map(format_time_ms))
event = st.dataframe(
    shown, hide_index=True, width="stretch", on_select="rerun", selection_mode="single-row", key="runs_table",
    column_config={
        "id": st.column_config.NumberColumn("run", format="%d"),
        "parent_run_id": st.column_config.TextColumn("parent", width="small",
                                                     help="the run this one was recovered (distilled) from"),
        "name": st.column_config.TextColumn("name", width="medium"),
        "method": st.column_config.TextColumn("method", help="pruning metric, “+ gptq” when quantized by GPTQ"),
        "second_order": st.column_config.TextColumn(
            "SparseGPT / GPTQ settings", help="Hessian · block size · damping (percdamp) · act-order · refit"),
        "accuracy": st.column_config.NumberColumn("accuracy", format="%.1f %%"),
        "perplexity": st.column_config.NumberColumn("perplexity", format="%.2f"),
        "compression_ratio": st.column_config.NumberColumn("ratio", format="%.2f×"),
        "experts_compression_ratio": st.column_config.NumberColumn("experts ratio", format="%.2f×"),
        "projected_decode_ms": st.column_config.TextColumn("decode, projected"),
        "measured_decode_ms": st.column_config.TextColumn("decode, measured"),
        "mean_cv": st.column_config.NumberColumn("load-balance CV", format="%.3f"),
        "mean_topk_overlap": st.column_config.NumberColumn("top-k overlap", format="%.1f %%"),
    },
)
take_selection("table", event, rows_to_ids=list(table["id"]))

run_id = s.selected_run_id
if run_id is None or run_id not in set(runs["id"]):
    st.caption("Select a run (a chart point or a table row) to see it, rename, tag, delete or compare it.")
    st.stop()
record = store.get_run(run_id)
st.subheader(f"Selected run #{run_id}: {record.name}")
if s.get("_loaded_note"):
    st.success(s.pop("_loaded_note"))
c1, c2, c3 = st.columns([2, 2, 1])
with c1.form("rename_form"):
    new_name = st.text_input("Name", value=record.name, key=f"name_{run_id}")
    if st.form_submit_button("Rename"):
        with user_errors():
            try:
                store.rename_run(run_id, new_name)
            except ValueError as e:
                st.error(str(e))
                st.stop()
        st.rerun()
with c2.form("tags_form"):
    new_tags = st.text_input("Tags (comma-separated)", value=", ".join(record.tags), key=f"tags_{run_id}")
    if st.form_submit_button("Save tags"):
        store.set_tags(run_id, new_tags)
        st.rerun()
with c3:
    sure = st.checkbox("Really delete", key=f"sure_{run_id}")
    if st.button("Delete run", disabled=not sure):
        store.delete_run(run_id)
        s.selected_run_id = None
        if s.last_run_id == run_id:
            s.last_result, s.last_run_id = None, None
        st.rerun()
if st.button("Load this plan into Compress"):
    select_run(run_id)
    st.switch_page("pages/4_compress.py")
details = record.metrics.get("details")
if details:
    st.plotly_chart(readable(figures.drift_per_layer(details)), width="stretch")

others = [int(i) for i in runs["id"] if int(i) != run_id]
if others:
    names = dict(zip(runs["id"].astype(int), runs["name"]))
    other = st.selectbox("Compare with", [None, *others], format_func=lambda i: "—" if i is None else f"#{i} {names[i]}")
    if other is not None:
        b = store.get_run(other)
        c1, c2 = st.columns(2)
        c1.markdown(f"**Plan: #{run_id} (a) vs #{other} (b)**")
        diff = plan_diff(record.plan, b.plan)
        if diff:
            c1.dataframe(pd.DataFrame(diff), hide_index=True, width="stretch")
        else:
            c1.caption("Same plan.")
        c2.markdown("**Metrics**")
        c2.dataframe(pd.DataFrame(metric_diff(record.metrics, b.metrics)), hide_index=True, width="stretch",
                     column_config={c: st.column_config.NumberColumn(c, format="%.4g") for c in ("a", "b", "b − a")})
        paired = paired_rows(record.metrics, b.metrics)
        if paired:
            st.markdown("**Paired differences (b − a) on the same held-out windows**, 95 % bootstrap interval")
            st.dataframe(pd.DataFrame(paired), hide_index=True, width="stretch",
                         column_config={c: st.column_config.NumberColumn(c, format="%.4g")
                                        for c in ("a", "b", "difference", "lo", "hi")})
        else:
            st.caption("No paired comparison: one of the runs was stored without its per-window figures, or the two "
                       "were evaluated on different held-out text.")
