"""The Streamlit app, page by page, through streamlit.testing.v1.AppTest on a tiny MoE."""

from pathlib import Path

import pytest

from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[1] / "app.py")


def button(at, label):
    return next(b for b in at.button if b.label == label)


def new_app(model_dir=None):
    at = AppTest.from_file(APP, default_timeout=180)
    if model_dir is not None:
        at.session_state["model_source"] = str(model_dir)
    return at.run()


def ok(at):
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def test_default_app_opens_on_the_bundled_demo_model():
    at = new_app()
    ok(at)
    assert any("MixtralForCausalLM" in m.value for m in at.markdown)
    assert [m.value for m in at.metric][:3] == ["4", "8", "2"]


@pytest.fixture(scope="module")
def calibrated(tiny_model_dirs):
    at = new_app(tiny_model_dirs["mixtral"])
    ok(at)
    at.number_input[0].set_value(8)
    at.number_input[1].set_value(32)
    button(at, "Run calibration").click().run()
    ok(at)
    assert at.success and "bundled" in at.success[0].value
    return at


def test_default_flow_calibrate_route_compress_evaluate_sweep(calibrated):
    at = calibrated
    at.switch_page("pages/2_routing.py").run()
    ok(at)
    assert len(at.get("plotly_chart")) == 5  # heatmap, CV, histogram, co-activation, domains
    assert any("<span" in h.proto.body for h in at.get("html"))  # token explorer rendered
    at.switch_page("pages/3_architecture.py").run()
    ok(at)
    assert "digraph" in at.get("graphviz_chart")[0].proto.spec

    at.switch_page("pages/4_compress.py").run()
    ok(at)
    at.selectbox[0].set_value("moe_pruner").run()  # no "Apply" step: each control updates the plan at once
    at.slider[0].set_value(0.5).run()
    ok(at)
    assert at.session_state["plan"]["pruning"] == {**at.session_state["plan"]["pruning"], "metric": "moe_pruner", "sparsity": 0.5}
    button(at, "Evaluate").click().run()
    ok(at)
    result = at.session_state["last_result"]
    assert result["plan"]["pruning"]["sparsity"] == 0.5 and result["compression"]["compression_ratio"] > 1
    assert at.session_state["last_run_id"] is not None
    labels = [m.label for m in at.metric]
    assert any("projected" in l for l in labels) and any("measured" in l for l in labels)
    # Recovery of the evaluated plan: stored as a run linked to the evaluated one.
    next(n for n in at.number_input if n.label == "Steps").set_value(3)
    next(n for n in at.number_input if n.label == "Batch size (windows)").set_value(2)
    next(n for n in at.number_input if n.label == "λ router").set_value(0.0)  # 0 turns the router term off
    button(at, "Recover").click().run()
    ok(at)
    rec = at.session_state["recovery"]
    assert rec["summary"]["lambda_router"] == 0 and rec["summary"]["lambda_expert"] > 0  # expert λ balanced
    assert all(row["router_kl"] == 0 for row in rec["history"])
    assert rec["parent_run_id"] == at.session_state["last_run_id"] and rec["summary"]["steps_done"] == 3
    assert any(m.label == "Perplexity gap recovered" for m in at.metric)
    from moeviz.store import RunStore

    assert RunStore().get_run(rec["run_id"]).parent_run_id == rec["parent_run_id"]

    at.switch_page("pages/5_tradeoffs.py").run()
    ok(at)
    at.multiselect[0].set_value(["magnitude"])
    at.multiselect[1].set_value([0.3, 0.6])
    button(at, "Run sweep").click().run()
    ok(at)
    assert len(at.session_state["sweep_df"]) == 2
    assert len(at.get("plotly_chart")) == 4  # trade-off, perplexity, CV, Pareto (no run selected yet)
    import json

    tradeoff = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert any(a.get("showarrow") and "recovery" in a.get("hovertext", "")
               for a in tradeoff["layout"].get("annotations", []))  # the recovery arrow, parent → recovered
    at.switch_page("pages/6_export.py").run()
    ok(at)
    assert [b.proto.label for b in at.get("download_button")][:2] == ["Plan (JSON)", "Results of all runs (CSV)"]
    out = Path(at.session_state["model_source"]).parent / "exported-from-app"
    next(t for t in at.text_input if t.label == "Output folder").set_value(str(out))
    button(at, "Export model").click().run()
    ok(at)
    assert (out / "config.json").exists() and (out / "moeviz_plan.json").exists()


