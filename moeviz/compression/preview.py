"""What a plan costs in bytes, without compressing anything: the storage report of `Compressor.apply`
computed from the plan's resolved settings and the weights' shapes alone (milliseconds), so the app can
update the compression ratio and each expert's bytes while the plan is being edited."""

from __future__ import annotations

from moeviz.compression.apply import Compressor
from moeviz.compression.resolve import check_plan_fits, resolve_plan
from moeviz.compression.storage import StorageReport, storage_report


def plan_storage(compressor: Compressor, plan) -> StorageReport:
    """The StorageReport that `compressor.apply(plan)` would report (same resolution, same formats)."""
    layers = compressor.loaded.layers
    check_plan_fits(plan, layers)
    return storage_report(compressor.loaded.model, layers, resolve_plan(plan, layers, compressor.stats))


def expert_bytes(report: StorageReport) -> dict[tuple[int, int], int]:
    """(layer, expert) -> stored bytes of that expert's projections in this report."""
    out: dict[tuple[int, int], int] = {}
    for t in report.tensors:
        if t["expert"] is not None:
            key = (int(t["layer"]), int(t["expert"]))
            out[key] = out.get(key, 0) + int(t["bytes"])
    return out


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
