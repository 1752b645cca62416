"""Shared helpers of the figure modules: palettes, array conversion, empty figures."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

# Qualitative palette (plotly's D3 + a few extra): 12 distinguishable colours, cycled beyond that.
QUALITATIVE = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
    "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#ad494a",
]

BASE_COLOR = "#000000"


def color_for(i: int, palette: list[str] | None = None) -> str:
    """The i-th colour of a qualitative palette, cycled."""
    palette = palette or QUALITATIVE
    return palette[int(i) % len(palette)]


def to_numpy(x) -> np.ndarray:
    """A torch tensor, list or array as a float numpy array (on CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=float)


def empty_figure(message: str, title: str = "") -> go.Figure:
    """A figure with no data and a centred explanatory annotation (never raises)."""
    fig = go.Figure()
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font=dict(size=14, color="#555555"))
    fig.update_layout(title=title or None, xaxis=dict(visible=False), yaxis=dict(visible=False),
                      template="plotly_white")
    return fig


def text_color_on(hex_color: str) -> str:
    """Black or white, whichever reads better on a `#rrggbb` background (WCAG relative luminance)."""
    h = hex_color.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) / 255 for i in (0, 2, 4))
    lin = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in (r, g, b)]
    lum = 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]
    return "#000000" if lum > 0.179 else "#ffffff"


def interpolate_hex(a: str, b: str, t: float) -> str:
    """Linear interpolation between two `#rrggbb` colours, t in [0, 1] (clamped)."""
    t = min(max(float(t), 0.0), 1.0)
    ca = [int(a.lstrip("#")[i : i + 2], 16) for i in (0, 2, 4)]
    cb = [int(b.lstrip("#")[i : i + 2], 16) for i in (0, 2, 4)]
    return "#" + "".join(f"{round(x + (y - x) * t):02x}" for x, y in zip(ca, cb))


def _wrap(text: str, limit: int, small: bool) -> str:
    """A long title split before its parenthesised part: "Title<br>(detail)" (detail smaller when `small`)."""
    if not text or len(text) <= limit or "<br>" in text or " (" not in text:
        return text
    head, tail = text.split(" (", 1)
    tail = "(" + tail
    return f"{head}<br><sup>{tail}</sup>" if small else f"{head}<br>{tail}"


def readable(fig: go.Figure, title_chars: int = 48, axis_chars: int = 34) -> go.Figure:
    """Fit a figure to a half-width column at 1440 px: long titles and axis titles wrap before their
    parenthesised detail instead of being cut, and horizontal legends sit below the axis titles."""
    title = fig.layout.title.text
    if title:
        fig.update_layout(title_text=_wrap(title, title_chars, small=True))
    for axis in list(fig.select_xaxes()) + list(fig.select_yaxes()):
        if axis.title and axis.title.text:
            axis.title.text = _wrap(axis.title.text, axis_chars, small=False)
            axis.automargin = True
    overlaid = any(getattr(a, "overlaying", None) for a in fig.select_yaxes())
    for axis in fig.select_yaxes():
        if getattr(axis, "overlaying", None) and axis.tickmode is None:
            axis.update(tickmode="auto", nticks=6)  # round ticks of its own, not the left axis' grid ("sync")
    if overlaid and fig.layout.legend.orientation != "h":
        # A right-hand axis: a legend beside the plot would sit on its tick labels and title.
        fig.update_layout(legend=dict(orientation="h", x=0, xanchor="left", y=-0.3, yanchor="top"))
    if fig.layout.legend and fig.layout.legend.orientation == "h":
        fig.update_layout(legend=dict(y=-0.3, yanchor="top"), margin=dict(b=140))
    return fig
