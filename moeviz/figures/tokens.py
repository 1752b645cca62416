"""Token explorer views: each token coloured by the expert its router chose first.

Input is the fields of `moeviz.explorer.TokenRouting` (tokens, top1, topk, weights, num_experts),
so ``token_routing_html(**{k: v for k, v in asdict(r).items() if k != "layer"})`` works.
"""

from __future__ import annotations

import html

import pandas as pd

from moeviz.figures._common import QUALITATIVE, color_for, text_color_on


def _check(tokens, top1, topk, weights) -> None:
    n = len(tokens)
    if not (len(top1) == len(topk) == len(weights) == n):
        raise ValueError(f"tokens, top1, topk and weights must have the same length "
                         f"({n}, {len(top1)}, {len(topk)}, {len(weights)})")


def _visible(token: str) -> str:
    """Token text with whitespace-only tokens made visible (spaces kept, newline shown as ↵)."""
    return token.replace("\n", "↵\n")


def token_routing_html(tokens: list[str], top1: list[int], topk: list[list[int]], weights: list[list[float]],
                       num_experts: int, palette: list[str] | None = None, show_legend: bool = True) -> str:
    """Safe HTML: every token a ``<span>`` whose background is its top-1 expert's colour (a qualitative
    palette of 12 colours, cycled when there are more experts), with a ``title`` tooltip listing the
    top-k experts and weights, preceded by a legend of expert colours. All token text is escaped."""
    _check(tokens, top1, topk, weights)
    palette = palette or QUALITATIVE
    spans = []
    for i, (tok, e1, ks, ws) in enumerate(zip(tokens, top1, topk, weights)):
        bg = color_for(e1, palette)
        tip = f"#{i} {tok!r}\n" + "\n".join(f"expert {int(k)}: {float(w):.3f}" for k, w in zip(ks, ws))
        spans.append(
            f'<span class="moeviz-token" data-expert="{int(e1)}" title="{html.escape(tip, quote=True)}" '
            f'style="background:{bg};color:{text_color_on(bg)};padding:1px 2px;margin:0 1px 2px 0;'
            f'border-radius:3px;white-space:pre-wrap;">{html.escape(_visible(tok), quote=True)}</span>'
        )
    parts = ['<div class="moeviz-token-routing" style="font-family:monospace;line-height:1.9;">']
    if show_legend:
        cycled = num_experts > len(palette)
        items = "".join(
            f'<span class="moeviz-legend-item" style="display:inline-block;margin-right:8px;">'
            f'<span style="display:inline-block;width:12px;height:12px;background:{color_for(e, palette)};'
            f'vertical-align:middle;border-radius:2px;"></span> e{e}</span>'
            for e in range(int(num_experts))
        )
        note = (f' <span style="color:#666;">(colours repeat every {len(palette)} experts)</span>' if cycled else "")
        parts.append(f'<div class="moeviz-legend" style="margin-bottom:6px;font-size:0.85em;">'
                     f'<b>Top-1 expert:</b> {items}{note}</div>')
    parts.append('<div class="moeviz-tokens">' + "".join(spans) + "</div></div>")
    return "".join(parts)


def token_routing_table(tokens: list[str], top1: list[int], topk: list[list[int]], weights: list[list[float]],
                        num_experts: int | None = None) -> pd.DataFrame:
    """One row per token: position, token, top1_expert, top1_weight, experts (the top-k, highest weight
    first, as "3, 1"), weights ("0.62, 0.21") and expert_1/weight_1 … expert_k/weight_k columns."""
    _check(tokens, top1, topk, weights)
    k = max((len(ks) for ks in topk), default=0)
    rows = []
    for i, (tok, e1, ks, ws) in enumerate(zip(tokens, top1, topk, weights)):
        row = dict(position=i, token=tok, top1_expert=int(e1),
                   top1_weight=float(ws[list(ks).index(e1)]) if e1 in list(ks) else float("nan"),
                   experts=", ".join(str(int(x)) for x in ks), weights=", ".join(f"{float(w):.3f}" for w in ws))
        for j in range(k):
            row[f"expert_{j + 1}"] = int(ks[j]) if j < len(ks) else None
            row[f"weight_{j + 1}"] = float(ws[j]) if j < len(ws) else None
        rows.append(row)
    cols = ["position", "token", "top1_expert", "top1_weight", "experts", "weights"]
    cols += [c for j in range(k) for c in (f"expert_{j + 1}", f"weight_{j + 1}")]
    return pd.DataFrame(rows, columns=cols)


__all__ = ["token_routing_html", "token_routing_table"]
