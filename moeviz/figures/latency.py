"""Base vs compressed decode latency measured back to back (`moeviz.latency_ab`): medians with
quartile error bars and every repeat as a faint dot."""

from __future__ import annotations

import plotly.graph_objects as go

from moeviz.figures._common import BASE_COLOR, color_for
from moeviz.figures.units import time_unit


def latency_spread_chart(ab: dict) -> go.Figure:
    unit, k = time_unit([ab["base"]["max"], ab["compressed"]["max"]])
    fig = go.Figure()
    for i, (key, label, color) in enumerate((("base", "base model", BASE_COLOR), ("compressed", "compressed", color_for(0)))):
        s = ab[key]
        fig.add_trace(go.Scatter(
            x=[s["median"] * k], y=[label], mode="markers", name=f"{label} (median)", marker=dict(size=12, color=color),
            error_x=dict(type="data", symmetric=False, array=[(s["q3"] - s["median"]) * k],
                         arrayminus=[(s["median"] - s["q1"]) * k], color=color, thickness=2, width=6),
            hovertemplate=f"{label}: median %{{x:.3g}} {unit}, IQR {s['q1'] * k:.3g}–{s['q3'] * k:.3g} {unit}<extra></extra>"))
        fig.add_trace(go.Scatter(x=[v * k for v in s.get("samples", [])], y=[label] * len(s.get("samples", [])),
                                 mode="markers", marker=dict(size=5, color=color, opacity=0.35), showlegend=False,
                                 hovertemplate=f"one repeat: %{{x:.3g}} {unit}<extra></extra>"))
    fig.update_layout(title="Decode per token, interleaved repeats (median, IQR bars, each repeat)",
                      template="plotly_white", height=230, showlegend=False, margin=dict(t=60, b=40, l=10, r=10),
                      xaxis=dict(title=f"Decode time per token ({unit})", rangemode="tozero"))
    return fig
