"""Second-order compression of a plan's experts: SparseGPT pruning and GPTQ quantization per expert
projection, with per-expert (router-weighted) Hessians, layer by layer.

This is the thin configuration side; the OBS kernels are pure tensor functions in
`moeviz.compression.obs` and the Hessians come from `moeviz.calibration.hessians`. For each decoder
layer in order (on a structural copy; the base is never touched):

1. router settings of the plan (removal re-routing, router compression, activation quantization) are
   installed first, so the Hessians see the routing the compressed model will use;
2. the layer runs on the outputs of the already-compressed layers before it; an expert observer keeps
   each expert's routed inputs x and routing weights g;
3. per expert: H_in = Σ w_t x xᵀ compresses gate and up (one solve: they share H), then the down
   projection's inputs act(gate' x)·(up' x) of the *compressed* gate/up give H_down; the old metrics'
   masks (magnitude / Wanda / MoE-Pruner with GPTQ) are kept fixed and compensated, RTN rounds after
   the OBS pruning; removed experts are zeroed;
4. the compressed layer produces the next layer's inputs (sequential by construction).

Memory: one layer's routed inputs (in groups of experts when they exceed `ROUTED_INPUT_BYTES`: the layer
then runs once per group) plus one expert's H×H (then I×I) at a time. An expert with fewer
routed tokens than a projection's columns has a rank-deficient Hessian: it is damped more
(`LOW_TOKEN_DAMP`) and listed in `SecondOrderResult.warnings`; an expert no token reaches gets the
identity Hessian (SparseGPT then prunes by magnitude, GPTQ rounds to nearest).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from moeviz.calibration.hessians import RoutedInputs, capture_decoder_inputs, expert_hessian, token_weights
from moeviz.compression.install import install_experts, install_layer_routing
from moeviz.compression.quantize import quantize_weight
from moeviz.compression.resolve import ResolvedPlan, check_layer
from moeviz.compression.steps import LayerSettings, layer_norms, prune, remove
from moeviz.errors import PlanError
from moeviz.models.experts import expert_output, gate_on_input
from moeviz.models.layers import decoder_layers, find_moe_layers
from moeviz.models.offload import module_weights
from moeviz.models.runtime import install_experts_runtime
from moeviz.models.views import structural_copy

LOW_TOKEN_DAMP = 0.1  # percdamp for experts with fewer routed tokens than columns
# At most this many bytes of routed expert inputs are held at once (estimated): above it, a layer's experts are
# compressed in groups, the layer running once per group (e.g. 64 windows x 2048 tokens, top-8, H = 2048, bf16:
# 4 GiB of inputs per layer -> 4 groups)
ROUTED_INPUT_BYTES = 1 << 30

# refit solves one |S| x |S| system per row (|S| = kept columns): O(out * |S|^3) per expert projection.
# Above this many kept columns per row the plan is refused (PlanError naming refit, with the estimated cost).
REFIT_MAX_COLUMNS = 1024

ProgressFn = Callable[[int, int, float], None]  # (done decoder layers, total, seconds left: estimate)


class Cancelled(PlanError):
    """The second-order compression was stopped by its cancel callback."""


@dataclass
class GptqGrid:
    """GPTQ's grid of one projection of a layer (the values the OBS loop rounded every weight to).

    Kept so that later steps (recovery) round on the *same* grid: re-computing RTN scales from the
    weights would move weights off GPTQ's result (``quantize.quantize_on_grid`` rounds on it)."""

    scales: torch.Tensor  # [E, out, G] float32, one per (expert, row, group); G = in / group_size
    zero_points: torch.Tensor | None  # [E, out, G] float32; None when symmetric
    group_size: int  # effective: the row length when one group spans the row
    bits: torch.Tensor  # [E] int64: each expert's bit width on this grid; 16 = not quantized by GPTQ (rows unused)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.scales, self.zero_points, self.bits) if t is not None)


