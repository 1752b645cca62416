"""Per-expert sensitivity: how much the calibration loss rises when only expert (l, e) is compressed.

*Measured* (`measure_sensitivity`): for every MoE layer l, expert e and grid setting s = (sparsity,
bits), the change in mean next-token cross-entropy on the calibration tokens when expert (l, e) alone
is compressed at s (exactly as `Compressor.apply` compresses it: same metric, group size, symmetry)
and every other weight is the base's. Cost is kept low without approximation:

1. One capture pass over the calibration batches records, per decoder layer, its output, and per MoE
   layer the experts module's inputs (hidden states, top-k ids, top-k weights).
2. Compressing expert e changes nothing before the experts module of layer l, and inside it only the
   rows routed to e: the module's output becomes  out + g_te · (y'_e(x_t) − y_e(x_t))  on those tokens
   (y' = the compressed expert, g = the routing weight). That correction is computed from the cached
   inputs by running the expert alone on its routed tokens (a few small matmuls).
3. The model is then run with every decoder layer before l replaced by its cached output (no
   recomputation) and a forward hook adding the correction to layer l's experts output, so only
   layers l.. L-1, the final norm and the LM head are computed. Routing in later layers reacts to the
   change, as it would in the compressed model.

An expert that no calibration token reaches gets a correction of exactly zero and a sensitivity of
exactly 0 (no forward is run). The compressed weights come from `Compressor(lm, stats).apply` of a
uniform plan at each grid setting (per-expert compression in one-pass mode depends only on the
expert's own weights and statistics), so the numbers describe what a plan with per-expert overrides
will actually do.

*Estimated* (computed in the same capture pass, for comparison and for models where the measured
loop is too slow): with one backward pass, G_t = ∂(Σ loss)/∂(experts output of layer l at token t);
per (l, e, s) the corrections δ_t above give

    fisher        = ½ · Σ_t (G_t · δ_t)² / N          (empirical-Fisher second-order term in output space)
    output_error  = Σ_t ‖δ_t‖² / N                     (gate-weighted output reconstruction error)

They cost the capture pass (one forward + one backward) plus, per setting, the experts of each layer on
their own routed tokens, i.e. one MoE-layer forward per setting, not one model forward per expert.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from moeviz.calibration.stats import CalibrationStats
from moeviz.compression.apply import Compressor
from moeviz.compression.plan import CompressionPlan, PruningSettings, QuantSettings, check_bits, check_ratio
from moeviz.data import TokenSamples
from moeviz.errors import PlanError, SettingsError
from moeviz.models.layers import decoder_layers
from moeviz.models.loading import LoadedModel

SENSITIVITY_FORMAT_VERSION = 1
DEFAULT_SPARSITIES = (0.0, 0.3, 0.5, 0.7, 0.9)
DEFAULT_BITS = (16, 8, 4, 3, 2)


@dataclass
class SensitivityGrid:
    """The settings an expert may take: every (sparsity, bits) pair except the dense (0, 16)."""

    sparsities: tuple[float, ...] = DEFAULT_SPARSITIES
    bits: tuple[int, ...] = DEFAULT_BITS
    metric: str = "moe_pruner"  # pruning metric, as in PruningSettings
    group_size: int = 128
    symmetric: bool = True
    removal: bool = True  # also measure removing each expert (families whose router can re-route)

    def validate(self) -> "SensitivityGrid":
        for s in self.sparsities:
            check_ratio(s, "grid sparsity")
        for b in self.bits:
            check_bits(b, "grid bits")
        if not self.settings():
            raise SettingsError("sensitivity grid: no setting besides the dense one; give a sparsity > 0 or bits < 16")
        if self.metric == "sparsegpt":  # its Hessians come from the compressed layers before (sequential)
            raise SettingsError("sensitivity grid: metric 'sparsegpt' (layer-by-layer Hessians) is not measured "
                                "per expert; choose magnitude, wanda or moe_pruner")
        CompressionPlan(pruning=PruningSettings(metric=self.metric),
                        quant=QuantSettings(group_size=self.group_size)).validate()
        return self

    def settings(self) -> list[tuple[float, int]]:
        pairs = [(float(s), int(b)) for s in sorted(set(self.sparsities)) for b in sorted(set(self.bits), reverse=True)]
        return [p for p in pairs if p != (0.0, 16)]

    def to_dict(self) -> dict:
        return dict(sparsities=[float(s) for s in self.sparsities], bits=[int(b) for b in self.bits],
                    metric=self.metric, group_size=self.group_size, symmetric=self.symmetric, removal=self.removal)

    def plan_for(self, sparsity: float, bits: int) -> CompressionPlan:
        """The uniform plan that compresses every expert at one setting (and nothing else)."""
        return CompressionPlan(pruning=PruningSettings(metric=self.metric, sparsity=float(sparsity)),
                               quant=QuantSettings(bits=int(bits), group_size=self.group_size, symmetric=self.symmetric))


@dataclass
class ExpertSensitivity:
    """Sensitivity of every expert at every grid setting. Arrays are [L, E, S] (E = the largest expert
    count; missing experts are NaN), S indexes `settings`."""

    settings: list[tuple[float, int]]
    grid: dict
    measured: np.ndarray | None  # Δ mean calibration loss (nats / token); None when only estimated
    estimated: dict[str, np.ndarray]  # proxy name -> [L, E, S]
    base_loss: float
    n_tokens: int
    num_experts: list[int]
    routed_tokens: np.ndarray  # [L, E] calibration tokens routed to each expert
    model_fingerprint: str
    stats_fingerprint: str | None
    data_fingerprint: str
    seconds: float
    measure_seconds: float = 0.0
    threads: int = 1
    version: int = SENSITIVITY_FORMAT_VERSION
    meta_extra: dict = field(default_factory=dict)
    # [L, E] Δ loss when the expert is removed (its tokens re-routed to the others); NaN where the
    # family cannot re-route or the layer has no expert to spare; None when not measured
    removal: np.ndarray | None = None

    @property
    def fingerprint(self) -> str:
        return sensitivity_fingerprint(self.model_fingerprint, self.stats_fingerprint, self.data_fingerprint, self.grid)

    def setting_index(self, sparsity: float, bits: int) -> int:
        for i, (s, b) in enumerate(self.settings):
            if abs(s - sparsity) < 1e-9 and b == bits:
                return i
        raise KeyError(f"setting (sparsity {sparsity}, bits {bits}) is not in the grid {self.settings}")

    def values(self, kind: str = "measured") -> np.ndarray:
        """[L, E, S] measured Δ loss, or a proxy by name."""
        if kind == "measured":
            if self.measured is None:
                raise KeyError("no measured sensitivity (computed with measure=False)")
            return self.measured
        return self.estimated[kind]

    def rank_correlation(self, proxy: str = "fisher") -> list[float]:
        """Per layer, Spearman rank correlation between the proxy and the measured Δ loss over all
        (expert, setting) pairs of the layer."""
        m, p = self.values("measured"), self.values(proxy)
        return [spearman(m[l, : self.num_experts[l]].ravel(), p[l, : self.num_experts[l]].ravel())
                for l in range(m.shape[0])]

    def summary(self) -> dict:
        d = dict(settings=[list(s) for s in self.settings], grid=self.grid, base_loss=self.base_loss,
                 n_tokens=self.n_tokens, seconds=self.seconds, measure_seconds=self.measure_seconds,
                 threads=self.threads, fingerprint=self.fingerprint)
        if self.measured is not None:
            d["rank_correlation"] = {k: self.rank_correlation(k) for k in self.estimated}
        return d

    # -- (de)serialisation
    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {f"estimated.{k}": v for k, v in self.estimated.items()}
        arrays["routed_tokens"] = self.routed_tokens
        if self.removal is not None:
            arrays["removal"] = self.removal
        if self.measured is not None:
            arrays["measured"] = self.measured
        with open(folder / "sensitivity.npz.tmp", "wb") as f:
            np.savez(f, **arrays)
        (folder / "sensitivity.npz.tmp").replace(folder / "sensitivity.npz")
        meta = dict(version=self.version, settings=[list(s) for s in self.settings], grid=self.grid,
                    base_loss=self.base_loss, n_tokens=self.n_tokens, num_experts=self.num_experts,
                    model_fingerprint=self.model_fingerprint, stats_fingerprint=self.stats_fingerprint,
                    data_fingerprint=self.data_fingerprint, seconds=self.seconds,
                    measure_seconds=self.measure_seconds, threads=self.threads, meta_extra=self.meta_extra,
                    fingerprint=self.fingerprint)
        (folder / "sensitivity.json").write_text(json.dumps(meta, indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "ExpertSensitivity":
        folder = Path(folder)
        meta = json.loads((folder / "sensitivity.json").read_text())
        if meta.get("version") != SENSITIVITY_FORMAT_VERSION:
            raise ValueError(f"{folder}: sensitivity format {meta.get('version')} is not {SENSITIVITY_FORMAT_VERSION}")
        with np.load(folder / "sensitivity.npz") as z:
            arrays = {k: z[k] for k in z.files}
        meta.pop("fingerprint", None)
        return cls(settings=[(float(s), int(b)) for s, b in meta.pop("settings")],
                   measured=arrays.get("measured"), removal=arrays.get("removal"),
                   estimated={k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith("estimated.")},
                   routed_tokens=arrays["routed_tokens"], **meta)


def sensitivity_fingerprint(model_fp: str, stats_fp: str | None, data_fp: str, grid: dict) -> str:
    blob = json.dumps(dict(model=model_fp, stats=stats_fp, data=data_fp, grid=grid, v=SENSITIVITY_FORMAT_VERSION),
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def spearman(a, b) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    ra, rb = _avg_ranks(a[ok]), _avg_ranks(b[ok])
    if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _avg_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    return sums[inv] / counts[inv]


# ---------------------------------------------------------------------------- model plumbing

def _call_args(args: tuple, kwargs: dict):
    names = ("hidden_states", "top_k_index", "top_k_weights")
    vals = list(args[:3]) + [kwargs.get(n) for n in names[len(args[:3]):]]
    return vals


def _expert_out(experts: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e alone on x [n, H], routing weight 1 (through the module's own forward)."""
    n = x.shape[0]
    idx = torch.full((n, 1), e, dtype=torch.long, device=x.device)
    w = torch.ones((n, 1), dtype=x.dtype, device=x.device)
    return experts(x, idx, w)


