"""Round-to-nearest (RTN) fake quantization of weights and activations.

"Fake" means values are quantized and immediately dequantized: the result is a float tensor that
holds exactly the values a b-bit kernel would compute with, so quality can be measured without
integer kernels. Storage sizes of the real packed format are in :mod:`moeviz.compression.formats`.

Weights are quantized per output channel and per group of ``group_size`` consecutive input
columns (``group_size`` None or -1: one group per whole row). For each group:

* symmetric:  ``scale = max|w| / qmax`` with ``qmax = 2**(b-1) - 1`` and
  ``q = clamp(round(w / scale), -qmax, qmax)``. We use the *restricted* signed range
  [-qmax, qmax] (e.g. [-7, 7] for 4 bits, ternary {-1, 0, 1} for 2 bits) rather than the full
  [-qmax-1, qmax]: the grid is then symmetric, so ``-max|w|`` and ``+max|w|`` are both exact and
  the round-off bound holds at both ends; the cost is one unused code.
* asymmetric: the range is first widened to contain 0 (``min <- min(min, 0)``,
  ``max <- max(max, 0)``, as GPTQ does) so that 0 is exactly representable and pruned weights
  stay exactly zero; ``scale = (max - min) / (2**b - 1)``, integer zero point
  ``z = round(-min / scale)`` in [0, 2**b - 1], ``q = clamp(round(w / scale) + z, 0, 2**b - 1)``,
  dequantized ``(q - z) * scale``.

A group whose scale would be 0 (all zeros) gets scale 1, so it dequantizes to exact zeros instead of
NaN. Both schemes guarantee ``|w - dequantized| <= scale / 2`` elementwise. Arithmetic is float32;
the dequantized tensor is cast back to the input dtype (for bf16/fp16 inputs that cast adds its own
rounding on top of the grid). Scales are kept in float32 here; the storage accounting and the packed
export store one scale per group in the checkpoint dtype (exact for float32 checkpoints; for bf16 the
scale's rounding, 2**-9 relative, is far below the quantization step).

``bits=16`` means "not quantized": the weight is returned unchanged (a copy), with no scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 3, 4, 8, 16)


@dataclass
class QuantizedWeight:
    """Result of :func:`quantize_weight`.

    ``scales`` (and ``zero_points``) have shape ``[..., out, n_groups]``; ``zero_points`` is None for
    symmetric quantization. For ``bits == 16`` both are None. ``group_size`` is the effective
    group size (the row length when one group spans the row).
    """

    dequantized: torch.Tensor
    scales: torch.Tensor | None
    zero_points: torch.Tensor | None
    bits: int
    group_size: int
    symmetric: bool


def check_bits(bits) -> int:
    """Validate a bit width; returns it as int."""
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits!r}; supported: {SUPPORTED_BITS} (16 = unquantized)")
    return int(bits)


def effective_group_size(group_size, in_features: int) -> int:
    if group_size is None or group_size == -1:
        return in_features
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, -1 or None, got {group_size!r}")
    if in_features % group_size != 0:
        raise ValueError(
            f"group_size {group_size} must divide the input dimension {in_features} "
            "(use -1/None for one group per row)"
        )
    return group_size


def quantize_weight(
    weight: torch.Tensor, bits: int, group_size: int | None = 128, symmetric: bool = True
) -> QuantizedWeight:
    """RTN fake-quantize ``weight`` ``[..., out, in]`` per output row and input-column group."""
    bits = check_bits(bits)
    if weight.dim() < 2:
        raise ValueError(f"weight must be at least 2-D [..., out, in], got shape {tuple(weight.shape)}")
    in_features = weight.shape[-1]
    gs = effective_group_size(group_size, in_features)
    if bits == 16:
        return QuantizedWeight(weight.detach().clone(), None, None, 16, gs, symmetric)

    q, scale, zero = _codes(weight, bits, gs, symmetric)
    deq = (q * scale if symmetric else (q - zero) * scale).reshape(weight.shape).to(weight.dtype)  # [..., out, in]
    return QuantizedWeight(deq, scale.squeeze(-1), None if zero is None else zero.squeeze(-1), bits, gs, symmetric)


def _codes(weight: torch.Tensor, bits: int, gs: int, symmetric: bool):
    """(q, scale, zero) of RTN in float32: q [..., out, in/gs, gs] integer-valued codes, scale and zero
    [..., out, in/gs, 1] (zero None when symmetric). The one place the grid is computed: the fake-quantized
    weights (`quantize_weight`) and the packed low-bit kernels (`quantize_codes`) use the same codes."""
    # [..., out, in] -> [..., out, in/gs, gs]: statistics are taken over the last dim.
    w = weight.detach().to(torch.float32).reshape(*weight.shape[:-1], weight.shape[-1] // gs, gs)
    # In-place rounding on one fresh [.., gs] tensor (q), min / max from one aminmax: the same values as
    # round(w / scale) etc. with fewer full-size temporaries (w may be the caller's float32 tensor: not touched).
    lo, hi = w.aminmax(dim=-1, keepdim=True)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = torch.maximum(-lo, hi) / qmax  # max |w|
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return torch.div(w, scale).round_().clamp_(-qmax, qmax), scale, None
    qmax = 2**bits - 1
    w_min, w_max = lo.clamp(max=0.0), hi.clamp(min=0.0)
    scale = (w_max - w_min) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.clamp(torch.round(-w_min / scale), 0, qmax)
    return torch.div(w, scale).round_().add_(zero).clamp_(0, qmax), scale, zero


@dataclass
class QuantCodes:
    """The integer grid of :func:`quantize_weight` itself (what a packed low-bit kernel stores).

    ``codes`` float32 ``[..., out, in]``, integer-valued: symmetric in [-qmax, qmax], asymmetric in
    [0, 2**b - 1]; ``scales`` / ``zero_points`` (None: symmetric) float32 ``[..., out, in / group_size]``.
    Dequantized: ``codes * scale`` or ``(codes - zero) * scale`` per group."""

    codes: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor | None
    bits: int
    group_size: int
    symmetric: bool


def quantize_codes(weight: torch.Tensor, bits: int, group_size: int | None = 128,
                   symmetric: bool = True) -> QuantCodes:
    """The codes and scales `quantize_weight` rounds ``weight`` to (same float32 ops: same grid)."""
    bits = check_bits(bits)
    if bits == 16:
        raise ValueError("bits=16 is not quantized: no codes")
    gs = effective_group_size(group_size, weight.shape[-1])
    q, scale, zero = _codes(weight, bits, gs, symmetric)
    return QuantCodes(q.reshape(weight.shape), scale.squeeze(-1), None if zero is None else zero.squeeze(-1),
                      bits, gs, symmetric)


def codes_on_grid(weight: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                  bits: int) -> QuantCodes:
    """The codes of ``weight`` ``[..., out, in]`` on a given grid (`quantize_on_grid`'s rounding, e.g. of
    GPTQ's weights, which lie on it: their codes come back exactly)."""
    bits = check_bits(bits)
    n_groups, in_features = scales.shape[-1], weight.shape[-1]
    gs = in_features // n_groups
    w = weight.detach().to(torch.float32).reshape(*weight.shape[:-1], n_groups, gs)
    scale = scales.to(device=w.device, dtype=torch.float32)[..., None]
    if zero_points is None:
        qmax = 2 ** (bits - 1) - 1
        q = torch.clamp(torch.round(w / scale), -qmax, qmax)
        zero = None
    else:
        zero = zero_points.to(device=w.device, dtype=torch.float32)
        q = torch.clamp(torch.round(w / scale) + zero[..., None], 0, 2**bits - 1)
    return QuantCodes(q.reshape(weight.shape), scale[..., 0], zero, bits, gs, zero_points is None)


def quantize_on_grid(
    weight: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None, bits: int
) -> torch.Tensor:
    """Round ``weight`` ``[..., out, in]`` to nearest on a *given* grid (not one computed from it).

    ``scales`` (and ``zero_points``; None = symmetric) ``[..., out, in / group_size]`` as in
    :class:`QuantizedWeight` (e.g. GPTQ's grids, ``obs.ObsResult``). Same float32 ops as
    :func:`quantize_weight`, so a weight already on the grid comes back bit-identical (its code is
    an integer far from a rounding tie); result in ``weight``'s dtype.
    """
    bits = check_bits(bits)
    if bits == 16:
        return weight.detach().clone()
    n_groups, in_features = scales.shape[-1], weight.shape[-1]
    if in_features % n_groups:
        raise ValueError(f"{n_groups} groups per row do not divide the {in_features} input columns")
    # [..., out, in] -> [..., out, G, gs]; scales [..., out, G] -> [..., out, G, 1]
    w = weight.detach().to(torch.float32).reshape(*weight.shape[:-1], n_groups, in_features // n_groups)
    scale = scales.to(device=w.device, dtype=torch.float32)[..., None]
    if zero_points is None:
        qmax = 2 ** (bits - 1) - 1
        deq = torch.clamp(torch.round(w / scale), -qmax, qmax) * scale
    else:
        qmax = 2**bits - 1
        zero = zero_points.to(device=w.device, dtype=torch.float32)[..., None]
        deq = (torch.clamp(torch.round(w / scale) + zero, 0, qmax) - zero) * scale
    return deq.reshape(weight.shape).to(weight.dtype)


def fake_quantize_activations(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token symmetric RTN: each row of ``x`` (``[..., tokens, features]``, last dim = features)
    gets its own scale ``max|x_row| / (2**(b-1) - 1)``. ``bits=16`` returns ``x`` itself (no copy:
    this runs inside forward hooks on every token)."""
    bits = check_bits(bits)
    if bits == 16:
        return x
    qmax = 2 ** (bits - 1) - 1
    xf = x.to(torch.float32)
    scale = xf.abs().amax(dim=-1, keepdim=True) / qmax  # [..., tokens, 1]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (torch.clamp(torch.round(xf / scale), -qmax, qmax) * scale).to(x.dtype)
