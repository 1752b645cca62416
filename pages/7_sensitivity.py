"""Page 7 — per-expert sensitivity, plans fitted to a budget, one-pass vs sequential."""

import time

import pandas as pd
import streamlit as st

from moeviz.compression.plan import METRICS
from moeviz.evaluation import evaluate_plan
from moeviz.sensitivity import SensitivityGrid
from moeviz.sensitivity.budget import Budget, optimise_plan
from moeviz.sensitivity.cache import sensitivity_cached
from moeviz.sensitivity.figures import choice_heatmap, sensitivity_heatmap, value_label
from moeviz.sensitivity.measure import first_windows, measure_cost
from moeviz.registry import method_label
from moeviz.figures.units import MIB, eta_text, format_bytes
from moeviz.store import new_sweep_id
from pages._state import (
    base_evaluator, calibration_samples, compressor, current_plan, require_model, require_stats, run_store, set_plan,
    sync_url, user_errors,
)

st.header("Sensitivity")
st.write("How much the calibration loss rises when one expert alone is pruned or quantized, at each setting of "
         "a small grid. From these numbers a plan is fitted to a budget: each expert gets the setting that "
         "costs the least loss for the bytes it saves. The fitted plan is an ordinary plan with per-expert "
         "overrides: the **Compress** page shows it in its table, where every cell can still be edited.")

lm = require_model()
stats = require_stats(lm)
plan = current_plan()

if plan.second_order():
    # Sensitivity prunes / quantizes one expert at a time on cached inputs: SparseGPT and GPTQ compensate
    # within a whole layer from Hessians collected layer by layer, which this per-expert grid cannot do.
    st.info("The current plan uses SparseGPT / GPTQ, which this page cannot measure (their weight updates need "
            "layer-by-layer Hessians, not one expert at a time): sensitivity is measured with a first-order metric "
            "(chosen below) and round-to-nearest. A fitted plan keeps the metric chosen here; set SparseGPT / GPTQ "
            "again on the Compress page to evaluate it with the second-order methods.")
# Plain widgets and a button, not a form: Enter in a form's number field submits the form, and this
# submission is a measurement of minutes. The settings of the last measurement are the widgets' defaults
# (also after a refresh: they are in the URL) and that measurement is reloaded from the on-disk cache.
first_order = [m for m in METRICS if m != "sparsegpt"]  # SparseGPT needs layer-by-layer Hessians: not per expert
GROUPS = [32, 64, 128, -1]
last = st.session_state.sensitivity_settings or dict(
    metric=plan.pruning.metric if plan.pruning.metric in first_order else first_order[0],
    group_size=plan.quant.group_size if plan.quant.group_size in GROUPS else 128, n_windows=16)
c1, c2, c3 = st.columns(3)
metric = c1.selectbox("Pruning metric", first_order, help="SparseGPT is not offered: see the note above",
                      index=first_order.index(last["metric"]) if last["metric"] in first_order else 0,
                      format_func=method_label)
group_size = c2.selectbox("Quantization group size", GROUPS,
                          index=GROUPS.index(last["group_size"]) if last["group_size"] in GROUPS else 2)
n_windows = c3.number_input("Calibration windows measured", 1, 256, int(last["n_windows"]),
                            help="the first N calibration windows; the time grows in proportion to them")
chosen = dict(metric=metric, group_size=int(group_size), n_windows=int(n_windows))
grid = SensitivityGrid(metric=metric, group_size=int(group_size))
samples = first_windows(calibration_samples(lm, stats), int(n_windows))
sens = st.session_state.sensitivity
if sens is None or sens.model_fingerprint != lm.fingerprint or sens.stats_fingerprint != stats.fingerprint:
    with user_errors():  # a refresh, or settings measured before: from the disk, never measured here
        sens, _ = sensitivity_cached(lm, stats, samples, grid, cache_only=True)
    if sens is not None:
        st.session_state.sensitivity, st.session_state.sensitivity_settings = sens, chosen
        sync_url()
