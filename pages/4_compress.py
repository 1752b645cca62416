"""Page 4 — build a compression plan (down to per-expert ratios and bits) and evaluate it."""

import pandas as pd
import streamlit as st

from moeviz import figures
from moeviz.compression.plan import ALLOCATIONS, METRICS, SUPPORTED_BITS, CompressionPlan, PruningSettings, QuantSettings
from moeviz.compression.removal import REMOVAL_SCORES, experts_to_remove
from moeviz.compression.table import apply_table_edits, expert_table
from moeviz.errors import MoevizError
from moeviz.evaluation import evaluate_plan
from moeviz.recovery import RecoverySettings, gap_recovered, recover_and_evaluate
from pages._state import (
    base_evaluator, calibration_samples, compressor, current_plan, plan_samples, require_model, require_stats, run_store,
    set_plan, user_errors,
)

st.header("Compress")
st.write("Choose how to prune and quantize the experts, edit any expert by hand, then evaluate: the compressed "
         "copy is measured against the base model on held-out text and stored as a run. The base model is "
         "never modified.")

lm = require_model()
stats = require_stats(lm)
plan = current_plan()

with st.form("plan_form"):
    c1, c2, c3, c4 = st.columns(4)
    metric = c1.selectbox("Pruning metric", METRICS, index=METRICS.index(plan.pruning.metric),
                          help="magnitude |W|; Wanda |W|·‖X‖; MoE-Pruner |W|·‖X·gate‖ (router-weighted)")
    sparsity = c2.slider("Global sparsity", 0.0, 0.95, float(plan.pruning.sparsity), 0.05)
    structures = ["unstructured", "2:4", "4:8"]
    structure = c3.selectbox("Structure", structures, index=structures.index(plan.pruning.structure)
                             if plan.pruning.structure in structures else 0,
                             help="N:M zeroes N of every M consecutive input weights of a row")
    allocation = c4.selectbox("Allocation", ALLOCATIONS, index=ALLOCATIONS.index(plan.pruning.allocation),
                              help="uniform: same ratio everywhere; utilization: less-used experts pruned more")
    c1, c2, c3, c4 = st.columns(4)
    bits = c1.selectbox("Expert weight bits", SUPPORTED_BITS, index=SUPPORTED_BITS.index(plan.quant.bits))
    group_size = c2.selectbox("Group size", [32, 64, 128, -1], index=[32, 64, 128, -1].index(plan.quant.group_size)
                              if plan.quant.group_size in (32, 64, 128, -1) else 2, help="-1 = one group per row")
    symmetric = c3.checkbox("Symmetric", value=plan.quant.symmetric)
    act_bits = c4.selectbox("Activation bits (expert inputs)", SUPPORTED_BITS, index=SUPPORTED_BITS.index(plan.activation_bits))
    c1, c2, c3, c4 = st.columns(4)
    router_sparsity = c1.slider("Router sparsity", 0.0, 0.9, float(plan.router_sparsity), 0.05)
    router_bits = c2.selectbox("Router bits", SUPPORTED_BITS, index=SUPPORTED_BITS.index(plan.router_bits))
    removal_score = c3.selectbox("Expert removal score", REMOVAL_SCORES,
                                 help="frequency: share of tokens; reap: mean gate·‖expert output‖")
    max_remove = min(l.num_experts - l.top_k for l in lm.layers)
    n_remove = c4.number_input("Experts to remove per layer", 0, max_remove,
                               value=min(max_remove, len(plan.removed_experts) // max(len(lm.layers), 1)))
    sequential = st.checkbox("Sequential (re-calibrate each layer on the compressed layers before it, as the "
                             "reference Wanda / MoE-Pruner procedures do; slower)", value=plan.sequential)
    if st.form_submit_button("Apply settings"):
        with user_errors():
            new = CompressionPlan(
                pruning=PruningSettings(metric=metric, sparsity=float(sparsity), structure=structure, allocation=allocation),
                quant=QuantSettings(bits=int(bits), group_size=int(group_size), symmetric=symmetric),
                overrides=plan.overrides,
                removed_experts=experts_to_remove(stats, int(n_remove), removal_score),
                router_sparsity=float(router_sparsity), router_bits=int(router_bits),
                activation_bits=int(act_bits), sequential=sequential,
            ).validate([l.num_experts for l in lm.layers], [l.top_k for l in lm.layers])
            set_plan(new)
            plan = new

st.subheader("Per-expert settings")
st.caption("Edit sparsity, bits or remove for any expert; edited cells become per-expert overrides of the plan.")
with user_errors():
    table = expert_table(plan, lm.layers, stats)
edited = st.data_editor(
    pd.DataFrame(table), hide_index=True, key=f"experts_{hash(plan.to_json())}",
    disabled=["layer", "expert", "utilization", "mean_gate"],
    column_config={
        "utilization": st.column_config.NumberColumn("utilization", format="%.3f", help="share of top-k assignments"),
        "mean_gate": st.column_config.NumberColumn("mean gate weight", format="%.3f"),
        "sparsity": st.column_config.NumberColumn("sparsity", min_value=0.0, max_value=0.99, step=0.05),
        "bits": st.column_config.SelectboxColumn("bits", options=list(SUPPORTED_BITS)),
        "remove": st.column_config.CheckboxColumn("remove"),
    },
)
rows_after = edited.to_dict("records")
if rows_after != table:
    try:
        new = apply_table_edits(plan, table, rows_after)
        new.validate([l.num_experts for l in lm.layers], [l.top_k for l in lm.layers])
    except MoevizError as e:  # e.g. an emptied cell: say so, keep the last valid plan and the rest of the page
        st.error(str(e))
    else:
        set_plan(new)
        st.rerun()
with st.expander("Edit one expert by number"):
    with st.form("one_expert_form"):
        c1, c2, c3, c4, c5 = st.columns(5)
        e_layer = c1.number_input("Layer", 0, len(lm.layers) - 1, 0)
        e_expert = c2.number_input("Expert", 0, max(l.num_experts for l in lm.layers) - 1, 0)
        e_sparsity = c3.number_input("Sparsity", 0.0, 0.99, 0.5, 0.05)
        e_bits = c4.selectbox("Bits", SUPPORTED_BITS, index=SUPPORTED_BITS.index(16))
        e_remove = c5.checkbox("Remove")
        if st.form_submit_button("Set expert"):
            i = next(i for i, r in enumerate(table) if r["layer"] == e_layer and r["expert"] == e_expert)
            edited_row = {**table[i], "sparsity": float(e_sparsity), "bits": int(e_bits), "remove": bool(e_remove)}
            with user_errors():
                new = apply_table_edits(plan, table, table[:i] + [edited_row] + table[i + 1:])
                new.validate([l.num_experts for l in lm.layers], [l.top_k for l in lm.layers])
            set_plan(new)
            st.rerun()
if plan.overrides and st.button("Clear per-expert overrides"):
    plan.overrides = []
    set_plan(plan)
    st.rerun()

if st.button("Evaluate", type="primary"):
    with user_errors(), st.spinner("Applying the plan and evaluating on held-out text…"):
        evaluator = base_evaluator(lm.fingerprint, lm)
        samples = plan_samples(lm, stats, plan)
        result, run_id = evaluate_plan(compressor(lm, stats), evaluator, plan, run_store(), samples=samples)
    st.session_state.last_result = result.to_dict()
    st.session_state.last_run_id = run_id

result = st.session_state.last_result
if result is not None:
    st.subheader("Result (compressed vs base)")
    m = result
    c = st.columns(5)
    c[0].metric("Perplexity", f"{m['perplexity']:.2f}", f"{m['perplexity'] - m['base_perplexity']:+.2f} vs base", delta_color="inverse")
    c[1].metric("Next-token accuracy", f"{m['accuracy']:.1%}", f"{(m['accuracy'] - m['base_accuracy']) * 100:+.1f} pts")
    c[2].metric("Compression ratio (model)", f"{m['compression']['compression_ratio']:.2f}×",
                f"experts {m['compression']['experts_compression_ratio']:.2f}×", delta_color="off")
    proj, base_proj = m["latency_projected"], m["base_latency_projected"]
    c[3].metric(f"Decode, projected ({proj['device']})", f"{proj['ms_per_token'] * 1000:.1f} µs/token",
                f"base {base_proj['ms_per_token'] * 1000:.1f} µs", delta_color="off",
                help="Roofline model: active weight bytes / bandwidth vs FLOPs / peak. A projection, not a measurement.")
    if m["latency_measured"]:
        base_measured = m.get("base_latency_measured")
        c[4].metric("Decode, measured (this machine)", f"{m['latency_measured']['decode_ms_per_token']:.2f} ms/token",
                    f"base {base_measured['decode_ms_per_token']:.2f} ms" if base_measured else "base unavailable",
                    delta_color="off",
                    help="Wall clock here. Fake quantization and zeroed weights bring no speed-up; removed experts can.")
    elif m.get("latency_unavailable"):
        c[4].metric("Decode, measured (this machine)", "unavailable", help=m["latency_unavailable"])
        st.caption(f"Measured latency is unavailable for this model: {m['latency_unavailable']}")
    st.caption(f"Stored as run #{st.session_state.last_run_id}. Evaluated on {m['eval_tokens']:,} held-out tokens in "
               f"{m['seconds']:.1f} s (apply {m['apply_seconds'] * 1000:.0f} ms).")
    c1, c2 = st.columns(2)
    c1.plotly_chart(figures.drift_per_layer(m), width="stretch")
    c2.plotly_chart(figures.load_balance_comparison(m), width="stretch")
    per_domain = pd.DataFrame({d: {"perplexity": v["perplexity"], "accuracy": v["accuracy"],
                                   "base perplexity": m["base_per_domain"][d]["perplexity"],
                                   "base accuracy": m["base_per_domain"][d]["accuracy"]}
                               for d, v in m["per_domain"].items()}).T
    st.dataframe(per_domain, width="stretch")

st.subheader("Recover by distillation")
if result is None or result["plan"] != plan.to_dict():
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
        hint = st.caption("Press **Stop** (top right) to cancel; nothing is stored then.")
        live, so_far = st.empty(), []

        def show_progress(i, n, r):
            bar.progress(i / n, text=f"Recovery step {i}/{n} · CE {r['ce']:.3f} · expert MSE {r['expert_mse']:.4g} · "
                                     f"router KL {r['router_kl']:.4g}")
            so_far.append(r)
            if i % 10 == 0:  # redraw the curves every 10 steps
                live.plotly_chart(figures.recovery_losses(so_far), width="stretch")

        recovery, recovered, run_id, model = recover_and_evaluate(
            compressor(lm, stats), base_evaluator(lm.fingerprint, lm), plan, calibration_samples(lm, stats), settings,
            store=run_store(), parent_run_id=st.session_state.last_run_id, progress=show_progress)
        for placeholder in (bar, hint, live):
            placeholder.empty()
    st.session_state.recovery = dict(run_id=run_id, parent_run_id=st.session_state.last_run_id, plan=plan.to_dict(),
                                     summary=recovery.summary(), history=recovery.history,
                                     result=recovered.to_dict())
    st.session_state.recovered_model = model

rec = st.session_state.recovery
if rec is not None and rec["plan"] == plan.to_dict():
    r, s = rec["result"], rec["summary"]
    c = st.columns(4)
    c[0].metric("Perplexity after recovery", f"{r['perplexity']:.2f}", f"{r['perplexity'] - result['perplexity']:+.2f} vs unrecovered",
                delta_color="inverse")
    c[1].metric("Accuracy after recovery", f"{r['accuracy']:.1%}", f"{(r['accuracy'] - result['accuracy']) * 100:+.1f} pts")
    won_back = gap_recovered(result["perplexity"], r["perplexity"], r["base_perplexity"])
    c[2].metric("Perplexity gap recovered", "n/a" if won_back is None else f"{won_back:.0%}",
                help="(unrecovered − recovered) / (unrecovered − base), on the held-out text")
    c[3].metric("Training steps", s["steps_done"], help="Steps run (fewer than asked when cancelled or out of time)")
    st.plotly_chart(figures.recovery_losses(rec["history"], s["lambda_expert"], s["lambda_router"]), width="stretch")
    stopped = f", stopped early ({s['stopped_early']})" if s["stopped_early"] else ""
    st.caption(f"Trained {s['steps_done']} steps in {s['seconds']:.1f} s on {s['tokens_seen']:,} calibration tokens{stopped}; "
               f"λ_expert {s['lambda_expert']:.3g}, λ_router {s['lambda_router']:.3g}. Stored as run #{rec['run_id']}, "
               f"linked to run #{rec['parent_run_id']}: the Trade-offs page draws the recovery as an arrow. The Export "
               "page can write the recovered model (kept in this session until the next recovery).")