def _token_loss_sum(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Σ next-token cross-entropy over the batch (float64 accumulation)."""
    lg = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    return nn.functional.cross_entropy(lg, ids[:, 1:].reshape(-1).to(lg.device), reduction="sum").double()


# ---------------------------------------------------------------------------- the measurement

def measure_sensitivity(loaded: LoadedModel, stats: CalibrationStats | None, samples: TokenSamples,
                        grid: SensitivityGrid | None = None, batch_size: int = 16, measure: bool = True, copies: int = 1,
                        fast_path: bool = True,
                        progress=None, cancel=None) -> ExpertSensitivity:
    """Measured (and estimated) per-expert sensitivity; see the module docstring.

    progress(done, total) is called after each (setting, layer); cancel() returning True stops early
    with SettingsError. copies > 1 measures that many experts per forward as stacked copies of the batch
    (same numbers to ~1e-6 nats; faster only where wide matmuls pay, e.g. on a GPU: on the demo on one
    CPU core it is slower, so the default is 1)."""
    grid = (grid or SensitivityGrid()).validate()
    start = time.perf_counter()
    for layer in loaded.layers:
        if not layer.calls_with_routing:
            raise PlanError(f"sensitivity: experts at {layer.experts_path} are called by dense dispatch; "
                            "per-expert sensitivity supports experts called with their routed tokens only")
    compressor = Compressor(loaded, stats)
    base = compressor.apply(CompressionPlan())  # structural copy; the base model is never touched
    model, layers = base.model, base.layers
    model.eval()
    dec = decoder_layers(model, layers)
    L = len(layers)
    Emax = max(l.num_experts for l in layers)
    settings = grid.settings()
    S = len(settings)
    device = loaded.device if hasattr(loaded, "device") else next(model.parameters()).device
    batches = [samples.input_ids[i: i + batch_size].to(device) for i in range(0, samples.n_samples, batch_size)]
    n_tokens = sum(int(b[:, 1:].numel()) for b in batches)

    # -- 1. capture pass: decoder outputs, experts inputs, gradients at experts outputs
    all_dec = _all_decoder_layers(dec)
    dec_out: list[dict[int, object]] = [dict() for _ in batches]
    exp_in: list[list] = [[None] * L for _ in batches]
    grads: list[list] = [[None] * L for _ in batches]
    current = {"b": 0}
    handles = []
    zero_leaves: list = [None] * L
    try:
        for j, m in enumerate(all_dec):
            handles.append(m.register_forward_hook(
                lambda mod, a, out, j=j: dec_out[current["b"]].__setitem__(j, _detach(out))))
        for l, layer in enumerate(layers):
            def pre(mod, args, kwargs, l=l):
                x, idx, w = _call_args(args, kwargs)
                exp_in[current["b"]][l] = (x.detach(), idx.detach(), w.detach())

            def post(mod, args, kwargs, out, l=l):
                leaf = torch.zeros_like(out, requires_grad=True)
                zero_leaves[l] = leaf
                return out + leaf
            handles.append(layer.experts.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(layer.experts.register_forward_hook(post, with_kwargs=True))
        base_sum = 0.0
        for b, ids in enumerate(batches):
            current["b"] = b
            with torch.enable_grad():
                logits = model(input_ids=ids, use_cache=False).logits
                loss = _token_loss_sum(logits, ids)
                g = torch.autograd.grad(loss, zero_leaves, allow_unused=True)
            base_sum += float(loss.detach())
            for l in range(L):
                grads[b][l] = (g[l] if g[l] is not None else torch.zeros_like(zero_leaves[l])).detach()
            zero_leaves = [None] * L
    finally:
        for h in handles:
            h.remove()
    base_loss = base_sum / n_tokens
    routed = np.zeros((L, Emax))
    for l, layer in enumerate(layers):
        for b in range(len(batches)):
            idx = exp_in[b][l][1]
            routed[l, : layer.num_experts] += torch.bincount(idx.reshape(-1).clamp_min(0).cpu(),
                                                             minlength=layer.num_experts)[: layer.num_experts].numpy()

    fisher = np.full((L, Emax, S), np.nan)
    out_err = np.full((L, Emax, S), np.nan)
    measured = np.full((L, Emax, S), np.nan) if measure else None
    measure_start = time.perf_counter()

    # per (layer, batch, expert): routed rows, gates and the dense expert outputs (computed once)
    routing = [[[None] * layer.num_experts for _ in batches] for layer in layers]
    with torch.no_grad():
        for l, layer in enumerate(layers):
            for b in range(len(batches)):
                x, idx, w = exp_in[b][l]
                for e in range(layer.num_experts):
                    rows, slot = (idx == e).nonzero(as_tuple=True)
                    if rows.numel():
                        xe = x[rows]
                        routing[l][b][e] = (rows, w[rows, slot].to(x.dtype), xe, _expert_out(layer.experts, e, xe))

    total = S * L
    done = 0
    refs: dict[int, list[float]] = {}  # per layer: reference loss of each batch through the truncated path
    fast: dict[int, dict] = {}  # per layer: may the decoder layer itself be replaced (see _measure_layer)
    for si, (s, bits) in enumerate(settings):
        comp = compressor.apply(grid.plan_for(s, bits))
        for l, layer in enumerate(layers):
            if cancel is not None and cancel():
                raise SettingsError("sensitivity: cancelled")
            cexperts = comp.layers[l].experts
            deltas = [[None] * len(batches) for _ in range(layer.num_experts)]
            with torch.no_grad():
                for e in range(layer.num_experts):
                    f = o = 0.0
                    for b in range(len(batches)):
                        r = routing[l][b][e]
                        if r is None:
                            continue
                        rows, gate, xe, ye = r
                        d = gate[:, None] * (_expert_out(cexperts, e, xe) - ye)  # [n, H]
                        deltas[e][b] = (rows, d)
                        gd = (grads[b][l][rows] * d).sum(-1).double()
                        f += float((gd ** 2).sum()) / 2
                        o += float((d.double() ** 2).sum())
                    fisher[l, e, si] = f / n_tokens
                    out_err[l, e, si] = o / n_tokens
            if measure:
                ml, di = dec[l]
                measured[l, : layer.num_experts, si] = _measure_layer(
                    model, ml, di, layer, batches, dec_out, all_dec, deltas, n_tokens, refs.setdefault(l, []), copies,
                    fast.setdefault(l, {}) if fast_path else None)
            done += 1
            if progress is not None:
                progress(done, total)
        del comp
    removal = None
    removal_start = time.perf_counter()
    if measure and grid.removal:
        removal = np.full((L, Emax), np.nan)
        with torch.no_grad():
            for l, layer in enumerate(layers):
                if not layer.adapter.supports_rerouting or layer.num_experts <= layer.top_k:
                    continue
                for e in range(layer.num_experts):
                    if cancel is not None and cancel():
                        raise SettingsError("sensitivity: cancelled")
                    # routing changes at layer l itself, so the copy runs from decoder layer l on (the layers
                    # before it are its cached outputs), against the same truncated reference
                    rc = compressor.apply(CompressionPlan(removed_experts=[(l, e)]))
                    rdec = decoder_layers(rc.model, rc.layers)
                    ml_r, di_r = rdec[l]
                    cur = {"b": 0}
                    saved = _install_stubs(ml_r, di_r, _all_decoder_layers(rdec), dec_out, cur)
                    try:
                        total = 0.0
                        for b, ids in enumerate(batches):
                            cur["b"] = b
                            total += float(_token_loss_sum(rc.model(input_ids=ids, use_cache=False).logits, ids)) - refs[l][b]
                    finally:
                        _remove_stubs(saved)
                    removal[l, e] = total / n_tokens
    extra = dict(removal_seconds=time.perf_counter() - removal_start) if removal is not None else {}
    return ExpertSensitivity(
        removal=removal, meta_extra=extra,
        settings=settings, grid=grid.to_dict(), measured=measured,
        estimated=dict(fisher=fisher, output_error=out_err), base_loss=base_loss, n_tokens=n_tokens,
        num_experts=[l.num_experts for l in layers], routed_tokens=routed,
        model_fingerprint=loaded.fingerprint, stats_fingerprint=stats.fingerprint if stats is not None else None,
        data_fingerprint=samples.fingerprint, seconds=time.perf_counter() - start,
        measure_seconds=removal_start - measure_start if measure else 0.0, threads=torch.get_num_threads(),
    )


def _detach(out):
    if isinstance(out, torch.Tensor):
        return out.detach()
    if isinstance(out, tuple):
        return tuple(_detach(o) for o in out)
    return out


def _repeat(x, k: int):
    """k copies along the batch dimension (dim 0) of a decoder layer's cached output."""
    if k == 1:
        return x
    if isinstance(x, torch.Tensor):
        return x.repeat(k, *([1] * (x.dim() - 1)))
    if isinstance(x, tuple):
        return tuple(_repeat(v, k) for v in x)
    return x


def _copy_loss_sums(logits: torch.Tensor, ids: torch.Tensor, k: int) -> list[float]:
    """Σ next-token cross-entropy of each of the k stacked copies of the batch `ids`."""
    lg = logits[:, :-1].float()
    ce = nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), ids.repeat(k, 1)[:, 1:].reshape(-1).to(lg.device),
                                     reduction="none").double()
    return ce.view(k, -1).sum(1).tolist()


