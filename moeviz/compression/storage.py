"""Bytes of a plan's compressed form, per documented format (`formats.py`), from shapes alone.

`Compressor.apply` reports it with the compressed model and the app's preview computes it while a plan
is edited (`preview.plan_storage`): both call `storage_report` on the same `ResolvedPlan`, so the
numbers are the same."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from moeviz.compression.formats import storage_for
from moeviz.compression.resolve import ResolvedPlan, group_size_for
from moeviz.compression.deployability import Deployability, assess, per_expert_bytes
from moeviz.models.layers import MoELayer


@dataclass
class StorageReport:
    """Bytes of the base and of the compressed form, per documented format (see formats.py)."""

    tensors: list[dict]  # one entry per expert projection / router: location + TensorStorage fields
    experts_base_bytes: int
    experts_bytes: int
    router_base_bytes: int
    router_bytes: int
    other_bytes: int  # everything else (attention, embeddings, shared experts, norms, biases), dense
    checkpoint_dtype: str = ""  # the dtype the ratios above count against ("float32", "bfloat16", …)
    # The same base and plan counted as a bf16 checkpoint (how papers and model cards count ratios)
    bf16_base_bytes: int | None = None
    bf16_compressed_bytes: int | None = None
    # Which targets can hold the plan, and the bytes of the smallest format one can (moeviz.deployability)
    deployability: Deployability | None = None

    @property
    def base_bytes(self) -> int:
        return self.experts_base_bytes + self.router_base_bytes + self.other_bytes

    @property
    def compressed_bytes(self) -> int:
        return self.experts_bytes + self.router_bytes + self.other_bytes

    def summary(self) -> dict:
        """Ratios on paper (the documented formats of formats.py, against the checkpoint as stored), the same
        against bf16, and the ratio of the smallest format an export target can hold (`export_*`)."""
        out = dict(
            experts_compression_ratio=self.experts_base_bytes / max(self.experts_bytes, 1),
            compression_ratio=self.base_bytes / max(self.compressed_bytes, 1),
            base_bytes=self.base_bytes, compressed_bytes=self.compressed_bytes,
            experts_base_bytes=self.experts_base_bytes, experts_bytes=self.experts_bytes,
            router_base_bytes=self.router_base_bytes, router_bytes=self.router_bytes, other_bytes=self.other_bytes,
            checkpoint_dtype=self.checkpoint_dtype,
        )
        if self.bf16_compressed_bytes:
            out["compression_ratio_bf16"] = self.bf16_base_bytes / self.bf16_compressed_bytes
        d = self.deployability
        if d is not None:
            out["export_format"] = d.export_format
            out["export_bytes"] = d.export_bytes
            out["export_compression_ratio"] = self.base_bytes / d.export_bytes if d.export_bytes else None
            out["export_targets"] = [v.target for v in d.verdicts if v.ok]
        return out


def storage_report(model: nn.Module, layers: list[MoELayer], resolved: ResolvedPlan) -> StorageReport:
    """The storage of `model` (the base: its parameters' total) compressed as `resolved` says."""
    plan, sparsity, bits, removed = resolved.plan, resolved.sparsity, resolved.bits, resolved.removed
    nm = plan.nm()
    tensors = []
    exp_base = exp_bytes = r_base = r_bytes = 0
    bf16_exp = bf16_router = counted = 0  # the same plan on a bf16 checkpoint; numel accounted for
    # Experts with the same shape and settings store the same way: one StorageFormat (and its dict) per
    # distinct setting, not per expert (a uniform plan has one per projection shape).
    formats: dict[tuple, tuple] = {}
    for layer in layers:
        dtype_bytes = layer.weight("down").element_size()
        shapes = {proj: tuple(layer.weight(proj).shape[1:]) for proj in layer.projections()}
        for e in range(layer.num_experts):
            b, gone = int(bits[layer.index, e]), bool(removed[layer.index, e])
            for proj, shape in shapes.items():
                s = float(sparsity[layer.index, e]) if proj in plan.pruning.projections else 0.0
                key = (shape, dtype_bytes, s, b, gone, proj)
                got = formats.get(key)
                if got is None:
                    setting = dict(
                        sparsity=0.0 if nm else s,
                        structure=(("n:m" if nm else "unstructured") if s > 0 else None),
                        n=nm[0] if nm and s > 0 else None, m=nm[1] if nm and s > 0 else None,
                        bits=b, group_size=group_size_for(plan.quant.group_size, shape[-1], proj, layer, b),
                        symmetric=plan.quant.symmetric, removed=gone,
                    )
                    st = storage_for(shape, dtype_bytes=dtype_bytes, **setting)
                    got = formats[key] = (st, asdict(st), storage_for(shape, dtype_bytes=2, **setting).bytes)
                st, st_dict, st_bf16 = got
                exp_base += st.dense_bytes
                exp_bytes += st.bytes
                bf16_exp += st_bf16
                counted += st.numel
                tensors.append(dict(layer=layer.index, expert=e, tensor=proj, **st_dict))
        w = layer.router_weight
        router = dict(sparsity=plan.router_sparsity,
                      structure="unstructured" if plan.router_sparsity > 0 else None,
                      bits=plan.router_bits,
                      group_size=group_size_for(plan.quant.group_size, w.shape[-1], "router", layer, plan.router_bits),
                      symmetric=plan.quant.symmetric)
        st = storage_for(tuple(w.shape), dtype_bytes=w.element_size(), **router)
        r_base += st.dense_bytes
        r_bytes += st.bytes
        counted += st.numel
        bf16_router += storage_for(tuple(w.shape), dtype_bytes=2, **router).bytes
        tensors.append(dict(layer=layer.index, expert=None, tensor="router", **asdict(st)))
    # Everything else (attention, embeddings, norms, shared experts, expert biases) stays dense
    # in the base dtype: the base's total minus what was accounted for above.
    params = list(model.parameters())
    total = sum(p.numel() * p.element_size() for p in params)
    other = total - exp_base - r_base
    numel = sum(p.numel() for p in params)
    # What an export writes besides the experts and per-expert tensors: the saved state (tied tensors once,
    # persistent buffers included) minus those
    # (parameters() lists a tied parameter once; shapes only, so offloaded / meta tensors count too)
    persistent = set(model.state_dict().keys())
    buffers = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n in persistent)
    rest = total + buffers - exp_base - per_expert_bytes(layers)
    down = layers[0].weight("down")
    return StorageReport(tensors, exp_base, exp_bytes, r_base, r_bytes, other,
                         checkpoint_dtype=str(down.dtype).replace("torch.", ""),
                         bf16_base_bytes=2 * numel,
                         bf16_compressed_bytes=bf16_exp + bf16_router + 2 * (numel - counted),
                         deployability=assess(plan, layers, bits, removed, down.element_size(), rest))
