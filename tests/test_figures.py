"""moeviz.figures: figures carry the data passed in, axis titles with units, and never crash on empty input."""

from __future__ import annotations

import json
import math
import re

import graphviz
import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from moeviz.calibration.stats import CalibrationStats, LayerStats
from moeviz.figures import (
    coactivation_heatmap, cv_vs_ratio, domain_specialization, drift_per_layer, load_balance_comparison,
    load_balance_cv_bars, moe_layer_dot, pareto_chart, perplexity_vs_ratio, router_probability_histogram,
    token_routing_html, token_routing_table, tradeoff_chart, utilization_heatmap,
)


# ------------------------------------------------------------------------------------------ data
def _layer(i, routed, top1, gate_sum, coact, domain, hist):
    E = len(routed)
    z = lambda *s: torch.zeros(*s)  # noqa: E731
    return LayerStats(
        layer=2 * i + 1, path=f"model.layers.{2 * i + 1}.mlp", num_experts=E, top_k=2,
        routed_counts=torch.tensor(routed, dtype=torch.float64), top1_counts=torch.tensor(top1, dtype=torch.float64),
        prob_sum=z(E), gate_sum=torch.tensor(gate_sum, dtype=torch.float64), gate_output_norm=z(E),
        input_sq=z(E, 3), input_sq_weighted=z(E, 3), down_sq=z(E, 5), down_sq_weighted=z(E, 5),
        coactivation=torch.tensor(coact, dtype=torch.float64), domain_counts=torch.tensor(domain, dtype=torch.float64),
        prob_hist=torch.tensor(hist, dtype=torch.float64), record_topk=torch.zeros(0, 2, dtype=torch.long),
        record_probs=z(0, E),
    )


@pytest.fixture
def stats():
    l0 = _layer(0, routed=[10, 20, 30, 40], top1=[5, 10, 15, 20], gate_sum=[5, 8, 9, 20],
                coact=[[10, 4, 3, 3], [4, 20, 6, 10], [3, 6, 30, 21], [3, 10, 21, 40]],
                domain=[[8, 12, 10, 10], [2, 8, 20, 30]],
                hist=[[40, 5, 3, 2, 0], [30, 10, 5, 4, 1], [20, 15, 10, 4, 1], [10, 10, 10, 10, 10]])
    l1 = _layer(1, routed=[25, 25, 25, 25], top1=[10, 20, 10, 10], gate_sum=[10, 10, 10, 10],
                coact=[[25, 10, 10, 5], [10, 25, 5, 10], [10, 5, 25, 10], [5, 10, 10, 25]],
                domain=[[10, 15, 10, 5], [15, 10, 15, 20]],
                hist=[[25, 10, 10, 5, 0]] * 4)
    return CalibrationStats("m", "d", {}, 50, ["code", "prose"], [25, 25], 5, 0.1, layers=[l0, l1])


def _titles(fig):
    return fig.layout.xaxis.title.text, fig.layout.yaxis.title.text


def _has_unit(title: str) -> bool:
    return bool(re.search(r"\((?:[^)]*)\)", title or ""))


def _sweep_frame():
    """Two methods, three runs each, plus hand-checked Pareto front on (ratio ↑, accuracy ↑)."""
    rows = [
        # run_id, method, ratio, acc, ppl, lat, cv
        (1, "wanda", 1.5, 0.40, 12.0, 2.0, 0.30),
        (2, "wanda", 2.0, 0.35, 14.0, 1.6, 0.35),
        (3, "wanda", 3.0, 0.20, 30.0, 1.2, 0.50),
        (4, "magnitude", 1.5, 0.38, 13.0, 2.0, 0.31),  # dominated by 1
        (5, "magnitude", 2.0, 0.36, 13.5, 1.6, 0.33),  # front
        (6, "magnitude", 2.5, 0.10, 60.0, 1.4, 0.60),  # dominated by 3
    ]
    df = pd.DataFrame(rows, columns=["run_id", "method", "compression_ratio", "accuracy", "perplexity",
                                     "projected_decode_ms", "mean_cv"])
    df["name"] = [f"{m} r{r}" for r, m in zip(df.run_id, df.method)]
    df["base_accuracy"], df["base_perplexity"] = 0.42, 11.0
    df["base_projected_decode_ms"], df["base_mean_cv"] = 3.0, 0.28
    return df


# ------------------------------------------------------------------------------------------ routing
def test_utilization_heatmap_values_hover_and_axes(stats):
    fig = utilization_heatmap(stats)
    assert isinstance(fig, go.Figure) and len(fig.data) == 1
    hm = fig.data[0]
    expected = np.array([[10, 20, 30, 40], [25, 25, 25, 25]]) / 100 * 100  # counts / 100 tokens·k, in %
    np.testing.assert_allclose(np.array(hm.z, dtype=float), expected)
    cd = np.array(hm.customdata, dtype=float)
    np.testing.assert_allclose(cd[0, :, 0], [10, 20, 30, 40])  # token counts
    np.testing.assert_allclose(cd[0, :, 1], [0.5, 0.4, 0.3, 0.5])  # mean gate = gate_sum / routed
    assert "%" in hm.colorbar.title.text and "Mean gate" in hm.hovertemplate
    x, y = _titles(fig)
    assert "Expert" in x and "layer" in y.lower() and _has_unit(x) and _has_unit(y)


