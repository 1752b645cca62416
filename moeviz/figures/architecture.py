"""Graphviz DOT of one MoE layer, coloured live by a compression plan.

    input → router (routing rule; router sparsity / bits) → experts (one node each) → weighted sum → output
                 └──────────────→ shared experts (always active) ─────────────────────↗

The three pruning targets (① weights within experts, ② the router, ③ whole experts) are numbered on
the elements themselves (the experts box, the router) and listed in that order in a key left of the
layer, so no pointer crosses the drawing. Fonts are sized for a projector (the chart is scaled to the
page width). Expert fill goes light → dark with sparsity; N:M-structured experts have a thick purple
border and say "2:4"; removed experts are grey, dashed, "✗ removed". Bits read as `units.bits_label`
("4-bit", "unquantized (float32)").
Returns DOT source only (no Graphviz binary needed); display with ``st.graphviz_chart(dot)``.

Node names: ``input``, ``router``, ``e{i}`` (one per shown expert), ``more_experts`` (ellipsis, when
experts are elided), ``shared{i}``, ``sum``, ``output``, ``targets`` (the key), ``legend``.
"""

from __future__ import annotations

import textwrap

import graphviz

from moeviz.figures._common import interpolate_hex, text_color_on
from moeviz.figures.units import bits_label

LIGHT, DARK = "#eef4fb", "#08306b"  # sparsity 0 → 1
REMOVED_FILL, REMOVED_LINE = "#e0e0e0", "#9e9e9e"
SHARED_FILL = "#fff3c4"
NM_LINE = "#6a1b9a"  # border of an N:M-structured expert
MAX_SHOWN = 16  # beyond this: first HEAD, an ellipsis node, last TAIL
HEAD, TAIL = 12, 2
# (mark, target, what controls it), in the order the key lists them.
TARGETS = (("①", "weights within experts", "sparsity, N:M, quantization"),
           ("②", "the router", "router sparsity / bits"),
           ("③", "whole experts", "expert removal"))


def sparsity_color(sparsity: float) -> str:
    """Fill colour of an expert with this sparsity (0 → light, 1 → dark), `#rrggbb`."""
    return interpolate_hex(LIGHT, DARK, sparsity)


def expert_label(expert: int, sparsity: float = 0.0, bits: int = 16, removed: bool = False,
                 dtype: str | None = None, structure: str | None = None) -> str:
    """"e3 · 50%\\n4-bit", "e3 · 2:4 (50%)\\nunquantized (float32)", or "e3 ✗ removed" (two lines: one long
    line would widen the drawing, and the chart is scaled to the page width, so every text would shrink)."""
    if removed:
        return f"e{expert} ✗ removed"
    pruned = f"{structure} ({sparsity:.0%})" if structure and sparsity > 0 else f"{sparsity:.0%}"
    return f"e{expert} · {pruned}\\n{bits_label(bits, dtype)}"


def _shown(E: int) -> tuple[list[int], list[int]]:
    """(experts drawn, experts hidden behind the ellipsis)."""
    if E <= MAX_SHOWN:
        return list(range(E)), []
    return list(range(HEAD)) + list(range(E - TAIL, E)), list(range(HEAD, E - TAIL))


