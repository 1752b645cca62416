"""Which targets can hold a plan, why not, what each keeps of it, and the bytes of the best exportable format.

Targets (checked against compressed-tensors 0.20, transformers 5.25 and vLLM's compressed-tensors MoE path):

* `hf-dense`: a Hugging Face folder of dense tensors (`moeviz export --format dense`). Holds every plan
  whose removal leaves the same expert count in every MoE layer (a config has one expert count).
  Pruned weights are zeros, quantized weights their dequantized values: only removal makes it smaller.
* `ct-transformers`: compressed-tensors pack-quantized loaded by plain transformers with
  `CompressedTensorsConfig(dequantize=True)`. transformers applies one scheme to the experts of every
  layer and passes no zero points to its experts loader: one symmetric 4- or 8-bit scheme for all experts.
* `ct-vllm`: the same folder served by vLLM: one scheme per MoE layer (gate, up and down of every expert
  alike; layers may differ), symmetric 4 or 8 bits (WNA16 kernels), unquantized layers stay dense.

No target serves sparsity any more (compressed-tensors and vLLM removed their sparse formats): pruned
weights ship as zeros, 2:4 gives no served speed-up, and only whole-expert removal shrinks a checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from moeviz.compression.plan import CompressionPlan
from moeviz.compression.ct_pack import PackScheme, scheme_for
from moeviz.errors import MoevizError
from moeviz.models.layers import MoELayer

TARGETS = {"hf-dense": "Hugging Face folder, dense tensors",
           "ct-transformers": "compressed-tensors, loaded by transformers",
           "ct-vllm": "compressed-tensors, served by vLLM"}
SHAPE_BYTES = 16  # weight_shape: int64 [2] per packed projection


@dataclass
class TargetVerdict:
    target: str
    label: str
    ok: bool
    reasons: list[str] = field(default_factory=list)  # why not (empty when ok)
    keeps: list[str] = field(default_factory=list)  # what of the plan the target keeps, when ok


@dataclass
class Deployability:
    verdicts: list[TargetVerdict]
    export_format: str | None  # the smallest format a target can hold: "compressed-tensors", "dense" or None
    export_bytes: int | None  # its tensor bytes (headers excluded)
    quantized: bool = False  # some kept expert is quantized below 16 bits

    def ok(self, target: str) -> bool:
        return any(v.ok for v in self.verdicts if v.target == target)

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        """One line per target: yes / no, with what it keeps or why not."""
        out = []
        for v in self.verdicts:
            text = "; ".join(v.keeps if v.ok else v.reasons)
            out.append(f"{'yes' if v.ok else 'no '}  {v.label}" + (f": {text}" if text else ""))
        return out


def removal_counts(layers: list[MoELayer], removed: np.ndarray) -> list[int]:
    return [int(removed[l.index, : l.num_experts].sum()) for l in layers]


def layer_schemes(plan: CompressionPlan, layers: list[MoELayer], bits: np.ndarray,
                  removed: np.ndarray) -> dict[int, PackScheme | None]:
    """MoE layer -> the one scheme of its quantized experts (None: experts left unquantized). Raises with
    the reason when a layer mixes bit widths (compressed-tensors / vLLM take one scheme per layer), a width
    is not 4 or 8, or the layer's projections would need different group sizes."""
    out: dict[int, PackScheme | None] = {}
    for layer in layers:
        kept = bits[layer.index, : layer.num_experts][~removed[layer.index, : layer.num_experts]]
        widths = sorted(set(kept.tolist()))
        if widths == [16] or not widths:
            out[layer.index] = None
            continue
        if len(widths) > 1:
            raise MoevizError(
                f"compressed-tensors export: MoE layer {layer.index} has experts at {', '.join(map(str, widths))} bits "
                "(16 = unquantized); a compressed-tensors checkpoint holds one scheme per layer (vLLM loads no other), "
                "so give every expert of a layer the same bits, or export --format dense")
        schemes = {scheme_for(widths[0], plan.quant.group_size, plan.quant.symmetric, layer.weight(p).shape[-1])
                   for p in layer.projections()}
        if len(schemes) > 1:
            raise MoevizError(
                f"compressed-tensors export: the projections of MoE layer {layer.index} need different schemes "
                f"({', '.join(sorted(s.label() for s in schemes))}); choose a group size dividing every projection's "
                "input width, or -1")
        out[layer.index] = schemes.pop()
    if all(s is None for s in out.values()):
        raise MoevizError("compressed-tensors export: the plan quantizes no expert, so there is nothing to pack "
                          "(pruned weights ship as zeros in either format); export --format dense")
    return out