def test_router_probability_histogram(stats):
    fig = router_probability_histogram(stats, 0, experts=[1, 3], log_y=True)
    assert [t.name for t in fig.data] == ["expert 1", "expert 3"]
    np.testing.assert_allclose(fig.data[0].y, [30, 10, 5, 4, 1])
    np.testing.assert_allclose(fig.data[0].x, [0.1, 0.3, 0.5, 0.7, 0.9])
    assert fig.layout.yaxis.type == "log" and fig.data[0].hovertemplate
    assert fig.layout.yaxis.dtick == 1  # powers of ten only: round ticks
    x, y = _titles(fig)
    assert "probability" in x.lower() and "count" in y
    assert len(router_probability_histogram(stats, 1).data) == 4
    with pytest.raises(IndexError):
        router_probability_histogram(stats, 0, experts=[7])


def test_load_balance_bars_match_stats(stats):
    fig = load_balance_cv_bars(stats)
    assert len(fig.data) == 2 and fig.layout.barmode == "group"
    c = np.array([10, 20, 30, 40.0])
    np.testing.assert_allclose(fig.data[0].y[0], c.std() / c.mean())
    np.testing.assert_allclose(fig.data[0].y[1], 0.0)
    t1 = np.array([10, 20, 10, 10.0])
    np.testing.assert_allclose(fig.data[1].y[1], t1.std() / t1.mean())
    assert "CV" in fig.layout.yaxis.title.text and _has_unit(fig.layout.yaxis.title.text)


def test_load_balance_comparison_accepts_result_shapes():
    lb = [dict(layer=0, base_cv_topk=0.2, cv_topk=0.5, base_cv_top1=0.3, cv_top1=0.6),
          dict(layer=1, base_cv_topk=0.1, cv_topk=0.15, base_cv_top1=0.2, cv_top1=0.25)]
    for result in (dict(load_balance=lb), dict(details=dict(load_balance=lb)), lb):
        fig = load_balance_comparison(result)
        assert [t.name for t in fig.data] == ["base model", "compressed"]
        assert list(fig.data[0].y) == [0.2, 0.1] and list(fig.data[1].y) == [0.5, 0.15]
    assert list(load_balance_comparison(lb, counts="top1").data[1].y) == [0.6, 0.25]
    assert len(load_balance_comparison({}).data) == 0  # empty: annotation, no error


def test_coactivation_heatmap_masks_diagonal_and_normalizes(stats):
    fig = coactivation_heatmap(stats, 0, normalize=True)
    z = np.array(fig.data[0].z, dtype=float)
    assert np.isnan(np.diag(z)).all()
    assert z[1, 3] == pytest.approx(100 * 10 / 20) and z[3, 1] == pytest.approx(100 * 10 / 40)
    cd = np.array(fig.data[0].customdata, dtype=float)
    assert cd[2, 3, 0] == 21 and cd[2, 3, 1] == 30
    raw = np.array(coactivation_heatmap(stats, 0, normalize=False).data[0].z, dtype=float)
    assert raw[2, 3] == 21 and np.isnan(raw[0, 0])
    assert "both" in fig.data[0].hovertemplate and _has_unit(fig.layout.xaxis.title.text)


def test_domain_specialization_share_and_ratio(stats):
    share_fig = domain_specialization(stats, 0, mode="share")
    z = np.array(share_fig.data[0].z, dtype=float)
    np.testing.assert_allclose(z[0], [20, 30, 25, 25])  # code: 8,12,10,10 of 40
    np.testing.assert_allclose(z[1], [100 * 2 / 60, 100 * 8 / 60, 100 * 20 / 60, 100 * 30 / 60])
    assert list(share_fig.data[0].y) == ["code", "prose"]
    ratio_fig = domain_specialization(stats, 0)  # log2 of share / overall share
    overall = np.array([10, 20, 30, 40]) / 100
    ratio = (np.array([8, 12, 10, 10]) / 40) / overall
    np.testing.assert_allclose(np.array(ratio_fig.data[0].z, dtype=float)[0], np.log2(ratio))
    np.testing.assert_allclose(np.array(ratio_fig.data[0].customdata, dtype=float)[0, :, 2], ratio)
    assert "Domain" in ratio_fig.layout.yaxis.title.text


# ------------------------------------------------------------------------------------------ tokens
def test_token_html_escapes_and_colours():
    tokens = ["<script>alert(1)</script>", ' "q"', " & co"]
    html = token_routing_html(tokens, [0, 9, 0], [[0, 1], [9, 0], [0, 2]], [[0.7, 0.3], [0.6, 0.4], [0.9, 0.1]], 10)
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert '"q"' not in html and "&amp; co" in html
    spans = re.findall(r'<span class="moeviz-token" data-expert="(\d+)" title="([^"]*)" style="background:(#[0-9a-f]{6})', html)
    assert [s[0] for s in spans] == ["0", "9", "0"]
    assert spans[0][2] == spans[2][2] != spans[1][2]  # same top-1 -> same colour
    assert "expert 9: 0.600" in spans[1][1] and "expert 0: 0.400" in spans[1][1]
    assert html.count('class="moeviz-legend-item"') == 10
    many = token_routing_html(["a"], [13], [[13]], [[1.0]], 14)  # palette cycles beyond 12 colours
    assert "repeat" in many
    with pytest.raises(ValueError):
        token_routing_html(["a", "b"], [0], [[0]], [[1.0]], 2)


