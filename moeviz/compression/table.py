"""The per-expert table of the Compress page: resolved settings in, hand edits back into a plan."""

from __future__ import annotations

import copy
import math

from moeviz.calibration.stats import CalibrationStats
from moeviz.compression.resolve import resolve_plan
from moeviz.compression.plan import SUPPORTED_BITS, CompressionPlan, Override
from moeviz.errors import PlanError
from moeviz.models.layers import MoELayer

COLUMNS = ("layer", "expert", "utilization", "mean_gate", "sparsity", "bits", "remove")


def expert_table(plan: CompressionPlan, layers: list[MoELayer], stats: CalibrationStats | None) -> list[dict]:
    """One row per (layer, expert): what the plan resolves to, next to the expert's routing stats."""
    resolved = resolve_plan(plan, layers, stats)
    rows = []
    for layer in layers:
        ls = stats.layers[layer.index] if stats is not None else None
        util = ls.utilization() if ls is not None else None
        gate = ls.mean_gate() if ls is not None else None
        for d in resolved.experts(layer.index):
            e = d["expert"]
            rows.append(dict(
                layer=layer.index, expert=e,
                utilization=round(float(util[e]), 4) if util is not None else None,
                mean_gate=round(float(gate[e]), 4) if gate is not None else None,
                sparsity=round(d["sparsity"], 4), bits=d["bits"], remove=d["removed"],
            ))
    return rows


def format_ratio(value: float) -> str:
    """A ratio as the table shows it: 0.5 -> "50 %", 0.4375 -> "43.75 %"."""
    return f"{round(float(value) * 100, 2):g} %"


def parse_ratio(text, where: str = "sparsity") -> float:
    """A ratio typed by a person: "50 %", "50%", "0.5" (or a number). A bare number of 1 or more is
    refused with a message, not clamped: "50" could mean 50 % or a mistake."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, raw = float(text), text
    else:
        raw = str(text).strip()
        percent = raw.endswith("%")
        try:
            value = float(raw.rstrip("%").strip().replace(",", "."))
        except ValueError:
            raise PlanError(f"{where}: {raw!r} is not a ratio; write e.g. 50 % or 0.5") from None
        if percent:
            if not 0 <= value < 100:
                raise PlanError(f"{where}: {raw} is outside [0 %, 100 %)")
            return value / 100
    if math.isnan(value) or not 0 <= value < 1:
        hint = f"; for {value:g} percent write {value:g} %" if 1 <= value < 100 else ""
        raise PlanError(f"{where}: {raw!r} is outside [0, 1){hint}")
    return value


def apply_table_edits(plan: CompressionPlan, before: list[dict], after: list[dict]) -> CompressionPlan:
    """A new plan in which every cell the user changed (sparsity, bits, remove) becomes a per-expert
    override or a removal; unchanged rows keep following the global settings.

    A sparsity cell may hold text ("50 %", "0.5"): text equal to how the table showed the old value
    (`format_ratio`) is unchanged; other text is parsed with `parse_ratio` (out of range: PlanError)."""
    new = copy.deepcopy(plan)
    keyed = {(o.layer, o.expert): o for o in new.overrides}
    removed = set(map(tuple, new.removed_experts))
    for old, row in zip(before, after):
        key = (int(old["layer"]), int(old["expert"]))  # read-only columns: the editor cannot blank them
        cell = row.get("sparsity")
        if isinstance(cell, str) and not _blank(cell.strip() or None):
            sparsity = (float(old["sparsity"]) if cell.strip() == format_ratio(old["sparsity"])
                        else parse_ratio(cell, f"per-expert table, layer {key[0]} expert {key[1]}: sparsity"))
        else:
            sparsity = _cell({**row, "sparsity": None if isinstance(cell, str) else cell}, "sparsity", float, key)
            if sparsity != float(old["sparsity"]):
                parse_ratio(sparsity, f"per-expert table, layer {key[0]} expert {key[1]}: sparsity")
        bits = _cell(row, "bits", int, key)
        if sparsity != float(old["sparsity"]) or bits != int(old["bits"]):
            o = keyed.setdefault(key, Override(layer=key[0], expert=key[1]))
            if sparsity != float(old["sparsity"]):
                o.sparsity = sparsity
            if bits != int(old["bits"]):
                o.bits = bits
        remove = old["remove"] if _blank(row.get("remove")) else bool(row["remove"])  # cleared box = unchanged
        if remove != bool(old["remove"]):
            (removed.add if remove else removed.discard)(key)
    new.overrides = list(keyed.values())
    new.removed_experts = sorted(removed)
    return new


def _blank(value) -> bool:
    """An emptied cell: the data editor returns None or NaN for it."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _cell(row: dict, column: str, kind, key: tuple[int, int]):
    """A numeric cell as `kind`; PlanError naming the expert and the column for an empty or
    non-numeric cell (int(NaN) would raise 'cannot convert float NaN to integer')."""
    value = row.get(column)
    choices = f"one of {', '.join(map(str, SUPPORTED_BITS))}" if column == "bits" else "a value in [0, 1)"
    if _blank(value):
        raise PlanError(f"per-expert table, layer {key[0]} expert {key[1]}: the {column} cell is empty; enter {choices}")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise PlanError(f"per-expert table, layer {key[0]} expert {key[1]}: {column} {value!r} is not a number; "
                        f"enter {choices}") from None


