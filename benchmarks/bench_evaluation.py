"""Evaluation on the demo model with 16k held-out tokens: one full evaluation (all metrics, incl.
measured latency), and the time from a new sparsity value to a stored result (apply + evaluate +
store; target ≤ 2 s), with and without the measured-latency part."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import moeviz
from moeviz.compression import CompressionPlan, PruningSettings
from moeviz.compression.apply import Compressor
from moeviz.evaluation import EvalSettings, Evaluator, evaluate_plan, load_eval_samples
from moeviz.store import RunStore


def run() -> dict:
    lm = moeviz.load_model()
    stats = moeviz.calibrate(lm, moeviz.load_calibration_data(lm.tokenizer, n_samples=32, seq_len=128))
    held = load_eval_samples(lm.tokenizer, seq_len=256, max_samples=64)
    store = RunStore(Path(tempfile.mkdtemp()) / "runs.sqlite")
    comp = Compressor(lm, stats)
    out = dict(model="demo-moe", eval_tokens=held.n_tokens)
    for name, settings in [("with_measured_latency", EvalSettings(latency_decode_tokens=8, latency_repeats=2)),
                           ("without_measured_latency", EvalSettings(measure_latency=False))]:
        t0 = time.perf_counter()
        ev = Evaluator(lm, held, settings)
        out[f"base_reference_s[{name}]"] = time.perf_counter() - t0
        times = []
        for s in (0.3, 0.4, 0.5, 0.6):
            t0 = time.perf_counter()
            result, run_id = evaluate_plan(comp, ev, CompressionPlan(pruning=PruningSettings(metric="moe_pruner", sparsity=s)), store)
            times.append(time.perf_counter() - t0)
        out[f"new_sparsity_to_stored_result_s[{name}]"] = statistics.median(times)
        out[f"one_evaluation_s[{name}]"] = result.seconds
    out["target_s"] = 2.0
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
