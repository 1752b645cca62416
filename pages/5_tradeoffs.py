"""Page 5 — sweeps over sparsity and bits, trade-off curves, Pareto front, all stored runs."""

import pandas as pd
import streamlit as st

from moeviz import figures
from moeviz.compression.plan import METRICS, SUPPORTED_BITS, CompressionPlan
from moeviz.evaluation import grid_plans, run_sweep
from pages._state import base_evaluator, compressor, require_model, require_stats, run_store, set_plan, user_errors

st.header("Trade-offs")
st.write("Sweep pruning methods × sparsity × bits and see what each setting costs: accuracy and latency against "
         "compression ratio, perplexity, load balance and routing drift. Every run is stored; select a point "
         "on the Pareto chart to load its plan into the Compress page.")

lm = require_model()
stats = require_stats(lm)
store = run_store()

with st.form("sweep_form"):
    c1, c2, c3 = st.columns(3)
    methods = c1.multiselect("Methods", METRICS, default=["magnitude", "moe_pruner"])
    sparsities = c2.multiselect("Sparsities", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], default=[0.3, 0.5, 0.7])
    bits = c3.multiselect("Bits", SUPPORTED_BITS, default=[16])
    go = st.form_submit_button("Run sweep", type="primary")
if go:
    with user_errors():
        plans = grid_plans(methods, sparsities, bits, base=CompressionPlan())
        evaluator = base_evaluator(lm.fingerprint, lm)
        bar = st.progress(0.0, text=f"Sweep: 0/{len(plans)} plans")
        st.caption("Press **Stop** (top right) to cancel: finished runs are already stored.")
        df = run_sweep(compressor(lm, stats), evaluator, plans, store=store,
                       progress=lambda d, t, row: bar.progress(d / t, text=f"Sweep: {d}/{t} plans · {row['name']}"))
        bar.empty()
    st.session_state.sweep_df = df
    st.success(f"{len(df)} plans evaluated and stored (sweep {df.attrs.get('sweep_id')}).")

runs = store.runs(model_fingerprint=lm.fingerprint)
if runs.empty:
    st.info("No runs yet for this model: run a sweep above or evaluate a plan on the Compress page.")
    st.stop()
scope = st.radio("Show", ["All runs of this model", "Last sweep only"], horizontal=True,
                 disabled=st.session_state.sweep_df is None)
df = runs
if scope == "Last sweep only" and st.session_state.sweep_df is not None:
    df = runs[runs["sweep_id"] == st.session_state.sweep_df.attrs.get("sweep_id")]

latency = st.radio("Latency", ["projected_decode_ms", "measured_decode_ms"], horizontal=True,
                   format_func=lambda c: "projected (roofline, H100)" if c.startswith("projected") else "measured (this machine)")
st.plotly_chart(figures.tradeoff_chart(df, latency_col=latency), width="stretch")
c1, c2 = st.columns(2)
c1.plotly_chart(figures.perplexity_vs_ratio(df), width="stretch")
c2.plotly_chart(figures.cv_vs_ratio(df), width="stretch")

st.subheader("Pareto front")
y = st.selectbox("Quality axis", ["accuracy", "perplexity"])
event = st.plotly_chart(figures.pareto_chart(df, y=y), on_select="rerun", selection_mode="points", key="pareto")
points = (event or {}).get("selection", {}).get("points", []) if isinstance(event, dict) else event.selection.points
if points and points[0].get("customdata"):
    run_id = int(points[0]["customdata"][0])
    st.session_state.selected_run_id = run_id

run_id = st.session_state.selected_run_id
if run_id is not None and run_id in set(runs["id"]):
    record = store.get_run(run_id)
    st.markdown(f"**Selected run #{run_id}: {record.name}**")
    details = record.metrics.get("details")
    if details:
        st.plotly_chart(figures.drift_per_layer(details), width="stretch")
    if st.button("Load this plan into Compress"):
        with user_errors():
            set_plan(CompressionPlan.from_dict(record.plan))
        st.switch_page("pages/4_compress.py")

cols = ["id", "parent_run_id", "name", "perplexity", "accuracy", "compression_ratio", "experts_compression_ratio",
        "projected_decode_ms", "measured_decode_ms", "mean_cv", "mean_topk_overlap", "created_at"]
st.dataframe(df[[c for c in cols if c in df]].sort_values("id", ascending=False), hide_index=True, width="stretch")
