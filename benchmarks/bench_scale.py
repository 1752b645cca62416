"""moeviz on the layer shapes of the MoEs researchers load: time and memory per MoE layer.

Random-weight models with the exact MoE-layer shapes of published configs (values typed in from each
model's config.json; nothing is downloaded), 1-2 decoder layers, bf16, a small vocabulary (the
embedding is not what this measures). Every model runs in a fresh subprocess so that its peak RSS is
its own. Per model:

* ``forward_s``: a bare forward of the base model over the evaluation tokens (the unit of time);
* ``calibration_s``: one moeviz calibration pass over the same number of tokens;
* ``cold_apply_s``: the first ``Compressor.apply`` of a 50 % MoE-Pruner plan (lazy by default, which
  measures each expert's zeros once; ``MOEVIZ_SCALE_LAZY=0``: the materialised copy);
* ``new_sparsity_to_result_s``: a new plan on the warm compressor + its evaluation (the app's slider),
  median over 60 / 55 / 65 % (the forward: median of 3 too); the per-row threshold tables the 50 %
  evaluation built serve it (``threshold_table_bytes``, shared by every compressor of the process, see
  ``moeviz.compression.threshold_table``). The demo model (``demo-moe``, the trained model in
  sample_data/, all 4 layers) is also measured on the app's path for it (materialised: see below);
* ``evaluate_s``: ``Evaluator.evaluate`` of the compressed model (no latency measurement; a lazy
  model runs ``lazy_batch_windows`` windows per forward, see ``evaluate.lazy_batch_size``);
* ``export_s``: ``export_model`` of the 50 % plan;
* RSS: before and after load; the peak of each phase (``peak_rss_by_phase_bytes``: ``VmHWM``, reset
  between phases; building the random model is not counted) and the peak so far after each step.
  Export's extra peak is given per layer's checkpoint bytes (it streams one layer at a time).

Targets (issue 13, measured as ratios within one run): calibration ≤ 1.2 × forward, cold apply ≤ 2 ×,
new sparsity → result ≤ 1.3 ×; peak RSS while loading, calibrating and evaluating a 50 % plan ≤ 1.15 ×
the checkpoint's bytes + the interpreter and libraries (the RSS before loading, at least the issue's
~1 GB; ``peak_rss_over_strict_budget`` uses the RSS before loading alone) + one layer's working set.
The full-model projection multiplies per-layer times by the model's MoE-layer count (labelled projected).

    python -m benchmarks --only scale                # every shape that fits in memory here
    MOEVIZ_SCALE_MODELS=olmoe-1b-7b MOEVIZ_SCALE_LAYERS=2 python -m benchmarks --only scale
    MOEVIZ_SCALE_MODELS=demo-moe python -m benchmarks --only scale
"""

from __future__ import annotations

import json
import os
import statistics
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import verdict

THREADS = int(os.environ.get("MOEVIZ_BENCH_THREADS", "2"))
EVAL_TOKENS = int(os.environ.get("MOEVIZ_SCALE_TOKENS", "2048"))
SEQ_LEN = 256
LAZY = os.environ.get("MOEVIZ_SCALE_LAZY", "1") == "1"  # 0: the materialised path, for comparison
VOCAB = 512

