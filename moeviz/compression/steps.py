"""The compression of one MoE layer as small steps on a set of experts: prune, quantize, remove.

Each step works on `fused`, a dict {fused tensor name -> tensor laid out like the experts module's
attribute, restricted to the selected experts} (e.g. "gate_up_proj" -> [n, 2I, H]), edits it in place
and returns the names it changed. The same steps serve both paths:

* materialised (`Compressor.apply(lazy=False)`, export, recovery): all experts of a layer at once;
* lazy (`moeviz.compression.lazy`): one expert at a time, while the forward reaches it.

Every operation is row-wise and per expert (scores are elementwise, masks select per output row,
quantization groups lie inside a row), so running the steps on one expert gives bit-identical
weights to running them on the whole layer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from moeviz.compression import fused_prune
from moeviz.compression.masks import (
    RowThresholds, mask_in_scores_, nm_mask, prune_counts, row_thresholds,
)
from moeviz.compression.quantize import quantize_weight
from moeviz.compression.scores import column_factor, importance_scores, scores_from_factor
from moeviz.compression.scratch import Scratch
from moeviz.compression.threshold_table import TableBuilder, TableCache, TableSlot, slot
from moeviz.models.layers import MoELayer

# Which calibration statistic feeds each projection's Wanda / MoE-Pruner score.
NORMS = {
    ("wanda", "gate"): "input_sq", ("wanda", "up"): "input_sq", ("wanda", "down"): "down_sq",
    ("moe_pruner", "gate"): "input_sq_weighted", ("moe_pruner", "up"): "input_sq_weighted",
    ("moe_pruner", "down"): "down_sq_weighted",
}


@dataclass(frozen=True)
class LayerSettings:
    """What a plan resolved to for one MoE layer (per-expert arrays have the layer's E entries)."""

    sparsity: np.ndarray  # [E] fraction of each pruned row zeroed (N:M: n/m, 0 = dense)
    bits: np.ndarray  # [E] weight bits (16 = not quantized)
    removed: np.ndarray  # [E] bool
    metric: str
    projections: tuple[str, ...]  # projections the plan prunes
    nm: tuple[int, int] | None
    group_sizes: dict[str, int]  # projection -> quantization group size (-1 = one group per row)
    symmetric: bool

    def touched_names(self, layer: MoELayer) -> list[str]:
        """Fused tensors of the layer this plan changes (the others stay shared with the base)."""
        names = []
        if (self.bits < 16).any() or self.removed.any():
            names = [layer.fused_name(p) for p in layer.projections()]
        elif (self.sparsity > 0).any():
            names = [layer.fused_name(p) for p in self.projections if p in layer.projections()]
        return list(dict.fromkeys(names))

    def touches(self, e: int) -> bool:
        return bool(self.sparsity[e] > 0 or self.bits[e] < 16 or self.removed[e])


# Per-projection statistics of the selected experts: projection -> [n, in] squared column norms, or None
# for magnitude (the caller slices CalibrationStats so a step never sees other experts' statistics).
NormsFn = Callable[[str], torch.Tensor | None]


def prune(layer: MoELayer, fused: dict[str, torch.Tensor], sel: np.ndarray, s: LayerSettings, norms: NormsFn,
          masks: dict[str, torch.Tensor] | None = None, thresholds: dict | None = None, scratch: Scratch | None = None,
          tables: Callable[[str, int, torch.Tensor | None], TableSlot] | None = None,
          src: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Zero the lowest-score weights of each row of the selected experts' pruned projections.

    sel: [n] expert indices that `fused` holds (in order). masks: if given, receives the keep-mask
    [n, out, in] per projection. Scores come from the weights in `fused`, which must still be the
    base weights (pruning is the first step). thresholds: a per-projection cache of one expert's
    `RowThresholds` (O(rows) memory), filled on first use; the masks are the same as without.
    scratch: reusable buffers for the one-expert path's temporaries (`moeviz.compression.scratch`).
    tables(proj, expert, column factor): the shared threshold-table slot of an expert's projection
    (`moeviz.compression.threshold_table`), or None to select on the fly; same masks either way.
    src: name -> base part, for fused tensors of `fused` left unfilled (see `compress_experts`): the
    unstructured path reads the base there and writes every row of them (one pass instead of a copy
    then a product)."""
    sparsity = s.sparsity[sel]
    if not (sparsity > 0).any():
        return []
    changed = []
    for proj in s.projections:
        if proj not in layer.projections():
            continue
        w = layer.view(proj, fused[layer.fused_name(proj)])  # [n, out, in] view into the fused clone
        src_w = layer.view(proj, src[layer.fused_name(proj)]) if src and layer.fused_name(proj) in src else None
        if s.nm is None:
            # Unstructured: one expert at a time, rows in cache-sized blocks, temporaries
            # in reused buffers (`prune_rows`). One expert (lazy path): the per-row thresholds are kept
            # per plan, so later batches only compare.
            one = thresholds is not None and len(sel) == 1
            keep = None if masks is None else torch.ones(w.shape, dtype=torch.bool, device=w.device)
            norm = norms(proj)  # [n, in] or None
            buffers = scratch or Scratch()
            for i in range(len(sel)):
                k = int(prune_counts(float(sparsity[i]), w.shape[-1], ()))
                if k <= 0:  # a dense expert (or too few columns to prune one)
                    if src_w is not None:
                        w[i].copy_(src_w[i])
                    continue
                factor = column_factor(tuple(w.shape[1:]), s.metric, None if norm is None else norm[i], w.device)
                t = prune_rows(w[i], factor, k, thresholds.get(proj) if one else None, buffers,
                               None if keep is None else keep[i],
                               None if tables is None else tables(proj, int(sel[i]), factor),
                               None if src_w is None else src_w[i])
                if one:
                    thresholds[proj] = t
            if masks is not None:
                masks[proj] = keep
            changed.append(layer.fused_name(proj))
            continue
        keep = nm_mask(importance_scores(w, s.metric, norms(proj)), *s.nm)
        keep |= torch.as_tensor(sparsity == 0, device=keep.device)[:, None, None]  # dense experts
        w.mul_(keep)
        if masks is not None:
            masks[proj] = keep
        changed.append(layer.fused_name(proj))
    return changed


# Rows per block in `prune_rows`: every temporary of a block (float32 scores, the copy numpy selects
# in, the mask) stays near 256 KB, inside the L2 cache, instead of streaming [out, in] tensors through
# memory once per pass. Measured on a [1024, 2048] bf16 projection at one thread: 41 ms whole, 15 ms
# in blocks of 16-64 rows.
BLOCK_ELEMENTS = 1 << 16


def prune_rows(w: torch.Tensor, factor: torch.Tensor | None, k: int, t: RowThresholds | None,
               scratch: Scratch, keep_out: torch.Tensor | None = None,
               table: TableSlot | None = None, src: torch.Tensor | None = None) -> RowThresholds:
    """Zero, in place, the k lowest-score entries of every row of one expert's projection w [out, in]
    (scores |w| * factor, `moeviz.compression.scores`), a block of rows at a time.

    t: this plan's thresholds for w from an earlier call (then no selection is needed), else None.
    keep_out: optional bool [out, in] that receives the keep-mask. table: the shared threshold-table
    slot of this projection (`moeviz.compression.threshold_table`; CPU only): if it holds k, no
    selection; if it is empty, each block's rows are sorted once and the table is filled (the
    thresholds of k come from the same sort); if k is not in it, selection as without. src: the base
    weights [out, in] to read (then w's contents are not read, only written: no copy beforehand).
    When every threshold is known (t, or k in the table), one fused pass does the work
    (`fused_prune`, numba) instead of the blocked torch ops. Returns the thresholds (O(rows)). The result is the same as
    `mask_from_thresholds(scores, row_thresholds(scores, k))` applied to the whole matrix: every step
    is per row."""
    out_f, n = w.shape
    rows = max(1, BLOCK_ELEMENTS // n)
    rt, g, builder, finite = None, None, None, False
    if table is not None and w.device.type == "cpu":
        tab = table.get()
        finite = tab is not None and tab.finite  # no inf / NaN weight: the fused kernel gives torch's result
        if t is None and tab is None:
            builder = TableBuilder(out_f, n)
            fused_prune.enabled()  # load the kernel in this cold pass (once per process), not in the first new sparsity
        elif t is None:
            g = tab.column(k)
            rt = tab if g is not None else None
    ties = rt is not None and bool(rt.tie[:, g].any())  # once per matrix, not per block
    fused = keep_out is None and 0 < k < n and fused_prune.supports(w, w if src is None else src)
    if fused and finite and (t is not None or rt is not None):
        return prune_known(w, src, factor, k, t, rt, g, ties)
    # Each block's buffers are views of one block-sized buffer per kind (the last block may be shorter).
    full = (min(rows, out_f), n)
    bufs = {key: scratch.get(key, full, dt, w.device) for key, dt in
            (("scores", torch.float32), ("select", torch.float32), ("keep", w.dtype))}
    if fused and builder is not None and k in builder.ks:
        # First use of this projection with k on the grid: sort every block into the table (nothing
        # else per block), then one fused pass from it, as every later plan does.
        for r0 in range(0, out_f, rows):
            base = (w if src is None else src)[r0:r0 + rows]
            _sorted_thresholds(scores_from_factor(base, factor, bufs["scores"][:base.shape[0]]), 0,
                               bufs["select"][:base.shape[0]], builder, r0)
        built = builder.table()
        table.put(built)
        if built.finite:
            g = built.column(k)
            return prune_known(w, src, factor, k, None, built, g, bool(built.tie[:, g].any()))
        builder = None  # an inf / NaN weight: select on the fly below, as without a table
    parts = []
    for r0 in range(0, out_f, rows):
        blk = w[r0:r0 + rows]  # [b, in] view
        base = blk if src is None else src[r0:r0 + rows]
        b = blk.shape[0]
        scores = scores_from_factor(base, factor, bufs["scores"][:b])
        if t is not None:
            tb = _rows_of(t, r0, r0 + b)
        elif rt is not None:
            tb = rt.rows(scores, k, g, r0, ties)
        elif builder is not None:
            tb = _sorted_thresholds(scores, k, bufs["select"][:b], builder, r0)
        else:
            tb = row_thresholds(scores, k, work=bufs["select"][:b])
        parts.append(tb)
        # The mask is made in the float32 scores' own buffer (`mask_in_scores_`), then copied to a 0/1
        # mask in the weights' dtype: the product with it is much faster than with a bool mask on CPU.
        # A comparison writing the bf16 mask directly took 69 us per 64 K block under the fixed mmap
        # threshold of `models.loading` (14-17 us without it: apparently a per-call temporary), in
        # place then a copy 5 + 9 us.
        keep = mask_in_scores_(scores, tb)
        if keep_out is not None:  # the caller wants the bool mask too
            keep_out[r0:r0 + b].copy_(keep)
        if blk.is_floating_point():
            keep = bufs["keep"][:b].copy_(keep)
        else:
            keep = keep.bool()
        torch.mul(base, keep, out=blk)
    if builder is not None:
        table.put(builder.table())
    if t is not None:
        return t
    if k <= 0 or k >= n:
        return RowThresholds(k, n, None, None, None)
    return RowThresholds(k, n, torch.cat([p.v for p in parts]), torch.cat([p.bad for p in parts]),
                         torch.cat([p.need for p in parts]))


def prune_known(w: torch.Tensor, src: torch.Tensor | None, factor: torch.Tensor | None, k: int,
                t: RowThresholds | None, rt, g: int | None, ties: bool,
                keep_thresholds: bool = True, threads: int | None = None) -> RowThresholds | None:
    """`prune_rows` when every row's threshold is known (this plan's `t`, or column g of the shared table
    `rt`) and every weight is finite: one fused pass (`fused_prune`), then the rows with a tie at their
    threshold again, with the tie rule of `masks.mask_in_scores_`. Returns the thresholds (None with
    keep_thresholds=False: the caller reads the table again next time, `lazy.LazyExpertWeights`)."""
    base = w if src is None else src  # [out, in]
    v, bad = (t.v[:, 0], t.bad) if t is not None else (rt.v[:, g], rt.tie[:, g])
    idx = torch.nonzero(bad).flatten() if (bool(bad.any()) if t is not None else ties) else None
    rows = None if idx is None else base[idx].clone()  # [R, in]: before an in-place pass overwrites them
    fused_prune.prune_known_rows(w, base, factor, v, threads)
    tied = None
    if rows is not None:  # rows with ties: the tie rule on those rows only
        w[idx], tied = _tie_rule(rows, v[idx][:, None], factor, k)
    if not keep_thresholds:
        return None
    need = torch.zeros(w.shape[0], dtype=torch.int64)
    if tied is not None:
        need[idx] = tied.need
    return t if t is not None else RowThresholds(k, w.shape[-1], v[:, None].clone(), bad.clone(), need)


def _sorted_thresholds(scores: torch.Tensor, k: int, work: torch.Tensor, builder: TableBuilder,
                       r0: int) -> RowThresholds:
    """Sort a block's scores [b, n] in `work` (numpy's SIMD sort: about one np.partition), add its rows to
    the table being built, and return the block's thresholds for k (as `row_thresholds` would)."""
    b, n = scores.shape
    srt = work.numpy()
    np.copyto(srt, scores.numpy())
    srt.sort(axis=-1)
    builder.add(r0, srt)
    if k <= 0 or k >= n:
        return RowThresholds(k, n, None, None, None)
    v = torch.from_numpy(srt[:, k - 1:k].copy())  # [b, 1] k-th smallest
    bad = torch.from_numpy(srt[:, k] == srt[:, k - 1])  # the (k+1)-th equals it: a tie at the threshold
    need = torch.zeros(b, dtype=torch.int64)
    if bool(bad.any()):
        need[bad] = k - (scores[bad] < v[bad]).sum(dim=-1)
    return RowThresholds(k, n, v, bad, need)


