"""The per-expert table of the Compress page: resolved settings in, hand edits back into a plan."""

from __future__ import annotations

import copy
import math

from moeviz.calibration.stats import CalibrationStats
from moeviz.compression.apply import resolve_settings
from moeviz.compression.plan import SUPPORTED_BITS, CompressionPlan, Override
from moeviz.errors import PlanError
from moeviz.models.layers import MoELayer

COLUMNS = ("layer", "expert", "utilization", "mean_gate", "sparsity", "bits", "remove")


def expert_table(plan: CompressionPlan, layers: list[MoELayer], stats: CalibrationStats | None) -> list[dict]:
    """One row per (layer, expert): what the plan resolves to, next to the expert's routing stats."""
    sparsity, bits, removed = resolve_settings(plan, layers, stats)
    rows = []
    for layer in layers:
        ls = stats.layers[layer.index] if stats is not None else None
        util = ls.utilization() if ls is not None else None
        gate = ls.mean_gate() if ls is not None else None
        for e in range(layer.num_experts):
            rows.append(dict(
                layer=layer.index, expert=e,
                utilization=round(float(util[e]), 4) if util is not None else None,
                mean_gate=round(float(gate[e]), 4) if gate is not None else None,
                sparsity=round(float(sparsity[layer.index, e]), 4), bits=int(bits[layer.index, e]),
                remove=bool(removed[layer.index, e]),
            ))
    return rows


def apply_table_edits(plan: CompressionPlan, before: list[dict], after: list[dict]) -> CompressionPlan:
    """A new plan in which every cell the user changed (sparsity, bits, remove) becomes a per-expert
    override or a removal; unchanged rows keep following the global settings."""
    new = copy.deepcopy(plan)
    keyed = {(o.layer, o.expert): o for o in new.overrides}
    removed = set(map(tuple, new.removed_experts))
    for old, row in zip(before, after):
        key = (int(old["layer"]), int(old["expert"]))  # read-only columns: the editor cannot blank them
        sparsity, bits = _cell(row, "sparsity", float, key), _cell(row, "bits", int, key)
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