@dataclass
class SecondOrderResult:
    tensors: dict[int, dict[str, torch.Tensor]]  # MoE layer -> fused name -> compressed [E, ...] (install_experts)
    masks: dict[str, torch.Tensor]  # "layer.proj" -> bool [E, out, in] keep-masks of pruned projections
    warnings: list[dict]  # experts whose Hessian was damped more / replaced: layer, expert, projection, tokens, columns
    loss: float  # Σ of the OBS reconstruction losses reported by the kernels
    seconds: float
    threads: int = field(default_factory=torch.get_num_threads)
    record: dict | None = field(default=None, repr=False)  # see compress_second_order(hessians=)
    grids: dict[str, GptqGrid] = field(default_factory=dict, repr=False)  # "layer.proj" -> GPTQ's grid

    def summary(self) -> dict:
        return dict(seconds=self.seconds, loss=self.loss, threads=self.threads, warnings=self.warnings)

    def nbytes(self) -> int:
        """Memory held by the compressed tensors and masks."""
        tensors = [t for d in self.tensors.values() for t in d.values()] + list(self.masks.values())
        return sum(t.numel() * t.element_size() for t in tensors) + sum(g.nbytes() for g in self.grids.values())


def compress_second_order(compressor, resolved: ResolvedPlan, samples, batch_size: int = 8,
                          progress: ProgressFn | None = None, cancel: Callable[[], bool] | None = None,
                          hessians: dict | None = None) -> SecondOrderResult:
    """The compressed expert tensors of every layer the plan touches (see the module docstring).

    compressor: the `Compressor` (its `loaded` model and calibration `stats`);
    resolved: the plan resolved per expert on the compressor's layers (`resolve_plan`).
    hessians: if given, receives every undamped Hessian, (layer, expert, "in" | "down") -> [d, d] (tests)."""
    start = time.perf_counter()
    plan = resolved.plan
    loaded = compressor.loaded
    check_refit_cost(plan, loaded.layers, resolved.sparsity, resolved.removed)  # before any forward: fail in ms
    view = structural_copy(loaded.model)
    view.eval()
    layers = find_moe_layers(view, loaded.layers)
    dec = decoder_layers(view, layers)
    blocks = dec[0][0]
    if any(ml is not blocks for ml, _ in dec):
        raise PlanError("second-order methods: the MoE layers are not all in one list of decoder layers")
    moe_at = {di: layer for layer, (_, di) in zip(layers, dec)}
    last = max(moe_at)
    device = loaded.device if hasattr(loaded, "device") else next(view.parameters()).device
    batches = [samples.input_ids[i:i + batch_size].to(device) for i in range(0, samples.n_samples, batch_size)]
    inputs = capture_decoder_inputs(view, blocks, last, batches)
    hidden = inputs.first_hidden
    result = SecondOrderResult({}, {}, [], 0.0, 0.0)
    result.record = hessians
    for j in range(last + 1):
        if cancel is not None and cancel():
            raise Cancelled("second-order compression: cancelled")
        layer = moe_at.get(j)
        if layer is not None:
            l = layer.index
            s = resolved.layer(layer)
            check_layer(layer, s, compressor.stats)
            install_layer_routing(layer, plan, s, None)  # routing the compressed model will use
            if s.touched_names(layer):
                with module_weights(layer.experts):  # offloaded: loaded for this layer only
                    new, masks = _start_layer(compressor, layer, s)
                # Routed inputs of a group of experts at a time (ROUTED_INPUT_BYTES): the layer runs once per group
                for group in expert_groups(layer, samples.n_tokens, hidden[0].element_size()):
                    rt = install_experts_runtime(layer)
                    seen = RoutedInputs(layer.num_experts, group)
                    rt.observers.append(seen)
                    try:
                        inputs.run(j, hidden)
                    finally:
                        rt.observers.remove(seen)
                    with module_weights(layer.experts):
                        _compress_experts(layer, plan, s, seen, result, new, masks, group)
                    del seen
                with module_weights(layer.experts):
                    _end_layer(layer, s, result, new, masks)
                    install_experts(layer, new)
                # `new` itself, not the module's attributes: on an offloaded model those are meta
                # placeholders (the hook holds the real tensors)
                result.tensors[l] = new
        if j < last:
            hidden = inputs.run(j, hidden)
        if progress is not None:
            done = j + 1
            elapsed = time.perf_counter() - start
            progress(done, last + 1, elapsed / done * (last + 1 - done))
    result.seconds = time.perf_counter() - start
    return result


