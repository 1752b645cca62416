"""Every MoE causal-LM family of the installed transformers, discovered at test time, either works end
to end through moeviz (load → calibrate → 50% pruning (+ expert removal where the routing rule is
verified) → evaluate → export → reload with equal logits) or is refused by load_model with a one-line
moeviz error. Tiny configs come from shrinking each family's default config (tests/family_configs.py).
"""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers

from family_configs import build_tiny, moe_causal_lm_model_types
from test_packed_experts import assert_packed_within_bound
from tiny_models import tiny_tokenizer

from moeviz.calibration import calibrate
from moeviz.compression import CompressionPlan, PruningSettings
from moeviz.compression.apply import Compressor
from moeviz.compression.removal import experts_to_remove
from moeviz.data import tokenize_documents
from moeviz.errors import MoevizError, PlanError
from moeviz.evaluation import EvalSettings, Evaluator
from moeviz.export import export_model
from moeviz.models import load_model
from documents import documents

MODEL_TYPES = moe_causal_lm_model_types()
DOCS = documents(8)
# A floor, not the list under test: families that must keep working (moeviz's original eight and the
# ones issue 12 named), so a regression cannot hide as an "accurate refusal".
MUST_WORK = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "granitemoe", "phimoe", "gpt_oss",
             "llama4_text", "inkling_text", "afmoe", "gemma4_text", "hunyuan_v1_moe", "longcat_flash", "zaya",
             "glm4_moe", "minimax_m2", "lfm2_moe", "nemotron_h", "sarvam_mla", "dots1", "deepseek_v32"}


@pytest.fixture(scope="module")
def family_folder(tmp_path_factory):
    cache: dict[str, object] = {}

    def get(model_type):
        if model_type not in cache:
            folder = tmp_path_factory.mktemp(model_type)
            try:
                model = build_tiny(model_type)
            except Exception as e:  # the generic shrinking could not make a buildable config for this family
                cache[model_type] = f"tiny config not buildable: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                return cache[model_type]
            model.save_pretrained(folder, safe_serialization=True)
            vocab = model.config.get_text_config().vocab_size
            tiny_tokenizer(vocab).save_pretrained(folder)
            cache[model_type] = (folder, type(model).__name__)
        return cache[model_type]

    return get


@pytest.fixture(scope="module")
def loaded_family(family_folder):
    cache: dict[str, object] = {}

    def get(model_type):
        if model_type not in cache:
            made = family_folder(model_type)
            if isinstance(made, str):
                cache[model_type] = made
            else:
                folder, arch = made
                try:
                    cache[model_type] = load_model(folder)
                except MoevizError as e:
                    cache[model_type] = e
        return cache[model_type]

    return get


def _assert_accurate_refusal(err: MoevizError, arch: str) -> None:
    msg = str(err)
    assert "\n" not in msg and len(msg) < 300, msg
    assert msg.startswith(arch), f"the refusal should name the architecture {arch}: {msg}"


def _removal(lm, stats) -> list[tuple[int, int]]:
    """One expert per layer, or one per routing group for group-limited routers (the export keeps
    group sizes equal)."""
    first = lm.layers[0]
    n_group = first.adapter.params.get("n_group", 1) if first.adapter.rule == "sigmoid_group" else 1
    n_group = max(n_group, getattr(lm.model.config.get_text_config(), "n_group", None) or 1)
    if n_group > 1:
        size = first.num_experts // n_group
        return [(l.index, g * size) for l in lm.layers for g in range(n_group)]
    return experts_to_remove(stats, 1, "frequency")


@pytest.mark.slow
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_family_works_end_to_end_or_is_refused(model_type, family_folder, loaded_family, tmp_path):
    made = family_folder(model_type)
    if isinstance(made, str):
        pytest.skip(made)
    folder, arch = made
    lm = loaded_family(model_type)
    if isinstance(lm, MoevizError):
        assert model_type not in MUST_WORK, f"{model_type} must work but was refused: {lm}"
        _assert_accurate_refusal(lm, arch)
        return
    samples = tokenize_documents(DOCS, lm.tokenizer, 4, 12)
    stats = calibrate(lm, samples, batch_size=4)
    assert stats.n_tokens == 48 and len(stats.layers) == len(lm.layers)
    plan = CompressionPlan(pruning=PruningSettings(metric="wanda", sparsity=0.5))
    if lm.info.expert_removal:
        plan.removed_experts = _removal(lm, stats)
    else:  # no verified routing rule: removal is refused in one line, never silently mis-routed
        with pytest.raises(PlanError, match="follows no routing rule moeviz could verify") as refused:
            Compressor(lm, stats).apply(CompressionPlan(removed_experts=[(0, 0)]))
        assert "\n" not in str(refused.value)
    compressed = Compressor(lm, stats).apply(plan)
    assert_packed_within_bound(lm, samples.input_ids)  # the packed low-bit runtime (int8 channel) on this family
    settings = EvalSettings(batch_size=4, latency_prompt_tokens=8, latency_decode_tokens=1, latency_repeats=1)
    result = Evaluator(lm, samples, settings).evaluate(compressed)
    assert result.perplexity > 0 and result.compression["experts_compression_ratio"] > 1.5
    assert (result.latency_measured is None) == (result.latency_unavailable is not None)
    out = export_model(lm, compressed, tmp_path / "out", result=result.to_dict())
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        ids = samples.input_ids
        torch.testing.assert_close(back(input_ids=ids, use_cache=False).logits,
                                   compressed.model(input_ids=ids, use_cache=False).logits, rtol=1e-4, atol=1e-4)
    reloaded = load_model(out)
    removed = len(plan.removed_experts) // len(lm.layers)
    assert reloaded.layers[0].num_experts == lm.layers[0].num_experts - removed



