"""Page 6 — take the plan and the results out of the app."""

import json

import streamlit as st

from pages._state import current_plan, require_model, run_store

st.header("Export")
st.write("Download the current compression plan (JSON, loadable with `CompressionPlan.from_json` and the CLI) "
         "and the results of every stored run of this model (CSV).")

lm = require_model()
plan = current_plan()
st.download_button("Plan (JSON)", plan.to_json(), file_name="moeviz_plan.json", mime="application/json")
st.json(json.loads(plan.to_json()), expanded=False)

runs = run_store().runs(model_fingerprint=lm.fingerprint)
if runs.empty:
    st.info("No stored runs for this model yet.")
else:
    st.download_button("Results of all runs (CSV)", runs.to_csv(index=False), file_name="moeviz_runs.csv",
                       mime="text/csv")
    st.caption(f"{len(runs)} runs · model fingerprint {lm.fingerprint}")
if st.session_state.last_result is not None:
    st.download_button("Last evaluation, all details (JSON)", json.dumps(st.session_state.last_result, indent=2),
                       file_name="moeviz_result.json", mime="application/json")