def test_token_table():
    df = token_routing_table(["a", "b"], [2, 1], [[2, 0], [1, 3]], [[0.8, 0.2], [0.55, 0.45]])
    assert list(df.token) == ["a", "b"] and list(df.top1_expert) == [2, 1]
    assert list(df.top1_weight) == [0.8, 0.55] and list(df.expert_2) == [0, 3] and df.experts[1] == "1, 3"


# ------------------------------------------------------------------------------------------ architecture
def _labels(dot: str) -> dict[str, str]:
    return dict(re.findall(r'^\s*(\w+) \[label="([^"]*)"', dot, flags=re.M))


def _assert_valid_dot(dot: str):
    graphviz.Source(dot)  # construction (no binary needed)
    assert dot.lstrip().startswith("digraph") and dot.count("{") == dot.count("}")
    for line in dot.splitlines():  # every quoted string closed on its line
        assert len(re.findall(r'(?<!\\)"', line)) % 2 == 0, line


def test_moe_layer_dot_plan_colouring_and_removed():
    info = dict(index=1, num_experts=8, top_k=2, routing_rule="softmax → top-k → renormalise",
                hidden_size=64, intermediate_size=32, shared_expert_paths=["model.layers.1.mlp.shared_expert"])
    plan = dict(router_sparsity=0.2, router_bits=8)
    # layer 1 resolved: 50 % / 4 bits, expert 2 overridden to 25 % / 8 bits, expert 5 removed
    resolved = [dict(layer=1, expert=e, sparsity=0.25 if e == 2 else 0.0 if e == 5 else 0.5,
                     bits=8 if e == 2 else 4, removed=e == 5) for e in range(8)]
    others = [dict(layer=0, expert=e, sparsity=0.9, bits=4, removed=e == 3) for e in range(8)]
    dot = moe_layer_dot(info, expert_states=others + resolved, plan=plan)
    _assert_valid_dot(dot)
    labels = _labels(dot)
    experts = {k: v for k, v in labels.items() if re.fullmatch(r"e\d+", k)}
    assert len(experts) == 8
    assert labels["e0"] == "e0 · 50%\\n4-bit" and labels["e2"] == "e2 · 25%\\n8-bit" and labels["e3"] == "e3 · 50%\\n4-bit"
    assert "removed" in labels["e5"] and "✗" in labels["e5"]
    e5 = re.search(r"^\s*e5 \[.*$", dot, flags=re.M).group(0)
    assert "dashed" in e5 and "#e0e0e0" in e5
    e0 = re.search(r"^\s*e0 \[.*$", dot, flags=re.M).group(0)
    e2 = re.search(r"^\s*e2 \[.*$", dot, flags=re.M).group(0)
    assert re.search(r'fillcolor="([^"]+)"', e0).group(1) != re.search(r'fillcolor="([^"]+)"', e2).group(1)
    assert "20% pruned · 8b" in labels["router"] and "softmax" in labels["router"]
    assert "shared0" in labels and "<B>legend</B>" in dot and "e5 -> sum" not in dot
    assert all(t in dot for t in ("weights within experts", "the router", "whole experts"))
    # an applied plan's ExpertState dicts draw the same way; other layers' states are ignored, an expert
    # without a state is drawn dense (the figure never resolves a plan itself)
    states = [dict(layer=1, expert=0, sparsity=0.75, bits=3, removed=False, zero_fraction=0.7),
              dict(layer=0, expert=1, sparsity=0.1, bits=2, removed=True, zero_fraction=0)]
    labels2 = _labels(moe_layer_dot(info, expert_states=states, plan=plan))
    assert labels2["e0"] == "e0 · 75%\\n3-bit" and labels2["e1"] == "e1 · 0%\\nunquantized"


def test_moe_layer_dot_elides_many_experts():
    dot = moe_layer_dot(dict(index=0, num_experts=64, top_k=8, routing_rule="sigmoid"),
                        expert_states=[dict(layer=0, expert=20, sparsity=0.0, bits=16, removed=True)])
    _assert_valid_dot(dot)
    experts = sorted(int(k[1:]) for k in _labels(dot) if re.fullmatch(r"e\d+", k))
    assert experts == list(range(12)) + [62, 63]
    assert "more_experts" in dot and "50 more experts" in dot and "(1 removed)" in dot
    assert "showing 14 of 64" in dot


