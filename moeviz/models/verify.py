"""Check, on the loaded weights, that moeviz reproduces what every MoE block computes.

One forward pass on a few random tokens, with hooks that record each router's output and the
(hidden, top_k_index, top_k_weights) its experts module actually receives. Then, per layer:

1. the reference experts loop (`moeviz.models.experts.experts_forward`, which pruning, quantization
   and calibration rely on) must give the experts module's own output, or the model is refused;
2. the routing rule is the first known rule (`adapters.rule_templates`) that turns the router's
   logits into the same expert ids and weights the experts received (a constant scale such as
   `routed_scaling_factor` is fitted). No match: the honest `GENERIC` adapter.

Nothing here looks at `model_type`: two checkpoints of one class with different router settings
get the rules their routers really follow.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from moeviz.errors import NotAnMoEModelError
from moeviz.models.adapters import GENERIC, FamilyAdapter, describe, rule_templates
from moeviz.models.experts import experts_forward
from moeviz.models.offload import execution_device, module_weights

PROBE_SHAPE = (4, 32)  # [B, S] random token ids: 128 routed tokens per layer


class _Capture:
    def __init__(self, layer):
        self.layer = layer
        self.router_in: torch.Tensor | None = None
        self.router_out: tuple | None = None
        self.received: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        sig = inspect.signature(layer.experts.forward)
        self.bind = sig.bind

    def router_hook(self, module, args, output):
        if self.router_out is None:
            self.router_out = tuple(output) if isinstance(output, (tuple, list)) else (output,)
            self.router_in = args[0].detach() if args and isinstance(args[0], torch.Tensor) else None
            if not self.layer.calls_with_routing and self.router_in is not None:
                # Dense dispatch: the experts get [E*T, H] pre-scaled inputs; what they "receive" is the
                # top-k of the dense scores [T, E] (0 for unchosen experts) on the router's input.
                scores = self.router_out[0].detach().reshape(-1, self.layer.num_experts)
                w, idx = scores.topk(self.layer.top_k, dim=-1)
                self.received = (self.router_in.reshape(-1, self.layer.hidden_size), idx, w)

    def experts_hook(self, module, args, kwargs):
        if self.received is None and self.layer.calls_with_routing:
            bound = self.bind(*args, **kwargs)
            values = list(bound.arguments.values())[:3]  # (hidden [T, H], top_k_index [T, k], top_k_weights [T, k])
            self.received = tuple(v.detach() for v in values)


@torch.no_grad()
def probe(model: nn.Module, layers) -> list[_Capture]:
    """Run the model once on random tokens and record what each MoE block's router and experts saw."""
    caps = [_Capture(l) for l in layers]
    handles = []
    for c in caps:
        handles.append(c.layer.router.register_forward_hook(c.router_hook))
        handles.append(c.layer.experts.register_forward_pre_hook(c.experts_hook, with_kwargs=True))
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(min(3, vocab - 1), vocab, PROBE_SHAPE, generator=g)
    device = execution_device(model)
    try:
        model(input_ids=ids.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return caps


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 2e-2


def check_experts(layer, cap: _Capture, arch: str) -> None:
    """The reference experts loop must reproduce the experts module (same inputs, same output)."""
    if cap.received is None:
        return  # this block was not run by the probe (e.g. a layer skipped for these tokens)
    hidden, idx, w = cap.received
    hidden = hidden.reshape(-1, hidden.shape[-1])
    # Ours first: calling an offloaded module runs its hook, which unloads its weights afterwards.
    ours = experts_forward(layer.experts, hidden, idx, w)
    if layer.calls_with_routing:
        theirs = layer.experts(hidden, idx, w)
    else:  # dense dispatch, as the block does it: every expert on every token scaled by its score
        E, T = layer.num_experts, hidden.shape[0]
        scores = torch.zeros(T, E, dtype=w.dtype, device=w.device).scatter(1, idx, w)
        routed_in = hidden.repeat(E, 1) * scores.T.reshape(-1, 1)  # [E*T, H]
        theirs = layer.experts(routed_in).reshape(E, T, -1).sum(0)
    scale = theirs.float().abs().max().clamp_min(1e-6)
    err = float((ours.float() - theirs.float()).abs().max() / scale)
    if not err <= _tolerance(theirs.dtype) * 10:
        raise NotAnMoEModelError(
            f"{arch}: moeviz's expert loop does not reproduce {type(layer.experts).__name__} at {layer.experts_path} "
            f"(relative error {err:.2g}); its expert computation is not supported"
        )


def _output_slot(outputs: tuple, target: torch.Tensor) -> int | None:
    for j, o in enumerate(outputs):
        if j == 0 or not isinstance(o, torch.Tensor) or o.numel() != target.numel() or o.dtype.is_floating_point != \
                target.dtype.is_floating_point:
            continue
        if torch.equal(o.reshape(target.shape).to(target.dtype), target):
            return j
    return None


def _candidate_biases(layer) -> dict[str, torch.Tensor]:
    """Per-expert vectors ([E], or [1, E]) of the router and the block itself: the load-balancing
    biases some routers add when choosing experts, or learned per-expert weight scales."""
    out = {}
    for name, t in layer.per_expert_tensors():
        if t.numel() == layer.num_experts and max(t.shape, default=0) == layer.num_experts:
            out[name.rpartition(".")[2]] = t.detach().reshape(-1)
    return out


def _group(layer, config) -> tuple[int, int] | None:
    """(number of expert groups, groups kept) for group-limited routing, from the router, block or config."""
    for owner in (layer.router, layer.block, config):
        n = next((getattr(owner, a) for a in ("n_group", "num_group", "num_expert_group")
                  if isinstance(getattr(owner, a, None), int)), None)
        k = next((getattr(owner, a) for a in ("topk_group", "topk_groups")
                  if isinstance(getattr(owner, a, None), int)), None)
        if n is not None and k is not None:
            return n, k
    return None


def match_rule(layer, cap: _Capture, config=None) -> FamilyAdapter:
    """The first known rule that reproduces this router on the probe tokens, else GENERIC."""
    if cap.router_out is None or cap.received is None or not isinstance(cap.router_out[0], torch.Tensor):
        return GENERIC
    _, idx, w = cap.received
    E, k = layer.num_experts, idx.shape[-1]
    dense = not layer.calls_with_routing
    logits_slot = 1 if dense else 0  # dense routers return (scores [T, E], logits [T, E])
    if len(cap.router_out) <= logits_slot or not isinstance(cap.router_out[logits_slot], torch.Tensor):
        return GENERIC
    logits = cap.router_out[logits_slot]
    if logits.shape[-1] != E or logits.numel() // E != idx.shape[0]:
        return GENERIC  # logits over extra classes (shared / skip / zero-compute experts): no known rule
    logits = logits.reshape(-1, E)
    slots = (0, 0) if dense else (_output_slot(cap.router_out, w), _output_slot(cap.router_out, idx))
    if None in slots:
        return GENERIC  # the block changes the router's choice before the experts: re-routing would miss it
    jitter = getattr(layer.router, "router_jitter_noise", None)
    tol = _tolerance(w.dtype)
    order = idx.argsort(dim=1)
    want_idx, want_w = idx.gather(1, order), w.float().gather(1, order)
    rows = logits.float().sum(dim=-1)
    probs = bool((logits >= 0).all()) and bool(torch.allclose(rows, torch.ones_like(rows), atol=1e-3))
    for cand in rule_templates(k, _candidate_biases(layer), _group(layer, config), jitter, probs):
        try:
            cw, ci = cand.route(layer.router, logits)
        except Exception:  # a rule that cannot apply to this router (e.g. groups that do not divide E)
            continue
        o = ci.argsort(dim=1)
        if not torch.equal(ci.gather(1, o), want_idx):
            continue
        cw = cw.float().gather(1, o)
        scale = float(want_w.sum() / cw.sum().clamp_min(1e-20))
        if torch.allclose(cw * scale, want_w, rtol=tol, atol=tol * float(want_w.abs().max())):
            return FamilyAdapter(cand.name, cand.routing_rule, cand.distribution, cand.rule,
                                 {**cand.params, "scale": scale}, slots, verified=True, logits_slot=logits_slot,
                                 dense=dense)
    return GENERIC


def verify_layers(model: nn.Module, layers) -> None:
    """Refuse expert computations moeviz cannot reproduce; give each layer its verified routing rule."""
    arch = type(model).__name__
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    caps = probe(model, layers)
    for layer, cap in zip(layers, caps):
        with module_weights(layer.block):  # an offloaded block's weights, loaded for this layer only
            check_experts(layer, cap, arch)
            layer.adapter = match_rule(layer, cap, config)
        layer.routing_rule = describe(layer.adapter)
