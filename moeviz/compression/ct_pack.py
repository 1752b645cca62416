"""compressed-tensors `pack-quantized` tensors: moeviz's quantized experts written in the format llm-compressor
writes and vLLM serves (reading such folders back: `moeviz.models.ct_checkpoint`).

Layout (compressed-tensors 0.20, written by its own `PackedQuantizationCompressor`):

* every quantized expert projection, a 2-D checkpoint key `<…>.experts.<e>.<proj>.weight` [out, in], becomes
  `weight_packed` int32 [out, ceil(in·b/32)] (b-bit codes packed along the row), `weight_scale`
  [out, G] in the checkpoint dtype (G = in / group_size; 1 for channel scales), `weight_shape` int64 [2]
  and, when asymmetric, `weight_zero_point` int32 [ceil(out·b/32), G] (packed along the rows);
* `config.json` gets a `quantization_config` with `quant_method: compressed-tensors`, `format:
  pack-quantized`, one config group per distinct scheme whose `re:` targets name the experts of the layers
  that use it, and `ignore` = the lm_head and the routers, which stay dense like everything else.

Codes. moeviz's RTN grid is symmetric on [-qmax, qmax] (e.g. [-7, 7] at 4 bits) or asymmetric on
[0, 2^b - 1] with an integer zero point z; compressed-tensors stores signed codes on [-2^(b-1), 2^(b-1) - 1]
with a signed zero point. The same numbers: symmetric codes fit as they are, asymmetric codes and zero
points shift by 2^(b-1) (so (q - z) is unchanged). `pack_projection` checks that the codes compressed-tensors
packed are exactly moeviz's before anything is written (and, for a float32 checkpoint, that unpacking gives
back the very same weights): a weight that is not on its grid is refused, never written approximately.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from moeviz.compression.quantize import quantize_weight
from moeviz.errors import MoevizError

PACKABLE_BITS = (4, 8)  # what vLLM's and transformers' compressed-tensors MoE paths serve (WNA16)
# Per-expert 2-D checkpoint keys, as save_pretrained writes them for fused experts.
EXPERT_KEY = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<expert>\d+)\.(?P<name>[A-Za-z0-9_]+)\.weight$")
PROJECTION_OF = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
# vLLM matches a scheme with `<FusedMoE prefix>.<e>.{gate,up,down}_proj`, transformers with the checkpoint's
# own names (w1/w2/w3 for Mixtral): the targets accept both.
_PROJ_ALTERNATIVES = "(gate_proj|up_proj|down_proj|w1|w2|w3)"


@dataclass(frozen=True)
class PackScheme:
    """One compressed-tensors weight scheme: b-bit integers, a scale per `group_size` columns of a row
    (-1: one per row, the "channel" strategy), symmetric or with zero points."""

    bits: int
    group_size: int
    symmetric: bool

    def label(self) -> str:
        grouping = "channel" if self.group_size == -1 else f"g{self.group_size}"
        return f"int{self.bits} {grouping} {'sym' if self.symmetric else 'asym'}"

    def args(self):
        from compressed_tensors.quantization import QuantizationArgs

        if self.group_size == -1:
            return QuantizationArgs(num_bits=self.bits, type="int", symmetric=self.symmetric, strategy="channel")
        return QuantizationArgs(num_bits=self.bits, type="int", symmetric=self.symmetric, strategy="group",
                                group_size=self.group_size)

    def scheme(self, targets: list[str]):
        from compressed_tensors.quantization import QuantizationScheme

        return QuantizationScheme(targets=targets, weights=self.args())


def scheme_for(bits: int, group_size: int, symmetric: bool, in_features: int) -> PackScheme:
    """The scheme of one projection: `group_size` columns per scale where it divides the row (one group
    of a whole row is still the group strategy, so gate, up and down of a layer share one scheme, as vLLM
    requires), else one scale per row."""
    if bits not in PACKABLE_BITS:
        raise MoevizError(f"compressed-tensors export: {bits}-bit experts cannot be served by vLLM or transformers "
                          f"(their compressed-tensors MoE kernels take {' and '.join(map(str, PACKABLE_BITS))} bits); "
                          "export --format dense, or use 4 or 8 bits")
    if group_size == -1 or group_size > in_features or in_features % group_size:
        return PackScheme(bits, -1, symmetric)
    return PackScheme(bits, group_size, symmetric)


def packed_layout(shape: tuple[int, int], scheme: PackScheme, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Meta tensors of what `pack_projection` writes for a [out, in] weight (shapes and dtypes only)."""
    out, n = shape
    groups = 1 if scheme.group_size == -1 else n // scheme.group_size
    meta = {"weight_packed": torch.empty(out, -(-n * scheme.bits // 32), dtype=torch.int32, device="meta"),
            "weight_scale": torch.empty(out, groups, dtype=scale_dtype, device="meta"),
            "weight_shape": torch.empty(2, dtype=torch.int64, device="meta")}
    if not scheme.symmetric:
        meta["weight_zero_point"] = torch.empty(-(-out * scheme.bits // 32), groups, dtype=torch.int32, device="meta")
    return meta


def pack_projection(weight: torch.Tensor, scheme: PackScheme, grid: tuple | None = None,
                    what: str = "weight") -> dict[str, torch.Tensor]:
    """compressed-tensors tensors (local names, see `packed_layout`) of one quantized projection [out, in].

    grid: (scales [out, G], zero points [out, G] | None) float32 where the quantizer kept them (GPTQ);
    else the RTN grid is recomputed from the weight, which lies on it (moeviz's RTN values are q·scale, and
    the largest |value| of a group is qmax·scale). Refuses, naming `what`, unless the packed codes are
    exactly moeviz's."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    w = weight.detach()
    if grid is None:
        qw = quantize_weight(w, scheme.bits, scheme.group_size if scheme.group_size != -1 else None, scheme.symmetric)
        scales, zeros = qw.scales, qw.zero_points
        if w.dtype == torch.float32:
            scales = _exact_scales(w, scales, zeros, scheme.bits, what)
    else:
        scales, zeros = grid
    scales = scales.to(torch.float32)
    # moeviz's integer codes on its own grid: [out, in] (symmetric: [-qmax, qmax]; else [0, 2^b - 1])
    gs = w.shape[-1] // scales.shape[-1]
    wf = w.to(torch.float32).reshape(w.shape[0], scales.shape[-1], gs)
    offset = 1 << (scheme.bits - 1)
    if zeros is None:
        codes = torch.round(wf / scales[..., None])
    else:
        codes = torch.round(wf / scales[..., None]) + zeros[..., None] - offset  # shifted to signed
    codes = codes.reshape(w.shape)
    # Codes computed in float32 (compressed-tensors divides in the weight's dtype: in bf16 that rounds some codes
    # differently); the scale is stored in the checkpoint dtype, as llm-compressor stores it.
    state = {"weight": w.to(torch.float32), "weight_scale": scales}
    if zeros is not None:
        state["weight_zero_point"] = (zeros - offset).to(torch.int8)
    packed = BaseCompressor.get_value_from_registry("pack-quantized").compress(state, scheme.scheme([what]))
    packed["weight_scale"] = scales.to(w.dtype)
    got = unpack_from_int32(packed["weight_packed"], scheme.bits, torch.Size(w.shape)).to(torch.float32)
    if not torch.equal(got, codes):
        bad = int((got != codes).sum())
        raise MoevizError(f"compressed-tensors export: {what}: {bad} of {codes.numel()} packed codes differ from "
                          "moeviz's grid; export --format dense")
    if w.dtype == torch.float32:  # the scale is stored exactly: unpacking must give back the very weights
        back = unpack_projection(packed, scheme)
        if not torch.equal(back, w):
            raise MoevizError(f"compressed-tensors export: {what} does not unpack to the weights moeviz evaluated "
                              f"(max difference {float((back - w).abs().max()):.3g}); export --format dense")
    return {k: v.contiguous() for k, v in packed.items()}


def _exact_scales(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                  what: str) -> torch.Tensor:
    """Scales [out, G] on which `w` [out, in] lies exactly. The scale recomputed from RTN's values
    (max|q·s| / qmax) can be one float32 step off the scale that made them; the codes are the same, so the
    right one is among its nearest neighbours: per group, the first of (s, s ± 1 ulp, s ± 2 ulp) whose
    q·scale gives back every value bit for bit."""
    from moeviz.compression.quantize import quantize_on_grid

    out, n_groups = scales.shape
    chosen, found = scales.clone(), torch.zeros_like(scales, dtype=torch.bool)
    up, down = scales.clone(), scales.clone()
    for k in range(5):  # candidates s, s+1ulp, s-1ulp, s+2ulp, s-2ulp
        if k:
            if k % 2:
                up = torch.nextafter(up, torch.full_like(up, float("inf")))
            else:
                down = torch.nextafter(down, torch.zeros_like(down))
        cand = up if k % 2 else down if k else scales
        deq = quantize_on_grid(w, cand, zeros, bits)
        exact = (deq == w).reshape(out, n_groups, -1).all(-1) & ~found
        chosen[exact] = cand[exact]
        found |= exact
        if bool(found.all()):
            return chosen
    raise MoevizError(f"compressed-tensors export: {what} is not on a {bits}-bit grid moeviz can recover "
                      f"({int((~found).sum())} of {found.numel()} groups; was it changed after quantization?); "
                      "export --format dense")


def unpack_projection(packed: dict[str, torch.Tensor], scheme: PackScheme) -> torch.Tensor:
    """Dense weight [out, in] of `pack_projection`'s tensors, by compressed-tensors' own decompressor."""
    from compressed_tensors.compressors import BaseCompressor

    state = BaseCompressor.get_value_from_registry("pack-quantized").decompress(dict(packed), scheme.scheme(["x"]))
    return state["weight"]


def expert_target(prefix: str | None) -> str:
    """`re:` target of the experts' projections under one `…experts` prefix (None: every MoE layer)."""
    head = ".*" if prefix is None else re.escape(prefix)
    return f"re:{head}\\.\\d+\\.{_PROJ_ALTERNATIVES}$"


def quantization_config(groups: dict[PackScheme, list[str]], ignore: list[str]) -> dict:
    """The `quantization_config` entry of config.json, as compressed-tensors' ModelCompressor writes it."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig

    qc = QuantizationConfig(
        config_groups={f"group_{i}": s.scheme(targets) for i, (s, targets) in enumerate(groups.items())},
        format="pack-quantized", quantization_status="compressed", ignore=ignore)
    return {"quant_method": "compressed-tensors", "version": compressed_tensors.__version__,
            "sparsity_config": {}, "transform_config": {}, **qc.model_dump(exclude=["quant_method"])}
