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
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from moeviz.compression.apply import CompressedModel
from moeviz.compression.ct_pack import EXPERT_KEY
from moeviz.ct_export import ExpertPacker
from moeviz.destination import check_destination
from moeviz.errors import MoevizError
from moeviz.figures.units import format_time_ms
from moeviz.models.loading import LoadedModel
from moeviz.models.offload import module_weights
from moeviz.models.runtime import experts_runtime

EXPORT_FORMATS = ("dense", "compressed-tensors")
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


@dataclass
class _Removal:
    """Experts physically removed from the file: per tensor key, the axis that indexes experts and the
    experts kept; plus the config changes and messages."""

    keep: dict[str, tuple[int, torch.Tensor]] = field(default_factory=dict)
    changes: dict = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)


def _removal(loaded: LoadedModel, compressed: CompressedModel) -> _Removal:
    """What expert removal slices out of which tensor (refusals before anything is read or written)."""
    out = _Removal()
    removed_per_layer = [(~compressed.allowed_experts(l.index)).sum().item() for l in compressed.layers]
    if not any(removed_per_layer):
        return out
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
        keep = allowed.nonzero().squeeze(1).cpu()
        # Every per-expert tensor has the expert on one axis: the experts' weights and biases, the router's
        # rows (weight, bias, correction bias, per-expert scale) and the block's own per-expert biases.
        prefix = f"{layer.experts_path}."
        tensors = [(prefix + n, t) for n, t in list(layer.experts.named_parameters()) + list(layer.experts.named_buffers())]
        for key, t in tensors + layer.per_expert_tensors():
            axis = _expert_axis(t, layer.num_experts)  # shapes only: meta (offloaded) tensors are fine
            if axis is not None:
                out.keep[key] = (axis, keep)
    first = compressed.layers[0]
    new_e = first.num_experts - removed_per_layer[0]
    out.changes["num_experts"] = new_e
    if new_e < first.top_k:
        out.changes["top_k"] = new_e
        out.messages.append(f"top-k clamped from {first.top_k} to {new_e}: only {new_e} experts remain per layer")
    return out


def _export_config(loaded: LoadedModel, changes: dict):
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
    return config


# ---- streamed writing -------------------------------------------------------------------------------
# The exported model exists only as a meta-device skeleton (names, shapes, dtypes, weight conversions).
# Tensors are produced one unit at a time (a decoder layer, or the top-level modules), converted back to
# the checkpoint format transformers saves (`revert_weight_conversion`: fused `[E, ...]` experts -> one
# tensor per expert), and written at offsets planned beforehand from the skeleton, so no shard and no
# state dict is ever held whole. Peak ≈ one unit's compressed tensors (a lazy layer is materialised
# here, once) plus its per-expert copies.

DEFAULT_SHARD_BYTES = 4 * 2**30
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
              torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64"}
