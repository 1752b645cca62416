"""A fast quality proxy for the app's live feedback: each MoE layer's gate-weighted reconstruction error.

For expert e and projection p with weight W [out, in] and compressed weight Ŵ, the calibration pass
recorded, per input column j, the gate-weighted second moment m[e, j] = Σ_t g_t² x_tj² over the tokens t
routed to e (`input_sq_weighted` for gate / up, whose input is the hidden state; `down_sq_weighted` for
down, whose input is the expert's intermediate activation in the base model). Experts that apply g to
their input (Llama 4) receive g_t·x_t, so there g_t is already in x_t and m[e, j] = Σ_t x_tj² (weight 1,
see `moeviz.calibration.stats`). Ignoring the cross terms between input columns (the diagonal
approximation Wanda and MoE-Pruner make),

    Σ_t g_t² ‖(W − Ŵ) x_t‖²  ≈  Σ_{r, j} (W − Ŵ)[r, j]² · m[e, j]

is the squared error the compression adds to the expert's contribution to the layer output. The layer's
proxy is that error summed over experts and projections, relative to the same sum with Ŵ = 0 (the whole
gate-weighted output energy): 0 = unchanged, 1 = as large as the output itself. A removed expert counts
its whole output (re-routing, which the proxy does not see, recovers part of it). No forward pass: one
pass over the weights, milliseconds on the demo model. It ranks plans; it does not predict perplexity.
"""

from __future__ import annotations

import torch


def layer_errors(base_layers, compressed_layers, stats) -> list[float]:
    """[L] relative gate-weighted reconstruction error per MoE layer (see the module docstring).

    base_layers / compressed_layers: `MoELayer`s of the base model and of a materialised compressed
    copy (weights [E, out, in] via `weight(p)`); stats: the `CalibrationStats` of the base model."""
    from moeviz.models.offload import module_weights

    out = []
    for lb, lc, st in zip(base_layers, compressed_layers, stats.layers):
        err = total = 0.0
        for p in lb.projections():
            moments = (st.down_sq_weighted if p == "down" else st.input_sq_weighted).double()  # [E, in]
            with module_weights(lb.experts), module_weights(lc.experts):  # offloaded: real values, this layer only
                w = lb.weight(p).detach().double().cpu()  # [E, out, in]
                dw = w - lc.weight(p).detach().double().cpu()
            # Σ over output rows first: [E, in], then weighted by each input column's moment.
            err += float((dw.pow(2).sum(1) * moments).sum())
            total += float((w.pow(2).sum(1) * moments).sum())
        out.append(err / total if total > 0 else 0.0)
    return out


def weighted_mean(errors: list[float]) -> float:
    """The model-level proxy: the plain mean over layers (every layer's output feeds the next)."""
    return sum(errors) / len(errors) if errors else 0.0


__all__ = ["layer_errors", "weighted_mean"]
