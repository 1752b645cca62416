"""Plan editing: moeviz.compression.table (typed ratios, N:M notes, bulk edits), moeviz.compression.preview (the
plan's bytes without compressing) and moeviz.latency_ab (back-to-back timing, its verdict)."""

import pytest

from moeviz.compression.plan import CompressionPlan, Override, PruningSettings
from moeviz.compression.table import (
    apply_table_edits, format_ratio, ignored_override_note, overridden_cells, parse_ratio, prune_below_utilization,
    set_layer,
)
from moeviz.errors import PlanError


@pytest.mark.parametrize("text,value", [("50 %", 0.5), ("50%", 0.5), (" 12.5 % ", 0.125), ("0.5", 0.5), (0.25, 0.25),
                                        ("0", 0.0), ("0,3", 0.3)])
def test_ratios_accept_percent_and_fractions(text, value):
    assert parse_ratio(text) == pytest.approx(value)


@pytest.mark.parametrize("text,message", [("50", "write 50 %"), ("1", "outside"), ("100 %", "outside"),
                                          ("-5 %", "outside"), ("half", "not a ratio"), (1.5, "outside")])
def test_out_of_range_ratios_are_refused_with_a_message(text, message):
    with pytest.raises(PlanError, match=message):
        parse_ratio(text)


def rows(sparsity=0.4375):
    return [dict(layer=0, expert=e, utilization=u, mean_gate=0.5, sparsity=sparsity, bits=16, remove=False)
            for e, u in enumerate([0.05, 0.4, 0.02, 0.53])]


def test_table_text_cells_unchanged_text_is_no_edit_and_typed_percent_is():
    before = rows()
    shown = [{**r, "sparsity": format_ratio(r["sparsity"])} for r in before]
    assert shown[0]["sparsity"] == "43.75 %"
    assert apply_table_edits(CompressionPlan(), before, shown).overrides == []  # rounding never makes an override
    after = [dict(r) for r in shown]
    after[1]["sparsity"] = "80 %"
    plan = apply_table_edits(CompressionPlan(), before, after)
    assert [(o.layer, o.expert, o.sparsity) for o in plan.overrides] == [(0, 1, 0.8)]
    after[1]["sparsity"] = "80"
    with pytest.raises(PlanError, match="layer 0 expert 1.*write 80 %"):
        apply_table_edits(CompressionPlan(), before, after)
    numeric = [dict(r) for r in before]
    numeric[2]["sparsity"] = 50.0  # a number out of range is refused too, never clamped
    with pytest.raises(PlanError, match="outside"):
        apply_table_edits(CompressionPlan(), before, numeric)


def test_n_m_note_names_overrides_it_does_not_use():
    plan = CompressionPlan(pruning=PruningSettings(structure="2:4"),
                           overrides=[Override(0, 1, sparsity=0.3), Override(1, 2, sparsity=0.0), Override(1, 3, bits=4)])
    note = ignored_override_note(plan)
    assert note and "1 override(s)" in note and "layer 0 expert 1" in note and "unstructured" in note
    plan.pruning.structure = "unstructured"
    assert ignored_override_note(plan) is None


def test_bulk_set_layer_and_prune_below_utilization():
    plan = CompressionPlan(overrides=[Override(0, 1, sparsity=0.2, bits=4), Override(1, 0, sparsity=0.1)])
    new = set_layer(plan, 0, sparsity=0.6)
    assert {(o.layer, o.expert): (o.sparsity, o.bits) for o in new.overrides} == {
        (0, 1): (None, 4), (1, 0): (0.1, None), (0, None): (0.6, None)}
    assert plan.overrides[0].sparsity == 0.2  # the original is not modified
    new, n = prune_below_utilization(CompressionPlan(), rows(), 0.1, 0.7)
    assert n == 2 and {(o.expert, o.sparsity) for o in new.overrides} == {(0, 0.7), (2, 0.7)}
    assert overridden_cells(new) == {(0, 0): {"sparsity"}, (0, 2): {"sparsity"}}


def test_plan_storage_matches_the_applied_model(loaded_tiny):
    from moeviz.compression.apply import Compressor
    from moeviz.compression.preview import expert_bytes, plan_storage

    lm = loaded_tiny("mixtral")
    comp = Compressor(lm)
    plan = CompressionPlan(pruning=PruningSettings(metric="magnitude", sparsity=0.5), removed_experts=[(0, 1)],
                           overrides=[Override(1, 2, bits=4)])
    plan.quant.group_size = -1
    assert plan_storage(comp, plan).summary() == comp.apply(plan).storage.summary()
    sizes = expert_bytes(plan_storage(comp, plan))
    assert sizes[(0, 1)] == 0 and sizes[(1, 2)] < sizes[(1, 3)]


