"""One streaming calibration pass: route the calibration tokens through the model once and
accumulate `CalibrationStats`. No activation is stored, so memory does not grow with the number
of tokens (except the per-token routing record, capped at `record_tokens`).

How: on a structural copy of the model (the base is never touched), each router gets a forward hook
that keeps its logits, and each experts module's runtime (`moeviz.models.runtime`) gets two
observers: one sees the routing the experts receive, one each expert's inputs and intermediate
activations while the reference computation runs (no extra matmul): a layer observer that gets each
call's rows grouped by expert once, so every statistic is a segment reduction (and, with nothing else
to alter per expert, the experts run grouped as the family's own forward does: no loop over
experts). A compressed copy's provider and activation quantization stay in place, so the statistics
are those of the compressed model.

Router-weighted statistics weight each routed token by the factor g its expert's output is multiplied
by (g² for squared norms). Experts called by dense dispatch (Llama 4) receive g·x as their input and
their output enters the residual unscaled, so there g is already in x, h and y and the weight is 1
(the weighted norms equal the plain ones, both Σ (g·x)²; `_gate_weight`).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from moeviz.calibration.stats import CalibrationStats, LayerStats
from moeviz.data import TokenSamples
from moeviz.models.experts import GroupedActivations, experts_forward, gate_on_input
from moeviz.models.layers import MoELayer, find_moe_layers
from moeviz.models.loading import LoadedModel
from moeviz.models.runtime import install_experts_runtime
from moeviz.models.routing import full_distribution, selected_distribution
from moeviz.models.views import structural_copy

ProgressFn = Callable[[int, int], None]


def _gate_weight(gate: torch.Tensor, gate_on_input: bool) -> torch.Tensor:
    """[n] factor each routed token's expert output is multiplied by in the layer output: g, or 1 for
    experts that apply g to their input (Llama 4: x, h and y already contain it). Squared for the
    weighted norms, as is for the gate-weighted output norm."""
    g = gate.detach().float()
    return torch.ones_like(g) if gate_on_input else g


def weight_rule_settings(layers: list[MoELayer]) -> dict:
    """Settings entry (part of the statistics' fingerprint) naming the weight-1 rule of `_gate_weight` for
    models whose experts apply g to their input: statistics calibrated before that rule (g counted twice)
    are then neither loaded from the cache nor matched by stored runs. Empty for every other model, whose
    fingerprints do not change."""
    return {"gate_weight": "on_input"} if any(not l.calls_with_routing for l in layers) else {}


def _squared(t: torch.Tensor) -> torch.Tensor:
    """t² in float32, a new tensor (t itself is never written)."""
    if t.dtype == torch.float32:
        return t.detach().square()
    return t.detach().float().square_()  # the float copy is ours: square it in place


def _segment_sum(src: torch.Tensor, rows: torch.Tensor, starts: torch.Tensor,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """[E, D]: for each expert e, Σ weights[i] · src[rows[i]] over its segment i in [starts[e], starts[e+1])
    (src [N, D] float32, rows [S], starts [E], weights [S] or None = 1). One embedding-bag call: a
    segment reduction that reads the rows where they are (no [S, D] gather)."""
    return torch.nn.functional.embedding_bag(rows, src, starts, mode="sum", per_sample_weights=weights)


class _LayerCollector:
    """Accumulators for one MoE layer (float64 on the model's device, so sums stay exact enough
    for brute-force comparison)."""

    def __init__(self, layer: MoELayer, n_domains: int, bins: int, record_cap: int, device):
        E, H, I, k = layer.num_experts, layer.hidden_size, layer.intermediate_size, layer.top_k
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        self.layer, self.bins, self.record_cap = layer, bins, record_cap
        self.kind = layer.distribution
        self.gate_on_input = gate_on_input(layer.experts)  # dense dispatch: g already in the expert's input
        self.routed, self.top1, self.prob_sum, self.gate_sum, self.gate_out = z(E), z(E), z(E), z(E), z(E)
        self.in_sq, self.in_sq_w, self.down_sq, self.down_sq_w = z(E, H), z(E, H), z(E, I), z(E, I)
        self.coact, self.domain, self.hist = z(E, E), z(n_domains, E), z(E, bins)
        self.rec_topk: list[torch.Tensor] = []
        self.rec_probs: list[torch.Tensor] = []
        self.n_recorded = 0
        self.logits: torch.Tensor | None = None
        self.token_domain: torch.Tensor | None = None  # [T] set before each batch

    # -- router hook: remember this batch's logits [T, E]
    def router_hook(self, module, args, output):
        if self.kind != "selected":  # a verified rule: the logits [.., E] are at the adapter's logits slot
            self.logits = output[self.layer.adapter.logits_slot].detach().reshape(-1, self.layer.num_experts)

    # -- routing observer of the experts runtime: what the experts receive
    def see_routing(self, hidden_states, top_k_index, top_k_weights):
        E = self.layer.num_experts
        if self.kind == "selected":  # unknown rule: only the chosen experts' weights are known
            probs = selected_distribution(top_k_index, top_k_weights, E)
        else:
            probs = full_distribution(self.logits, self.kind)  # [T, E], rows sum to 1
        self.prob_sum += probs.sum(0)
        # Histogram: bin b of expert e counts tokens with b/B <= p < (b+1)/B; flat index e*B + b.
        b = (probs * self.bins).long().clamp_(max=self.bins - 1)
        flat = (torch.arange(E, device=b.device) * self.bins + b).reshape(-1)
        self.hist.view(-1).add_(torch.bincount(flat, minlength=E * self.bins))

        # Counts per batch in float32 are exact (integers < 2^24 whatever the summation order), then
        # added to the float64 totals once.
        valid = top_k_index < E  # some routers mark empty slots with an out-of-range id
        onehot = torch.zeros(probs.shape, dtype=torch.float32, device=probs.device)  # [T, E]
        onehot.scatter_add_(1, top_k_index.clamp(max=E - 1), valid.float())
        self.routed += onehot.sum(0)
        top1 = top_k_index.gather(1, top_k_weights.argmax(dim=1, keepdim=True)).squeeze(1)
        self.top1 += torch.bincount(top1, minlength=E)[:E]
        self.coact += onehot.T @ onehot
        self.domain += torch.zeros_like(self.domain, dtype=torch.float32).index_add_(
            0, self.token_domain.to(onehot.device), onehot)

        room = self.record_cap - self.n_recorded
        if room > 0:
            self.rec_topk.append(top_k_index[:room].detach().cpu())
            self.rec_probs.append(probs[:room].detach().float().cpu())
            self.n_recorded += min(room, top_k_index.shape[0])

    def experts_forward(self, hidden_states, top_k_index, top_k_weights):
        """Both observers around the reference computation (for callers without a runtime)."""
        self.see_routing(hidden_states, top_k_index, top_k_weights)
        return experts_forward(self.layer.experts, hidden_states, top_k_index, top_k_weights,
                               layer_observer=self.observe_layer)

    def stat_weights(self, gate: torch.Tensor) -> torch.Tensor:
        """[S] weight of each routed pair in the *_weighted statistics: g², or 1 where g is already in x
        (`_gate_weight`), float32."""
        return _gate_weight(gate, self.gate_on_input).square()

    def observe_layer(self, acts: GroupedActivations):
        """Layer observer: every expert's statistics of one call as segment sums over the rows grouped
        by expert (float32 per call, accumulated across calls in float64)."""
        if acts.expert.numel() == 0:
            return
        g = acts.gate.detach().float()  # [S]
        w = self.stat_weights(acts.gate.detach())  # [S]
        starts = acts.starts
        if acts.x is None:  # inputs are rows of hidden: square the [T, H] hidden once, sum gathered rows
            src, rows = acts.hidden, acts.token_idx
        else:
            src, rows = acts.x, torch.arange(acts.x.shape[0], device=acts.x.device)
        x2 = _squared(src)  # [T or S, H] float32
        self.in_sq += _segment_sum(x2, rows, starts)
        self.in_sq_w += _segment_sum(x2, rows, starts, w)
        del x2
        h2 = _squared(acts.h)  # [S, I]
        every = torch.arange(h2.shape[0], device=h2.device)
        self.down_sq += _segment_sum(h2, every, starts)
        self.down_sq_w += _segment_sum(h2, every, starts, w)
        del h2
        y_norm = torch.linalg.vector_norm(acts.y.detach(), dim=1, dtype=torch.float32)  # [S]
        # 1-D segment sums in a fixed order (no atomics on a GPU).
        self.gate_sum += torch.segment_reduce(g, "sum", lengths=acts.counts)
        out_w = _gate_weight(g, self.gate_on_input)  # [S] g, or 1 where the output enters unscaled (Llama 4)
        self.gate_out += torch.segment_reduce(out_w * y_norm, "sum", lengths=acts.counts)

    def result(self) -> LayerStats:
        l = self.layer
        k, E = l.top_k, l.num_experts
        cpu = lambda t: t.cpu()  # noqa: E731
        return LayerStats(
            layer=l.index, path=l.path, num_experts=E, top_k=k,
            routed_counts=cpu(self.routed), top1_counts=cpu(self.top1), prob_sum=cpu(self.prob_sum),
            gate_sum=cpu(self.gate_sum), gate_output_norm=cpu(self.gate_out),
            input_sq=cpu(self.in_sq), input_sq_weighted=cpu(self.in_sq_w),
            down_sq=cpu(self.down_sq), down_sq_weighted=cpu(self.down_sq_w),
            coactivation=cpu(self.coact), domain_counts=cpu(self.domain), prob_hist=cpu(self.hist),
            record_topk=torch.cat(self.rec_topk) if self.rec_topk else torch.zeros(0, k, dtype=torch.long),
            record_probs=torch.cat(self.rec_probs) if self.rec_probs else torch.zeros(0, E),
        )


@torch.no_grad()
def calibrate(
    loaded: LoadedModel,
    samples: TokenSamples,
    batch_size: int = 8,
    hist_bins: int = 20,
    record_tokens: int = 4096,
    progress: ProgressFn | None = None,
    on_batch: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
    expert_stats: bool = True,
) -> CalibrationStats:
    """Run the calibration pass over `samples` and return its statistics.

    progress(done_samples, total_samples) is called after every batch; on_batch(input_ids [B, S],
    domain ids [B], logits [B, S, V]) lets evaluation score the same forward pass.
    expert_stats=False: routing statistics only (counts, probabilities, co-activation, record); the
    per-expert activation norms and gate outputs stay zero. Evaluation needs only the routing, and
    without an expert observer the family's own experts forward runs (no reference loop, no
    per-expert reductions) unless a weight provider or an activation transform needs the loop.
    """
    start = time.perf_counter()
    view = structural_copy(loaded.model)
    layers = find_moe_layers(view, loaded.layers)
    device = loaded.device
    domains = samples.domain_index()
    collectors = [_LayerCollector(l, len(samples.domain_names), hist_bins, record_tokens, device) for l in layers]
    for c in collectors:
        c.layer.router.register_forward_hook(c.router_hook)
        rt = install_experts_runtime(c.layer)  # on this copy only
        rt.routing_observers.append(c.see_routing)
        if expert_stats:
            rt.layer_observers.append(c.observe_layer)

    n = samples.n_samples
    rec_ids, rec_dom = [], []
    n_rec = 0
    for start_i in range(0, n, batch_size):
        ids = samples.input_ids[start_i:start_i + batch_size]  # [B, S]
        # Domain of each flattened token [B*S], in the order the MoE blocks see them.
        token_domain = domains[start_i:start_i + batch_size].repeat_interleave(samples.seq_len)
        for c in collectors:
            c.token_domain = token_domain
        out = view(input_ids=ids.to(device), use_cache=False)
        if on_batch is not None:
            on_batch(ids, domains[start_i:start_i + batch_size], out.logits)
        if n_rec < record_tokens:
            take = ids.reshape(-1)[: record_tokens - n_rec]
            rec_ids.append(take)
            rec_dom.append(token_domain[: take.numel()])
            n_rec += take.numel()
        if progress is not None:
            progress(min(start_i + batch_size, n), n)

    settings = dict(batch_size=batch_size, hist_bins=hist_bins, record_tokens=record_tokens,
                    **({} if expert_stats else dict(expert_stats=False)),
                    n_samples=n, seq_len=samples.seq_len, seed=samples.seed,
                    distributions=[l.distribution for l in layers], **weight_rule_settings(layers))
    return CalibrationStats(
        model_fingerprint=loaded.fingerprint,
        data_fingerprint=samples.fingerprint,
        settings=settings,
        n_tokens=samples.n_tokens,
        domain_names=list(samples.domain_names),
        domain_tokens=[int((domains == i).sum()) * samples.seq_len for i in range(len(samples.domain_names))],
        hist_bins=hist_bins,
        seconds=time.perf_counter() - start,
        layers=[c.result() for c in collectors],
        record_token_ids=torch.cat(rec_ids) if rec_ids else torch.zeros(0, dtype=torch.long),
        record_domains=torch.cat(rec_dom) if rec_dom else torch.zeros(0, dtype=torch.long),
    )
