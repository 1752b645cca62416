"""Evaluating plans on held-out tokens against the base model, sweeps, and the run store."""

import math

import pytest
import torch
import torch.nn.functional as F

from moeviz.calibration import calibrate
from moeviz.compression import CompressionPlan, PruningSettings, QuantSettings
from moeviz.compression.apply import Compressor
from moeviz.data import tokenize_documents
from moeviz.evaluation import EvalSettings, Evaluator, grid_plans, run_sweep
from moeviz.evaluation.evaluate import _balanced_subset
from moeviz.store import RunStore
from documents import varied_documents

DOCS = varied_documents(30, 20)
FAST = EvalSettings(batch_size=4, record_tokens=128, measure_latency=False)


@pytest.fixture(scope="module")
def setup(loaded_tiny):
    lm = loaded_tiny("mixtral")
    cal = tokenize_documents(DOCS, lm.tokenizer, 8, 16, seed=0)
    held = tokenize_documents(DOCS, lm.tokenizer, 6, 24, seed=5)
    stats = calibrate(lm, cal, batch_size=4)
    return lm, stats, held, Compressor(lm, stats), Evaluator(lm, held, FAST)


def test_perplexity_is_exp_of_mean_cross_entropy_computed_separately(setup):
    lm, _, held, comp, ev = setup
    plan = CompressionPlan(pruning=PruningSettings(metric="wanda", sparsity=0.5))
    cm = comp.apply(plan)
    result = ev.evaluate(cm)
    with torch.no_grad():
        logits = cm.model(input_ids=held.input_ids).logits
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), held.input_ids[:, 1:].reshape(-1))
    assert result.perplexity == pytest.approx(math.exp(float(ce)), rel=1e-5)
    hits = (logits[:, :-1].argmax(-1) == held.input_ids[:, 1:]).float().mean()
    assert result.accuracy == pytest.approx(float(hits))
    code_rows = [i for i, d in enumerate(held.domains) if d == "code"]
    ce_code = F.cross_entropy(logits[code_rows, :-1].reshape(-1, logits.shape[-1]), held.input_ids[code_rows, 1:].reshape(-1))
    assert result.per_domain["code"]["perplexity"] == pytest.approx(math.exp(float(ce_code)), rel=1e-5)


def test_identity_plan_has_no_drift_and_base_figures(setup):
    lm, _, _, comp, ev = setup
    r = ev.evaluate(comp.apply(CompressionPlan()))
    assert r.perplexity == r.base_perplexity and r.accuracy == r.base_accuracy
    for d in r.drift:
        assert d["topk_overlap"] == 1.0 and d["top1_change_rate"] == 0.0 and d["kl"] == pytest.approx(0.0, abs=1e-9)
    for b in r.load_balance:
        assert b["cv_topk"] == pytest.approx(b["base_cv_topk"])
    # Bytes of the tiny fp32 Mixtral (tests/tiny_models.py), counted from its config: vocab 96,
    # hidden 32, 2 layers, 4 heads / 2 KV heads of 8, 4 experts of intermediate 24, untied head.
    V, H, L, E, I = 96, 32, 2, 4, 24
    other = 2 * V * H + L * (H * 32 + 2 * H * 16 + 32 * H + 2 * H) + H  # embed, head, q k v o, norms, final norm
    experts, routers = L * E * (2 * I * H + H * I), L * E * H
    assert (other, experts, routers) == (12448, 18432, 256)
    c = r.compression
    assert (c["other_bytes"], c["experts_base_bytes"], c["router_base_bytes"]) == (4 * other, 4 * experts, 4 * routers)
    assert c["base_bytes"] == c["compressed_bytes"] == 4 * 31136 and c["compression_ratio"] == 1.0
    # Projected bytes per token: one embedding row + everything dense + each expert with probability
    # min(1, k x its share of the routed tokens); the compressed model routes exactly like the base.
    dense = 4 * (other - (V - 1) * H + routers)
    reads = sum(min(1.0, 2 * u) for layer in r.utilization["base"] for u in layer)
    for proj in (r.latency_projected, r.base_latency_projected):
        assert proj["bytes_per_step"] == pytest.approx(dense + reads * 4 * (3 * I * H), rel=1e-9)
    assert r.latency_measured is None  # not requested: never invented


