"""Tiny random MoE models of every supported family, built from transformers config classes
(in the spirit of transformers' model testers), saved with save_pretrained and loadable through
moeviz's real loading code."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)

# family -> (config class, family-specific settings). Expert counts and top-k differ on purpose.
FAMILIES: dict[str, tuple[str, dict]] = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
             num_experts=6, num_experts_per_tok=2, norm_topk_prob=False),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(intermediate_size=48, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=3,
             norm_topk_prob=True, head_dim=8),
    ),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=16, num_experts=8, num_experts_per_tok=2)),
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
             n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1, num_hidden_layers=3,
             kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
             num_key_value_heads=4, routed_scaling_factor=2.5, norm_topk_prob=True),
    ),
    "granitemoe": ("GraniteMoeConfig", dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)),
    "phimoe": ("PhimoeConfig", dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)),
    "gpt_oss": (
        "GptOssConfig",
        dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
             layer_types=["sliding_attention", "full_attention"], sliding_window=16),
    ),
}

NUM_MOE_LAYERS = {"deepseek_v3": 2}  # first_k_dense_replace=1 of 3 layers


def tiny_config(family: str):
    cls_name, extra = FAMILIES[family]
    return getattr(transformers, cls_name)(**{**COMMON, **extra})


def build_tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    config = tiny_config(family)
    model = transformers.AutoModelForCausalLM.from_config(config)
    # Random init leaves routers near zero (uniform routing) and some biases at zero; spread them so
    # top-k choices are decisive and every code path (biases, correction bias) is exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight")):
                p.normal_(0, 0.5)
            elif name.endswith(("_bias", "router.bias")):
                p.normal_(0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.05)
    return model.eval()


def save_tiny_model(family: str, folder: Path, seed: int = 0) -> Path:
    """Save a tiny model and a small byte-level tokenizer to `folder` (no download)."""
    model = build_tiny_model(family, seed)
    model.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer(model.config.vocab_size).save_pretrained(folder)
    return folder


def tiny_tokenizer(vocab_size: int = 96):
    """A character-level fast tokenizer over printable ASCII, built locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    chars = [chr(c) for c in range(32, 32 + vocab_size - 3)]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<pad>"
    )
