"""Figures of the sensitivity page (pure: arrays in, plotly figures out)."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from moeviz.sensitivity.measure import ExpertSensitivity

# The values a heatmap or a fitted plan can be based on, as a person reads them (the keys are the identifiers
# of `ExpertSensitivity.values`).
VALUE_LABELS = {"measured": "measured Δ loss", "fisher": "Fisher proxy (one backward pass)",
                "output_error": "output-error proxy"}


def value_label(kind: str) -> str:
    return VALUE_LABELS.get(kind, kind)


def sensitivity_heatmap(sens: ExpertSensitivity, setting: int, kind: str = "measured") -> go.Figure:
    """Layer × expert heatmap of Δ loss (or a proxy) at one grid setting."""
    s, b = sens.settings[setting]
    z = sens.values(kind)[..., setting]
    what = "Δ calibration loss (nats/token)" if kind == "measured" else value_label(kind)
    text = [[("" if not np.isfinite(v) else f"{v:.3g}") for v in row] for row in z]
    fig = go.Figure(go.Heatmap(
        z=z, x=[f"e{e}" for e in range(z.shape[1])], y=[f"L{l}" for l in range(z.shape[0])],
        # Diverging and centred on 0: an expert whose compression *lowers* the loss (Δ < 0) shows blue, not
        # the white of "no effect"
        colorscale="RdBu_r", zmid=0.0, text=text, texttemplate="%{text}", colorbar=dict(title="Δ" if kind == "measured" else "proxy"),
        hovertemplate="layer %{y}, expert %{x}: %{z:.4g}<extra></extra>",
    ))
    fig.update_layout(title=f"{what} · only this expert at sparsity {s:.0%}, {b} bits", template="plotly_white",
                      yaxis=dict(autorange="reversed"), height=120 + 40 * z.shape[0])
    return fig


def choice_heatmap(choice: list[list[int]], settings: list[tuple[float, int]]) -> go.Figure:
    """Layer × expert map of the settings an optimised plan chose (colour = bytes saved rank)."""
    z = np.asarray(choice, dtype=float)
    def label(k: int) -> str:
        s, b = settings[k]
        return "removed" if b == 0 else f"{s:.0%}·{b}b"
    text = [[label(int(k)) for k in row] for row in z]
    fig = go.Figure(go.Heatmap(z=z, x=[f"e{e}" for e in range(z.shape[1])], y=[f"L{l}" for l in range(z.shape[0])],
                               colorscale="Blues", showscale=False, text=text, texttemplate="%{text}",
                               hovertemplate="layer %{y}, expert %{x}: %{text}<extra></extra>"))
    fig.update_layout(title="Chosen setting per expert (sparsity · bits)", template="plotly_white",
                      yaxis=dict(autorange="reversed"), height=120 + 40 * z.shape[0])
    return fig
