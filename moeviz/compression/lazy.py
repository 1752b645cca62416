"""Lazy compressed weights: an experts runtime's weight provider that compresses one expert when the
forward reaches it, from the base weights + the layer's resolved plan + calibration statistics, on
the weights' own device, and lets it go right after use.

So evaluating a plan never holds a compressed copy of the model: the extra memory is one expert's
weights, scores and mask. The steps are `moeviz.compression.steps` (the same code the materialised
path runs on the whole layer), and every step is row-wise and per expert, so the weights (hence the
logits) are bit-identical to the materialised compressed model's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
from torch import nn

from moeviz.compression import fused_prune, threshold_table
from moeviz.compression.masks import prune_counts
from moeviz.compression.scores import column_factor
from moeviz.compression.scratch import Scratch, thread_scratch
from moeviz.compression.steps import LayerSettings, prune_known, compress_experts, layer_norms
from moeviz.models.layers import MoELayer


# Base-weight bytes compressed per call when a whole layer is materialised (export): bounds the steps'
# temporaries (scores, masks, clones) to a few experts instead of the layer.
LAYER_CHUNK_BYTES = 64 * 2**20
SPLIT_MIN_ELEMENTS = 1 << 25  # weights of one expert from which the forward's fused pass uses every thread


@dataclass(frozen=True, eq=False)
class LazyExpertWeights:
    """WeightProvider (see `moeviz.models.runtime`) for one MoE layer."""

    layer: MoELayer  # geometry only (views of the fused tensors); weights come from the calling module
    settings: LayerSettings
    stats_layer: object | None  # LayerStats of this layer (None: magnitude or no pruning)
    # expert -> {projection: RowThresholds}: per-row thresholds of this plan (O(rows) memory, not
    # per weight), selected the first time an expert is compressed; later batches only compare.
    # Across plans the process-wide threshold tables (`threshold_table.TABLES`) serve the slider's
    # sparsities without any selection.
    thresholds: dict = field(default_factory=dict, repr=False)
    # (projection, expert) -> (column factor, its digest): a function of the statistics alone, so one
    # Compressor's providers of this layer and metric share it (`Compressor._lazy_weights`) and a new
    # plan neither re-validates nor re-hashes them (`_from_tables`).
    factors: dict = field(default_factory=dict, repr=False)

    def __deepcopy__(self, memo):  # immutable: a structural copy shares the provider
        return self

    def compressed(self, experts: nn.Module, e: int, masks: dict | None = None,
                   scratch: Scratch | None = None) -> dict[str, torch.Tensor]:
        """Expert e's compressed fused tensors, name -> [1, ...] (only those the plan changes).
        scratch: buffers to compute in; the tensors returned then live in them (valid until the next
        call on this thread)."""
        sel = np.array([e])
        names = self.settings.touched_names(self.layer)
        base = {n: getattr(experts, n) for n in names}
        device = base[names[0]].device if names else None
        norms = layer_norms(self.stats_layer, self.settings.metric, sel, device)
        return compress_experts(self.layer, base, sel, self.settings, norms, masks,
                                thresholds=self.thresholds.setdefault(e, {}), scratch=scratch,
                                tables=threshold_table.TABLES)

    def __call__(self, experts: nn.Module, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        in_name = "gate_up_proj" if self.layer.has_gate else "up_proj"
        if not self.settings.touches(e):
            return getattr(experts, in_name)[e], experts.down_proj[e]
        # The forward uses an expert's weights and drops them before asking for the next expert, so
        # without autograd (evaluation, calibration) they are computed in this thread's reused buffers:
        # no fresh pages per expert (see moeviz.compression.scratch). With autograd a backward may still
        # need them: fresh tensors.
        if not torch.is_grad_enabled():
            scratch = thread_scratch()
            got = self._from_tables(experts, e, lambda name, src: scratch.get(("out", name), src.shape, src.dtype,
                                                                                src.device), threads=self._threads)
            if got is not None:
                w_in = got[in_name][0] if in_name in got else getattr(experts, in_name)[e]
                return w_in, got["down_proj"][0] if "down_proj" in got else experts.down_proj[e]
        new = self.compressed(experts, e, scratch=None if torch.is_grad_enabled() else thread_scratch())
        w_in = new[in_name][0] if in_name in new else getattr(experts, in_name)[e]
        w_out = new["down_proj"][0] if "down_proj" in new else experts.down_proj[e]
        return w_in, w_out

    @cached_property
    def _threads(self) -> int | None:
        """Threads for the fused pass inside the forward: one for small experts, else all of torch's.
        Between the forward's matmuls torch's OpenMP thread spins on the other core for a while, so a short
        pass split over both cores loses to it (OLMoE shape, 6.3 M weights an expert, 2 layers, 2
        threads: new sparsity 1.44 s on one thread vs 1.49 s split), a long one still gains (Mixtral shape,
        176 M: 1.27 vs 1.45-1.50x a forward)."""
        return 1 if self.layer.expert_param_count() < SPLIT_MIN_ELEMENTS else None

    @cached_property
    def _pruned_names(self) -> dict[str, tuple[str, ...]] | None:
        """Fused name -> its projections, for the tensors this plan prunes, if every projection of each
        is pruned (else None: `_from_tables` does not apply, a half-pruned tensor needs a copy)."""
        layer, s = self.layer, self.settings
        if s.nm is not None or layer.transposed:  # GPT-OSS has its own stored-layout pass (steps._prune_stored)
            return None
        names: dict[str, tuple[str, ...]] = {}
        for p in layer.projections():
            names.setdefault(layer.fused_name(p), ())
            names[layer.fused_name(p)] += (p,)
        pruned = {n: ps for n, ps in names.items() if any(p in s.projections for p in ps)}
        return pruned if all(p in s.projections for ps in pruned.values() for p in ps) else None

    def _factor(self, proj: str, e: int, w: torch.Tensor) -> tuple[torch.Tensor | None, bytes | None]:
        key = (proj, e)
        got = self.factors.get(key)
        if got is None:
            metric = self.settings.metric
            norm = layer_norms(self.stats_layer, metric, np.array([e]), w.device)(proj)  # [1, in] or None
            factor = column_factor(tuple(w.shape), metric, None if norm is None else norm[0], w.device)  # validated once
            got = self.factors[key] = (factor, threshold_table.factor_digest(factor))
        return got

    def _from_tables(self, experts: nn.Module, e: int, dst_for,
                     threads: int | None = None) -> dict[str, torch.Tensor] | None:
        """Expert e's pruned fused tensors (name -> [1, ...], written into dst_for(name, base part)) when
        the plan only prunes it (unstructured, no quantization, not removed) and every pruned projection's
        per-row thresholds are in the shared tables (a slider sparsity once the first evaluation built
        them): one fused pass per projection, the general path's bookkeeping skipped (measured on the
        demo's 32 experts: 4 vs 20 ms a plan). Bit-identical to `compressed` (same `steps.prune_known`);
        None where any of that does not hold, and the caller takes the general path (which fills the
        tables)."""
        s, layer, names, tables = self.settings, self.layer, self._pruned_names, threshold_table.TABLES
        if not names or tables is None or s.bits[e] < 16 or s.removed[e]:
            return None
        if not s.sparsity[e] > 0:  # a dense expert: nothing changes
            return {}
        out = {}
        for name, projs in names.items():
            base = getattr(experts, name)  # [E_total, ...] fused
            src = base[e:e + 1].detach()
            dst = dst_for(name, src)
            if not fused_prune.supports(dst, src):
                return None
            for p in projs:
                w, sw = layer.view(p, dst)[0], layer.view(p, src)[0]  # [out, in]
                k = int(prune_counts(float(s.sparsity[e]), sw.shape[-1], ()))
                if k <= 0:  # too few columns to prune one (as `steps.prune`)
                    w.copy_(sw)
                    continue
                factor, digest = self._factor(p, e, sw)
                tab = tables.get(threshold_table.TableCache.key(base, p, e, digest))
                g = None if tab is None or not tab.finite else tab.column(k)
                if g is None:  # a count off the grid, or no table yet
                    return None
                prune_known(w, sw, factor, k, None, tab, g, bool(tab.tie[:, g].any()), keep_thresholds=False,
                             threads=threads)
            out[name] = dst
        return out

    def masks(self, experts: nn.Module, e: int) -> dict[str, torch.Tensor]:
        """Keep-masks [out, in] of expert e per pruned projection (all True if e is not pruned)."""
        got: dict[str, torch.Tensor] = {}
        if self.settings.sparsity[e] > 0:
            self.compressed(experts, e, got)
        return {p: got[p][0] if p in got else torch.ones(self.layer.view(p, getattr(experts, self.layer.fused_name(p))[e:e + 1])[0].shape, dtype=torch.bool)
                for p in self.settings.projections if p in self.layer.projections()}

    def layer_tensors(self, experts: nn.Module, chunk_bytes: int | None = None) -> dict[str, torch.Tensor]:
        """The whole layer's compressed fused tensors (export materialises layer by layer with this),
        name -> tensor shaped like the module's attribute (zero-compute experts' rows kept).
        Computed a few experts at a time (`chunk_bytes` of base weights, default LAYER_CHUNK_BYTES) into
        the output, so the scores, masks and clones of the steps exist for those experts only: the
        layer costs its output plus a chunk (every step is per expert: same values as one call).
        Transposed storage (GPT-OSS) is pruned in row-major copies (`steps._compress_transposed`)."""
        names = self.settings.touched_names(self.layer)
        if not names:
            return {}
        base = {n: getattr(experts, n) for n in names}
        device = base[names[0]].device
        n = self.layer.num_experts
        per_expert = sum(t[0].numel() * t.element_size() for t in base.values())
        step = max(1, min(n, (LAYER_CHUNK_BYTES if chunk_bytes is None else chunk_bytes) // max(1, per_expert)))
        new, work = {}, Scratch()  # work: the row-major buffers of a transposed layer, reused by every chunk
        for name, t in base.items():  # [E_total, ...]: rows past E (zero-compute experts) are the base's
            new[name] = torch.empty_like(t.detach())
            new[name][n:] = t.detach()[n:]
        for start in range(0, n, step):
            sel = np.arange(start, min(start + step, n))
            if self._chunk_from_tables(experts, sel, new):
                continue
            # written straight into the output's rows (every touched name is in `new`: no copy after)
            compress_experts(self.layer, base, sel, self.settings,
                             layer_norms(self.stats_layer, self.settings.metric, sel, device),
                             tables=threshold_table.TABLES,
                             out={name: t[start:start + len(sel)] for name, t in new.items()}, work=work)
        return new

    def _chunk_from_tables(self, experts: nn.Module, sel: np.ndarray, new: dict[str, torch.Tensor]) -> bool:
        """Experts `sel` of `layer_tensors` by `_from_tables`, written into their rows of `new`; False (rows
        partly written, to be overwritten) unless it served every one of them."""
        with torch.no_grad():
            for e in sel:
                got = self._from_tables(experts, int(e), lambda name, src: new[name][e:e + 1])
                if got is None:
                    return False
                for name, t in new.items():  # touched but not pruned for this expert: the base's rows
                    if name not in got:
                        t[e:e + 1] = getattr(experts, name)[e:e + 1]
        return True

    @torch.no_grad()  # so the experts are compressed in this thread's reused buffers
    def zero_counts(self, experts: nn.Module) -> torch.Tensor:
        """[E] exact zeros of each expert's compressed weights (all projections), one expert at a time."""
        counts = torch.zeros(self.layer.num_experts, dtype=torch.float64)
        for e in range(self.layer.num_experts):
            w_in, w_out = self(experts, e)
            counts[e] = float((w_in == 0).sum() + (w_out == 0).sum())
        return counts