def moe_layer_dot(layer_info: dict, expert_states: list[dict] | None = None, plan: dict | None = None,
                  title: str | None = None, dtype: str | None = None) -> str:
    """DOT source of one MoE layer.

    layer_info: one entry of ``ModelInfo.layers`` (``MoELayer.to_dict()``): num_experts, top_k,
        routing_rule, hidden_size, intermediate_size, shared_expert_paths, index, path, family.
    expert_states: per-expert {layer, expert, sparsity, bits, removed} dicts — what the plan resolved to
        (`ResolvedPlan.experts(layer)`, the rows of `compression.table.expert_table`) or what an applied
        plan did (`CompressedModel.expert_table()`); other layers' entries are ignored, an expert without
        one is drawn dense. This figure never resolves a plan itself, so it cannot disagree with `apply`.
    plan: ``CompressionPlan.to_dict()``; gives the router's sparsity / bits and the N:M structure.
    dtype: the checkpoint's dtype, named on unquantized experts ("unquantized (float32)").
    """
    E = int(layer_info["num_experts"])
    k = int(layer_info.get("top_k", 0))
    li = int(layer_info.get("index", 0))
    per = {e: dict(expert=e, sparsity=0.0, bits=16, removed=False) for e in range(E)}
    for st in expert_states or []:
        if int(st.get("layer", li)) == li and 0 <= int(st["expert"]) < E:
            per[int(st["expert"])] = dict(expert=int(st["expert"]), sparsity=float(st.get("sparsity", 0.0)),
                                          bits=int(st.get("bits", 16)), removed=bool(st.get("removed", False)))
    shown, hidden = _shown(E)
    structure = str(((plan or {}).get("pruning") or {}).get("structure") or "unstructured")
    structure = None if structure == "unstructured" else structure

    g = graphviz.Digraph("moe_layer", graph_attr=dict(rankdir="LR", compound="true", fontname="Helvetica",
                                                      nodesep="0.15", ranksep="0.4", labelloc="t"))
    g.attr("node", fontname="Helvetica", fontsize="20", margin="0.15,0.08")
    g.attr("edge", fontname="Helvetica", fontsize="16", color="#555555")
    head = title or (f"MoE layer {li}" + (f" ({layer_info['path']})" if layer_info.get("path") else ""))
    fam = layer_info.get("family")
    g.attr(label=f"{head}: {E} experts, top-{k}" + (f", {fam}" if fam else ""), fontsize="20")

    hs = layer_info.get("hidden_size")
    g.node("input", f"input x\\n(hidden {hs})" if hs else "input x", shape="box", style="rounded")
    # The routing rule wrapped at ~22 characters: a long single line would widen the whole drawing (and the
    # chart is scaled to the page width, so every text would shrink).
    rule = textwrap.wrap(str(layer_info.get("routing_rule") or "top-k routing"), 22) or [""]
    rlabel = f"{TARGETS[1][0]} router\\n" + "\\n".join(rule)
    rs, rb = float((plan or {}).get("router_sparsity", 0.0)), int((plan or {}).get("router_bits", 16))
    router_fill = sparsity_color(rs)
    if rs or rb < 16:
        rlabel += f"\\nrouter weights: {rs:.0%} pruned · {rb}b"
    g.node("router", rlabel, shape="box", style="filled,bold", fillcolor=router_fill, fontcolor=text_color_on(router_fill))
    g.edge("input", "router")

    inter = layer_info.get("intermediate_size")
    with g.subgraph(name="cluster_experts") as c:
        c.attr(label=f"routed experts: {k} of {E} per token" + (f"\\n(intermediate {inter})" if inter else "") + "\\n"
                     f"{TARGETS[0][0]} weights in each expert\\n{TARGETS[2][0]} whole experts",
               style="rounded,dashed", color="#c9a227", penwidth="1.5", fontsize="15")
        for e in shown[:HEAD] + (["more"] if hidden else []) + shown[HEAD:]:
            if e == "more":
                n_removed = sum(per[h]["removed"] for h in hidden)
                extra = f"\\n({n_removed} removed)" if n_removed else ""
                c.node("more_experts", f"… e{hidden[0]}–e{hidden[-1]}\\n{len(hidden)} more experts{extra}",
                       shape="box", style="dotted")
                continue
            d = per[e]
            if d["removed"]:
                c.node(f"e{e}", expert_label(e, removed=True), shape="box", style="filled,dashed",
                       fillcolor=REMOVED_FILL, color=REMOVED_LINE, fontcolor="#616161")
            else:
                fill = sparsity_color(d["sparsity"])
                nm = structure if d["sparsity"] > 0 else None
                c.node(f"e{e}", expert_label(e, d["sparsity"], d["bits"], dtype=dtype, structure=nm), shape="box",
                       style="filled,rounded", fillcolor=fill, fontcolor=text_color_on(fill),
                       **(dict(color=NM_LINE, penwidth="4") if nm else {}))
    order = shown[:HEAD] + (["more"] if hidden else []) + shown[HEAD:]
    g.node("sum", "Σ\\ngᵢ·eᵢ(x)", shape="circle", fixedsize="false")
    for e in order:
        name = "more_experts" if e == "more" else f"e{e}"
        removed = e != "more" and per[e]["removed"]
        style = dict(style="dashed", color=REMOVED_LINE) if removed else {}
        g.edge("router", name, **style)
        if not removed:
            g.edge(name, "sum")

    shared = list(layer_info.get("shared_expert_paths") or [])
    if shared:
        with g.subgraph(name="cluster_shared") as c:
            c.attr(label="shared experts (always active, not routed)", style="rounded", color="#c9a227", fontsize="11")
            for i, p in enumerate(shared):
                c.node(f"shared{i}", f"shared expert {i}\\n{p.rsplit('.', 1)[-1]}", shape="box",
                       style="filled,rounded,bold", fillcolor=SHARED_FILL)
        for i in range(len(shared)):
            g.edge("input", f"shared{i}", label="always")
            g.edge(f"shared{i}", "sum")
    g.node("output", "output", shape="box", style="rounded")
    g.edge("sum", "output")

    # The three pruning targets as one key node (its lines keep their order in every Graphviz renderer), and
    # the legend as one table; both unlinked, stacked in the router's column (rank=same) above and below it:
    # a column of their own widened the drawing and so shrank every text when scaled to the page.
    key = "pruning targets\\n" + "".join(f"{mark} {what}\\l     ({how})\\l" for mark, what, how in TARGETS)
    g.node("targets", key, shape="note", style="filled", fillcolor="#fff8e1", color="#c9a227", fontsize="15")
    rows = []
    for s in (0.0, 0.5, 0.9):
        fill = sparsity_color(s)
        rows.append(f'<TR><TD BGCOLOR="{fill}"><FONT COLOR="{text_color_on(fill)}">{s:.0%} sparsity</FONT></TD></TR>')
    if structure:
        rows.append(f'<TR><TD COLOR="{NM_LINE}" BORDER="4">{structure} structured</TD></TR>')
    rows.append(f'<TR><TD BGCOLOR="{REMOVED_FILL}" STYLE="dashed"><FONT COLOR="#616161">✗ removed expert</FONT></TD></TR>')
    if shared:
        rows.append(f'<TR><TD BGCOLOR="{SHARED_FILL}">shared expert</TD></TR>')
    rows.append("<TR><TD BORDER=\"0\">label: e&lt;id&gt; · sparsity · bits</TD></TR>")
    g.node("legend", "<<TABLE BORDER=\"0\" CELLBORDER=\"1\" CELLSPACING=\"4\" CELLPADDING=\"4\">"
                     "<TR><TD BORDER=\"0\"><B>legend</B></TD></TR>" + "".join(rows) + "</TABLE>>",
           shape="plaintext", fontsize="14")
    with g.subgraph() as r:
        r.attr(rank="same")
        for name in ("targets", "router", "legend"):
            r.node(name)
    if hidden:
        g.node("note_elided", f"showing {len(shown)} of {E} experts:\\nfirst {HEAD}, last {TAIL}", shape="plaintext",
               fontsize="14", fontcolor="#666666")
    return g.source


__all__ = ["expert_label", "moe_layer_dot", "sparsity_color"]
