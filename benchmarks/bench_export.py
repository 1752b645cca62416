"""Export: bytes, time and peak memory of the dense and the compressed-tensors export, on the demo and on one
OLMoE-1B-7B-shaped layer (bf16), for an int4 g128 and an int8 channel plan.

    python -m benchmarks --only export          # MOEVIZ_BENCH_THREADS (default 1) torch threads

Targets (issue 23): the packed folder's tensor bytes ≤ 1.02 × the storage report of the plan, and the
export's peak RSS ≤ the RSS after loading + one decoder layer's dense tensors (+ the export's fixed buffers).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_scale import EXPORT_FIXED_BYTES, _build, _peak_bytes, _reset_peak, _rss_bytes

THREADS = int(os.environ.get("MOEVIZ_BENCH_THREADS", "1"))
PLANS = {"int4-g128": dict(bits=4, group_size=128), "int8-channel": dict(bits=8, group_size=-1)}


def _tensor_bytes(folder: Path) -> int:
    import json

    total = 0
    for f in folder.glob("*.safetensors"):
        with f.open("rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
    return total


def measure(source: str | None, name: str) -> dict:
    import moeviz
    from moeviz.compression import CompressionPlan, QuantSettings
    from moeviz.compression.apply import Compressor
    from moeviz.export import export_model

    lm = moeviz.load_model(source)
    loaded_rss = _rss_bytes()
    layer_bytes = max(sum(p.numel() * p.element_size() for p in layer.block.parameters()) for layer in lm.layers)
    out = dict(model=name, dtype=lm.info.dtype, loaded_rss_bytes=loaded_rss, layer_bytes=layer_bytes, plans={})
    work = Path(tempfile.mkdtemp())
    for plan_name, quant in PLANS.items():
        plan = CompressionPlan(quant=QuantSettings(**quant))
        cm = Compressor(lm).apply(plan, lazy=True)  # export materialises one layer at a time
        report = cm.storage.compressed_bytes
        row = dict(storage_report_bytes=report, base_bytes=cm.storage.base_bytes)
        for fmt in ("dense", "compressed-tensors"):
            _reset_peak()
            t0 = time.perf_counter()
            folder = export_model(lm, cm, work / f"{plan_name}-{fmt}", format=fmt)
            seconds = time.perf_counter() - t0
            peak = _peak_bytes()
            data = _tensor_bytes(folder)
            row[fmt] = dict(seconds=round(seconds, 3), tensor_bytes=data, peak_rss_bytes=peak,
                            peak_over_loaded_bytes=peak - loaded_rss)
        ct = row["compressed-tensors"]
        ct["bytes_over_report"] = round(ct["tensor_bytes"] / report, 4)
        ct["bytes_target"] = "≤ 1.02 × storage report"
        ct["bytes_status"] = "PASS" if ct["tensor_bytes"] <= 1.02 * report else "MISS"
        limit = loaded_rss + layer_bytes + EXPORT_FIXED_BYTES
        ct["memory_target"] = "peak RSS ≤ loaded RSS + one decoder layer + 64 MiB fixed buffers"
        ct["memory_status"] = "PASS" if ct["peak_rss_bytes"] <= limit else "MISS"
        out["plans"][plan_name] = row
    return out


def run() -> dict:
    torch.set_num_threads(THREADS)
    results = dict(torch_threads=torch.get_num_threads(), models=[measure(None, "demo-moe")])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "olmoe"
        _build("olmoe-1b-7b", 1, folder)
        results["models"].append(measure(str(folder), "olmoe-1b-7b shape, 1 layer, bf16"))
    return results


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