def test_run_facets_filters_and_diffs():
    import pandas as pd

    from moeviz.compression.plan import QuantSettings
    from moeviz.runview import filter_runs, metric_diff, plan_diff, with_facets

    p1 = CompressionPlan(pruning=PruningSettings(metric="wanda", sparsity=0.5))
    p2 = CompressionPlan(pruning=PruningSettings(metric="magnitude", sparsity=0.5, structure="2:4"),
                         quant=QuantSettings(bits=4), removed_experts=[(0, 1)])
    df = with_facets(pd.DataFrame({"id": [1, 2], "sweep_id": ["s1", None], "tags": ["keep, paper", None],
                                   "plan_json": [p1.to_json(), p2.to_json()]}))
    assert list(df["method"]) == ["wanda", "magnitude"] and list(df["bits"]) == [16, 4]
    assert list(filter_runs(df, bits=[4])["id"]) == [2]
    assert list(filter_runs(df, tags=["paper"])["id"]) == [1]
    assert list(filter_runs(df, structures=["2:4"], methods=["magnitude"])["id"]) == [2]
    assert list(filter_runs(df, sweeps=["s1"])["id"]) == [1] and len(filter_runs(df)) == 2
    diff = {r["setting"]: (r["a"], r["b"]) for r in plan_diff(p1.to_dict(), p2.to_dict())}
    assert diff["pruning.metric"] == ('"wanda"', '"magnitude"') and diff["quant.bits"] == ("16", "4")
    assert "removed_experts" in diff and "pruning.sparsity" not in diff
    rows = metric_diff({"perplexity": 10.0, "accuracy": 0.5}, {"perplexity": 12.5, "accuracy": None})
    assert rows == [{"metric": "perplexity", "a": 10.0, "b": 12.5, "b − a": 2.5}]


def test_interleaved_latency_summary_overlap_and_busy_notes():
    from moeviz.latency_ab import compare, verdict

    ab = compare([10.0, 10.2, 9.9, 10.1], [5.0, 5.1, 4.9, 5.0], load_before=0.1, cpus=4)
    assert ab["base"]["median"] == pytest.approx(10.05) and ab["compressed"]["q1"] <= 5.0 <= ab["compressed"]["q3"]
    assert not ab["spreads_overlap"] and not ab["busy"] and ab["speedup"] == pytest.approx(2.01, rel=1e-2)
    ab = compare([10.0, 11.0, 9.0, 10.5], [10.2, 9.8, 10.9, 9.5], load_before=7.5, cpus=4)
    assert ab["spreads_overlap"] and ab["busy"] and "load average" in ab["busy_reason"]
    ab.update(repeats=4)
    assert "within this machine's noise" in verdict(ab) and "busy" in verdict(ab)


def test_interleaved_latency_on_a_tiny_model(loaded_tiny):
    from moeviz.compression.apply import Compressor
    from moeviz.latency_ab import interleaved_decode_latency

    lm = loaded_tiny("mixtral")
    compressed = Compressor(lm).apply(CompressionPlan(pruning=PruningSettings(metric="magnitude", sparsity=0.5)))
    calls = []
    ab = interleaved_decode_latency(lm.model, compressed.model, torch_ids(), decode_tokens=2, repeats=3,
                                    progress=lambda r, n: calls.append(r))
    assert calls == [1, 2, 3] and len(ab["base"]["samples"]) == len(ab["compressed"]["samples"]) == 3
    assert all(v > 0 for v in ab["base"]["samples"] + ab["compressed"]["samples"])


def torch_ids():
    import torch

    return torch.arange(1, 9)


