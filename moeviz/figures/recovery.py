"""Recovery figures: the three loss terms per step (from `RecoveryResult.history`)."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from moeviz.figures._common import color_for, empty_figure

TERMS = (("ce", "cross-entropy"), ("expert_mse", "Σ expert-output MSE"), ("router_kl", "Σ router KL(teacher ‖ student)"))


def recovery_losses(history: list[dict], lambda_expert: float | None = None,
                    lambda_router: float | None = None) -> go.Figure:
    """One panel per loss term (unweighted, as measured on each step's batch), step on x.
    The λs, when given, are shown in the panel titles."""
    if not history:
        return empty_figure("No recovery steps yet.", "Recovery losses")
    titles = [label for _, label in TERMS]
    if lambda_expert is not None:
        titles[1] += f" (λ = {lambda_expert:.3g})"
    if lambda_router is not None:
        titles[2] += f" (λ = {lambda_router:.3g})"
    fig = make_subplots(rows=1, cols=3, subplot_titles=titles)
    steps = [row["step"] for row in history]
    for i, (key, label) in enumerate(TERMS):
        fig.add_trace(go.Scatter(x=steps, y=[row[key] for row in history], mode="lines", name=label,
                                 line=dict(color=color_for(i)), showlegend=False), row=1, col=i + 1)
        fig.update_xaxes(title_text="step", row=1, col=i + 1)
    fig.update_layout(template="plotly_white", height=300, margin=dict(t=50, b=40, l=40, r=20),
                      title="Recovery losses per step (training batches)")
    return fig