# name -> (config class, MoE-layer shapes from the published config.json, MoE layers in the full model).
SHAPES: dict[str, tuple[str, dict, int]] = {
    "olmoe-1b-7b": ("OlmoeConfig", dict(hidden_size=2048, intermediate_size=1024, num_experts=64,
                                         num_experts_per_tok=8, num_attention_heads=16, num_key_value_heads=16), 16),
    "qwen1.5-moe-a2.7b": ("Qwen2MoeConfig", dict(hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
                                                 shared_expert_intermediate_size=5632, num_experts=60,
                                                 num_experts_per_tok=4, num_attention_heads=16,
                                                 num_key_value_heads=16), 24),
    "qwen3-30b-a3b": ("Qwen3MoeConfig", dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                             num_experts=128, num_experts_per_tok=8, num_attention_heads=32,
                                             num_key_value_heads=4, head_dim=128, norm_topk_prob=True), 48),
    "deepseek-v2-lite": ("DeepseekV2Config", dict(hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                                                  n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
                                                  first_k_dense_replace=0, num_attention_heads=16,
                                                  num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None,
                                                  qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128), 26),
    "gpt-oss-20b": ("GptOssConfig", dict(hidden_size=2880, intermediate_size=2880, num_local_experts=32,
                                         num_experts_per_tok=4, num_attention_heads=64, num_key_value_heads=8,
                                         head_dim=64, sliding_window=128), 24),
    "mixtral-8x7b": ("MixtralConfig", dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8,
                                           num_experts_per_tok=2, num_attention_heads=32, num_key_value_heads=8), 32),
}
# The trained demo model shipped in sample_data/ (the targets hold on it too): loaded as is, all its
# layers (MOEVIZ_SCALE_LAYERS does not apply), and also measured on the path the app takes for it (a
# materialised compressed copy, so that its decode latency can be measured, `moeviz.evaluation.sweep.use_lazy`;
# the thresholds come from the same shared tables).
DEMO = "demo-moe"
REPEATS = 3  # the forward and the new sparsity are medians of this many (the sparsities below)
NEW_SPARSITIES = (0.6, 0.55, 0.65)
LIBRARIES_BYTES = 10**9  # the "interpreter and libraries (~1 GB)"
EXPORT_FIXED_BYTES = 64 * 2**20  # export's fixed buffers (file writer, index), whatever the layer size


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_bytes() -> int:
    """Peak RSS since the last `_reset_peak` (VmHWM; ru_maxrss, which cannot be reset, where /proc lacks it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def _reset_peak() -> None:
    """VmHWM := current RSS (Linux >= 4.0), so each phase's peak is its own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _take_peak(phases: dict, name: str) -> int:
    """Record the peak RSS of the phase that just ended, start the next one; the peak so far."""
    phases[name] = _peak_bytes()
    _reset_peak()
    return max(phases.values())


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _build(name: str, layers: int, folder: Path) -> int:
    """Save a random bf16 model with `name`'s layer shapes to `folder`; its checkpoint bytes."""
    import torch
    import transformers

    cls, shape, _ = SHAPES[name]
    extra = dict(layer_types=["full_attention"] * layers) if name == "gpt-oss-20b" else {}
    config = getattr(transformers, cls)(vocab_size=VOCAB, num_hidden_layers=layers, max_position_embeddings=4096,
                                        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                                        pad_token_id=0, **shape, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():  # decisive routing, as a trained router has
        for n, p in model.named_parameters():
            if n.endswith(("gate.weight", "router.weight")):
                p.normal_(0, 0.5)
    model.save_pretrained(folder, safe_serialization=True)
    from tests.tiny_models import tiny_tokenizer

    tiny_tokenizer(VOCAB).save_pretrained(folder)
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def measure_one(name: str, layers: int) -> dict:
    """Runs in its own process (see `run`)."""
    import torch

    torch.set_num_threads(THREADS)
    import moeviz
    from moeviz.compression import CompressionPlan, PruningSettings
    from moeviz.compression.apply import Compressor
    from moeviz.data import TokenSamples
    from moeviz.evaluation import EvalSettings, Evaluator
    from moeviz.export import export_model

    tmp = Path(tempfile.mkdtemp(prefix=f"moeviz-scale-{name}-"))
    if name == DEMO:
        from moeviz.models import DEMO_MODEL_DIR as model_dir

        ckpt = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    else:
        model_dir = tmp / "model"
        ckpt = _build(name, layers, model_dir)
    import gc

    gc.collect()
    _reset_peak()  # building and saving the random model is not part of what is measured
    phases: dict[str, int] = {}  # peak RSS of each phase
    rss_before = _rss_bytes()
    lm, t_load = _timed(lambda: moeviz.load_model(model_dir, dtype=None if name == DEMO else "bfloat16"))
    layers = len(lm.layers) if name == DEMO else layers
    vocab = lm.model.config.vocab_size
    _take_peak(phases, "load")
    rss_loaded = _rss_bytes()
    g = torch.Generator().manual_seed(0)
    n = max(1, EVAL_TOKENS // SEQ_LEN)
    ids = torch.randint(3, vocab, (n, SEQ_LEN), generator=g)
    samples = TokenSamples(ids, ["text"] * n, "random", 0, f"random-{n}x{SEQ_LEN}", ["text"])

    def forward():
        with torch.no_grad():
            for i in range(0, n, 4):
                lm.model(input_ids=ids[i:i + 4])

    forward()  # warm-up (allocator, kernels)
    t_fwds = [_timed(forward)[1] for _ in range(REPEATS)]
    t_fwd = statistics.median(t_fwds)
    _take_peak(phases, "forward")
    stats, t_cal = _timed(lambda: moeviz.calibrate(lm, samples, batch_size=4))
    peak_cal = _take_peak(phases, "calibrate")
    evaluator = Evaluator(lm, samples, EvalSettings(measure_latency=False, batch_size=4))
    from moeviz.evaluation.evaluate import lazy_batch_size

    lazy_windows = lazy_batch_size(lm, samples, evaluator.settings)  # windows per forward of a lazy evaluation
    comp = Compressor(lm, stats)
    plan50 = CompressionPlan(pruning=PruningSettings(metric="moe_pruner", sparsity=0.5))
    cm, t_cold = _timed(lambda: comp.apply(plan50, lazy=LAZY))
    _, t_eval = _timed(lambda: evaluator.evaluate(cm))
    peak_eval = _take_peak(phases, "apply_evaluate")
    del cm
    gc.collect()
    def new_sparsity(compressor, lazy):  # the slider moved: apply + evaluate, median over NEW_SPARSITIES
        plans = [CompressionPlan(pruning=PruningSettings(metric="moe_pruner", sparsity=x)) for x in NEW_SPARSITIES]
        return [_timed(lambda: evaluator.evaluate(compressor.apply(p, lazy=lazy)))[1] for p in plans]

    t_news = new_sparsity(comp, LAZY)
    t_new = statistics.median(t_news)
    app_path = None
    if name == DEMO:  # what the app does with a model this small: materialised (another session's compressor)
        app = Compressor(lm, stats)
        evaluator.evaluate(app.apply(plan50, lazy=False))
        app_path = statistics.median(new_sparsity(app, False))
    from moeviz.compression.threshold_table import TABLES

    table_bytes = TABLES.nbytes  # the shared per-row threshold tables the first evaluation built
    cm = Compressor(lm, stats).apply(plan50, lazy=LAZY)  # a lazy model is materialised layer by layer by export
    _take_peak(phases, "new_sparsity")
    gc.collect()
    rss_before_export = _rss_bytes()
    _, t_export = _timed(lambda: export_model(lm, cm, tmp / "exported"))
    peak_all = _take_peak(phases, "export")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    # The budget: 1.15 x checkpoint + the interpreter and libraries (~1 GB) + one layer's working set
    # (one layer's weights). Libraries: the RSS before loading, or the 1 GB if that is more (on the
    # demo, libraries that load during `load_model` and the first evaluation, e.g. numba, are ~0.3 GB of a
    # 15 MB checkpoint's peak). `strict_budget` counts only the RSS before loading.
    strict_budget = 1.15 * ckpt + rss_before + ckpt / layers
    budget = 1.15 * ckpt + max(rss_before, LIBRARIES_BYTES) + ckpt / layers
    layer_bytes = ckpt / layers
    r = dict(
        model=name, layers=layers, lazy=LAZY, threads=torch.get_num_threads(), eval_tokens=int(ids.numel()),
        lazy_batch_windows=lazy_windows, window_tokens=SEQ_LEN,
        checkpoint_bytes=ckpt, rss_before_load_bytes=rss_before, rss_after_load_bytes=rss_loaded,
        load_s=t_load, forward_s=t_fwd, calibration_s=t_cal, cold_apply_s=t_cold, evaluate_s=t_eval,
        new_sparsity_to_result_s=t_new, export_s=t_export, threshold_table_bytes=table_bytes,
        forward_runs_s=t_fwds, new_sparsity_runs_s=t_news, new_sparsities=NEW_SPARSITIES,
        new_sparsity_app_path_s=app_path,
        peak_rss_calibrate_bytes=peak_cal, peak_rss_evaluate_bytes=peak_eval, peak_rss_with_export_bytes=peak_all,
        peak_rss_by_phase_bytes=phases, rss_before_export_bytes=rss_before_export,
        malloc_mmap_threshold=os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        ratios=dict(calibration=t_cal / t_fwd, cold_apply=t_cold / t_fwd, new_sparsity_to_result=t_new / t_fwd,
                    evaluate=t_eval / t_fwd, export=t_export / t_fwd,
                    load_rss_over_checkpoint=(rss_loaded - rss_before) / ckpt,
                    load_peak_over_checkpoint=(phases["load"] - rss_before) / ckpt,
                    export_extra_over_layer=(phases["export"] - rss_before_export) / layer_bytes,
                    peak_rss_over_budget=peak_eval / budget, peak_rss_over_strict_budget=peak_eval / strict_budget),
    )
    r["targets"] = {
        "calibration <= 1.2x forward": verdict(r["ratios"]["calibration"] <= 1.2),
        "cold apply <= 2x forward": verdict(r["ratios"]["cold_apply"] <= 2.0),
        "new sparsity -> result <= 1.3x forward": verdict(r["ratios"]["new_sparsity_to_result"] <= 1.3),
        **({} if app_path is None else {"new sparsity -> result, the app's path, <= 1.3x forward":
                                        verdict(app_path / t_fwd <= 1.3)}),
        "peak RSS (load+calibrate+evaluate 50%) <= 1.15x ckpt + interpreter + one layer":
            verdict(peak_eval <= budget),
        "export peak <= RSS before export + one layer's working set (2x its bytes + 64 MiB)":
            verdict(phases["export"] - rss_before_export <= 2 * layer_bytes + EXPORT_FIXED_BYTES),
    }
    if app_path is not None:
        r["ratios"]["new_sparsity_to_result_app_path"] = app_path / t_fwd
    if name == DEMO:
        return r
    full_layers = SHAPES[name][2]
    r["projected_full_model_cpu"] = {  # per-layer time × the full model's MoE layers: projected, not measured
        k: r[k] / layers * full_layers for k in ("forward_s", "calibration_s", "cold_apply_s", "new_sparsity_to_result_s")
    } | dict(moe_layers=full_layers, gpu="not measured")
    return r


def run() -> dict:
    names = [n for n in os.environ.get("MOEVIZ_SCALE_MODELS", ",".join([DEMO, *SHAPES])).split(",") if n]
    layers = int(os.environ.get("MOEVIZ_SCALE_LAYERS", "1"))
    results = {}
    for name in names:
        env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_scale", name, str(layers)], env=env,
                              capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        if proc.returncode != 0:
            results[name] = dict(error=(proc.stderr.strip().splitlines() or ["killed"])[-1], returncode=proc.returncode)
        else:
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(name, json.dumps(results[name].get("targets", results[name])), file=sys.stderr)
    return results


if __name__ == "__main__":
    print(json.dumps(measure_one(sys.argv[1], int(sys.argv[2]))))
