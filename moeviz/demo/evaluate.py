"""Held-out metrics for the demo MoE: perplexity, top-1 accuracy, routing, pruning cost.

Window definition (used everywhere, including the card and the tests):
  for each domain (prose, code, tabular, in that order) the held-out documents are tokenized
  without special tokens, joined with one eos token between documents, and cut into
  non-overlapping windows of ``seq_len`` tokens (default 256); the trailing partial window is
  dropped.  Every window is scored independently: positions 1..seq_len-1 are predicted from
  their prefix, so each window contributes seq_len-1 scored tokens.
Perplexity = exp(mean next-token NLL over scored tokens); "overall" pools all domains' tokens.
Routing is read with a forward hook on every layer's ``mlp.experts`` module, which is called as
``experts(hidden_states, top_k_index, top_k_weights)``; utilization = share of all top-k
assignments of a layer that went to each expert.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch

from moeviz.demo.corpus import DOMAINS, read_jsonl

SLICE_WINDOWS = 2  # the card's quick "slice" = first 2 windows of each domain (used by tests)


def load_demo(model_dir: str | Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # Eager per-expert loop: fastest on CPU and it is what the routing hook expects.
    model.config._experts_implementation = "eager"
    model.eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def heldout_windows(tokenizer, jsonl: str | Path, seq_len: int = 256) -> dict[str, torch.Tensor]:
    """{domain: LongTensor[n_windows, seq_len]} following the module docstring's definition."""
    rows = read_jsonl(jsonl)
    out = {}
    for dom in DOMAINS:
        ids: list[int] = []
        for r in (r for r in rows if r["domain"] == dom):
            if ids:
                ids.append(tokenizer.eos_token_id)
            ids.extend(tokenizer(r["text"], add_special_tokens=False, verbose=False)["input_ids"])
        n = len(ids) // seq_len
        if n:
            out[dom] = torch.tensor(ids[: n * seq_len]).view(n, seq_len)  # [n, seq_len]
    return out


def slice_windows(windows: dict[str, torch.Tensor], n: int = SLICE_WINDOWS) -> dict[str, torch.Tensor]:
    return {d: w[:n] for d, w in windows.items()}