# ------------------------------------------------------------------------------------------ trade-offs
def test_tradeoff_chart_two_axes_methods_and_base():
    df = _sweep_frame()
    fig = tradeoff_chart(df)
    names = [t.name for t in fig.data]
    assert names == ["wanda · accuracy", "wanda · latency", "magnitude · accuracy", "magnitude · latency",
                     "base model", "base model · latency"]
    wa = fig.data[0]
    assert list(wa.x) == [1.5, 2.0, 3.0] and np.allclose(wa.y, [40, 35, 20])
    assert [c[0] for c in wa.customdata] == [1, 2, 3]
    assert fig.data[1].yaxis == "y2" and list(fig.data[1].y) == [2.0, 1.6, 1.2]
    assert fig.data[4].x == (1.0,) and fig.data[4].y == (42.0,)
    assert "projected" in fig.layout.yaxis2.title.text and "ms/token" in fig.layout.yaxis2.title.text
    assert "%" in fig.layout.yaxis.title.text and "×" in fig.layout.xaxis.title.text
    df["measured_decode_ms"] = [5.0] * 6
    assert "measured" in tradeoff_chart(df, latency_col="measured_decode_ms").layout.yaxis2.title.text
    assert "measured" in tradeoff_chart(df, latency_col="lat", latency_kind="measured").layout.yaxis2.title.text
    with pytest.raises(ValueError):
        tradeoff_chart(df, latency_col="lat")


def test_tradeoff_chart_keeps_accuracy_above_latency_so_no_marker_hides_another():
    """On two overlaid axes the accuracy markers take the upper band and the latency markers (error bars
    included) the lower one: every point within its axis, no height shared by the two sets."""
    df = _sweep_frame()
    df["q1"], df["q3"] = df["projected_decode_ms"] - 0.1, df["projected_decode_ms"] + 1.5  # above the base star
    for fig in (tradeoff_chart(df), tradeoff_chart(df, latency_spread=("q1", "q3")),
                tradeoff_chart(df.iloc[[0]]),  # one run
                tradeoff_chart(df.iloc[[0]].assign(base_accuracy=0.40, base_projected_decode_ms=2.0))):  # one value each
        acc_r, lat_r = fig.layout.yaxis.range, fig.layout.yaxis2.range
        assert acc_r is not None and lat_r is not None

        def height(ys, r):  # [0, 1] = bottom .. top of the plot
            return [(y - r[0]) / (r[1] - r[0]) for y in ys]
        acc = [h for t in fig.data if t.yaxis in (None, "y") for h in height(t.y, acc_r)]
        lat = [h for t in fig.data if t.yaxis == "y2" for h in height(t.y, lat_r)]
        assert acc and lat and all(0 < h < 1 for h in acc + lat)
        assert min(acc) > max(lat) + 0.05  # base stars included: the two never share a height
    with_bars = tradeoff_chart(df, latency_spread=("q1", "q3"))
    top = max(height([y + 1.5 for y in with_bars.data[1].y], with_bars.layout.yaxis2.range))
    assert top < 0.5  # the error bars stay inside the latency band


def test_store_frame_methods_from_plan_json_and_recovery_arrows():
    df = _sweep_frame().drop(columns=["method"]).rename(columns={"run_id": "id"})
    df["plan_json"] = [json.dumps(dict(pruning=dict(metric=m))) for m in ["wanda"] * 3 + ["magnitude"] * 3]
    df["parent_run_id"] = [None, None, None, None, None, 3]  # run 6 recovers run 3
    fig = tradeoff_chart(df)
    assert fig.data[2].name == "magnitude · accuracy"
    arrows = [a for a in fig.layout.annotations if a.showarrow]
    assert len(arrows) == 1
    a = arrows[0]
    assert (a.ax, a.ay, a.x, a.y) == pytest.approx((3.0, 20.0, 2.5, 10.0))
    assert len([a for a in pareto_chart(df).layout.annotations if a.showarrow]) == 1
    assert not [a for a in tradeoff_chart(df, show_recovery=False).layout.annotations if a.showarrow]
    # The recovery run is its own series, not joined into its parent method's line.
    from moeviz.figures.tradeoffs import methods

    assert methods(df) == ["wanda"] * 3 + ["magnitude"] * 2 + ["magnitude + KD recovery"]


def test_pareto_chart_front_is_exact():
    df = _sweep_frame()
    fig = pareto_chart(df)
    all_runs, front = fig.data[0], fig.data[1]
    assert all_runs.name == "all runs" and front.name == "Pareto front"
    assert sorted(c[0] for c in all_runs.customdata) == [1, 2, 3, 4, 5, 6]
    # hand-checked: 1 (1.5, .40), 5 (2.0, .36), 3 (3.0, .20); 2 is dominated by 5, 4 by 1, 6 by 3
    assert [c[0] for c in front.customdata] == [1, 5, 3]
    assert list(front.x) == [1.5, 2.0, 3.0] and np.allclose(front.y, [40, 36, 20])
    assert "lines" in front.mode
    # perplexity is minimised by default: front over (ratio ↑, perplexity ↓) = 1 (1.5, 12), 5 (2, 13.5), 3 (3, 30)
    ppl = pareto_chart(df, y="perplexity")
    assert [c[0] for c in ppl.data[1].customdata] == [1, 5, 3]
    assert "lower is better" in ppl.layout.yaxis.title.text