def test_quality_proxy_is_the_gate_weighted_reconstruction_error_computed_by_hand(loaded_tiny):
    """layer_errors = Σ_e Σ_p Σ_{r,j} (W − Ŵ)[r,j]² m[e,j] / Σ (W)[r,j]² m[e,j], m the gate-weighted input
    second moments; recomputed here with plain loops over experts, rows and columns of layer 0."""
    from moeviz.calibration import calibrate
    from moeviz.compression.apply import Compressor
    from moeviz.compression.proxy import layer_errors
    from moeviz.data import Document, tokenize_documents

    lm = loaded_tiny("mixtral")
    docs = [Document("The quick brown fox jumps over the lazy dog. " * 40, "prose")]
    stats = calibrate(lm, tokenize_documents(docs, lm.tokenizer, 6, 16, seed=0), batch_size=3)
    comp = Compressor(lm, stats)
    plan = CompressionPlan(pruning=PruningSettings(metric="wanda", sparsity=0.5), removed_experts=[(1, 2)])
    c = comp.apply(plan)
    errors = layer_errors(lm.layers, c.layers, stats)
    lb, lc, st = lm.layers[0], c.layers[0], stats.layers[0]
    err = tot = 0.0
    for p in lb.projections():
        m = st.down_sq_weighted if p == "down" else st.input_sq_weighted
        W, Wc = lb.weight(p), lc.weight(p)
        for e in range(lb.num_experts):
            for r in range(W.shape[1]):
                for j in range(W.shape[2]):
                    err += float(W[e, r, j] - Wc[e, r, j]) ** 2 * float(m[e, j])
                    tot += float(W[e, r, j]) ** 2 * float(m[e, j])
    assert errors[0] == pytest.approx(err / tot, rel=1e-9)
    assert 0 < errors[0] < 1 and errors[1] > errors[0] * 0.5  # layer 1 also lost a whole expert
    assert layer_errors(lm.layers, comp.apply(CompressionPlan()).layers, stats) == [0.0, 0.0]
    more = layer_errors(lm.layers, comp.apply(CompressionPlan(pruning=PruningSettings(metric="wanda", sparsity=0.8))).layers, stats)
    assert more[0] > errors[0]


def test_runs_csv_and_report_use_the_app_units():
    """CSV: shares in % and units in every header; report: % accuracy, µs / ms by magnitude, the back-to-back
    spread and the busy / overlap notes."""
    import io
    import json

    import pandas as pd

    from moeviz.export import evaluation_lines

    def report(result):
        return "\n".join(evaluation_lines(result))
    from moeviz.runview import runs_csv

    df = pd.DataFrame({"id": [3], "name": ["r"], "plan_json": [json.dumps({"pruning": {"metric": "wanda", "sparsity": 0.5}})],
                       "accuracy": [0.4123], "mean_topk_overlap": [0.9], "measured_decode_ms": [1.5],
                       "details.perplexity": [9.0], "perplexity": [9.0]})
    back = pd.read_csv(io.StringIO(runs_csv(df)))
    assert back.loc[0, "next-token accuracy (%)"] == pytest.approx(41.23)
    assert back.loc[0, "top-k overlap with base (%)"] == pytest.approx(90.0)
    assert back.loc[0, "sparsity (%)"] == pytest.approx(50.0) and back.loc[0, "method"] == "wanda"
    assert back.loc[0, "decode, measured median (ms/token)"] == 1.5
    assert not any(c.startswith("details.") for c in back.columns)
    lat = dict(decode_ms_per_token=0.0123, interleaved=True, repeats=5, decode_q1_ms=0.011, decode_q3_ms=0.014,
               device="cpu")
    text = report(dict(perplexity=9.0, base_perplexity=8.0, accuracy=0.4123, base_accuracy=0.45,
                       latency_projected=dict(ms_per_token=0.0016, device="NVIDIA H100 SXM"),
                       latency_measured=lat, base_latency_measured=dict(decode_ms_per_token=2.5),
                       latency_ab=dict(spreads_overlap=True, busy=True, busy_reason="load average 5.0 on 2 CPUs")))
    assert "41.23 % (base 45.00 %)" in text and "1.6 µs per token" in text and "12.3 µs per token" in text
    assert "IQR 11 µs–14 µs" in text and "base 2.5 ms" in text and "no measurable difference" in text
    assert "machine was busy (load average 5.0 on 2 CPUs)" in text


def test_apply_reports_progress_per_layer_for_an_eta(loaded_tiny):
    """A sequential plan re-calibrates before each layer: apply says after each layer how far it is, so the
    app can show layer i/L and an ETA (and its Stop button stays responsive)."""
    from moeviz.calibration import calibrate
    from moeviz.compression.apply import Compressor
    from moeviz.data import Document, tokenize_documents

    lm = loaded_tiny("mixtral")
    samples = tokenize_documents([Document("The quick brown fox jumps over the lazy dog. " * 40, "prose")],
                                 lm.tokenizer, 4, 16, seed=0)
    stats = calibrate(lm, samples, batch_size=2)
    calls = []
    Compressor(lm, stats).apply(CompressionPlan(pruning=PruningSettings(metric="wanda", sparsity=0.5), sequential=True),
                                samples, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(i + 1, len(lm.layers)) for i in range(len(lm.layers))]


