"""Packed low-bit experts: quantized experts held as integer codes and computed by real low-bit kernels.

moeviz's compressed models hold *dequantized* weights (the reference: perplexity and accuracy are
computed on them, `moeviz.compression.quantize`), so their speed is the base's. Here each quantized
expert projection W [out, in] is packed from the *same* integer grid and scales moeviz rounded it to
(`quantize.quantize_codes` on the pruned weights for RTN, `quantize.codes_on_grid` on GPTQ's kept grid)
and computed by torch's low-bit matmuls:

* int8, one scale per output channel (``group_size`` -1): ``aten._weight_int8pack_mm`` (CPU; CUDA where
  the installed torch has it). Asymmetric int8 stores ``q - 128`` and subtracts ``rowsum(x) * s * (z - 128)``
  (exact algebra: ``(q - z) s = (q - 128) s - (z - 128) s``).
* int4, grouped: ``aten._weight_int4pack_mm_for_cpu`` (CPU) / ``aten._weight_int4pack_mm`` (CUDA, bf16),
  which dequantize ``(u - 8) * scale + zero`` per group of 32/64/128/256 inputs. Symmetric codes c are
  stored as u = c + 8 with zero 0; asymmetric codes q with zero point z as u = q, zero = (8 - z) * s.
  A group of the plan larger than 256 (or one group per row) uses the largest kernel group dividing it,
  its scale repeated (the same dequantized values).

Everything else has no kernel here and runs the dense path on the reference weights, labelled per expert:
2- and 3-bit, 8-bit with groups, int4 groups that no kernel group divides, and pruning alone (unstructured
or N:M sparsity: a dense kernel is not faster on zeros; pruned weights inside a quantized expert are codes
like any other, the label says the sparsity is not exploited). Each kernel is probed once per (kernel,
device, dtype) against the dense product of the same codes; one that fails or disagrees is not used.

`pack_compressed(compressed)` returns a structural copy of a compressed model whose experts runtimes hold
a `PackedExpertWeights` provider (`moeviz.models.runtime`): the reference expert loop calls the packed
projections (`experts._project`). Only the evaluation's latency (and the benchmarks) run it; the quality
numbers stay on the reference. The packed logits differ from the reference by the kernels' rounding
(scales rounded to the activation dtype, bf16 activations in the int4 kernel, another accumulation order):
`tests/test_packed_experts.py` states and checks the bound.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from moeviz.errors import MoevizError
from moeviz.compression.quantize import QuantCodes, codes_on_grid, quantize_codes
from moeviz.models.layers import MoELayer
from moeviz.models.offload import module_weights
from moeviz.models.runtime import experts_runtime, install_experts_runtime
from moeviz.models.views import structural_copy

INT4_KERNEL_GROUPS = (256, 128, 64, 32)  # group sizes the int4 kernels take, largest first
INT8, INT4 = "int8_channel", "int4_grouped"


# ---------------------------------------------------------------------------- one packed projection

@dataclass(frozen=True, eq=False)
class PackedLinear:
    """One expert projection W [out, in] held packed: calling it on x [n, in] gives x Wᵀ [n, out] in x's
    dtype (the experts module adds its bias)."""

    kernel: str  # INT8 | INT4
    out_features: int
    in_features: int
    group_size: int  # the plan's quantization group (int8: the row)
    qweight: torch.Tensor  # int8 [out, in] | int4 packed by the device's convert op
    scales: torch.Tensor  # int8: [out]; int4: scales_and_zeros [in / kernel_group, out, 2]; in `dtype`
    dtype: torch.dtype  # activations are computed in this dtype (the kernel's)
    kernel_group: int = 0  # int4: the group handed to the kernel (divides group_size)
    offset: torch.Tensor | None = None  # int8 asymmetric: [out] float32 s * (z - 128)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xa = x.to(self.dtype).contiguous()
        if self.kernel == INT8:
            y = torch.ops.aten._weight_int8pack_mm(xa, self.qweight, self.scales)
            if self.offset is not None:  # [n, 1] * [out]: the zero point's share, in float32
                y = (y.float() - xa.float().sum(-1, keepdim=True) * self.offset).to(y.dtype)
        elif self.qweight.device.type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xa, self.qweight, self.kernel_group, self.scales)
        else:
            y = torch.ops.aten._weight_int4pack_mm(xa, self.qweight, self.kernel_group, self.scales)
        return y.to(x.dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.offset) if t is not None)

    @property
    def label(self) -> str:
        return "int8 channel" if self.kernel == INT8 else f"int4 g{self.group_size}"


class NoKernel(MoevizError):
    """This projection's setting has no low-bit kernel here (the message says why)."""


