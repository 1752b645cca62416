"""Export a compressed model as a Hugging Face folder (config, safetensors, tokenizer) plus the plan
and a report, atomically, never into the source model's folder.

- Pruned weights are stored as zeros (the sparsity is real in the file).
- Quantized weights are stored dequantized in the model dtype; `moeviz_plan.json` records bits and
  group sizes so another tool can pack them.
- Removed experts are physically removed: expert tensors, router rows (and router biases / DeepSeek's
  correction bias) are sliced and the config's expert count updated, so the file shrinks. This needs
  the same number of removed experts in every MoE layer (one expert count per config); top-k is clamped
  if fewer experts than top-k remain.
- The destination is checked by `moeviz.destination.check_destination`: never the source model, the
  bundled data, the checkout, the home folder or a root (nor a folder containing one), and an existing
  folder is replaced only if a moeviz export wrote it.
- Activation fake-quantization has no representation in a transformers checkpoint: it is recorded in
  the plan and the report only.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from moeviz.compression.apply import CompressedModel
from moeviz.destination import check_destination
from moeviz.errors import MoevizError
from moeviz.figures.units import format_time_ms
from moeviz.models.loading import LoadedModel
from moeviz.models.offload import full_state_dict, module_weights
from moeviz.models.runtime import experts_runtime

EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts",
                     "n_experts")
TOP_K_KEYS = ("num_experts_per_tok", "top_k_experts", "moe_topk", "moe_k", "num_experts_per_token")


def _expert_axis(t, num_experts: int) -> int | None:
    """The axis that indexes experts: dim 0 of size E ([E, ...] weights, [E] biases), or the only
    non-singleton axis of a per-expert vector stored as e.g. [1, E]; None for other tensors."""
    if t.dim() >= 1 and t.shape[0] == num_experts:
        return 0
    if t.numel() == num_experts and num_experts > 1:
        return list(t.shape).index(num_experts)
    return None


def _sliced_state(loaded: LoadedModel, compressed: CompressedModel) -> tuple[dict, dict, list[str]]:
    """(state dict with removed experts sliced out, config changes, messages)."""
    # No clone: load_state_dict copies into the exported model, and slicing makes new tensors.
    state = full_state_dict(compressed.model)  # offloaded modules loaded one at a time
    for layer in compressed.layers:  # a lazy model's experts are compressed here, one layer at a time
        rt = experts_runtime(layer.experts)
        if rt is not None and rt.weights is not None and hasattr(rt.weights, "layer_tensors"):
            with module_weights(layer.experts):
                for name, t in rt.weights.layer_tensors(layer.experts).items():
                    state[f"{layer.experts_path}.{name}"] = t.to("cpu")
    removed_per_layer = [(~compressed.allowed_experts(l.index)).sum().item() for l in compressed.layers]
    messages, changes = [], {}
    if not any(removed_per_layer):
        return state, changes, messages
    if len(set(removed_per_layer)) != 1:
        raise MoevizError(
            f"export: removed experts per layer are {removed_per_layer}; a checkpoint has one expert count for all "
            "MoE layers, so remove the same number of experts in every layer"
        )
    n_group = getattr(loaded.model.config, "n_group", None) or 1
    for layer in compressed.layers:
        allowed = compressed.allowed_experts(layer.index)
        if n_group > 1:
            # Group-limited routing (DeepSeek-V3) selects among contiguous expert groups; slicing keeps it
            # identical only if every group loses the same number of experts.
            per_group = (~allowed).reshape(n_group, -1).sum(1).tolist()
            if len(set(per_group)) != 1:
                raise MoevizError(
                    f"export: layer {layer.index} removes {per_group} experts from its {n_group} routing groups; "
                    "remove the same number from every group so group-limited routing is unchanged"
                )
        keep = allowed.nonzero().squeeze(1)
        # Every per-expert tensor has the expert on one axis: the experts' weights and biases, the router's
        # rows (weight, bias, correction bias, per-expert scale) and the block's own per-expert biases.
        prefix = f"{layer.experts_path}."
        tensors = [(prefix + n, t) for n, t in list(layer.experts.named_parameters()) + list(layer.experts.named_buffers())]
        for key, t in tensors + layer.per_expert_tensors():
            axis = _expert_axis(t, layer.num_experts)
            if key in state and axis is not None:
                state[key] = state[key].index_select(axis, keep.to(state[key].device)).contiguous()
    first = compressed.layers[0]
    new_e = first.num_experts - removed_per_layer[0]
    changes["num_experts"] = new_e
    if new_e < first.top_k:
        changes["top_k"] = new_e
        messages.append(f"top-k clamped from {first.top_k} to {new_e}: only {new_e} experts remain per layer")
    return state, changes, messages


def evaluation_lines(result: dict) -> list[str]:
    """The report's evaluation section, in the app's units (% accuracy; µs or ms by magnitude)."""
    lines: list[str] = []
    lines += ["## Evaluation", "", f"- eval data fingerprint `{result.get('eval_fingerprint')}`, "
              f"{result.get('eval_tokens')} tokens",
              f"- perplexity {result['perplexity']:.4f} (base {result['base_perplexity']:.4f})",
              f"- next-token accuracy {100 * result['accuracy']:.2f} % (base {100 * result['base_accuracy']:.2f} %)",
              f"- projected decode latency: {format_time_ms(result['latency_projected']['ms_per_token'])} per token "
              f"on {result['latency_projected']['device']} (projected, roofline)", ""]
    if result.get("latency_measured"):
        lat, base = result["latency_measured"], result.get("base_latency_measured")
        text = f"- measured decode latency: {format_time_ms(lat['decode_ms_per_token'])} per token"
        if lat.get("interleaved") and base:
            ab = result.get("latency_ab") or {}
            text += (f" (median of {lat['repeats']} repeats, IQR {format_time_ms(lat['decode_q1_ms'])}–"
                     f"{format_time_ms(lat['decode_q3_ms'])}; base {format_time_ms(base['decode_ms_per_token'])}, "
                     f"timed back to back on {lat['device']})")
            if ab.get("spreads_overlap"):
                text += "; the spreads overlap: no measurable difference"
            if ab.get("busy"):
                text += f"; the machine was busy ({ab.get('busy_reason')})"
        else:
            text += " (measured on the evaluating machine)"
        lines.append(text)
    elif result.get("latency_unavailable"):
        lines.append(f"- measured decode latency: unavailable ({result['latency_unavailable']})")
    return lines


def _report(loaded: LoadedModel, compressed: CompressedModel, result: dict | None, messages: list[str]) -> str:
    lines = ["# moeviz export", "", f"- source model: `{loaded.info.source}` (fingerprint `{loaded.fingerprint}`)",
             f"- architecture: {loaded.info.architecture}", ""]
    lines += ["## Plan", "", "```json", compressed.plan.to_json(), "```", ""]
    s = compressed.storage.summary()
    lines += ["## Storage (documented formats, moeviz/compression/formats.py)", "",
              f"- compression ratio, whole model: {s['compression_ratio']:.3f}×",
              f"- compression ratio, experts: {s['experts_compression_ratio']:.3f}×",
              f"- parameter bytes if packed: {s['compressed_bytes']:,} (base {s['base_bytes']:,})",
              "- the safetensors in this folder hold dequantized values in the model dtype (pack with the plan's bits)", ""]
    if compressed.plan.activation_bits < 16:
        lines.append(f"- activation fake-quantization ({compressed.plan.activation_bits} bits) is not stored in the "
                     "checkpoint; apply it at inference time")
    so = getattr(compressed, "second_order", None)
    if so:  # SparseGPT / GPTQ: experts whose Hessian had fewer routed calibration tokens than columns
        warned = sorted({(w["layer"], w["expert"]) for w in so["warnings"]})
        lines += ["## Second-order compression (SparseGPT / GPTQ)", "",
                  f"- {so['seconds']:.1f} s at {so['threads']} torch thread(s), Hessian `{compressed.plan.hessian}`",
                  f"- experts with fewer routed calibration tokens than columns (damped Hessian): "
                  + (", ".join(f"({l}, {e})" for l, e in warned) if warned else "none"), ""]
    if compressed.recovery:
        r = compressed.recovery
        lines += ["## Recovery (knowledge distillation from the source model)", "",
                  f"- {r['steps_done']} steps in {r['seconds']:.1f} s"
                  + (f" (stopped early: {r['stopped_early']})" if r.get("stopped_early") else ""),
                  f"- settings: `{json.dumps(r['settings'])}`",
                  f"- λ_expert {r['lambda_expert']:.4g}, λ_router {r['lambda_router']:.4g}", ""]
    if result:
        lines += evaluation_lines(result)
    lines += [f"- {m}" for m in messages]
    return "\n".join(lines) + "\n"


def export_model(loaded: LoadedModel, compressed: CompressedModel, out: str | Path, overwrite: bool = False,
                 result: dict | None = None) -> Path:
    """Write the compressed model to `out` atomically (temporary folder, then rename)."""
    from transformers import AutoModelForCausalLM

    out = check_destination(loaded, out, overwrite)  # resolved; never the source, never a folder we did not write
    state, changes, messages = _sliced_state(loaded, compressed)
    config = type(loaded.model.config).from_dict(loaded.model.config.to_dict())
    if "num_experts" in changes:
        text = config.get_text_config()
        for key in EXPERT_COUNT_KEYS:
            if key in text.to_dict() or key in getattr(text, "attribute_map", {}):
                setattr(text, key, changes["num_experts"])
        n_group = getattr(config, "n_group", None)
        if n_group and changes["num_experts"] % n_group:
            raise MoevizError(f"export: {changes['num_experts']} experts cannot be split into n_group={n_group} groups")
    if "top_k" in changes:
        for key in TOP_K_KEYS:
            if key in config.to_dict():
                setattr(config, key, changes["top_k"])
    # A real (randomly initialised) model, so non-persistent buffers such as rotary frequencies are
    # computed; every persistent tensor is then replaced by the compressed state.
    model = AutoModelForCausalLM.from_config(config, dtype=next(loaded.model.parameters()).dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise MoevizError(f"export: state does not match the exported config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)
        (tmp / "moeviz_plan.json").write_text(compressed.plan.to_json())
        (tmp / "moeviz_report.md").write_text(_report(loaded, compressed, result, messages))
        if out.exists():  # a previous moeviz export (or an empty folder): swap, so a failure never leaves neither
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / out.name)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
