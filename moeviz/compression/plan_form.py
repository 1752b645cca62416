"""A plan as the flat settings of a form (the Compress page's controls), and back: which settings count.

`form_values(plan, ...)` gives one value per control; `plan_from_form(values, plan, removed)` builds the plan they
describe. The rule between them: a setting of a method the plan does not use (GPTQ's options on 16-bit weights,
the Hessian settings without SparseGPT / GPTQ) is kept at its default, so the same compression is one plan (one
stored run) and a hidden GPTQ choice never turns a 16-bit plan into a second-order job.
"""

from __future__ import annotations

from moeviz.compression.plan import CompressionPlan, PruningSettings, QuantSettings

FORM_STRUCTURES = ("unstructured", "2:4", "4:8")  # the structures the form offers
FORM_GROUP_SIZES = (32, 64, 128, -1)  # -1: one group per row
_DEFAULT = CompressionPlan()


def form_values(plan: CompressionPlan, n_layers: int, max_remove: int) -> dict:
    """One value per control, read from `plan` (a setting the form cannot show falls back to its first choice /
    128; n_remove: removed experts per layer, at most `max_remove`)."""
    p, q = plan.pruning, plan.quant
    return dict(
        metric=p.metric, sparsity=float(p.sparsity),
        structure=p.structure if p.structure in FORM_STRUCTURES else "unstructured",
        allocation=p.allocation, bits=q.bits, group=q.group_size if q.group_size in FORM_GROUP_SIZES else 128,
        symmetric=q.symmetric, act_bits=plan.activation_bits,
        router_sparsity=float(plan.router_sparsity), router_bits=plan.router_bits,
        n_remove=min(max_remove, len(plan.removed_experts) // max(n_layers, 1)), sequential=plan.sequential,
        quant_method=q.method, hessian=plan.hessian, act_order=plan.act_order,
        blocksize=int(plan.obs_blocksize), percdamp=float(plan.percdamp), refit=plan.refit)


def methods_in_use(values: dict, plan: CompressionPlan) -> tuple[bool, bool, bool]:
    """(quantized, uses GPTQ, uses SparseGPT) for these form values (the plan's overrides may quantize too)."""
    quantized = int(values["bits"]) < 16 or any(o.bits not in (None, 16) for o in plan.overrides)
    return quantized, quantized and values["quant_method"] == "gptq", values["metric"] == "sparsegpt"


def plan_from_form(values: dict, plan: CompressionPlan, removed) -> CompressionPlan:
    """The plan the form's `values` describe: `plan`'s projections, allocation bounds, overrides and name kept,
    `removed` the removed experts; settings of a method not in use at their defaults (see the module doc)."""
    v = values
    quantized, uses_gptq, uses_sparsegpt = methods_in_use(v, plan)
    second_order = uses_sparsegpt or uses_gptq
    return CompressionPlan(
        pruning=PruningSettings(metric=v["metric"], sparsity=round(float(v["sparsity"]), 4), structure=v["structure"],
                                allocation=v["allocation"], projections=plan.pruning.projections,
                                allocation_bounds=plan.pruning.allocation_bounds),
        quant=QuantSettings(bits=int(v["bits"]), group_size=int(v["group"]), symmetric=bool(v["symmetric"]),
                            method=v["quant_method"] if quantized else QuantSettings().method),
        hessian=v["hessian"] if second_order else _DEFAULT.hessian,
        act_order=bool(v["act_order"]) if uses_gptq else _DEFAULT.act_order,
        obs_blocksize=int(v["blocksize"]) if second_order else _DEFAULT.obs_blocksize,
        percdamp=round(float(v["percdamp"]), 6) if second_order else _DEFAULT.percdamp,
        refit=bool(v["refit"]) if uses_sparsegpt else _DEFAULT.refit,
        overrides=plan.overrides, removed_experts=[tuple(x) for x in removed],
        router_sparsity=round(float(v["router_sparsity"]), 4), router_bits=int(v["router_bits"]),
        activation_bits=int(v["act_bits"]), sequential=bool(v["sequential"]), name=plan.name,
    )