def test_editing_one_expert_changes_the_plan(calibrated):
    at = calibrated
    at.switch_page("pages/4_compress.py").run()
    ok(at)
    # The editable per-expert table is rendered, one row per expert (AppTest cannot type into it).
    table = next(d for d in at.dataframe if (d.key or "").startswith("experts_"))
    assert len(table.value) == 2 * 4 and list(table.value.columns)[:2] == ["layer", "expert"]  # 2 layers × 4 experts
    form = [n for n in at.number_input if n.label in ("Layer", "Expert")]
    dict((n.label, n) for n in form)["Layer"].set_value(1)
    dict((n.label, n) for n in form)["Expert"].set_value(2)
    next(t for t in at.text_input if t.label == "Sparsity" and t.value == "50 %").set_value("80 %")
    next(s for s in at.selectbox if s.label == "Bits" and s.key is None).set_value(4)
    button(at, "Set expert").click().run()
    ok(at)
    from moeviz.compression.plan import CompressionPlan

    plan = CompressionPlan.from_dict(at.session_state["plan"])
    assert any(o.layer == 1 and o.expert == 2 and o.sparsity == 0.8 and o.bits == 4 for o in plan.overrides)
    next(c for c in at.checkbox if c.label == "Remove").check()
    dict((n.label, n) for n in at.number_input if n.label in ("Layer", "Expert"))["Expert"].set_value(0)
    button(at, "Set expert").click().run()
    ok(at)
    assert (1, 0) in {tuple(x) for x in at.session_state["plan"]["removed_experts"]}


def test_bad_inputs_show_errors_and_app_stays_usable(tiny_model_dirs, tmp_path):
    at = new_app(tmp_path / "missing")
    assert not at.exception and "does not exist" in at.error[0].value
    # A non-MoE model.
    import transformers
    from tiny_models import COMMON, tiny_tokenizer

    llama = tmp_path / "llama"
    transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**{**COMMON, "intermediate_size": 16})).save_pretrained(llama)
    tiny_tokenizer().save_pretrained(llama)
    at = new_app(llama)
    assert not at.exception and "has no MoE layers" in at.error[0].value
    # Recover: point to a real MoE model, then an upload that is empty.
    at.session_state["model_source"] = str(tiny_model_dirs["olmoe"])
    at.run()
    ok(at)
    at.radio[1].set_value("Upload .txt / .jsonl").run()
    button(at, "Run calibration").click().run()
    assert not at.exception and "Upload a .txt or .jsonl file first" in at.error[0].value
    # Pages that need statistics explain what to do instead of failing.
    at.switch_page("pages/2_routing.py").run()
    assert not at.exception and "Run calibration" in at.info[0].value


# ---------------------------------------------------------------------------- issue 16: the app as an instrument
def plan_of(at):
    from moeviz.compression.plan import CompressionPlan

    return CompressionPlan.from_dict(at.session_state["plan"])


def url_of(at) -> dict:
    """The query string the app last wrote, as {key: value}."""
    return {k: (v[-1] if isinstance(v, list) else v) for k, v in dict(at.query_params).items()}


def compress_page(tiny_model_dirs):
    """A fresh session on the tiny Mixtral, calibrated (cached on disk after the first), on Compress."""
    at = new_app(tiny_model_dirs["mixtral"])
    at.number_input[0].set_value(8)
    at.number_input[1].set_value(32)
    button(at, "Run calibration").click().run()
    at.switch_page("pages/4_compress.py").run()
    ok(at)
    return at


def set_expert(at, layer, expert, sparsity="50 %", bits=16, remove=False):
    nums = {n.label: n for n in at.number_input if n.label in ("Layer", "Expert")}
    nums["Layer"].set_value(layer)
    nums["Expert"].set_value(expert)
    next(t for t in at.text_input if t.label == "Sparsity" and t.key is None).set_value(sparsity)
    next(s for s in at.selectbox if s.label == "Bits" and s.key is None).set_value(bits)
    box = next(c for c in at.checkbox if c.label == "Remove")
    box.check() if remove else box.uncheck()
    return button(at, "Set expert").click().run()


