"""Apply a `CompressionPlan` to a loaded model without touching the base model.

The result is a structural copy of the base (new module objects, shared tensors) in which only the
tensors the plan touches are replaced: the fused expert tensors of layers with pruned, quantized or
removed experts, and router weights that are pruned or quantized. Memory is therefore the base plus
copies of the touched tensors, never a deep copy of the whole model.

The plan is resolved once (`moeviz.compression.resolve.resolve_plan`), then per layer the work is small
steps (`moeviz.compression.steps`: prune, quantize, remove) and `moeviz.compression.install` (tensors,
re-routing, router compression, activation quantization). Per-row pruning thresholds are selected on
the fly or read from the shared threshold tables (`threshold_table`). With `lazy=True` no expert
tensor is replaced: a weight provider compresses each expert when the forward reaches it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from moeviz.calibration.stats import CalibrationStats
from moeviz.compression.plan import CompressionPlan, plan_key
from moeviz.compression import threshold_table
from moeviz.compression.install import install_experts, install_layer_routing
from moeviz.compression.lazy import LazyExpertWeights
from moeviz.compression.resolve import ResolvedPlan, check_layer, check_plan_fits, resolve_plan
from moeviz.compression.steps import LayerSettings, compress_experts, layer_norms
from moeviz.compression.storage import StorageReport, storage_report
from moeviz.data import TokenSamples
from moeviz.errors import PlanError
from moeviz.models.offload import module_weights
from moeviz.models.runtime import experts_runtime, install_experts_runtime, router_runtime
from moeviz.models.layers import MoELayer, find_moe_layers
from moeviz.models.loading import LoadedModel
from moeviz.models.views import structural_copy


@dataclass
class ExpertState:
    """What the plan resolved to for one expert, and what its weights now are."""

    layer: int
    expert: int
    sparsity: float  # requested fraction of the pruned projections' weights zeroed
    bits: int
    removed: bool
    zero_fraction: float  # measured on the compressed weights (all projections)


class LazyExpertStates(Sequence):
    """The expert table of a lazy compressed model, measured on first use (one expert at a time)."""

    def __init__(self, compute):
        self._compute, self._states = compute, None

    def _get(self) -> list[ExpertState]:
        if self._states is None:
            self._states = self._compute()
        return self._states

    def __getitem__(self, i):
        return self._get()[i]

    def __len__(self) -> int:
        return len(self._get())

    def __iter__(self):
        return iter(self._get())


@dataclass
class CompressedModel:
    model: nn.Module  # structural copy of the base; untouched tensors are shared with it
    layers: list[MoELayer]
    plan: CompressionPlan
    experts: Sequence[ExpertState]  # a list; for a lazy model measured on first use (LazyExpertStates)
    storage: StorageReport
    seconds: float
    replaced_tensors: list[str] = field(default_factory=list)
    # Pruning keep-masks, only when asked for (`apply(..., keep_masks=True)`, used by recovery):
    # "layer.proj" -> bool [E, out, in] (True = keep), "layer.router" -> bool [E, H].
    masks: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    recovery: dict | None = None  # RecoveryResult.summary() when this model was recovered by distillation
    lazy: bool = False  # expert weights come from weight providers (moeviz.compression.lazy), not tensors
    # SecondOrderResult.summary() for SparseGPT / GPTQ plans: seconds, threads, OBS loss, and `warnings`
    # listing experts with fewer routed calibration tokens than columns (their Hessian was damped more)
    second_order: dict | None = None
    # GPTQ's grids ("layer.proj" -> second_order.GptqGrid: per expert, row and group scale / zero point), shared
    # with the Compressor's cached result (read-only): recovery rounds on them, so it stays on GPTQ's grid
    grids: dict = field(default_factory=dict, repr=False)
    # MoE layer -> the lazy provider of its resolved settings (holds no weights; lazy or not): what the packed
    # low-bit runtime re-derives each expert's integer codes from (`moeviz.compression.packed`). Not for
    # sequential plans (their statistics are re-calibrated per layer).
    expert_sources: dict = field(default_factory=dict, repr=False)

    def expert_table(self) -> list[dict]:
        return [asdict(e) for e in self.experts]

    def allowed_experts(self, layer: int) -> torch.Tensor:
        """[E] bool, False for removed experts of MoE layer `layer`."""
        rt = router_runtime(self.layers[layer].router)
        if rt is None or rt.allowed is None:
            return torch.ones(self.layers[layer].num_experts, dtype=torch.bool)
        return rt.allowed


# ---------------------------------------------------------------------------- the compressor

class Compressor:
    """Applies plans to one loaded model with one set of calibration statistics, caching what plans share
    (the lazy providers' column factors, second-order results) so each new plan costs little more than one
    pass over the weights."""

    def __init__(self, loaded: LoadedModel, stats: CalibrationStats | None = None):
        if stats is not None and stats.model_fingerprint != loaded.fingerprint:
            raise PlanError(
                f"calibration statistics belong to model {stats.model_fingerprint}, not to the loaded "
                f"model {loaded.fingerprint}; recalibrate"
            )
        self.loaded = loaded
        self.stats = stats
        # (layer, metric) -> the lazy providers' column factors (`LazyExpertWeights.factors`): O(experts x in)
        self._factors: dict[tuple, dict] = {}
        # Second-order plans (SparseGPT / GPTQ) materialise their experts once: plan key -> SecondOrderResult
        self._second_order: dict[str, object] = {}
        self.second_order_cache_size = 4
        self.second_order_cache_bytes = 4 << 30  # older results are dropped to keep the cache under this (the newest stays)

    def apply(self, plan: CompressionPlan, samples: TokenSamples | None = None,
              keep_masks: bool = False, lazy: bool = False, progress=None, cancel=None) -> CompressedModel:
        """Compress a structural copy of the base model according to `plan`.

        keep_masks: also return the pruning masks (1 byte per pruned weight; recovery needs them to
        keep pruned weights at zero, the app's interactive path does not).
        lazy: install weight providers instead of compressed tensors (`moeviz.compression.lazy`): each
        expert is compressed when the forward reaches it and dropped after, so evaluating never holds
        a compressed copy. Not with keep_masks, sequential or second-order plans (those materialise).
        progress(done, total, seconds left or None): after each layer of a sequential plan (which
        re-calibrates before each) or of a second-order plan (SparseGPT, GPTQ: computed once per plan and
        calibration windows, then cached); cancel(): checked between layers of a second-order plan."""
        start = time.perf_counter()
        base_layers = self.loaded.layers
        check_plan_fits(plan, base_layers)
        if plan.sequential and samples is None:
            raise PlanError("sequential: re-calibrating layer by layer needs the calibration samples")
        resolved = resolve_plan(plan, base_layers, self.stats)
        second = None
        # only when some expert is actually pruned by SparseGPT or quantized by GPTQ (else the usual path)
        if resolved.second_order:
            if samples is None:
                raise PlanError("pruning.metric 'sparsegpt' / quant.method 'gptq': the per-expert Hessians need "
                                "the calibration samples")
            second = self.second_order(plan, samples, resolved, progress, cancel)
        if self.stats is None and resolved.needs_stats:
            raise PlanError(f"pruning.metric {plan.pruning.metric!r} needs calibration statistics; calibrate first")

        view = structural_copy(self.loaded.model)
        layers = find_moe_layers(view, self.loaded.layers)
        replaced: list[str] = []
        masks: dict[str, torch.Tensor] | None = {} if keep_masks else None
        lazy = lazy and not keep_masks and not plan.sequential and second is None
        for layer in layers:
            s = resolved.layer(layer)
            if second is not None:
                replaced += self._install_second_order(layer, plan, s, second, masks)
                continue
            if lazy:
                replaced += self._install_lazy(layer, plan, s)
                continue
            stats = self.stats
            if plan.sequential and layer.index > 0 and resolved.sparsity.any():
                # Statistics of this layer's inputs as produced by the already-compressed layers before it.
                from moeviz.calibration.collect import calibrate

                partial = LoadedModel(view, self.loaded.tokenizer, layers, self.loaded.info)
                stats = calibrate(partial, samples, record_tokens=0)
            replaced += self._compress_layer(layer, plan, s, stats, sequential=plan.sequential, masks=masks)
            if progress is not None:
                progress(layer.index + 1, len(layers))
        if lazy or masks is None:
            # Measuring zeros means compressing every expert once (lazy) or a pass over every weight: only
            # when someone asks (the app's evaluation does not). With masks (recovery, which trains the
            # weights afterwards) the zeros as compressed, now.
            experts = LazyExpertStates(lambda: self._expert_states(layers, resolved))
        else:
            experts = self._expert_states(layers, resolved)
        storage = storage_report(self.loaded.model, layers, resolved)
        sources = {} if plan.sequential else {  # settings only, no weight read (see CompressedModel)
            l.index: self._lazy_weights(l, resolved.layer(l)) for l in layers}
        return CompressedModel(view, layers, plan, experts, storage, time.perf_counter() - start, replaced,
                               masks or {}, lazy=lazy, second_order=second.summary() if second is not None else None,
                               grids=dict(second.grids) if second is not None else {}, expert_sources=sources)

    def second_order(self, plan: CompressionPlan, samples: TokenSamples, resolved: ResolvedPlan | None = None,
                     progress=None, cancel=None):
        """The plan's `SecondOrderResult` (moeviz.compression.second_order), cached per plan and windows."""
        from moeviz.compression.second_order import compress_second_order

        key = plan_key(plan) + "|" + str(samples.fingerprint)  # the plan and the calibration windows
        if key not in self._second_order:
            if resolved is None:
                resolved = resolve_plan(plan, self.loaded.layers, self.stats)
            result = compress_second_order(self, resolved, samples, progress=progress, cancel=cancel)
            # each result is a copy of the touched experts + masks: bounded by count and by bytes
            while self._second_order and (len(self._second_order) >= self.second_order_cache_size or sum(
                    r.nbytes() for r in self._second_order.values()) + result.nbytes() > self.second_order_cache_bytes):
                self._second_order.pop(next(iter(self._second_order)))
            self._second_order[key] = result
        return self._second_order[key]

    def _install_second_order(self, layer, plan, s: LayerSettings, second, masks) -> list[str]:
        """Install a layer's cached second-order tensors (copies: a caller may train them) + router steps."""
        replaced = install_experts(layer, {n: t.detach().clone() for n, t in second.tensors.get(layer.index, {}).items()})
        if masks is not None:
            for key, keep in second.masks.items():
                if int(key.split(".")[0]) == layer.index:
                    masks[key] = keep.clone()
        return replaced + install_layer_routing(layer, plan, s, masks)

    def _install_lazy(self, layer, plan, s: LayerSettings) -> list[str]:
        """The lazy counterpart of `_compress_layer`: a weight provider instead of compressed tensors."""
        check_layer(layer, s, self.stats)
        if s.touched_names(layer):
            install_experts_runtime(layer).weights = self._lazy_weights(layer, s)
        return install_layer_routing(layer, plan, s, None)

    def _lazy_weights(self, layer: MoELayer, s: LayerSettings) -> LazyExpertWeights:
        stats_layer = self.stats.layers[layer.index] if self.stats is not None else None
        factors = self._factors.setdefault((layer.index, s.metric), {})  # this compressor's statistics
        return LazyExpertWeights(self.loaded.layers[layer.index], s, stats_layer, factors=factors)

    def _compress_layer(self, layer, plan, s: LayerSettings, stats, sequential, masks=None) -> list[str]:
        """Prune, quantize, remove (moeviz.compression.steps) on clones of the touched fused tensors,
        install them, then the router and activation steps; returns the replaced tensors' paths."""
        check_layer(layer, s, stats)
        replaced = []
        if s.touched_names(layer):
            sel = np.arange(layer.num_experts)
            layer_masks = {} if masks is not None else None
            with module_weights(layer.experts):  # offloaded: loaded for this layer only
                device = layer.weight("down").device
                norms = layer_norms(stats.layers[layer.index] if stats is not None else None, s.metric, sel, device)
                if layer_masks is None and not sequential:
                    # The lazy provider's materialisation: a few experts at a time, and the experts the
                    # shared threshold tables serve in one fused pass each (`LazyExpertWeights.layer_tensors`).
                    new = self._lazy_weights(layer, s).layer_tensors(layer.experts)
                else:
                    # The shared threshold tables (threshold_table) serve statistics that outlive this call;
                    # a sequential plan's per-layer re-calibration does not.
                    base = {n: getattr(layer.experts, n) for n in s.touched_names(layer)}
                    new = compress_experts(layer, base, sel, s, norms, layer_masks,
                                           tables=threshold_table.TABLES if not sequential else None)
                replaced += install_experts(layer, new)
            if masks is not None:
                for proj, keep in layer_masks.items():
                    masks[f"{layer.index}.{proj}"] = keep[: layer.num_experts].expand(layer.weight(proj).shape).clone()
        return replaced + install_layer_routing(layer, plan, s, masks)

    # -- reporting
    def _expert_states(self, layers, resolved: ResolvedPlan) -> list[ExpertState]:
        sparsity, bits, removed = resolved.sparsity, resolved.bits, resolved.removed
        states = []
        for layer in layers:
            rt = experts_runtime(layer.experts)
            with module_weights(layer.experts):
                if rt is not None and isinstance(rt.weights, LazyExpertWeights):  # measured one expert at a time
                    zeros = rt.weights.zero_counts(layer.experts)
                else:
                    # One expert at a time: a bool [E, out, in] per projection would be half a bf16 layer.
                    zeros = torch.tensor([sum(int((layer.weight(p)[e] == 0).sum()) for p in layer.projections())
                                          for e in range(layer.num_experts)], dtype=torch.float64)
            total = layer.expert_param_count()
            for e in range(layer.num_experts):
                states.append(ExpertState(layer.index, e, float(sparsity[layer.index, e]), int(bits[layer.index, e]),
                                          bool(removed[layer.index, e]), float(zeros[e]) / total))
        return states