class RoutingRecorder:
    """Counts top-k assignments per (layer, expert) and per domain via forward hooks."""

    def __init__(self, model):
        layers = model.model.layers
        self.n_experts = model.config.num_local_experts
        self.counts: dict[str, torch.Tensor] = {}  # domain -> [layers, experts]
        self.domain = None
        self.handles = [layer.mlp.experts.register_forward_hook(self._hook(i))
                        for i, layer in enumerate(layers)]
        self.n_layers = len(layers)

    def _hook(self, li: int):
        def fn(module, args, output):
            top_k_index = args[1]  # [tokens, top_k]
            c = self.counts.setdefault(self.domain, torch.zeros(self.n_layers, self.n_experts))
            c[li] += torch.bincount(top_k_index.reshape(-1), minlength=self.n_experts)[: self.n_experts].float()
        return fn

    def remove(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def score(model, windows: dict[str, torch.Tensor], batch_size: int = 8, recorder=None) -> dict:
    """Per-domain and overall perplexity / top-1 accuracy over the given windows."""
    res, tot_nll, tot_ok, tot_n = {}, 0.0, 0, 0
    for dom, w in windows.items():
        if recorder is not None:
            recorder.domain = dom
        nll, ok, n = 0.0, 0, 0
        for i in range(0, len(w), batch_size):
            x = w[i : i + batch_size]                      # [b, T]
            logits = model(input_ids=x).logits[:, :-1].float()  # [b, T-1, V]
            y = x[:, 1:]                                    # [b, T-1]
            nll += float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum"))
            ok += int((logits.argmax(-1) == y).sum())
            n += y.numel()
        res[dom] = {"perplexity": math.exp(nll / n), "accuracy": ok / n, "n_tokens": n}
        tot_nll, tot_ok, tot_n = tot_nll + nll, tot_ok + ok, tot_n + n
    res["overall"] = {"perplexity": math.exp(tot_nll / tot_n), "accuracy": tot_ok / tot_n, "n_tokens": tot_n}
    return res


def prune_experts(model, sparsity: float = 0.5):
    """Deep copy with unstructured magnitude pruning of every expert matrix, per output row.

    gate_up_proj is [E, 2*I, H] and down_proj is [E, H, I]: in both the last dim is the input
    dim, so each (expert, output row) keeps its largest-|w| (1-sparsity) share of inputs.
    """
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for layer in pruned.model.layers:
            for w in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
                k = int(w.shape[-1] * sparsity)  # weights to zero per row
                if k == 0:
                    continue
                thresh_idx = w.abs().argsort(dim=-1)[..., :k]  # [E, rows, k] smallest
                w.scatter_(-1, thresh_idx, 0.0)
    return pruned


def specialization(counts: dict[str, torch.Tensor]) -> dict:
    """Per layer: the expert with the largest ratio between its share of two domains.

    share of domain d for expert e = (top-k assignments of d's tokens to e) / (all top-k
    assignments of d's tokens) in that layer; only experts with >= 5 % of some domain count.
    """
    doms = [d for d in DOMAINS if d in counts]
    shares = {d: counts[d] / counts[d].sum(-1, keepdim=True) for d in doms}  # [L, E] each
    best = []
    for li in range(next(iter(counts.values())).shape[0]):
        top = None
        for e in range(shares[doms[0]].shape[1]):
            for a in doms:
                for b in doms:
                    if a == b:
                        continue
                    # Ignore near-idle experts (0.1% vs 0.01% is no evidence) and floor the
                    # denominator at 0.5% so the ratio stays meaningful.
                    if shares[a][li, e] < 0.05:
                        continue
                    r = float(shares[a][li, e] / shares[b][li, e].clamp_min(0.005))
                    if top is None or r > top["ratio"]:
                        top = {"layer": li, "expert": e, "domain_high": a, "domain_low": b,
                               "share_high": float(shares[a][li, e]), "share_low": float(shares[b][li, e]),
                               "ratio": r}
        best.append(top)
    return {"per_layer_best": best, "shares": {d: shares[d].tolist() for d in doms}}


def evaluate_model(model_dir, heldout_path, seq_len: int = 256, write_card: bool = False,
                   training: dict | None = None, prune: bool = True, batch_size: int = 8) -> dict:
    model_dir = Path(model_dir)
    model, tok = load_demo(model_dir)
    windows = heldout_windows(tok, heldout_path, seq_len)
    rec = RoutingRecorder(model)
    dense = score(model, windows, batch_size, recorder=rec)
    rec.remove()
    total = sum(rec.counts.values())  # [L, E] over all domains
    util = (total / total.sum(-1, keepdim=True))
    spec = specialization(rec.counts)
    slice_res = score(model, slice_windows(windows), batch_size)
    card = {
        "model": "moeviz demo MoE (MixtralForCausalLM)",
        "heldout_perplexity": dense["overall"]["perplexity"],
        "heldout_accuracy": dense["overall"]["accuracy"],
        "per_domain": {d: dense[d] for d in windows},
        "eval": {"file": "heldout.jsonl", "seq_len": seq_len, "n_tokens": dense["overall"]["n_tokens"],
                 "n_windows": {d: len(w) for d, w in windows.items()},
                 "definition": "per domain: docs joined with eos, non-overlapping seq_len windows, "
                               "partial tail dropped; seq_len-1 scored tokens per window"},
        "slice": {"windows_per_domain": SLICE_WINDOWS, "perplexity": slice_res["overall"]["perplexity"],
                  "accuracy": slice_res["overall"]["accuracy"], "n_tokens": slice_res["overall"]["n_tokens"]},
        "utilization": {"per_layer": util.tolist(),
                        "min_share_per_layer": util.min(-1).values.tolist(),
                        "max_share_per_layer": util.max(-1).values.tolist()},
        "specialization": spec,
    }
    if prune:
        pruned = prune_experts(model, 0.5)
        p = score(pruned, windows, batch_size)
        card["pruned_50pct"] = {"heldout_perplexity": p["overall"]["perplexity"],
                                "heldout_accuracy": p["overall"]["accuracy"],
                                "per_domain": {d: p[d] for d in windows},
                                "ppl_increase_pct": 100 * (p["overall"]["perplexity"] / dense["overall"]["perplexity"] - 1)}
    if training is not None:
        card["training"] = {k: v for k, v in training.items() if k != "history"}
    _print_summary(card)
    if write_card:
        if training is None and (model_dir / "moeviz_card.json").exists():
            old = json.loads((model_dir / "moeviz_card.json").read_text())
            if "training" in old:
                card["training"] = old["training"]
        (model_dir / "moeviz_card.json").write_text(json.dumps(card, indent=1))
    return card


def _print_summary(card: dict) -> None:
    print(f"held-out overall: ppl {card['heldout_perplexity']:.2f}  acc {card['heldout_accuracy']:.3f}  "
          f"({card['eval']['n_tokens']} tokens)")
    for d, r in card["per_domain"].items():
        print(f"  {d:8s} ppl {r['perplexity']:.2f}  acc {r['accuracy']:.3f}  ({r['n_tokens']} tokens)")
    print(f"slice ({card['slice']['windows_per_domain']} windows/domain): ppl {card['slice']['perplexity']:.4f}")
    for li, row in enumerate(card["utilization"]["per_layer"]):
        print(f"  layer {li} expert shares: " + " ".join(f"{x:.3f}" for x in row))
    for b in card["specialization"]["per_layer_best"]:
        print(f"  layer {b['layer']} expert {b['expert']}: {b['share_high']:.3f} of {b['domain_high']} "
              f"vs {b['share_low']:.3f} of {b['domain_low']} assignments (x{b['ratio']:.1f})")
    if "pruned_50pct" in card:
        p = card["pruned_50pct"]
        print(f"50% magnitude-pruned experts: ppl {p['heldout_perplexity']:.2f} "
              f"(+{p['ppl_increase_pct']:.1f}%)  acc {p['heldout_accuracy']:.3f}")
