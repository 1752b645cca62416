"""Layouts and expert counts read from the tensors, never from a family name: Llama 4 stores its experts
transposed ([E, H, 2I] / [E, I, H]) and Inkling's router also scores its shared expert (E + 1 rows)."""

import pytest
import torch

from family_configs import build_tiny
from moeviz.compression.masks import row_ranks
from moeviz.compression.scores import importance_scores
from moeviz.models import describe_model


@pytest.fixture(scope="module")
def llama4():
    model = build_tiny("llama4_text")
    return model, describe_model(model)


def test_llama4_views_read_the_transposed_layout(llama4):
    _, layers = llama4
    layer = layers[0]
    I, H = layer.intermediate_size, layer.hidden_size
    gu, dp = layer.experts.gate_up_proj, layer.experts.down_proj  # [E, H, 2I], [E, I, H]
    assert layer.transposed and not layer.interleaved and gu.shape[1] == H
    assert layer.weight("gate").shape == (layer.num_experts, I, H) and layer.weight("down").shape == (layer.num_experts, H, I)
    e, o, i = 1, 2, 3
    assert layer.weight("gate")[e, o, i] == gu[e, i, o] and layer.weight("up")[e, o, i] == gu[e, i, I + o]
    assert layer.weight("down")[e, o, i] == dp[e, i, o]


def test_llama4_magnitude_ranks_run_along_each_output_row(llama4):
    """Pruning ranks weights within each output row [out, in] of the view, i.e. over the hidden size for
    gate/up, whatever the storage: the smallest |w| of a row of gate_up_proj[e, :, o] ranks first."""
    _, layers = llama4
    gate = layers[0].weight("gate")  # [E, I, H]
    ranks = row_ranks(importance_scores(gate, "magnitude"))
    stored_column = layers[0].experts.gate_up_proj[0, :, 0].abs()  # expert 0, output unit 0, over H inputs
    assert ranks[0, 0].argmin() == stored_column.argmin()


def test_llama4_routing_is_verified_as_sigmoid_of_top_k(llama4):
    _, layers = llama4
    assert all(l.adapter.supports_rerouting and l.distribution == "sigmoid" and l.adapter.dense for l in layers)


def test_inkling_counts_experts_from_the_experts_tensor():
    model = build_tiny("inkling_text")
    layers = describe_model(model)
    layer = layers[0]
    assert layer.num_experts == layer.experts.down_proj.shape[0] == 8
    # The router also scores the shared experts: more rows than routed experts.
    assert layer.router_weight.shape[0] == 8 + model.config.n_shared_experts > 8
    assert layer.distribution == "selected" and not layer.adapter.supports_rerouting  # its rule is not a known one
