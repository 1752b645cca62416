"""Everything moeviz changes in the process, in one place; applied by the entry points, never by a library call.

The app (`pages/_state.init_session`), the CLI (`moeviz.cli.main`), the benchmarks (`python -m benchmarks`)
and the test suite (`tests/conftest.py`) call `configure()` once at start-up. A program that uses moeviz
as a library may call it as well (recommended for large models) or leave its process as it is: every
result is the same either way, only memory and speed differ.

| setting | what it changes in the process | why (measured, docs/SCALE.md) | off |
|---|---|---|---|
| `plain_reads` | transformers' loader reads safetensors with `pread`, one parameter at a time (`transformers.modeling_utils.safe_open` wrapped, `HF_DEACTIVATE_ASYNC_LOAD=1`) | with transformers' mmap the views of unconverted tensors keep the whole file resident: RSS after loading 1.93 GB for a 0.84 GB checkpoint, ≈ 1 × with plain reads | `plain_reads=False` |
| `fixed_mmap_threshold` | glibc `mallopt(M_MMAP_THRESHOLD, 128 KiB)` (skipped if `MALLOC_MMAP_THRESHOLD_` is set, or not glibc) | glibc raises the threshold after each large free, then keeps freed temporaries on its heap: RSS 8.2 vs 2.4 GB in one lazy evaluation of 2 OLMoE-shaped layers | `fixed_mmap_threshold=False` (glibc has no getter: a threshold once fixed stays) |
| `fused_kernels` | the numba kernel of `compression.fused_prune` (numba is a dependency: a failing numba raises) | a projection with known row thresholds pruned in one pass: 0.3 vs 2.0 ms | `fused_kernels=False` or `MOEVIZ_NO_NUMBA=1`: the plain torch path, bit-identical (the tests compare both) |
| `prune_threads` | threads the fused kernel splits a matrix's rows over (its own pool) | | `0` = torch's thread count; `MOEVIZ_PRUNE_THREADS` |

Before `configure()` the library runs with `LIBRARY_DEFAULT`: fused kernels on, nothing process-wide changed.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import sys
import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class RuntimeConfig:
    plain_reads: bool = True
    fixed_mmap_threshold: bool = True
    fused_kernels: bool = True
    prune_threads: int = 0  # 0: torch.get_num_threads()

    @classmethod
    def from_env(cls, environ=None) -> "RuntimeConfig":
        """The defaults with the documented environment switches (`MOEVIZ_NO_NUMBA`, `MOEVIZ_PRUNE_THREADS`)."""
        env = os.environ if environ is None else environ
        return cls(fused_kernels=env.get("MOEVIZ_NO_NUMBA", "").lower() not in ("1", "true", "yes"),
                   prune_threads=int(env.get("MOEVIZ_PRUNE_THREADS", "0") or 0))


LIBRARY_DEFAULT = RuntimeConfig(plain_reads=False, fixed_mmap_threshold=False)

_lock = threading.Lock()
_current = LIBRARY_DEFAULT
_original_safe_open = None  # transformers' own, while plain reads are installed
_previous_async_env: str | None = None


def current() -> RuntimeConfig:
    """The configuration in force (what `configure` last applied, else `LIBRARY_DEFAULT`)."""
    return _current


def configure(config: RuntimeConfig | None = None) -> RuntimeConfig:
    """Apply `config` (default: `RuntimeConfig.from_env()`) to this process; returns the previous one.
    Idempotent: calling it again with the same configuration changes nothing."""
    global _current
    config = RuntimeConfig.from_env() if config is None else config
    with _lock:
        previous = _current
        _set_plain_reads(config.plain_reads)
        if config.fixed_mmap_threshold:
            fix_mmap_threshold()
        _current = config
    return previous


@contextlib.contextmanager
def using(**changes):
    """`configure` with some fields changed, restored on exit (tests: e.g. `using(fused_kernels=False)`)."""
    previous = configure(dataclasses.replace(current(), **changes))
    try:
        yield current()
    finally:
        configure(previous)


# ---------------------------------------------------------------------------- the process-wide changes

def _set_plain_reads(on: bool) -> None:
    """Install (or remove) the pread wrapper of transformers' `safe_open`: safetensors' `backend="pread"`
    reads each CPU tensor into its own memory, so nothing stays mapped; `HF_DEACTIVATE_ASYNC_LOAD` makes
    transformers materialise one parameter at a time (its thread pool would read the whole checkpoint
    ahead of the conversions). Weight conversions, dtype casts, device maps and offload are transformers'
    own, unchanged. Without transformers' `safe_open` name (another version) loading keeps its mmap."""
    global _original_safe_open, _previous_async_env
    import transformers.modeling_utils as modeling_utils

    if on and _original_safe_open is None:
        original = getattr(modeling_utils, "safe_open", None)
        if original is None:
            return

        def pread_open(filename, framework, device="cpu", **kwargs):
            if str(device) == "cpu":
                kwargs["backend"] = "pread"
            return original(filename, framework=framework, device=device, **kwargs)

        _original_safe_open, _previous_async_env = original, os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
        os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
        modeling_utils.safe_open = pread_open
    elif not on and _original_safe_open is not None:
        modeling_utils.safe_open = _original_safe_open
        if _previous_async_env is None:
            os.environ.pop("HF_DEACTIVATE_ASYNC_LOAD", None)
        else:
            os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = _previous_async_env
        _original_safe_open = _previous_async_env = None


def plain_reads_installed() -> bool:
    return _original_safe_open is not None


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_MMAP_THRESHOLD = 128 * 1024  # glibc's default value


def fix_mmap_threshold() -> bool:
    """Make glibc return large freed blocks to the system (a fixed mmap threshold, which also stops glibc
    raising it, up to 32 MiB, each time a large mmapped block is freed: loading frees hundreds of
    per-expert tensors, lazy evaluation and export free per-expert temporaries). Skipped when the user set
    MALLOC_MMAP_THRESHOLD_ and where the C library is not glibc. True if applied."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD))
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