def test_perplexity_and_cv_lines():
    df = _sweep_frame().sample(frac=1.0, random_state=0)  # unsorted input
    fig = perplexity_vs_ratio(df, log_y=True)
    mag = [t for t in fig.data if t.name == "magnitude"][0]
    assert list(mag.x) == [1.5, 2.0, 2.5] and list(mag.y) == [13.0, 13.5, 60.0]
    assert fig.layout.yaxis.type == "log" and "Perplexity" in fig.layout.yaxis.title.text
    assert any(s.y0 == 11.0 for s in fig.layout.shapes)  # base reference line
    cv = cv_vs_ratio(df)
    assert len([t for t in cv.data if t.name in ("wanda", "magnitude")]) == 2
    assert any(s.y0 == 0.28 and s.line.dash == "dash" for s in cv.layout.shapes)
    assert "CV" in cv.layout.yaxis.title.text and _has_unit(cv.layout.xaxis.title.text)


def test_drift_per_layer():
    drift = [dict(layer=0, topk_overlap=0.9, top1_change_rate=0.1, kl=0.02),
             dict(layer=1, topk_overlap=0.7, top1_change_rate=0.3, kl=0.2)]
    for result in (dict(drift=drift), dict(details=dict(drift=drift)), drift):
        fig = drift_per_layer(result)
        assert [t.name for t in fig.data][:2] == ["top-k overlap", "top-1 change rate"]
        assert list(fig.data[0].y) == [0.9, 0.7] and list(fig.data[2].y) == [0.02, 0.2] and fig.data[2].yaxis == "y2"
        assert "nats" in fig.layout.yaxis2.title.text and "0–1" in fig.layout.yaxis.title.text


@pytest.mark.parametrize("make", [
    lambda df: tradeoff_chart(df), lambda df: perplexity_vs_ratio(df), lambda df: cv_vs_ratio(df),
    lambda df: pareto_chart(df), lambda df: drift_per_layer({}),
])
@pytest.mark.parametrize("df", [pd.DataFrame(), None, pd.DataFrame(columns=["id", "name", "accuracy"])])
def test_empty_inputs_give_annotated_figure(make, df):
    fig = make(df)
    assert isinstance(fig, go.Figure) and len(fig.data) == 0 and len(fig.layout.annotations) == 1


def test_eval_result_and_tiny_model_smoke(loaded_tiny):
    """End to end on a tiny model: real calibration stats and layer info go through every builder."""
    from moeviz.calibration.collect import calibrate
    from moeviz.data import Document, tokenize_documents

    loaded = loaded_tiny("qwen2_moe")  # has a shared expert
    docs = [Document("The quick brown fox jumps over the lazy dog. " * 12, "prose"),
            Document("def add(a, b):\n    return a + b\n" * 12, "code")]
    samples = tokenize_documents(docs, loaded.tokenizer, 4, 16, seed=0, source="test docs")
    st = calibrate(loaded, samples, batch_size=4)
    u = np.array(utilization_heatmap(st).data[0].z, dtype=float)
    np.testing.assert_allclose(u, 100 * st.utilization_matrix().double().numpy(), rtol=1e-6)
    E = st.layers[0].num_experts
    assert len(router_probability_histogram(st, 0).data) == E
    for fig in (load_balance_cv_bars(st), coactivation_heatmap(st, 0), domain_specialization(st, 0),
                domain_specialization(st, 0, mode="share")):
        assert len(fig.data) >= 1
    info = loaded.info.layers[0]
    dot = moe_layer_dot(info)
    _assert_valid_dot(dot)
    assert len([k for k in _labels(dot) if re.fullmatch(r"e\d+", k)]) == min(E, 14)
    assert ("shared0" in dot) == bool(info.get("shared_expert_paths"))


def test_real_sweep_store_and_result_frames(loaded_tiny, tmp_path):
    """The frames `run_sweep` and `RunStore.runs()` produce, and a real EvalResult, feed every builder."""
    from moeviz.calibration.collect import calibrate
    from moeviz.compression import CompressionPlan, PruningSettings
    from moeviz.compression.apply import Compressor
    from moeviz.data import Document, tokenize_documents
    from moeviz.evaluation import EvalSettings, Evaluator, run_sweep
    from moeviz.evaluation.pareto import pareto_front
    from moeviz.store import RunStore

    lm = loaded_tiny("mixtral")
    docs = [Document("The quick brown fox jumps over the lazy dog. " * 20, "prose"),
            Document("def add(a, b):\n    return a + b\n" * 20, "code")]
    cal = tokenize_documents(docs, lm.tokenizer, 4, 16, seed=0)
    held = tokenize_documents(docs, lm.tokenizer, 4, 16, seed=5)
    comp = Compressor(lm, calibrate(lm, cal, batch_size=4))
    ev = Evaluator(lm, held, EvalSettings(batch_size=4, record_tokens=64, measure_latency=False))
    plans = [CompressionPlan(pruning=PruningSettings(metric=m, sparsity=s)) for m in ("magnitude", "wanda")
             for s in (0.25, 0.5)]
    plans.append(CompressionPlan(removed_experts=[(0, 1)]))
    store = RunStore(tmp_path / "runs.sqlite")
    df = run_sweep(comp, ev, plans, store=store)
    runs = store.runs()
    for frame in (df, runs):
        fig = tradeoff_chart(frame)
        acc_points = sum(len(t.x) for t in fig.data if t.name.endswith("· accuracy"))
        assert acc_points == len(plans) and "projected" in fig.layout.yaxis2.title.text
        pf = pareto_chart(frame)
        expected = pareto_front(frame, "compression_ratio", "accuracy")
        id_col = "run_id" if "run_id" in frame.columns else "id"
        assert sorted(c[0] for c in pf.data[1].customdata) == sorted(int(i) for i in expected[id_col])
        assert len(perplexity_vs_ratio(frame).data) >= 2 and len(cv_vs_ratio(frame).data) >= 2
    compressed = comp.apply(plans[-1])
    result = ev.evaluate(compressed)
    details = store.get_run(int(df.run_id.iloc[-1])).metrics
    for r in (result, result.to_dict(), details):
        assert len(drift_per_layer(r).data) == 3
        assert len(load_balance_comparison(r).data[0].x) == len(lm.layers)
    dot = moe_layer_dot(lm.info.layers[0], expert_states=compressed.expert_table(), plan=plans[-1].to_dict())
    _assert_valid_dot(dot)
    assert "removed" in _labels(dot)["e1"]


