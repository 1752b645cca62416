"""moeviz.compression.plan_form (the Compress page's controls as flat values, and the plan they describe) and
runview.second_order_settings (what the pages show of a SparseGPT / GPTQ plan)."""

import pytest

from moeviz.compression.plan import CompressionPlan, PruningSettings, QuantSettings
from moeviz.compression.plan_form import form_values, methods_in_use, plan_from_form

PLANS = [
    CompressionPlan(),
    CompressionPlan(pruning=PruningSettings(metric="wanda", sparsity=0.5, structure="2:4"),
                    removed_experts=[(0, 1), (1, 2)], router_bits=8, activation_bits=8, sequential=True),
    CompressionPlan(pruning=PruningSettings(metric="sparsegpt", sparsity=0.6), percdamp=0.05, obs_blocksize=32,
                    refit=True),
    CompressionPlan(quant=QuantSettings(bits=4, group_size=64, method="gptq"), act_order=True, name="mine"),
]


@pytest.mark.parametrize("plan", PLANS, ids=range(len(PLANS)))
def test_a_plan_the_form_can_show_comes_back_unchanged(plan):
    values = form_values(plan, n_layers=2, max_remove=3)
    assert plan_from_form(values, plan, plan.removed_experts).to_dict() == plan.to_dict()


def test_settings_of_a_method_not_in_use_stay_at_their_defaults():
    """A GPTQ choice left in the form of a 16-bit plan never makes it a second-order job (nor another run)."""
    plan = CompressionPlan(pruning=PruningSettings(metric="magnitude", sparsity=0.5))
    values = {**form_values(plan, 2, 3), "quant_method": "gptq", "act_order": True, "percdamp": 0.2,
              "blocksize": 16, "refit": True}
    assert methods_in_use(values, plan) == (False, False, False)
    assert plan_from_form(values, plan, []).to_dict() == plan.to_dict()
    quantized = plan_from_form({**values, "bits": 4}, plan, [])  # now GPTQ acts: its settings count
    assert quantized.quant.method == "gptq" and quantized.act_order and quantized.percdamp == 0.2
    assert not quantized.refit  # SparseGPT's alone


def test_second_order_settings_name_only_the_settings_that_act():
    from moeviz.runview import second_order_label, second_order_settings

    assert second_order_settings(CompressionPlan()) is None and second_order_label(CompressionPlan().to_json()) == ""
    gptq = CompressionPlan(quant=QuantSettings(bits=4, method="gptq"), act_order=True, refit=True, percdamp=0.05)
    assert second_order_settings(gptq)["methods"] == ["GPTQ"]
    assert second_order_label(gptq.to_json()) == "router-weighted · block 128 · damp 0.05 · act-order"  # no refit
    both = CompressionPlan(pruning=PruningSettings(metric="sparsegpt", sparsity=0.5), quant=gptq.quant, refit=True)
    assert second_order_settings(both)["methods"] == ["SparseGPT", "GPTQ"]
    assert second_order_label(both.to_json()).endswith("refit") and second_order_label("{not json") == ""
