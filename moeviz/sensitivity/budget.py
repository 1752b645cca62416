"""Fit per-expert settings to a budget: choose each expert's (sparsity, bits) from the sensitivity grid
so that the summed predicted Δ loss is smallest while the budget holds. A multiple-choice knapsack:

* every expert is one group; its options are the dense setting (Δ = 0) and each grid setting, with
  its predicted Δ loss (the measured sensitivity, or a proxy) and its cost;
* negative measured Δ (noise) count as 0, and ties go to the less compressed option;
* costs are linear in the choice, so every budget is  Σ cost ≤ limit:
  - ``experts_bytes`` / ``experts_ratio`` / ``model_bytes`` / ``model_ratio``: stored bytes of each expert
    from `moeviz.compression.formats.storage_for`, exactly as the storage report counts them (the
    model variants subtract the router and everything else, which the plan leaves dense);
  - ``mean_sparsity``: parameter-weighted mean sparsity ≥ target, i.e. kept weights ≤ (1 − target)·P
    (kept weights counted per row, as the masks prune them); options restricted to bits 16;
  - ``mean_bits``: parameter-weighted mean bit width ≤ target (16 = unquantized); options restricted
    to sparsity 0.
* Solver: exact dynamic programming over the cost when the costs, divided by their greatest common
  divisor, leave at most `DP_MAX_CELLS` table cells; otherwise Lagrangian relaxation over the lower
  convex hull of each expert's (cost, Δ) options — every expert starts at its cheapest hull option and
  the hull steps with the best Δ saved per unit of cost are taken while they fit, skipping those that
  do not (so what is left of the budget is smaller than any step still open).

With the ``all`` options and a sensitivity that measured removal, removing the expert (0 bytes, its
tokens re-routed) is one more option; at most E − top-k experts of a layer are removed (a layer with more
loses the removal option of its most harmful removal, and the knapsack is solved again).

The result is an ordinary `CompressionPlan` with one per-expert override per compressed expert and the
removed experts in ``removed_experts``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import reduce

import numpy as np

from moeviz.compression.apply import Compressor
from moeviz.compression.resolve import group_size_for
from moeviz.compression.formats import storage_for
from moeviz.compression.plan import CompressionPlan, Override, PruningSettings, QuantSettings
from moeviz.errors import SettingsError
from moeviz.figures.units import format_bytes
from moeviz.sensitivity.measure import ExpertSensitivity

REMOVED = (1.0, 0)  # the option "remove the expert" in a settings list (0 bytes, nothing kept)
OPTIMISER_TARGETS = ("any", "hf-dense", "vllm")  # what a fitted plan must export to (optimise_plan's target)
VLLM_BITS = (4, 8, 16)  # widths vLLM's compressed-tensors MoE path serves (16 = unquantized)
BUDGET_KINDS = ("experts_bytes", "experts_ratio", "model_bytes", "model_ratio", "mean_sparsity", "mean_bits")
DP_MAX_CELLS = 4_000_000


@dataclass
class Budget:
    kind: str  # one of BUDGET_KINDS
    value: float
    options: str | None = None  # "all", "sparsity" (bits 16 only), "bits" (sparsity 0 only); None = the kind's default

    def validate(self) -> "Budget":
        if self.kind not in BUDGET_KINDS:
            raise SettingsError(f"budget: unknown kind {self.kind!r}; choose one of {', '.join(BUDGET_KINDS)}")
        v = self.value
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise SettingsError(f"budget: {self.kind} must be a number, got {v!r}")
        if self.kind == "mean_sparsity" and not 0 <= v < 1:
            raise SettingsError(f"budget: mean_sparsity must be in [0, 1), got {v}")
        if self.kind == "mean_bits" and not 2 <= v <= 16:
            raise SettingsError(f"budget: mean_bits must be in [2, 16], got {v}")
        if self.kind.endswith("ratio") and v < 1:
            raise SettingsError(f"budget: {self.kind} must be at least 1 (1 = uncompressed), got {v}")
        if self.kind.endswith("bytes") and v <= 0:
            raise SettingsError(f"budget: {self.kind} must be positive, got {v}")
        if self.option_set() not in ("all", "sparsity", "bits"):
            raise SettingsError(f"budget: options {self.options!r}; choose all, sparsity or bits")
        return self

    def option_set(self) -> str:
        if self.options is not None:
            return self.options
        return {"mean_sparsity": "sparsity", "mean_bits": "bits"}.get(self.kind, "all")

    def label(self) -> str:
        v = self.value
        return {"experts_bytes": f"{format_bytes(v)} experts", "model_bytes": f"{format_bytes(v)} model",
                "experts_ratio": f"{v:.2f}× experts", "model_ratio": f"{v:.2f}× model",
                "mean_sparsity": f"{v:.0%} sparsity", "mean_bits": f"{v:g} bits"}[self.kind]


@dataclass
class Solution:
    choice: np.ndarray  # [n] option index per group
    value: float  # Σ values of the chosen options
    cost: float  # Σ costs
    exact: bool  # True: dynamic programming (optimal); False: Lagrangian + greedy fill


@dataclass
class BudgetResult:
    plan: CompressionPlan
    budget: dict
    settings: list[tuple[float, int]]  # option k = settings[k]; settings[0] is dense (0.0, 16)
    choice: list[list[int]]  # [L][E] option index
    predicted_delta: float  # Σ predicted Δ loss of the chosen options
    experts_bytes: int
    experts_base_bytes: int
    mean_sparsity: float
    mean_bits: float
    exact: bool
    seconds: float
    limit: float = 0.0  # the budget as a cost limit (bytes, kept weights or bit·weights)
    cost: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def experts_ratio(self) -> float:
        return self.experts_base_bytes / max(self.experts_bytes, 1)


# ---------------------------------------------------------------------------- the knapsack

def solve_mckp(values, costs, limit: float, exact: bool | None = None) -> Solution:
    """Minimise Σ values[i, choice_i] subject to Σ costs[i, choice_i] ≤ limit.

    values, costs: [n, O] (NaN / inf value = option unavailable). exact=None: dynamic programming when
    the integer costs make a table of at most DP_MAX_CELLS cells, else Lagrangian; True forces DP
    (integer costs needed), False forces Lagrangian. Raises SettingsError when even the cheapest
    options exceed the limit."""
    values = np.asarray(values, dtype=np.float64)
    costs = np.asarray(costs, dtype=np.float64)
    ok = np.isfinite(values) & np.isfinite(costs)
    cheapest = np.where(ok, costs, np.inf).min(axis=1).sum()
    if cheapest > limit + 1e-9 * max(abs(limit), 1):
        raise SettingsError(f"budget: infeasible; even the most compressed settings need {cheapest:.6g} "
                            f"(budget {limit:.6g})")
    integral = bool(np.all(costs[ok] == np.round(costs[ok])))
    if exact is None or exact:
        if integral:
            g = reduce(math.gcd, [int(c) for c in costs[ok].ravel()], 0) or 1
            base = np.where(ok, costs, np.inf).min(axis=1)  # cost above each group's cheapest
            span = int((limit - base.sum()) // g)
            if exact or (values.shape[0] * (span + 1) <= DP_MAX_CELLS):
                return _dp(values, costs, ok, limit, g, base, span)
        elif exact:
            raise SettingsError("budget: exact solving needs integer costs")
    return _lagrangian(values, costs, ok, limit)


def _dp(values, costs, ok, limit, g, base, span) -> Solution:
    n, O = values.shape
    span = max(span, 0)
    # Costs relative to each group's cheapest option, in units of g: the table only spans the slack.
    rel = np.where(ok, np.round((costs - base[:, None]) / g), -1).astype(np.int64)
    best = np.zeros(span + 1)  # best[c]: smallest Σ value with Σ extra cost ≤ c (groups so far)
    pick = np.zeros((n, span + 1), dtype=np.int16)
    for i in range(n):
        new = np.full(span + 1, np.inf)
        for o in range(O):
            r = rel[i, o]
            if r < 0 or r > span:
                continue
            cand = np.full(span + 1, np.inf)
            cand[r:] = best[: span + 1 - r] + values[i, o]
            better = cand < new
            new[better] = cand[better]
            pick[i, better] = o
        best = new
    choice = np.zeros(n, dtype=np.int64)
    c = span
    for i in range(n - 1, -1, -1):
        o = int(pick[i, c])
        choice[i] = o
        c -= int(rel[i, o])
    idx = np.arange(n)
    return Solution(choice, float(values[idx, choice].sum()), float(costs[idx, choice].sum()), True)


def _hull(cost: np.ndarray, value: np.ndarray, ok: np.ndarray) -> list[int]:
    """Option indices on the lower convex hull of (cost, value), cost ascending, value strictly
    descending (dominated options dropped)."""
    idx = [int(i) for i in np.flatnonzero(ok)]
    idx.sort(key=lambda i: (cost[i], value[i]))
    pareto = []
    for i in idx:
        if pareto and cost[i] == cost[pareto[-1]]:
            continue  # same cost, not cheaper in value (sorted by value)
        if not pareto or value[i] < value[pareto[-1]]:
            pareto.append(i)
    hull: list[int] = []
    for i in pareto:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is above the segment a -> i: drop it
            if (value[b] - value[a]) * (cost[i] - cost[a]) >= (value[i] - value[a]) * (cost[b] - cost[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def _lagrangian(values, costs, ok, limit) -> Solution:
    n = values.shape[0]
    hulls = [_hull(costs[i], values[i], ok[i]) for i in range(n)]
    pos = [0] * n
    total = sum(costs[i, h[0]] for i, h in enumerate(hulls))
    # Every hull step: (Δ saved per unit of cost, group, step). Steps of one group have decreasing
    # efficiency (convexity), so taking them in global order of efficiency keeps each group's order.
    steps = []
    for i, h in enumerate(hulls):
        for k in range(1, len(h)):
            dc = costs[i, h[k]] - costs[i, h[k - 1]]
            dv = values[i, h[k - 1]] - values[i, h[k]]
            steps.append((-dv / dc, i, k))
    steps.sort()
    blocked = set()
    for _, i, k in steps:
        if i in blocked or pos[i] != k - 1:
            continue
        dc = costs[i, hulls[i][k]] - costs[i, hulls[i][k - 1]]
        if total + dc <= limit:
            total += dc
            pos[i] = k
        else:
            blocked.add(i)  # later steps of this group are even less efficient; keep filling with others
    choice = np.array([h[p] for h, p in zip(hulls, pos)], dtype=np.int64)
    idx = np.arange(n)
    return Solution(choice, float(values[idx, choice].sum()), float(costs[idx, choice].sum()), False)


# ---------------------------------------------------------------------------- experts -> plan

def option_table(loaded, sens: ExpertSensitivity, option_set: str = "all"):
    """(settings, allowed [S+1], bytes [L, E, S+1], kept [L, E, S+1], bitweights [L, E, S+1], params [L, E]).
    Option 0 is dense; option k ≥ 1 is sens.settings[k - 1]."""
    settings = [(0.0, 16)] + list(sens.settings)
    with_removal = option_set == "all" and sens.removal is not None
    allowed = np.array([option_set == "all" or (option_set == "sparsity" and b == 16)
                        or (option_set == "bits" and s == 0.0) for s, b in settings] + [with_removal])
    settings.append(REMOVED)
    allowed[0] = True
    gs = sens.grid["group_size"]
    sym = sens.grid["symmetric"]
    L = len(loaded.layers)
    Emax = max(l.num_experts for l in loaded.layers)
    K = len(settings)
    nbytes = np.full((L, Emax, K), np.nan)
    kept = np.full((L, Emax, K), np.nan)
    bitw = np.full((L, Emax, K), np.nan)
    params = np.zeros((L, Emax))
    for layer in loaded.layers:
        dtype_bytes = layer.weight("down").element_size()
        for k, (s, b) in enumerate(settings):
            if (s, b) == REMOVED:  # a removed expert stores nothing and keeps nothing
                nbytes[layer.index, : layer.num_experts, k] = 0
                kept[layer.index, : layer.num_experts, k] = 0
                bitw[layer.index, : layer.num_experts, k] = 0
                continue
            tb = tk = 0
            for proj in layer.projections():
                shape = tuple(layer.weight(proj).shape[1:])
                st = storage_for(shape, dtype_bytes=dtype_bytes, sparsity=s,
                                 structure="unstructured" if s > 0 else None, bits=b,
                                 group_size=group_size_for(gs, shape[-1], proj, layer, b), symmetric=sym)
                tb += st.bytes
                tk += st.nonzero
            nbytes[layer.index, : layer.num_experts, k] = tb
            kept[layer.index, : layer.num_experts, k] = tk
            params[layer.index, : layer.num_experts] = layer.expert_param_count()
            bitw[layer.index, : layer.num_experts, k] = b * layer.expert_param_count()
    return settings, allowed, nbytes, kept, bitw, params


def _exportable(solve, ok, values, costs, limit, where, rm, spare, settings, target):
    """The best solution whose removal count is the same in every MoE layer (a checkpoint has one expert count)
    and, for "vllm", whose experts of a layer share one bit width.

    Removal: for each count r, every layer removes exactly its r experts whose removal Δ is smallest (and no
    other); the r with the smallest summed Δ that fits wins. Bits ("vllm"): each layer's one width is chosen by a
    Lagrangian relaxation over layers, then the knapsack is solved again with each expert restricted to its
    layer's width (its sparsity still free); see `_one_width_per_layer`."""
    layers = sorted(spare)
    by_layer = {l: np.flatnonzero(where[:, 0] == l) for l in layers}
    has_removal = bool(ok[:, rm].any())
    best, errors = None, []
    for r in range(0, (min(spare.values()) if has_removal else 0) + 1):
        mask = ok.copy()
        mask[:, rm] = False
        for l in layers:
            idx = by_layer[l]
            removable = [i for i in idx if ok[i, rm]]
            if len(removable) < r:
                mask = None
                break
            for i in sorted(removable, key=lambda i: values[i, rm])[:r]:  # forced: removed, nothing else
                mask[i, :] = False
                mask[i, rm] = True
        if mask is None:
            continue
        try:
            if target != "vllm":
                sol = solve(mask)
            else:
                sol = solve(_one_width_per_layer(mask, values, costs, by_layer, rm, settings, limit))
        except SettingsError as e:
            errors.append(str(e))
            continue
        total = float(np.where(np.isfinite(values[np.arange(len(sol.choice)), sol.choice]),
                               values[np.arange(len(sol.choice)), sol.choice], 0).sum())
        if best is None or total < best[0]:
            best = (total, sol)
    if best is None:
        why = errors[0] if errors else "no option fits"
        raise SettingsError(f"{why}; with target {target!r} (" + ("one bit width per layer among 4, 8, 16 and "
                            if target == "vllm" else "") + "the same removal count in every layer); relax the budget "
                            "or fit with target 'any' (the plan may then not export)")
    return best[1]