def _install_stubs(ml, di: int, all_dec: list, dec_out, current: dict) -> list:
    """Replace the decoder layers before `di` of the list `ml` by their cached outputs (batch
    current["b"], repeated current["k"] times); returns what `_remove_stubs` needs."""
    saved = []
    for m in list(ml)[:di]:
        j = next(k for k, x in enumerate(all_dec) if x is m)
        saved.append((m, m.__dict__.get("forward")))
        m.forward = (lambda *a, j=j, **kw: _repeat(dec_out[current["b"]][j], current.get("k", 1)))
    return saved


def _install_layer_stub(module, dec_out, j: int, deltas, current: dict) -> list:
    """The decoder layer `module` replaced by its cached output plus the current expert's correction."""
    def forward(*a, **kw):
        base = dec_out[current["b"]][j]
        rows, d = deltas[current["experts"][0]][current["b"]]
        return base.reshape(-1, base.shape[-1]).index_add(0, rows, d.to(base.dtype)).view_as(base)
    saved = [(module, module.__dict__.get("forward"))]
    module.forward = forward
    return saved


def _remove_stubs(saved: list) -> None:
    for m, fwd in saved:
        if fwd is None:
            del m.forward
        else:
            m.forward = fwd


def _all_decoder_layers(dec) -> list:
    """Every decoder layer of the lists that hold MoE layers, each once, in a fixed order."""
    all_dec = []
    for ml, _ in dec:
        all_dec += [m for m in ml if all(m is not x for x in all_dec)]
    return all_dec


