"""Explicit runtime modules: what moeviz changes in a model's MoE blocks, as typed state.

A structural copy's router and experts modules get, in one place (`install_router_runtime`,
`install_experts_runtime`), a runtime *class* (a subclass of the family's own class, same name, same
parameters, same module tree) whose forward consults a typed state object:

* `RouterRuntime`: the allowed experts and the family's verified routing rule; removed experts are
  never chosen, tokens are re-routed among the rest.
* `ExpertsRuntime`: a weight provider (None: the module's own tensors; else e.g. lazily compressed
  weights, `moeviz.compression.lazy`), an input transform (activation fake-quantization) and
  observers (calibration, evaluation, distillation, token explorer add observers; nothing replaces a
  module's `forward`): per-expert ones, and layer ones that see each call's tensors grouped by expert
  (calibration: with only layer observers the reference computation is grouped, no loop over experts).

With no provider, transform or expert observer the family's own forward runs unchanged. Otherwise
the reference loop (`experts.experts_forward`) runs, which reproduces the family's forward (checked
at load time by `verify.py`). Dense-dispatch experts (Llama 4: the block passes every token to every
expert, pre-scaled) are run through the same routed loop from the router's dense scores.

The state is deep-copied with the module (a structural copy keeps provider and transform, drops
observers, which belong to one pass).
"""

from __future__ import annotations

import functools
import inspect
import types
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from moeviz.models.experts import ExpertObserver, LayerObserver, experts_forward, takes_routing

RUNTIME_ATTR = "_moeviz_runtime"

# (experts module, expert id) -> (input weight, down weight) of that expert in storage layout,
# e.g. ([2I, H], [H, I]) standard or ([H, 2I], [I, H]) transposed.
WeightProvider = Callable[[nn.Module, int], tuple[torch.Tensor, torch.Tensor]]
# Sees what the experts receive: hidden [T, H], top_k_index [T, k], top_k_weights [T, k].
RoutingObserver = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass(eq=False)
class RouterRuntime:
    adapter: object  # FamilyAdapter (verified rule); typed loosely to avoid an import cycle
    allowed: torch.Tensor | None = None  # [E] bool; None = every expert allowed

    def __deepcopy__(self, memo):
        return RouterRuntime(self.adapter, self.allowed)


@dataclass(eq=False)
class ExpertsRuntime:
    weights: WeightProvider | None = None
    input_transform: Callable[[int, torch.Tensor], torch.Tensor] | None = None
    observers: list[ExpertObserver] = field(default_factory=list)
    layer_observers: list[LayerObserver] = field(default_factory=list)  # each call's grouped tensors, once
    routing_observers: list[RoutingObserver] = field(default_factory=list)
    dispatch: tuple[int, int, int] | None = None  # dense dispatch only: (E, top_k, H)
    dispatch_state: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def computes(self) -> bool:
        """True when the reference loop must run (the family's forward cannot do what is asked)."""
        return (self.weights is not None or self.input_transform is not None or bool(self.observers)
                or bool(self.layer_observers))

    def observe(self, e, token_idx, gate, x, h, y) -> None:
        for obs in self.observers:
            obs(e, token_idx, gate, x, h, y)

    def observe_layer(self, grouped) -> None:
        for obs in self.layer_observers:
            obs(grouped)

    def run(self, experts, hidden, index, weights) -> torch.Tensor:
        """The reference computation with this state's provider, transform and observers."""
        return experts_forward(experts, hidden, index, weights, observer=self.observe if self.observers else None,
                               input_transform=self.input_transform, weights=self.weights,
                               layer_observer=self.observe_layer if self.layer_observers else None)

    def __deepcopy__(self, memo):
        # Provider and transform are immutable and shared; observers and per-pass state are not copied.
        return ExpertsRuntime(self.weights, self.input_transform, dispatch=self.dispatch)


class _RouterRuntimeMixin:
    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        rt: RouterRuntime = self.__dict__[RUNTIME_ATTR]
        if rt.allowed is None:
            return out
        return reroute(self, rt.adapter, rt.allowed, out)


class _ExpertsRuntimeMixin:
    def forward(self, *args, **kwargs):
        rt: ExpertsRuntime = self.__dict__[RUNTIME_ATTR]
        if rt.dispatch is not None:
            return _dense_forward(self, rt, *args, **kwargs)
        hidden, index, weights = _bind_routed(type(self)._moeviz_base, args, kwargs)
        for obs in rt.routing_observers:
            obs(hidden, index, weights)
        if not rt.computes:
            return super().forward(*args, **kwargs)
        return rt.run(self, hidden, index, weights)


@functools.lru_cache(maxsize=None)
def _routed_names(cls: type) -> tuple[str, ...]:
    params = list(inspect.signature(cls.forward).parameters)[1:4]
    return tuple(params)


def _bind_routed(cls, args, kwargs):
    """(hidden, top_k_index, top_k_weights) from the call, positional or by the class's own names."""
    names = _routed_names(cls)
    values = list(args) + [kwargs[n] for n in names[len(args):3] if n in kwargs]
    return values[0], values[1], values[2]


