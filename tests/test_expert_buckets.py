"""Expert matmuls on CPU run on row counts rounded up to shape buckets (`experts.padded_rows`), so that a
new plan's token counts per expert meet kernels oneDNN already built: the padding must never change a
real row's result, and the buckets must stay few and tight."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_tiny_model

from moeviz.models import experts as X
from moeviz.models.layers import find_moe_layers


def test_buckets_cover_every_count_tightly_and_are_few():
    seen = set()
    for n in range(1, 70_000):
        m = X.padded_rows(n)
        assert n <= m <= n + max(15, n // 8), (n, m)  # at most 12.5 % more rows (15 below 128)
        assert X.padded_rows(m) == m  # a bucket is its own bucket
        seen.add(m)
    for k in range(7, 16):  # per octave [2^k, 2^(k+1)): 8 buckets
        assert len([m for m in seen if 2**k < m <= 2 ** (k + 1)]) == 8


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])  # [E, out, in] and transposed storage with biases
def test_padded_expert_output_equals_the_unpadded_rows(family, monkeypatch):
    torch.manual_seed(0)
    model = build_tiny_model(family).to(torch.bfloat16)
    experts = find_moe_layers(model)[0].experts
    x = torch.randn(37, model.config.hidden_size, dtype=torch.bfloat16)  # 37 tokens: padded to 48
    rows = []
    real_linear, real_matmul = torch.nn.functional.linear, torch.Tensor.__matmul__
    monkeypatch.setattr(torch.nn.functional, "linear", lambda a, w, *b: rows.append(a.shape[0]) or real_linear(a, w, *b))
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, w: rows.append(a.shape[0]) or real_matmul(a, w))
    h, y = X.expert_output(experts, 1, x)
    assert rows == [X.padded_rows(37)] * 2 == [48, 48]  # both projections ran on the bucket
    monkeypatch.setattr(X, "_bucketed", lambda t: t)  # the same expert without padding
    h_ref, y_ref = X.expert_output(experts, 1, x)
    assert h.shape == h_ref.shape and y.shape == y_ref.shape == x.shape
    # rows of a matmul are independent: the same bits (bf16, oneDNN)
    assert torch.equal(h, h_ref) and torch.equal(y, y_ref)


def test_float32_and_bucket_sized_inputs_are_not_copied():
    x32 = torch.randn(37, 8)
    assert X._bucketed(x32) is x32
    x = torch.randn(48, 8, dtype=torch.bfloat16)
    assert X._bucketed(x) is x
    p = X._bucketed(x[:37])
    assert p.shape == (48, 8) and torch.equal(p[:37], x[:37]) and not p[37:].any()