def test_live_plan_keeps_hand_removed_experts_and_marks_results_stale(tiny_model_dirs):
    from moeviz.store import RunStore

    at = compress_page(tiny_model_dirs)
    assert not any(b.label == "Apply settings" for b in at.button)
    set_expert(at, 1, 0, remove=True)
    ok(at)
    assert [1, 0] in at.session_state["plan"]["removed_experts"]
    at.slider[0].set_value(0.3).run()  # a global control: the plan changes at once ...
    ok(at)
    assert plan_of(at).pruning.sparsity == 0.3
    assert (1, 0) in plan_of(at).removed_experts  # ... and the expert removed by hand stays removed
    ratio = next(m for m in at.metric if m.label == "Compression ratio (plan)").value
    at.slider[0].set_value(0.6).run()
    assert next(m for m in at.metric if m.label == "Compression ratio (plan)").value != ratio  # live bytes

    at.session_state["_auto_eval"] = False
    button(at, "Evaluate").click().run()
    ok(at)
    first = at.session_state["last_run_id"]
    assert not any("Stale" in w.value for w in at.warning)
    n_runs = len(RunStore().runs())
    at.slider[0].set_value(0.4).run()
    ok(at)
    assert any("Stale" in w.value for w in at.warning)  # the result no longer matches the plan
    assert any("(stale)" in m.label for m in at.metric)
    button(at, "Evaluate").click().run()
    ok(at)
    assert at.session_state["last_run_id"] != first and len(RunStore().runs()) == n_runs + 1
    assert not any("Stale" in w.value for w in at.warning)
    at.slider[0].set_value(0.6).run()  # back to the first plan: its stored run is reused, not duplicated
    button(at, "Evaluate").click().run()
    ok(at)
    assert at.session_state["last_run_id"] == first and len(RunStore().runs()) == n_runs + 1
    assert any("reused" in c.value for c in at.caption)


def test_n_m_structure_says_per_expert_ratios_are_not_used_and_ratios_accept_percent(tiny_model_dirs):
    at = compress_page(tiny_model_dirs)
    set_expert(at, 0, 1, sparsity="30 %")
    ok(at)
    assert any(o.layer == 0 and o.expert == 1 and o.sparsity == 0.3 for o in plan_of(at).overrides)
    next(s for s in at.selectbox if s.label == "Structure").set_value("2:4").run()
    ok(at)
    assert any("2:4" in w.value and "not used as typed" in w.value for w in at.warning)
    set_expert(at, 0, 2, sparsity="50")  # 50 without % is refused with a message, not clamped
    assert not at.exception and "write 50 %" in at.error[0].value
    assert not any(o.layer == 0 and o.expert == 2 for o in plan_of(at).overrides)


def test_second_load_model_press_loads_the_new_source(tiny_model_dirs):
    at = new_app()
    ok(at)
    for family, arch in (("mixtral", "MixtralForCausalLM"), ("olmoe", "OlmoeForCausalLM")):
        at.radio[0].set_value("Local folder or hub id")
        at.text_input[0].set_value(str(tiny_model_dirs[family]))
        button(at, "Load model").click().run()
        ok(at)
        assert at.session_state["model_source"] == str(tiny_model_dirs[family])
        assert any(arch in m.value for m in at.markdown)


def test_url_round_trip_restores_model_calibration_plan_and_run(tiny_model_dirs):
    at = compress_page(tiny_model_dirs)
    set_expert(at, 1, 3, sparsity="20 %", bits=4)
    at.session_state["_auto_eval"] = False
    button(at, "Evaluate").click().run()
    ok(at)
    params = url_of(at)
    assert params["model"] == str(tiny_model_dirs["mixtral"]) and params["calib"] == "8x32s0"
    assert "plan" in params
    # A fresh browser session with the same URL (a refresh or a shared link).
    fresh = AppTest.from_file(APP, default_timeout=180)
    for k, v in params.items():
        fresh.query_params[k] = v
    fresh.run()
    ok(fresh)
    assert fresh.session_state["model_source"] == str(tiny_model_dirs["mixtral"])
    fresh.switch_page("pages/4_compress.py").run()
    ok(fresh)
    assert fresh.session_state["stats"] is not None  # calibration back from the on-disk cache
    assert fresh.session_state["plan"] == at.session_state["plan"]
    assert any(o.layer == 1 and o.expert == 3 and o.bits == 4 for o in plan_of(fresh).overrides)


