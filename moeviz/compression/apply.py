"""Apply a `CompressionPlan` to a loaded model without touching the base model.

The result is a structural copy of the base (new module objects, shared tensors) in which only the
tensors the plan touches are replaced: the fused expert tensors of layers with pruned, quantized or
removed experts, and router weights that are pruned or quantized. Memory is therefore the base plus
copies of the touched tensors, never a deep copy of the whole model.

Scores and their per-row ranks are cached per (layer, projection, metric) inside `Compressor`, so a
new sparsity only costs one comparison per weight (`mask_from_ranks`), not a new selection.
"""

from __future__ import annotations

import time
import types
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from moeviz.calibration.stats import CalibrationStats
from moeviz.compression.allocation import allocate_sparsity
from moeviz.compression.formats import TensorStorage, storage_for
from moeviz.compression.masks import mask_from_ranks, nm_mask, row_ranks, unstructured_row_mask
from moeviz.compression.plan import CompressionPlan
from moeviz.compression.quantize import fake_quantize_activations, quantize_weight
from moeviz.compression.scores import importance_scores
from moeviz.data import TokenSamples
from moeviz.errors import PlanError
from moeviz.models.experts import set_routed_forward
from moeviz.models.layers import MoELayer, find_moe_layers
from moeviz.models.loading import LoadedModel
from moeviz.models.views import structural_copy

# Which calibration statistic feeds each projection's Wanda / MoE-Pruner score.
_NORMS = {
    ("wanda", "gate"): "input_sq", ("wanda", "up"): "input_sq", ("wanda", "down"): "down_sq",
    ("moe_pruner", "gate"): "input_sq_weighted", ("moe_pruner", "up"): "input_sq_weighted",
    ("moe_pruner", "down"): "down_sq_weighted",
}


@dataclass
class ExpertState:
    """What the plan resolved to for one expert, and what its weights now are."""

    layer: int
    expert: int
    sparsity: float  # requested fraction of the pruned projections' weights zeroed
    bits: int
    removed: bool
    zero_fraction: float  # measured on the compressed weights (all projections)


@dataclass
class StorageReport:
    """Bytes of the base and of the compressed form, per documented format (see formats.py)."""

    tensors: list[dict]  # one entry per expert projection / router: location + TensorStorage fields
    experts_base_bytes: int
    experts_bytes: int
    router_base_bytes: int
    router_bytes: int
    other_bytes: int  # everything else (attention, embeddings, shared experts, norms, biases), dense

    @property
    def base_bytes(self) -> int:
        return self.experts_base_bytes + self.router_base_bytes + self.other_bytes

    @property
    def compressed_bytes(self) -> int:
        return self.experts_bytes + self.router_bytes + self.other_bytes

    def summary(self) -> dict:
        return dict(
            experts_compression_ratio=self.experts_base_bytes / max(self.experts_bytes, 1),
            compression_ratio=self.base_bytes / max(self.compressed_bytes, 1),
            base_bytes=self.base_bytes, compressed_bytes=self.compressed_bytes,
            experts_base_bytes=self.experts_base_bytes, experts_bytes=self.experts_bytes,
            router_base_bytes=self.router_base_bytes, router_bytes=self.router_bytes, other_bytes=self.other_bytes,
        )


@dataclass
class CompressedModel:
    model: nn.Module  # structural copy of the base; untouched tensors are shared with it
    layers: list[MoELayer]
    plan: CompressionPlan
    experts: list[ExpertState]
    storage: StorageReport
    seconds: float
    replaced_tensors: list[str] = field(default_factory=list)
    # Pruning keep-masks, only when asked for (`apply(..., keep_masks=True)`, used by recovery):
    # "layer.proj" -> bool [E, out, in] (True = keep), "layer.router" -> bool [E, H].
    masks: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    recovery: dict | None = None  # RecoveryResult.summary() when this model was recovered by distillation

    def expert_table(self) -> list[dict]:
        return [asdict(e) for e in self.experts]

    def allowed_experts(self, layer: int) -> torch.Tensor:
        """[E] bool, False for removed experts of MoE layer `layer`."""
        return getattr(self.layers[layer].router, "moeviz_allowed", torch.ones(self.layers[layer].num_experts, dtype=torch.bool))


# ---------------------------------------------------------------------------- resolving a plan

