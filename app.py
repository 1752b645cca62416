"""moeviz — Streamlit entry point (landing page).

Thin on purpose: all logic lives in the `moeviz` library. Started by `make run` on localhost.
"""

import streamlit as st

import moeviz
from moeviz.errors import MoevizError

st.set_page_config(page_title="moeviz", page_icon="🧩", layout="wide")
st.title("moeviz — Mixture-of-Experts routing and compression")
st.write(
    "Load an MoE language model, see how its router uses the experts on calibration text, then prune "
    "and quantize it per expert and measure what that costs. The bundled demo MoE works offline."
)


@st.cache_resource(show_spinner="Loading model…")
def load_base_model(source: str | None):
    # Cached across browser sessions: the base model is shared and never mutated.
    return moeviz.load_model(source)


source = st.text_input("Model (folder or hub id; empty = bundled demo MoE)", value="")
try:
    lm = load_base_model(source.strip() or None)
except MoevizError as e:
    st.error(str(e))
    st.stop()

info = lm.info
cols = st.columns(5)
cols[0].metric("Architecture", info.architecture)
cols[1].metric("MoE layers", info.num_moe_layers)
cols[2].metric("Experts / layer", info.num_experts)
cols[3].metric("Top-k", info.top_k)
cols[4].metric("Parameters", f"{info.num_parameters / 1e6:.2f} M")
st.caption(f"Routing: {info.routing_rule} · dtype {info.dtype} · device {info.device} · fingerprint {info.fingerprint}")
st.dataframe(
    [{k: l[k] for k in ("index", "path", "num_experts", "top_k", "hidden_size", "intermediate_size")}
     for l in info.layers],
    hide_index=True,
)