def _rows_of(t: RowThresholds, r0: int, r1: int) -> RowThresholds:
    if t.v is None:
        return t
    return RowThresholds(t.k, t.n, t.v[r0:r1], t.bad[r0:r1], t.need[r0:r1])


def quantize(layer: MoELayer, fused: dict[str, torch.Tensor], sel: np.ndarray, s: LayerSettings) -> list[str]:
    """Round the selected (not removed) experts' weights to their bit grid, one bit width at a time."""
    bits, removed = s.bits[sel], s.removed[sel]
    changed = []
    for b in sorted(set(bits[~removed].tolist()) - {16}):
        idx = torch.as_tensor(np.flatnonzero((bits == b) & ~removed))  # positions within `sel`
        for proj in layer.projections():
            w = layer.view(proj, fused[layer.fused_name(proj)])
            w[idx] = quantize_weight(w[idx], b, s.group_sizes[proj], s.symmetric).dequantized
            changed.append(layer.fused_name(proj))
    return list(dict.fromkeys(changed))


def remove(layer: MoELayer, fused: dict[str, torch.Tensor], sel: np.ndarray, s: LayerSettings) -> list[str]:
    """Zero the selected experts that the plan removes (the router never picks them: see runtime)."""
    removed = s.removed[sel]
    if not removed.any():
        return []
    idx = torch.as_tensor(np.flatnonzero(removed))
    for proj in layer.projections():
        layer.view(proj, fused[layer.fused_name(proj)])[idx] = 0
    return [layer.fused_name(p) for p in layer.projections()]


