"""Routing figures from `CalibrationStats`: utilization, router probabilities, load balance,
co-activation and domain specialisation.

`layer` arguments are positions in ``stats.layers`` (the MoE layer index 0..L-1), not decoder
layer numbers; hover texts show both.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from moeviz.figures._common import color_for, empty_figure, to_numpy

_TEMPLATE = "plotly_white"


def _layer(stats, layer: int):
    if not 0 <= layer < len(stats.layers):
        raise IndexError(f"layer {layer} does not exist; the statistics cover {len(stats.layers)} MoE layers")
    return stats.layers[layer]


def _ragged(rows: list[np.ndarray]) -> np.ndarray:
    """Stack per-layer vectors of possibly different lengths into [L, max E], padding with NaN."""
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


# ---------------------------------------------------------------------------------- utilization
def utilization_heatmap(stats) -> go.Figure:
    """Layer × expert heatmap; colour = share of the layer's top-k assignments (%).

    z[l][e] = 100 · routed_counts[e] / Σ routed_counts of layer l. Hover: layer, expert, share,
    token count (top-k assignments) and mean gate weight of the tokens routed to the expert.
    """
    if not stats.layers:
        return empty_figure("No MoE layers in these statistics.", "Expert utilization")
    share = _ragged([100 * to_numpy(l.utilization()) for l in stats.layers])
    counts = _ragged([to_numpy(l.routed_counts) for l in stats.layers])
    gate = _ragged([to_numpy(l.mean_gate()) for l in stats.layers])
    decoder = np.array([[l.layer] * share.shape[1] for l in stats.layers], dtype=float)
    custom = np.stack([counts, gate, decoder], axis=-1)
    E = share.shape[1]
    fig = go.Figure(go.Heatmap(
        z=share, x=list(range(E)), y=list(range(len(stats.layers))), customdata=custom,
        colorscale="Viridis", zmin=0, colorbar=dict(title="Share of top-k<br>assignments (%)"),
        hovertemplate=("MoE layer %{y} (decoder layer %{customdata[2]:.0f})<br>Expert %{x}<br>"
                       "Share of top-k assignments: %{z:.2f}%<br>Tokens routed: %{customdata[0]:,.0f}<br>"
                       "Mean gate weight: %{customdata[1]:.3f}<extra></extra>"),
        name="utilization",
    ))
    fig.update_layout(
        title=f"Expert utilization per layer (uniform = {100 / max(E, 1):.1f}% per expert)",
        xaxis=dict(title="Expert (index)", dtick=1 if E <= 32 else None),
        yaxis=dict(title="MoE layer (index)", autorange="reversed", dtick=1 if len(stats.layers) <= 32 else None),
        template=_TEMPLATE,
    )
    return fig


# ---------------------------------------------------------------------------------- probabilities
DISTRIBUTION_AXIS = {
    "softmax": "Router probability (softmax of the logits, 0–1)",
    "sigmoid": "Router score share (sigmoid scores normalised to sum to 1, 0–1)",
    "probs": "Router probability (as the router returns it, 0–1)",
    "selected": "Chosen experts' weight share (routing rule not verified: unchosen experts count as 0)",
}


def distribution_kind(stats, layer: int) -> str:
    """How calibration formed layer `layer`'s router distribution ("softmax" for statistics saved
    before the kind was recorded, when every family was shown as a softmax)."""
    kinds = (getattr(stats, "settings", None) or {}).get("distributions") or []
    return kinds[layer] if layer < len(kinds) else "softmax"


def router_probability_histogram(stats, layer: int, experts: list[int] | None = None,
                                 log_y: bool = False) -> go.Figure:
    """Distribution of the router probability each expert gets, over all calibration tokens.

    One line (with markers) per expert, from ``prob_hist[e]`` (equal bins over [0, 1]); x = bin
    centre, y = tokens in the bin. `experts` selects a subset (default: all). `log_y` uses a
    logarithmic token axis (empty bins then disappear), useful because most mass sits near 0.
    """
    ls = _layer(stats, layer)
    hist = to_numpy(ls.prob_hist)  # [E, B]
    E, B = hist.shape
    experts = list(range(E)) if experts is None else [int(e) for e in experts]
    bad = [e for e in experts if not 0 <= e < E]
    if bad:
        raise IndexError(f"experts {bad} do not exist; layer {layer} has {E} experts")
    if not experts or B == 0:
        return empty_figure("Select at least one expert.", f"Router probabilities, MoE layer {layer}")
    edges = np.linspace(0.0, 1.0, B + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    fig = go.Figure()
    for e in experts:
        total = hist[e].sum()
        share = 100 * hist[e] / total if total > 0 else np.zeros(B)
        fig.add_trace(go.Scatter(
            x=centres, y=hist[e], mode="lines+markers", name=f"expert {e}",
            line=dict(color=color_for(e), shape="hvh"), marker=dict(size=5),
            customdata=np.stack([edges[:-1], edges[1:], share], axis=-1),
            hovertemplate=(f"Expert {e}<br>p in [%{{customdata[0]:.3f}}, %{{customdata[1]:.3f}})<br>"
                           "Tokens: %{y:,.0f} (%{customdata[2]:.2f}% of this expert's tokens)<extra></extra>"),
        ))
    fig.update_layout(
        title=f"Router probability distribution, MoE layer {layer} (decoder layer {ls.layer})",
        xaxis=dict(title=DISTRIBUTION_AXIS.get(distribution_kind(stats, layer), DISTRIBUTION_AXIS["softmax"]),
                   range=[0, 1]),
        # Log axis: a tick per power of ten (1, 10, 100, …), not plotly's 2 and 5 between them ("5, 2, 1000, 5").
        yaxis=dict(title="Tokens (count" + (", log scale)" if log_y else ")"), type="log" if log_y else "linear",
                   **(dict(dtick=1) if log_y else {})),
        legend=dict(title="Expert"), template=_TEMPLATE,
    )
    return fig


# ---------------------------------------------------------------------------------- load balance
def load_balance_cv_bars(stats) -> go.Figure:
    """Per-layer coefficient of variation of tokens per expert, from top-k and from top-1 counts
    (grouped bars; 0 = perfectly balanced)."""
    if not stats.layers:
        return empty_figure("No MoE layers in these statistics.", "Load balance")
    x = list(range(len(stats.layers)))
    fig = go.Figure()
    for top1, name, color in ((False, "top-k assignments", color_for(0)), (True, "top-1 choice", color_for(1))):
        cv = [l.load_balance_cv(top1=top1) for l in stats.layers]
        fig.add_trace(go.Bar(
            x=x, y=cv, name=f"CV of {name}", marker_color=color,
            customdata=[[l.layer] for l in stats.layers],
            hovertemplate=(f"MoE layer %{{x}} (decoder layer %{{customdata[0]}})<br>CV of {name}: %{{y:.3f}}"
                           "<extra></extra>"),
        ))
    fig.update_layout(
        title="Load balance per layer (coefficient of variation of tokens per expert)",
        barmode="group", xaxis=dict(title="MoE layer (index)", dtick=1),
        yaxis=dict(title="CV = std / mean of tokens per expert (unitless; 0 = balanced)", rangemode="tozero"),
        legend=dict(title="Counted from"), template=_TEMPLATE,
    )
    return fig


def _load_balance_rows(result) -> list[dict]:
    if hasattr(result, "load_balance"):
        return list(result.load_balance)
    if isinstance(result, dict):
        if "load_balance" in result:
            return list(result["load_balance"])
        if "details" in result and isinstance(result["details"], dict):
            return list(result["details"].get("load_balance", []))
        return []
    return list(result or [])


def load_balance_comparison(result, counts: str = "topk") -> go.Figure:
    """Base vs compressed load-balance CV per layer (grouped bars).

    `result`: an `EvalResult`, its ``to_dict()``, a run-store metrics dict with ``"details"``, or the
    ``load_balance`` list itself (dicts with layer, base_cv_topk, cv_topk, base_cv_top1, cv_top1).
    `counts`: "topk" or "top1". The compressed CV is over the experts still active.
    """
    if counts not in ("topk", "top1"):
        raise ValueError("counts must be 'topk' or 'top1'")
    rows = _load_balance_rows(result)
    label = "top-k assignments" if counts == "topk" else "top-1 choice"
    title = f"Load balance before and after compression (CV of {label})"
    if not rows:
        return empty_figure("No load-balance data in this result.", title)
    x = [r.get("layer", i) for i, r in enumerate(rows)]
    fig = go.Figure()
    for key, name, color in ((f"base_cv_{counts}", "base model", "#7f7f7f"),
                             (f"cv_{counts}", "compressed", color_for(0))):
        fig.add_trace(go.Bar(x=x, y=[r[key] for r in rows], name=name, marker_color=color,
                             hovertemplate=f"MoE layer %{{x}}<br>{name}: CV %{{y:.3f}}<extra></extra>"))
    fig.update_layout(
        title=title, barmode="group", xaxis=dict(title="MoE layer (index)", dtick=1),
        yaxis=dict(title="CV = std / mean of tokens per expert (unitless; 0 = balanced)", rangemode="tozero"),
        legend=dict(title="Model"), template=_TEMPLATE,
    )
    return fig


# ---------------------------------------------------------------------------------- co-activation
def coactivation_matrix(stats, layer: int, normalize: bool = True) -> np.ndarray:
    """[E, E] co-activation with the diagonal set to NaN.

    normalize=True: row-conditional share in %, ``100 · C[i, j] / C[i, i]`` = of the tokens routed
    to expert i (row), the share also routed to expert j. normalize=False: raw token counts."""
    c = to_numpy(_layer(stats, layer).coactivation)
    if normalize:
        diag = np.diag(c).copy()
        with np.errstate(invalid="ignore", divide="ignore"):
            z = 100 * c / diag[:, None]
        z[diag == 0, :] = np.nan
    else:
        z = c.copy()
    np.fill_diagonal(z, np.nan)
    return z


def coactivation_heatmap(stats, layer: int, normalize: bool = True) -> go.Figure:
    """Expert × expert co-activation of one layer; the diagonal (an expert with itself) is masked
    (shown as blank cells; its token count is in the hover of every cell of that row).

    See `coactivation_matrix` for the values. Hover: the pair, tokens that chose both, and the
    row expert's token count."""
    ls = _layer(stats, layer)
    c = to_numpy(ls.coactivation)
    E = c.shape[0]
    z = coactivation_matrix(stats, layer, normalize)
    diag = np.diag(c)
    custom = np.stack([c, np.repeat(diag[:, None], E, axis=1)], axis=-1)
    value = "Share of row expert's tokens: %{z:.1f}%<br>" if normalize else ""
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(E)), y=list(range(E)), customdata=custom, hoverongaps=False,
        colorscale="Blues", zmin=0,
        colorbar=dict(title="Also routed to<br>column expert (%)" if normalize else "Tokens routed<br>to both (count)"),
        hovertemplate=("Experts %{y} & %{x}<br>" + value + "Tokens routed to both: %{customdata[0]:,.0f}<br>"
                       "Tokens routed to expert %{y}: %{customdata[1]:,.0f}<extra></extra>"),
        name="co-activation",
    ))
    what = "share of row expert's tokens also routed to column expert" if normalize else "tokens routed to both"
    fig.update_layout(
        title=f"Expert co-activation, MoE layer {layer} ({what}; diagonal masked)",
        xaxis=dict(title="Expert (index)", dtick=1 if E <= 32 else None, scaleanchor="y"),
        yaxis=dict(title="Expert (index)", autorange="reversed", dtick=1 if E <= 32 else None),
        template=_TEMPLATE,
    )
    return fig