def _one_width_per_layer(mask, values, costs, by_layer, rm, settings, limit):
    """`mask` restricted so every kept expert of a layer uses one bit width, the widths chosen by Lagrangian
    relaxation over layers: for a price λ per unit of cost each expert takes its best option of each width,
    each layer the width whose sum of (Δ + λ·cost) is smallest; the smallest λ (bisection) whose choice fits
    the limit decides. The caller then solves the knapsack again inside these widths (sparsity still free)."""
    bits = np.array([b for _, b in settings[:-1]] + [-1])
    v = np.where(np.isfinite(values), values, np.inf)
    cst = np.where(np.isfinite(costs), costs, np.inf)
    forced = mask[:, rm] & (mask.sum(1) == 1)  # removed experts: no width
    widths = sorted({int(b) for b in bits[:rm][mask[~forced, :rm].any(0)]}) if (~forced).any() else []

    def choose(lam):
        pick, total = {}, 0.0
        for layer, idx in by_layer.items():
            idx = idx[~forced[idx]]
            best = None
            for w in widths:
                sel = mask[idx, :rm] & (bits[:rm] == w)
                if not sel.any(1).all():
                    continue
                score = np.where(sel, v[idx, :rm] + lam * cst[idx, :rm], np.inf)
                j = score.argmin(1)
                obj, c = float(score[np.arange(len(idx)), j].sum()), float(cst[idx, j].sum())
                if best is None or obj < best[0]:
                    best = (obj, w, c)
            if best is not None:
                pick[layer] = best[1]
                total += best[2]
        return pick, total

    lo, hi = 0.0, 1e-12
    pick, total = choose(lo)
    if total > limit:
        for _ in range(200):  # grow the price until the choice fits
            pick, total = choose(hi)
            if total <= limit:
                break
            lo, hi = hi, hi * 4
        for _ in range(60):
            mid = (lo + hi) / 2
            p, t = choose(mid)
            if t <= limit:
                hi, pick = mid, p
            else:
                lo = mid
    mask = mask.copy()
    for layer, idx in by_layer.items():
        if layer in pick:
            for i in idx:
                if not forced[i]:
                    mask[i, :rm] &= bits[:rm] == pick[layer]
    return mask


