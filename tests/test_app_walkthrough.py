"""Issue 27: the app walked through as a researcher would (AppTest on a tiny Mixtral)."""

from pathlib import Path

from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[1] / "app.py")


def button(at, label):
    return next(b for b in at.button if b.label == label)


def ok(at):
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def calibrated_app(model_dir, n_samples=4, seq_len=16):
    at = AppTest.from_file(APP, default_timeout=180)
    at.session_state["model_source"] = str(model_dir)
    at.run()
    ok(at)
    at.number_input[0].set_value(n_samples)
    at.number_input[1].set_value(seq_len)
    button(at, "Run calibration").click().run()
    ok(at)
    return at


def test_a_failed_load_keeps_the_working_model(tiny_model_dirs, tmp_path):
    at = calibrated_app(tiny_model_dirs["mixtral"])
    stats = at.session_state["stats"]
    at.radio[0].set_value("Local folder or hub id")
    at.text_input[0].set_value(str(tmp_path / "missing"))
    button(at, "Load model").click().run()
    assert not at.exception
    assert len(at.error) == 1 and "does not exist" in at.error[0].value and "kept" in at.error[0].value
    assert at.session_state["model_source"] == str(tiny_model_dirs["mixtral"])
    assert at.session_state["stats"] is stats  # the calibration stays too
    assert any("MixtralForCausalLM" in m.value for m in at.markdown)
    for page in ("pages/2_routing.py", "pages/3_architecture.py", "pages/1_model_and_calibration.py"):
        at.switch_page(page).run()
        ok(at)  # every page still works on the model, and the error was shown once
    assert any("MixtralForCausalLM" in m.value for m in at.markdown)


def test_invalid_calibration_numbers_are_refused_when_run_is_pressed(tiny_model_dirs):
    at = AppTest.from_file(APP, default_timeout=180)
    at.session_state["model_source"] = str(tiny_model_dirs["mixtral"])
    at.run()
    ok(at)
    for field, value, message in ((0, 0, "at least 1"), (1, 100000, "above the model's context of 64")):
        at.number_input[0].set_value(4)
        at.number_input[1].set_value(16)
        at.number_input[field].set_value(value)
        button(at, "Run calibration").click().run()
        assert not at.exception and not at.success  # never "Loaded cached statistics" for other numbers
        assert len(at.error) == 1 and message in at.error[0].value, [e.value for e in at.error]
        assert at.session_state["stats"] is None
    assert "64 tokens" in at.number_input[1].help  # the field names the model's context
    at.number_input[1].set_value(16)
    button(at, "Run calibration").click().run()
    ok(at)
    assert "for the bundled text." in at.success[0].value


def test_architecture_draws_the_model_until_a_plan_is_chosen_then_n_m_and_removals(tiny_model_dirs):
    import re

    from moeviz.compression.plan import CompressionPlan, PruningSettings

    at = AppTest.from_file(APP, default_timeout=180)
    at.session_state["model_source"] = str(tiny_model_dirs["mixtral"])
    at.run()
    at.switch_page("pages/3_architecture.py").run()
    ok(at)
    labels = lambda: re.findall(r'^\s*e\d+ \[label="([^"]*)"', at.get("graphviz_chart")[0].proto.spec, re.M)  # noqa: E731
    assert labels() and all(l.endswith("· 0%\\nunquantized (float32)") for l in labels()), labels()  # not "16b", not 50 %
    assert any("still the default" in c.value and "50%" in c.value for c in at.caption)
    at.radio[0].set_value("the current plan").run()  # the default plan, on request
    assert all("· 50%\\n" in l for l in labels())
    at.session_state["plan"] = CompressionPlan(pruning=PruningSettings(metric="magnitude", structure="2:4"),
                                               removed_experts=[(0, 1)]).to_dict()
    at.run()
    ok(at)
    spec = at.get("graphviz_chart")[0].proto.spec
    assert "e1 ✗ removed" in labels() and "e0 · 2:4 (50%)\\nunquantized (float32)" in labels()
    assert "2:4 structured" in spec  # the legend names the border that marks N:M experts
    assert any("2:4 Magnitude" in c.value and "1 expert removed" in c.value for c in at.caption)


def test_routing_controls_sit_beside_what_they_control(tiny_model_dirs):
    at = calibrated_app(tiny_model_dirs["mixtral"])
    at.switch_page("pages/2_routing.py").run()
    ok(at)
    layer = next(s for s in at.selectbox if s.label == "Layer")
    in_columns = [c for c in at.columns if any(s.label == "Layer" for s in c.selectbox)]
    # The layer selects three charts in a row below it, so it spans them: not in one column beside another chart
    assert not in_columns and layer.value == 0
    charts = lambda: [c.proto.spec for c in at.get("plotly_chart")]  # noqa: E731
    before = charts()
    layer.set_value(1).run()
    ok(at)
    after = charts()
    assert before[:2] == after[:2]  # the utilization heatmap and the CV bars (all layers) do not follow the layer
    assert all(b != a for b, a in zip(before[2:], after[2:]))  # the three charts below it do
    hist = next(c for c in at.columns if any(b.label == "Log scale" for b in c.checkbox))
    assert len(hist.get("plotly_chart")) == 1  # the log scale sits with the histogram it scales


def test_method_identifiers_read_as_labels():
    from moeviz.compression.plan import CompressionPlan, PruningSettings, method_name, plan_summary
    from moeviz.registry import METHODS, method_display, method_label

    for m in METHODS:
        assert method_label(m.name) == m.label != m.name
    plan = CompressionPlan(pruning=PruningSettings(metric="moe_pruner", sparsity=0.5)).to_dict()
    plan["quant"].update(bits=4, method="gptq")
    shown = method_display(method_name(plan) + " · optimised")
    assert shown == "MoE-Pruner |W|·‖X·gate‖ + GPTQ · optimised" and "moe_pruner" not in shown
    assert method_display("runs") == "runs" and method_label("old_metric") == "old_metric"  # unknown: as written
    assert "moe_pruner" not in plan_summary(CompressionPlan.from_dict(plan))


def test_bytes_have_one_convention_binary_units():
    from moeviz.figures.units import MIB, format_bytes
    from moeviz.sensitivity.budget import Budget

    assert [format_bytes(n) for n in (512, 1536, 3 * MIB, 5 * 2**30)] == ["512 B", "1.5 KiB", "3.00 MiB", "5.00 GiB"]
    assert Budget("model_bytes", 8 * MIB).label() == "8.00 MiB model"  # the fitted plan's name: same units
