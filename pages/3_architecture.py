"""Page 3 — one MoE layer as a diagram, coloured by the current compression plan."""

import streamlit as st

from moeviz import figures
from moeviz.compression.plan import CompressionPlan, plan_summary
from moeviz.compression.table import expert_table
from pages._state import DEFAULTS, current_plan, require_model, stats_for, user_errors

st.header("Architecture")
st.write("One MoE layer: the router sends each token to its top-k experts, whose outputs are summed with the "
         "routing weights. The three pruning targets are the weights within experts, the router, and whole "
         "experts; colours follow the plan on the Compress page (darker = sparser, struck out = removed).")

lm = require_model()
plan = current_plan()
untouched = plan.to_dict() == DEFAULTS["plan"]  # the plan a new session starts with: nobody chose it yet
c1, c2 = st.columns(2)
layer = c1.selectbox("MoE layer", range(len(lm.layers)), format_func=lambda i: f"{i}: {lm.layers[i].path}")
# Before the user touched Compress, the layer is drawn as loaded: the default plan's 50 % would read as a
# property of the model. One click shows that default plan.
drawn = c2.radio("Draw", ["the model as loaded", "the current plan"], index=0 if untouched else 1, horizontal=True)
if drawn == "the model as loaded":
    shown = CompressionPlan()
    st.caption("Nothing compressed." + (f" The current plan is still the default ({plan_summary(plan)}), which "
                                        "**Compress** starts from; choose “the current plan” to see it."
                                        if untouched else f" The current plan: {plan_summary(plan)}."))
else:
    shown = plan
    st.caption(f"The current plan{' (the default, untouched on Compress)' if untouched else ''}: {plan_summary(plan)}.")
with user_errors():
    rows = [r for r in expert_table(shown, lm.layers, stats_for(lm)) if r["layer"] == layer]
states = [dict(layer=r["layer"], expert=r["expert"], sparsity=r["sparsity"], bits=r["bits"], removed=r["remove"])
          for r in rows]
# width="content": scaled to the page width, the wide drawing's text shrank below reading size.
st.graphviz_chart(figures.moe_layer_dot(lm.info.layers[layer], states, shown.to_dict(), dtype=lm.info.dtype),
                  width="content")
with st.expander("Layer description (JSON)"):
    st.json(lm.info.layers[layer])
