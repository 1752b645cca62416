"""The one place a `CompressionPlan` becomes per-expert settings: `resolve_plan(plan, layers, stats)`.

Everything that needs to know what an expert gets — `Compressor.apply`, the storage preview, the
per-expert table, the architecture figure, second-order compression, sensitivity and export (through
`apply`) — reads a `ResolvedPlan`, so the diagram cannot disagree with the compressed model.

Settings resolve from general to specific: allocation of the global sparsity (unstructured only),
then per-layer overrides, then per-expert overrides; removed experts get sparsity 0. Under N:M every
pruned expert gets N/M and a sparsity override only switches an expert between N/M (> 0) and dense (0).

Also here: the checks that need only the layers' shapes (`check_plan_fits`, `group_size_for`) and
the per-layer check that needs the statistics too (`check_layer`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeviz.calibration.stats import CalibrationStats
from moeviz.compression.allocation import allocate_sparsity
from moeviz.compression.plan import CompressionPlan
from moeviz.registry import metric_needs_stats
from moeviz.compression.steps import LayerSettings
from moeviz.errors import PlanError
from moeviz.models.layers import MoELayer


@dataclass(frozen=True)
class ResolvedPlan:
    """A plan resolved per expert. Arrays are [L, E_max] (padded to the largest expert count; entries
    beyond a layer's E are unused): sparsity of the pruned projections, weight bits, removal."""

    plan: CompressionPlan
    sparsity: np.ndarray  # float64 [L, E_max]
    bits: np.ndarray  # int [L, E_max]
    removed: np.ndarray  # bool [L, E_max]
    num_experts: tuple[int, ...]  # per MoE layer

    @property
    def second_order(self) -> bool:
        """`CompressionPlan.uses_second_order` on the resolved experts: some expert is actually pruned by
        SparseGPT or quantized below 16 bits by GPTQ (`plan.second_order()` asks the plan alone: it may say
        True where this is False, never the reverse)."""
        return self.plan.uses_second_order(prunes=bool((self.sparsity > 0).any()),
                                           quantizes=bool((self.bits[~self.removed] < 16).any()))

    @property
    def needs_stats(self) -> bool:
        """Some expert is pruned with a metric that scores weights with calibration statistics."""
        return metric_needs_stats(self.plan.pruning.metric) and bool((self.sparsity > 0).any())

    def layer(self, layer: MoELayer) -> LayerSettings:
        """The plan resolved for one layer (per-expert rows cut to the layer's E, group sizes checked)."""
        plan, i, E = self.plan, layer.index, layer.num_experts
        quantized = [int(b) for b, r in zip(self.bits[i, :E], self.removed[i, :E]) if not r]
        lowest = min(quantized, default=16)  # group sizes matter only if some expert is quantized
        gs = {p: group_size_for(plan.quant.group_size, layer.weight(p).shape[-1], p, layer, lowest)
              for p in layer.projections()}
        return LayerSettings(np.asarray(self.sparsity[i, :E]), np.asarray(self.bits[i, :E]),
                             np.asarray(self.removed[i, :E]), plan.pruning.metric, tuple(plan.pruning.projections),
                             plan.nm(), gs, plan.quant.symmetric)

    def experts(self, layer: int) -> list[dict]:
        """Per expert of MoE layer `layer`: {layer, expert, sparsity, bits, removed} (plain Python values)."""
        return [dict(layer=layer, expert=e, sparsity=float(self.sparsity[layer, e]), bits=int(self.bits[layer, e]),
                     removed=bool(self.removed[layer, e])) for e in range(self.num_experts[layer])]


def resolve_plan(plan: CompressionPlan, layers: list[MoELayer], stats: CalibrationStats | None) -> ResolvedPlan:
    """Per-expert settings of `plan` on these layers (see the module docstring).

    Unstructured: the allocation preset spreads `pruning.sparsity` over the surviving experts so the
    parameter-weighted mean equals the target; then per-layer and per-expert overrides replace
    values as given (they are not re-balanced, so what you type is what you get).
    N:M: every pruned expert gets N/M; an override of 0 leaves an expert dense."""
    L, E = len(layers), max(l.num_experts for l in layers)
    removed = np.zeros((L, E), dtype=bool)
    for layer, expert in plan.removed_experts:
        removed[layer, expert] = True
    params = np.zeros((L, E))
    for i, l in enumerate(layers):
        per_expert = sum(l.weight(p)[0].numel() for p in plan.pruning.projections if p in l.projections())
        params[i, : l.num_experts] = per_expert
    params[removed] = 0

    nm = plan.nm()
    target = plan.pruning.sparsity
    if nm is not None:
        sparsity = np.full((L, E), nm[0] / nm[1])
    elif target == 0:
        sparsity = np.zeros((L, E))
    else:
        util = None
        if plan.pruning.allocation == "utilization":
            if stats is None:
                raise PlanError("pruning.allocation 'utilization' needs calibration statistics; calibrate first")
            util = np.zeros((L, E))
            for i, ls in enumerate(stats.layers):
                util[i, : ls.num_experts] = ls.utilization().numpy()
        try:
            sparsity = allocate_sparsity(params, util, target, plan.pruning.allocation,
                                         bounds=plan.pruning.allocation_bounds)
        except ValueError as e:
            raise PlanError(f"pruning.sparsity: {e}") from e
    bits = np.full((L, E), plan.quant.bits, dtype=int)
    for o in sorted(plan.overrides, key=lambda o: o.expert is not None):  # layer-wide first
        cols = slice(None) if o.expert is None else o.expert
        if o.sparsity is not None:
            sparsity[o.layer, cols] = (nm[0] / nm[1] if o.sparsity > 0 else 0.0) if nm else o.sparsity
        if o.bits is not None:
            bits[o.layer, cols] = o.bits
    sparsity[removed] = 0.0
    return ResolvedPlan(plan, sparsity, bits, removed, tuple(l.num_experts for l in layers))


# ---------------------------------------------------------------------------- checks

def check_plan_fits(plan: CompressionPlan, layers: list[MoELayer], routing_known: bool = True) -> CompressionPlan:
    """Every PlanError this model can raise, found from the layers' shapes alone (no calibration,
    no weight touched): indices, removal, N:M width and quantization group size. The CLI calls it
    before loading (on a weightless copy) and again right after, so a bad plan fails in seconds, not
    after calibrating.

    routing_known: False for a weightless copy, whose routing rule is not verified yet (that needs a
    forward with the real weights), so whether removal can re-route is only checked once loaded."""
    plan.validate([l.num_experts for l in layers], [l.top_k for l in layers])
    nm = plan.nm()
    removed_layers = {layer for layer, _ in plan.removed_experts}
    expert_bits = min([plan.quant.bits] + [o.bits for o in plan.overrides if o.bits is not None])
    for layer in layers:
        for proj in layer.projections():
            in_features = layer.weight(proj).shape[-1]
            if nm is not None and proj in plan.pruning.projections and in_features % nm[1]:
                raise PlanError(
                    f"pruning.structure: {plan.pruning.structure} needs rows whose width is a multiple of {nm[1]}, "
                    f"but {proj} in {layer.path} has {in_features} input columns; choose M dividing {in_features} "
                    "(e.g. 2:4 or 4:8)"
                )
            group_size_for(plan.quant.group_size, in_features, proj, layer, expert_bits)
        group_size_for(plan.quant.group_size, layer.router_weight.shape[-1], "router", layer, plan.router_bits)
        if routing_known and layer.index in removed_layers:
            check_rerouting(layer)
    return plan


def check_layer(layer: MoELayer, s: LayerSettings, stats: CalibrationStats | None) -> None:
    """PlanError when this layer's settings cannot be applied: removal without a verified routing rule,
    or a statistics-based metric without statistics."""
    if s.removed.any():
        check_rerouting(layer)
    if stats is None and metric_needs_stats(s.metric) and (s.sparsity > 0).any():
        raise PlanError(f"pruning.metric {s.metric!r} needs calibration statistics; calibrate first (or use 'magnitude')")


def check_rerouting(layer: MoELayer) -> None:
    if not layer.adapter.supports_rerouting:
        raise PlanError(
            f"removed_experts: the router at {layer.router_path} follows no routing rule moeviz could "
            "verify, so tokens cannot be re-routed; expert removal is not available for this model"
        )


def group_size_for(group_size: int, in_features: int, what: str, layer: MoELayer, bits: int | None = None) -> int:
    """-1 or a size >= the row means one group per row; otherwise it must divide the row.

    bits: the tensor's bit width where known; an unquantized tensor (16 bits) has no groups, so a group
    size that does not divide its rows is not an error (GPT-OSS-20B's 2880 columns and the default 128)."""
    if group_size == -1 or group_size >= in_features or (bits is not None and bits >= 16):
        return -1
    if in_features % group_size:
        raise PlanError(
            f"quant.group_size: {group_size} does not divide the {in_features} input columns of {what} in "
            f"{layer.path}; choose a divisor of {in_features} or -1 (one group per row)"
        )
    return group_size