def test_recovery_losses_one_panel_per_term():
    from moeviz.figures import recovery_losses

    history = [dict(step=i, ce=3.0 - i * 0.1, expert_mse=1.0 / i, router_kl=0.1 / i, loss=0.0) for i in range(1, 6)]
    fig = recovery_losses(history, lambda_expert=2.5, lambda_router=30.0)
    assert len(fig.data) == 3
    assert [list(t.y) for t in fig.data] == [[r[k] for r in history] for k in ("ce", "expert_mse", "router_kl")]
    assert list(fig.data[0].x) == [1, 2, 3, 4, 5]
    titles = [a.text for a in fig.layout.annotations]
    assert "λ = 2.5" in titles[1] and "λ = 30" in titles[2]
    assert recovery_losses([]).layout.annotations[0].text == "No recovery steps yet."


def test_tradeoff_chart_shows_microseconds_for_tiny_latencies():
    df = _sweep_frame()
    assert "(ms/token)" in tradeoff_chart(df).layout.yaxis2.title.text  # 1.2–3 ms: kept in ms
    df["projected_decode_ms"] /= 1000  # 1.2–3 µs, like the demo model on an H100
    df["base_projected_decode_ms"] /= 1000
    fig = tradeoff_chart(df)
    assert "(µs/token)" in fig.layout.yaxis2.title.text
    latency = [t for t in fig.data if t.name == "wanda · latency"][0]
    assert list(latency.y) == pytest.approx([2.0, 1.6, 1.2])  # sorted by ratio, shown in µs
    base = [t for t in fig.data if t.name == "base model · latency"][0]
    assert list(base.y) == pytest.approx([3.0]) and "µs/token" in base.hovertemplate


def test_lines_join_only_runs_that_differ_in_the_swept_value():
    import json

    from moeviz.compression.plan import CompressionPlan, PruningSettings, QuantSettings
    from moeviz.figures.tradeoffs import series_keys

    def plan(sparsity, bits=16, removed=(), name=""):
        return CompressionPlan(pruning=PruningSettings(metric="wanda", sparsity=sparsity), quant=QuantSettings(bits=bits),
                               removed_experts=list(removed), name=name).to_json(indent=None)

    plans = [plan(0.3), plan(0.5, name="renamed"), plan(0.7), plan(0.5, bits=4), plan(0.5, removed=[(0, 1)]), plan(0.3)]
    df = _sweep_frame().assign(method="wanda", plan_json=plans)
    df["parent_run_id"] = [None, None, None, None, None, 1]  # the last one: a recovery of run 1
    keys = series_keys(df)
    assert keys[0] == keys[1] == keys[2] and len(set(keys)) == 4
    fig = perplexity_vs_ratio(df, log_y=True)
    runs = [t for t in fig.data if t.name and t.name.startswith("wanda")]
    assert sorted(len(t.x) for t in runs) == [1, 1, 1, 3]
    assert all(("lines" in t.mode) == (len(t.x) > 1) for t in runs)  # a single run is a point, never a line
    assert sum(bool(t.showlegend is not False) for t in runs if t.name == "wanda") == 1  # one legend entry per method
    assert fig.layout.yaxis.type == "log"
    fig = tradeoff_chart(df)
    acc = [t for t in fig.data if t.name == "wanda · accuracy"]
    assert sorted(len(t.x) for t in acc) == [1, 1, 3]  # the recovery run is its own group, "wanda + KD recovery"
    assert json.loads(df["plan_json"][0])["name"] == ""


