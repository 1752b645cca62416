"""Calibration statistics: what one streaming pass learns about each MoE layer.

Per layer (E experts, H hidden size, I expert intermediate size, D domains, B histogram bins):

    routed_counts      [E]     top-k assignments per expert
    top1_counts        [E]     tokens whose highest-weight expert is this one
    prob_sum           [E]     sum over tokens of the full router distribution
    gate_sum           [E]     sum of this expert's routing weight over the tokens routed to it
    gate_output_norm   [E]     sum over routed tokens of weight · ‖expert output‖ (REAP-style score)
    input_sq           [E, H]  Σ x_j² over routed tokens            (Wanda, gate/up inputs)
    input_sq_weighted  [E, H]  Σ (g·x_j)² over routed tokens        (MoE-Pruner, gate/up inputs)
    down_sq            [E, I]  Σ h_j² of act(gate)·up, routed tokens (Wanda, down inputs)
    down_sq_weighted   [E, I]  Σ (g·h_j)²                            (MoE-Pruner, down inputs)
    coactivation       [E, E]  tokens that chose both experts (diagonal = routed_counts)
    domain_counts      [D, E]  top-k assignments per domain label
    prob_hist          [E, B]  histogram of router probabilities over [0, 1]
    record_topk        [N, k]  top-k expert ids of the first N tokens (N ≤ record cap)
    record_probs       [N, E]  full router distribution of those tokens

Column norms are kept squared so they add across batches; ‖X_j‖ = sqrt(input_sq[e, j]).
g is the factor the model multiplies the expert's output by. Experts called by dense dispatch (Llama 4)
receive g·x as their input (x, h and the output already contain g), so there the weight is 1: the
weighted norms equal the plain ones (both Σ (g·x_j)²) and gate_output_norm is Σ ‖expert output‖.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

STATS_FORMAT_VERSION = 1


@dataclass
class LayerStats:
    layer: int
    path: str
    num_experts: int
    top_k: int
    routed_counts: torch.Tensor
    top1_counts: torch.Tensor
    prob_sum: torch.Tensor
    gate_sum: torch.Tensor
    gate_output_norm: torch.Tensor
    input_sq: torch.Tensor
    input_sq_weighted: torch.Tensor
    down_sq: torch.Tensor
    down_sq_weighted: torch.Tensor
    coactivation: torch.Tensor
    domain_counts: torch.Tensor
    prob_hist: torch.Tensor
    record_topk: torch.Tensor
    record_probs: torch.Tensor

    @classmethod
    def tensor_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name not in ("layer", "path", "num_experts", "top_k")]

    def utilization(self) -> torch.Tensor:
        """[E] share of top-k assignments per expert (sums to 1)."""
        return self.routed_counts / self.routed_counts.sum().clamp_min(1)

    def mean_gate(self) -> torch.Tensor:
        """[E] mean routing weight of an expert over the tokens routed to it (0 if never routed)."""
        return self.gate_sum / self.routed_counts.clamp_min(1)

    def load_balance_cv(self, top1: bool = False) -> float:
        """Coefficient of variation (std / mean, population std) of tokens per expert."""
        c = (self.top1_counts if top1 else self.routed_counts).double()
        return float(c.std(unbiased=False) / c.mean()) if c.mean() > 0 else 0.0


@dataclass
class CalibrationStats:
    """Everything calibration learned, JSON + safetensors serialisable, with a fingerprint of the model,
    the data and the settings so the app can cache and reuse it."""

    model_fingerprint: str
    data_fingerprint: str
    settings: dict
    n_tokens: int
    domain_names: list[str]
    domain_tokens: list[int]
    hist_bins: int
    seconds: float
    layers: list[LayerStats] = field(default_factory=list)
    record_token_ids: torch.Tensor | None = None  # [N]
    record_domains: torch.Tensor | None = None  # [N] index into domain_names
    version: int = STATS_FORMAT_VERSION

    @property
    def fingerprint(self) -> str:
        return stats_fingerprint(self.model_fingerprint, self.data_fingerprint, self.settings)

    def utilization_matrix(self) -> torch.Tensor:
        """[L, E] utilization (share of top-k assignments) per layer and expert."""
        return torch.stack([l.utilization() for l in self.layers])

    def meta(self) -> dict:
        return dict(
            version=self.version, model_fingerprint=self.model_fingerprint, data_fingerprint=self.data_fingerprint,
            settings=self.settings, n_tokens=self.n_tokens, domain_names=self.domain_names,
            domain_tokens=self.domain_tokens, hist_bins=self.hist_bins, seconds=self.seconds,
            fingerprint=self.fingerprint,
            layers=[dict(layer=l.layer, path=l.path, num_experts=l.num_experts, top_k=l.top_k) for l in self.layers],
        )

    def save(self, folder: str | Path) -> Path:
        """Write stats.json + stats.safetensors into `folder` (created if needed)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for i, l in enumerate(self.layers):
            for name in LayerStats.tensor_names():
                tensors[f"layer{i}.{name}"] = getattr(l, name).contiguous()
        if self.record_token_ids is not None:
            tensors["record_token_ids"] = self.record_token_ids.contiguous()
            tensors["record_domains"] = self.record_domains.contiguous()
        tmp = folder / "stats.safetensors.tmp"
        save_file(tensors, str(tmp))
        tmp.replace(folder / "stats.safetensors")
        (folder / "stats.json").write_text(json.dumps(self.meta(), indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "CalibrationStats":
        from safetensors.torch import load_file

        folder = Path(folder)
        meta = json.loads((folder / "stats.json").read_text())
        if meta.get("version") != STATS_FORMAT_VERSION:
            raise ValueError(f"{folder}: stats format {meta.get('version')} is not {STATS_FORMAT_VERSION}; recalibrate")
        tensors = load_file(str(folder / "stats.safetensors"))
        layers = [
            LayerStats(**lm, **{n: tensors[f"layer{i}.{n}"] for n in LayerStats.tensor_names()})
            for i, lm in enumerate(meta["layers"])
        ]
        keep = {f.name for f in fields(cls)} - {"layers", "record_token_ids", "record_domains"}
        return cls(
            **{k: v for k, v in meta.items() if k in keep},
            layers=layers,
            record_token_ids=tensors.get("record_token_ids"),
            record_domains=tensors.get("record_domains"),
        )


def stats_fingerprint(model_fp: str, data_fp: str, settings: dict) -> str:
    blob = json.dumps(dict(model=model_fp, data=data_fp, settings=settings), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


__all__ = ["CalibrationStats", "LayerStats", "stats_fingerprint"]