def compress_experts(layer: MoELayer, base: dict[str, torch.Tensor], sel: np.ndarray, s: LayerSettings,
                     norms: NormsFn, masks: dict[str, torch.Tensor] | None = None,
                     thresholds: dict | None = None,
                     scratch: Scratch | None = None, tables: TableCache | None = None,
                     out: dict[str, torch.Tensor] | None = None, work: Scratch | None = None) -> dict[str, torch.Tensor]:
    """The compressed fused tensors of experts `sel`: prune, quantize, remove on clones of `base`
    (name -> the base's fused tensor, [E_total, ...]). Only tensors the plan touches are returned.
    scratch: reusable buffers (the lazy path); the returned tensors then live in them and are valid
    until the next call with the same scratch. tables: the shared threshold tables to read and fill
    (`moeviz.compression.threshold_table`; None: select on the fly), keyed by `base`'s tensors.
    out: name -> contiguous tensor shaped like the selected experts' part of `base[name]`, to write the
    result into (export fills its layer tensor in place) instead of fresh tensors; not with scratch.
    work: buffers for the materialising paths' row-major rounds of a transposed layer (`_compress_transposed`),
    for a caller that compresses a layer in several calls (export); None: this call's own."""
    idx = torch.as_tensor(sel)
    contiguous = len(sel) and sel[-1] - sel[0] + 1 == len(sel)
    fused, src, done = {}, {}, set()  # done: pruned already (in the stored layout, `_prune_stored`)
    whole = _pruned_whole(layer, s, sel)
    if scratch is None and layer.transposed and whole and base[next(iter(whole))].device.type == "cpu":
        return _compress_transposed(layer, base, sel, s, norms, masks, tables, out, work)
    for name in s.touched_names(layer):
        t = base[name]
        # A slice then a clone copies only the selected experts' rows, not the whole fused tensor.
        part = (t[int(sel[0]):int(sel[-1]) + 1] if contiguous else t.index_select(0, idx.to(t.device))).detach()
        # Transposed storage (GPT-OSS), lazy CPU path: prune a row-major copy (see `_rowmajor_copy`). Only
        # with scratch: the returned tensors are then read by the forward alone, which takes either stride
        # order; materialising paths copy them into [E, in, out] tensors, elementwise from this layout.
        if scratch is not None and layer.transposed and part.device.type == "cpu" and name in whole:
            stored = scratch.get(("stored", name), part.shape, part.dtype, part.device)
            if masks is None and tables is not None and _prune_stored(layer, name, part, stored, base[name], sel, s,
                                                                      norms, tables):
                fused[name] = stored
                done.add(name)
                continue
            fused[name] = _rowmajor_copy(part, scratch.get(("out", name), part.mT.shape, part.dtype, part.device))
            continue
        if out is not None and name in out:
            dst = out[name]
        else:
            dst = torch.empty_like(part) if scratch is None else scratch.get(("out", name), part.shape, part.dtype, part.device)
        if name in whole:  # pruning writes all of it from the base: no copy
            fused[name], src[name] = dst, part
        else:
            fused[name] = dst.copy_(part)
    table_fn = None if tables is None or not fused or next(iter(fused.values())).device.type != "cpu" else \
        (lambda proj, e, factor: slot(base[layer.fused_name(proj)], proj, e, factor, tables))
    # Projections pruned already in the stored layout are left out of `prune`.
    rest = dataclasses.replace(s, projections=tuple(p for p in s.projections if layer.fused_name(p) not in done)) \
        if done else s
    prune(layer, fused, sel, rest, norms, masks, thresholds, scratch, table_fn, src)
    quantize(layer, fused, sel, s)
    remove(layer, fused, sel, s)
    return fused