def test_a_sweep_over_budgets_is_one_curve():
    """Optimised plans (per-expert overrides chosen for each budget) stored as one sweep form one line;
    the same plans outside a sweep differ in more than the swept value, so each is a point."""
    from moeviz.compression.plan import CompressionPlan, Override, PruningSettings
    from moeviz.figures.tradeoffs import series_keys

    def optimised(overrides, removed=()):
        return CompressionPlan(pruning=PruningSettings(metric="moe_pruner", sparsity=0.0),
                               overrides=[Override(layer=0, expert=e, sparsity=s) for e, s in overrides],
                               removed_experts=list(removed), name="optimised").to_json(indent=None)

    plans = [optimised([(0, 0.3), (1, 0.5)]), optimised([(0, 0.6), (1, 0.7)]), optimised([(0, 0.9)], [(0, 1)]),
             optimised([(0, 0.3), (1, 0.5)])]
    df = _sweep_frame().iloc[:4].assign(method="moe_pruner", plan_json=plans)
    df["sweep_id"] = ["sweep-a", "sweep-a", "sweep-a", None]
    keys = series_keys(df)
    assert keys[0] == keys[1] == keys[2] != keys[3]
    df["sweep_id"] = [None, None, None, None]  # not a sweep: hand-made plans that differ in their overrides
    keys = series_keys(df)
    assert keys[0] == keys[3] and len({keys[0], keys[1], keys[2]}) == 3
    df["sweep_id"] = ["sweep-a", "sweep-a", "sweep-b", "sweep-b"]  # two sweeps are two curves
    keys = series_keys(df)
    assert keys[0] == keys[1] and keys[2] == keys[3] and keys[0] != keys[2]


def test_log_perplexity_keeps_its_range_and_readable_wraps_titles_and_moves_legends():
    from moeviz.figures._common import readable

    fig = perplexity_vs_ratio(_sweep_frame(), log_y=True)
    base = [a for a in fig.layout.annotations if "base model" in (a.text or "")]
    assert base and abs(base[0].y - np.log10(11.0)) < 1e-9  # log10 coordinates: not 10^11 on the axis
    fig = perplexity_vs_ratio(_sweep_frame(), log_y=False)
    assert [a.y for a in fig.layout.annotations if "base model" in (a.text or "")] == [11.0]
    fig = readable(drift_per_layer({"drift": [dict(layer=0, topk_overlap=0.9, top1_change_rate=0.1, kl=0.01)]}))
    assert "<br>" in fig.layout.title.text and fig.layout.legend.orientation == "h"
    assert all(len(line) <= 50 for line in fig.layout.yaxis.title.text.split("<br>"))


def test_the_optimised_curve_has_its_own_colour_and_legend_entry():
    from moeviz.compression.plan import CompressionPlan, Override, PruningSettings

    def plan(s, overrides=()):
        return CompressionPlan(pruning=PruningSettings(metric="moe_pruner", sparsity=s),
                               overrides=[Override(layer=0, expert=e, sparsity=v) for e, v in overrides]).to_json(indent=None)

    df = _sweep_frame().iloc[:5].assign(method="moe_pruner")
    df["plan_json"] = [plan(0.3), plan(0.5), plan(0.0, [(0, 0.3)]), plan(0.0, [(0, 0.6)]), plan(0.0, [(0, 0.9)])]
    df["sweep_id"] = ["s-grid", "s-grid", "s-opt", "s-opt", "s-opt"]
    for fig, suffix in ((tradeoff_chart(df), " · accuracy"), (perplexity_vs_ratio(df), "")):
        plain = next(t for t in fig.data if t.name == "moe_pruner" + suffix)
        opt = next(t for t in fig.data if t.name == "moe_pruner · optimised" + suffix)
        assert len(plain.x) == 2 and len(opt.x) == 3
        assert plain.line.color != opt.line.color and opt.showlegend


def _latency_frame(lo, hi):
    df = _sweep_frame().iloc[:3].copy()
    df["measured_decode_ms"] = [2.0, 1.8, 1.6]
    df["measured_lo"], df["measured_hi"] = lo, hi
    df["base_measured_decode_ms"], df["base_measured_lo"], df["base_measured_hi"] = 2.1, 1.9, 2.3
    df["latency_busy"] = [0.0, 1.0, 0.0]
    return df


def test_overlapping_latency_spreads_are_points_with_a_note_not_a_trend():
    # Quartiles that all share 1.7–1.9: no ordering can be read from these medians.
    fig = tradeoff_chart(_latency_frame([1.5, 1.6, 1.4], [2.4, 2.0, 1.9]), latency_col="measured_decode_ms",
                         latency_spread=("measured_lo", "measured_hi"))
    lat = next(t for t in fig.data if t.name == "wanda · latency")
    assert lat.mode == "markers" and list(lat.error_y.arrayminus) == pytest.approx([0.5, 0.2, 0.2])
    assert any("overlap" in (a.text or "") for a in fig.layout.annotations)
    assert list(lat.marker.symbol) == ["diamond", "diamond-open", "diamond"]  # the busy run is open
    base = next(t for t in fig.data if t.name == "base model · latency")
    assert list(base.error_y.array) == pytest.approx([0.2]) and list(base.error_y.arrayminus) == pytest.approx([0.2])
    # Separated spreads: a trend, drawn as a line, no note.
    fig = tradeoff_chart(_latency_frame([1.95, 1.75, 1.55], [2.05, 1.85, 1.65]), latency_col="measured_decode_ms",
                         latency_spread=("measured_lo", "measured_hi"))
    assert next(t for t in fig.data if t.name == "wanda · latency").mode == "lines+markers"
    assert not any("overlap" in (a.text or "") for a in fig.layout.annotations)


