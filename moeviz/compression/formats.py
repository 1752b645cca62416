"""Storage size, in bytes, of a weight tensor under a given compression setting.

Compression ratios in moeviz are computed from these concrete formats, never from "fraction of
weights removed". All sizes are a pure function of the tensor's shape and the settings. Each
component (values, metadata, scales) is rounded up to whole bytes separately.

Formats (``b`` = value width in bits: the quantization bit width, or the dtype width when
``bits == 16`` i.e. unquantized -- 32 for fp32, 16 for fp16/bf16):

* ``removed``: the whole expert is deleted -> 0 bytes.
* ``dense``: ``numel * b / 8``.
* ``bitmask`` (unstructured sparsity): kept values packed at ``b`` bits, plus a 1-bit keep mask
  per weight (``numel / 8`` bytes). The mask costs 1 bit/weight whatever the sparsity; at low
  sparsity (or low ``b``) it does not pay off, so a tensor is stored in whichever of ``dense`` and
  ``bitmask`` is smaller, and ``format`` says which (ties go to dense).
* ``n:m`` (``n`` pruned in every group of ``m`` consecutive inputs, as in
  :func:`moeviz.compression.masks.nm_mask`): ``numel * (m - n) / m`` kept values at ``b`` bits,
  plus ``ceil(log2(C(m, m - n)))`` index bits per group of ``m`` -- the fewest bits that name which
  ``m - n`` positions are kept (2:4 -> C(4,2) = 6 patterns -> 3 bits per group = 0.75 bit/weight).
  This is the default, ``nm_metadata="combinatorial"``. NVIDIA's sparse tensor cores
  (cuSPARSELt, 2:4) store instead a 2-bit position index per *kept* value (4 bits per group of 4,
  1 bit/weight); that layout is available as ``nm_metadata="per_value"``
  (``ceil(log2(m))`` bits per kept value). Like bitmask, it competes with dense.
* quantization (``bits`` in {2, 3, 4, 8}): values at ``b = bits``; per group of ``group_size``
  inputs of each row (whole row if None/-1) one scale in the checkpoint's dtype (2 bytes for
  bf16 / fp16, 4 for float32: what compressed-tensors' pack-quantized format, which
  ``moeviz export --format compressed-tensors`` writes, stores), and for asymmetric
  quantization one zero point stored at ``bits`` bits (packed, as GPTQ/AWQ ``qzeros``). Scales
  cover the dense grid of groups, so they are charged in full even when the tensor is also sparse
  (sparse + quantized = kept values at ``b`` bits + mask/index metadata + scales/zeros).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .allocation import validate_ratio
from .masks import check_nm_shape
from .quantize import check_bits

NM_METADATA = ("combinatorial", "per_value")


@dataclass
class TensorStorage:
    """Bytes needed to store one tensor. JSON-serialisable with ``dataclasses.asdict``.

    ``bytes = value_bytes + metadata_bytes + scale_bytes``. ``compression_ratio`` is
    ``dense_bytes / bytes`` (None for a removed tensor, whose bytes are 0).
    """

    format: str  # "removed" | "dense" | "bitmask" | "n:m"
    bytes: int
    dense_bytes: int  # uncompressed size: numel * dtype_bytes
    numel: int
    nonzero: int  # weights left nonzero (kept) by the sparsity setting
    stored_values: int  # values physically stored (numel for dense, nonzero for sparse formats)
    bits: int  # bits per stored value
    value_bytes: int
    metadata_bytes: int  # sparsity mask / N:M indices
    scale_bytes: int  # quantization scales and zero points
    structure: str | None  # None | "unstructured" | "n:m" (the requested sparsity structure)
    n: int | None
    m: int | None
    group_size: int | None
    symmetric: bool | None
    compression_ratio: float | None


def _ceil_bytes(bits: int) -> int:
    return -(-int(bits) // 8)


def storage_for(
    shape_or_tensor,
    *,
    dtype_bytes: int | None = None,
    sparsity: float = 0.0,
    structure: str | None = None,
    n: int | None = None,
    m: int | None = None,
    bits: int = 16,
    group_size: int | None = None,
    symmetric: bool = True,
    rows: int | None = None,
    removed: bool = False,
    count_nonzero: bool = False,
    nm_metadata: str = "combinatorial",
) -> TensorStorage:
    """Storage of one weight tensor (see the module docstring for the formats).

    Args:
        shape_or_tensor: a tensor, a shape ``(..., out, in)`` (rows = product of all but the last
            dim), or an int ``numel`` (then ``rows`` gives the number of rows, default 1).
        dtype_bytes: width of the unquantized dtype (4 fp32, 2 fp16/bf16); taken from the tensor
            if omitted.
        sparsity: unstructured ratio; each row prunes ``round(sparsity * in)`` entries, as the mask.
        structure: None (dense), ``"unstructured"`` or ``"n:m"`` (then ``n`` pruned of every ``m``).
        bits, group_size, symmetric: quantization settings (``bits=16`` = unquantized).
        removed: the tensor is deleted (0 bytes).
        count_nonzero: with a tensor, count its exact nonzeros as the stored values (e.g. a weight
            that has already been pruned) instead of deriving them from ``sparsity``.
        nm_metadata: ``"combinatorial"`` (default) or ``"per_value"`` N:M index layout.
    """
    # -- shape ------------------------------------------------------------------------------------
    tensor = shape_or_tensor if isinstance(shape_or_tensor, torch.Tensor) else None
    if tensor is not None:
        shape = tuple(tensor.shape)
        if dtype_bytes is None:
            dtype_bytes = tensor.element_size()
    elif isinstance(shape_or_tensor, int):
        shape = (rows or 1, shape_or_tensor // (rows or 1))
        if shape[0] * shape[1] != shape_or_tensor:
            raise ValueError(f"numel {shape_or_tensor} is not divisible into {rows} rows")
    else:
        shape = tuple(int(d) for d in shape_or_tensor)
    if len(shape) < 1 or any(d < 0 for d in shape):
        raise ValueError(f"invalid shape {shape}")
    if dtype_bytes not in (1, 2, 4, 8):
        raise ValueError(f"dtype_bytes must be 1, 2, 4 or 8 (fp32 = 4, fp16/bf16 = 2), got {dtype_bytes!r}")
    numel = math.prod(shape)
    in_features = shape[-1]
    n_rows = numel // in_features if in_features else 0
    dense_bytes = numel * dtype_bytes

    bits = check_bits(bits)
    b = dtype_bytes * 8 if bits == 16 else bits
    quantized = bits != 16
    if structure not in (None, "unstructured", "n:m"):
        raise ValueError(f"structure must be None, 'unstructured' or 'n:m', got {structure!r}")
    if nm_metadata not in NM_METADATA:
        raise ValueError(f"nm_metadata must be one of {NM_METADATA}, got {nm_metadata!r}")

    def result(fmt, nonzero, stored, value_bytes, metadata_bytes, scale_bytes) -> TensorStorage:
        total = value_bytes + metadata_bytes + scale_bytes
        return TensorStorage(
            format=fmt, bytes=total, dense_bytes=dense_bytes, numel=numel, nonzero=nonzero,
            stored_values=stored, bits=b, value_bytes=value_bytes, metadata_bytes=metadata_bytes, scale_bytes=scale_bytes,
            structure=structure, n=n, m=m,
            group_size=group_eff if quantized else None,
            symmetric=symmetric if quantized else None,
            compression_ratio=(dense_bytes / total) if total else None,
        )

    # -- quantization scales: one scale in the checkpoint dtype (+ b-bit zero point) per group of each row
    group_eff = None
    scale_bytes = 0
    if quantized:
        group_eff = in_features if group_size in (None, -1) else int(group_size)
        if group_eff <= 0:
            raise ValueError(f"group_size must be positive, -1 or None, got {group_size!r}")
        n_groups = n_rows * math.ceil(in_features / group_eff)
        scale_bytes = n_groups * dtype_bytes + (0 if symmetric else _ceil_bytes(n_groups * bits))

    if removed:
        return TensorStorage(
            format="removed", bytes=0, dense_bytes=dense_bytes, numel=numel, nonzero=0,
            stored_values=0, bits=b,
            value_bytes=0, metadata_bytes=0, scale_bytes=0, structure=structure, n=n, m=m,
            group_size=None, symmetric=None, compression_ratio=None,
        )

    dense_values = _ceil_bytes(numel * b)

    if structure is None:
        nz = int(torch.count_nonzero(tensor)) if (count_nonzero and tensor is not None) else numel
        return result("dense", nz, numel, dense_values, 0, scale_bytes)

    if structure == "unstructured":
        if tensor is not None and count_nonzero:
            kept = int(torch.count_nonzero(tensor))
        else:
            s = validate_ratio(sparsity, "sparsity")
            kept = n_rows * (in_features - round(s * in_features))  # exact per-row count, as the mask
        sparse = result("bitmask", kept, kept, _ceil_bytes(kept * b), _ceil_bytes(numel), scale_bytes)
    else:  # "n:m"
        check_nm_shape(n, m, in_features)
        n_groups_nm = numel // m
        kept = n_groups_nm * (m - n)
        if nm_metadata == "combinatorial":
            meta_bits = n_groups_nm * math.ceil(math.log2(math.comb(m, m - n)))
        else:
            meta_bits = kept * math.ceil(math.log2(m))
        sparse = result("n:m", kept, kept, _ceil_bytes(kept * b), _ceil_bytes(meta_bits), scale_bytes)
    dense = result("dense", kept, numel, dense_values, 0, scale_bytes)
    return sparse if sparse.bytes < dense.bytes else dense
