"""Apply a `CompressionPlan` to a loaded model without touching the base model.

The result is a structural copy of the base (new module objects, shared tensors) in which only the
tensors the plan touches are replaced: the fused expert tensors of layers with pruned, quantized or
removed experts, and router weights that are pruned or quantized. Memory is therefore the base plus
copies of the touched tensors, never a deep copy of the whole model.

Per layer the work is small steps (`moeviz.compression.steps`: prune, quantize, remove), then
`install_experts` / the runtime modules (re-routing, activation quantization). Per-row pruning
thresholds are selected on the fly (`unstructured_row_mask`); `Compressor(cache_ranks=True)` keeps
the old opt-in per-row rank cache (2 bytes per weight) for the interactive app. With `lazy=True` no
expert tensor is replaced: a weight provider compresses each expert when the forward reaches it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from moeviz.calibration.stats import CalibrationStats
from moeviz.compression.allocation import allocate_sparsity
from moeviz.compression.formats import TensorStorage, storage_for
from moeviz.compression.masks import row_ranks, unstructured_row_mask
from moeviz.compression.plan import CompressionPlan
from moeviz.compression.quantize import fake_quantize_activations, quantize_weight
from moeviz.compression.scores import importance_scores
from moeviz.compression import threshold_table
from moeviz.compression.lazy import LazyExpertWeights
from moeviz.compression.steps import LayerSettings, compress_experts, layer_norms
from moeviz.data import TokenSamples
from moeviz.errors import PlanError
from moeviz.models.offload import install_tensor, module_weights
from moeviz.models.runtime import experts_runtime, install_experts_runtime, install_router_runtime, router_runtime
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


# ---------------------------------------------------------------------------- installing on the copy

@dataclass(frozen=True)
class ActivationQuantizer:
    """Input transform of an experts runtime: fake-quantize each expert's input to `bits`."""

    bits: int

    def __call__(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize_activations(x, self.bits)


def install_experts(layer: MoELayer, new: dict[str, torch.Tensor]) -> list[str]:
    """Put compressed fused tensors (name -> [E, ...]) into `layer`'s experts module as frozen
    parameters; rows beyond E (zero-compute experts) are kept from the current tensor."""
    replaced = []
    for name, t in new.items():
        current = getattr(layer.experts, name)
        if t.shape[0] != current.shape[0]:
            full = current.detach().clone()
            full[: t.shape[0]] = t
            t = full
        install_tensor(layer.experts, name, t)
        replaced.append(f"{layer.experts_path}.{name}")
    return replaced


# ---------------------------------------------------------------------------- the compressor

class Compressor:
    """Applies plans to one loaded model with one set of calibration statistics, caching the
    importance-score ranks so that each new plan costs little more than one pass over the weights."""

    def __init__(self, loaded: LoadedModel, stats: CalibrationStats | None = None, cache_ranks: bool = False):
        if stats is not None and stats.model_fingerprint != loaded.fingerprint:
            raise PlanError(
                f"calibration statistics belong to model {stats.model_fingerprint}, not to the loaded "
                f"model {loaded.fingerprint}; recalibrate"
            )
        self.loaded = loaded
        self.stats = stats
        self.cache_ranks = cache_ranks
        self._ranks: dict[tuple, torch.Tensor] = {}  # only with cache_ranks
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
        sparsity, bits, removed = resolve_settings(plan, base_layers, self.stats)
        second = None
        # only when some expert is actually pruned by SparseGPT or quantized by GPTQ (else the usual path)
        if (plan.pruning.metric == "sparsegpt" and (sparsity > 0).any()) or \
                (plan.quant.method == "gptq" and (bits[~removed] < 16).any()):
            if samples is None:
                raise PlanError("pruning.metric 'sparsegpt' / quant.method 'gptq': the per-expert Hessians need "
                                "the calibration samples")
            second = self.second_order(plan, samples, sparsity, bits, removed, progress, cancel)
        if self.stats is None and plan.pruning.metric not in ("magnitude", "sparsegpt") and (sparsity > 0).any():
            raise PlanError(f"pruning.metric {plan.pruning.metric!r} needs calibration statistics; calibrate first")

        view = structural_copy(self.loaded.model)
        layers = find_moe_layers(view, self.loaded.layers)
        replaced: list[str] = []
        masks: dict[str, torch.Tensor] | None = {} if keep_masks else None
        lazy = lazy and not keep_masks and not plan.sequential and second is None
        for layer in layers:
            if second is not None:
                replaced += self._install_second_order(layer, plan, second, sparsity, bits, removed, masks)
                continue
            if lazy:
                replaced += self._install_lazy(layer, plan, sparsity[layer.index], bits[layer.index],
                                               removed[layer.index])
                continue
            stats = self.stats
            if plan.sequential and layer.index > 0 and sparsity.any():
                # Statistics of this layer's inputs as produced by the already-compressed layers before it.
                from moeviz.calibration.collect import calibrate

                partial = LoadedModel(view, self.loaded.tokenizer, layers, self.loaded.info)
                stats = calibrate(partial, samples, record_tokens=0)
            replaced += self._compress_layer(layer, plan, sparsity[layer.index], bits[layer.index],
                                             removed[layer.index], stats, sequential=plan.sequential, masks=masks)
            if progress is not None:
                progress(layer.index + 1, len(layers))
        if lazy or masks is None:
            # Measuring zeros means compressing every expert once (lazy) or a pass over every weight: only
            # when someone asks (the app's evaluation does not). With masks (recovery, which trains the
            # weights afterwards) the zeros as compressed, now.
            experts = LazyExpertStates(lambda: self._expert_states(layers, plan, sparsity, bits, removed))
        else:
            experts = self._expert_states(layers, plan, sparsity, bits, removed)
        storage = self._storage(layers, plan, sparsity, bits, removed)
        sources = {} if plan.sequential else {  # settings only, no weight read (see CompressedModel)
            l.index: self._lazy_weights(l, self.layer_settings(l, plan, sparsity[l.index], bits[l.index],
                                                               removed[l.index])) for l in layers}
        return CompressedModel(view, layers, plan, experts, storage, time.perf_counter() - start, replaced,
                               masks or {}, lazy=lazy, second_order=second.summary() if second is not None else None,
                               grids=dict(second.grids) if second is not None else {}, expert_sources=sources)

    def second_order(self, plan: CompressionPlan, samples: TokenSamples, sparsity=None, bits=None, removed=None,
                     progress=None, cancel=None):
        """The plan's `SecondOrderResult` (moeviz.compression.second_order), cached per plan and windows."""
        from moeviz.compression.second_order import compress_second_order, plan_key

        key = plan_key(plan, samples)
        if key not in self._second_order:
            if sparsity is None:
                sparsity, bits, removed = resolve_settings(plan, self.loaded.layers, self.stats)
            result = compress_second_order(self, plan, sparsity, bits, removed, samples,
                                           progress=progress, cancel=cancel)
            # each result is a copy of the touched experts + masks: bounded by count and by bytes
            while self._second_order and (len(self._second_order) >= self.second_order_cache_size or sum(
                    r.nbytes() for r in self._second_order.values()) + result.nbytes() > self.second_order_cache_bytes):
                self._second_order.pop(next(iter(self._second_order)))
            self._second_order[key] = result
        return self._second_order[key]

    def _install_second_order(self, layer, plan, second, sparsity, bits, removed, masks) -> list[str]:
        """Install a layer's cached second-order tensors (copies: a caller may train them) + router steps."""
        s = self.layer_settings(layer, plan, sparsity[layer.index], bits[layer.index], removed[layer.index])
        replaced = install_experts(layer, {n: t.detach().clone() for n, t in second.tensors.get(layer.index, {}).items()})
        if masks is not None:
            for key, keep in second.masks.items():
                if int(key.split(".")[0]) == layer.index:
                    masks[key] = keep.clone()
        return replaced + self._install_common(layer, plan, s, masks)

    def _install_lazy(self, layer, plan, sparsity, bits, removed) -> list[str]:
        """The lazy counterpart of `_compress_layer`: a weight provider instead of compressed tensors."""
        s = self.layer_settings(layer, plan, sparsity, bits, removed)
        self._check_layer(layer, s, self.stats)
        if s.touched_names(layer):
            install_experts_runtime(layer).weights = self._lazy_weights(layer, s)
        return self._install_common(layer, plan, s, None)

    def _lazy_weights(self, layer: MoELayer, s: LayerSettings) -> LazyExpertWeights:
        stats_layer = self.stats.layers[layer.index] if self.stats is not None else None
        factors = self._factors.setdefault((layer.index, s.metric), {})  # this compressor's statistics
        return LazyExpertWeights(self.loaded.layers[layer.index], s, stats_layer, factors=factors)

    def _check_layer(self, layer, s: LayerSettings, stats) -> None:
        if s.removed.any():
            _check_rerouting(layer)
        if stats is None and s.metric not in ("magnitude", "sparsegpt") and (s.sparsity > 0).any():
            raise PlanError(f"pruning.metric {s.metric!r} needs calibration statistics; calibrate first (or use 'magnitude')")

    def _install_common(self, layer, plan, s: LayerSettings, masks) -> list[str]:
        """Steps after the experts' weights: re-routing, router compression, activation quantization."""
        if s.removed.any():
            install_router_runtime(layer).allowed = torch.as_tensor(~s.removed)
        replaced = self._compress_router(layer, plan, masks)
        if plan.activation_bits < 16:
            install_experts_runtime(layer).input_transform = ActivationQuantizer(plan.activation_bits)
        return replaced

    def layer_settings(self, layer: MoELayer, plan: CompressionPlan, sparsity, bits, removed) -> LayerSettings:
        """The plan resolved for one layer (per-expert rows of the [L, E] arrays, cut to the layer's E)."""
        E = layer.num_experts
        quantized = [int(b) for b, r in zip(bits[:E], removed[:E]) if not r]
        lowest = min(quantized, default=16)  # group sizes matter only if some expert is quantized
        gs = {p: group_size_for(plan.quant.group_size, layer.weight(p).shape[-1], p, layer, lowest)
              for p in layer.projections()}
        return LayerSettings(np.asarray(sparsity[:E]), np.asarray(bits[:E]), np.asarray(removed[:E]),
                             plan.pruning.metric, tuple(plan.pruning.projections), plan.nm(), gs, plan.quant.symmetric)

    def _ranks_fn(self, layer: MoELayer, s: LayerSettings, norms, sequential: bool):
        """Opt-in (`cache_ranks=True`) per-row rank cache for unstructured pruning: one stable sort per
        (layer, projection, metric), then a new sparsity is one comparison. Off by default: the ranks
        take 2 bytes per pruned weight, and selecting per-row thresholds on the fly gives the same mask."""
        if not self.cache_ranks or sequential or s.nm is not None:
            return None

        def ranks(proj: str, w: torch.Tensor) -> torch.Tensor:
            key = (layer.index, proj, s.metric)
            if key not in self._ranks:
                self._ranks[key] = row_ranks(importance_scores(w, s.metric, norms(proj)))
            return self._ranks[key]
        return ranks

    def _compress_layer(self, layer, plan, sparsity, bits, removed, stats, sequential, masks=None) -> list[str]:
        """Prune, quantize, remove (moeviz.compression.steps) on clones of the touched fused tensors,
        install them, then the router and activation steps; returns the replaced tensors' paths."""
        s = self.layer_settings(layer, plan, sparsity, bits, removed)
        self._check_layer(layer, s, stats)
        replaced = []
        if s.touched_names(layer):
            sel = np.arange(layer.num_experts)
            layer_masks = {} if masks is not None else None
            with module_weights(layer.experts):  # offloaded: loaded for this layer only
                device = layer.weight("down").device
                norms = layer_norms(stats.layers[layer.index] if stats is not None else None, s.metric, sel, device)
                ranks = self._ranks_fn(layer, s, norms, sequential)
                if layer_masks is None and ranks is None and not sequential:
                    # The lazy provider's materialisation: a few experts at a time, and the experts the
                    # shared threshold tables serve in one fused pass each (`LazyExpertWeights.layer_tensors`).
                    new = self._lazy_weights(layer, s).layer_tensors(layer.experts)
                else:
                    # The shared threshold tables (threshold_table) serve statistics that outlive this call;
                    # a sequential plan's per-layer re-calibration does not.
                    base = {n: getattr(layer.experts, n) for n in s.touched_names(layer)}
                    new = compress_experts(layer, base, sel, s, norms, layer_masks, ranks,
                                           tables=threshold_table.TABLES if not sequential and ranks is None else None)
                replaced += install_experts(layer, new)
            if masks is not None:
                for proj, keep in layer_masks.items():
                    masks[f"{layer.index}.{proj}"] = keep[: layer.num_experts].expand(layer.weight(proj).shape).clone()
        return replaced + self._install_common(layer, plan, s, masks)

    def _compress_router(self, layer, plan, masks) -> list[str]:
        if not (plan.router_sparsity > 0 or plan.router_bits < 16):
            return []
        with module_weights(layer.router_proj):
            w = layer.router_weight.detach().clone()
        if plan.router_sparsity > 0:
            keep = unstructured_row_mask(importance_scores(w, "magnitude"), plan.router_sparsity)
            w.mul_(keep)
            if masks is not None:
                masks[f"{layer.index}.router"] = keep
        if plan.router_bits < 16:
            w = quantize_weight(w, plan.router_bits, group_size_for(plan.quant.group_size, w.shape[-1], "router", layer),
                                plan.quant.symmetric).dequantized
        install_tensor(layer.router_proj, layer.router_weight_name, w)
        return [layer.router_weight_path]

    # -- reporting
    def _expert_states(self, layers, plan, sparsity, bits, removed) -> list[ExpertState]:
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

    def _storage(self, layers, plan, sparsity, bits, removed) -> StorageReport:
        nm = plan.nm()
        tensors = []
        exp_base = exp_bytes = r_base = r_bytes = 0
        # Experts with the same shape and settings store the same way: one StorageFormat (and its dict) per
        # distinct setting, not per expert (a uniform plan has one per projection shape).
        formats: dict[tuple, tuple] = {}
        for layer in layers:
            dtype_bytes = layer.weight("down").element_size()
            shapes = {proj: tuple(layer.weight(proj).shape[1:]) for proj in layer.projections()}
            for e in range(layer.num_experts):
                b, gone = int(bits[layer.index, e]), bool(removed[layer.index, e])
                for proj, shape in shapes.items():
                    s = float(sparsity[layer.index, e]) if proj in plan.pruning.projections else 0.0
                    key = (shape, dtype_bytes, s, b, gone, proj)
                    got = formats.get(key)
                    if got is None:
                        st = storage_for(
                            shape, dtype_bytes=dtype_bytes, sparsity=0.0 if nm else s,
                            structure=(("n:m" if nm else "unstructured") if s > 0 else None),
                            n=nm[0] if nm and s > 0 else None, m=nm[1] if nm and s > 0 else None,
                            bits=b, group_size=group_size_for(plan.quant.group_size, shape[-1], proj, layer, b),
                            symmetric=plan.quant.symmetric, removed=gone,
                        )
                        got = formats[key] = (st, asdict(st))
                    st, st_dict = got
                    exp_base += st.dense_bytes
                    exp_bytes += st.bytes
                    tensors.append(dict(layer=layer.index, expert=e, tensor=proj, **st_dict))
            w = layer.router_weight
            st = storage_for(tuple(w.shape), dtype_bytes=w.element_size(),
                             sparsity=plan.router_sparsity,
                             structure="unstructured" if plan.router_sparsity > 0 else None,
                             bits=plan.router_bits,
                             group_size=group_size_for(plan.quant.group_size, w.shape[-1], "router", layer,
                                                       plan.router_bits),
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
            _check_rerouting(layer)
    return plan


def _check_rerouting(layer: MoELayer) -> None:
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


def apply_plan(loaded: LoadedModel, stats: CalibrationStats | None, plan: CompressionPlan,
               samples: TokenSamples | None = None) -> CompressedModel:
    """One-off `Compressor(loaded, stats).apply(plan)`; keep a Compressor to reuse cached ranks."""
    return Compressor(loaded, stats).apply(plan, samples)