def test_long_plan_is_stored_and_referenced_by_id(tiny_model_dirs):
    import pages._state as state
    from moeviz.compression.plan import CompressionPlan, Override

    import random

    rng = random.Random(0)  # random ratios: a plan that does not compress below the URL limit
    plan = CompressionPlan(overrides=[Override(layer=i % 2, expert=i % 4, sparsity=rng.random() * 0.9) for i in range(8)]
                           + [Override(layer=i % 2, sparsity=rng.random() * 0.9) for i in range(200)])
    assert len(state.encode_plan(plan.to_dict())) > state.URL_PLAN_MAX
    at = new_app(tiny_model_dirs["mixtral"])
    at.session_state["plan"] = plan.to_dict()
    at.run()
    params = url_of(at)
    assert "plan" not in params and "plan_id" in params
    fresh = AppTest.from_file(APP, default_timeout=180)
    for k, v in params.items():
        fresh.query_params[k] = v
    fresh.run()
    ok(fresh)
    assert fresh.session_state["plan"] == plan.to_dict()


def test_plan_json_upload_sets_the_plan(tiny_model_dirs):
    from moeviz.compression.plan import CompressionPlan, PruningSettings, QuantSettings

    at = compress_page(tiny_model_dirs)
    plan = CompressionPlan(pruning=PruningSettings(metric="wanda", sparsity=0.25), quant=QuantSettings(bits=4),
                           removed_experts=[(0, 3)])
    at.file_uploader[0].set_value(("plan.json", plan.to_json().encode(), "application/json")).run()
    ok(at)
    assert plan_of(at).pruning.metric == "wanda" and plan_of(at).quant.bits == 4
    assert next(s for s in at.selectbox if s.label == "Pruning metric").value == "wanda"  # controls follow


def test_run_table_row_loads_its_plan_and_runs_can_be_renamed_tagged_compared_deleted(tiny_model_dirs):
    from moeviz.store import RunStore

    at = compress_page(tiny_model_dirs)
    at.session_state["_auto_eval"] = False
    at.slider[0].set_value(0.2).run()
    button(at, "Evaluate").click().run()
    first = at.session_state["last_run_id"]
    at.slider[0].set_value(0.7).run()
    button(at, "Evaluate").click().run()
    second = at.session_state["last_run_id"]
    ok(at)
    at.switch_page("pages/5_tradeoffs.py").run()
    ok(at)
    table = next(d for d in at.dataframe if d.key == "runs_table")
    row = list(table.value["id"]).index(first)
    at.session_state["runs_table"] = {"selection": {"rows": [row], "columns": [], "cells": []}}
    at.run()
    ok(at)
    assert at.session_state["selected_run_id"] == first
    assert plan_of(at).pruning.sparsity == 0.2  # the row's plan is the session's plan now
    assert f"run={first}" in "&".join(f"{k}={v}" for k, v in url_of(at).items())

    next(t for t in at.text_input if t.label == "Name").set_value("sparse 20")
    button(at, "Rename").click().run()
    next(t for t in at.text_input if t.label == "Tags (comma-separated)").set_value("keep, paper")
    button(at, "Save tags").click().run()
    ok(at)
    assert RunStore().get_run(first).name == "sparse 20" and RunStore().get_run(first).tags == ["keep", "paper"]
    next(m for m in at.multiselect if m.label == "Tag").set_value(["paper"]).run()
    ok(at)
    assert list(next(d for d in at.dataframe if d.key == "runs_table").value["id"]) == [first]  # tag filter
    next(m for m in at.multiselect if m.label == "Tag").set_value([]).run()

    next(s for s in at.selectbox if s.label == "Compare with").set_value(second).run()
    ok(at)
    diffs = [d.value for d in at.dataframe if "setting" in d.value.columns]
    assert diffs and "pruning.sparsity" in list(diffs[0]["setting"])
    assert any("b − a" in d.value.columns for d in at.dataframe)

    next(c for c in at.checkbox if c.label == "Really delete").check().run()
    button(at, "Delete run").click().run()
    ok(at)
    import pytest as _pytest

    with _pytest.raises(KeyError):
        RunStore().get_run(first)
    assert at.session_state["selected_run_id"] is None


