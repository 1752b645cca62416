"""Page 3 — one MoE layer as a diagram, coloured by the current compression plan."""

import streamlit as st

from moeviz import figures
from moeviz.compression.table import expert_table
from pages._state import current_plan, require_model, stats_for, user_errors

st.header("Architecture")
st.write("One MoE layer: the router sends each token to its top-k experts, whose outputs are summed with the "
         "routing weights. The three pruning targets are the weights within experts, the router, and whole "
         "experts; colours follow the plan on the Compress page (darker = sparser, struck out = removed).")

lm = require_model()
plan = current_plan()
layer = st.selectbox("MoE layer", range(len(lm.layers)), format_func=lambda i: f"{i}: {lm.layers[i].path}")
with user_errors():
    rows = [r for r in expert_table(plan, lm.layers, stats_for(lm)) if r["layer"] == layer]
states = [dict(layer=r["layer"], expert=r["expert"], sparsity=r["sparsity"], bits=r["bits"], removed=r["remove"])
          for r in rows]
st.graphviz_chart(figures.moe_layer_dot(lm.info.layers[layer], states, plan.to_dict()), width="stretch")
with st.expander("Layer description (JSON)"):
    st.json(lm.info.layers[layer])
