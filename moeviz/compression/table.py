"""The per-expert table of the Compress page: resolved settings in, hand edits back into a plan."""

from __future__ import annotations

import copy

from moeviz.calibration.stats import CalibrationStats
from moeviz.compression.apply import resolve_settings
from moeviz.compression.plan import CompressionPlan, Override
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
        key = (int(row["layer"]), int(row["expert"]))
        if float(row["sparsity"]) != float(old["sparsity"]) or int(row["bits"]) != int(old["bits"]):
            o = keyed.setdefault(key, Override(layer=key[0], expert=key[1]))
            if float(row["sparsity"]) != float(old["sparsity"]):
                o.sparsity = float(row["sparsity"])
            if int(row["bits"]) != int(old["bits"]):
                o.bits = int(row["bits"])
        if bool(row["remove"]) != bool(old["remove"]):
            (removed.add if row["remove"] else removed.discard)(key)
    new.overrides = list(keyed.values())
    new.removed_experts = sorted(removed)
    return new
