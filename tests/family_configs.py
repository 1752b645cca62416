"""Discover every causal-LM family of the installed transformers and build a tiny config for each by
shrinking its size fields generically (no hand list of families).

`causal_lm_model_types()` walks MODEL_FOR_CAUSAL_LM_MAPPING_NAMES; `tiny_family_config(model_type)`
instantiates the family's default config with every size field shrunk (hidden size, layers, heads,
experts, intermediate sizes, vocab, LoRA ranks, ...) and per-layer lists / patterns cut to the new
layer count. `OVERRIDES` holds the few settings that generic shrinking cannot infer.
"""

from __future__ import annotations

import re

import torch

VOCAB = 96
HIDDEN = 32
LAYERS = 2
HEADS = 4
KV_HEADS = 4  # = HEADS: multi-head latent attention (DeepSeek-V2/3 and kin) needs as many KV heads as heads
HEAD_DIM = 8
INTER = 16
EXPERTS = 8
TOP_K = 2

# Exact field names -> tiny values. Applied only to fields the config already has.
EXACT = {
    "vocab_size": VOCAB, "hidden_size": HIDDEN, "d_model": HIDDEN, "n_embd": HIDDEN,
    "num_hidden_layers": LAYERS, "num_layers": LAYERS, "n_layer": LAYERS,
    "num_attention_heads": HEADS, "n_head": HEADS, "num_heads": HEADS,
    "num_key_value_heads": KV_HEADS, "num_kv_heads": KV_HEADS, "multi_query_group_num": KV_HEADS,
    "head_dim": HEAD_DIM, "attention_head_dim": HEAD_DIM, "global_head_dim": HEAD_DIM,
    "kv_lora_rank": 16, "q_lora_rank": 24, "qk_rope_head_dim": HEAD_DIM, "qk_nope_head_dim": HEAD_DIM,
    "qk_head_dim": 2 * HEAD_DIM, "v_head_dim": HEAD_DIM,
    "num_local_experts": EXPERTS, "num_experts": EXPERTS, "n_routed_experts": EXPERTS,
    "moe_num_experts": EXPERTS, "num_routed_experts": EXPERTS, "n_experts": EXPERTS,
    "num_experts_per_tok": TOP_K, "top_k_experts": TOP_K, "moe_top_k": TOP_K, "moe_topk": TOP_K, "moe_k": TOP_K, "top_k": TOP_K, "num_experts_per_token": TOP_K,
    "n_group": 2, "topk_group": 1, "num_expert_group": 2, "topk_groups": 1,
    "max_position_embeddings": 128, "sliding_window": 16, "attention_chunk_size": 16,
    "first_k_dense_replace": 0, "num_dense_layers": 0, "n_dense_layers": 0,
    "max_window_layers": LAYERS,
    # Linear-attention / state-space mixers in hybrid families.
    "linear_num_key_heads": 2, "linear_num_value_heads": 2, "linear_key_head_dim": HEAD_DIM,
    "linear_value_head_dim": HEAD_DIM, "mamba_num_heads": 4, "mamba_head_dim": HEAD_DIM, "ssm_state_size": 8,
    "mamba_d_state": 8, "mamba_n_heads": 8, "mamba_d_head": HEAD_DIM,  # 8 heads x 8 = mamba_expand (2) x hidden "n_groups": 1, "mamba_n_groups": 1,
    "conv_kernel": 4, "mamba_d_conv": 4, "mamba_expand": 2, "time_step_rank": 4, "mamba_dt_rank": 4,
    "chunk_size": 16, "mamba_chunk_size": 16, "num_nextn_predict_layers": 0,
}
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts",
                     "num_routed_experts", "n_experts")
NONE_FILLED = set(EXPERT_COUNT_KEYS) | {"head_dim", "attention_head_dim", "num_experts_per_tok", "top_k_experts",
                                        "n_group", "topk_group", "n_shared_experts", "moe_intermediate_size"}
# Name patterns -> tiny values for size fields named per family (intermediate sizes, expert FFNs).
PATTERNS = [
    (re.compile(r"(intermediate|ffn|ffw|mlp|expert)_?(hidden_)?(size|dim)$"), INTER),
    (re.compile(r"^n_inner$"), INTER),
    # e.g. an unpadded vocabulary size beside vocab_size, or Gemma 4's per-layer-input vocabulary
    # (262,144 × 512 per-layer embeddings: 537 MB of a tiny model otherwise)
    (re.compile(r"vocab_size(_per_layer_input)?$"), VOCAB),
]
# Fields whose value is the number of layers' worth of something (lists / strings are cut to LAYERS).
LAYER_LISTS = re.compile(r"(layer_types|layers_block_type|_pattern|mlp_only_layers|moe_layers|block_types|"
                         r"layer_type_list|attn_type_list|no_rope_layers|_layer_types|sparse_layers)$")