def _measure_layer(model, ml, di, layer, batches, dec_out, all_dec, deltas, n_tokens, ref: list[float],
                   copies: int = 1, fast: dict | None = None) -> np.ndarray:
    """Δ mean loss for each expert of one layer at one setting: decoder layers before `di` replaced by
    their cached outputs, the correction added to the experts output of `layer`. Up to `copies` experts
    are measured in one forward, as stacked copies of the batch (copy c carries expert c's correction).

    Fast path (`fast`, decided once per layer and kept in the dict): where the decoder layer adds the MoE
    output straight to the residual stream (Mixtral and most families), the decoder layer holding the
    experts is replaced too, by its cached output plus the correction, so its attention and MoE are not
    recomputed. It is used only after one expert measured both ways agrees to 1e-6 nats/token."""
    E = layer.num_experts
    out = np.zeros(E)
    current = {"b": 0, "k": 1, "experts": []}
    saved = _install_stubs(ml, di, all_dec, dec_out, current)

    def add_delta(mod, args, output):
        n = output.shape[0] // current["k"]  # rows of one copy (the batch's flattened tokens)
        rows = torch.cat([deltas[e][current["b"]][0] + c * n for c, e in enumerate(current["experts"])])
        d = torch.cat([deltas[e][current["b"]][1] for e in current["experts"]])
        return output.index_add(0, rows, d.to(output.dtype))

    handle = None
    try:
        with torch.no_grad():
            # the reference loss per batch through the same truncated path (same inputs and ops), once per layer
            for b, ids in enumerate(batches if not ref else []):
                current["b"] = b
                ref.append(float(_token_loss_sum(model(input_ids=ids, use_cache=False).logits, ids)))
            handle = layer.experts.register_forward_hook(add_delta)
            j_l = next(k for k, x in enumerate(all_dec) if x is ml[di])
            if fast is not None and fast.get("ok") is None:
                fast["ok"] = False
                first = next(((b, e) for b in range(len(batches)) for e in range(E) if deltas[e][b] is not None), None)
                if copies == 1 and first is not None and isinstance(dec_out[0][j_l], torch.Tensor):
                    b, e = first
                    current.update(b=b, k=1, experts=[e])
                    slow = float(_token_loss_sum(model(input_ids=batches[b], use_cache=False).logits, batches[b]))
                    handle.remove()
                    handle = None
                    stub = _install_layer_stub(ml[di], dec_out, j_l, deltas, current)
                    try:
                        quick = float(_token_loss_sum(model(input_ids=batches[b], use_cache=False).logits, batches[b]))
                    finally:
                        _remove_stubs(stub)
                    fast["ok"] = abs(slow - quick) / n_tokens <= 1e-6
                    handle = layer.experts.register_forward_hook(add_delta)
            if fast is not None and fast["ok"] and copies == 1:
                handle.remove()
                handle = None
                saved += _install_layer_stub(ml[di], dec_out, j_l, deltas, current)
            # experts no calibration token reaches are never run: their Δ stays exactly 0
            for b, ids in enumerate(batches):
                todo = [e for e in range(E) if deltas[e][b] is not None]  # a batch an expert does not reach is unchanged
                for i in range(0, len(todo), copies):
                    chunk = todo[i: i + copies]
                    current.update(b=b, k=len(chunk), experts=chunk)
                    logits = model(input_ids=ids.repeat(len(chunk), 1), use_cache=False).logits
                    for e, loss in zip(chunk, _copy_loss_sums(logits, ids, len(chunk))):
                        out[e] += (loss - ref[b]) / n_tokens
    finally:
        if handle is not None:
            handle.remove()
        _remove_stubs(saved)
    return out


