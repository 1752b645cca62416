"""Compare any compressed checkpoint with its base: a folder written by another tool (compressed-tensors
pack-quantized as llm-compressor writes it, or a dense folder of the same architecture: a pruned or dequantized
export) becomes a `CompressedModel` that `Evaluator.evaluate` measures exactly as it measures a moeviz plan
(perplexity, accuracy, routing drift, load-balance CV, latency), with its storage read from the files.

    cm = external_checkpoint(base, "path/to/compressed")   # refused, with the reason, unless comparable
    result = Evaluator(base, held_out).evaluate(cm)
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch

from moeviz.compression.apply import CompressedModel, ExpertState
from moeviz.compression.ct_pack import EXPERT_KEY, PROJECTION_OF
from moeviz.compression.plan import CompressionPlan
from moeviz.compression.storage import StorageReport
from moeviz.errors import MoevizError
from moeviz.models import ct_checkpoint
from moeviz.models.loading import LoadedModel, load_model

_DECODER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def check_comparable(base: LoadedModel, other: LoadedModel) -> None:
    """Refuses, naming the first difference, unless `other` has the base's vocabulary and MoE geometry (same MoE
    layers, experts, top-k and projection shapes: routing drift compares expert by expert)."""
    what = f"{other.info.source} cannot be compared with {base.info.source}"
    v_base, v_other = base.model.get_input_embeddings().weight.shape, other.model.get_input_embeddings().weight.shape
    if v_base != v_other:
        raise MoevizError(f"{what}: embeddings {tuple(v_other)} vs the base's {tuple(v_base)} (another vocabulary or "
                          "hidden size)")
    if len(other.layers) != len(base.layers):
        raise MoevizError(f"{what}: {len(other.layers)} MoE layers vs the base's {len(base.layers)}")
    for a, b in zip(base.layers, other.layers):
        if (a.num_experts, a.top_k) != (b.num_experts, b.top_k):
            raise MoevizError(f"{what}: MoE layer {a.index} has {b.num_experts} experts (top-{b.top_k}) vs the base's "
                              f"{a.num_experts} (top-{a.top_k}); a checkpoint with removed experts cannot be compared "
                              "expert by expert")
        for p in a.projections():
            if p not in b.projections() or a.weight(p).shape != b.weight(p).shape:
                raise MoevizError(f"{what}: MoE layer {a.index} {p} is {tuple(b.weight(p).shape) if p in b.projections() else 'missing'} "
                                  f"vs the base's {tuple(a.weight(p).shape)}")


def _tensor_bytes(folder: Path) -> dict[str, int]:
    """Checkpoint key -> bytes of its data, read from the safetensors headers (no tensor read)."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with f.open("rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        out.update({k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"})
    return out


def _file_storage(base: LoadedModel, other: LoadedModel, folder: Path | None, zeros: dict) -> StorageReport:
    """Storage of the compressed checkpoint as its files hold it: per expert projection the bytes of its keys
    (packed codes, scales, zero points, or a dense weight), the rest in one sum; the base counted dense."""
    qconfig = ct_checkpoint.compressed_tensors_config(folder) if folder is not None else None
    sizes = _tensor_bytes(folder) if folder is not None else {}
    by_decoder = {}
    for layer in other.layers:
        m = _DECODER_INDEX.search(layer.experts_path + ".")
        if m:
            by_decoder[int(m.group(1))] = layer
    per_expert: dict[tuple[int, int, str], int] = {}
    bits: dict[tuple[int, int, str], int] = {}
    for key, nbytes in sizes.items():
        stem = key.rsplit(".", 1)[0]
        m = EXPERT_KEY.match(stem + ".weight")
        d = _DECODER_INDEX.search(key)
        if not (m and d and m.group("name") in PROJECTION_OF and int(d.group(1)) in by_decoder):
            continue
        where = (by_decoder[int(d.group(1))].index, int(m.group("expert")), PROJECTION_OF[m.group("name")])
        per_expert[where] = per_expert.get(where, 0) + nbytes
        if key.endswith(".weight_packed") and qconfig is not None:
            scheme = ct_checkpoint.scheme_of(stem, qconfig)
            bits[where] = scheme.weights.num_bits if scheme is not None and scheme.weights is not None else 16
    tensors, exp_base, exp_bytes = [], 0, 0
    for layer in base.layers:
        size = layer.weight("down").element_size()
        for e in range(layer.num_experts):
            for p in layer.projections():
                numel = layer.weight(p)[e].numel()
                dense = numel * size
                stored = per_expert.get((layer.index, e, p), dense)  # a hub id: no files, counted dense
                b = bits.get((layer.index, e, p), 8 * size)
                tensors.append(dict(layer=layer.index, expert=e, tensor=p, format="packed" if b < 8 * size else "dense",
                                    bytes=stored, dense_bytes=dense, numel=numel,
                                    nonzero=numel - zeros.get((layer.index, e, p), 0), stored_values=numel, bits=b,
                                    value_bytes=stored, metadata_bytes=0, scale_bytes=0, structure=None, n=None, m=None,
                                    group_size=None, symmetric=None, compression_ratio=dense / max(stored, 1)))
                exp_base += dense
                exp_bytes += stored
    router = sum(l.router_weight.numel() * l.router_weight.element_size() for l in base.layers)
    base_total = sum(p.numel() * p.element_size() for p in base.model.parameters())
    other_base = base_total - exp_base - router
    other = (sum(sizes.values()) - sum(per_expert.values()) - router) if sizes else other_base
    return StorageReport(tensors, exp_base, exp_bytes, router, router, other if other > 0 else other_base,
                         checkpoint_dtype=base.info.dtype)


def external_checkpoint(base: LoadedModel, source: str | Path, name: str | None = None) -> CompressedModel:
    """The checkpoint at `source` (a folder or hub id; compressed-tensors folders are decompressed by
    moeviz, `moeviz.models.ct_checkpoint`) as a CompressedModel of `base`, refused unless comparable."""
    start = time.perf_counter()
    other = load_model(source, dtype=base.info.dtype, device=base.info.device)
    check_comparable(base, other)
    folder = Path(source) if Path(str(source)).expanduser().is_dir() else None
    zeros, experts = {}, []
    for layer in other.layers:
        total = layer.expert_param_count()
        for e in range(layer.num_experts):
            z = {p: int((layer.weight(p)[e] == 0).sum()) for p in layer.projections()}
            zeros.update({(layer.index, e, p): n for p, n in z.items()})
            experts.append(ExpertState(layer.index, e, sum(z.values()) / total, 16, False, sum(z.values()) / total))
    storage = _file_storage(base, other, folder, zeros)
    for state in experts:  # the bit width the files store each expert at (16: dense)
        b = {t["bits"] for t in storage.tensors if (t["layer"], t["expert"]) == (state.layer, state.expert)}
        state.bits = min(b) if b and min(b) < 16 else 16
    label = name or f"external: {Path(str(source)).name}"
    return CompressedModel(other.model, other.layers, CompressionPlan(name=label), experts, storage,
                           time.perf_counter() - start)
