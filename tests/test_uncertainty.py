"""Error bars on quality: bootstrap intervals over held-out windows, paired differences, and the per-window
sums an evaluation keeps for them (moeviz.evaluation.uncertainty)."""

import math

import pytest
import torch

from moeviz.data import Document, tokenize_documents
from moeviz.evaluation import EvalSettings, Evaluator
from moeviz.evaluation.metrics import routing_drift
from moeviz.evaluation.uncertainty import (
    bootstrap_counts, drift_windows, paired_differences, per_token_drift, quality_intervals,
)


def _windows(W=12, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(20, 40, (W,), generator=g).double()
    nll = tokens * (2.0 + torch.rand(W, generator=g, dtype=torch.float64)) + shift * tokens
    correct = (tokens * torch.rand(W, generator=g, dtype=torch.float64)).round()
    return dict(nll=nll.tolist(), tokens=tokens.tolist(), correct=correct.tolist())


def _drift(W=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    t = [8.0] * W
    return dict(kl=(torch.rand(W, generator=g, dtype=torch.float64) * 8).tolist(),
                overlap=(torch.rand(W, generator=g, dtype=torch.float64) * 8).tolist(),
                top1_change=(torch.rand(W, generator=g, dtype=torch.float64) * 8).tolist(), tokens=t)


def test_bootstrap_counts_are_seeded_draws_of_every_window():
    c = bootstrap_counts(7, iters=50, seed=3)
    assert c.shape == (50, 7) and torch.all(c.sum(1) == 7) and torch.all(c >= 0)
    assert torch.equal(c, bootstrap_counts(7, iters=50, seed=3)) and not torch.equal(c, bootstrap_counts(7, 50, 4))


def test_interval_is_the_percentile_interval_of_explicitly_resampled_windows():
    """Brute force: resample the window list by hand with the same draws, recompute perplexity as
    exp(Σ nll / Σ tokens) of the drawn windows, take the percentiles."""
    base, comp = _windows(seed=0), _windows(seed=1)
    iv = quality_intervals(dict(base=base, compressed=comp, drift=_drift()), iters=200, seed=5)
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, 12, (200, 12), generator=g)
    reps = []
    for row in idx.tolist():
        nll = sum(comp["nll"][i] for i in row)
        tok = sum(comp["tokens"][i] for i in row)
        reps.append(math.exp(nll / tok))
    lo, hi = torch.quantile(torch.tensor(reps, dtype=torch.float64), torch.tensor([0.025, 0.975], dtype=torch.float64))
    assert iv["perplexity"]["lo"] == pytest.approx(float(lo), rel=1e-12)
    assert iv["perplexity"]["hi"] == pytest.approx(float(hi), rel=1e-12)
    assert iv["perplexity"]["value"] == pytest.approx(math.exp(sum(comp["nll"]) / sum(comp["tokens"])), rel=1e-12)
    assert iv["accuracy"]["value"] == pytest.approx(sum(comp["correct"]) / sum(comp["tokens"]))
    assert iv["mean_kl"]["value"] == pytest.approx(sum(_drift()["kl"]) / sum(_drift()["tokens"]))
    for k in ("perplexity", "accuracy", "base_perplexity", "base_accuracy", "mean_kl", "mean_topk_overlap"):
        assert iv[k]["lo"] <= iv[k]["value"] <= iv[k]["hi"], k
    assert iv["settings"]["n_windows"] == 12 and iv["settings"]["seed"] == 5


def test_paired_figures_cancel_shared_noise():
    """Same windows on both sides: the paired change is exactly 0 with a zero-width interval; a uniform
    shift of every window's loss is beyond noise, though the unpaired intervals overlap."""
    base = _windows(seed=0)
    same = quality_intervals(dict(base=base, compressed=base, drift={}), iters=300)
    assert same["perplexity_increase"]["lo"] == same["perplexity_increase"]["hi"] == 0.0
    assert same["accuracy_change"] == dict(value=0.0, lo=0.0, hi=0.0)
    worse = _windows(seed=0, shift=0.02)
    iv = quality_intervals(dict(base=base, compressed=worse, drift={}), iters=300)
    assert iv["perplexity_increase"]["lo"] > 0
    assert iv["perplexity"]["lo"] < iv["base_perplexity"]["hi"]  # the unpaired intervals overlap

    a = dict(fingerprint="f", compressed=base, drift=_drift())
    rows = {r["metric"]: r for r in paired_differences(a, a, iters=300)}
    assert all(r["difference"] == 0 and not r["beyond_noise"] for r in rows.values())
    rows = {r["metric"]: r for r in paired_differences(a, dict(fingerprint="f", compressed=worse, drift=_drift()), 300)}
    assert rows["perplexity"]["beyond_noise"] and rows["perplexity"]["lo"] > 0
    assert not rows["mean_kl"]["beyond_noise"] and not rows["accuracy"]["beyond_noise"]
    with pytest.raises(ValueError, match="same held-out windows"):
        paired_differences(a, dict(a, fingerprint="other"))


def test_per_token_drift_means_are_routing_drift():
    g = torch.Generator().manual_seed(0)
    N, E, k = 40, 6, 2
    pb = torch.softmax(torch.randn(N, E, generator=g), -1)
    pc = torch.softmax(torch.randn(N, E, generator=g), -1)
    tb, tc = pb.topk(k).indices, pc.topk(k).indices
    ref = routing_drift(tb, tc, pb, pc, tb[:, 0], tc[:, 0])
    per = per_token_drift(tb, tc, pb, pc, tb[:, 0], tc[:, 0])
    assert float(per["overlap"].mean()) == pytest.approx(ref.topk_overlap)
    assert float(per["top1_change"].mean()) == pytest.approx(ref.top1_change_rate)
    assert float(per["kl"].mean()) == pytest.approx(ref.kl)
    # Two layers, windows of 16 tokens (the last one partial): Σ / tokens = mean over layers of layer means.
    per2 = per_token_drift(tc, tb, pc, pb, tc[:, 0], tb[:, 0])
    w = drift_windows([per, per2], 16)
    assert w["tokens"] == [16.0, 16.0, 8.0]
    assert sum(w["kl"]) / sum(w["tokens"]) == pytest.approx((float(per["kl"].mean()) + float(per2["kl"].mean())) / 2)


def test_evaluation_keeps_windows_that_give_its_figures_and_intervals(loaded_tiny):
    lm = loaded_tiny("mixtral")
    docs = [Document("The quick brown fox jumps over the lazy dog. " * 30, "prose"),
            Document("def add(a, b):\n    return a + b\n" * 30, "code")]
    held = tokenize_documents(docs, lm.tokenizer, 6, 24, seed=5)
    from moeviz.compression import CompressionPlan, PruningSettings
    from moeviz.compression.apply import Compressor

    ev = Evaluator(lm, held, EvalSettings(batch_size=4, record_tokens=100, measure_latency=False))
    r = ev.evaluate(Compressor(lm, None).apply(CompressionPlan(pruning=PruningSettings(metric="magnitude", sparsity=0.6))))
    w = r.windows
    assert len(w["compressed"]["tokens"]) == held.n_samples and sum(w["compressed"]["tokens"]) == held.n_samples * 23
    assert math.exp(sum(w["compressed"]["nll"]) / sum(w["compressed"]["tokens"])) == pytest.approx(r.perplexity)
    assert sum(w["base"]["correct"]) / sum(w["base"]["tokens"]) == pytest.approx(r.base_accuracy)
    assert sum(w["drift"]["tokens"]) == 100 and len(w["drift"]["tokens"]) == math.ceil(100 / 24)
    mean_kl = sum(d["kl"] for d in r.drift) / len(r.drift)
    assert sum(w["drift"]["kl"]) / 100 == pytest.approx(mean_kl)
    m = r.metrics()
    for k in ("perplexity", "accuracy", "mean_kl"):
        assert m[f"{k}_lo"] <= m[k] <= m[f"{k}_hi"]
    assert r.intervals["perplexity"]["value"] == pytest.approx(r.perplexity)