def _weight_kind(logits: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> str | None:
    """How the router forms its weights, read from its own outputs (independent of moeviz): within a
    token, two chosen experts' weights are in the ratio sigmoid(l1) / sigmoid(l2) for a sigmoid router
    and exp(l1 - l2) for a softmax one (renormalisation and scaling cancel in the ratio)."""
    if idx.shape[1] < 2 or logits.shape[1] <= int(idx.max()):
        return None
    l, w = logits.float().gather(1, idx[:, :2]), w.float()[:, :2]
    ok = (w > 0).all(1)
    if not ok.any():
        return None
    ratio = w[ok, 0] / w[ok, 1]
    sig = l[ok].sigmoid()
    if torch.allclose(ratio, sig[:, 0] / sig[:, 1], rtol=1e-3):
        return "sigmoid"
    if torch.allclose(ratio, (l[ok, 0] - l[ok, 1]).exp(), rtol=1e-3):
        return "softmax"
    return None


@pytest.mark.slow
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_routing_rule_reproduces_the_router(model_type, loaded_family):
    """For every family that loads: on fresh random tokens, the verified rule turns the router's logits
    into the router's own top-k ids and weights; a sigmoid router gets a sigmoid-based distribution
    (checked on calibration's recorded probabilities), a softmax router never does, and a router whose
    rule is not verified is shown as "selected" weights only."""
    lm = loaded_family(model_type)
    if isinstance(lm, (str, MoevizError)):
        pytest.skip("not loadable (see the end-to-end test)")
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(7))
    outputs = {}
    hooks = [l.router.register_forward_hook(lambda m, a, o, i=l.index: outputs.setdefault(i, o)) for l in lm.layers]
    try:
        with torch.no_grad():
            lm.model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    samples = tokenize_documents(DOCS, lm.tokenizer, 2, 12)
    samples.input_ids[:] = ids  # calibrate on the same tokens, to compare its recorded distribution
    stats = calibrate(lm, samples, batch_size=2, record_tokens=24)
    for layer in lm.layers:
        if layer.index not in outputs:
            continue
        out = outputs[layer.index]
        if not layer.adapter.supports_rerouting:
            assert layer.distribution == "selected", layer.path
            continue
        logits = out[layer.adapter.logits_slot].reshape(-1, layer.num_experts)
        if layer.adapter.dense:  # Llama 4: dense scores [T, E], 0 for unchosen experts
            want_w, want_i = out[0].reshape(logits.shape).float().topk(layer.top_k, dim=-1)
        else:
            w_slot, i_slot = layer.adapter.output_slots
            want_i, want_w = out[i_slot].reshape(logits.shape[0], -1), out[w_slot].reshape(logits.shape[0], -1).float()
        weights, indices = layer.adapter.route(layer.router, logits)
        o1, o2 = indices.argsort(1), want_i.argsort(1)
        assert torch.equal(indices.gather(1, o1), want_i.gather(1, o2)), layer.path
        torch.testing.assert_close(weights.float().gather(1, o1), want_w.gather(1, o2), rtol=1e-4, atol=1e-5)
        kind = _weight_kind(logits, want_i, want_w)
        if kind is not None:
            assert layer.distribution == kind, (layer.path, kind, layer.distribution)
        if layer.distribution == "sigmoid":
            sig = logits.float().sigmoid()
            torch.testing.assert_close(stats.layers[layer.index].record_probs, sig / sig.sum(1, keepdim=True))


def test_sweep_discovers_moe_families_only():
    """The sweep is not a hand list: it covers the families moeviz always supported and many more,
    and leaves dense models out."""
    for t in ("mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "llama4_text"):
        assert t in MODEL_TYPES
    assert "llama" not in MODEL_TYPES and "gpt2" not in MODEL_TYPES
    assert len(MODEL_TYPES) >= 40