def _router_topk(router, model, samples) -> list[list[int]]:
    """Per token, the router's top-2 experts by logit, highest first (batches of FAST.batch_size)."""
    logits = []
    handle = router.register_forward_hook(
        lambda m, args, out: logits.append(out[0].detach().reshape(-1, out[0].shape[-1])))
    try:
        with torch.no_grad():
            for i in range(0, samples.n_samples, FAST.batch_size):
                model(input_ids=samples.input_ids[i:i + FAST.batch_size], use_cache=False)
    finally:
        handle.remove()
    rows = torch.cat(logits).tolist()
    return [sorted(range(len(row)), key=lambda e: -row[e])[:2] for row in rows]


def test_expert_removal_shows_in_routing_metrics(setup):
    lm, stats, held, comp, ev = setup
    cm = comp.apply(CompressionPlan(removed_experts=[(0, 2)]))
    r = ev.evaluate(cm)
    assert r.utilization["compressed"][0][2] == 0.0
    assert r.drift[0]["topk_overlap"] < 1.0 and r.drift[0]["kl"] > 0
    # Layer 1 keeps its experts but its inputs change: its drift, recomputed here from the router
    # logits of both models (forward hooks, same batches as the evaluation), on the recorded tokens.
    base_top = _router_topk(lm.layers[1].router, lm.model, held)
    comp_top = _router_topk(cm.layers[1].router, cm.model, held)
    n = FAST.record_tokens
    overlap = sum(len(set(a) & set(b)) for a, b in zip(base_top[:n], comp_top[:n])) / (2 * n)
    top1 = sum(a[0] != b[0] for a, b in zip(base_top[:n], comp_top[:n])) / n
    assert overlap < 1.0  # by hand: a few tokens of layer 1 change one of their two experts
    assert r.drift[1]["topk_overlap"] == pytest.approx(overlap, abs=1e-9)
    assert r.drift[1]["top1_change_rate"] == pytest.approx(top1, abs=1e-9)
    base_share = r.utilization["base"][0][2]
    assert r.utilization["shift"][0][2] == pytest.approx(-base_share)
    counts = torch.tensor(r.utilization["compressed"][0])
    active = counts[[0, 1, 3]]
    assert r.load_balance[0]["cv_topk"] == pytest.approx(float(active.std(unbiased=False) / active.mean()), rel=1e-6)


def test_projected_latency_falls_with_bits_and_is_labelled(setup):
    _, _, _, comp, ev = setup
    ms = []
    for bits in (16, 8, 4, 2):
        r = ev.evaluate(comp.apply(CompressionPlan(quant=QuantSettings(bits=bits, group_size=-1))))
        assert r.latency_projected["kind"] == "projected" and r.latency_projected["device"] == "NVIDIA H100 SXM"
        ms.append(r.latency_projected["ms_per_token"])
    assert ms[0] > ms[1] > ms[2] > ms[3]


def test_measured_latency_is_real_and_labelled(loaded_tiny):
    lm = loaded_tiny("mixtral")
    held = tokenize_documents(DOCS, lm.tokenizer, 2, 16, seed=0)
    ev = Evaluator(lm, held, EvalSettings(batch_size=2, record_tokens=16, latency_prompt_tokens=8,
                                          latency_decode_tokens=2, latency_repeats=1))
    r = ev.evaluate(Compressor(lm).apply(CompressionPlan(pruning=PruningSettings(metric="magnitude", sparsity=0.3))))
    for lat in (r.latency_measured, r.base_latency_measured):
        assert lat["kind"] == "measured" and lat["decode_ms_per_token"] > 0 and lat["prefill_tokens_per_s"] > 0


