"""Page 2 — how the router uses the experts on the calibration text."""

import streamlit as st

from moeviz import figures
from moeviz.figures._common import readable
from moeviz.explorer import route_text
from pages._state import require_model, require_stats, user_errors

st.header("Routing")
st.write("Which experts the router chooses on the calibration text: utilization per layer and expert, how "
         "confident the router is, how balanced the load is, which experts fire together and which "
         "specialise in a domain. Type text below to see each token's expert.")

lm = require_model()
stats = require_stats(lm)
st.plotly_chart(readable(figures.utilization_heatmap(stats)), width="stretch")
st.plotly_chart(readable(figures.load_balance_cv_bars(stats)), width="stretch")  # every layer: no selector

# Each control sits right above what it controls: the layer above the three per-layer charts, the log scale
# in the histogram's column (the selector used to sit beside the all-layers CV bars, which it does not change).
st.subheader("One MoE layer")
layer = st.selectbox("Layer", range(len(stats.layers)), format_func=lambda i: f"MoE layer {i} ({stats.layers[i].path})")
c1, c2 = st.columns(2)
log_y = c1.checkbox("Log scale", value=True, help="of the router-probability histogram below")
c1.plotly_chart(readable(figures.router_probability_histogram(stats, layer, log_y=log_y)), width="stretch")
c2.plotly_chart(readable(figures.coactivation_heatmap(stats, layer)), width="stretch")
st.plotly_chart(readable(figures.domain_specialization(stats, layer)), width="stretch")

st.subheader("Token explorer")
text = st.text_area("Text", key="explorer_text", height=120)
explore_layer = st.selectbox("Colour by the top-1 expert of layer", range(len(lm.layers)), key="explorer_layer")
if text.strip():
    with user_errors():
        r = route_text(lm, text, explore_layer)
    st.html(figures.token_routing_html(r.tokens, r.top1, r.topk, r.weights, r.num_experts))
    st.caption("Hover a token to see its top-k experts and their routing weights.")