def first_windows(samples: TokenSamples, n: int) -> TokenSamples:
    """The first `n` calibration windows (the measured sensitivity's cost grows with the tokens; 16 × 128
    tokens rank the demo's experts stably). Same object when it already has at most `n`."""
    if n >= samples.n_samples:
        return samples
    fp = hashlib.sha256(f"{samples.fingerprint}|first{n}".encode()).hexdigest()[:16]
    domains = list(samples.domains[:n])
    return TokenSamples(samples.input_ids[:n], domains, samples.source, samples.seed, fp,
                        [d for d in samples.domain_names if d in set(domains)])


def measure_cost(grid: SensitivityGrid, loaded, samples: TokenSamples) -> str:
    """What the measurement's time grows with, in words (no guessed duration: it depends on the machine):
    each of the grid's settings is applied to each expert of each MoE layer and the layer's loss recomputed
    on the windows' tokens."""
    n_settings = len(grid.settings()) + (1 if grid.removal else 0)
    experts = sum(layer.num_experts for layer in loaded.layers)
    tokens = samples.n_samples * samples.seq_len
    return (f"{n_settings} settings × {experts} experts in {len(loaded.layers)} MoE layers, each on "
            f"{samples.n_samples} windows ({tokens:,} tokens); the time grows with each of these (a progress bar "
            "shows the time left once it starts)")
