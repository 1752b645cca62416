"""Reading compressed-tensors checkpoints (moeviz's packed exports, llm-compressor's output): every packed
module decompressed by compressed-tensors itself, with the config group that targets it, into a dense copy
that the ordinary loader reads. transformers applies one experts scheme to a whole model and passes no zero
points to its experts loader; decompressing module by module loads per-layer schemes and asymmetric experts
exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from moeviz.errors import MoevizError

PACKED_NAMES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")


def compressed_tensors_config(folder: Path) -> dict | None:
    """The folder's compressed-tensors `quantization_config`, or None for any other checkpoint."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    q = config.get("quantization_config") or {}
    return q if q.get("quant_method") == "compressed-tensors" else None


def scheme_of(module: str, qconfig: dict):
    """The config group that quantizes `module` (compressed-tensors' own name matching: `re:` targets match
    from the start of the name; a class-name target such as "Linear" matches every packed module), or None
    when `ignore` names it."""
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.utils.match import match_name

    if any(match_name(module, t) for t in qconfig.get("ignore") or []):
        return None
    for group in (qconfig.get("config_groups") or {}).values():
        targets = group.get("targets") or []
        if any(match_name(module, t) if t.startswith("re:") else True for t in targets):
            return QuantizationScheme.model_validate(group)
    return None


def dequantize_folder(src: Path, dst: Path) -> Path:
    """Write a dense copy of the compressed-tensors folder `src` into `dst` (config without its
    quantization_config, every packed module decompressed by compressed-tensors itself to the config's
    dtype, one module at a time; tokenizer and other files copied). Atomic: `dst` appears complete or not."""
    from compressed_tensors.compressors import BaseCompressor
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    qconfig = compressed_tensors_config(src)
    if qconfig is None:
        raise MoevizError(f"{src} is not a compressed-tensors checkpoint (no quantization_config with "
                          "quant_method compressed-tensors)")
    fmt = qconfig.get("format")
    config = json.loads((src / "config.json").read_text())
    dtype = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "float32"))
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy2(f, tmp / f.name)
    config.pop("quantization_config")
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    weight_map = {}
    for shard in sorted(src.glob("*.safetensors")):
        out: dict[str, torch.Tensor] = {}
        with safe_open(shard, "pt") as f:
            keys = list(f.keys())
            packed_modules = sorted({k[: -len(".weight_packed")] for k in keys if k.endswith(".weight_packed")})
            for module in packed_modules:
                scheme = scheme_of(module, qconfig)
                if scheme is None:
                    raise MoevizError(f"{src}: {module} is packed but no config group of its quantization_config "
                                      "targets it")
                names = [n for n in PACKED_NAMES if f"{module}.{n}" in keys]
                state = {n: f.get_tensor(f"{module}.{n}") for n in names}
                try:
                    compressor = BaseCompressor.get_value_from_registry(scheme.format or fmt)
                    dense = compressor.decompress(state, scheme)["weight"]
                except Exception as e:  # an unsupported format or scheme: one line, the module named
                    raise MoevizError(f"{src}: cannot decompress {module} ({scheme.format or fmt}): {e}") from e
                out[f"{module}.weight"] = dense.to(dtype)
            done = {f"{m}.{n}" for m in packed_modules for n in PACKED_NAMES}
            for k in keys:
                if k not in done:
                    out[k] = f.get_tensor(k)
        save_file(out, tmp / shard.name, metadata={"format": "pt"})
        weight_map.update({k: shard.name for k in out})
    if (src / "model.safetensors.index.json").exists():
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst


def dense_copy(folder: Path, cache_root: Path, fingerprint: str) -> Path:
    """A dense copy of a compressed-tensors folder, made once per folder content (`fingerprint`) under
    `cache_root`."""
    dst = Path(cache_root) / f"dense-{fingerprint}"
    if not (dst / "config.json").exists():
        dequantize_folder(folder, dst)
    return dst