def resolve_settings(plan: CompressionPlan, layers: list[MoELayer], stats: CalibrationStats | None):
    """Per-expert (sparsity [L, E], bits [L, E], removed [L, E]) as numpy arrays, padded to max E.

    Unstructured: the allocation preset spreads `pruning.sparsity` over the surviving experts so the
    parameter-weighted mean equals the target; then per-layer and per-expert overrides replace
    values as given (they are not re-balanced, so what you type is what you get).
    N:M: every pruned expert gets N/M; an override of 0 leaves an expert dense.
    """
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
    return sparsity, bits, removed


# ---------------------------------------------------------------------------- forwards on the copy

def _rerouted_forward(self, *args, **kwargs):
    """Router forward that can never choose a removed expert: the router's own forward, then its top-k
    weights and ids (at the output positions found when the rule was verified) replaced by the verified
    rule over logits where removed experts are -inf (tokens are re-routed among the rest, not dropped)."""
    adapter = self.moeviz_adapter
    out = list(self.moeviz_router_forward(*args, **kwargs))
    logits = out[adapter.logits_slot]
    allowed = self.moeviz_allowed.to(logits.device)
    flat = logits.reshape(-1, logits.shape[-1])  # [T, E]
    weights, indices = adapter.route(self, flat, allowed)
    if adapter.dense:  # dense scores [T, E]: the chosen experts' weights, 0 elsewhere
        out[0] = torch.zeros_like(flat, dtype=out[0].dtype).scatter(1, indices, weights.to(out[0].dtype)) \
            .reshape(out[0].shape)
    else:
        w_slot, i_slot = adapter.output_slots
        out[w_slot] = weights.to(out[w_slot].dtype).reshape(out[w_slot].shape)
        out[i_slot] = indices.to(out[i_slot].dtype).reshape(out[i_slot].shape)
    out[adapter.logits_slot] = logits.masked_fill(~allowed, float("-inf"))
    return tuple(out)


def _activation_quantized_forward(self, hidden_states, top_k_index, top_k_weights):
    from moeviz.models.experts import experts_forward

    return experts_forward(self, hidden_states, top_k_index, top_k_weights, input_transform=self.moeviz_input_transform)


def _act_quantizer(bits: int):
    return lambda expert, x: fake_quantize_activations(x, bits)


# ---------------------------------------------------------------------------- the compressor

