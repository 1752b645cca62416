"""Structural copies: a new module tree that shares every tensor with the original.

Compression and instrumented calibration change modules (replace a parameter, install a runtime
module: `moeviz.models.runtime`) on such a copy, so the loaded base model, shared by every browser session, is never mutated and no
weight is duplicated until a plan replaces it.
"""

from __future__ import annotations

import copy

from torch import nn


def structural_copy(model: nn.Module) -> nn.Module:
    """Copy the module objects of `model` but not its parameters or buffers (they are shared)."""
    from moeviz.models.offload import offloaded_tensors

    memo = {id(t): t for t in model.parameters()}
    memo.update({id(t): t for t in model.buffers()})
    memo.update({id(t): t for t in offloaded_tensors(model)})  # accelerate's CPU-offloaded copies
    return copy.deepcopy(model, memo)