def test_typing_into_the_expert_table(tiny_model_dirs):
    at = compress_page(tiny_model_dirs)
    editor = next(d for d in at.dataframe if (d.key or "").startswith("experts_"))
    at.session_state[editor.key] = {"edited_rows": {5: {"sparsity": "50"}}, "added_rows": [], "deleted_rows": []}
    at.run()
    assert not at.exception and any("write 50 %" in e.value for e in at.error)  # refused, not clamped
    assert plan_of(at).overrides == []
    editor = next(d for d in at.dataframe if (d.key or "").startswith("experts_"))
    row = editor.value.iloc[5]
    at.session_state[editor.key] = {"edited_rows": {5: {"sparsity": "35 %"}}, "added_rows": [], "deleted_rows": []}
    at.run()
    ok(at)
    assert [(o.layer, o.expert, o.sparsity) for o in plan_of(at).overrides] == [(row["layer"], row["expert"], 0.35)]
    editor = next(d for d in at.dataframe if (d.key or "").startswith("experts_"))
    assert editor.value.iloc[5]["override"] == "sparsity"  # the overridden cell is marked


def test_back_to_back_latency_is_stored_with_its_spread_and_drawn_with_error_bars(tiny_model_dirs):
    import json

    from moeviz.store import RunStore

    at = compress_page(tiny_model_dirs)
    at.session_state["_auto_eval"] = False
    at.slider[0].set_value(0.45).run()
    button(at, "Evaluate").click().run()
    ok(at)
    # Every evaluation is already timed back to back: stored with its spread and busy flag.
    first = RunStore().get_run(at.session_state["last_run_id"])
    assert first.metrics["latency_ab"]["compressed"]["median"] == first.extra["measured_decode_ms"]
    assert first.extra["measured_decode_q1_ms"] <= first.extra["measured_decode_ms"] <= first.extra["measured_decode_q3_ms"]
    assert first.extra["latency_busy"] in (0.0, 1.0)
    assert any(m.label == "Decode, compressed (back to back)" for m in at.metric)
    next(n for n in at.number_input if n.label == "Repeats").set_value(3)
    next(n for n in at.number_input if n.label == "Decode tokens per repeat").set_value(2)
    button(at, "Measure base and compressed back to back").click().run()
    ok(at)
    again = RunStore().get_run(at.session_state["last_run_id"])
    ab = again.metrics["latency_ab"]
    assert len(ab["base"]["samples"]) == len(ab["compressed"]["samples"]) == 3
    assert again.extra["measured_decode_ms"] == ab["compressed"]["median"]  # the columns follow the new measurement
    assert ab["compressed"]["q1"] <= ab["compressed"]["median"] <= ab["compressed"]["q3"]
    assert any(m.label == "Decode, compressed (back to back)" for m in at.metric)
    at.switch_page("pages/5_tradeoffs.py").run()
    next(r for r in at.radio if r.label == "Latency").set_value("measured_decode_ms").run()
    ok(at)
    fig = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert any((t.get("error_y") or {}).get("arrayminus") is not None for t in fig["data"])


def test_an_edit_to_the_same_value_changes_nothing_and_does_not_loop(tiny_model_dirs):
    at = compress_page(tiny_model_dirs)
    editor = next(d for d in at.dataframe if (d.key or "").startswith("experts_"))
    at.session_state[editor.key] = {"edited_rows": {2: {"sparsity": "50.0 %"}}, "added_rows": [], "deleted_rows": []}
    at.run(timeout=60)  # a rerun loop would time out here
    ok(at)
    assert plan_of(at).overrides == []


