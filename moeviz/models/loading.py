"""Load a Hugging Face MoE causal LM (local folder or hub id) safely, with clear errors.

Checks happen before any weight is read: the source exists, has a config, ships safetensors, has MoE
layers (found on a meta-device copy built from the config), and fits in the memory available.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from moeviz.errors import InsufficientMemoryError, ModelSourceError
from moeviz.models.layers import MoELayer, find_moe_layers, require_moe_layers
from moeviz.models.memory import DTYPE_BYTES, available_bytes, human_bytes
from moeviz.resources import SAMPLE_DATA_DIR

log = logging.getLogger(__name__)

DEMO_MODEL_DIR = SAMPLE_DATA_DIR / "demo-moe"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Headroom for activations, the compressed copies of touched tensors and the rest of the process.
MEMORY_HEADROOM = 1.3
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass
class ModelInfo:
    """JSON-serialisable summary of a loaded model."""

    source: str
    architecture: str
    model_type: str
    dtype: str
    device: str
    num_parameters: int
    num_layers: int
    num_moe_layers: int
    num_experts: int
    top_k: int
    family: str
    routing_rule: str
    fingerprint: str
    distribution: str = "softmax"  # "softmax" / "sigmoid": full router distribution; "selected": chosen weights only
    expert_removal: bool = True  # the routing rule is verified, so tokens can be re-routed
    expert_parameters: int = 0
    layers: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LoadedModel:
    """A model with its tokenizer and the description of its MoE layers. The model is in eval mode with
    gradients off and is treated as read-only: compression works on copies of the tensors it touches."""

    model: nn.Module
    tokenizer: object
    layers: list[MoELayer]
    info: ModelInfo

    @property
    def device(self) -> torch.device:
        """Where the model computes (for an offloaded model: its hooks' execution device, not meta)."""
        from moeviz.models.offload import execution_device

        first = next(self.model.parameters()).device
        return execution_device(self.model) if first.type == "meta" else first

    @property
    def fingerprint(self) -> str:
        return self.info.fingerprint

    @property
    def max_context(self) -> int | None:
        """Longest sequence the model was built for (None when its config does not say)."""
        return context_length(getattr(self.model, "config", None))


# Config attributes that hold a model's context length, most common first.
_CONTEXT_ATTRS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def context_length(config) -> int | None:
    for name in _CONTEXT_ATTRS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def short_reason(error: Exception, limit: int = 160) -> str:
    """The first sentence of a library's error, capped: transformers' refusals embed lists of
    hundreds of class names (kilobytes), which must not reach a one-line message."""
    text = " ".join(str(error).split())
    for stop in (". ", "; ", ": ["):
        if stop in text:
            text = text.split(stop)[0]
            break
    return text if len(text) <= limit else text[: limit - 1] + "…"


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelSourceError(f"unsupported dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_device(device: str) -> str:
    """ModelSourceError for a device torch cannot parse or this machine does not have; found before
    reading the config, not as a RuntimeError from `model.to` after the weights are read."""
    try:
        dev = torch.device(str(device).strip())
    except RuntimeError:
        raise ModelSourceError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ModelSourceError(f"device {device!r}: no CUDA GPU is available here; use cpu")
        if dev.index is not None and dev.index >= count:
            raise ModelSourceError(
                f"device {device!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelSourceError(f"device {device!r}: MPS is not available here; use cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ModelSourceError(f"device {device!r} is not supported; use cpu, cuda, cuda:N or mps")
    return str(dev)


def resolve_source(source: str | os.PathLike | None) -> tuple[str, Path | None]:
    """(source string, local folder or None for a hub id). Raises ModelSourceError with what was found."""
    if source is None or str(source).strip() in ("", "demo"):
        source = DEMO_MODEL_DIR
    text = str(source).strip()
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            found = sorted(p.name for p in path.iterdir())[:8]
            raise ModelSourceError(
                f"folder {path} has no config.json (found: {', '.join(found) or 'nothing'}); "
                "point to a Hugging Face model folder saved with save_pretrained"
            )
        weights = list(path.glob("*.safetensors"))
        if not weights:
            pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
            what = f"only pickle weights ({', '.join(pickled[:3])})" if pickled else "no weight files"
            raise ModelSourceError(
                f"folder {path} has {what}; moeviz loads weights from safetensors only "
                "(re-save the model with save_pretrained(..., safe_serialization=True))"
            )
        return str(path), path
    if path.exists():
        raise ModelSourceError(f"{path} is a file, not a model folder; pass the folder that holds config.json")
    if _HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        return text, None
    raise ModelSourceError(
        f"model folder {path} does not exist, and {text!r} is not a Hugging Face hub id (owner/name)"
    )


def _load_config(source: str, local: Path | None, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ModelSourceError(
                f"{source} needs custom code from its repository; moeviz runs it only if you turn on "
                "trust_remote_code (only do so for repositories you trust)"
            ) from e
        unknown = re.search(r"model type `([^`]+)`", str(e))
        if unknown:  # transformers' text is three sentences long; say it in one
            import transformers

            raise ModelSourceError(
                f"{source}: model type {unknown.group(1)!r} is unknown to transformers {transformers.__version__}; "
                "upgrade transformers, or turn on trust_remote_code if the repository ships its own code"
            ) from None
        raise ModelSourceError(f"cannot read the config of {source}: {short_reason(e)}") from e
    except OSError as e:
        if local is None:
            offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in str(e).lower() or "connect" in str(
                e
            ).lower()
            why = "the Hugging Face Hub is not reachable (offline?)" if offline else str(e).splitlines()[0]
            raise ModelSourceError(
                f"cannot load hub model {source!r}: {why}. Download it where there is network "
                f"(`huggingface-cli download {source} --local-dir DIR`) and pass the folder instead"
            ) from e
        raise ModelSourceError(f"cannot read the config in {local}: {short_reason(e)}") from e


def weight_dtype(config, dtype: torch.dtype | str) -> torch.dtype:
    """The dtype weights will have once loaded ('auto' = the checkpoint's dtype)."""
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = DTYPES.get(dtype, torch.float32)
    return dtype


def check_memory(num_parameters: int, config, dtype, device: str, device_map) -> int:
    """Bytes the weights need in `dtype`; InsufficientMemoryError if that (with headroom) won't fit."""
    need = num_parameters * DTYPE_BYTES.get(weight_dtype(config, dtype), 4)
    if device_map == "auto":
        have = available_bytes("cpu") + sum(available_bytes(f"cuda:{i}") for i in range(torch.cuda.device_count()))
        where = "all devices (device_map='auto')"
    else:
        have = available_bytes(device)
        where = str(device)
    if need * MEMORY_HEADROOM > have:
        name = (getattr(config, "architectures", None) or [type(config).__name__])[0]
        raise InsufficientMemoryError(
            f"{name} needs about {human_bytes(need)} for its weights (plus {int((MEMORY_HEADROOM - 1) * 100)}% "
            f"headroom) but only {human_bytes(have)} is available on {where}. Pick a smaller model, "
            "a 16-bit dtype, or spread it over GPUs with device_map='auto'."
        )
    return need


def fingerprint_folder(folder: Path) -> str:
    """Content identity of a model folder: config + every safetensors file (full hash when small,
    header + size when large, so fingerprinting a 100 GB model stays instant)."""
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for f in sorted(folder.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            if size <= 64 * 2**20:
                h.update(fh.read())
            else:
                header_len = int.from_bytes(fh.read(8), "little")
                h.update(fh.read(header_len))
    return h.hexdigest()[:16]


def _fingerprint(source: str, local: Path | None, config) -> str:
    """Identity of the files (folder content or hub commit); `model_fingerprint` adds dtype and device."""
    if local is not None:
        return fingerprint_folder(local)
    commit = getattr(config, "_commit_hash", None) or ""
    return hashlib.sha256(f"{source}@{commit}".encode()).hexdigest()[:16]


def model_fingerprint(content: str, dtype: str, device: str) -> str:
    """Identity of a *loaded* model: the same folder in float32 and bfloat16, or on CPU and GPU,
    gives different outputs, so statistics, evaluators and stored runs must not be shared."""
    return hashlib.sha256(f"{content}|{dtype}|{device}".encode()).hexdigest()[:16]


def _placement(model: nn.Module, device_map) -> str:
    """The device for the fingerprint: one device, or every device of a spread (device_map) model."""
    devices = sorted({str(p.device) for p in model.parameters()})
    return devices[0] if device_map is None and len(devices) == 1 else "map:" + ",".join(devices)


def check_finite(model: nn.Module, dtype: torch.dtype | str = "auto") -> None:
    """ModelSourceError naming the first parameter or buffer holding NaN or Inf: such a model loads,
    then fails deep inside calibration (an IndexError from the router's top-k, a stuck progress bar)."""
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if not tensor.is_floating_point() or tensor.is_meta:
            continue
        bad = _count_nonfinite(tensor.detach())
        if bad:
            nan, inf = bad
            hint = ("; float16 cannot hold this checkpoint's values: load it in bfloat16 or float32"
                    if dtype == torch.float16 and nan == 0 else "; the checkpoint is corrupt or comes from a "
                    "diverged training run: re-download or re-export it")
            raise ModelSourceError(
                f"weight {name} {tuple(tensor.shape)} holds {nan} NaN and {inf} infinite values{hint}"
            )


def _count_nonfinite(tensor: torch.Tensor, chunk: int = 1 << 24) -> tuple[int, int] | None:
    """(NaN count, Inf count) or None when all finite; in chunks so a 10 GB expert tensor needs
    no 10 GB temporary."""
    flat = tensor.reshape(-1)
    if all(bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk)):
        return None
    nan = sum(int(torch.isnan(flat[i:i + chunk]).sum()) for i in range(0, flat.numel(), chunk))
    return nan, sum(int(torch.isinf(flat[i:i + chunk]).sum()) for i in range(0, flat.numel(), chunk))


def _load_tokenizer(source: str, trust_remote_code: bool):
    """The model's tokenizer; a folder without one gets a one-line ModelSourceError instead of
    transformers' multi-line ValueError about slow and fast tokenizers."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        folder = Path(source)
        why = ("it has no tokenizer files" if folder.is_dir() and not any(folder.glob("tokenizer*"))
               else short_reason(e, 100))
        raise ModelSourceError(
            f"cannot load the tokenizer of {source}: {why}; save it next to the model "
            "(tokenizer.save_pretrained(folder)) or use the folder the model was downloaded to"
        ) from None


def _skeleton(config, trust_remote_code: bool) -> nn.Module:
    """The model built from its config on the meta device: every shape, no weight read or allocated."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError:  # transformers' message lists every causal LM class (kilobytes): not repeated
        architecture = (getattr(config, "architectures", None) or [type(config).__name__])[0]
        raise ModelSourceError(
            f"{architecture} (model type {config.model_type!r}) is not a causal LM that transformers' "
            "AutoModelForCausalLM can build; moeviz needs a Mixture-of-Experts causal LM"
        ) from None


@dataclass
class ModelShape:
    """What a model's config says, without its weights: enough to check a plan and a sequence length."""

    layers: list[MoELayer]  # on the meta device: shapes only
    max_context: int | None


def inspect_model(source: str | os.PathLike | None = None, trust_remote_code: bool = False) -> ModelShape:
    """The MoE layers and context of a model, from its config alone (a meta-device skeleton): the CLI
    checks a plan against them before spending the time to load and calibrate."""
    source, local = resolve_source(source)
    config = _load_config(source, local, trust_remote_code)
    return ModelShape(require_moe_layers(_skeleton(config, trust_remote_code)), context_length(config))


def load_model(
    source: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = "auto",
    device: str = "cpu",
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
    check_memory_first: bool = True,
    show_progress: bool = False,
    max_memory: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> LoadedModel:
    """Load an MoE causal LM and its tokenizer.

    source: a local folder, a hub id ("owner/name"), or None / "demo" for the bundled demo model.
    dtype: "auto" (the checkpoint's), "float32", "bfloat16" or "float16".
    device: where to put the whole model; `device_map="auto"` instead spreads it with accelerate.
    trust_remote_code: off by default; turn on only for repositories you trust.
    show_progress: show transformers' per-shard loading bar (useful for large checkpoints).
    max_memory: per-device budget for accelerate, e.g. {"cpu": "8GiB"} or {0: "20GiB", "cpu": "60GiB"};
        what does not fit is offloaded (to CPU RAM, else to `offload_folder` on disk) and loaded
        around each module's forward (implies device_map="auto"; see moeviz.models.offload).
    """
    from transformers import AutoModelForCausalLM

    if max_memory is not None:
        device_map = device_map or "auto"
        check_memory_first = False  # the budget is the caller's: offload takes what does not fit

    source, local = resolve_source(source)
    shown_source = source
    if local is not None:
        local = _dense_if_compressed(local)  # a compressed-tensors folder is read from its dense copy
        source = str(local)
    torch_dtype = resolve_dtype(dtype)
    if device_map is None:
        check_device(device)
    config = _load_config(source, local, trust_remote_code)

    # Refuse non-MoE models, and models too large, before reading any weight: inspect a weightless
    # copy built on the meta device.
    skeleton = _skeleton(config, trust_remote_code)
    require_moe_layers(skeleton)
    num_parameters = sum(p.numel() for p in skeleton.parameters())
    del skeleton
    if check_memory_first:
        check_memory(num_parameters, config, torch_dtype, device, device_map)

    kwargs = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code, use_safetensors=True)
    if device_map is not None:
        kwargs["device_map"] = device_map
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    if offload_folder is not None:
        kwargs["offload_folder"] = str(offload_folder)
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not show_progress:
        hf_logging.disable_progress_bar()
    try:
        tokenizer = _load_tokenizer(source, trust_remote_code)  # first: it is quick, the weights are not
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)  # memory: see moeviz.runtime_config
    except OSError as e:
        raise ModelSourceError(f"cannot load {source}: {str(e).splitlines()[0]}") from e
    except SafetensorError as e:  # a truncated download or a file that is not safetensors at all
        raise ModelSourceError(
            f"cannot read the weights of {source}: {short_reason(e)}; the safetensors file is damaged or "
            "incomplete (download or save it again)"
        ) from None
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    if device_map is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    check_finite(model, torch_dtype)
    layers = require_moe_layers(model)
    verify_model_layers(model, layers)
    first = layers[0]
    info = ModelInfo(
        source=shown_source,
        architecture=type(model).__name__,
        model_type=config.model_type,
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        device=str(next(model.parameters()).device),
        num_parameters=sum(p.numel() for p in model.parameters()),
        num_layers=int(getattr(config, "num_hidden_layers", len(layers))),
        num_moe_layers=len(layers),
        num_experts=first.num_experts,
        top_k=first.top_k,
        family=first.adapter.name,
        routing_rule=first.routing_rule,
        fingerprint=_fingerprint(source, local, config),
        distribution=first.distribution,
        expert_removal=all(l.adapter.supports_rerouting for l in layers),
        expert_parameters=sum(l.expert_param_count() * l.num_experts for l in layers),
        layers=[l.to_dict() for l in layers],
    )
    info.fingerprint = model_fingerprint(info.fingerprint, info.dtype, _placement(model, device_map))
    return LoadedModel(model=model, tokenizer=tokenizer, layers=layers, info=info)


def _dense_if_compressed(local: Path) -> Path:
    """The folder to read: `local` itself, or for a compressed-tensors checkpoint (moeviz's exports, llm-compressor's
    output) its dense copy in moeviz's data folder (`moeviz.models.ct_checkpoint.dense_copy`)."""
    from moeviz.models import ct_checkpoint
    from moeviz.resources import data_dir

    if ct_checkpoint.compressed_tensors_config(local) is None:
        return local
    return ct_checkpoint.dense_copy(local, data_dir() / "dequantized", fingerprint_folder(local))


def verify_model_layers(model: nn.Module, layers: list[MoELayer]) -> None:
    """`verify_layers` with a failing probe forward turned into a one-line refusal."""
    from moeviz.errors import NotAnMoEModelError
    from moeviz.models.verify import verify_layers

    try:
        verify_layers(model, layers)
    except NotAnMoEModelError:
        raise
    except Exception as e:  # the model's own forward failed on random tokens
        first = (str(e).splitlines() or [""])[0][:160]
        raise NotAnMoEModelError(
            f"{type(model).__name__}: a forward pass on random tokens failed ({type(e).__name__}: {first})"
        ) from e


def describe_model(model: nn.Module) -> list[MoELayer]:
    """The MoE layers of an already-built model (e.g. one you constructed yourself), routing verified."""
    layers = require_moe_layers(model)
    verify_model_layers(model, layers)
    return layers


__all__ = ["LoadedModel", "ModelInfo", "ModelShape", "load_model", "inspect_model", "context_length", "check_finite",
           "describe_model", "find_moe_layers", "DEMO_MODEL_DIR"]