if st.button("Measure sensitivity", type="primary"):
    bar = st.progress(0.0, text="Measuring…")
    stop = st.empty()
    stop.button("Stop measuring", help="Cancels the measurement; nothing is cached then")
    t0 = time.perf_counter()
    with user_errors():
        sens, cached = sensitivity_cached(lm, stats, samples, grid, progress=lambda d, t: bar.progress(
            d / t, text=f"Measuring… {d}/{t} (setting × layer){eta_text(time.perf_counter() - t0, d, t)}"))
    bar.empty()
    stop.empty()
    st.session_state.sensitivity, st.session_state.sensitivity_settings = sens, chosen
    sync_url()
    st.success(("Loaded from the cache" if cached else f"Measured in {sens.seconds:.1f} s") +
               f": {sum(sens.num_experts)} experts × {len(sens.settings)} settings on {sens.n_tokens} tokens.")

if sens is None or sens.model_fingerprint != lm.fingerprint or sens.stats_fingerprint != stats.fingerprint:
    st.info(f"Measure the sensitivity first: {measure_cost(grid, lm, samples)}. Cached afterwards, also across "
            "a refresh.")
    st.stop()

st.subheader("Sensitivity heatmap")
c1, c2 = st.columns([3, 1])
setting = c1.selectbox("Setting", range(len(sens.settings)),
                       format_func=lambda i: f"sparsity {sens.settings[i][0]:.0%}, {sens.settings[i][1]} bits",
                       index=sens.setting_index(0.5, 16) if (0.5, 16) in sens.settings else 0)
kinds = (["measured"] if sens.measured is not None else []) + sorted(sens.estimated)
kind = c2.selectbox("Values", kinds, format_func=value_label, help="measured Δ loss, or a one-backward-pass proxy")
st.plotly_chart(sensitivity_heatmap(sens, setting, kind), width="stretch")
if sens.measured is not None:
    rho = sens.rank_correlation("fisher")
    st.caption("Rank correlation (Spearman) of the Fisher proxy with the measured Δ loss, per layer: "
               + ", ".join(f"L{i} {r:.2f}" for i, r in enumerate(rho)))

st.subheader("Fit the plan to a budget")
KINDS = {"experts compression ratio (×)": "experts_ratio", "model compression ratio (×)": "model_ratio",
         "model size (MiB)": "model_bytes", "mean expert sparsity": "mean_sparsity", "mean bit width": "mean_bits"}
DEFAULT = {"experts_ratio": 4.0, "model_ratio": 2.0, "model_bytes": 8.0, "mean_sparsity": 0.6, "mean_bits": 4.0}
label = st.selectbox("Budget", list(KINDS))  # outside the form: the value below takes this budget's units
k = KINDS[label]
with st.form("budget_form"):
    c2, c3, c4 = st.columns(3)
    value = c2.number_input(f"Value ({label})", min_value=0.0, value=DEFAULT[k], step=0.1, key=f"budget_value_{k}")
    options = c3.selectbox("Settings the experts may take", ["default", "all", "sparsity", "bits"],
                           help="default: pruning only for a sparsity budget, bit widths only for a bit budget, "
                                "everything in the grid otherwise (with expert removal where it was measured)")
    predictor = c4.selectbox("Predicted Δ loss from", kinds, format_func=value_label,
                             help="the measured sensitivity (recommended) or a one-backward proxy")
    target = st.radio("The plan must export to", ["hf-dense", "vllm", "any"], horizontal=True,
                      format_func={"hf-dense": "a Hugging Face folder (same removal count per layer)",
                                   "vllm": "vLLM (also one bit width per layer: 4, 8 or unquantized)",
                                   "any": "anything (per-expert choices; may not export)"}.get)
    fit = st.form_submit_button("Fit the plan to this budget", type="primary")
if fit:
    with user_errors():
        budget = Budget(k, float(value) * (MIB if k == "model_bytes" else 1),
                        options=None if options == "default" else options)
        result = optimise_plan(lm, sens, budget, kind=predictor, target=target)
    set_plan(result.plan)
    st.session_state.budget_result = dict(budget=result.budget, predicted_delta=result.predicted_delta,
                                          experts_bytes=result.experts_bytes, experts_ratio=result.experts_ratio,
                                          mean_sparsity=result.mean_sparsity, mean_bits=result.mean_bits,
                                          exact=result.exact, seconds=result.seconds, choice=result.choice,
                                          settings=result.settings, name=result.plan.name)