def test_layer_filter_edits_land_on_the_right_expert_and_bulk_edits(tiny_model_dirs):
    at = compress_page(tiny_model_dirs)
    next(m for m in at.multiselect if m.label == "Layers").set_value([1]).run()
    editor = next(d for d in at.dataframe if (d.key or "").startswith("experts_"))
    assert set(editor.value["layer"]) == {1} and len(editor.value) == 4
    at.session_state[editor.key] = {"edited_rows": {2: {"sparsity": "10 %"}}, "added_rows": [], "deleted_rows": []}
    at.run()
    ok(at)
    assert [(o.layer, o.expert, o.sparsity) for o in plan_of(at).overrides] == [(1, 2, 0.1)]

    next(s for s in at.selectbox if s.key == "bulk_layer").set_value(0)
    next(t for t in at.text_input if t.key == "bulk_layer_sparsity").set_value("70 %")
    next(s for s in at.selectbox if s.key == "bulk_layer_bits").set_value(4)
    button(at, "Set layer").click().run()
    ok(at)
    assert any(o.layer == 0 and o.expert is None and o.sparsity == 0.7 and o.bits == 4 for o in plan_of(at).overrides)
    next(t for t in at.text_input if t.key == "bulk_util").set_value("99 %")
    next(t for t in at.text_input if t.key == "bulk_util_sparsity").set_value("30 %")
    button(at, "Prune experts below").click().run()
    ok(at)
    per_expert = [o for o in plan_of(at).overrides if o.expert is not None]
    assert len(per_expert) == 2 * 4 and all(o.sparsity == 0.3 for o in per_expert)
    assert any("8 experts below 99 %" in c.value for c in at.caption)


def test_clicking_a_point_of_any_chart_selects_its_run_and_the_link_keeps_it(tiny_model_dirs):
    at = compress_page(tiny_model_dirs)
    at.session_state["_auto_eval"] = False
    at.slider[0].set_value(0.15).run()
    button(at, "Evaluate").click().run()
    run_id = at.session_state["last_run_id"]
    at.slider[0].set_value(0.55).run()  # the session's plan moves on
    at.switch_page("pages/5_tradeoffs.py").run()
    ok(at)
    # A click on the perplexity chart (not the Pareto chart): plotly's selection event carries the run id.
    at.session_state["ppl"] = {"selection": {"points": [{"customdata": [run_id, "x"], "x": 1.0, "y": 1.0}],
                                             "point_indices": [0], "box": [], "lasso": []}}
    at.run()
    ok(at)
    assert at.session_state["selected_run_id"] == run_id and plan_of(at).pruning.sparsity == 0.15
    params = url_of(at)
    assert params["run"] == str(run_id)
    fresh = AppTest.from_file(APP, default_timeout=180)
    for k, v in params.items():
        fresh.query_params[k] = v
    fresh.run()
    fresh.switch_page("pages/5_tradeoffs.py").run()
    ok(fresh)
    assert fresh.session_state["selected_run_id"] == run_id
    assert any(f"Selected run #{run_id}" in h.value for h in fresh.subheader)


def test_leaving_and_coming_back_keeps_the_plan_and_the_model_form(tiny_model_dirs):
    at = compress_page(tiny_model_dirs)
    at.slider[0].set_value(0.35).run()
    next(s for s in at.selectbox if s.label == "Expert weight bits").set_value(4).run()
    before = at.session_state["plan"]
    at.switch_page("pages/2_routing.py").run()
    at.switch_page("pages/4_compress.py").run()  # Streamlit dropped the controls' state while they were not shown
    ok(at)
    assert at.session_state["plan"] == before
    assert at.slider[0].value == 0.35
    at.switch_page("pages/1_model_and_calibration.py").run()
    ok(at)
    assert at.text_input[0].value == str(tiny_model_dirs["mixtral"])


