"""Evaluation metrics as pure functions of tensors and numbers (no model is run here).

* Routing drift between the base and the compressed model, on the same tokens:
  top-k overlap, top-1 change rate and KL(P_base ‖ P_comp) of the full router distributions.
* Load balance (coefficient of variation of tokens per expert) and utilization shift.
* Perplexity / next-token accuracy, accumulated over batches (per domain and overall).
* Compression summary from the concrete storage formats of :mod:`moeviz.compression.formats`.

Every result is a dataclass or a dict of plain floats/ints/lists, JSON-serialisable.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from moeviz.compression.formats import TensorStorage

# Probabilities are clamped to at least KL_EPSILON before the KL divergence (see `routing_drift`).
KL_EPSILON = 1e-6
IGNORE_INDEX = -100  # label value skipped by TokenLossAccumulator, as in transformers/PyTorch
LOSS_CHUNK_ELEMENTS = 1 << 18  # logits per chunk of rows in TokenLossAccumulator.add (1 MB of float32)


# -- routing drift ---------------------------------------------------------------------------------


@dataclass
class RoutingDrift:
    """How differently the compressed model routes the same tokens. JSON-serialisable via `asdict`."""

    topk_overlap: float  # mean over tokens of |S_base ∩ S_comp| / k (1 = same expert sets)
    top1_change_rate: float  # share of tokens whose top-1 expert changed
    kl: float  # mean over tokens of KL(P_base ‖ P_comp), nats, probabilities clamped at kl_epsilon
    n_tokens: int
    k: int
    kl_epsilon: float = KL_EPSILON


def kl_rows(p: torch.Tensor, q: torch.Tensor, eps: float) -> torch.Tensor:
    """[N] KL(p_i ‖ q_i) in nats, both rows clamped at `eps` and renormalised (see `routing_drift`)."""
    p = p.double().clamp_min(eps)
    q = q.double().clamp_min(eps)
    p = p / p.sum(-1, keepdim=True)
    q = q / q.sum(-1, keepdim=True)
    return (p * (p.log() - q.log())).sum(-1)


def routing_drift(
    base_topk: torch.Tensor,
    comp_topk: torch.Tensor,
    base_probs: torch.Tensor,
    comp_probs: torch.Tensor,
    base_top1: torch.Tensor | None = None,
    comp_top1: torch.Tensor | None = None,
    eps: float = KL_EPSILON,
) -> RoutingDrift:
    """Routing drift of one layer on N tokens.

    Args:
        base_topk, comp_topk: [N, k] chosen expert ids (order within a row does not matter for the
            overlap).
        base_probs, comp_probs: [N, E] full router distributions (rows sum to 1; a removed expert has
            probability 0 in ``comp_probs``).
        base_top1, comp_top1: optional [N] top-1 expert ids. By default the top-1 expert is the
            *first column* of the top-k ids, which is the highest-weight expert for routers that
            return sorted top-k (``torch.topk(sorted=True)``, the default). Some routers return the
            top-k unsorted (e.g. ``sorted=False`` in grouped routing); pass the true top-1 ids then
            (e.g. the argmax of the weights).
        eps: probability floor for the KL divergence.

    KL and the epsilon: a removed expert has P_comp = 0 exactly, so KL(P_base ‖ P_comp) would be
    infinite as soon as the base model gave it any probability, and a single removed expert would
    make every plan that removes experts look equally (infinitely) bad. Both distributions are
    therefore clamped to at least ``eps`` (1e-6) and renormalised before taking the KL. Then:
    identical distributions give exactly 0 and KL stays >= 0 (both are proper distributions);
    moving base probability mass p onto a removed expert costs about ``p * ln(p / eps)``, at most
    ``p * 13.8`` nats, so the penalty grows with how much the base model relied on that expert and
    stays finite and comparable across plans. 1e-6 is far below any router probability that
    affects top-k choices in practice, so the clamp does not change KL between live experts.
    """
    if base_topk.shape != comp_topk.shape or base_topk.dim() != 2:
        raise ValueError(f"top-k ids must both be [N, k], got {tuple(base_topk.shape)} and {tuple(comp_topk.shape)}")
    if base_probs.shape != comp_probs.shape or base_probs.dim() != 2:
        raise ValueError(f"probs must both be [N, E], got {tuple(base_probs.shape)} and {tuple(comp_probs.shape)}")
    n, k = base_topk.shape
    if base_probs.shape[0] != n:
        raise ValueError(f"{n} tokens of top-k ids but {base_probs.shape[0]} rows of probabilities")
    if n == 0:
        return RoutingDrift(topk_overlap=float("nan"), top1_change_rate=float("nan"), kl=float("nan"),
                            n_tokens=0, k=k, kl_epsilon=eps)
    num_experts = max(base_probs.shape[1], int(base_topk.max()) + 1, int(comp_topk.max()) + 1)

    # Set intersection via one-hot masks: [N, E] bool, one True per chosen expert.
    def chosen(ids):
        return torch.zeros(n, num_experts, dtype=torch.bool).scatter_(1, ids.long().cpu(), True)

    overlap = (chosen(base_topk) & chosen(comp_topk)).sum(-1).double() / k

    b1 = base_topk[:, 0] if base_top1 is None else base_top1.reshape(-1)
    c1 = comp_topk[:, 0] if comp_top1 is None else comp_top1.reshape(-1)
    changed = (b1.long().cpu() != c1.long().cpu()).double()

    kl = kl_rows(base_probs.cpu(), comp_probs.cpu(), eps)
    return RoutingDrift(
        topk_overlap=float(overlap.mean()),
        top1_change_rate=float(changed.mean()),
        kl=float(kl.mean()),
        n_tokens=n,
        k=k,
        kl_epsilon=eps,
    )


def routing_drift_per_layer(
    base_topk: Sequence[torch.Tensor],
    comp_topk: Sequence[torch.Tensor],
    base_probs: Sequence[torch.Tensor],
    comp_probs: Sequence[torch.Tensor],
    base_top1: Sequence[torch.Tensor] | None = None,
    comp_top1: Sequence[torch.Tensor] | None = None,
    eps: float = KL_EPSILON,
) -> list[dict]:
    """`routing_drift` for each layer (lists indexed by MoE layer); one dict per layer with a "layer" key."""
    n_layers = len(base_topk)
    if not (len(comp_topk) == len(base_probs) == len(comp_probs) == n_layers):
        raise ValueError("routing_drift_per_layer: all lists must have one entry per layer")
    out = []
    for i in range(n_layers):
        d = routing_drift(
            base_topk[i], comp_topk[i], base_probs[i], comp_probs[i],
            None if base_top1 is None else base_top1[i],
            None if comp_top1 is None else comp_top1[i],
            eps=eps,
        )
        out.append({"layer": i, **asdict(d)})
    return out


# -- load balance ----------------------------------------------------------------------------------


def _as_double(x) -> torch.Tensor:
    return x.detach().double().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=torch.float64)


def load_balance_cv(counts, active_mask=None) -> float:
    """Coefficient of variation of tokens per expert: population std / mean (0 if no tokens).

    ``active_mask`` ([E] bool, False = removed expert): compute the CV over the surviving experts
    only. A removed expert receives no tokens by construction; counting its zero would report an
    imbalance that no remaining hardware sees. What matters for balance (expert-parallel
    stragglers, capacity overflow) is how evenly the tokens spread over the experts that still run.
    """
    c = _as_double(counts).reshape(-1)
    if active_mask is not None:
        c = c[torch.as_tensor(active_mask, dtype=torch.bool).reshape(-1).cpu()]
    if c.numel() == 0 or float(c.mean()) <= 0:
        return 0.0
    return float(c.std(unbiased=False) / c.mean())


def utilization_shift(base_counts, comp_counts) -> torch.Tensor:
    """[E] change of each expert's share of the routed tokens: comp_share - base_share (float64).

    Shares are counts / total, so the shift sums to 0; positive = the expert gained load (e.g. it
    absorbed the tokens of a removed neighbour, which shows -base_share).
    """
    b = _as_double(base_counts).reshape(-1)
    c = _as_double(comp_counts).reshape(-1)
    if b.shape != c.shape:
        raise ValueError(f"utilization_shift: {b.numel()} base experts vs {c.numel()} compressed experts")
    return c / c.sum().clamp_min(1e-300) - b / b.sum().clamp_min(1e-300)


# -- perplexity and accuracy -----------------------------------------------------------------------


def perplexity_from_nll(sum_nll: float, n_tokens: int) -> float:
    """exp(mean token cross-entropy) = exp(sum_nll / n_tokens); nats in, inf if it overflows."""
    if n_tokens <= 0:
        raise ValueError("perplexity needs at least one predicted token")
    mean = float(sum_nll) / n_tokens
    return math.exp(mean) if mean < 709 else float("inf")


def accuracy(correct: int, n: int) -> float:
    """Share of correct predictions."""
    if n <= 0:
        raise ValueError("accuracy needs at least one prediction")
    return float(correct) / n


class TokenLossAccumulator:
    """Streams next-token cross-entropy and top-1 accuracy over batches, per domain and overall.

    ``add(logits [B, S, V], labels [B, S], domains [B] | None)``: labels are aligned with the
    inputs (the transformers convention, usually ``labels = input_ids``); the logits at position t
    predict ``labels[:, t + 1]``, so each sequence contributes S - 1 predictions. Labels equal to
    -100 (padding) are skipped. Sums are float64 so millions of tokens add without rounding drift.
    """

    def __init__(self, domain_names: Sequence[str] | None = None):
        # domain_names maps integer domain ids (as in CalibrationStats.record_domains) to names.
        self.domain_names = list(domain_names) if domain_names is not None else None
        self.nll_sum = 0.0
        self.n_tokens = 0
        self.correct = 0
        self.per_domain: dict[str, dict] = {}
        # Per sequence, in the order added: the units a bootstrap resamples (moeviz.evaluation.uncertainty).
        self.windows: dict[str, list] = {"nll": [], "tokens": [], "correct": []}

    def _domain_key(self, d) -> str:
        if isinstance(d, torch.Tensor):
            d = d.item()
        if self.domain_names is not None and isinstance(d, int) and not isinstance(d, bool):
            return self.domain_names[d]
        return str(d)

    @torch.no_grad()
    def add(self, logits: torch.Tensor, labels: torch.Tensor, domains=None) -> None:
        if logits.dim() != 3 or labels.shape != logits.shape[:2]:
            raise ValueError(f"expected logits [B, S, V] and labels [B, S], got {tuple(logits.shape)}, {tuple(labels.shape)}")
        B, S, V = logits.shape
        # Position t predicts labels[:, t + 1]; the last position predicts nothing (its target is ignored),
        # so the logits are used whole, as flat [B*S, V] rows (a view: no copy of the sliced [B, S-1, V]).
        target = torch.full((B, S), IGNORE_INDEX, dtype=torch.long, device=logits.device)
        target[:, :-1] = labels[:, 1:].to(logits.device).long()
        flat, flat_target = logits.reshape(B * S, V), target.reshape(B * S)
        nll = torch.empty(B * S, dtype=torch.float32, device=logits.device)
        hit = torch.empty(B * S, dtype=torch.bool, device=logits.device)
        # A few rows at a time: the temporaries stay ~1 MB instead of [B*S, V] (0.4 GB for 2,048 tokens of a
        # 50 K vocabulary) of fresh pages. Every row's result is what one call over all rows gives.
        rows = max(1, LOSS_CHUNK_ELEMENTS // V)
        work = torch.empty(min(rows, B * S), V, dtype=torch.float32, device=logits.device)
        for r0 in range(0, B * S, rows):
            chunk, t = flat[r0:r0 + rows].float(), flat_target[r0:r0 + rows]  # [R, V], [R]
            # Cross-entropy as log-sum-exp minus the target's logit, both shifted by the row max; the max's
            # index is the prediction (the first maximum, as argmax). One pass for max and argmax, one
            # exp pass in a reused buffer: half the time of cross_entropy + argmax (4.4 vs 8.1 ms for
            # 2,048 tokens x 2,048 classes, one thread), the same values to float32 rounding.
            top_v, top_i = chunk.max(-1)  # [R], [R]
            lse = torch.sub(chunk, top_v[:, None], out=work[:chunk.shape[0]]).exp_().sum(-1).log_()
            target_logit = chunk.gather(1, t.clamp(min=0)[:, None])[:, 0]  # ignored positions: dropped below
            nll[r0:r0 + rows] = lse - (target_logit - top_v)
            torch.eq(top_i, t, out=hit[r0:r0 + rows])
        target, nll, hit = target[:, :-1], nll.reshape(B, S)[:, :-1], hit.reshape(B, S)[:, :-1]  # [B, S-1]
        valid = target != IGNORE_INDEX
        nll = torch.where(valid, nll.double(), 0.0).cpu()  # not a product: an ignored position may hold inf
        hit = (hit & valid).cpu()
        valid = valid.cpu()

        seq_nll = nll.sum(-1)
        seq_n = valid.sum(-1)
        seq_hit = hit.sum(-1)
        self.nll_sum += float(seq_nll.sum())
        self.n_tokens += int(seq_n.sum())
        self.correct += int(seq_hit.sum())
        self.windows["nll"] += seq_nll.tolist()
        self.windows["tokens"] += seq_n.tolist()
        self.windows["correct"] += seq_hit.tolist()
        if domains is None:
            return
        if len(domains) != logits.shape[0]:
            raise ValueError(f"{len(domains)} domain labels for a batch of {logits.shape[0]} sequences")
        for b in range(logits.shape[0]):
            d = self.per_domain.setdefault(self._domain_key(domains[b]), {"nll_sum": 0.0, "n_tokens": 0, "correct": 0})
            d["nll_sum"] += float(seq_nll[b])
            d["n_tokens"] += int(seq_n[b])
            d["correct"] += int(seq_hit[b])

    @staticmethod
    def _summary(nll_sum: float, n: int, correct: int) -> dict:
        return {
            "perplexity": perplexity_from_nll(nll_sum, n) if n else float("nan"),
            "accuracy": accuracy(correct, n) if n else float("nan"),
            "mean_nll": nll_sum / n if n else float("nan"),
            "n_tokens": n,
        }

    def result(self) -> dict:
        """{"perplexity", "accuracy", "mean_nll", "n_tokens", "per_domain": {name: same keys}}."""
        out = self._summary(self.nll_sum, self.n_tokens, self.correct)
        out["per_domain"] = {k: self._summary(v["nll_sum"], v["n_tokens"], v["correct"]) for k, v in self.per_domain.items()}
        return out


# -- compression summary ---------------------------------------------------------------------------


def compression_summary(storages: Sequence[TensorStorage], other_params_bytes: int) -> dict:
    """Compression ratios from the concrete storage of every expert weight tensor.

    ``storages``: the `TensorStorage` of each expert weight (removed ones included, at 0 bytes).
    ``other_params_bytes``: everything else (attention, embeddings, head, norms, routers, shared
    experts), stored densely at the base dtype, so it counts the same before and after.

    * ``experts_compression_ratio`` = Σ dense_bytes / Σ stored bytes over the expert tensors
      (None if every expert was removed);
    * ``compression_ratio`` (whole model) = (Σ dense + other) / (Σ stored + other);
    * ``parameter_bytes`` = Σ stored + other, the parameter memory of the compressed model.
    """
    experts_dense = sum(int(s.dense_bytes) for s in storages)
    experts_stored = sum(int(s.bytes) for s in storages)
    other = int(other_params_bytes)
    formats: dict[str, int] = {}
    for s in storages:
        formats[s.format] = formats.get(s.format, 0) + 1
    whole_dense = experts_dense + other
    whole_stored = experts_stored + other
    return {
        "experts_dense_bytes": experts_dense,
        "experts_bytes": experts_stored,
        "other_bytes": other,
        "dense_parameter_bytes": whole_dense,
        "parameter_bytes": whole_stored,
        "experts_compression_ratio": experts_dense / experts_stored if experts_stored else None,
        "compression_ratio": whole_dense / whole_stored if whole_stored else None,
        "experts_value_bytes": sum(int(s.value_bytes) for s in storages),
        "experts_metadata_bytes": sum(int(s.metadata_bytes) for s in storages),
        "experts_scale_bytes": sum(int(s.scale_bytes) for s in storages),
        "format_counts": formats,
    }


__all__ = [
    "IGNORE_INDEX",
    "KL_EPSILON",
    "RoutingDrift",
    "TokenLossAccumulator",
    "accuracy",
    "compression_summary",
    "load_balance_cv",
    "perplexity_from_nll",
    "routing_drift",
    "routing_drift_per_layer",
    "utilization_shift",
]