# ---------------------------------------------------------------------------------- domains
def domain_specialization_matrix(stats, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(share [D, E] in %, overall [E] in %, ratio [D, E]) for one layer.

    share[d, e] = 100 · domain_counts[d, e] / Σ_e domain_counts[d]; overall[e] = the expert's share
    over all domains; ratio = share / overall (1 = no specialisation; > 1 = over-used on that domain).
    Domains without tokens, and experts never used, give NaN."""
    dc = to_numpy(_layer(stats, layer).domain_counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = 100 * dc / dc.sum(axis=1, keepdims=True)
        tot = dc.sum(axis=0)
        overall = 100 * tot / tot.sum() if tot.sum() > 0 else np.full(tot.shape, np.nan)
        ratio = share / np.where(overall > 0, overall, np.nan)[None, :]
    return share, overall, ratio


def domain_specialization(stats, layer: int, mode: str = "ratio") -> go.Figure:
    """Domain × expert heatmap of one layer.

    mode="ratio" (default): specialisation = share in domain / overall share, on a diverging scale
    centred at 1 (log2 colour, so 2× and ½× look equally strong). mode="share": each expert's share
    (%) of the domain's top-k assignments. Hover always shows share, overall share, ratio, count.
    """
    if mode not in ("ratio", "share"):
        raise ValueError("mode must be 'ratio' or 'share'")
    ls = _layer(stats, layer)
    share, overall, ratio = domain_specialization_matrix(stats, layer)
    D, E = share.shape
    names = list(stats.domain_names)[:D] + [f"domain {i}" for i in range(len(stats.domain_names), D)]
    title = f"Domain specialisation, MoE layer {layer}"
    if D == 0:
        return empty_figure("No domain labels in the calibration data.", title)
    counts = to_numpy(ls.domain_counts)
    custom = np.stack([share, np.repeat(overall[None, :], D, axis=0), ratio, counts], axis=-1)
    hover = ("Domain %{y}<br>Expert %{x}<br>Share of domain's assignments: %{customdata[0]:.2f}%<br>"
             "Overall share: %{customdata[1]:.2f}%<br>Specialisation (share / overall): %{customdata[2]:.2f}×<br>"
             "Assignments: %{customdata[3]:,.0f}<extra></extra>")
    if mode == "ratio":
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.log2(ratio)
        z[~np.isfinite(z)] = np.nan
        lim = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
        lim = max(lim, 0.5)
        ticks = [t for t in (-3, -2, -1, 0, 1, 2, 3) if abs(t) <= lim + 1e-9]
        trace = go.Heatmap(
            z=z, x=list(range(E)), y=names, customdata=custom, colorscale="RdBu_r", zmid=0, zmin=-lim, zmax=lim,
            colorbar=dict(title="Specialisation<br>(share / overall)", tickvals=ticks,
                          ticktext=[f"{2.0 ** t:g}×" for t in ticks]),
            hovertemplate=hover, hoverongaps=False, name="specialisation",
        )
        title += " (share in domain ÷ overall share; 1× = none)"
    else:
        trace = go.Heatmap(
            z=share, x=list(range(E)), y=names, customdata=custom, colorscale="Viridis", zmin=0,
            colorbar=dict(title="Share of domain's<br>assignments (%)"), hovertemplate=hover, hoverongaps=False,
            name="share",
        )
        title += " (each expert's share of the domain's top-k assignments)"
    fig = go.Figure(trace)
    fig.update_layout(title=title, xaxis=dict(title="Expert (index)", dtick=1 if E <= 32 else None),
                      yaxis=dict(title="Domain (calibration label)"), template=_TEMPLATE)
    return fig


__all__ = [
    "coactivation_heatmap", "coactivation_matrix", "domain_specialization", "domain_specialization_matrix",
    "load_balance_comparison", "load_balance_cv_bars", "router_probability_histogram", "utilization_heatmap",
]
