"""Prune rows whose thresholds are already known in one pass per weight (a numba kernel).

Why: once a row's threshold is known (the shared threshold table, `threshold_table`, or this plan's
thresholds from an earlier batch), pruning is elementwise: score = |w| * factor[j], keep iff
score > t[row], out = w * keep. Written as torch ops that is six passes over every weight (cast to
float32, abs, column factor, compare, cast of the mask, product), each with its own dispatch: measured
on a [1024, 2048] bf16 projection at one thread, 2.0 ms. This kernel reads each weight once and writes
it once: 0.3 ms. On the OLMoE-1B-7B shape a new sparsity compresses 805 MB of experts per layer, so
this was about 0.4 x a bare forward of the layer (docs/SCALE.md).

Same result, bit for bit: the score is the same float32 product (|w| is exact in float32, one IEEE
multiplication, no fused multiply-add), the same strict comparison, and a pruned weight becomes what
w * 0 gives for a finite w (zero with w's sign). Weights that are inf or NaN would differ (torch gives
NaN), so the caller uses the kernel only where the threshold table found every score finite. Rows
with a tie at the threshold are fixed up by the caller (`steps.prune_rows`), as before.

numba is a dependency: a numba that fails to import or compile raises (it is not silently replaced).
The one switch to the plain torch path is `moeviz.runtime_config` (`fused_kernels=False`, or
`MOEVIZ_NO_NUMBA=1` at an entry point); the tests compare both paths bit for bit. The kernels are
compiled (or read from numba's cache: about 0.6 s in all) on first use, so importing moeviz does not
pay for it; `steps.prune_rows` asks for them while building the first threshold table (the cold pass),
not in the first new sparsity.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import torch

from moeviz import runtime_config

_lock = threading.Lock()
_kernels: dict | None = None


def enabled() -> bool:
    """True unless the runtime configuration switches the kernel off (then compiles it on first use)."""
    return runtime_config.current().fused_kernels and _load() is not None


def _load() -> dict:
    global _kernels
    if _kernels is None:
        with _lock:
            if _kernels is None:
                _kernels = _compile()
    return _kernels


def _compile() -> dict:
    import numba

    def jit(sigs):
        # Compiled (or read from numba's cache) here, for rows that are contiguous arrays (C) and for
        # row-strided views (A: e.g. GPT-OSS's interleaved gate rows), so no call compiles lazily later.
        def wrap(fn):
            try:
                return numba.njit(sigs, nogil=True, cache=True)(fn)
            except RuntimeError:  # no writable cache location: compile in memory, once per process
                return numba.njit(sigs, nogil=True)(fn)
        return wrap

    def sigs(t, v=numba.float32[:]):
        return [numba.void(a, a, numba.float32[::1], v) for a in (t[:, ::1], t[:, :])]

    # Loops are branch-free (a select per weight) so that LLVM vectorises them: with an `if` around the
    # store, or an inf / NaN check per weight, the same kernel measured 1.7-3x slower.
    @jit(sigs(numba.uint16))
    def bf16(src, dst, factor, v):  # src, dst: [out, in] uint16 (bf16 bits); factor: [in]; v: [out] float32
        out_f, n = src.shape
        absw = np.empty(n, dtype=np.uint32)
        fabs = absw.view(np.float32)  # |w| as float32: bf16 bits are the float32's high half
        for i in range(out_f):
            row, res, t = src[i], dst[i], v[i]
            for j in range(n):
                absw[j] = np.uint32(row[j] & 0x7FFF) << 16
            for j in range(n):
                # kept: w; pruned: w * 0 for a finite w, i.e. zero with w's sign
                res[j] = row[j] if fabs[j] * factor[j] > t else row[j] & np.uint16(0x8000)

    @jit(sigs(numba.float32))
    def f32(src, dst, factor, v):  # src, dst: [out, in] float32
        out_f, n = src.shape
        for i in range(out_f):
            row, res, t = src[i], dst[i], v[i]
            for j in range(n):
                w = row[j]
                res[j] = w if abs(w) * factor[j] > t else w * np.float32(0.0)  # the same IEEE w * 0 as torch

    # The same pass over a transposed (stored [in, out]) matrix: the column factor is per stored row and
    # the threshold per stored column (GPT-OSS: prune without a row-major copy first). A kernel of its own:
    # one kernel for both layouts would read a factor and a threshold per weight in each.
    @jit(sigs(numba.uint16, numba.float32[::1]))  # v contiguous: read per weight, vectorised
    def bf16_t(src, dst, factor, v):  # src, dst: [in, out] uint16; factor: [in]; v: [out] float32
        rows, n = src.shape
        absw = np.empty(n, dtype=np.uint32)
        fabs = absw.view(np.float32)
        for i in range(rows):
            row, res, f = src[i], dst[i], factor[i]
            for j in range(n):
                absw[j] = np.uint32(row[j] & 0x7FFF) << 16
            for j in range(n):
                res[j] = row[j] if fabs[j] * f > v[j] else row[j] & np.uint16(0x8000)

    @jit(sigs(numba.float32, numba.float32[::1]))
    def f32_t(src, dst, factor, v):  # src, dst: [in, out] float32
        rows, n = src.shape
        for i in range(rows):
            row, res, f = src[i], dst[i], factor[i]
            for j in range(n):
                w = row[j]
                res[j] = w if abs(w) * f > v[j] else w * np.float32(0.0)

    return {torch.bfloat16: bf16, torch.float32: f32, ("T", torch.bfloat16): bf16_t, ("T", torch.float32): f32_t}


def supports(dst: torch.Tensor, src: torch.Tensor) -> bool:
    """Whether `prune_known_rows` can take these tensors (CPU, bf16 / float32, rows contiguous)."""
    return (dst.device.type == "cpu" and src.device.type == "cpu" and dst.dtype == src.dtype
            and dst.dtype in (torch.bfloat16, torch.float32) and dst.stride(-1) == 1 and src.stride(-1) == 1
            and enabled())


_ones: dict[int, np.ndarray] = {}


def prune_known_columns(dst: torch.Tensor, src: torch.Tensor, factor: torch.Tensor | None, v: torch.Tensor) -> None:
    """`prune_known_rows` of a matrix stored transposed: src [in, out] holds W^T, so dst = src * (|src| *
    factor[i] > v[j]) with factor [in] per stored row and the thresholds v [out] per stored column (v
    may be -inf: keep the column). Same float32 product and comparison, so the same bits."""
    kernel = _load()[("T", src.dtype)]
    a, b = _arrays(src, dst)
    f, t = _factor(factor, src.shape[0]), v.detach().to(torch.float32).contiguous().numpy()
    _split_rows(lambda r0, r1: kernel(a[r0:r1], b[r0:r1], f[r0:r1], t), a.shape[0], a.size)


def prune_known_rows(dst: torch.Tensor, src: torch.Tensor, factor: torch.Tensor | None, v: torch.Tensor,
                     threads: int | None = None) -> None:
    """dst [out, in] = src * (|src| * factor > v[row]) in one pass (dst may be src: in place).

    factor: [1, in] or [in] float32 column factor (None: magnitude); v: [out] float32 row thresholds
    (may be a strided column of a table). Every weight must be finite (see the module docstring).
    threads: row ranges run at once (default: torch's thread count, see `_parts`)."""
    kernel = _load()[src.dtype]
    a, b = _arrays(src, dst)
    f, t = _factor(factor, src.shape[-1]), v.detach().numpy()
    _split_rows(lambda r0, r1: kernel(a[r0:r1], b[r0:r1], f, t[r0:r1]), a.shape[0], a.size, threads)


def _arrays(src: torch.Tensor, dst: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """numpy views of src and dst (no copy); bf16 as its uint16 bits (numpy has no bf16)."""
    if src.dtype == torch.bfloat16:
        return tuple(x.detach().view(torch.int16).numpy().view(np.uint16) for x in (src, dst))
    return src.detach().numpy(), dst.detach().numpy()


def _factor(factor: torch.Tensor | None, n: int) -> np.ndarray:
    """[n] contiguous float32 factor; ones (exact: x * 1 = x) for magnitude."""
    if factor is not None:
        return factor.detach().reshape(n).to(torch.float32).contiguous().numpy()
    f = _ones.get(n)
    if f is None:
        f = _ones[n] = np.ones(n, dtype=np.float32)
    return f


def _split_rows(run, rows: int, size: int, threads: int | None = None) -> None:
    """run(r0, r1) over row ranges: torch's threads are idle meanwhile, so the ranges run in a pool (the
    kernels release the GIL), the last one in this thread. Rows are independent: the result does not depend
    on the split."""
    parts = _parts(rows, size, threads)
    futures = [_pool().submit(run, r0, r1) for r0, r1 in parts[:-1]]
    run(*parts[-1])
    for fut in futures:
        fut.result()


PARALLEL_MIN_ELEMENTS = 1 << 18  # below this one thread: a pool hand-off (~20-50 us) would cost more than it saves
_executor = None


def _parts(rows: int, size: int, threads: int | None = None) -> list[tuple[int, int]]:
    """Row ranges for `threads`, else the runtime configuration's `prune_threads`, else torch's thread count
    (one range for small matrices or one thread)."""
    threads = threads or runtime_config.current().prune_threads or torch.get_num_threads()
    if threads <= 1 or size < PARALLEL_MIN_ELEMENTS or rows < 2:
        return [(0, rows)]
    cuts = np.linspace(0, rows, min(threads, rows) + 1).astype(int)
    return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])]


def _pool():
    global _executor
    with _lock:
        if _executor is None:
            from concurrent.futures import ThreadPoolExecutor

            _executor = ThreadPoolExecutor(max(1, (os.cpu_count() or 2) - 1), thread_name_prefix="moeviz-prune")
        return _executor