def _int4_inner_k_tiles(in_features: int) -> int:
    for tiles in (8, 4, 2):  # CUDA's tinygemm layout needs in % (tiles * 16) == 0
        if in_features % (tiles * 16) == 0:
            return tiles
    raise NoKernel(f"{in_features} input columns: the int4 CUDA kernel needs a multiple of 32")


def pack_codes(q: QuantCodes, dtype: torch.dtype, device: torch.device | str | None = None) -> PackedLinear:
    """Pack codes [out, in] (`quantize_codes` / `codes_on_grid`) for the device's kernel; NoKernel if none.

    dtype: the activations' dtype (the model's); CUDA's int4 kernel computes in bf16."""
    device = torch.device(device or q.codes.device)
    codes, out_f, in_f = q.codes.to(device), q.codes.shape[0], q.codes.shape[1]
    scales = q.scales.to(device=device, dtype=torch.float32)  # [out, G]
    zeros = None if q.zero_points is None else q.zero_points.to(device=device, dtype=torch.float32)
    if q.bits == 8:
        if q.group_size != in_f:
            raise NoKernel(f"8-bit with groups of {q.group_size}: the int8 kernel takes one scale per channel")
        if device.type == "cpu" and dtype == torch.bfloat16 and in_f % 16:
            # measured (torch 2.13): its bf16 path reads 16 columns at a time, past the row's end otherwise
            # (wrong results at 24, 40, 72 columns; a crash in a model)
            raise NoKernel(f"{in_f} input columns: the CPU int8 kernel needs a multiple of 16 in bf16")
        if zeros is None:
            qweight, offset = codes.to(torch.int8), None  # [-127, 127]
        else:  # [0, 255] -> [-128, 127]; (q - z) s = (q - 128) s - (z - 128) s
            qweight, offset = (codes - 128).to(torch.int8), (scales[:, 0] * (zeros[:, 0] - 128)).contiguous()
        return PackedLinear(INT8, out_f, in_f, q.group_size, qweight.contiguous(), scales[:, 0].to(dtype).contiguous(),
                            dtype, 0, offset)
    if q.bits == 4:
        kg = next((g for g in INT4_KERNEL_GROUPS if q.group_size % g == 0), None)
        if kg is None:
            raise NoKernel(f"int4 with groups of {q.group_size}: the int4 kernel takes groups of 32, 64, 128 or 256")
        if out_f % 16:
            raise NoKernel(f"{out_f} output rows: the int4 kernel packs rows 16 at a time (CUDA: 8)")
        dtype = dtype if device.type == "cpu" else torch.bfloat16
        if zeros is None:
            u, zero = codes + 8, torch.zeros_like(scales)  # c in [-7, 7] -> u in [1, 15]
        else:
            u, zero = codes, (8 - zeros) * scales  # (u - 8) s + (8 - z) s = (u - z) s
        rep = q.group_size // kg
        # [out, G] -> [out, in/kg] (each plan group's scale repeated) -> [in/kg, out, 2] (scale, zero)
        sz = torch.stack([scales.repeat_interleave(rep, 1), zero.repeat_interleave(rep, 1)], -1)
        sz = sz.transpose(0, 1).contiguous().to(dtype)
        u = u.to(torch.int32)
        if device.type == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.contiguous(), 2)
        else:  # two codes a byte, even column in the high nibble, then the tinygemm tile layout
            tiles = _int4_inner_k_tiles(in_f)
            try:
                packed = torch.ops.aten._convert_weight_to_int4pack(
                    (u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8).contiguous(), tiles)
            except RuntimeError:  # torch before 2.5 took the int32 codes themselves
                packed = torch.ops.aten._convert_weight_to_int4pack(u.contiguous(), tiles)
        return PackedLinear(INT4, out_f, in_f, q.group_size, packed, sz, dtype, kg)
    raise NoKernel(f"{q.bits}-bit: no {q.bits}-bit kernel in torch")


_PROBED: dict[tuple, str | None] = {}  # (kernel, symmetric, device type, dtype) -> None (works) or why not


