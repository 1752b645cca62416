"""Per-row threshold tables: what selecting k per row decides, for a grid of k, kept once per process.

Why: a new sparsity has to compress every expert the evaluation reaches. Selecting each row's k-th
score (`masks.row_thresholds`, np.partition) was the largest part of that. But the order statistics
of a row depend on the weights and the column factor only (`scores.scores_from_factor`), not on the
plan. So the first time an expert's projection is scored, its rows are sorted once (about the cost
of one partition with numpy's SIMD sort) and, for every count k of a grid, the k-th smallest score and
whether the (k+1)-th equals it (a tie at the threshold) are kept. A later plan whose k is in the grid
builds the mask with one comparison per weight: no selection. The masks are the same as with
`row_thresholds` (same order statistics, same tie rule: the `need` of a tied row is counted from the
scores when used, on those rare rows only).

Memory: per row, 5 bytes per grid count (float32 threshold + bool tie flag). With the 19 counts of
the app's slider (5 % steps) that is 95 bytes per row: for an OLMoE-1B-7B layer (64 experts ×
(2048 gate/up rows + 2048 down rows)) 24.9 MB, against 805 MB of bf16 expert weights (3.1 %).

Sharing: one process-wide cache (`TABLES`), like the base model: every `Compressor`, lazy provider and
browser session asks it. The key is the identity of the base fused tensor (with its version counter,
so an in-place edit is a miss), the projection, the expert and a digest of the column factor's bytes
(None for magnitude): the scores are a function of exactly these, so two calibrations with the same
statistics share a table and different statistics can never be served a stale one. Entries go when
the base tensor is freed, and the oldest go past `max_bytes`.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from moeviz.compression.masks import RowThresholds, prune_counts

# The global sparsities the app's slider produces (0.05 steps). Other counts (allocation presets,
# per-expert overrides, N:M) fall back to selecting on the fly.
GRID_SPARSITIES = tuple(round(0.05 * i, 2) for i in range(1, 20))


def grid_counts(n: int) -> np.ndarray:
    """[G] int64: distinct prune counts k (0 < k < n) of the grid sparsities for rows of n entries
    (the same rounding as `masks.prune_counts`)."""
    ks = {int(prune_counts(s, n, ())) for s in GRID_SPARSITIES}
    return np.array(sorted(k for k in ks if 0 < k < n), dtype=np.int64)


@dataclass(frozen=True, eq=False)
class RowTable:
    """One expert projection's table: for each grid count ks[g], the ks[g]-th smallest score of each row
    v[:, g] and whether the next order statistic equals it (tie[:, g])."""

    ks: tuple[int, ...]
    v: torch.Tensor  # [out, G] float32
    tie: torch.Tensor  # [out, G] bool
    finite: bool = True  # every score finite (no inf / NaN weight): `fused_prune` may be used

    @property
    def nbytes(self) -> int:
        return self.v.numel() * self.v.element_size() + self.tie.numel() * self.tie.element_size()

    def column(self, k: int) -> int | None:
        try:
            return self.ks.index(k)
        except ValueError:
            return None

    def rows(self, scores: torch.Tensor, k: int, g: int, r0: int, ties: bool = True) -> RowThresholds:
        """RowThresholds of rows r0 .. r0 + len(scores) for count ks[g] = k, scores [b, n] being those
        rows' scores (only read on rows with a tie, to count the tied entries to prune). ties=False:
        the caller knows no row of column g has a tie (saves a check per block)."""
        b, n = scores.shape
        v = self.v[r0:r0 + b, g:g + 1]
        bad = self.tie[r0:r0 + b, g]
        need = torch.zeros(b, dtype=torch.int64)
        if ties and bool(bad.any()):  # as in masks.row_thresholds
            need[bad] = k - (scores[bad] < v[bad]).sum(dim=-1)
        return RowThresholds(k, n, v, bad, need)


class TableBuilder:
    """Collects a RowTable block by block from sorted rows (`steps.prune_rows` sorts each block once)."""

    def __init__(self, out_features: int, n: int):
        self.ks = grid_counts(n)
        self.v = torch.empty(out_features, len(self.ks), dtype=torch.float32)
        self.tie = torch.empty(out_features, len(self.ks), dtype=torch.bool)
        self.finite = True

    def add(self, r0: int, sorted_rows: np.ndarray) -> None:
        """sorted_rows: [b, n] float32, each row's scores in ascending order."""
        b = sorted_rows.shape[0]
        lo = sorted_rows[:, self.ks - 1]  # [b, G]: k-th smallest
        self.v[r0:r0 + b] = torch.from_numpy(lo)
        self.tie[r0:r0 + b] = torch.from_numpy(sorted_rows[:, self.ks] == lo)
        # numpy sorts NaN last, so a row's last entry is finite iff all its scores are.
        self.finite = self.finite and bool(np.isfinite(sorted_rows[:, -1]).all())

    def table(self) -> RowTable:
        return RowTable(tuple(int(k) for k in self.ks), self.v, self.tie, self.finite)