class Compressor:
    """Applies plans to one loaded model with one set of calibration statistics, caching the
    importance-score ranks so that each new plan costs little more than one pass over the weights."""

    def __init__(self, loaded: LoadedModel, stats: CalibrationStats | None = None):
        if stats is not None and stats.model_fingerprint != loaded.fingerprint:
            raise PlanError(
                f"calibration statistics belong to model {stats.model_fingerprint}, not to the loaded "
                f"model {loaded.fingerprint}; recalibrate"
            )
        self.loaded = loaded
        self.stats = stats
        self._ranks: dict[tuple, torch.Tensor] = {}
        self._nm_masks: dict[tuple, torch.Tensor] = {}

    # -- cached scores
    def _scores(self, layer: MoELayer, stats: CalibrationStats | None, projection: str, metric: str) -> torch.Tensor:
        weight = self.loaded.layers[layer.index].weight(projection)  # scores come from the base weights
        if metric == "magnitude":
            return importance_scores(weight, "magnitude")
        if stats is None:
            raise PlanError(f"pruning.metric {metric!r} needs calibration statistics; calibrate first (or use 'magnitude')")
        norms = getattr(stats.layers[layer.index], _NORMS[(metric, projection)]).to(weight.device)
        return importance_scores(weight, metric, norms)

    def _cached(self, store: dict, key: tuple, make):
        if key not in store:
            store[key] = make()
        return store[key]

    def apply(self, plan: CompressionPlan, samples: TokenSamples | None = None,
              keep_masks: bool = False) -> CompressedModel:
        """Compress a structural copy of the base model according to `plan`.

        keep_masks: also return the pruning masks (1 byte per pruned weight; recovery needs them to
        keep pruned weights at zero, the app's interactive path does not)."""
        start = time.perf_counter()
        base_layers = self.loaded.layers
        check_plan_fits(plan, base_layers)
        if plan.sequential and samples is None:
            raise PlanError("sequential: re-calibrating layer by layer needs the calibration samples")
        sparsity, bits, removed = resolve_settings(plan, base_layers, self.stats)
        if self.stats is None and plan.pruning.metric != "magnitude" and (sparsity > 0).any():
            raise PlanError(f"pruning.metric {plan.pruning.metric!r} needs calibration statistics; calibrate first")

        view = structural_copy(self.loaded.model)
        layers = find_moe_layers(view, self.loaded.layers)
        replaced: list[str] = []
        masks: dict[str, torch.Tensor] | None = {} if keep_masks else None
        for layer in layers:
            stats = self.stats
            if plan.sequential and layer.index > 0 and sparsity.any():
                # Statistics of this layer's inputs as produced by the already-compressed layers before it.
                from moeviz.calibration.collect import calibrate

                partial = LoadedModel(view, self.loaded.tokenizer, layers, self.loaded.info)
                stats = calibrate(partial, samples, record_tokens=0)
            replaced += self._compress_layer(layer, plan, sparsity[layer.index], bits[layer.index],
                                             removed[layer.index], stats, sequential=plan.sequential, masks=masks)
        experts = self._expert_states(layers, plan, sparsity, bits, removed)
        storage = self._storage(layers, plan, sparsity, bits, removed)
        return CompressedModel(view, layers, plan, experts, storage, time.perf_counter() - start, replaced,
                               masks or {})

    def _compress_layer(self, layer, plan, sparsity, bits, removed, stats, sequential, masks=None) -> list[str]:
        E = layer.num_experts
        sparsity, bits, removed = sparsity[:E], bits[:E], removed[:E]
        touched_experts = (sparsity > 0).any() or (bits < 16).any() or removed.any()
        replaced = []
        if touched_experts:
            ex = layer.experts
            for name in ("gate_up_proj", "up_proj", "down_proj"):
                p = getattr(ex, name, None)
                if isinstance(p, torch.Tensor):
                    setattr(ex, name, nn.Parameter(p.detach().clone(), requires_grad=False))
                    replaced.append(f"{layer.experts_path}.{name}")
            nm = plan.nm()
            metric = plan.pruning.metric
            prune = torch.as_tensor(sparsity, dtype=torch.float64)
            for proj in plan.pruning.projections:
                if proj not in layer.projections() or not (sparsity > 0).any():
                    continue
                w = layer.weight(proj)  # [E, out, in] view into the new tensor
                tag = "seq" if sequential else "one-pass"
                if nm is None:
                    ranks = self._cached(self._ranks, (tag, layer.index, proj, metric),
                                         lambda: row_ranks(self._scores(layer, stats, proj, metric)))
                    if sequential:
                        self._ranks.pop((tag, layer.index, proj, metric))
                    keep = mask_from_ranks(ranks, prune)
                else:
                    keep = self._cached(self._nm_masks, (tag, layer.index, proj, metric, nm),
                                        lambda: nm_mask(self._scores(layer, stats, proj, metric), *nm))
                    if sequential:
                        self._nm_masks.pop((tag, layer.index, proj, metric, nm))
                    keep = keep | torch.as_tensor(sparsity == 0, device=keep.device)[:, None, None]
                w.mul_(keep)
                if masks is not None:
                    masks[f"{layer.index}.{proj}"] = keep.expand(w.shape).clone()
            for b in sorted(set(bits[~removed].tolist()) - {16}):
                idx = torch.as_tensor(np.flatnonzero((bits == b) & ~removed))
                for proj in layer.projections():
                    w = layer.weight(proj)
                    gs = group_size_for(plan.quant.group_size, w.shape[-1], proj, layer)
                    w[idx] = quantize_weight(w[idx], b, gs, plan.quant.symmetric).dequantized
            if removed.any():
                _check_rerouting(layer)
                idx = torch.as_tensor(np.flatnonzero(removed))
                for proj in layer.projections():
                    layer.weight(proj)[idx] = 0
                router = layer.router
                router.moeviz_adapter = layer.adapter
                router.moeviz_allowed = torch.as_tensor(~removed)
                router.moeviz_router_forward = router.forward  # the class's forward, bound to this copy
                router.forward = types.MethodType(_rerouted_forward, router)
        if plan.router_sparsity > 0 or plan.router_bits < 16:
            w = layer.router_weight.detach().clone()
            if plan.router_sparsity > 0:
                keep = unstructured_row_mask(importance_scores(w, "magnitude"), plan.router_sparsity)
                w.mul_(keep)
                if masks is not None:
                    masks[f"{layer.index}.router"] = keep
            if plan.router_bits < 16:
                w = quantize_weight(w, plan.router_bits, group_size_for(plan.quant.group_size, w.shape[-1], "router", layer),
                                    plan.quant.symmetric).dequantized
            setattr(layer.router_proj, layer.router_weight_name, nn.Parameter(w, requires_grad=False))
            replaced.append(layer.router_weight_path)
        if plan.activation_bits < 16:
            layer.experts.moeviz_input_transform = _act_quantizer(plan.activation_bits)
            set_routed_forward(layer, types.MethodType(_activation_quantized_forward, layer.experts))
        return replaced

    # -- reporting
    def _expert_states(self, layers, plan, sparsity, bits, removed) -> list[ExpertState]:
        states = []
        for layer in layers:
            zeros = sum((layer.weight(p) == 0).flatten(1).sum(1) for p in layer.projections())  # [E]
            total = layer.expert_param_count()
            for e in range(layer.num_experts):
                states.append(ExpertState(layer.index, e, float(sparsity[layer.index, e]), int(bits[layer.index, e]),
                                          bool(removed[layer.index, e]), float(zeros[e]) / total))
        return states

    def _storage(self, layers, plan, sparsity, bits, removed) -> StorageReport:
        nm = plan.nm()
        tensors = []
        exp_base = exp_bytes = r_base = r_bytes = 0
        for layer in layers:
            dtype_bytes = layer.weight("down").element_size()
            for e in range(layer.num_experts):
                for proj in layer.projections():
                    shape = tuple(layer.weight(proj).shape[1:])
                    s = float(sparsity[layer.index, e]) if proj in plan.pruning.projections else 0.0
                    st = storage_for(
                        shape, dtype_bytes=dtype_bytes, sparsity=0.0 if nm else s,
                        structure=(("n:m" if nm else "unstructured") if s > 0 else None),
                        n=nm[0] if nm and s > 0 else None, m=nm[1] if nm and s > 0 else None,
                        bits=int(bits[layer.index, e]),
                        group_size=group_size_for(plan.quant.group_size, shape[-1], proj, layer),
                        symmetric=plan.quant.symmetric, removed=bool(removed[layer.index, e]),
                    )
                    exp_base += st.dense_bytes
                    exp_bytes += st.bytes
                    tensors.append(dict(layer=layer.index, expert=e, tensor=proj, **asdict(st)))
            w = layer.router_weight
            st = storage_for(tuple(w.shape), dtype_bytes=w.element_size(),
                             sparsity=plan.router_sparsity,
                             structure="unstructured" if plan.router_sparsity > 0 else None,
                             bits=plan.router_bits,
                             group_size=group_size_for(plan.quant.group_size, w.shape[-1], "router", layer),
                             symmetric=plan.quant.symmetric)
            r_base += st.dense_bytes
            r_bytes += st.bytes
            tensors.append(dict(layer=layer.index, expert=None, tensor="router", **asdict(st)))
        # Everything else (attention, embeddings, norms, shared experts, expert biases) stays dense
        # in the base dtype: the base's total minus what was accounted for above.
        total = sum(p.numel() * p.element_size() for p in self.loaded.model.parameters())
        other = total - exp_base - r_base
        return StorageReport(tensors, exp_base, exp_bytes, r_base, r_bytes, other)


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
    for layer in layers:
        for proj in layer.projections():
            in_features = layer.weight(proj).shape[-1]
            if nm is not None and proj in plan.pruning.projections and in_features % nm[1]:
                raise PlanError(
                    f"pruning.structure: {plan.pruning.structure} needs rows whose width is a multiple of {nm[1]}, "
                    f"but {proj} in {layer.path} has {in_features} input columns; choose M dividing {in_features} "
                    "(e.g. 2:4 or 4:8)"
                )
            group_size_for(plan.quant.group_size, in_features, proj, layer)  # the storage report sizes every tensor
        group_size_for(plan.quant.group_size, layer.router_weight.shape[-1], "router", layer)
        if routing_known and layer.index in removed_layers:
            _check_rerouting(layer)
    return plan


def _check_rerouting(layer: MoELayer) -> None:
    if not layer.adapter.supports_rerouting:
        raise PlanError(
            f"removed_experts: the router at {layer.router_path} follows no routing rule moeviz could "
            "verify, so tokens cannot be re-routed; expert removal is not available for this model"
        )


def group_size_for(group_size: int, in_features: int, what: str, layer: MoELayer) -> int:
    """-1 or a size >= the row means one group per row; otherwise it must divide the row."""
    if group_size == -1 or group_size >= in_features:
        return -1
    if in_features % group_size:
        raise PlanError(
            f"quant.group_size: {group_size} does not divide the {in_features} input columns of {what} in "
            f"{layer.path}; choose a divisor of {in_features} or -1 (one group per row)"
        )
    return group_size


def apply_plan(loaded: LoadedModel, stats: CalibrationStats | None, plan: CompressionPlan,
               samples: TokenSamples | None = None) -> CompressedModel:
    """One-off `Compressor(loaded, stats).apply(plan)`; keep a Compressor to reuse cached ranks."""
    return Compressor(loaded, stats).apply(plan, samples)
