"""Models larger than memory: accelerate `device_map` with CPU / disk offload (`max_memory`).

accelerate keeps an offloaded module's parameters on the meta device and loads them (from CPU RAM or
from disk) around each call of that module's forward (`AlignDevicesHook`). moeviz therefore:

* computes whatever needs expert weights *inside* the forward (runtime modules, lazy weight provider),
  where the hook has loaded them;
* reads weights outside a forward only within `module_weights(module)` (verification, export);
* lays a replaced tensor over the hook's offloaded copy (`install_tensor`), so the hook loads the
  compressed tensor, not the base one;
* shares the offloaded CPU tensors between structural copies (`offloaded_tensors`), as it shares
  parameters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
from torch import nn


def hook_of(module: nn.Module):
    return module.__dict__.get("_hf_hook")


def is_offloaded(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


@contextlib.contextmanager
def module_weights(module: nn.Module):
    """Context in which the offloaded parameters of `module` and its children hold real values
    (loaded by their hooks, one module's worth each; no-op for a model that is not offloaded)."""
    if not any(p.is_meta for p in module.parameters()):
        yield
        return
    from accelerate.utils import align_module_device

    with contextlib.ExitStack() as stack:
        for m in module.modules():
            if hook_of(m) is not None and any(p.is_meta for p in m.parameters(recurse=False)):
                stack.enter_context(align_module_device(m))
        yield


def execution_device(model: nn.Module) -> torch.device:
    """Where an offloaded model computes: its hooks' execution device, else its first real tensor's."""
    for m in model.modules():
        hook = hook_of(m)
        dev = getattr(hook, "execution_device", None)
        if dev is not None:
            return torch.device(dev if not isinstance(dev, int) else f"cuda:{dev}")
    real = [p.device for p in model.parameters() if not p.is_meta]
    return real[0] if real else torch.device("cpu")


def offloaded_tensors(model: nn.Module) -> list[torch.Tensor]:
    """CPU tensors that offload hooks hold for `model` (disk offload holds none: it reads files)."""
    out = []
    for m in model.modules():
        wm = getattr(hook_of(m), "weights_map", None)
        state = getattr(getattr(wm, "dataset", None), "state_dict", None)
        if isinstance(state, dict):
            out += [t for t in state.values() if isinstance(t, torch.Tensor)]
    return out


class _Overlay(Mapping):
    """The hook's weights map with some entries replaced (keys relative to the module)."""

    def __init__(self, base, replaced: dict[str, torch.Tensor]):
        self.base, self.replaced = base, replaced

    def __getitem__(self, key):
        return self.replaced[key] if key in self.replaced else self.base[key]

    def __iter__(self):
        return iter(self.base)

    def __len__(self):
        return len(self.base)

    def __deepcopy__(self, memo):
        return _Overlay(self.base, dict(self.replaced))


def install_tensor(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """`module.name = Parameter(tensor)`; on an offloaded module the hook then loads `tensor`."""
    hook = hook_of(module)
    wm = getattr(hook, "weights_map", None)
    if wm is not None and getattr(hook, "offload", False):
        if not isinstance(wm, _Overlay):
            wm = hook.weights_map = _Overlay(wm, {})
        wm.replaced[name] = tensor.detach().to("cpu")
        setattr(module, name, nn.Parameter(torch.empty_like(tensor, device="meta"), requires_grad=False))
        return
    setattr(module, name, nn.Parameter(tensor, requires_grad=False))


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with real values for offloaded modules (loaded one module at a time, copied to CPU)."""
    if not is_offloaded(model):
        return {k: v.detach() for k, v in model.state_dict().items()}
    state = {}
    for prefix, m in model.named_modules():
        own = list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))
        persistent = [n for n, _ in own if n not in getattr(m, "_non_persistent_buffers_set", set())]
        if not persistent:
            continue
        with module_weights(m):
            for n in persistent:
                t = getattr(m, n)
                # Loaded for this context only: the reference we keep stays valid after it reverts to meta.
                state[f"{prefix}.{n}" if prefix else n] = t.detach().to("cpu")
    return state