def test_quality_proxy_updates_live_while_editing(tiny_model_dirs):
    """No Evaluate: each edit recomputes the gate-weighted reconstruction proxy and its per-layer chart."""
    at = compress_page(tiny_model_dirs)
    at.session_state["_auto_eval"] = False
    at.slider[0].set_value(0.2).run()
    ok(at)

    def proxy():
        return float(next(m for m in at.metric if m.label == "Quality proxy (live)").value.split()[0])

    low = proxy()
    at.slider[0].set_value(0.7).run()
    ok(at)
    high = proxy()
    assert 0 < low < high
    set_expert(at, 0, 1, sparsity="0 %", bits=16, remove=True)  # a whole expert removed: layer 0 rises
    ok(at)
    assert proxy() > high
    assert at.session_state["last_result"] is None  # nothing was evaluated


def test_second_order_options_show_where_they_act_and_the_result_says_what_ran(tiny_model_dirs):
    """GPTQ options only for quantized weights, the Hessian / solver settings only for SparseGPT or GPTQ
    plans; a hidden GPTQ choice never makes a 16-bit plan a second-order job; the result names the
    settings and the experts whose Hessian was damped; Trade-offs lists the settings per run; Sensitivity
    says it cannot measure SparseGPT."""
    at = compress_page(tiny_model_dirs)
    at.session_state["_auto_eval"] = False
    labels = lambda: {w.label for w in [*at.selectbox, *at.checkbox, *at.number_input]}  # noqa: E731
    second = {"Quantization method", "Hessian (SparseGPT / GPTQ)", "GPTQ act-order", "SparseGPT refit",
              "Block size (columns)", "Damping (percdamp)"}
    assert not labels() & second  # magnitude, 16 bits: none of them
    next(b for b in at.selectbox if b.label == "Expert weight bits").set_value(4).run()
    assert labels() & second == {"Quantization method"}  # RTN: no Hessian yet
    next(b for b in at.selectbox if b.label == "Quantization method").set_value("gptq").run()
    ok(at)
    assert labels() & second == second - {"SparseGPT refit"}
    assert plan_of(at).second_order()
    next(b for b in at.selectbox if b.label == "Expert weight bits").set_value(16).run()
    ok(at)
    assert not labels() & second and not plan_of(at).second_order()  # gptq hidden: not a job any more
    assert plan_of(at).quant.method == "rtn"

    next(b for b in at.selectbox if b.label == "Pruning metric").set_value("sparsegpt").run()
    at.slider[0].set_value(0.6).run()
    assert labels() & second == second - {"Quantization method", "GPTQ act-order"}
    next(b for b in at.selectbox if b.label == "Hessian (SparseGPT / GPTQ)").set_value("plain").run()
    next(n for n in at.number_input if n.label == "Damping (percdamp)").set_value(0.05).run()
    ok(at)
    plan = plan_of(at)
    assert (plan.pruning.metric, plan.hessian, plan.percdamp, plan.pruning.sparsity) == ("sparsegpt", "plain", 0.05, 0.6)
    assert any("first SparseGPT / GPTQ job on this model" in c.value for c in at.caption)  # said before it starts
    button(at, "Evaluate").click().run()
    ok(at)
    so = at.session_state["last_result"]["second_order"]
    assert any(c.value.startswith("SparseGPT:") and "Hessian plain" in c.value and "percdamp 0.05" in c.value
               for c in at.caption)
    assert not so["warnings"] and not any("fewer routed calibration tokens" in w.value for w in at.warning)
    at.slider[0].set_value(0.5).run()  # another second-order plan: the last job's time is said first
    assert any(f"took {so['seconds']:.1f} s" in c.value for c in at.caption)

    at.switch_page("pages/5_tradeoffs.py").run()
    ok(at)
    runs = next(d.value for d in at.dataframe if "second_order" in d.value.columns)
    row = runs[runs["method"] == "sparsegpt"].iloc[0]
    assert row["second_order"] == "plain · block 128 · damp 0.05"
    at.switch_page("pages/7_sensitivity.py").run()
    ok(at)
    assert any("SparseGPT / GPTQ, which this page cannot measure" in i.value for i in at.info)


