"""Whole-model storage bytes and projected-latency inputs of a hand-sized model, counted by hand.

The model is a bf16 Mixtral whose every dimension is chosen here, so every parameter count below is
arithmetic on the config (embeddings, attention, norms, router, experts), and every compressed size
is arithmetic on the formats documented in moeviz/compression/formats.py -- never a call to the
code under test. These figures are the x-axis of every trade-off chart (compression ratio) and the
bytes behind every projected latency.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from moeviz.compression import CompressionPlan, PruningSettings, QuantSettings
from moeviz.compression.apply import Compressor
from moeviz.data import Document, tokenize_documents
from moeviz.evaluation import ACCELERATORS, EvalSettings, Evaluator
from moeviz.evaluation.evaluate import _latency_inputs
from moeviz.models import load_model

V, H, I, L, E, K = 96, 128, 64, 2, 4, 2  # vocab, hidden, expert intermediate, layers, experts, top-k
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 32
BF16 = 2  # bytes

# -- parameter counts, from the config -----------------------------------------------------------
EMBED = V * H  # input embedding table (untied)
LM_HEAD = V * H
ATTN = H * HEADS * HEAD_DIM + 2 * H * KV_HEADS * HEAD_DIM + HEADS * HEAD_DIM * H  # q, k, v, o; no biases
NORMS = 2 * H  # input + post-attention RMSNorm weights per layer
ROUTER = E * H  # per layer
GATE = UP = I * H  # per expert, [out, in] = [I, H]
DOWN = H * I  # [H, I]
EXPERT = GATE + UP + DOWN
OTHER_PARAMS = EMBED + LM_HEAD + L * (ATTN + NORMS) + H  # + final norm

# By hand: 12288 + 12288 + 2 x (49152 + 256) + 128 = 123520 "other" weights;
# 2 x 4 x 24576 = 196608 expert weights; 2 x 512 = 1024 router weights.
assert (OTHER_PARAMS, L * E * EXPERT, L * ROUTER) == (123520, 196608, 1024)


def other_params(tied: bool) -> int:
    """A tied LM head is the embedding table itself: counted (and stored) once."""
    return OTHER_PARAMS - LM_HEAD if tied else OTHER_PARAMS


def _hand_tensor_bytes(out_f: int, in_f: int, bits: int, group: int, sparsity: float) -> int:
    """Stored bytes of one [out, in] bf16 matrix, straight from the formats.py docstring:
    dense = numel x b / 8; bitmask = kept x b / 8 + numel / 8 (whichever is smaller);
    quantized adds one fp16 scale (2 B) per group of `group` inputs of each row (symmetric)."""
    b = 16 if bits == 16 else bits
    numel = out_f * in_f
    scales = 0 if bits == 16 else out_f * (in_f // group) * 2
    dense = numel * b // 8 + scales
    if sparsity == 0:
        return dense
    kept = out_f * (in_f - round(sparsity * in_f))
    return min(dense, kept * b // 8 + numel // 8 + scales)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def hand_model(request, tmp_path_factory):
    from tiny_models import tiny_tokenizer

    tied = request.param

    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, num_local_experts=E, num_experts_per_tok=K,
        max_position_embeddings=64, tie_word_embeddings=tied,
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0, 0.5)  # decisive routing
    model = model.to(torch.bfloat16).eval()
    folder = tmp_path_factory.mktemp("hand_model")
    model.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer(V).save_pretrained(folder)
    lm = load_model(folder, dtype="bfloat16")
    # The model really has the shape we counted (guards the hand counts themselves).
    assert sum(p.numel() for p in lm.model.parameters()) == other_params(tied) + L * (ROUTER + E * EXPERT)
    assert (lm.model.get_output_embeddings().weight is lm.model.get_input_embeddings().weight) == tied
    assert all(p.dtype == torch.bfloat16 for p in lm.model.parameters())
    return lm, tied


Q4_G64_S50 = CompressionPlan(pruning=PruningSettings(metric="magnitude", sparsity=0.5),
                             quant=QuantSettings(bits=4, group_size=64))


def test_storage_report_bytes_counted_by_hand(hand_model):
    lm, tied = hand_model
    comp = Compressor(lm)
    base_other = other_params(tied) * BF16
    base_experts = L * E * EXPERT * BF16
    base_router = L * ROUTER * BF16
    assert (base_other, base_experts, base_router) == ((222464 if tied else 247040), 393216, 2048)
    base_total = base_other + base_experts + base_router
    assert base_total == (617728 if tied else 642304)

    # 16 bits, no pruning: nothing changes.
    s = comp.apply(CompressionPlan()).storage.summary()
    assert (s["other_bytes"], s["experts_base_bytes"], s["router_base_bytes"]) == (base_other, base_experts, base_router)
    assert s["base_bytes"] == s["compressed_bytes"] == base_total and s["compression_ratio"] == 1.0

    # 16 bits, 50 % unstructured: gate [64, 128] keeps 64 of 128 per row -> 4096 x 2 B + 8192 / 8 B
    # = 9216 (bitmask beats 16384 dense); up the same; down [128, 64] keeps 32 per row -> 9216.
    per_expert = _hand_tensor_bytes(I, H, 16, 0, 0.5) * 2 + _hand_tensor_bytes(H, I, 16, 0, 0.5)
    assert per_expert == 3 * 9216
    s = comp.apply(CompressionPlan(pruning=PruningSettings(metric="magnitude", sparsity=0.5))).storage.summary()
    assert s["experts_bytes"] == L * E * per_expert == 221184
    assert s["compressed_bytes"] == 221184 + base_router + base_other
    assert s["base_bytes"] == base_total and s["other_bytes"] == base_other
    assert s["compression_ratio"] == pytest.approx(base_total / (221184 + 2048 + base_other), rel=1e-12)

    # 4 bits, group 64, 50 %: gate = 4096 kept x 4 bit = 2048 B + 1024 B mask + 64 rows x 2 groups x
    # 2 B scales = 3328 (dense 4-bit would be 4096 + 256); down = 2048 + 1024 + 128 rows x 1 x 2 B = 3328.
    per_expert = _hand_tensor_bytes(I, H, 4, 64, 0.5) * 2 + _hand_tensor_bytes(H, I, 4, 64, 0.5)
    assert per_expert == 3 * 3328
    cm = comp.apply(Q4_G64_S50)
    s = cm.storage.summary()
    assert s["experts_bytes"] == L * E * per_expert == 79872
    assert s["router_bytes"] == base_router  # router left at 16 bits
    assert s["other_bytes"] == base_other
    assert s["compressed_bytes"] == 79872 + 2048 + base_other == (304384 if tied else 328960)
    assert s["compression_ratio"] == pytest.approx(base_total / (79872 + 2048 + base_other), rel=1e-12)
    assert s["experts_compression_ratio"] == pytest.approx(393216 / 79872, rel=1e-12)
    for t in cm.storage.tensors:
        if t["tensor"] != "router":
            assert (t["format"], t["bytes"], t["scale_bytes"]) == ("bitmask", 3328, 256), t

    # Removing one expert of layer 0 (16 bits): its 49152 bytes go, its router row stays.
    s = comp.apply(CompressionPlan(removed_experts=[(0, 1)])).storage.summary()
    assert s["experts_bytes"] == (L * E - 1) * EXPERT * BF16 == 344064
    assert (s["router_bytes"], s["other_bytes"], s["base_bytes"]) == (base_router, base_other, base_total)
    assert s["compressed_bytes"] == base_total - 49152


def dense_macs(tied: bool) -> int:
    """Weights read for every token at decode time: attention, norms, routers, the LM head and one
    row of the input embedding (untied), or the whole table once when it is the LM head (tied)."""
    return (other_params(tied) if tied else OTHER_PARAMS - (V - 1) * H) + L * ROUTER


def test_projected_latency_inputs_counted_by_hand(hand_model):
    lm, tied = hand_model
    # untied: 123520 - 95 x 128 + 1024 = 112384; tied: 111232 + 1024 = 112256
    assert dense_macs(tied) == (112256 if tied else 112384)
    comp = Compressor(lm)
    removed = [[EXPERT * BF16] * E, [EXPERT * BF16] * E]
    removed[0][1] = 0
    macs_removed = [[EXPERT] * E, [EXPERT] * E]
    macs_removed[0][1] = 0
    for plan, expert_bytes, expert_macs in (
        (CompressionPlan(), [[EXPERT * BF16] * E] * L, [[EXPERT] * E] * L),
        (Q4_G64_S50, [[3 * 3328] * E] * L, [[EXPERT] * E] * L),  # no compute saving for sparsity / low bits
        (CompressionPlan(removed_experts=[(0, 1)]), removed, macs_removed),
    ):
        cm = comp.apply(plan)
        eb, em, dense_b, dense_m = _latency_inputs(lm, cm.storage.tensors, [E] * L)
        assert (eb, em) == (expert_bytes, expert_macs)
        assert (dense_b, dense_m) == (dense_macs(tied) * BF16, dense_macs(tied))


def test_projected_latency_of_an_evaluation_counted_by_hand(hand_model):
    lm, tied = hand_model
    docs = [Document("The quick brown fox jumps over the lazy dog. " * 20, "prose")]
    held = tokenize_documents(docs, lm.tokenizer, 2, 16, seed=0)
    ev = Evaluator(lm, held, EvalSettings(batch_size=2, record_tokens=8, measure_latency=False))
    r = ev.evaluate(Compressor(lm).apply(Q4_G64_S50))
    bw = ACCELERATORS["NVIDIA H100 SXM"].memory_bandwidth_gbs * 1e9
    for proj, util, expert_bytes in ((r.latency_projected, r.utilization["compressed"], 3 * 3328),
                                     (r.base_latency_projected, r.utilization["base"], EXPERT * BF16)):
        # P(expert read for a token) = min(1, k x its share of the top-k assignments)
        reads = sum(min(1.0, K * u / sum(layer)) for layer in util for u in layer)
        assert proj["bytes_per_step"] == pytest.approx(dense_macs(tied) * BF16 + reads * expert_bytes, rel=1e-9)
        assert proj["flops_per_token"] == pytest.approx(2 * (dense_macs(tied) + reads * EXPERT), rel=1e-9)
        assert proj["bound"] == "memory"
        assert proj["ms_per_token"] == pytest.approx(1e3 * proj["bytes_per_step"] / bw, rel=1e-9)