def test_every_evaluation_times_base_and_compressed_back_to_back(loaded_tiny, monkeypatch, tmp_path):
    """Measured latency is never a cached base reading against a later compressed one: each evaluation
    alternates base and compressed generations (ABBA…) in one loop, reports both medians with their
    quartiles and a busy flag, and the run store keeps them (columns + the repeats)."""
    from moeviz import latency_ab
    from moeviz.evaluation.sweep import evaluate_plan

    lm = loaded_tiny("mixtral")
    held = tokenize_documents(DOCS, lm.tokenizer, 2, 16, seed=0)
    ev = Evaluator(lm, held, EvalSettings(batch_size=2, record_tokens=16, latency_prompt_tokens=8,
                                          latency_decode_tokens=2, latency_repeats=4))
    comp = Compressor(lm)
    calls, original = [], latency_ab.timed_generation
    monkeypatch.setattr(latency_ab, "timed_generation",
                        lambda model, *a: calls.append("base" if model is lm.model else "compressed") or original(model, *a))
    store = RunStore(tmp_path / "runs.sqlite")
    for s in (0.3, 0.6):
        calls.clear()
        r, run_id = evaluate_plan(comp, ev, CompressionPlan(pruning=PruningSettings(metric="magnitude", sparsity=s)), store)
        # one warm-up each, then 4 repeats alternating: AB BA AB BA
        assert calls == ["base", "compressed"] + ["base", "compressed", "compressed", "base"] * 2
        ab = r.latency_ab
        assert len(ab["base"]["samples"]) == len(ab["compressed"]["samples"]) == 4
        assert r.latency_measured["decode_ms_per_token"] == ab["compressed"]["median"] == \
            pytest.approx(sorted(ab["compressed"]["samples"])[1:3] and sum(sorted(ab["compressed"]["samples"])[1:3]) / 2)
        assert r.base_latency_measured["decode_ms_per_token"] == ab["base"]["median"]
        assert ab["compressed"]["q1"] <= ab["compressed"]["median"] <= ab["compressed"]["q3"]
        assert isinstance(ab["busy"], bool) and isinstance(ab["spreads_overlap"], bool)
        stored = store.get_run(run_id)
        assert stored.extra["base_measured_decode_ms"] == ab["base"]["median"]
        assert stored.extra["measured_decode_q1_ms"] == ab["compressed"]["q1"]
        assert stored.extra["measured_decode_q3_ms"] == ab["compressed"]["q3"]
        assert stored.extra["latency_busy"] == float(ab["busy"])
        assert stored.metrics["latency_ab"]["compressed"]["samples"] == ab["compressed"]["samples"]


def test_a_repeated_sweep_stores_no_duplicates(setup, tmp_path):
    """A sweep over plans evaluated before (by a sweep or one by one) reuses their runs."""
    from moeviz.evaluation.sweep import evaluate_plan

    lm, _, _, comp, ev = setup
    store = RunStore(tmp_path / "runs.sqlite")
    plans = grid_plans(["magnitude"], [0.25, 0.5], base=CompressionPlan())
    first = run_sweep(comp, ev, plans, store=store)
    assert not first["reused"].any() and len(store.runs()) == 2
    _, single = evaluate_plan(comp, ev, CompressionPlan(pruning=PruningSettings(metric="magnitude", sparsity=0.75)), store)
    again = run_sweep(comp, ev, grid_plans(["magnitude"], [0.25, 0.5, 0.75], base=CompressionPlan()), store=store)
    assert len(store.runs()) == 3  # nothing new stored
    assert list(again["reused"]) == [True, True, True]
    assert list(again["run_id"]) == list(first["run_id"]) + [single]
    assert list(again["perplexity"]) == list(first["perplexity"]) + [store.get_run(single).metrics["perplexity"]]
    fresh = run_sweep(comp, ev, plans[:1], store=store, reuse=False)  # asked for: a new run
    assert len(store.runs()) == 4 and not fresh["reused"].any()