def test_experts_with_too_few_calibration_tokens_are_named_after_a_second_order_job(tiny_model_dirs):
    """One calibration window of 8 tokens: each expert sees fewer routed tokens than its input columns, its
    Hessian is damped more, and the page says so (count + a table), not only the export report."""
    at = new_app(tiny_model_dirs["mixtral"])
    at.number_input[0].set_value(1)
    at.number_input[1].set_value(8)
    button(at, "Run calibration").click().run()
    at.switch_page("pages/4_compress.py").run()
    at.session_state["_auto_eval"] = False
    next(b for b in at.selectbox if b.label == "Pruning metric").set_value("sparsegpt").run()
    button(at, "Evaluate").click().run()
    ok(at)
    warned = at.session_state["last_result"]["second_order"]["warnings"]
    assert warned
    n_experts = len({(w["layer"], w["expert"]) for w in warned})
    assert any(f"{n_experts} expert(s) got fewer routed calibration tokens" in w.value and "damped" in w.value
               for w in at.warning)
    table = next(d.value for d in at.dataframe if "tokens" in d.value.columns)
    assert len(table) == len(warned) and (table["tokens"] < table["columns"]).all()


def test_task_accuracy_on_compress_and_as_the_trade_offs_accuracy_axis_with_paired_comparison():
    """Compress: the task toggle runs the bundled lm-eval tasks (2 items each here) with the plan and shows
    them ± stderr, plus the 95 % intervals; Trade-offs: the accuracy axis offers each task and the task
    average (error bars), and comparing two runs shows their paired differences."""
    pytest.importorskip("lm_eval")
    at = new_app()  # the demo MoE: the bundled items fit its context (the tiny test models' is 64 tokens)
    at.number_input[0].set_value(8)
    at.number_input[1].set_value(32)
    button(at, "Run calibration").click().run()
    at.switch_page("pages/4_compress.py").run()
    ok(at)
    at.session_state["_auto_eval"] = False
    next(t for t in at.toggle if t.label.startswith("Task accuracy")).set_value(True).run()
    next(n for n in at.number_input if n.label.startswith("Items per task")).set_value(2).run()
    at.slider[0].set_value(0.5).run()
    button(at, "Evaluate").click().run()
    ok(at)
    first = at.session_state["last_run_id"]
    table = next(d.value for d in at.dataframe if "task" in d.value.columns)
    assert len(table) == 6 and set(table["n"].iloc[:5]) == {2} and "average of 5 tasks" in list(table["task"])
    assert any("bootstrap over" in c.value for c in at.caption)
    at.slider[0].set_value(0.8).run()
    button(at, "Evaluate").click().run()
    ok(at)
    at.switch_page("pages/5_tradeoffs.py").run()
    ok(at)
    axis = next(s for s in at.selectbox if s.label == "Accuracy")
    assert "task_average" in axis.options or "task average (5 tasks, ± stderr)" in axis.options
    axis.set_value("task_average").run()
    ok(at)
    chart = at.get("plotly_chart")[0].proto.spec
    assert "Task accuracy, average over tasks" in chart and '"error_y"' in chart
    at.session_state["selected_run_id"] = first
    at.run()
    next(s for s in at.selectbox if s.label == "Compare with").set_value(at.session_state["last_run_id"]).run()
    ok(at)
    paired = next(d.value for d in at.dataframe if "verdict" in d.value.columns)
    assert set(paired["metric"]) >= {"perplexity", "accuracy", "mean_kl"}


def test_an_8_bit_plan_is_timed_on_the_packed_kernels_and_measured_latency_is_the_default(tiny_model_dirs):
    at = compress_page(tiny_model_dirs)
    at.session_state["_auto_eval"] = False
    at.slider[0].set_value(0.0)
    next(b for b in at.selectbox if b.label == "Expert weight bits").set_value(8)
    next(b for b in at.selectbox if b.label == "Group size").set_value(-1)
    at.run()
    button(at, "Evaluate").click().run()
    ok(at)
    result = at.session_state["last_result"]
    assert result["latency_measured"]["runtime"] == "packed" and result["packed"]["kernels"] == {"int8 channel": 8}
    assert any("packed low-bit kernels" in c.value for c in at.caption)
    labels = [m.label for m in at.metric]
    assert labels.index("Decode, measured") < next(i for i, l in enumerate(labels) if l.startswith("Decode, projected on"))
    at.switch_page("pages/5_tradeoffs.py").run()
    ok(at)
    assert next(r for r in at.radio if r.label == "Latency").value == "measured_decode_ms"
