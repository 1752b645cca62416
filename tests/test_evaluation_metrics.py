"""Tests of moeviz.evaluation (metrics, latency, Pareto). Fast: the only model is a tiny random Mixtral.

Expected values are computed independently: by hand in the comments, with plain Python loops or
with torch.nn.functional.cross_entropy, never by calling the code under test twice.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from moeviz.compression import storage_for
from moeviz.evaluation import metrics
from moeviz.evaluation import (
    ACCELERATORS,
    TokenLossAccumulator,
    accuracy,
    active_bytes_per_token,
    active_flops_per_token,
    compression_summary,
    load_balance_cv,
    mark_pareto,
    measure_latency,
    pareto_front,
    perplexity_from_nll,
    projected_decode_latency,
    routing_drift,
    routing_drift_per_layer,
    utilization_shift,
)

# -- routing drift ---------------------------------------------------------------------------------


def test_identical_routing_has_no_drift():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(50, 8), -1)
    probs[:, 3] = 0  # a removed expert in both: still identical, KL must be exactly 0, not nan
    probs = probs / probs.sum(-1, keepdim=True)
    topk = probs.topk(2, -1).indices
    # The same experts listed in the other order (as unsorted routers return them): the overlap is a
    # set overlap, so still 1; the top-1 ids are passed explicitly, as for such routers.
    d = routing_drift(topk, topk.flip(-1), probs, probs.clone(), base_top1=topk[:, 0], comp_top1=topk[:, 0])
    assert not torch.equal(topk, topk.flip(-1))
    assert d.topk_overlap == 1.0
    assert d.top1_change_rate == 0.0
    assert abs(d.kl) < 1e-12
    assert d.n_tokens == 50 and d.k == 2
    json.dumps(dataclasses.asdict(d))


def test_known_permutation_drift():
    base = torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3]])
    comp = torch.tensor([[1, 0], [2, 0], [3, 1], [1, 3]])
    # overlaps: {0,1}&{1,0}=2/2, {2,3}&{2,0}=1/2, {0,2}&{3,1}=0/2, {1,3}&{1,3}=2/2 -> mean 2.5/4
    # top-1 (first column): 0->1 changed, 2->2, 0->3 changed, 1->1 -> 2/4
    p_row = [0.4, 0.3, 0.2, 0.1]
    q_row = [0.1, 0.2, 0.3, 0.4]
    p = torch.tensor([p_row] * 4)
    q = torch.tensor([q_row] * 4)
    d = routing_drift(base, comp, p, q)
    assert d.topk_overlap == pytest.approx(0.625)
    assert d.top1_change_rate == pytest.approx(0.5)
    # KL = 0.4 ln 4 + 0.3 ln 1.5 + 0.2 ln(2/3) + 0.1 ln(1/4) = 0.3 ln 4 + 0.1 ln 1.5 (no clamp active)
    expected_kl = 0.3 * math.log(4) + 0.1 * math.log(1.5)
    assert d.kl == pytest.approx(expected_kl, rel=1e-6)

    # Explicit top-1 ids (unsorted routers) override the first column: only token 2 changes.
    d2 = routing_drift(base, comp, p, q, base_top1=torch.tensor([0, 2, 0, 1]), comp_top1=torch.tensor([0, 2, 3, 1]))
    assert d2.top1_change_rate == pytest.approx(0.25)


def test_removed_expert_kl_is_finite_and_uses_epsilon():
    eps = 1e-6
    p = torch.tensor([[0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    q = torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0.0]], dtype=torch.float64)
    d = routing_drift(torch.tensor([[0, 3]]), torch.tensor([[0, 1]]), p, q, eps=eps)
    # q clamped to [1/3, 1/3, 1/3, eps] and renormalised by (1 + eps); p unchanged.
    z = 1 + eps
    expected = 3 * 0.25 * math.log(0.25 / ((1 / 3) / z)) + 0.25 * math.log(0.25 / (eps / z))
    assert math.isfinite(d.kl)
    assert d.kl == pytest.approx(expected, rel=1e-9)
    assert d.topk_overlap == pytest.approx(0.5)


def test_routing_drift_per_layer():
    t = torch.tensor([[0, 1]])
    p = torch.tensor([[0.5, 0.5, 0.0]])
    rows = routing_drift_per_layer([t, t], [t, torch.tensor([[2, 1]])], [p, p], [p, p])
    assert [r["layer"] for r in rows] == [0, 1]
    assert rows[0]["topk_overlap"] == 1.0 and rows[1]["topk_overlap"] == 0.5
    assert rows[1]["top1_change_rate"] == 1.0
    json.dumps(rows)


# -- load balance ----------------------------------------------------------------------------------


def test_load_balance_cv_by_hand():
    # [1,2,3,4]: mean 2.5, squared deviations 2.25+0.25+0.25+2.25 = 5, population var 5/4
    assert load_balance_cv([1, 2, 3, 4]) == pytest.approx(math.sqrt(5 / 4) / 2.5)
    assert load_balance_cv(torch.tensor([5, 5, 5])) == 0.0
    assert load_balance_cv([0, 0]) == 0.0
    # Survivors [4, 4, 8]: mean 16/3, deviations -4/3, -4/3, 8/3 -> var (16+16+64)/9/3 = 96/27
    counts = torch.tensor([4, 0, 4, 8])
    mask = torch.tensor([True, False, True, True])
    assert load_balance_cv(counts, active_mask=mask) == pytest.approx(math.sqrt(96 / 27) / (16 / 3))
    # Counting the removed expert's zero would report more imbalance.
    assert load_balance_cv(counts) > load_balance_cv(counts, active_mask=mask)


def test_utilization_shift():
    shift = utilization_shift([2, 2, 4], torch.tensor([0, 4, 4]))
    # base shares [.25, .25, .5], compressed [0, .5, .5]
    assert shift.tolist() == pytest.approx([-0.25, 0.25, 0.0])
    # Different totals (e.g. a different number of eval tokens): each side is divided by its own
    # total. Base [1, 1, 2] -> [.25, .25, .5]; compressed [0, 3, 9] -> [0, .25, .75].
    assert utilization_shift([1, 1, 2], [0, 3, 9]).tolist() == pytest.approx([-0.25, 0.0, 0.25])


# -- perplexity and accuracy -----------------------------------------------------------------------


@pytest.mark.parametrize("chunk_rows", [None, 1, 4])
def test_perplexity_and_accuracy_match_cross_entropy(chunk_rows, monkeypatch):
    """chunk_rows: rows of logits per chunk in `add` (None: the default, one chunk here; 4: chunks that
    straddle sequences of 6 positions)."""
    if chunk_rows is not None:
        monkeypatch.setattr(metrics, "LOSS_CHUNK_ELEMENTS", chunk_rows * 11)
    torch.manual_seed(1)
    V = 11
    batches = []
    for _ in range(2):
        logits = torch.randn(3, 6, V) * 3
        labels = torch.randint(0, V, (3, 6))
        batches.append((logits, labels))
    batches[0][1][1, 4] = -100  # a padded position is skipped
    # Make some predictions right so accuracy is not trivially 0.
    batches[1][1][0, 1:] = batches[1][0][0, :-1].argmax(-1)
    domains = [["a", "b", "a"], ["b", "b", "a"]]

    acc = TokenLossAccumulator()
    for (logits, labels), doms in zip(batches, domains):
        acc.add(logits, labels, doms)
    res = acc.result()

    # Independent computation: shift by hand, one flat cross-entropy over all valid tokens.
    flat_logits = torch.cat([lg[:, :-1].reshape(-1, V) for lg, _ in batches])
    flat_labels = torch.cat([lb[:, 1:].reshape(-1) for _, lb in batches])
    keep = flat_labels != -100
    ce = F.cross_entropy(flat_logits[keep].double(), flat_labels[keep])
    assert res["perplexity"] == pytest.approx(math.exp(ce.item()), rel=1e-6)
    assert res["n_tokens"] == int(keep.sum()) == 2 * 3 * 5 - 1
    correct = sum(
        int(lg[b, t].argmax()) == int(lb[b, t + 1])
        for lg, lb in batches for b in range(3) for t in range(5) if int(lb[b, t + 1]) != -100
    )
    assert correct >= 5
    assert res["accuracy"] == pytest.approx(correct / res["n_tokens"])

    # Per domain: sequences of domain "a" only.
    for name in ("a", "b"):
        seqs = [(lg[b], lb[b]) for (lg, lb), doms in zip(batches, domains) for b in range(3) if doms[b] == name]
        lg = torch.cat([s[0][:-1] for s in seqs])
        lb = torch.cat([s[1][1:] for s in seqs])
        m = lb != -100
        expected = math.exp(F.cross_entropy(lg[m].double(), lb[m]).item())
        assert res["per_domain"][name]["perplexity"] == pytest.approx(expected, rel=1e-6)
    json.dumps(res)


def test_domain_ids_map_to_names_and_scalar_helpers():
    acc = TokenLossAccumulator(domain_names=["web", "code"])
    acc.add(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), torch.tensor([1, 1]))
    res = acc.result()
    assert set(res["per_domain"]) == {"code"}
    # uniform logits over 4 classes -> perplexity 4; argmax of ties is class 0 = label -> all correct
    assert res["perplexity"] == pytest.approx(4.0)
    assert res["accuracy"] == 1.0
    assert perplexity_from_nll(2 * math.log(3), 2) == pytest.approx(3.0)
    assert accuracy(3, 4) == 0.75
    with pytest.raises(ValueError):
        perplexity_from_nll(1.0, 0)


# -- compression summary ---------------------------------------------------------------------------


def test_compression_summary_hand_computed():
    shape = (8, 16)  # 128 weights, fp16 -> 256 dense bytes
    dense = storage_for(shape, dtype_bytes=2)
    q4 = storage_for(shape, dtype_bytes=2, bits=4, group_size=16)
    removed = storage_for(shape, dtype_bytes=2, removed=True)
    sparse = storage_for(shape, dtype_bytes=2, sparsity=0.5, structure="unstructured")
    # By hand: 4-bit = 128*4/8 = 64 value bytes + 8 rows x 1 group x 2-byte scale = 80
    #          50% bitmask = 64 kept x 2 bytes + 128/8 mask bytes = 144
    assert (dense.bytes, q4.bytes, removed.bytes, sparse.bytes) == (256, 80, 0, 144)
    s = compression_summary([dense, q4, removed, sparse], other_params_bytes=1000)
    assert s["experts_dense_bytes"] == 1024 and s["experts_bytes"] == 480
    assert s["experts_compression_ratio"] == pytest.approx(1024 / 480)
    assert s["compression_ratio"] == pytest.approx((1024 + 1000) / (480 + 1000))
    assert s["parameter_bytes"] == 1480
    assert s["format_counts"] == {"dense": 2, "removed": 1, "bitmask": 1}  # quantized dense is "dense"
    json.dumps(s)
    assert compression_summary([removed], 10)["experts_compression_ratio"] is None


# -- latency ---------------------------------------------------------------------------------------


def test_active_bytes_and_flops_by_hand():
    util = [[0.5, 0.25, 0.25, 0.0]]
    # k=2: P(chosen) = min(1, 2u) = [1, .5, .5, 0] -> 100 + 100 + 150 = 350, + 50 dense
    assert active_bytes_per_token([[100, 200, 300, 400]], 2, util, 50) == pytest.approx(400)
    # counts instead of shares give the same result (normalised)
    assert active_bytes_per_token([[100, 200, 300, 400]], [2], [[2, 1, 1, 0]], 50) == pytest.approx(400)
    # batch 2: 1 - (1 - p)^2 = [1, .75, .75, 0] -> 100 + 150 + 225 + 50
    assert active_bytes_per_token([[100, 200, 300, 400]], 2, util, 50, batch_size=2) == pytest.approx(525)
    # flops: 2 x (5 + 10 x (1 + .5 + .5))
    assert active_flops_per_token([[10, 10, 10, 10]], 2, util, 5) == pytest.approx(50)


def test_projected_latency_roofline_by_hand():
    h100 = ACCELERATORS["NVIDIA H100 SXM"]
    mem = projected_decode_latency(3.35e12, 1.0, h100)  # 3.35 TB at 3350 GB/s = 1 s
    assert mem.ms_per_token == pytest.approx(1000.0) and mem.bound == "memory"
    comp = projected_decode_latency(1.0, 2 * 989.4e12, "NVIDIA H100 SXM")  # 2 s of peak compute
    assert comp.ms_per_token == pytest.approx(2000.0) and comp.bound == "compute"
    assert mem.kind == comp.kind == "projected" and "projected" in mem.label()
    json.dumps(dataclasses.asdict(mem))
    for a in ACCELERATORS.values():
        assert a.source and a.memory_bandwidth_gbs > 0 and a.peak_tflops > 0


@pytest.mark.parametrize("device", sorted(ACCELERATORS))
def test_projected_latency_falls_with_bits(device):
    shape = (64, 256)  # one expert matrix
    util = [[0.4, 0.3, 0.2, 0.1]]
    macs = [[shape[0] * shape[1]] * 4]
    flops = active_flops_per_token(macs, 2, util, dense_macs=10_000)
    ms = []
    for bits in (16, 8, 4, 2):
        b = storage_for(shape, dtype_bytes=2, bits=bits, group_size=64).bytes
        nbytes = active_bytes_per_token([[b] * 4], 2, util, dense_bytes=20_000)
        ms.append(projected_decode_latency(nbytes, flops, device).ms_per_token)
    assert all(a > b for a, b in zip(ms, ms[1:])), ms


def test_measured_latency_on_tiny_mixtral():
    import transformers

    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
    )
    model = transformers.MixtralForCausalLM(config)
    m = measure_latency(model, torch.randint(0, 64, (1, 8)), decode_tokens=4, repeats=2)
    assert m.kind == "measured" and "measured" in m.label()
    assert m.prefill_tokens_per_s > 0 and m.decode_ms_per_token > 0 and m.prefill_ms > 0
    assert m.torch_threads >= 1 and m.prompt_tokens == 8 and m.batch_size == 1
    json.dumps(dataclasses.asdict(m))


# -- Pareto ----------------------------------------------------------------------------------------


def brute_force_front(xs, ys, max_x, max_y):
    sx = 1 if max_x else -1
    sy = 1 if max_y else -1
    keep = set()
    for i in range(len(xs)):
        if math.isnan(xs[i]) or math.isnan(ys[i]):
            continue
        dominated = False
        for j in range(len(xs)):
            if j == i or math.isnan(xs[j]) or math.isnan(ys[j]):
                continue
            ge = sx * xs[j] >= sx * xs[i] and sy * ys[j] >= sy * ys[i]
            gt = sx * xs[j] > sx * xs[i] or sy * ys[j] > sy * ys[i]
            if ge and gt:
                dominated = True
                break
        if not dominated:
            keep.add(i)
    return keep


@pytest.mark.parametrize("seed", range(20))
def test_pareto_matches_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 40)
    # Small integer grid -> many ties on x, on y and exact duplicates.
    xs = [float(rng.randint(0, 6)) for _ in range(n)]
    ys = [float(rng.randint(0, 6)) for _ in range(n)]
    if seed % 4 == 0:
        xs[0] = float("nan")
    df = pd.DataFrame({"x": xs, "y": ys, "tag": range(n)}, index=[f"r{i}" for i in range(n)])
    for max_x, max_y in itertools.product([True, False], repeat=2):
        expected = brute_force_front(xs, ys, max_x, max_y)
        front = pareto_front(df, "x", "y", maximize_x=max_x, maximize_y=max_y)
        assert set(front["tag"]) == expected
        assert list(front["x"]) == sorted(front["x"])
        marked = mark_pareto(df, "x", "y", maximize_x=max_x, maximize_y=max_y)
        assert set(marked.loc[marked["pareto"], "tag"]) == expected
        assert "pareto" not in df.columns


def test_pareto_empty_and_float_points():
    assert pareto_front(pd.DataFrame({"x": [], "y": []}), "x", "y").empty
    rng = np.random.default_rng(3)
    pts = rng.random((200, 2))
    df = pd.DataFrame(pts, columns=["x", "y"])
    assert set(pareto_front(df, "x", "y").index) == brute_force_front(list(pts[:, 0]), list(pts[:, 1]), True, True)


def test_loss_skips_ignored_positions_whatever_their_logits():
    """An ignored label (-100) contributes nothing even where the logits there are extreme (the loss of
    an ignored position is never computed into the sums: no inf * 0)."""
    V = 5
    logits = torch.randn(1, 4, V)
    labels = torch.tensor([[0, 1, -100, 2]])
    logits[0, 1, 0] = float("-inf")  # position 1 predicts the ignored label 2
    acc = TokenLossAccumulator()
    acc.add(logits, labels)
    expected = F.cross_entropy(logits[0, [0, 2]].double(), labels[0, [1, 3]])
    assert acc.n_tokens == 2
    assert acc.result()["perplexity"] == pytest.approx(math.exp(expected.item()), rel=1e-6)