def _packed_bytes(out: int, n: int, s: PackScheme, dtype_bytes: int) -> int:
    """Bytes compressed-tensors writes for one packed [out, n] projection (see ct_pack.packed_layout)."""
    groups = 1 if s.group_size == -1 else n // s.group_size
    b = out * -(-n * s.bits // 32) * 4 + out * groups * dtype_bytes + SHAPE_BYTES
    if not s.symmetric:
        b += -(-out * s.bits // 32) * groups * 4
    return b


def experts_file_bytes(layers: list[MoELayer], removed: np.ndarray, dtype_bytes: int,
                       schemes: dict[int, PackScheme | None] | None) -> int:
    """Tensor bytes of the experts in a dense (schemes None) or compressed-tensors export."""
    total = 0
    for layer in layers:
        kept = int((~removed[layer.index, : layer.num_experts]).sum())
        s = None if schemes is None else schemes.get(layer.index)
        for p in layer.projections():
            out, n = layer.weight(p).shape[-2:]
            total += kept * (_packed_bytes(out, n, s, dtype_bytes) if s is not None else out * n * dtype_bytes)
    return total


def assess(plan: CompressionPlan, layers: list[MoELayer], bits: np.ndarray, removed: np.ndarray,
           dtype_bytes: int, rest_bytes: int) -> Deployability:
    """The verdict of every target for a resolved plan (bits [L, E], removed [L, E]); `rest_bytes`: every
    tensor but the experts' and the per-expert ones (`per_expert_bytes`: routers, correction biases), which
    every format stores dense (per-expert tensors without the entries of removed experts)."""
    pruned = plan.pruning.sparsity > 0 or plan.nm() is not None or any((o.sparsity or 0) > 0 for o in plan.overrides)
    counts = removal_counts(layers, removed)
    common: list[str] = []
    if len(set(counts)) > 1:
        common.append(f"removes {counts} experts per MoE layer; a checkpoint has one expert count, so remove the same "
                      "number in every layer")
    keeps = []
    if any(counts):
        keeps.append(f"removal: {counts[0]} experts per layer physically removed")
    if pruned:
        keeps.append("pruning: zeros only (no sparse format is served; no 2:4 speed-up)" if plan.nm() else
                     "pruning: zeros only (no sparse format is served)")
    if plan.activation_bits < 16:
        keeps.append(f"activation quantization ({plan.activation_bits} bits): not stored")
    if plan.router_bits < 16 or plan.router_sparsity > 0:
        keeps.append("router: stored dense (its compressed values)")
    quantized = bool((bits[~removed] < 16).any()) if removed.size else False
    dense_keeps = keeps + (["quantization: dequantized values, no smaller file"] if quantized else [])
    verdicts = [TargetVerdict("hf-dense", TARGETS["hf-dense"], not common, list(common), dense_keeps)]

    schemes, why = None, None
    try:
        schemes = layer_schemes(plan, layers, bits, removed)
    except MoevizError as e:
        why = str(e).removeprefix("compressed-tensors export: ")
    ct_reasons = common + ([why] if why else [])
    ct_keeps = keeps + (["quantization: packed " + ", ".join(sorted({s.label() for s in schemes.values() if s}))]
                        if schemes else [])
    vllm, hf = list(ct_reasons), list(ct_reasons)
    if schemes and not plan.quant.symmetric:
        vllm.append("asymmetric experts: vLLM's compressed-tensors MoE kernels (WNA16) are checked for symmetric "
                    "weights only")
        hf.append("asymmetric experts: transformers' experts loader passes no zero points (load it with "
                  "moeviz.load_model instead)")
    if schemes and len(set(schemes.values())) > 1:
        hf.append("transformers applies one scheme to the experts of every layer; this plan needs "
                  + ", ".join(sorted("unquantized" if s is None else s.label() for s in set(schemes.values()))))
    verdicts.append(TargetVerdict("ct-transformers", TARGETS["ct-transformers"], not hf, hf, ct_keeps))
    verdicts.append(TargetVerdict("ct-vllm", TARGETS["ct-vllm"], not vllm, vllm, ct_keeps))

    if schemes and not ct_reasons:
        fmt, experts = "compressed-tensors", experts_file_bytes(layers, removed, dtype_bytes, schemes)
    elif not common:
        fmt, experts = "dense", experts_file_bytes(layers, removed, dtype_bytes, None)
    else:
        fmt, experts = None, None
    return Deployability(verdicts, fmt, None if experts is None else experts + per_expert_bytes(layers, removed)
                         + rest_bytes, quantized)


def per_expert_bytes(layers: list[MoELayer], removed: np.ndarray | None = None) -> int:
    """Bytes of the routers' and blocks' per-expert tensors (router weight and biases, correction biases),
    without the entries of removed experts (the export slices them out)."""
    total = 0
    for l in layers:
        kept = l.num_experts if removed is None else int((~removed[l.index, : l.num_experts]).sum())
        for _, t in l.per_expert_tensors():
            nbytes = t.numel() * t.element_size()
            total += nbytes * kept // l.num_experts if t.numel() % l.num_experts == 0 and t.numel() else nbytes
    return total


def export_note(summary: dict, deploy: Deployability | None) -> tuple[str, str | None]:
    """(caption, warning or None) for the app beside a plan's ratio: the ratio of the smallest exportable
    format and the ratio against bf16; a warning as soon as a target that held the plan's kind no longer does."""
    parts = []
    if summary.get("export_compression_ratio"):
        parts.append(f"exportable as {summary['export_format']}: {summary['export_compression_ratio']:.2f}× "
                     "(the bytes that export writes)")
    if summary.get("compression_ratio_bf16") and summary.get("checkpoint_dtype") != "bfloat16":
        parts.append(f"against a bf16 checkpoint: {summary['compression_ratio_bf16']:.2f}× (how papers count)")
    caption = "Ratio on paper counts the documented formats against the " \
              f"{summary.get('checkpoint_dtype') or 'checkpoint'} checkpoint; " + "; ".join(parts)
    if deploy is None:
        return caption, None
    if deploy.export_format is None:
        return caption, "This plan cannot be exported: " + "; ".join(deploy.verdicts[0].reasons)
    if deploy.ok("ct-vllm") or not deploy.quantized:
        return caption, None  # packed for vLLM, or nothing to pack: the dense folder is the format (vLLM serves it)
    why = "; ".join(next(v.reasons for v in deploy.verdicts if v.target == "ct-vllm"))
    return caption, (f"Its quantized experts cannot be packed for vLLM ({why}): an export stores them dequantized, "
                     "no smaller than the base")


def deployability_table(deploy: Deployability | None) -> list[dict]:
    """Rows for the app: target, whether it holds the plan, what it keeps or why not."""
    if deploy is None:
        return []
    return [{"target": v.label, "holds this plan": "yes" if v.ok else "no",
             "what it keeps / why not": "; ".join(v.keeps if v.ok else v.reasons) or "everything"}
            for v in deploy.verdicts]