def kernel_problem(bits: int, symmetric: bool, device: torch.device | str, dtype: torch.dtype) -> str | None:
    """None if this device's kernel for `bits` packs and multiplies a random [64, 256] weight like the dense
    product of its dequantized codes (checked once per process); else why not."""
    device = torch.device(device)
    key = (bits, symmetric, device.type, dtype)
    if key not in _PROBED:
        try:
            g = torch.Generator().manual_seed(0)
            w = torch.randn(64, 256, generator=g)
            q = quantize_codes(w, bits, -1 if bits == 8 else 64, symmetric)
            p = pack_codes(q, dtype, device)
            x = torch.randn(3, 256, generator=g).to(device=device, dtype=dtype)
            deq = dequantize(q).to(device)
            ref = x.float() @ deq.T
            got = p(x).float()
            err = (got - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
            _PROBED[key] = None if err < 0.05 else f"the {p.label} kernel disagrees with its codes (relative error {err:.2g})"
        except NoKernel as e:
            _PROBED[key] = str(e)
        except (RuntimeError, NotImplementedError, AttributeError) as e:  # op missing on this device / build
            _PROBED[key] = f"no {bits}-bit kernel on {device.type}: {(str(e).splitlines() or [''])[0][:120]}"
    return _PROBED[key]


def dequantize(q: QuantCodes) -> torch.Tensor:
    """float32 [out, in] values of the codes (what the reference weights are, before their dtype cast)."""
    out, inn = q.codes.shape[-2:]
    c = q.codes.reshape(out, inn // q.group_size, q.group_size)
    z = 0 if q.zero_points is None else q.zero_points[..., None]
    return ((c - z) * q.scales[..., None]).reshape(out, inn)


# ---------------------------------------------------------------------------- the weight provider

@dataclass(frozen=True, eq=False)
class PackedExpertWeights:
    """WeightProvider (`moeviz.models.runtime`) of one MoE layer: expert e's (input, down) projections,
    each a `PackedLinear` or a dense tensor in the module's storage layout; None: the module's own."""

    experts: tuple
    labels: tuple[str, ...]

    def __deepcopy__(self, memo):  # immutable: a structural copy shares it
        return self

    def __call__(self, module: nn.Module, e: int):
        got = self.experts[e]
        if got is not None:
            return got
        return (module.gate_up_proj if hasattr(module, "gate_up_proj") and isinstance(module.gate_up_proj, torch.Tensor)
                else module.up_proj)[e], module.down_proj[e]


@dataclass
class PackReport:
    """What `pack_compressed` built: per expert its kernel label and resident bytes; JSON-serialisable."""

    experts: list[dict]  # layer, expert, kernel (label), bytes (resident: packed, or dense where no kernel)
    resident_bytes: int  # every expert's resident bytes (untouched experts: their dense bytes; removed: 0)
    packed_bytes: int  # of the packed projections alone
    storage_bytes: int  # StorageReport.experts_bytes of the same plan (documented formats)
    packed_experts: int  # experts whose every projection runs a low-bit kernel
    dense_experts: int  # compressed experts running the dense path (no kernel), labelled
    kernels: dict  # label -> experts
    device: str
    seconds: float

    def summary(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("experts")
        d["resident_over_storage"] = self.resident_bytes / max(self.storage_bytes, 1)
        return d


@dataclass
class PackedModel:
    model: nn.Module  # structural copy of the compressed model; experts runtimes hold PackedExpertWeights
    layers: list[MoELayer]
    report: PackReport


def kernel_experts(compressed) -> int:
    """How many experts of `compressed` are quantized to a width with a kernel here (4 / 8 bits); 0: packing
    would run everything dense, so the compressed model itself is what to time. From the settings alone."""
    n = 0
    for src in getattr(compressed, "expert_sources", {}).values():
        s = src.settings
        n += int(((np.isin(s.bits, (4, 8))) & ~s.removed).sum())
    return n


def _fused_row_index(layer: MoELayer, name: str, proj: str, storage: torch.Size) -> torch.Tensor:
    """[out] the row of the fused tensor's logical [rows, in] matrix (storage [A, B]: rows = A, or B when
    transposed) that each row of `proj` is: how gate / up sit inside gate_up (halves or interleaved)."""
    A, B = storage
    r = torch.arange(B).expand(A, B) if layer.transposed else torch.arange(A)[:, None].expand(A, B)
    return layer.view(proj, r[None])[0][:, 0]


def _logical(layer: MoELayer, w: torch.Tensor) -> torch.Tensor:
    return w.mT if layer.transposed else w  # storage [in, out] (GPT-OSS) -> [out, in]


def _codes_of(layer: MoELayer, name: str, e: int, pre: torch.Tensor | None, ref: torch.Tensor, bits: int,
              s, grids: dict) -> QuantCodes:
    """The codes of expert e's fused tensor `name` as a logical [rows, in] matrix: GPTQ's kept grid where
    the plan quantized with GPTQ, else RTN's grid of the pruned weights `pre` (what `steps.quantize` rounded)."""
    projs = [p for p in layer.projections() if layer.fused_name(p) == name]
    keys = [f"{layer.index}.{p}" for p in projs]
    if all(k in grids for k in keys):
        rows = _logical(layer, ref).shape[0]
        G = grids[keys[0]].scales.shape[-1]
        scales = torch.empty(rows, G)
        zeros = None if grids[keys[0]].zero_points is None else torch.empty(rows, G)
        for p, k in zip(projs, keys):
            idx = _fused_row_index(layer, name, p, ref.shape)
            scales[idx] = grids[k].scales[e].float().cpu()
            if zeros is not None:
                zeros[idx] = grids[k].zero_points[e].float().cpu()
        return codes_on_grid(_logical(layer, ref), scales, zeros, bits)
    sizes = {s.group_sizes[p] for p in projs}
    if len(sizes) != 1:
        raise NoKernel(f"{name}: its projections have different group sizes {sorted(sizes)}")
    return quantize_codes(_logical(layer, pre), bits, sizes.pop(), s.symmetric)


def pack_compressed(compressed, device: torch.device | str | None = None, allow_dense: bool = True) -> PackedModel:
    """A structural copy of `compressed` (a `CompressedModel`) whose quantized experts run on low-bit kernels.

    Experts with no kernel run dense on their reference weights (the compressed model's tensors; a lazy
    model's are compressed once here and kept: `allow_dense=False` refuses that instead, for a model too
    large to hold dense copies). The base and the compressed model are not changed."""
    from moeviz.compression.lazy import LazyExpertWeights

    start = time.perf_counter()
    sources: dict = getattr(compressed, "expert_sources", {})
    view = structural_copy(compressed.model)
    from moeviz.models.layers import find_moe_layers

    layers = find_moe_layers(view, compressed.layers)
    recovered = getattr(compressed, "recovery", None) is not None
    rows, resident, packed_bytes, n_packed, n_dense, kernels, dev_name = [], 0, 0, 0, 0, {}, "cpu"
    for layer in layers:
        src = sources.get(layer.index)
        in_name = "gate_up_proj" if layer.has_gate else "up_proj"
        names = (in_name, "down_proj")
        E = layer.num_experts
        if src is None:  # no settings to re-derive codes from (a sequential plan): the reference, dense
            dense = layer.expert_param_count() * layer.weight("down").element_size()
            for e in range(E):
                rows.append(dict(layer=layer.index, expert=e, kernel="dense (no settings to pack from)", bytes=dense))
            resident += dense * E
            n_dense += E
            continue
        s = src.settings
        # RTN's grid is computed from the pruned, not yet quantized weights: the same steps with bits 16
        pre_settings = dataclasses.replace(s, bits=np.full_like(s.bits, 16), removed=np.zeros_like(s.removed))
        pre_provider = LazyExpertWeights(src.layer, pre_settings, src.stats_layer, factors=src.factors)
        rt = experts_runtime(layer.experts)
        ref_provider = rt.weights if rt is not None and isinstance(rt.weights, LazyExpertWeights) else None
        entries, labels = [], []
        with torch.no_grad(), module_weights(layer.experts), module_weights(src.layer.experts):
            dtype = layer.weight("down").dtype
            dev = torch.device(device) if device is not None else layer.weight("down").device
            dev_name = str(dev)
            dense_bytes = {n: getattr(layer.experts, n)[0].numel() * getattr(layer.experts, n).element_size() for n in names}
            for e in range(E):
                if s.removed[e]:
                    entries.append(None)
                    labels.append("removed")
                    rows.append(dict(layer=layer.index, expert=e, kernel="removed", bytes=0))
                    continue
                if not s.touches(e):
                    entries.append(None)
                    labels.append("dense (not compressed)")
                    b = sum(dense_bytes.values())
                    rows.append(dict(layer=layer.index, expert=e, kernel=labels[-1], bytes=b))
                    resident += b
                    continue
                bits = int(s.bits[e])
                sparse = bool(s.sparsity[e] > 0)
                # A lazy model's reference weights are computed in this thread's scratch buffers, which the
                # pre-quantization provider below reuses: kept as copies (one expert), and only if needed.
                ref = tuple(getattr(layer.experts, n)[e].detach() for n in names) if ref_provider is None else \
                    (tuple(t.detach().clone() for t in ref_provider(layer.experts, e))
                     if bits >= 16 or compressed.grids or kernel_problem(bits, s.symmetric, dev, dtype) else None)
                pre = pre_provider(src.layer.experts, e) if bits < 16 and not all(
                    f"{layer.index}.{p}" in compressed.grids for p in layer.projections()) else (None, None)
                if recovered and ref is not None:
                    # distillation moved the weights (on their grid, `recovery.constraints`): the codes of the
                    # trained weights themselves (RTN on weights already on a grid returns that grid)
                    pre = ref
                projs, why, b_exp = [], None, 0
                for i, n in enumerate(names):
                    try:
                        if bits >= 16:
                            raise NoKernel("unstructured sparsity: no sparse kernel, the dense kernel is not faster"
                                           if s.nm is None else f"{s.nm[0]}:{s.nm[1]} sparsity: no sparse kernel here")
                        problem = kernel_problem(bits, s.symmetric, dev, dtype)
                        if problem is not None:
                            raise NoKernel(problem)
                        try:
                            p = pack_codes(_codes_of(layer, n, e, pre[i], None if ref is None else ref[i], bits, s,
                                                     compressed.grids), dtype, dev)
                        except (RuntimeError, NotImplementedError) as err:  # a shape this device's kernel refuses
                            raise NoKernel(f"{(str(err).splitlines() or [''])[0][:160]}") from None
                        projs.append(p)
                        b_exp += p.nbytes
                        packed_bytes += p.nbytes
                    except NoKernel as err:
                        why = why or str(err)
                        if ref_provider is not None and not allow_dense:
                            raise NoKernel(f"layer {layer.index} expert {e}: {err}") from None
                        if ref is None:  # e.g. a group size no kernel takes: this expert's reference, copied
                            ref = tuple(t.detach().clone() for t in ref_provider(layer.experts, e))
                            pre = pre_provider(src.layer.experts, e)
                        projs.append(ref[i].to(dev))
                        b_exp += dense_bytes[n]
                if why is None:
                    label = projs[0].label + (" (sparsity not exploited)" if sparse else "")
                    n_packed += 1
                elif all(isinstance(p, torch.Tensor) for p in projs):
                    label = f"dense: {why}"
                    n_dense += 1
                else:
                    label = next(p.label for p in projs if not isinstance(p, torch.Tensor)) + f" (part dense: {why})"
                    n_dense += 1
                entries.append(tuple(projs))
                labels.append(label)
                kernels[label] = kernels.get(label, 0) + 1
                rows.append(dict(layer=layer.index, expert=e, kernel=label, bytes=b_exp))
                resident += b_exp
        install_experts_runtime(layer).weights = PackedExpertWeights(tuple(entries), tuple(labels))
    report = PackReport(rows, resident, packed_bytes, compressed.storage.experts_bytes, n_packed, n_dense, kernels,
                        dev_name, time.perf_counter() - start)
    return PackedModel(view, layers, report)


LAZY_DENSE = ("not measured on a lazily compressed model whose experts have no low-bit kernel (they are "
              "compressed during the forward); apply the plan with lazy=False to measure it")


def timing_model(compressed) -> tuple[nn.Module | None, PackReport | None, str | None]:
    """What to time as the compressed side of a latency measurement: (model, packing report, None), or (None,
    None, why not). The packed model where the plan quantizes experts to a width with a kernel (a lazy model:
    only if every compressed expert has one, so no dense copy of a large model is made); else the compressed
    model itself (dense: pruning alone runs the dense kernel, so it measures what that costs)."""
    if kernel_experts(compressed):
        try:
            packed = pack_compressed(compressed, allow_dense=not compressed.lazy)
        except NoKernel as e:
            return None, None, f"{LAZY_DENSE} ({e})"
        return packed.model, packed.report, None
    if compressed.lazy:  # its experts are compressed during the forward: timing it would time that
        return None, None, LAZY_DENSE
    return compressed.model, None, None


def packed_note(summary: dict) -> str:
    """One sentence on what the compressed side of a latency measurement ran (`PackReport.summary()`)."""
    from moeviz.compression.preview import format_bytes

    kernels = "; ".join(f"{label}: {n} expert{'s' if n != 1 else ''}" for label, n in summary["kernels"].items())
    return (f"Compressed decode timed on packed low-bit kernels ({summary['device']}): {kernels}. Resident packed "
            f"experts {format_bytes(summary['resident_bytes'])} vs {format_bytes(summary['storage_bytes'])} in the "
            f"storage report ({summary['resident_over_storage']:.2f}×); packed in {summary['seconds']:.1f} s. "
            "Perplexity and accuracy are computed on the dequantized reference weights.")