def test_sweep_rows_store_progress_and_cancel(setup, tmp_path):
    lm, stats, _, comp, ev = setup
    plans = grid_plans(["magnitude", "moe_pruner"], [0.25, 0.5], bits=[16, 4], base=CompressionPlan(quant=QuantSettings(group_size=-1)))
    assert len(plans) == 8 and {p.pruning.metric for p in plans} == {"magnitude", "moe_pruner"}
    store = RunStore(tmp_path / "runs.sqlite")
    calls = []
    df = run_sweep(comp, ev, plans, store=store, progress=lambda d, t, row: calls.append((d, t)))
    assert len(df) == 8 and calls[-1] == (8, 8) and not df.attrs["cancelled"]
    stored = store.runs(model_fingerprint=lm.fingerprint, sweep_id=df.attrs["sweep_id"])
    assert sorted(stored["id"]) == sorted(df["run_id"]) and stored["perplexity"].notna().all()
    # More sparsity, fewer bytes; 4-bit rows compress more than 16-bit ones.
    for (method, bits), g in df.groupby(["method", "bits"]):
        assert g.sort_values("sparsity")["compression_ratio"].is_monotonic_increasing
    assert (df[df.bits == 4]["compression_ratio"].min() > df[df.bits == 16]["compression_ratio"].max())
    back = store.get_run(int(df["run_id"].iloc[0]))
    assert CompressionPlan.from_dict(back.plan) == plans[0]
    n = iter(range(100))
    partial = run_sweep(comp, ev, plans, store=store, should_stop=lambda: next(n) >= 3, reuse=False)
    assert len(partial) == 3 and partial.attrs["cancelled"]
    assert len(store.runs(sweep_id=partial.attrs["sweep_id"])) == 3


def test_base_is_evaluated_once(setup, monkeypatch):
    lm, _, held, comp, _ = setup
    calls = []
    ev = Evaluator(lm, held, FAST)
    original = Evaluator._run
    monkeypatch.setattr(Evaluator, "_run", lambda self, loaded, progress=None, **kw: calls.append(loaded) or original(self, loaded, progress, **kw))
    for s in (0.2, 0.4):
        ev.evaluate(comp.apply(CompressionPlan(pruning=PruningSettings(metric="magnitude", sparsity=s))))
    assert len(calls) == 2 and all(c is not lm for c in calls)  # only the two compressed models ran


def test_balanced_subset_keeps_every_domain(loaded_tiny):
    lm = loaded_tiny("mixtral")
    all_windows = tokenize_documents(DOCS, lm.tokenizer, 0, 16, all_windows=True)
    sub = _balanced_subset(all_windows, 4)
    assert sub.n_samples == 4 and sorted(sub.domains) == ["code", "code", "prose", "prose"]
    assert sub.fingerprint != all_windows.fingerprint


def test_failing_latency_measurement_is_isolated(setup, monkeypatch, tmp_path):
    """A model whose cache cannot decode loses only its measured latency: the rest of the evaluation,
    the metrics row, the run store, the trade-off chart and the export report still come back."""
    import pandas as pd

    from moeviz.evaluation import evaluate as ev_module
    from moeviz.export import export_model
    from moeviz.figures import tradeoff_chart

    lm, stats, held, comp, _ = setup

    def broken(*a, **k):
        raise RuntimeError("this cache cannot decode\nsecond line")

    monkeypatch.setattr(ev_module, "interleaved_decode_latency", broken)
    settings = EvalSettings(batch_size=4, record_tokens=64, latency_decode_tokens=1, latency_repeats=1)
    result = Evaluator(lm, held, settings).evaluate(comp.apply(CompressionPlan(pruning=PruningSettings(
        metric="wanda", sparsity=0.5))))
    assert result.latency_measured is None and result.base_latency_measured is None
    assert result.latency_unavailable == "RuntimeError: this cache cannot decode"
    assert result.perplexity > 0 and result.latency_projected["ms_per_token"] > 0
    metrics = result.metrics()
    assert "measured_decode_ms" not in metrics
    store = RunStore(tmp_path / "runs.sqlite")
    from moeviz.store import RunRecord

    run_id = store.add_run(RunRecord(name="no latency", model_fingerprint=lm.fingerprint, metrics=metrics,
                                     plan=result.plan))
    assert store.get_run(run_id).metrics.get("measured_decode_ms") is None
    frame = pd.DataFrame([{**metrics, "measured_decode_ms": None, "name": "r"}])
    tradeoff_chart(frame, latency_col="measured_decode_ms")  # never raises
    out = export_model(lm, comp.apply(CompressionPlan()), tmp_path / "out", result=result.to_dict())
    assert "measured decode latency: unavailable (RuntimeError: this cache cannot decode)" in \
        (out / "moeviz_report.md").read_text()