def test_interleaved_latency_alternates_abba_and_its_statistics_match_a_brute_force(monkeypatch):
    """The timing loop calls base and compressed as AB BA AB … after one warm-up each (recorded by a fake
    `timed_generation`); medians and quartiles are numpy's (linear interpolation = 'inclusive' quartiles)."""
    import numpy as np
    import torch

    import moeviz.latency_ab as lab

    class Fake(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name, self.w = name, torch.nn.Parameter(torch.zeros(1))

    calls, clock = [], iter(range(1, 1000))
    decode_s = {"base": [0.010, 0.013, 0.011, 0.020, 0.012, 0.009, 0.030],
                "compressed": [0.005, 0.004, 0.007, 0.006, 0.005, 0.011, 0.004]}

    def fake_generate(model, ids, n, device):
        calls.append(model.name)
        if len(calls) <= 2:  # the warm-ups
            return 0.0, 1.0
        k = sum(c == model.name for c in calls[2:]) - 1
        return 0.001 * next(clock), decode_s[model.name][k] * n

    monkeypatch.setattr(lab, "timed_generation", fake_generate)
    ab = lab.interleaved_decode_latency(Fake("base"), Fake("compressed"), torch.arange(4), decode_tokens=4, repeats=7)
    assert calls[:2] == ["base", "compressed"]
    pairs = [tuple(calls[i:i + 2]) for i in range(2, len(calls), 2)]
    assert pairs == [("base", "compressed") if r % 2 == 0 else ("compressed", "base") for r in range(7)]
    for k in ("base", "compressed"):
        ms = np.array(decode_s[k]) * 1e3
        assert ab[k]["samples"] == pytest.approx(ms.tolist())
        assert ab[k]["median"] == pytest.approx(np.median(ms))
        assert (ab[k]["q1"], ab[k]["q3"]) == pytest.approx((np.percentile(ms, 25), np.percentile(ms, 75)))
        assert (ab[k]["min"], ab[k]["max"]) == pytest.approx((ms.min(), ms.max()))
    b, c = ab["base"], ab["compressed"]
    assert ab["spreads_overlap"] == (not (c["q3"] < b["q1"] or b["q3"] < c["q1"]))
    assert ab["speedup"] == pytest.approx(b["median"] / c["median"])


@pytest.mark.parametrize("module", ["moeviz.latency_ab", "moeviz.evaluation.evaluate", "moeviz.compression.proxy"])
def test_modules_import_first_in_a_fresh_interpreter(module):
    """No import cycle: each module imports on its own (latency_ab -> evaluation -> evaluate -> latency_ab)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-500:]


def test_back_to_back_latency_is_measured_on_an_offloaded_model(tiny_model_dirs, tmp_path):
    """Offloaded parameters are meta placeholders: the timing loop must run on the hooks' execution device
    (it failed with 'Cannot copy out of meta tensor' and the evaluation said latency unavailable)."""
    from moeviz.compression.apply import Compressor
    from moeviz.data import Document, tokenize_documents
    from moeviz.evaluation import EvalSettings, Evaluator
    from moeviz.models import load_model

    lm = load_model(tiny_model_dirs["mixtral"], max_memory={"cpu": "60KB"}, offload_folder=tmp_path / "offload")
    samples = tokenize_documents([Document("The quick brown fox jumps over the lazy dog. " * 20, "prose")],
                                 lm.tokenizer, 2, 16)
    ev = Evaluator(lm, samples, EvalSettings(measure_latency=True, latency_repeats=2, latency_decode_tokens=2,
                                             latency_prompt_tokens=8))
    r = ev.evaluate(Compressor(lm).apply(CompressionPlan(pruning=PruningSettings(metric="magnitude", sparsity=0.5))))
    assert r.latency_unavailable is None
    assert r.latency_measured["decode_ms_per_token"] > 0 and r.base_latency_measured["decode_ms_per_token"] > 0


def test_busy_check_counts_the_cpus_this_process_may_use(monkeypatch, tmp_path):
    """Affinity set, capped by the cgroup v2 quota (cpu.max), not os.cpu_count() of the host."""
    import os

    import moeviz.latency_ab as lab

    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert lab.available_cpus(tmp_path) == 4  # no cpu.max: the affinity set
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert lab.available_cpus(tmp_path) == 4
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs -> 2
    assert lab.available_cpus(tmp_path) == 2
    (tmp_path / "cpu.max").write_text("800000 100000\n")  # quota above the affinity set
    assert lab.available_cpus(tmp_path) == 4
    monkeypatch.setattr(lab, "available_cpus", lambda: 2)
    ab = lab.compare([10.0, 10.1], [5.0, 5.1], load_before=3.0)  # busy on 2 CPUs, idle on 64
    assert ab["cpus"] == 2 and ab["busy"] and "on 2 CPUs" in ab["busy_reason"]
