"""moeviz.compression.resolve: the one resolver, and everything that shows a plan agreeing with `apply`."""

import re

import pytest
import torch

from moeviz.compression.apply import Compressor
from moeviz.compression.plan import CompressionPlan, Override, PruningSettings, QuantSettings
from moeviz.compression.preview import plan_storage
from moeviz.compression.resolve import resolve_plan
from moeviz.compression.table import expert_table
from moeviz.figures import expert_label, moe_layer_dot

PLANS = {
    "unstructured": CompressionPlan(
        pruning=PruningSettings(metric="magnitude", sparsity=0.5), quant=QuantSettings(bits=8, group_size=-1),
        overrides=[Override(layer=1, sparsity=0.25), Override(layer=1, expert=2, sparsity=0.75, bits=4),
                   Override(layer=0, expert=0, sparsity=0.0, bits=16)],
        removed_experts=[(0, 3), (1, 1)]),
    # N:M: an override > 0 means N/M, 0 keeps the expert dense; a removed expert reports 0
    "n:m": CompressionPlan(
        pruning=PruningSettings(metric="magnitude", structure="2:4"),
        overrides=[Override(layer=0, expert=1, sparsity=0.3), Override(layer=1, expert=2, sparsity=0.0, bits=4)],
        removed_experts=[(1, 0)]),
}


def _labels(dot: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in re.finditer(r'^\s*(e\d+) \[label="([^"]*)"', dot, flags=re.M)}


@pytest.mark.parametrize("name", sorted(PLANS))
def test_architecture_figure_table_and_apply_agree(name, loaded_tiny):
    lm = loaded_tiny("mixtral")
    plan = PLANS[name]
    resolved = resolve_plan(plan, lm.layers, None)
    cm = Compressor(lm, None).apply(plan)
    applied = cm.expert_table()
    table = expert_table(plan, lm.layers, None)
    for layer in lm.layers:
        i = layer.index
        planned = resolved.experts(i)
        done = [dict(layer=d["layer"], expert=d["expert"], sparsity=d["sparsity"], bits=d["bits"], removed=d["removed"])
                for d in applied if d["layer"] == i]
        assert planned == done
        assert [(r["sparsity"], r["bits"], r["remove"]) for r in table if r["layer"] == i] == \
               [(round(d["sparsity"], 4), d["bits"], d["removed"]) for d in planned]
        info = lm.info.layers[i]
        drawn = _labels(moe_layer_dot(info, planned, plan.to_dict()))
        assert drawn == _labels(moe_layer_dot(info, applied, plan.to_dict()))
        nm = None if plan.pruning.structure == "unstructured" else plan.pruning.structure
        assert drawn == {f"e{d['expert']}": expert_label(d["expert"], d["sparsity"], d["bits"], d["removed"],
                                                         structure=nm if d["sparsity"] > 0 else None)
                         for d in planned}
        # ... and what the figure says is what the weights are (brute force on the compressed tensors)
        for d in planned:
            e = d["expert"]
            for proj in layer.projections():
                w0, w = layer.weight(proj)[e], cm.layers[i].weight(proj)[e]
                zeros = float((w == 0).float().mean())
                if d["removed"]:
                    assert zeros == 1.0
                    continue
                if d["bits"] == 16:
                    assert torch.equal(w[w != 0], w0[w != 0])  # pruned only: kept weights untouched
                else:
                    # per-row RTN, one group per row: at most 2^bits levels in each row
                    assert max(len(torch.unique(row)) for row in w) <= 2 ** d["bits"]
                if d["bits"] == 16:
                    assert zeros == pytest.approx(d["sparsity"], abs=1 / w.shape[-1])
    # The preview prices the same resolution as apply
    assert plan_storage(Compressor(lm, None), plan).summary() == cm.storage.summary()


def test_resolution_rules(loaded_tiny):
    lm = loaded_tiny("mixtral")
    r = resolve_plan(PLANS["n:m"], lm.layers, None)
    assert r.sparsity[0, 1] == 0.5 and r.sparsity[1, 2] == 0.0 and r.sparsity[1, 0] == 0.0 and r.removed[1, 0]
    assert not r.second_order and not r.needs_stats
    r = resolve_plan(PLANS["unstructured"], lm.layers, None)
    assert r.sparsity[0, 0] == 0.0 and r.bits[0, 0] == 16  # a per-expert override beats the global setting
    assert r.sparsity[1, 3] == 0.25 and r.sparsity[1, 2] == 0.75 and r.bits[1, 2] == 4  # layer, then expert
    gptq_undone = CompressionPlan(quant=QuantSettings(bits=4, method="gptq"),
                                  overrides=[Override(layer=l.index, bits=16) for l in lm.layers])
    assert gptq_undone.second_order() and not resolve_plan(gptq_undone, lm.layers, None).second_order
    wanda = CompressionPlan(pruning=PruningSettings(metric="wanda", sparsity=0.3))
    assert resolve_plan(wanda, lm.layers, None).needs_stats