_LAYER_PREFIX = re.compile(r"^(.*?\.\d+)\.")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _units(keys: list[str]) -> list[list[str]]:
    """State keys grouped by decoder layer (the first numbered path component, e.g. `model.layers.3`),
    the remaining top-level keys as one unit; weight conversions never span two units."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        m = _LAYER_PREFIX.match(k)
        groups.setdefault(m.group(1) if m else "", []).append(k)
    return list(groups.values())


def _checkpoint_format(skeleton: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from transformers.core_model_loading import revert_weight_conversion

    return {k: v.contiguous() for k, v in revert_weight_conversion(skeleton, tensors).items()}


def _layout(tensors: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}


@dataclass
class _Unit:
    keys: list[str]  # model state keys
    planned: dict[str, torch.Tensor]  # checkpoint-format meta tensors
    separable: bool  # converting each key alone gives the same checkpoint tensors as converting all together
    # model keys whose conversion is a per-expert split (fused [E, ...] -> `…experts.<e>.…` keys, each expert
    # from its own rows): converted a few experts at a time, so no full per-expert copy of the layer exists
    per_expert: frozenset = frozenset()


@dataclass
class _Shard:
    file: str
    units: list[int]
    header: dict  # name -> {"dtype", "shape", "data_offsets"}
    data_start: int = 0


def _plan_units(skeleton: nn.Module, meta: dict[str, torch.Tensor], packer: ExpertPacker | None) -> list[_Unit]:
    """Units in checkpoint format, on meta tensors. A unit is separable when each key converts on its own
    (fused experts -> per-expert tensors): then it is written one tensor at a time; otherwise (a
    conversion that joins several tensors) its tensors are converted together. With a packer
    (compressed-tensors), quantized expert projections are planned in their packed form."""
    units = []
    for keys in _units(list(meta)):
        planned = _checkpoint_format(skeleton, {k: meta[k] for k in keys})
        alone, per_expert = {}, set()
        for k in keys:
            out = _checkpoint_format(skeleton, {k: meta[k]})
            if _splits_by_expert(out, meta[k].shape[0] if meta[k].dim() else 0):
                per_expert.add(k)
            alone.update(out)
        separable = _layout(alone) == _layout(planned)
        if packer is not None:
            planned = packer.layout(keys, planned)
        units.append(_Unit(keys, planned, separable, frozenset(per_expert)))
    return units


def _splits_by_expert(converted: dict[str, torch.Tensor], rows: int) -> bool:
    """Whether a fused tensor of `rows` experts converted to exactly one set of per-expert keys per expert."""
    if rows < 2 or not converted:
        return False
    found = [EXPERT_KEY.match(k) for k in converted]
    if not all(found):
        return False
    experts = sorted({int(m.group("expert")) for m in found})
    return experts == list(range(rows)) and len(converted) % rows == 0


EXPERTS_PER_CONVERSION = 8  # a fused expert tensor is converted this many experts at a time


def _expert_chunks(skeleton: nn.Module, key: str, t: torch.Tensor):
    """`{checkpoint key: tensor}` of a fused [E, ...] tensor, EXPERTS_PER_CONVERSION experts at a time: each
    slice converts as a model with that many experts would, and its expert indices are shifted to where the
    slice starts (so only a slice's per-expert copies exist at once, not the whole layer's)."""
    for start in range(0, t.shape[0], EXPERTS_PER_CONVERSION):
        part = _checkpoint_format(skeleton, {key: t[start:start + EXPERTS_PER_CONVERSION]})
        yield {EXPERT_KEY.sub(lambda m: f"{m.group('prefix')}.{int(m.group('expert')) + start}.{m.group('name')}.weight", k): v
               for k, v in part.items()}


def _plan_shards(units: list[_Unit], max_shard_bytes: int) -> list[_Shard]:
    """Shard files (whole units each, ≤ max_shard_bytes unless one unit is larger) and their headers."""
    groups: list[list[int]] = []
    size = 0
    for i, unit in enumerate(units):
        b = sum(_nbytes(t) for t in unit.planned.values())
        if not groups or (size + b > max_shard_bytes and size > 0):
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += b
    shards = []
    for n, group in enumerate(groups, 1):
        file = "model.safetensors" if len(groups) == 1 else f"model-{n:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: t for i in group for k, t in units[i].planned.items()}
        # safetensors' own layout: larger items first (keeps every tensor aligned), then by name.
        header, offset = {}, 0
        for k in sorted(tensors, key=lambda k: (-tensors[k].element_size(), k)):
            t = tensors[k]
            if t.dtype not in _ST_DTYPES:
                raise MoevizError(f"export: {k} has dtype {t.dtype}, which safetensors cannot store")
            header[k] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + _nbytes(t)]}
            offset += _nbytes(t)
        shards.append(_Shard(file, group, header))
    return shards


def _write_header(f, shard: _Shard) -> None:
    text = json.dumps({"__metadata__": {"format": "pt"}, **shard.header}, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    f.write(len(text).to_bytes(8, "little"))
    f.write(text)
    shard.data_start = 8 + len(text)


def _unit_tensors(compressed: CompressedModel, keys: list[str], meta: dict[str, torch.Tensor], removal: _Removal):
    """Yields (key, tensor) for one unit: the compressed model's tensor on CPU, experts sliced out, in the
    export dtype, one at a time (the caller drops each before asking for the next)."""
    modules = dict(compressed.model.named_modules())
    lazy_paths = {}
    for layer in compressed.layers:
        rt = experts_runtime(layer.experts)
        if rt is not None and rt.weights is not None and hasattr(rt.weights, "layer_tensors"):
            lazy_paths[layer.experts_path] = rt.weights
    by_module: dict[str, list[str]] = {}
    for key in keys:
        path, _, name = key.rpartition(".")
        by_module.setdefault(path, []).append(name)
    for path, names in by_module.items():
        module = modules[path]
        with module_weights(module):  # an offloaded module's weights, loaded for this block only
            # A lazy model's experts are compressed here: this layer only, once.
            lazy = lazy_paths[path].layer_tensors(module) if path in lazy_paths else {}
            for name in names:
                key = f"{path}.{name}" if path else name
                # popped: a compressed tensor is freed as soon as what is written from it exists
                t = (lazy.pop(name) if name in lazy else getattr(module, name)).detach().to("cpu")
                if key in removal.keep:
                    axis, keep = removal.keep[key]
                    t = t.index_select(axis, keep)
                if t.shape != meta[key].shape:
                    raise MoevizError(f"export: {key} has shape {tuple(t.shape)}, the exported config expects "
                                      f"{tuple(meta[key].shape)}")
                yield key, t.to(meta[key].dtype)
                del t
            del lazy


def _write_unit(f, shard: _Shard, skeleton: nn.Module, unit: _Unit, tensors, packer: ExpertPacker | None) -> None:
    """Convert a unit's (key, tensor) stream to checkpoint format (and pack its quantized experts, with a
    packer) and write each result at its offset."""
    if unit.separable:
        batches = (b for k, t in tensors for b in (_expert_chunks(skeleton, k, t) if k in unit.per_expert
                                                    else [_checkpoint_format(skeleton, {k: t})]))
    else:
        batches = iter([_checkpoint_format(skeleton, dict(tensors))])
    written = {}
    for batch in batches:
        out = batch
        if packer is not None:
            out = packer.pack(unit.keys, out)
        del batch
        for k, t in out.items():
            if k not in unit.planned or _layout({k: t}) != _layout({k: unit.planned[k]}):
                raise MoevizError(f"export: {k} {tuple(t.shape)} does not match the planned checkpoint layout")
            if t.numel():
                f.seek(shard.data_start + shard.header[k]["data_offsets"][0])
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)  # the tensor's own bytes, no copy
            written[k] = True
        del out
    if written.keys() != unit.planned.keys():
        raise MoevizError(f"export: {sorted(unit.planned.keys() - written.keys())[:3]} were not produced")


def _write_weights(skeleton: nn.Module, compressed: CompressedModel, removal: _Removal, folder: Path,
                   max_shard_bytes: int, packer: ExpertPacker | None = None) -> int:
    """Writes the shards; returns the bytes of tensor data written (headers excluded)."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    meta = skeleton.state_dict()
    state_keys = set(compressed.model.state_dict())
    if state_keys != set(meta):
        missing, unexpected = sorted(set(meta) - state_keys), sorted(state_keys - set(meta))
        raise MoevizError(f"export: state does not match the exported config (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    for key in getattr(skeleton, "_keys_to_ignore_on_save", None) or []:
        meta.pop(key, None)
    meta = remove_tied_weights_from_state_dict(meta, skeleton)  # safetensors stores an alias once
    units = _plan_units(skeleton, meta, packer)
    shards = _plan_shards(units, max_shard_bytes)
    for shard in shards:
        with open(folder / shard.file, "wb") as f:
            _write_header(f, shard)
            f.truncate(shard.data_start + sum(e - b for b, e in (h["data_offsets"] for h in shard.header.values())))
            for i in shard.units:
                _write_unit(f, shard, skeleton, units[i], _unit_tensors(compressed, units[i].keys, meta, removal), packer)
    if len(shards) > 1:
        index = {"metadata": {"total_parameters": sum(t.numel() for t in meta.values()),
                              "total_size": sum(_nbytes(t) for u in units for t in u.planned.values())},
                 "weight_map": {k: shard.file for shard in shards for k in sorted(shard.header)}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return sum(_nbytes(t) for u in units for t in u.planned.values())


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


@dataclass
class ExportedFiles:
    """What an export wrote: its format, tensor bytes (safetensors data, headers excluded), file bytes, the
    schemes of a packed export and how to load the folder."""

    format: str
    data_bytes: int
    file_bytes: int
    schemes: list[str]
    load: list[str]
    # Largest relative difference between a packed weight as unpacked and the weight moeviz evaluated
    # (0.0: exact; 16-bit checkpoints store the scales in their own dtype)
    max_relative_deviation: float = 0.0


def load_instructions(format: str, packer: ExpertPacker | None) -> list[str]:
    """How to load an exported folder, first line the one call that loads it exactly."""
    if format == "dense":
        return ["AutoModelForCausalLM.from_pretrained(folder)  # plain transformers, every weight dense"]
    deploy = packer.compressed.storage.deployability
    lines = []
    if deploy is not None and deploy.ok("ct-transformers"):
        lines.append("AutoModelForCausalLM.from_pretrained(folder, quantization_config=CompressedTensorsConfig("
                     "dequantize=True))  # transformers + compressed-tensors; from transformers import "
                     "CompressedTensorsConfig")
    else:
        why = "; ".join(v for t in (deploy.verdicts if deploy else []) if t.target == "ct-transformers"
                        for v in t.reasons)
        lines.append("moeviz.load_model(folder)  # moeviz decompresses each layer with its own scheme")
        lines.append(f"# NOT transformers' from_pretrained: its experts would load wrong ({why})")
    if deploy is not None and deploy.ok("ct-vllm"):
        lines.append("vllm serve folder  # vLLM's compressed-tensors MoE path (one scheme per layer)")
    lines.append("moeviz.load_model(folder)  # moeviz recognises compressed-tensors folders")
    return list(dict.fromkeys(lines))


def default_export_folder(loaded: LoadedModel) -> Path:
    """Where the app proposes to export: an absolute folder under ~/moeviz-exports named after the model (a
    relative default would land in whatever folder the app server was started from, e.g. the checkout)."""
    name = Path(str(loaded.info.source)).name or loaded.info.architecture
    return Path.home() / "moeviz-exports" / f"{re.sub(r'[^A-Za-z0-9._-]+', '-', name)}-compressed"


def export_format(requested: str, compressed: CompressedModel) -> str:
    """The format an export writes: as requested, or for "auto" the smallest one a target can hold
    (compressed-tensors when the plan quantizes experts in a way it can pack, else dense)."""
    if requested != "auto":
        return requested
    deploy = compressed.storage.deployability
    return "compressed-tensors" if deploy is not None and deploy.export_format == "compressed-tensors" else "dense"


def exported_files(folder: Path) -> ExportedFiles:
    """What an export wrote into `folder` (its moeviz_export.json)."""
    return ExportedFiles(**json.loads((Path(folder) / "moeviz_export.json").read_text()))


def _folder_readme(loaded: LoadedModel, compressed: CompressedModel, written: ExportedFiles) -> str:
    lines = [f"# {loaded.info.architecture} compressed by moeviz ({written.format})", "",
             f"Source: `{loaded.info.source}`. Plan: `moeviz_plan.json`; measurements: `moeviz_report.md`.", "",
             "## Load", "", "```python"] + written.load + ["```", ""]
    if written.format == "compressed-tensors":
        lines += ["A plain `AutoModelForCausalLM.from_pretrained(folder)` without the quantization_config above is "
                  "not the documented way to load this folder: use the call above, and compare a few logits with "
                  "moeviz's if in doubt.", ""]
    return "\n".join(lines)


def _report(loaded: LoadedModel, compressed: CompressedModel, result: dict | None, messages: list[str],
            written: ExportedFiles | None = None) -> str:
    lines = ["# moeviz export", "", f"- source model: `{loaded.info.source}` (fingerprint `{loaded.fingerprint}`)",
             f"- architecture: {loaded.info.architecture}", ""]
    lines += ["## Plan", "", "```json", compressed.plan.to_json(), "```", ""]
    s = compressed.storage.summary()
    lines += ["## Storage (documented formats, moeviz/compression/formats.py)", "",
              f"- compression ratio, whole model: {s['compression_ratio']:.3f}× (on paper: the documented formats)",
              f"- compression ratio, experts: {s['experts_compression_ratio']:.3f}×",
              f"- parameter bytes if packed: {s['compressed_bytes']:,} (base {s['base_bytes']:,})"]
    if written is not None:
        lines += [f"- this folder ({written.format}): {written.data_bytes:,} bytes of tensors, {written.file_bytes:,} "
                  f"bytes of safetensors files, {s['base_bytes'] / max(written.data_bytes, 1):.3f}× smaller than the "
                  "base's tensors"]
        if written.format == "dense":
            lines.append("- the safetensors in this folder hold dequantized values in the model dtype (pruned "
                         "weights as zeros): only removed experts make it smaller")
        lines += [f"- scheme {x}" for x in written.schemes]
        if written.format == "compressed-tensors":
            lines.append("- packed weights unpack to exactly the values moeviz evaluated" if not written.max_relative_deviation
                         else f"- scales stored in the checkpoint dtype (as llm-compressor stores them): unpacked weights "
                              f"differ from the values moeviz evaluated by at most {written.max_relative_deviation:.2g} "
                              "of their magnitude (same integer codes)")
        lines += ["", "## How to load this folder", "", "```python"] + written.load + ["```"]
    lines.append("")
    if compressed.plan.activation_bits < 16:
        lines.append(f"- activation fake-quantization ({compressed.plan.activation_bits} bits) is not stored in the "
                     "checkpoint; apply it at inference time")
    so = getattr(compressed, "second_order", None)
    if so:  # SparseGPT / GPTQ: experts whose Hessian had fewer routed calibration tokens than columns
        warned = sorted({(w["layer"], w["expert"]) for w in so["warnings"]})
        lines += ["## Second-order compression (SparseGPT / GPTQ)", "",
                  f"- {so['seconds']:.1f} s at {so['threads']} torch thread(s), Hessian `{compressed.plan.hessian}`, "
                  f"block {compressed.plan.obs_blocksize}, percdamp {compressed.plan.percdamp}, "
                  f"act-order {'on' if compressed.plan.act_order else 'off'}, refit {'on' if compressed.plan.refit else 'off'}",
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
                 result: dict | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 format: str = "dense", overwrite_hint: str = "pass overwrite=True (--overwrite)") -> Path:
    """Write the compressed model to `out` atomically (temporary folder, then rename), streamed: one
    decoder layer's tensors in memory at a time, safetensors shards of at most `max_shard_bytes`
    (whole layers; `model.safetensors.index.json` when there is more than one), in the checkpoint
    format transformers' save_pretrained writes.

    format: "dense" (every weight in the model dtype: pruned zeros, dequantized values) or
    "compressed-tensors" (quantized experts packed as llm-compressor writes them and vLLM serves them,
    `moeviz.compression.ct_pack`; the rest dense). Every refusal happens before anything is written."""
    from transformers import AutoModelForCausalLM

    if format not in EXPORT_FORMATS:
        raise MoevizError(f"export: unknown format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    out = check_destination(loaded, out, overwrite, overwrite_hint)  # resolved; never the source, never a folder we did not write
    removal = _removal(loaded, compressed)
    packer = None
    if format == "compressed-tensors":
        keep = {l.index: compressed.allowed_experts(l.index).nonzero().squeeze(1).cpu() for l in compressed.layers
                if not bool(compressed.allowed_experts(l.index).all())}
        packer = ExpertPacker(compressed, keep)
    config = _export_config(loaded, removal.changes)
    dtype = next(loaded.model.parameters()).dtype
    # Names, shapes, dtypes and weight conversions of the exported model, without its weights.
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if hasattr(skeleton, "tie_weights"):
        skeleton.tie_weights()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        # What save_pretrained writes beside the weights.
        skeleton.config.dtype = str(dtype).split(".")[1]
        skeleton.config.architectures = [type(skeleton).__name__]
        skeleton.config.save_pretrained(tmp)
        if skeleton.can_generate():
            skeleton.generation_config.save_pretrained(tmp)
        data_bytes = _write_weights(skeleton, compressed, removal, tmp, max_shard_bytes, packer)
        if packer is not None:
            if packer.packed_keys == 0:
                raise MoevizError("compressed-tensors export: no expert projection was packed (the checkpoint "
                                  "layout was not recognised); export --format dense")
            cfg = json.loads((tmp / "config.json").read_text())
            cfg["quantization_config"] = packer.config()
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        loaded.tokenizer.save_pretrained(tmp)
        (tmp / "moeviz_plan.json").write_text(compressed.plan.to_json())
        written = ExportedFiles(format, data_bytes, sum(f.stat().st_size for f in tmp.glob("*.safetensors")),
                                packer.describe() if packer else [], load_instructions(format, packer),
                                packer.max_relative_deviation if packer else 0.0)
        (tmp / "moeviz_report.md").write_text(_report(loaded, compressed, result, removal.messages, written))
        (tmp / "README.md").write_text(_folder_readme(loaded, compressed, written))
        (tmp / "moeviz_export.json").write_text(json.dumps(asdict(written), indent=2))
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
