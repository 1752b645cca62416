"""One unit convention for every page and figure: shares in %, times in µs below 1 ms and ms above,
16 bits labelled as unquantized, bytes in binary units (KiB, MiB, GiB: what the Compress page's storage report uses)."""

from __future__ import annotations

import math


def bits_label(bits, dtype: str | None = None) -> str:
    """16 -> "unquantized (float32)" (the checkpoint's dtype, which the ratios count against; "unquantized"
    without one), 4 -> "4-bit"."""
    if int(bits) >= 16:
        return f"unquantized ({dtype})" if dtype else "unquantized"
    return f"{int(bits)}-bit"


def format_time_ms(ms, digits: int = 3) -> str:
    """A time given in milliseconds, in µs below 1 ms and in ms (or s) above: 0.0123 -> "12.3 µs"."""
    if ms is None or not math.isfinite(float(ms)):
        return "n/a"
    ms = float(ms)
    if abs(ms) < 1:
        return f"{ms * 1000:.{digits}g} µs"
    if abs(ms) < 1000:
        return f"{ms:.{digits}g} ms"
    return f"{ms / 1000:.{digits}g} s"


def time_unit(values_ms) -> tuple[str, float]:
    """(unit, factor from ms) for an axis of times: µs when every value is below 1 ms."""
    finite = [abs(float(v)) for v in values_ms if v is not None and math.isfinite(float(v))]
    return ("µs", 1000.0) if finite and max(finite) < 1 else ("ms", 1.0)


def eta_text(elapsed_s: float, done: int, total: int) -> str:
    """" · about 12 s left" from the time the first `done` of `total` equal steps took ("" before the first)."""
    if done <= 0 or total <= done:
        return ""
    left = elapsed_s / done * (total - done)
    return f" · about {left / 60:.0f} min left" if left >= 120 else f" · about {max(left, 1):.0f} s left"


MIB = 2**20  # bytes per MiB: a size typed or shown in MiB


def format_bytes(n) -> str:
    """Bytes in binary units: 1536 -> "1.5 KiB", 3 * 2**20 -> "3.00 MiB"."""
    n = float(n)
    if abs(n) < 1024:
        return f"{n:.0f} B"
    if abs(n) < MIB:
        return f"{n / 1024:.1f} KiB"
    if abs(n) < 2**30:
        return f"{n / MIB:.2f} MiB"
    return f"{n / 2**30:.2f} GiB"