def _dense_forward(self, rt: ExpertsRuntime, routed_in: torch.Tensor) -> torch.Tensor:  # [E*T, H] -> [E*T, H]
    if not rt.computes and not rt.routing_observers:
        return super(_ExpertsRuntimeMixin, self).forward(routed_in)
    E, k, H = rt.dispatch
    hidden, scores = rt.dispatch_state  # [T, H], [T, E] from the router hook of this forward
    weights, index = scores.topk(k, dim=-1)  # unchosen experts have score 0
    for obs in rt.routing_observers:
        obs(hidden, index, weights)
    final = rt.run(self, hidden, index, weights)
    # The block reshapes the result to [E, T, H] and sums over E: put everything in the first block.
    out = routed_in.new_zeros(E, hidden.shape[0], H)
    out[0] = final
    return out.reshape(E * hidden.shape[0], H)


def _dense_remember(self, router, args, output) -> None:
    rt: ExpertsRuntime = self.__dict__[RUNTIME_ATTR]
    E, _, H = rt.dispatch
    rt.dispatch_state = (args[0].reshape(-1, H), output[0].reshape(-1, E))  # hidden [T, H], scores [T, E]


@functools.lru_cache(maxsize=None)
def _runtime_class(mixin: type, cls: type) -> type:
    if getattr(cls, "_moeviz_base", None) is not None:
        return cls
    # Same name, so anything that reads the class name (repr, reports) sees the family's class.
    return type(cls.__name__, (mixin, cls), {"_moeviz_base": cls, "__module__": cls.__module__,
                                             "__qualname__": cls.__qualname__})


def _swap_class(module: nn.Module, mixin: type) -> None:
    module.__class__ = _runtime_class(mixin, type(module))
    if "_old_forward" in module.__dict__:
        # accelerate's offload hook calls the forward it saved when it was attached (the family's);
        # point it at the runtime class's, so the hook loads the weights, then the runtime runs.
        module._old_forward = types.MethodType(type(module).forward, module)


def router_runtime(module: nn.Module) -> RouterRuntime | None:
    rt = module.__dict__.get(RUNTIME_ATTR)
    return rt if isinstance(rt, RouterRuntime) else None


def experts_runtime(module: nn.Module) -> ExpertsRuntime | None:
    rt = module.__dict__.get(RUNTIME_ATTR)
    return rt if isinstance(rt, ExpertsRuntime) else None


def install_router_runtime(layer) -> RouterRuntime:
    """The router runtime of `layer` (a MoELayer of a structural copy, never of the shared base)."""
    rt = router_runtime(layer.router)
    if rt is None:
        rt = RouterRuntime(layer.adapter)
        layer.router.__dict__[RUNTIME_ATTR] = rt
        _swap_class(layer.router, _RouterRuntimeMixin)
    return rt


def install_experts_runtime(layer) -> ExpertsRuntime:
    """The experts runtime of `layer` (a MoELayer of a structural copy, never of the shared base)."""
    experts = layer.experts
    rt = experts_runtime(experts)
    if rt is None:
        rt = ExpertsRuntime()
        experts.__dict__[RUNTIME_ATTR] = rt
        if not takes_routing(experts):
            rt.dispatch = (layer.num_experts, layer.top_k, layer.hidden_size)
            # A method bound to the experts module (not a closure), so a structural copy rebinds it.
            layer.router.register_forward_hook(types.MethodType(_dense_remember, experts))
        _swap_class(experts, _ExpertsRuntimeMixin)
    return rt


def reroute(router: nn.Module, adapter, allowed: torch.Tensor, output):
    """The router's output with its top-k weights and ids (at the slots found when the rule was
    verified) replaced by the verified rule over logits where removed experts are -inf."""
    out = list(output)
    logits = out[adapter.logits_slot]
    allowed = allowed.to(logits.device)
    flat = logits.reshape(-1, logits.shape[-1])  # [T, E]
    weights, indices = adapter.route(router, flat, allowed)
    if adapter.dense:  # dense scores [T, E]: the chosen experts' weights, 0 elsewhere
        out[0] = torch.zeros_like(flat, dtype=out[0].dtype).scatter(1, indices, weights.to(out[0].dtype)) \
            .reshape(out[0].shape)
    else:
        w_slot, i_slot = adapter.output_slots
        out[w_slot] = weights.to(out[w_slot].dtype).reshape(out[w_slot].shape)
        out[i_slot] = indices.to(out[i_slot].dtype).reshape(out[i_slot].shape)
    out[adapter.logits_slot] = logits.masked_fill(~allowed, float("-inf"))
    return tuple(out)


def patched_forwards(model: nn.Module) -> list[str]:
    """Modules of `model` whose instance dict holds a `forward` (a monkey-patch); moeviz leaves none."""
    return [name for name, m in model.named_modules() if "forward" in vars(m)]