# ---------------------------------------------------------------------------- bulk edits and notes

def set_layer(plan: CompressionPlan, layer: int, sparsity: float | None = None, bits: int | None = None) -> CompressionPlan:
    """A new plan where layer `layer` has a per-layer override (sparsity and/or bits); the layer's
    per-expert overrides of those fields are dropped so the whole layer follows it."""
    new = copy.deepcopy(plan)
    kept = []
    for o in new.overrides:
        if o.layer == layer and o.expert is not None:
            if sparsity is not None:
                o.sparsity = None
            if bits is not None:
                o.bits = None
            if o.sparsity is None and o.bits is None:
                continue
        kept.append(o)
    o = next((o for o in kept if o.layer == layer and o.expert is None), None)
    if o is None:
        o = Override(layer=int(layer))
        kept.append(o)
    if sparsity is not None:
        o.sparsity = float(sparsity)
    if bits is not None:
        o.bits = int(bits)
    new.overrides = kept
    return new


def prune_below_utilization(plan: CompressionPlan, table: list[dict], utilization: float, sparsity: float,
                            layer: int | None = None) -> tuple[CompressionPlan, int]:
    """A new plan where every expert whose utilization is below `utilization` (in `layer`, or in every
    layer) gets a per-expert sparsity override `sparsity`; returns (plan, experts changed)."""
    new = copy.deepcopy(plan)
    keyed = {(o.layer, o.expert): o for o in new.overrides}
    n = 0
    for row in table:
        if row.get("utilization") is None or row["remove"] or (layer is not None and row["layer"] != layer):
            continue
        if row["utilization"] < utilization:
            key = (int(row["layer"]), int(row["expert"]))
            keyed.setdefault(key, Override(layer=key[0], expert=key[1])).sparsity = float(sparsity)
            n += 1
    new.overrides = list(keyed.values())
    return new, n


def overridden_cells(plan: CompressionPlan) -> dict[tuple[int, int], set[str]]:
    """(layer, expert) -> the columns ("sparsity", "bits") that a per-expert override sets."""
    out: dict[tuple[int, int], set[str]] = {}
    for o in plan.overrides:
        if o.expert is None:
            continue
        cols = {c for c in ("sparsity", "bits") if getattr(o, c) is not None}
        if cols:
            out.setdefault((o.layer, o.expert), set()).update(cols)
    return out


def ignored_override_note(plan: CompressionPlan) -> str | None:
    """Under N:M structure a sparsity override can only switch an expert between N/M and dense: say so
    (naming how many overrides are affected) instead of ignoring the typed ratios silently."""
    nm = plan.nm()
    if nm is None:
        return None
    affected = [o for o in plan.overrides if o.sparsity is not None and o.sparsity not in (0, nm[0] / nm[1])]
    if not affected:
        return None
    where = ", ".join(f"layer {o.layer}" + (f" expert {o.expert}" if o.expert is not None else "") for o in affected[:4])
    more = f" and {len(affected) - 4} more" if len(affected) > 4 else ""
    return (f"{plan.pruning.structure} structure fixes every pruned expert at {nm[0] / nm[1]:.0%}: the per-expert "
            f"sparsity of {len(affected)} override(s) ({where}{more}) is not used as typed; any value above 0 means "
            f"{nm[0] / nm[1]:.0%} and 0 keeps the expert dense. Choose 'unstructured' to use per-expert ratios.")
