"""Page 6 — take the plan and the results out of the app."""

import json

import streamlit as st

from moeviz.compression.deployability import deployability_table
from moeviz.export import check_destination, default_export_folder, export_model, exported_files
from moeviz.compression.preview import format_bytes, plan_storage
from moeviz.runview import runs_csv
from moeviz.evaluation.sweep import use_lazy
from pages._state import compressor, current_plan, plan_samples, require_model, run_store, stats_for, user_errors

st.header("Export")
st.write("Save the compressed model as a Hugging Face folder, or download the current compression plan (JSON, loadable with `CompressionPlan.from_json` and the CLI) "
         "and the results of every stored run of this model (CSV).")

lm = require_model()
plan = current_plan()
st.download_button("Plan (JSON)", plan.to_json(), file_name="moeviz_plan.json", mime="application/json")
st.json(json.loads(plan.to_json()), expanded=False)

runs = run_store().runs(model_fingerprint=lm.fingerprint)
if runs.empty:
    st.info("No stored runs for this model yet.")
else:
    st.download_button("Results of all runs (CSV)", runs_csv(runs), file_name="moeviz_runs.csv", mime="text/csv",
                       help="Units in the headers: shares in %, decode times in ms per token, ratios in ×")
    st.caption(f"{len(runs)} runs · model fingerprint {lm.fingerprint}")
if st.session_state.last_result is not None:
    st.download_button("Last evaluation, all details (JSON)", json.dumps(st.session_state.last_result, indent=2),
                       file_name="moeviz_result.json", mime="application/json")

st.subheader("Compressed model")
st.caption("A Hugging Face folder (config, safetensors, tokenizer, moeviz_plan.json, moeviz_report.md, a README with "
           "the exact call that loads it). **compressed-tensors** packs the quantized experts as llm-compressor writes "
           "them and vLLM serves them (really smaller); **dense** stores every weight in the model dtype (pruned "
           "weights as zeros, quantized weights dequantized: only removed experts make it smaller). Written "
           "atomically; never into or over the source model, and \"Replace\" replaces only a folder that a moeviz "
           "export wrote.")
with user_errors():
    storage = plan_storage(compressor(lm, stats_for(lm)), plan)
deploy = storage.deployability
st.dataframe(deployability_table(deploy), hide_index=True, width="stretch")
rec = st.session_state.recovery
recovered = st.session_state.recovered_model
has_recovered = rec is not None and recovered is not None and rec["plan"] == plan.to_dict()
formats = ["compressed-tensors", "dense"] if deploy.export_format == "compressed-tensors" else ["dense", "compressed-tensors"]
with st.form("export_form"):
    folder = st.text_input("Output folder", value=str(default_export_folder(lm)),
                           help="An absolute path (a relative one would land in the app server's working folder)")
    which = st.radio("Model", ["compressed (the plan as applied)", f"recovered (run #{rec['run_id']})"] if has_recovered
                     else ["compressed (the plan as applied)"], horizontal=True)
    fmt = st.radio("Format", formats, horizontal=True, help="The first is the smallest format this plan can be written in")
    overwrite = st.checkbox("Replace the folder if it exists")
    if st.form_submit_button("Export model"):
        with user_errors(), st.spinner("Writing the model…"):
            hint = 'tick "Replace the folder if it exists"'
            check_destination(lm, folder, overwrite, hint)  # refuse a bad folder before applying the plan
            if which.startswith("recovered"):
                model, result = recovered, rec["result"]
            else:
                last = st.session_state.last_result
                result = last if last is not None and last["plan"] == plan.to_dict() else None
                stats = stats_for(lm)
                # lazy on large models: export compresses one layer at a time instead of holding a copy
                model = compressor(lm, stats).apply(plan, plan_samples(lm, stats, plan), lazy=use_lazy(lm))
            out = export_model(lm, model, folder, overwrite=overwrite, result=result, format=fmt, overwrite_hint=hint)
            files = exported_files(out)
        st.success(f"Exported to {out}: {format_bytes(files.file_bytes)} of safetensors ({fmt}), "
                   f"{storage.base_bytes / max(files.data_bytes, 1):.2f}× smaller than the base's tensors")
        st.markdown("Load it with:")
        st.code("\n".join(files.load), language="python")
