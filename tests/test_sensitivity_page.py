"""The Sensitivity page (pages/7_sensitivity.py) through AppTest on a tiny Mixtral."""

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from moeviz.compression.apply import Compressor
from moeviz.compression.plan import CompressionPlan

APP = str(Path(__file__).resolve().parents[1] / "app.py")


def button(at, label):
    return next(b for b in at.button if b.label == label)


def ok(at):
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


@pytest.fixture(scope="module")
def measured(tiny_model_dirs):
    at = AppTest.from_file(APP, default_timeout=300)
    at.session_state["model_source"] = str(tiny_model_dirs["mixtral"])
    at.run()
    ok(at)
    at.number_input[0].set_value(8)
    at.number_input[1].set_value(32)
    button(at, "Run calibration").click().run()
    ok(at)
    at.switch_page("pages/7_sensitivity.py").run()
    ok(at)
    assert any("Measure the sensitivity first" in i.value for i in at.info)
    next(n for n in at.number_input if n.label == "Calibration windows measured").set_value(4)
    button(at, "Measure sensitivity").click().run()
    ok(at)
    assert at.session_state["sensitivity"].measured is not None
    assert len(at.get("plotly_chart")) == 1  # the heatmap
    return at


@pytest.mark.parametrize("label,value", [("experts compression ratio (×)", 5.0), ("mean expert sparsity", 0.7),
                                         ("model size (MiB)", 0.1)])
def test_budget_control_fills_the_plan_to_the_budget(measured, loaded_tiny, tiny_model_dirs, label, value):
    at = measured
    next(s for s in at.selectbox if s.label == "Budget").set_value(label).run()  # reruns: the value takes its units
    next(n for n in at.number_input if n.label.startswith("Value (")).set_value(value)
    button(at, "Fit the plan to this budget").click().run()
    ok(at)
    plan = CompressionPlan.from_dict(at.session_state["plan"])
    assert plan.overrides and plan.name.startswith("optimised @")
    fitted = next(s.value for s in at.success if s.value.startswith("Plan **"))
    assert "iB (" in fitted and " MB" not in fitted  # binary units, as on the Compress page
    scale = 2**20 if label.startswith("model size") else 1  # MiB typed, bytes in the budget
    assert at.session_state["budget_result"]["budget"]["value"] == value * scale  # the typed value, not a default
    model = loaded_tiny("mixtral")
    plan.pruning.metric = "magnitude"  # bytes do not depend on which weights are pruned; no statistics needed
    storage = Compressor(model).apply(plan).storage
    n_experts = sum(l.num_experts for l in model.layers)
    if label.startswith("experts"):
        ratio = storage.summary()["experts_compression_ratio"]
        one_expert = storage.experts_base_bytes / n_experts
        assert ratio >= value and storage.experts_bytes >= storage.experts_base_bytes / value - one_expert
    elif label.startswith("model size"):
        one_expert = storage.experts_base_bytes / n_experts
        assert value * 2**20 - one_expert <= storage.compressed_bytes <= value * 2**20
    else:
        res = at.session_state["budget_result"]
        assert value - 1e-9 <= res["mean_sparsity"] <= value + 0.3 / n_experts + 1e-9  # within one grid step
        zeros = sum(t["numel"] - t["nonzero"] for t in storage.tensors if t["tensor"] != "router")
        assert zeros / storage.experts_base_bytes * 4 == pytest.approx(res["mean_sparsity"], abs=0.02)
    # The Compress page shows the fitted plan in its per-expert table
    at.switch_page("pages/4_compress.py").run()
    ok(at)
    assert CompressionPlan.from_dict(at.session_state["plan"]).overrides == plan.overrides  # shown, not reset
    at.switch_page("pages/7_sensitivity.py").run()
    ok(at)


def test_optimised_runs_are_stored_and_one_pass_vs_sequential_is_shown(measured):
    at = measured
    next(m for m in at.multiselect if m.label == "Mean expert sparsity budgets").set_value([0.5])
    button(at, "Evaluate optimised plans").click().run()
    ok(at)
    rows = at.session_state["optimised_runs"]
    assert [r["name"] for r in rows] == ["optimised @ 50%"] and rows[0]["run"] is not None
    from moeviz.store import RunStore

    assert RunStore().get_run(rows[0]["run"]).name == "optimised @ 50%"  # Trade-offs reads the same store
    button(at, "Compare one-pass and sequential").click().run()
    ok(at)
    cmp = at.session_state["sequential_comparison"]
    assert cmp["layers"][0]["differing"] == 0 and len(cmp["layers"]) >= 2
    assert any(m.label == "Perplexity, sequential" for m in at.metric)


def test_measuring_needs_the_button_and_survives_a_refresh(measured, tiny_model_dirs):
    """Issue 27: Enter in a number field submits a form, so the measurement is a plain button, not a form's;
    after a refresh (a new session on the same URL) the measurement and its settings come back from disk."""
    at = measured
    assert not button(at, "Measure sensitivity").proto.is_form_submitter
    windows = next(n for n in at.number_input if n.label == "Calibration windows measured")
    assert windows.proto.form_id == ""  # not in a form: Enter only reruns, it submits nothing
    for label in ("Pruning metric", "Values", "Predicted Δ loss from"):  # labels, not identifiers (moe_pruner)
        options = next(s for s in at.selectbox if s.label == label).options
        assert options and not any("_" in o for o in options), options
    params = {k: (v[-1] if isinstance(v, list) else v) for k, v in dict(at.query_params).items()}
    fresh = AppTest.from_file(APP, default_timeout=300)
    for k, v in params.items():
        fresh.query_params[k] = v
    fresh.run()
    fresh.switch_page("pages/7_sensitivity.py").run()
    ok(fresh)
    assert not any("Measure the sensitivity first" in i.value for i in fresh.info)
    assert next(n for n in fresh.number_input if n.label == "Calibration windows measured").value == 4
    assert fresh.session_state["sensitivity"].n_tokens == at.session_state["sensitivity"].n_tokens
    assert len(fresh.get("plotly_chart")) >= 1  # the heatmap, without measuring again


def test_the_first_visit_says_what_the_time_depends_on(tiny_model_dirs):
    at = AppTest.from_file(APP, default_timeout=300)
    at.session_state["model_source"] = str(tiny_model_dirs["mixtral"])
    at.run()
    at.number_input[0].set_value(8)
    at.number_input[1].set_value(32)
    button(at, "Run calibration").click().run()
    at.switch_page("pages/7_sensitivity.py").run()
    ok(at)
    info = next(i.value for i in at.info if "Measure the sensitivity first" in i.value)
    assert "minute" not in info and "settings ×" in info and "windows" in info


def test_negative_delta_is_not_white():
    import numpy as np
    from plotly.colors import sample_colorscale

    from moeviz.sensitivity.figures import sensitivity_heatmap

    class Sens:  # the two things the figure reads
        settings = [(0.5, 16)]

        def values(self, kind):
            return np.array([[[-0.2], [0.0], [0.1]]])

    trace = sensitivity_heatmap(Sens(), 0).data[0]
    assert trace.zmid == 0  # white means "no change", whatever the sign of the others
    scale = [c for _, c in trace.colorscale]
    lowest, middle = sample_colorscale(scale, [0.0, 0.5])
    assert lowest != middle and "255, 255, 255" not in lowest.replace("rgb(", "")
