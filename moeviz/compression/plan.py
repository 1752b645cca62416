"""`CompressionPlan`: a thin, JSON-serialisable description of one compression configuration.

The plan says *what* to do; `moeviz.compression.apply` does it with the pure tensor functions of
this package. Settings resolve from general to specific:

    global defaults (pruning, quantization)  ->  per-layer overrides  ->  per-(layer, expert) overrides

N:M structure follows the convention "N of every M consecutive input weights of a row are zeroed"
("2:4" and "4:8" both prune 50 %). Allocation presets apply to unstructured pruning only.

Second-order methods (`pruning.metric` "sparsegpt", `quant.method` "gptq") use the top-level settings
`hessian`, `obs_blocksize`, `percdamp`, `act_order`, `refit` (moeviz.compression.second_order,
docs/QUALITY.md); plans stored before they existed load with their defaults.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Sequence

from moeviz.registry import METRICS, method_label, nm_of, parse_nm
from moeviz.errors import PlanError

QUANT_METHODS = ("rtn", "gptq")
HESSIANS = ("router_weighted", "plain")
ALLOCATIONS = ("uniform", "utilization")
SUPPORTED_BITS = (2, 3, 4, 8, 16)
PROJECTIONS = ("gate", "up", "down")
REMOVAL_SCORES = ("frequency", "reap")


@dataclass
class PruningSettings:
    metric: str = "moe_pruner"
    sparsity: float = 0.0  # global target, parameter-weighted over the pruned expert weights
    structure: str = "unstructured"  # "unstructured" or "N:M", e.g. "2:4", "4:8"
    projections: list[str] = field(default_factory=lambda: list(PROJECTIONS))
    allocation: str = "uniform"  # how the global target is spread over experts
    allocation_bounds: tuple[float, float] = (0.0, 0.9)  # per-expert range for "utilization"


@dataclass
class QuantSettings:
    bits: int = 16  # 16 = not quantized
    group_size: int = 128  # input columns per scale; -1 = one group per row
    symmetric: bool = True
    method: str = "rtn"  # "rtn" (round to nearest) or "gptq" (second order, sequential; see second_order.py)


@dataclass
class Override:
    """Per-layer (expert=None) or per-expert settings; None fields inherit."""

    layer: int
    expert: int | None = None
    sparsity: float | None = None
    bits: int | None = None


@dataclass
class CompressionPlan:
    pruning: PruningSettings = field(default_factory=PruningSettings)
    quant: QuantSettings = field(default_factory=QuantSettings)
    overrides: list[Override] = field(default_factory=list)
    removed_experts: list[tuple[int, int]] = field(default_factory=list)  # (layer, expert)
    router_sparsity: float = 0.0  # magnitude pruning within the router weight, per expert row
    router_bits: int = 16
    activation_bits: int = 16  # per-token fake quantization of the experts' inputs
    sequential: bool = False  # re-calibrate layer by layer on the already-compressed layers
    # Second-order methods (pruning.metric "sparsegpt", quant.method "gptq"; moeviz.compression.second_order):
    hessian: str = "router_weighted"  # per-expert H = Σ g² x xᵀ over its routed tokens; "plain": Σ x xᵀ
    obs_blocksize: int = 128  # columns per lazy-update block
    percdamp: float = 0.01  # damping, fraction of the mean Hessian diagonal
    act_order: bool = False  # GPTQ: quantize columns in order of decreasing Hessian diagonal (not with SparseGPT N:M)
    refit: bool = False  # SparseGPT without GPTQ: re-solve the kept weights exactly for the final mask
    name: str = ""

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        d = asdict(self)
        d["removed_experts"] = [list(x) for x in self.removed_experts]
        d["pruning"]["allocation_bounds"] = list(self.pruning.allocation_bounds)
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict) -> "CompressionPlan":
        if not isinstance(d, dict):  # e.g. a JSON list: dict() of it raises a cryptic TypeError
            raise PlanError(f"plan: expected a JSON object {{\"pruning\": …, \"quant\": …}}, got a {_json_type(d)}")
        d = dict(d)
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise PlanError(f"plan: unknown field(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        for name, kind in (("pruning", dict), ("quant", dict), ("overrides", list), ("removed_experts", list)):
            if d.get(name) is not None and not isinstance(d[name], kind):
                what = "object" if kind is dict else "list"
                raise PlanError(f"plan: {name} must be a JSON {what}, got a {_json_type(d[name])}")
        try:
            pruning = dict(d.pop("pruning", {}) or {})
            if "allocation_bounds" in pruning:
                pruning["allocation_bounds"] = tuple(pruning["allocation_bounds"])
            plan = cls(
                pruning=_settings(PruningSettings, pruning, "pruning"),
                quant=_settings(QuantSettings, d.pop("quant", {}) or {}, "quant"),
                overrides=[_override(o, i) for i, o in enumerate(d.pop("overrides", None) or [])],
                removed_experts=[_pair(x) for x in d.pop("removed_experts", None) or []],
                **d,
            )
        except TypeError as e:  # a missing or unknown field of a nested setting, or a non-object override
            raise PlanError(f"plan: {e}") from e
        return plan

    @classmethod
    def from_json(cls, text: str) -> "CompressionPlan":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise PlanError(f"plan is not valid JSON: {e.msg} (line {e.lineno})") from e

    # ------------------------------------------------------------------ structure helpers
    def nm(self) -> tuple[int, int] | None:
        """(N, M) for N:M structure, None for unstructured."""
        return nm_of(self.pruning.structure)

    def uses_second_order(self, prunes: bool, quantizes: bool) -> bool:
        """The one rule for "second order": SparseGPT prunes some expert, or GPTQ quantizes one below 16 bits
        (then experts are compressed layer by layer with Hessians, materialised, from calibration samples).
        `second_order()` applies it to the plan alone, `ResolvedPlan.second_order` to the resolved experts."""
        return (self.pruning.metric == "sparsegpt" and prunes) or (self.quant.method == "gptq" and quantizes)

    def second_order(self) -> bool:
        """`uses_second_order` from the plan alone, before resolving, so conservative: it may be True where the
        resolved plan compresses nothing that way (overrides undoing every expert, e.g. a 4-bit GPTQ plan whose
        every layer is overridden to 16 bits, or every pruned expert removed), never the reverse. False when
        those settings compress nothing (e.g. "sparsegpt" at sparsity 0): the usual path then runs."""
        return self.uses_second_order(self.may_prune(), self.may_quantize())

    def may_prune(self) -> bool:
        """Some expert may be pruned: N:M, a global sparsity > 0 or an override > 0."""
        p = self.pruning
        return p.structure != "unstructured" or p.sparsity > 0 or any((o.sparsity or 0) > 0 for o in self.overrides)

    def may_quantize(self) -> bool:
        """Some expert may be quantized: fewer than 16 bits globally or in an override."""
        return self.quant.bits < 16 or any(o.bits is not None and o.bits < 16 for o in self.overrides)

    def prunes_with_sparsegpt(self) -> bool:
        return self.uses_second_order(prunes=self.may_prune(), quantizes=False)

    def quantizes_with_gptq(self) -> bool:
        return self.uses_second_order(prunes=False, quantizes=self.may_quantize())

    def is_identity(self) -> bool:
        return (
            self.pruning.sparsity == 0 and self.nm() is None and self.quant.bits == 16
            and not any(o.sparsity or (o.bits not in (None, 16)) for o in self.overrides)
            and not self.removed_experts and self.router_sparsity == 0 and self.router_bits == 16
            and self.activation_bits == 16
        )

    # ------------------------------------------------------------------ validation
    def validate(self, num_experts: Sequence[int] | None = None, top_k: Sequence[int] | None = None) -> "CompressionPlan":
        """Raise PlanError naming the field and the reason; with the model's per-layer expert counts
        and top-k, also check layer / expert indices and expert removal."""
        p, q = self.pruning, self.quant
        check_ratio(p.sparsity, "pruning.sparsity")
        if p.metric not in METRICS:
            raise PlanError(f"pruning.metric: unknown metric {p.metric!r}; choose one of {', '.join(METRICS)}")
        if p.structure != "unstructured":
            parse_nm(p.structure, "pruning.structure")
        if p.allocation not in ALLOCATIONS:
            raise PlanError(f"pruning.allocation: unknown preset {p.allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
        lo, hi = p.allocation_bounds
        if not 0 <= lo <= hi < 1:
            raise PlanError(f"pruning.allocation_bounds: need 0 <= low <= high < 1, got ({lo}, {hi})")
        bad = [x for x in p.projections if x not in PROJECTIONS]
        if bad or not p.projections:
            raise PlanError(f"pruning.projections: {bad or 'empty'}; choose among {', '.join(PROJECTIONS)}")
        check_bits(q.bits, "quant.bits")
        if not (q.group_size == -1 or (isinstance(q.group_size, int) and q.group_size > 0)):
            raise PlanError(f"quant.group_size: must be a positive integer or -1 (whole row), got {q.group_size!r}")
        if q.method not in QUANT_METHODS:
            raise PlanError(f"quant.method: unknown method {q.method!r}; choose one of {', '.join(QUANT_METHODS)}")
        if self.hessian not in HESSIANS:
            raise PlanError(f"hessian: unknown Hessian {self.hessian!r}; choose one of {', '.join(HESSIANS)}")
        if not _is_int(self.obs_blocksize) or self.obs_blocksize < 1:
            raise PlanError(f"obs_blocksize: must be a positive integer, got {self.obs_blocksize!r}")
        if p.metric == "sparsegpt" and self.nm() is not None and self.obs_blocksize % self.nm()[1]:
            # SparseGPT decides each N:M group inside one block (obs.sparsegpt_prune)
            raise PlanError(f"obs_blocksize: {self.obs_blocksize} must be a multiple of M = {self.nm()[1]} of "
                            f"pruning.structure {p.structure!r} (an N:M group may not span two blocks)")
        if isinstance(self.percdamp, bool) or not isinstance(self.percdamp, (int, float)) or not 0 < self.percdamp <= 1:
            raise PlanError(f"percdamp: {self.percdamp!r} is outside (0, 1]; it is the damping as a fraction of "
                            "the mean Hessian diagonal")
        for flag in ("act_order", "refit"):
            if not isinstance(getattr(self, flag), bool):
                raise PlanError(f"{flag}: must be true or false, got {getattr(self, flag)!r}")
        if self.refit and self.quantizes_with_gptq():
            raise PlanError("refit: cannot be combined with quant.method 'gptq' (re-solving the kept weights by least "
                            "squares would move them off GPTQ's grid); turn refit off, or quantize with 'rtn' "
                            "(refit, then round to nearest)")
        if self.act_order and self.quantizes_with_gptq() and p.metric == "sparsegpt" and self.nm() is not None:
            raise PlanError(f"act_order: cannot be combined with SparseGPT {p.structure} pruning (its N:M groups are "
                            "consecutive columns, chosen in column order); turn act_order off, or keep a fixed N:M "
                            "mask from magnitude / wanda / moe_pruner, which GPTQ then quantizes in act-order")
        check_ratio(self.router_sparsity, "router_sparsity")
        check_bits(self.router_bits, "router_bits")
        check_bits(self.activation_bits, "activation_bits")
        n_layers = len(num_experts) if num_experts is not None else None
        for i, o in enumerate(self.overrides):
            where = f"overrides[{i}] (layer {o.layer}" + (f", expert {o.expert})" if o.expert is not None else ")")
            if o.sparsity is not None:
                check_ratio(o.sparsity, f"{where}.sparsity")
            if o.bits is not None:
                check_bits(o.bits, f"{where}.bits")
            if n_layers is not None:
                _check_index(o.layer, o.expert, num_experts, where)
        if num_experts is not None:
            removed_per_layer: dict[int, set[int]] = {}
            for layer, expert in self.removed_experts:
                _check_index(layer, expert, num_experts, f"removed_experts ({layer}, {expert})")
                removed_per_layer.setdefault(layer, set()).add(expert)
            for layer, experts in removed_per_layer.items():
                left = num_experts[layer] - len(experts)
                if left == 0:
                    raise PlanError(f"removed_experts: every expert of layer {layer} would be removed; keep at least {top_k[layer] if top_k else 1}")
                if top_k is not None and left < top_k[layer]:
                    raise PlanError(
                        f"removed_experts: layer {layer} would keep {left} experts, fewer than its top-k of "
                        f"{top_k[layer]}; remove at most {num_experts[layer] - top_k[layer]}"
                    )
        return self


def _json_type(value) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _settings(cls, values: dict, name: str):
    """A settings dataclass from a JSON object, naming any unknown field (not a TypeError)."""
    unknown = set(values) - set(cls.__dataclass_fields__)
    if unknown:
        raise PlanError(f"plan: {name} has unknown field(s) {', '.join(sorted(unknown))}; "
                        f"known: {', '.join(cls.__dataclass_fields__)}")
    return cls(**values)


def _override(o, i: int) -> Override:
    if not isinstance(o, dict):
        raise PlanError(f"plan: overrides[{i}] must be an object {{\"layer\": …, \"expert\": …}}, "
                        f"got a {_json_type(o)}")
    o = _settings(Override, o, f"overrides[{i}]")
    if not _is_int(o.layer) or not (o.expert is None or _is_int(o.expert)):
        raise PlanError(f"plan: overrides[{i}]: layer and expert must be integers, got {o.layer!r}, {o.expert!r}")
    return o


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _pair(x) -> tuple[int, int]:
    """One removed expert, [layer, expert]."""
    if not isinstance(x, (list, tuple)) or len(x) != 2 or not all(map(_is_int, x)):
        raise PlanError(f"plan: removed_experts entries are [layer, expert] integer pairs, got {x!r}")
    return int(x[0]), int(x[1])


def check_ratio(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise PlanError(f"{name}: {value!r} is outside [0, 1); a ratio is the fraction of weights to zero")
    return float(value)


def check_bits(value, name: str) -> int:
    if isinstance(value, bool) or value not in SUPPORTED_BITS:
        raise PlanError(f"{name}: {value!r} bits is not supported; choose one of {', '.join(map(str, SUPPORTED_BITS))}")
    return int(value)


def _check_index(layer, expert, num_experts, where: str) -> None:
    if not 0 <= layer < len(num_experts):
        raise PlanError(f"{where}: layer {layer} does not exist; the model has {len(num_experts)} MoE layers")
    if expert is not None and not 0 <= expert < num_experts[layer]:
        raise PlanError(f"{where}: expert {expert} does not exist; layer {layer} has {num_experts[layer]} experts")


def plan_key(plan: "CompressionPlan | dict") -> str:
    """A plan's identity: canonical JSON (sorted keys) without its free-text name. Fields a stored plan
    predates count with their defaults (the same plan, the same key); a dict that is not a readable plan
    is compared as given. The run store finds duplicate runs by it, the Compressor caches second-order
    results by it (with the calibration windows), the app tells a stale result by it."""
    d = plan.to_dict() if isinstance(plan, CompressionPlan) else plan or {}
    try:
        d = CompressionPlan.from_dict(d).to_dict()
    except Exception:  # noqa: BLE001 - not a readable plan: compared as given
        pass
    return json.dumps({k: v for k, v in d.items() if k != "name"}, sort_keys=True, allow_nan=False)


def method_name(plan: dict) -> str:
    """The method a run is coloured, labelled and filtered by: the pruning metric, plus "+ gptq" when its
    weights were quantized by GPTQ (an RTN and a GPTQ run of one metric are different methods)."""
    name = str(plan.get("pruning", {}).get("metric", "runs"))
    quant = plan.get("quant", {})
    quantized = int(quant.get("bits", 16)) < 16 or any(
        (o.get("bits") or 16) < 16 for o in plan.get("overrides", []) if isinstance(o, dict))
    return f"{name} + gptq" if quant.get("method") == "gptq" and quantized else name


def plan_summary(plan: CompressionPlan) -> str:
    """A plan in one line, as a person reads it: "50 % MoE-Pruner |W|·‖X·gate‖ pruning, 4-bit, 2 experts removed",
    or "compresses nothing"."""
    p, parts = plan.pruning, []
    if p.structure != "unstructured":
        parts.append(f"{p.structure} {method_label(p.metric)} pruning")
    elif p.sparsity > 0:
        parts.append(f"{p.sparsity:.0%} {method_label(p.metric)} pruning")
    if plan.quant.bits < 16:
        parts.append(f"{plan.quant.bits}-bit")
    if plan.overrides:
        parts.append(f"{len(plan.overrides)} per-layer / per-expert settings")
    if plan.removed_experts:
        parts.append(f"{len(plan.removed_experts)} expert{'s' * (len(plan.removed_experts) != 1)} removed")
    if plan.router_sparsity > 0 or plan.router_bits < 16:
        parts.append("router compressed")
    return ", ".join(parts) or "compresses nothing"