# model_type -> settings generic shrinking cannot infer (why in each comment).
OVERRIDES: dict[str, dict] = {
    # ZAYA's config validator accepts only top-1 routing.
    "zaya": dict(num_experts_per_tok=1),
    # Dots3-Note's sliding-window layers need head_dim = qk_nope_head_dim + qk_rope_head_dim (8 + 8).
    "dots3_note": dict(head_dim=16),
    "dots3_note_text": dict(head_dim=16),
    # LFM2-MoE leaves layer_types None by default; the model needs one entry per layer.
    "lfm2_moe": dict(layer_types=["conv", "full_attention"]),
    # Gemma 4 has its MoE block switched off by default.
    "gemma4_text": dict(enable_moe_block=True),
    "gemma4": dict(enable_moe_block=True),
    # MiMo-V2-Flash's sliding-window layers use twice num_key_value_heads, which must not exceed the heads.
    "mimo_v2_flash": dict(num_key_value_heads=2),
    # Qwen4-Exp's sparse-attention indexer has no default sizes (None); the model needs them.
    "qwen4_exp_text": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=16,
                           indexer_compress_ratio=4),
    "qwen4_exp": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=16,
                      indexer_compress_ratio=4),
    # Nemotron-H's Mamba mixer needs mamba_num_heads divisible by n_groups (8 by default, 4 heads here).
    "nemotron_h": dict(n_groups=1),
}


def is_moe_config(config) -> bool:
    """A family is MoE when its (text) config has an expert-count field, whatever its default value."""
    d = config.to_dict()
    text = d.get("text_config") or {}
    return any(k in d or k in text for k in EXPERT_COUNT_KEYS)


def moe_causal_lm_model_types() -> list[str]:
    from transformers import CONFIG_MAPPING

    out = []
    for model_type in causal_lm_model_types():
        try:
            config = CONFIG_MAPPING[model_type]()
        except Exception:  # a config class that cannot be built with defaults: decided by the sweep itself
            out.append(model_type)
            continue
        if is_moe_config(config):
            out.append(model_type)
    return out


def causal_lm_model_types() -> list[str]:
    """Every model_type the installed transformers can build with AutoModelForCausalLM."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _shrink_value(name: str, value, old_layers: int | None):
    if isinstance(value, bool):
        return None
    if name in EXACT and isinstance(value, int):
        return EXACT[name]
    if value is None:
        # MoE switched off by default (no expert count) or a size the model derives but cannot derive here.
        return EXACT.get(name, INTER) if name in NONE_FILLED else None
    if name in EXPERT_COUNT_KEYS and isinstance(value, list):
        return [EXPERTS] * LAYERS
    if name.endswith("token_id") and isinstance(value, int) and value >= VOCAB:
        return min(value, 2)  # special tokens must exist in the tiny vocabulary
    if isinstance(value, int) and value > min(INTER, VOCAB) and any(p.search(name) for p, _ in PATTERNS):
        return next(v for p, v in PATTERNS if p.search(name))
    if isinstance(value, dict) and value and all(isinstance(k, int) or (isinstance(k, str) and k.isdigit())
                                                  for k in value):
        return {k: v for k, v in value.items() if int(k) < LAYERS}  # per-layer settings keyed by layer index
    if isinstance(value, list) and old_layers and len(value) == old_layers and "head" in name and \
            all(isinstance(v, int) for v in value):
        return [HEADS if "attention" in name or "q_" in name else KV_HEADS] * LAYERS  # heads per layer
    if isinstance(value, list) and old_layers and len(value) == old_layers != LAYERS:
        return _representative(value, old_layers)  # any other per-layer list
    if LAYER_LISTS.search(name) and old_layers:
        if isinstance(value, (list, tuple)) and len(value) >= LAYERS:
            return _representative(list(value), old_layers)
        if isinstance(value, str) and len(value) >= LAYERS and len(value) == old_layers:
            return "".join(_representative(list(value), old_layers))
    return None


def _representative(items: list, old_layers: int) -> list:
    """LAYERS entries that keep a mix of the original kinds (e.g. one sparse and one dense layer
    would be taken from the start otherwise, which is often all dense)."""
    if len(items) != old_layers:  # a list of layer indices (e.g. mlp_only_layers): keep those that still exist
        return [i for i in items if isinstance(i, int) and i < LAYERS]
    kinds = list(dict.fromkeys(items))  # first occurrence of each kind, in order
    return (kinds + items)[:LAYERS]


def shrink_config(config) -> object:
    """Shrink `config` in place (and its sub-configs) and return it."""
    d = config.to_dict()
    old_layers = d.get("num_hidden_layers") or d.get("num_layers") or d.get("n_layer")
    for name, value in d.items():
        new = _shrink_value(name, value, old_layers)
        if new is not None:
            try:
                setattr(config, name, new)
            except Exception:  # read-only properties
                pass
    return config


def tiny_family_config(model_type: str):
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    config = cls()
    text = getattr(config, "text_config", None)
    shrink_config(config)
    if text is not None and text is not config:
        shrink_config(text)
    for name, value in OVERRIDES.get(model_type, {}).items():
        setattr(text if text is not None and hasattr(text, name) else config, name, value)
    config.tie_word_embeddings = False
    # Re-create from the dict, as loading the saved folder will: derived fields follow the new sizes and
    # the config's validators run now (a config that could not be loaded back is not buildable).
    return cls.from_dict(config.to_dict())


def build_tiny(model_type: str, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    config = tiny_family_config(model_type)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # spread routers so top-k choices are decisive (random init is near uniform)
        for name, p in model.named_parameters():
            if re.search(r"(gate|router)(\.\w+)?\.weight$", name) and p.dim() == 2:
                p.normal_(0, 0.5)
        for name, b in list(model.named_buffers()) + list(model.named_parameters()):
            if re.search(r"(expert_bias|correction_bias|balancing_bias|(gate|router)\.bias)", name):
                b.normal_(0, 0.3)  # load-balancing biases large enough to change choices
            elif re.search(r"expert_scale", name):
                b.uniform_(0.5, 1.5)  # learned per-expert weight scales (initialised to ones)
    return model.eval()