def factor_digest(factor: torch.Tensor | None) -> bytes | None:
    """Content key of a column factor (None: magnitude)."""
    if factor is None:
        return None
    return hashlib.blake2b(factor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes(),
                           digest_size=16).digest()


class TableCache:
    """Process-wide, thread-safe store of RowTables (see the module docstring)."""

    def __init__(self, max_bytes: int = 4 * 2**30):
        self.max_bytes = max_bytes
        self._tables: OrderedDict[tuple, RowTable] = OrderedDict()
        self._owners: dict[int, weakref.finalize] = {}  # id(base tensor) -> finalizer dropping its entries
        self._lock = threading.RLock()  # reentrant: a finalizer may run during a collection inside a locked section
        self.nbytes = 0
        self.builds = 0  # tables stored (a test checks that a second Compressor / session builds none)
        self.hits = 0

    @staticmethod
    def key(base: torch.Tensor, proj: str, expert: int, digest: bytes | None) -> tuple:
        try:
            version = base._version
        except RuntimeError:  # an inference tensor has no version counter (and cannot be edited outside one)
            version = -1
        return (id(base), version, proj, int(expert), digest)

    def get(self, key: tuple) -> RowTable | None:
        with self._lock:
            t = self._tables.get(key)
            if t is not None:
                self.hits += 1
            return t

    def put(self, key: tuple, base: torch.Tensor, table: RowTable) -> None:
        with self._lock:
            if key in self._tables:
                return
            if id(base) not in self._owners:  # entries keyed by a freed tensor's id must not outlive it
                self._owners[id(base)] = weakref.finalize(base, self._drop_owner, id(base))
            self._tables[key] = table
            self.nbytes += table.nbytes
            self.builds += 1
            while self.nbytes > self.max_bytes and len(self._tables) > 1:
                _, old = self._tables.popitem(last=False)
                self.nbytes -= old.nbytes

    def _drop_owner(self, owner: int) -> None:
        with self._lock:
            self._owners.pop(owner, None)
            for k in [k for k in self._tables if k[0] == owner]:
                self.nbytes -= self._tables.pop(k).nbytes

    def clear(self) -> None:
        with self._lock:
            self._tables.clear()
            self.nbytes = 0


TABLES = TableCache()


@dataclass(frozen=True)
class TableSlot:
    """Where one expert projection's table lives: what `steps.prune_rows` reads or fills."""

    cache: TableCache
    key: tuple
    base: torch.Tensor

    def get(self) -> RowTable | None:
        return self.cache.get(self.key)

    def put(self, table: RowTable) -> None:
        self.cache.put(self.key, self.base, table)


def slot(base: torch.Tensor, proj: str, expert: int, factor: torch.Tensor | None,
         cache: TableCache | None = None) -> TableSlot:
    """The slot of expert `expert`'s projection `proj` of the base fused tensor `base` with this
    column factor."""
    return TableSlot(cache or TABLES, TableCache.key(base, proj, expert, factor_digest(factor)), base)