def _prune_stored(layer: MoELayer, name: str, part: torch.Tensor, dst: torch.Tensor, base: torch.Tensor,
                  sel: np.ndarray, s: LayerSettings, norms: NormsFn, tables: TableCache) -> bool:
    """Prune the transposed fused tensor `name` of experts `sel` (part [n, in, out] -> dst, same layout) in
    one fused pass per expert, without a row-major copy: every pruned projection's thresholds come from
    the shared tables (k on the grid, all scores finite; rows tied at the threshold are redone with the
    tie rule afterwards) and the projections of the tensor share one column factor (gate and up read the
    same input statistic); each stored column
    is one output row of one projection (gate / up interleaved or in halves, `layer.view`), so the
    thresholds are laid out per stored column, -inf for a projection the plan leaves dense. Returns False,
    having written nothing that will be used, where any of that does not hold (the caller then prunes
    a row-major copy)."""
    if not fused_prune.supports(dst, part):
        return False
    projs = [p for p in layer.projections() if layer.fused_name(p) == name]
    stats = {p: norms(p) for p in projs if p in s.projections}
    tied = []  # (projection, table, column) of this expert with rows tied at the threshold
    for i, e in enumerate(sel):
        k = int(prune_counts(float(s.sparsity[e]), layer.view(projs[0], part).shape[-1], ()))
        if k <= 0:  # a dense expert
            dst[i].copy_(part[i])
            continue
        v = torch.full((1, 1, part.shape[-1]), float("-inf"))  # [1, 1, out] thresholds per stored column
        factor = None
        for p, norm in stats.items():
            w = layer.view(p, part)  # [n, out_p, in]
            f = column_factor(tuple(w.shape[1:]), s.metric, None if norm is None else norm[i], w.device)
            if factor is not None and not torch.equal(f, factor):
                return False
            factor = f
            tab = slot(base, p, int(e), f, tables).get()
            g = None if tab is None or not tab.finite else tab.column(k)
            if g is None:
                return False
            layer.view(p, v)[0, :, 0] = tab.v[:, g]  # projection p's rows are these stored columns
            if bool(tab.tie[:, g].any()):
                tied.append((p, tab, g))
        fused_prune.prune_known_columns(dst[i], part[i], factor, v[0, 0])
        for p, tab, g in tied:  # rows with a tie at the threshold: the tie rule, on those rows only
            idx = torch.nonzero(tab.tie[:, g]).flatten()
            rows = layer.view(p, part)[i][idx]  # [R, in] (a copy)
            layer.view(p, dst)[i][idx], _ = _tie_rule(rows, tab.v[idx, g:g + 1], factor, k)
        tied.clear()
    return True