def optimise_plan(loaded, sens: ExpertSensitivity, budget: Budget, kind: str = "measured",
                  exact: bool | None = None, name: str | None = None, target: str = "hf-dense") -> BudgetResult:
    """The plan with the smallest summed predicted Δ loss (`kind`: "measured" or a proxy name) within
    `budget`; see the module docstring.

    target: what the plan must be exportable to (`moeviz.deployability`). "any": no constraint (per-expert
    bits, any removal; the plan may not export). "hf-dense" (default): the same number of removed experts in
    every MoE layer, so a checkpoint can hold it. "vllm": that, and one bit width per layer among those vLLM
    serves (4, 8 or unquantized; symmetric), so it exports as compressed-tensors and vLLM serves it."""
    start = time.perf_counter()
    budget.validate()
    if target not in OPTIMISER_TARGETS:
        raise SettingsError(f"budget: unknown target {target!r}; choose one of {', '.join(OPTIMISER_TARGETS)}")
    if target == "vllm" and not sens.grid["symmetric"]:
        raise SettingsError("budget: target vllm needs a symmetric quantization grid (vLLM's MoE kernels are "
                            "checked for symmetric weights only); measure the sensitivity with symmetric settings")
    settings, allowed, nbytes, kept, bitw, params = option_table(loaded, sens, budget.option_set())
    if target == "vllm":  # only widths vLLM serves
        allowed &= np.array([b in VLLM_BITS for _, b in settings[:-1]] + [bool(allowed[-1])])
    L, Emax, K = nbytes.shape
    removal = sens.removal if sens.removal is not None else np.full((L, Emax), np.nan)
    delta = np.concatenate([np.zeros((L, Emax, 1)), sens.values(kind), removal[..., None]], axis=2)
    real = np.zeros((L, Emax), dtype=bool)
    for layer in loaded.layers:
        real[layer.index, : layer.num_experts] = True
    base = Compressor(loaded).apply(CompressionPlan()).storage
    exp_base = base.experts_base_bytes
    fixed = base.router_bytes + base.other_bytes
    v = budget.value
    if budget.kind == "experts_bytes":
        cost, limit = nbytes, float(v)
    elif budget.kind == "experts_ratio":
        cost, limit = nbytes, exp_base / v
    elif budget.kind == "model_bytes":
        cost, limit = nbytes, float(v) - fixed
    elif budget.kind == "model_ratio":
        cost, limit = nbytes, (exp_base + fixed) / v - fixed
    elif budget.kind == "mean_sparsity":
        cost, limit = kept, (1 - v) * params[real].sum()
    else:  # mean_bits
        cost, limit = bitw, v * params[real].sum()
    limit = math.floor(limit + 1e-9)
    # A measured Δ below zero (compression that happened to lower the calibration loss) is noise, not a
    # gain to chase: it counts as 0. Among options of equal Δ the less compressed one wins (a tie-break of
    # 1e-9 per expert), so the plan uses the budget instead of compressing past it for nothing.
    c = cost[real]
    predicted = np.maximum(delta[real], 0.0)  # [n, K]; NaN = option not measured (removal unsupported)
    values = predicted + 1e-9 * (c[:, :1] - c) / c[:, :1]
    ok = allowed[None, :] & np.isfinite(values)
    costs = np.where(ok, c, np.nan)
    where = np.argwhere(real)  # [n, 2] (layer, expert) of each group
    rm = len(settings) - 1
    spare = {layer.index: layer.num_experts - layer.top_k for layer in loaded.layers}

    def solve(ok):
        ok, costs_ok = ok.copy(), np.where(ok, c, np.nan)
        while True:
            sol = solve_mckp(np.where(ok, values, np.nan), costs_ok, limit, exact=exact)
            # Removal is limited per layer (keep at least top-k experts): the knapsack does not know that, so in a
            # layer with too many removals the removal of the expert it hurts most is ruled out, then solve again.
            over = False
            for layer, n_spare in spare.items():
                idx = [i for i in np.flatnonzero(sol.choice == rm) if where[i][0] == layer]
                if len(idx) > n_spare:
                    worst = max(idx, key=lambda i: values[i, rm])
                    ok[worst, rm] = False
                    costs_ok[worst, rm] = np.nan
                    over = True
            if not over:
                return sol

    if target == "any":
        sol = solve(ok)
    else:
        sol = _exportable(solve, ok, values, c, limit, where, rm, spare, settings, target)
    sol.value = float(predicted[np.arange(len(sol.choice)), sol.choice].sum())
    choice = np.zeros((L, Emax), dtype=np.int64)
    choice[real] = sol.choice
    overrides, removed = [], []
    for layer in loaded.layers:
        for e in range(layer.num_experts):
            k = int(choice[layer.index, e])
            if k == rm:
                removed.append((layer.index, e))
            elif k:
                s, b = settings[k]
                overrides.append(Override(layer=layer.index, expert=e, sparsity=float(s) if s else None,
                                          bits=int(b) if b != 16 else None))
    plan = CompressionPlan(
        pruning=PruningSettings(metric=sens.grid["metric"], sparsity=0.0),
        quant=QuantSettings(bits=16, group_size=sens.grid["group_size"], symmetric=sens.grid["symmetric"]),
        overrides=overrides, removed_experts=removed, name=name or f"optimised @ {budget.label()}",
    )
    idx_b = np.take_along_axis(nbytes, choice[..., None], 2)[..., 0][real]
    idx_k = np.take_along_axis(kept, choice[..., None], 2)[..., 0][real]
    idx_w = np.take_along_axis(bitw, choice[..., None], 2)[..., 0][real]
    P = params[real].sum()
    return BudgetResult(
        plan=plan, budget=dict(kind=budget.kind, value=budget.value, options=budget.option_set()),
        settings=settings, choice=choice.tolist(), predicted_delta=sol.value,
        experts_bytes=int(idx_b.sum()), experts_base_bytes=int(exp_base),
        mean_sparsity=float(1 - idx_k.sum() / P), mean_bits=float(idx_w.sum() / P),
        exact=sol.exact, seconds=time.perf_counter() - start, limit=float(limit), cost=sol.cost,
    )
