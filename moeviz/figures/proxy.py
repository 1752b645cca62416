"""The live quality proxy (`moeviz.compression.proxy`) per MoE layer, as a bar chart in %."""

from __future__ import annotations

import plotly.graph_objects as go

from moeviz.figures._common import color_for


def proxy_per_layer(errors: list[float]) -> go.Figure:
    pct = [100 * e for e in errors]
    fig = go.Figure(go.Bar(x=list(range(len(pct))), y=pct, marker_color=color_for(1),
                           text=[f"{v:.2g} %" for v in pct], textposition="outside", cliponaxis=False,
                           hovertemplate="MoE layer %{x}<br>error %{y:.3g} % of the gate-weighted output<extra></extra>"))
    top = max(pct, default=0.0)
    fig.update_layout(title="Quality proxy per layer (gate-weighted reconstruction error)", template="plotly_white",
                      height=280, margin=dict(t=60, b=50, l=10, r=10), showlegend=False,
                      xaxis=dict(title="MoE layer (index)", dtick=1),
                      yaxis=dict(title="Error (% of output)", range=[0, max(top * 1.25, 1e-3)], rangemode="tozero"))
    return fig