def _tie_rule(rows: torch.Tensor, v: torch.Tensor, factor: torch.Tensor | None, k: int
              ) -> tuple[torch.Tensor, RowThresholds]:
    """Rows [R, in] tied at their threshold v [R, 1], pruned with the tie rule (`_tied_rows`): the pruned
    rows and their thresholds."""
    scores = scores_from_factor(rows, factor)  # [R, in] float32
    tied = _tied_rows(v, scores, k)
    return rows * mask_in_scores_(scores, tied).to(rows.dtype), tied


def _tied_rows(v: torch.Tensor, scores: torch.Tensor, k: int) -> RowThresholds:
    """RowThresholds of rows tied at their threshold v [R, 1], from their scores [R, in]: each prunes the
    entries below v and its first `need` entries equal to v (`masks.row_thresholds`' rule)."""
    return RowThresholds(k, scores.shape[-1], v, torch.ones(len(v), dtype=torch.bool), k - (scores < v).sum(dim=-1))


def _rowmajor_copy(part: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """`part` [n, in, out] (transposed storage: GPT-OSS) copied into `buf` [n, out, in] (contiguous), returned
    as the [n, in, out] view `buf.mT`: same values and shape, but each projection's row (one output) is
    contiguous, so `prune_rows` reads and writes whole cache lines. In the stored layout a row is strided
    (2I elements apart for the interleaved gate/up): measured on a [2880, 2880] bf16 projection at one
    thread, the blocked scores copy + product took 108 ms on the strided view, 7 ms on row-contiguous rows.
    The copy goes in strips of STRIP stored rows ([STRIP, out] contiguous -> a [out, STRIP] column strip of
    buf): measured for one expert's [2880, 5760] gate_up 20 ms, against 36 ms for torch's whole 2-D
    transposed copy and 69 ms for a strided copy of one projection; [2880, 2880] down 7 ms against 18 ms.
    The forward uses the result as is (`x @ w` takes either stride order)."""
    for j in range(part.shape[0]):
        p, b = part[j], buf[j]  # [in, out] stored, [out, in] row-major
        for c in range(0, p.shape[0], STRIP):
            b[:, c:c + STRIP].copy_(p[c:c + STRIP].mT)
    return buf.mT


STRIP = 64


def _stored_copy(t: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """`t` [n, in, out] written into the contiguous `dst` of the same shape. If `t` is a `_rowmajor_copy`
    result (the view `buf.mT` of a row-major [n, out, in] buffer) this is `_rowmajor_copy` in reverse: STRIP
    rows of buf at a time ([STRIP, in] contiguous -> an [in, STRIP] column strip of dst), so the copy's inner
    loop writes STRIP contiguous elements from STRIP cache lines that the next ones reuse. Measured at one
    thread (shared machine): one expert's [2880, 5760] gate_up 28-47 ms, [2880, 2880] down 12-16 ms, against
    165 / 80 ms for strips of dst's rows ([STRIP, out]: each inner loop then reads one element from each of
    `out` cache lines) and 200-250 / 90-110 ms for torch's whole transposed copy into fresh pages. Else a
    plain copy."""
    if not t.mT.is_contiguous():
        return dst.copy_(t)
    buf = t.mT
    for j in range(buf.shape[0]):
        b, d = buf[j], dst[j]  # [out, in] row-major, [in, out] stored
        for r in range(0, b.shape[0], STRIP):
            d[:, r:r + STRIP].copy_(b[r:r + STRIP].mT)
    return dst


# Base-weight bytes of the experts that `_compress_transposed` compresses per row-major round: the extra
# memory of a materialised transposed layer is this (plus one expert when an expert is larger), not O(layer).
ROWMAJOR_CHUNK_BYTES = 16 * 2**20


def _compress_transposed(layer: MoELayer, base: dict[str, torch.Tensor], sel: np.ndarray, s: LayerSettings,
                         norms: NormsFn, masks: dict[str, torch.Tensor] | None, tables: TableCache | None,
                         out: dict[str, torch.Tensor] | None, work: Scratch | None) -> dict[str, torch.Tensor]:
    """`compress_experts` of a transposed-storage layer (GPT-OSS, CPU) for the materialising paths (apply,
    export): a few experts at a time through the lazy path's row-major scratch (`_rowmajor_copy`:
    row-contiguous pruning), each round written back into the [n, in, out] result (`_stored_copy`). Every
    step is per expert, so the values and masks equal one strided call's."""
    names = s.touched_names(layer)
    result = {n: out[n] if out is not None and n in out else
              torch.empty((len(sel),) + tuple(base[n].shape[1:]), dtype=base[n].dtype, device=base[n].device)
              for n in names}
    per_expert = sum(base[n][0].numel() * base[n].element_size() for n in names)
    step = max(1, ROWMAJOR_CHUNK_BYTES // max(1, per_expert))
    if masks is not None:  # as one call's `prune`: every pruned projection, all True for dense experts
        for proj in s.projections:
            if proj in layer.projections():
                shape = layer.view(proj, base[layer.fused_name(proj)][:1]).shape[1:]  # [out, in]
                masks[proj] = torch.ones((len(sel),) + tuple(shape), dtype=torch.bool, device=base[names[0]].device)
    # Not the thread's scratch: the caller may hold lazy results in it, and a round may be larger.
    scratch = work or Scratch()
    for i0 in range(0, len(sel), step):
        i1 = min(i0 + step, len(sel))
        got = None if masks is None else {}
        part = compress_experts(layer, base, sel[i0:i1], s, _rows_norms(norms, i0, i1), got,
                                scratch=scratch, tables=tables)
        for n, t in part.items():
            _stored_copy(t, result[n][i0:i1])
        for proj, keep in (got or {}).items():  # [i1 - i0, out, in]; none from a round of dense experts
            masks[proj][i0:i1] = keep
    return result


def _rows_norms(norms: NormsFn, i0: int, i1: int) -> NormsFn:
    """NormsFn of the experts at positions i0:i1 of `norms`' selection."""
    def sub(proj: str):
        full = norms(proj)  # [n, in] or None
        return None if full is None else full[i0:i1]
    return sub


def _pruned_whole(layer: MoELayer, s: LayerSettings, sel: np.ndarray) -> set[str]:
    """Fused tensors whose every projection the unstructured path of `prune` writes for experts `sel`."""
    if s.nm is not None or not (s.sparsity[sel] > 0).any():
        return set()
    names = {layer.fused_name(p) for p in s.projections if p in layer.projections()}
    return {n for n in names if all(p in s.projections for p in layer.projections() if layer.fused_name(p) == n)}


def layer_norms(stats_layer, metric: str, sel: np.ndarray, device) -> NormsFn:
    """NormsFn over experts `sel` from one layer's CalibrationStats (None for magnitude)."""
    def norms(proj: str):
        if metric == "magnitude":
            return None
        full = getattr(stats_layer, NORMS[(metric, proj)])  # [E, in]
        return full[torch.as_tensor(sel)].to(device)
    return norms