def check_refit_cost(plan, layers, sparsity: np.ndarray, removed: np.ndarray) -> None:
    """PlanError naming `refit` when some row would keep more than REFIT_MAX_COLUMNS columns.

    refit (SparseGPT only) solves H_SS w_S = (H w)_S for every row: a Cholesky of |S| x |S|, about
    |S|^3 / 3 multiply-adds per row. The estimate uses the plan's resolved per-expert sparsities."""
    from moeviz.compression.masks import prune_counts

    if not (plan.refit and plan.pruning.metric == "sparsegpt"):
        return
    nm = plan.nm()
    worst, flops = None, 0.0
    for layer in layers:
        for p in plan.pruning.projections:
            if p not in layer.projections():
                continue
            out, n = layer.weight(p).shape[-2:]
            for e in range(layer.num_experts):
                sp = float(sparsity[layer.index, e])
                if sp <= 0 or removed[layer.index, e]:
                    continue
                kept = n - (n * nm[0] // nm[1] if nm else int(prune_counts(sp, n, ())))
                flops += out * kept ** 3 / 3
                if worst is None or kept > worst[0]:
                    worst = (kept, n, p, layer.path)
    if worst is not None and worst[0] > REFIT_MAX_COLUMNS:
        kept, n, p, path = worst
        raise PlanError(
            f"refit: re-solving each row's kept weights costs O(out·|S|³); {p} in {path} keeps {kept} of its {n} "
            f"columns per row (limit {REFIT_MAX_COLUMNS}), about {flops:.1e} floating-point operations for the whole "
            "plan (estimated); turn refit off (a smaller obs_blocksize gets most of its gain)")


def expert_groups(layer, n_tokens: int, element_size: int) -> list[list[int]]:
    """The layer's experts in consecutive groups whose routed inputs (n_tokens · top_k · H values in all,
    spread over the experts: estimated evenly) fit in ROUTED_INPUT_BYTES; one group on small models."""
    E = layer.num_experts
    total = n_tokens * layer.top_k * layer.hidden_size * element_size
    n = max(1, min(E, -(-total // ROUTED_INPUT_BYTES)))
    size = -(-E // n)
    return [list(range(a, min(a + size, E))) for a in range(0, E, size)]


def _start_layer(compressor, layer, s: LayerSettings) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(fused tensors [E, ...] of the layer to compress: copies of the base's, old metric's keep-masks)."""
    E = layer.num_experts
    sel = np.arange(E)
    fused = {n: getattr(layer.experts, n)[:E].detach().clone() for n in s.touched_names(layer)}
    # Old metrics first (they score the base weights): their masks stay fixed, OBS compensates them.
    masks: dict[str, torch.Tensor] = {}
    if s.metric != "sparsegpt":
        stats = compressor.stats.layers[layer.index] if compressor.stats is not None else None
        prune(layer, fused, sel, s, layer_norms(stats, s.metric, sel, layer.weight("down").device), masks)
    return fused, masks


def _end_layer(layer, s: LayerSettings, result: SecondOrderResult, fused: dict, masks: dict) -> None:
    remove(layer, fused, np.arange(layer.num_experts), s)
    for p, keep in masks.items():
        result.masks[f"{layer.index}.{p}"] = keep


def _compress_experts(layer, plan, s: LayerSettings, seen: RoutedInputs, result: SecondOrderResult,
                      fused: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], experts) -> None:
    """Compress `experts` of the layer in `fused` (in place), each on its own Hessians."""
    E = layer.num_experts
    in_projs = [p for p in layer.projections() if p != "down"]
    scale_in = gate_on_input(layer.experts)
    for e in experts:
        if not s.touches(e) or s.removed[e]:
            continue
        x, g = seen.inputs(e, layer.hidden_size, layer.weight("down").device)
        w_tok = token_weights(g, plan.hessian, scale_in)
        # gate and up share their input: one [2I, H] problem (rows are independent given H), unless the
        # plan prunes only one of them
        pruned = [p in s.projections for p in in_projs]
        in_touched = layer.fused_name(in_projs[0]) in fused  # pruning only down leaves gate/up shared with the base
        for projs in ([in_projs] if all(pruned) or not any(pruned) else [[p] for p in in_projs]) if in_touched else []:
            w_in = torch.cat([layer.view(p, fused[layer.fused_name(p)])[e] for p in projs])
            keep_in = _stacked_mask(masks, projs, e)
            # the old metric zeroed `fused` in place: OBS compensates that pruning from the base weights
            base_in = None if keep_in is None else torch.cat([_base(layer, p, E)[e] for p in projs])
            new_in, mask_in, grid_in = _compress(w_in, x, w_tok, layer.hidden_size, plan, s, e, "/".join(projs), layer.index,
                                        result, keep_in, prune_it=projs[0] in s.projections,
                                        group=s.group_sizes[projs[0]], base=base_in)
            rows = 0
            for p in projs:
                w = layer.view(p, fused[layer.fused_name(p)])[e]
                w.copy_(new_in[rows:rows + w.shape[0]])
                _keep_grid(result, layer, p, e, s, grid_in, rows, w.shape[0])
                if mask_in is not None:
                    masks.setdefault(p, torch.ones(layer.weight(p).shape, dtype=torch.bool, device=w.device))[e] = \
                        mask_in[rows:rows + w.shape[0]]
                rows += w.shape[0]
        if "down_proj" not in fused:  # pruning only gate/up: down stays the base's
            continue
        # down: its inputs from the compressed gate/up of this expert
        in_name = "gate_up_proj" if layer.has_gate else "up_proj"
        w_in_storage = fused[in_name][e] if in_name in fused else getattr(layer.experts, in_name)[e]
        h, _ = expert_output(layer.experts, e, x, (w_in_storage, layer.experts.down_proj[e]))
        w_down = layer.view("down", fused["down_proj"])[e]
        new_down, mask_down, grid_down = _compress(w_down, h, w_tok, layer.intermediate_size, plan, s, e, "down", layer.index,
                                        result, masks["down"][e] if "down" in masks else None,
                                        prune_it="down" in s.projections, group=s.group_sizes["down"],
                                        base=_base(layer, "down", E)[e] if "down" in masks else None)
        w_down.copy_(new_down)
        _keep_grid(result, layer, "down", e, s, grid_down, 0, w_down.shape[0])
        if mask_down is not None and "down" in s.projections:
            shape = layer.weight("down").shape
            masks.setdefault("down", torch.ones(shape, dtype=torch.bool, device=w_down.device))[e] = mask_down


def _keep_grid(result: SecondOrderResult, layer, projection: str, e: int, s: LayerSettings, grid, row0: int,
               rows: int) -> None:
    """Store rows [row0, row0 + rows) of expert e's GPTQ grid (scales [r, G], zeros | None) as `projection`'s."""
    if grid is None:
        return
    scales, zeros = grid
    key = f"{layer.index}.{projection}"
    if key not in result.grids:
        E = layer.num_experts
        out, n = layer.weight(projection).shape[-2:]
        G = scales.shape[-1]
        result.grids[key] = GptqGrid(torch.ones(E, out, G, dtype=torch.float32, device=scales.device),
                                     None if zeros is None else torch.zeros(E, out, G, dtype=torch.float32,
                                                                            device=scales.device),
                                     n // G, torch.full((E,), 16, dtype=torch.int64))
    g = result.grids[key]
    g.scales[e] = scales[row0:row0 + rows]
    if zeros is not None:
        g.zero_points[e] = zeros[row0:row0 + rows]
    g.bits[e] = int(s.bits[e])


def _base(layer, projection: str, E: int) -> torch.Tensor:
    """[E, out, in] view of the layer's weights before this job replaces them (the base's)."""
    return layer.view(projection, getattr(layer.experts, layer.fused_name(projection))[:E])


def _stacked_mask(masks: dict, projs: list[str], e: int) -> torch.Tensor | None:
    """The old metric's keep-masks of expert e's projections `projs`, stacked by rows (None: not pruned)."""
    if not all(p in masks for p in projs):
        return None
    return torch.cat([masks[p][e] for p in projs])


def _compress(w: torch.Tensor, x: torch.Tensor, w_tok: torch.Tensor, columns: int, plan, s: LayerSettings, e: int,
              what: str, layer: int, result: SecondOrderResult, keep: torch.Tensor | None, prune_it: bool,
              group: int, base: torch.Tensor | None = None):
    """One expert projection [out, in] compressed on its Hessian: (new weight, keep-mask or None,
    GPTQ grid (scales [out, G], zero points [out, G] | None) or None when GPTQ did not quantize).

    keep: an old metric's keep-mask, already applied to `w`; base: the weights before it was (OBS then
    compensates the pruning as well as the rounding)."""
    from moeviz.compression.obs import QuantSpec, gptq_quantize, sparsegpt_prune

    b = int(s.bits[e])
    sp = float(s.sparsity[e]) if prune_it else 0.0
    gptq = b < 16 and plan.quant.method == "gptq"
    obs_prune = s.metric == "sparsegpt" and sp > 0
    fixed_mask = keep is not None and gptq and sp > 0  # an old metric's mask, compensated while quantizing
    if not (obs_prune or gptq):
        out = w.float()
        if b < 16:
            out = quantize_weight(out, b, group, s.symmetric).dequantized
        return out.to(w.dtype), None, None
    n = x.shape[0]
    percdamp = plan.percdamp
    if n == 0:
        H = torch.eye(columns, device=w.device)
        result.warnings.append(dict(layer=layer, expert=e, projection=what, tokens=0, columns=columns,
                                    action="identity Hessian (no routed token)"))
    else:
        H = expert_hessian(x, w_tok)
        if result.record is not None:
            result.record[(layer, e, "down" if what == "down" else "in")] = H
        if n < columns:
            percdamp = max(percdamp, LOW_TOKEN_DAMP)
            result.warnings.append(dict(layer=layer, expert=e, projection=what, tokens=n, columns=columns,
                                        action=f"damped (percdamp {percdamp})"))
    spec = QuantSpec(b, group, s.symmetric) if gptq else None
    W = w.float()
    if obs_prune or fixed_mask:
        if obs_prune:
            # refit with GPTQ is refused by the plan (it would leave the grid); act-order with N:M too
            r = sparsegpt_prune(W, H, None if s.nm else sp, nm=s.nm, blocksize=plan.obs_blocksize,
                                percdamp=percdamp, quant=spec, refit=plan.refit and spec is None,
                                act_order=plan.act_order and spec is not None)
        else:  # the old metric's mask, fixed: OBS compensates it while quantizing
            W = (base if base is not None else w).float()
            r = sparsegpt_prune(W, H, None, mask=keep, blocksize=plan.obs_blocksize, percdamp=percdamp, quant=spec,
                                act_order=plan.act_order)
        mask = r.mask
    else:
        r = gptq_quantize(W, H, spec, blocksize=plan.obs_blocksize, percdamp=percdamp, act_order=plan.act_order)
        mask = None
    out = r.weight
    result.loss += float(r.loss) if r.loss is not None else 0.0
    if b < 16 and not gptq:
        out = quantize_weight(out, b, group, s.symmetric).dequantized
    if mask is not None:
        out = out * mask  # exact zeros where pruned (asymmetric RTN keeps 0 exact, see quantize.py)
    return out.to(w.dtype), mask, ((r.scales, r.zero_points) if gptq else None)