def test_right_hand_axes_get_round_ticks_of_their_own():
    from moeviz.figures._common import readable

    for fig in (tradeoff_chart(_sweep_frame()),
                drift_per_layer({"drift": [dict(layer=0, topk_overlap=0.9, top1_change_rate=0.1, kl=0.01)]})):
        assert fig.layout.yaxis2.overlaying == "y" and fig.layout.yaxis2.tickmode == "auto"
    from plotly.subplots import make_subplots

    fig = readable(make_subplots(specs=[[{"secondary_y": True}]]))
    assert fig.layout.yaxis2.tickmode == "auto"


def test_runs_frame_measured_latency_columns_and_notes():
    from moeviz.runview import latency_notes, with_measured_latency

    df = pd.DataFrame({"measured_decode_ms": [2.0, 1.8, 3.0], "measured_decode_q1_ms": [1.9, 1.7, None],
                       "measured_decode_q3_ms": [2.1, 1.9, None], "base_measured_decode_ms": [2.0, 2.0, None],
                       "latency_spreads_overlap": [1.0, 0.0, None], "latency_busy": [0.0, 1.0, None]})
    out = with_measured_latency(df)
    assert list(out["measured_lo"][:2]) == [1.9, 1.7] and math.isnan(out["measured_hi"][2])
    assert math.isnan(out["base_measured_lo"][0])  # no base quartiles in this frame: none invented
    note = latency_notes(df)
    assert "2 run(s) timed back to back" in note and "in 1 of them" in note and "1 timed while the machine was busy" in note
    assert "1 run(s) from before back-to-back timing" in note


def test_architecture_numbers_the_pruning_targets_in_order_on_the_elements():
    dot = moe_layer_dot(dict(num_experts=4, top_k=2, index=0, routing_rule="softmax_topk"), plan={})
    _assert_valid_dot(dot)
    labels = _labels(dot)
    key = labels["targets"].split("\\n", 1)[1].split("\\l")[::2]  # one line per target, then its controls
    assert [line.split(" ")[0] for line in key[:3]] == ["①", "②", "③"]
    assert "weights within experts" in key[0] and "router" in key[1] and "whole experts" in key[2]
    assert labels["router"].startswith("② router")
    experts_box = re.search(r"subgraph cluster_experts \{[^}]*?label=\"([^\"]*)\"", dot).group(1)
    assert "① weights in each expert" in experts_box and "③ whole experts" in experts_box
    assert not re.search(r"targets -> ", dot)  # no pointer crossing the drawing
    assert 'fontsize=16' in dot  # node text sized for a projector


def test_gptq_and_rtn_runs_of_one_metric_are_different_methods():
    """An RTN and a GPTQ run of one pruning metric are two methods: two series, two colours, two legend
    entries and two filter values (not one 'magnitude' legend entry for both)."""
    from moeviz.compression.plan import CompressionPlan, PruningSettings, QuantSettings
    from moeviz.runview import with_facets

    def plan(s, method):
        return CompressionPlan(pruning=PruningSettings(metric="magnitude", sparsity=s),
                               quant=QuantSettings(bits=4, method=method)).to_json(indent=None)

    df = _sweep_frame().iloc[:4].drop(columns=["method"], errors="ignore")
    df["plan_json"] = [plan(0.3, "rtn"), plan(0.5, "rtn"), plan(0.3, "gptq"), plan(0.5, "gptq")]
    df = with_facets(df)
    assert list(df["method"]) == ["magnitude", "magnitude", "magnitude + gptq", "magnitude + gptq"]
    fig = perplexity_vs_ratio(df)
    rtn = next(t for t in fig.data if t.name == "magnitude")
    gptq = next(t for t in fig.data if t.name == "magnitude + gptq")
    assert len(rtn.x) == 2 and len(gptq.x) == 2 and rtn.line.color != gptq.line.color
    # 16-bit plans never name GPTQ, whatever quant.method says
    assert with_facets(df.assign(plan_json=[CompressionPlan(pruning=PruningSettings(sparsity=0.5),
                                                            quant=QuantSettings(method="gptq")).to_json()] * 4)
                       )["method"].iloc[0] == "moe_pruner"


def test_tradeoff_chart_defaults_to_measured_latency_and_names_the_projected_accelerator():
    df = _latency_frame([1.9, 1.7, 1.5], [2.1, 1.9, 1.7])
    fig = tradeoff_chart(df)  # measured values present: measured is the default
    assert "measured" in fig.layout.yaxis2.title.text and "this machine" in fig.layout.title.text
    lat = next(t for t in fig.data if t.name == "wanda · latency")
    assert list(lat.y) == [2.0, 1.8, 1.6]
    df["projected_device"] = "NVIDIA H100 SXM"
    fig = tradeoff_chart(df, latency_col="projected_decode_ms")
    # on the chart itself (title and axis), not only in a hover text
    assert "NVIDIA H100 SXM" in fig.layout.title.text and "NVIDIA H100 SXM" in fig.layout.yaxis2.title.text
    assert "projected" in tradeoff_chart(df.drop(columns=["measured_decode_ms"])).layout.yaxis2.title.text
    assert "NVIDIA H100 SXM" in pareto_chart(df, x="projected_decode_ms").layout.xaxis.title.text