res = st.session_state.get("budget_result")
if res is not None:
    st.success(f"Plan **{res['name']}** set: predicted Δ loss {res['predicted_delta']:.4f} nats/token, experts "
               f"{format_bytes(res['experts_bytes'])} ({res['experts_ratio']:.2f}×), mean sparsity "
               f"{res['mean_sparsity']:.1%}, mean bits {res['mean_bits']:.2f} "
               f"({'exact' if res['exact'] else 'Lagrangian'} solver, {res['seconds'] * 1000:.0f} ms).")
    st.plotly_chart(choice_heatmap(res["choice"], [tuple(s) for s in res["settings"]]), width="stretch")
    st.page_link("pages/4_compress.py", label="Review or edit it on Compress", icon="✂️")

st.subheader("Optimised plans at several budgets")
st.caption("Each plan is evaluated on the held-out text and stored as a run named “optimised @ …”, so the "
           "**Trade-offs** page draws them next to your other runs.")
levels = st.multiselect("Mean expert sparsity budgets", [0.3, 0.4, 0.5, 0.6, 0.7, 0.8], default=[0.5, 0.6, 0.7],
                        format_func=lambda r: f"{r:.0%}")
if st.button("Evaluate optimised plans") and levels:
    sweep = new_sweep_id()
    rows = []
    bar = st.progress(0.0, text=f"Evaluating optimised plans: 0/{len(levels)}…")
    stop = st.empty()
    stop.button("Stop evaluating", help="Stops after the plan being evaluated; finished runs are already stored")
    t0 = time.perf_counter()
    with user_errors():
        evaluator = base_evaluator(lm.fingerprint, lm)
        comp = compressor(lm, stats)
        for i, r in enumerate(sorted(levels)):
            p = optimise_plan(lm, sens, Budget("mean_sparsity", float(r)), name=f"optimised @ {r:.0%}").plan
            result, run_id = evaluate_plan(comp, evaluator, p, run_store(), sweep_id=sweep)
            rows.append(dict(run=run_id, name=p.name, perplexity=result.perplexity,
                             base_perplexity=result.base_perplexity,
                             experts_ratio=result.compression["experts_compression_ratio"]))
            bar.progress((i + 1) / len(levels), text=f"Evaluated {p.name}: {i + 1}/{len(levels)}"
                                                     f"{eta_text(time.perf_counter() - t0, i + 1, len(levels))}")
    bar.empty()
    stop.empty()
    st.session_state.optimised_runs = rows
if st.session_state.get("optimised_runs"):
    st.dataframe(pd.DataFrame(st.session_state.optimised_runs), hide_index=True)

st.subheader("One-pass vs sequential, side by side")
st.caption("The current plan applied in one pass (every layer scored on the base model's statistics) and "
           "sequentially (each layer re-calibrated on the already-compressed layers before it): the share of "
           "pruning-mask entries that differ per layer, and both evaluated on the held-out text.")
if st.button("Compare one-pass and sequential"):
    from moeviz.sensitivity.sequential import compare_one_pass_sequential

    stop = st.empty()
    stop.button("Stop comparing", help="Cancels the comparison")
    bar = st.progress(0.0, text="Comparing…")
    stage_start = {}

    def compare_progress(stage, done, total):
        t0 = stage_start.setdefault(stage, time.perf_counter())
        bar.progress(done / max(total, 1), text=f"{stage}: {done}/{total}{eta_text(time.perf_counter() - t0, done, total)}")

    with user_errors():
        evaluator = base_evaluator(lm.fingerprint, lm)  # the first evaluation of a model evaluates the base once
        cmp = compare_one_pass_sequential(compressor(lm, stats), evaluator, current_plan(),
                                          calibration_samples(lm, stats), progress=compare_progress)
    stop.empty()
    bar.empty()
    st.session_state.sequential_comparison = cmp.to_dict()
cmp = st.session_state.get("sequential_comparison")
if cmp is not None:
    c = st.columns(3)
    c[0].metric("Perplexity, one-pass", f"{cmp['one_pass']['perplexity']:.3f}")
    c[1].metric("Perplexity, sequential", f"{cmp['sequential']['perplexity']:.3f}",
                f"{cmp['perplexity_difference']:+.3f} vs one-pass", delta_color="inverse")
    c[2].metric("Routing KL vs base (mean), one-pass → sequential",
                f"{cmp['one_pass']['mean_kl']:.4f} → {cmp['sequential']['mean_kl']:.4f}")
    st.dataframe(pd.DataFrame(cmp["layers"]), hide_index=True)
