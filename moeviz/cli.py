"""`moeviz` command line: the same library functions as the app, headless.

    moeviz info      [--model M]                       describe the model's MoE layers
    moeviz calibrate [--model M] [--data D] --out DIR  one calibration pass, statistics to DIR
    moeviz evaluate  --plan plan.json [--model M]      apply a plan, evaluate on held-out text, store the run
                     [--method sparsegpt] [--quant-method gptq] [--hessian plain] [--act-order]
                                                       (also export / sweep: second-order methods on top of the plan)
    moeviz sweep     --methods ... --sparsities ... --bits ...   evaluate a grid, store runs, write a CSV
                     (evaluate / sweep: --tasks bundled,NAME --include-path DIR --limit N: lm-eval task accuracy)
    moeviz export    --plan plan.json --out DIR        write the compressed model (HF folder) + plan + report
    moeviz recover   --plan plan.json [--steps N]      distil the compressed model from the base; both runs stored
    moeviz sensitivity [--budget-sparsity R | --budget-bits B | --budget-ratio X] [--plan-out plan.json]
                                                       per-expert sensitivity; optionally a plan fitted to a budget
    moeviz app       [--port P]                        start the Streamlit app (localhost)

Errors from bad input print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from moeviz import runtime_config
from moeviz.registry import METRICS, NM_PATTERNS, SCORE_METRICS
from moeviz.errors import MoevizError

DEFAULT_SEQ_LEN = 128  # calibration windows
DEFAULT_EVAL_SEQ_LEN = 256  # held-out windows


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="model folder or Hugging Face hub id (default: the bundled demo MoE)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weight dtype once loaded (default: the checkpoint's)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default: cpu)")
    p.add_argument("--device-map-auto", action="store_true",
                   help="spread a model too large for one device over all devices (accelerate)")
    p.add_argument("--max-memory", default=None, metavar="DEV=SIZE,...",
                   help="per-device budget, e.g. cpu=8GiB or 0=20GiB,cpu=60GiB; what does not fit is offloaded "
                        "(implies --device-map-auto)")
    p.add_argument("--offload-folder", default=None, help="folder for weights offloaded to disk (with --max-memory)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run code from the model's repository (off by default; only for repositories you trust)")


def _load(args):
    from moeviz.models import load_model

    max_memory = None
    if getattr(args, "max_memory", None):  # "0=20GiB,cpu=60GiB" -> {0: "20GiB", "cpu": "60GiB"}
        pairs = [item.split("=", 1) for item in args.max_memory.split(",") if item]
        max_memory = {int(k) if k.isdigit() else k: v for k, v in pairs}
    return load_model(args.model, dtype=args.dtype, device=args.device,
                      device_map="auto" if args.device_map_auto else None, trust_remote_code=args.trust_remote_code,
                      max_memory=max_memory, offload_folder=getattr(args, "offload_folder", None))


def _source(args) -> str:
    """The model source as load_model will see it (folder or hub id), without loading anything."""
    from moeviz.models.loading import resolve_source

    return resolve_source(args.model)[0]


def cmd_info(args) -> int:
    lm = _load(args)
    print(json.dumps(lm.info.to_dict(), indent=2, default=str))
    return 0


def cmd_calibrate(args) -> int:
    from tqdm import tqdm

    from moeviz.calibration import calibrate
    from moeviz.data import load_calibration_data

    _check_counts(args)
    _check_data_files(args)
    lm = _load(args)
    samples = load_calibration_data(lm.tokenizer, args.data, n_samples=args.samples, seq_len=_seq_len(args, lm),
                                    seed=args.seed, text_key=args.text_key, max_seq_len=lm.max_context)
    with tqdm(total=samples.n_samples, desc="calibrating", unit="sample", file=sys.stderr) as bar:
        stats = calibrate(lm, samples, batch_size=args.batch_size, record_tokens=args.record_tokens,
                          progress=lambda done, total: bar.update(done - bar.n))
    stats.save(args.out)
    util = stats.utilization_matrix()
    print(f"calibrated {stats.n_tokens} tokens in {stats.seconds:.1f} s over {len(stats.layers)} MoE layers; "
          f"utilization min {float(util.min()):.3f} max {float(util.max()):.3f}; statistics in {args.out}")
    return 0


def _calibrated(args, lm):
    """Calibration statistics for the evaluate / sweep commands (cached on disk by fingerprint)."""
    from tqdm import tqdm

    from moeviz.data import load_calibration_data
    from moeviz.workspace import calibrate_cached

    samples = load_calibration_data(lm.tokenizer, args.data, n_samples=args.samples, seq_len=_seq_len(args, lm),
                                    seed=args.seed, max_seq_len=lm.max_context)
    with tqdm(total=samples.n_samples, desc="calibrating", unit="sample", file=sys.stderr) as bar:
        stats, _ = calibrate_cached(lm, samples, progress=lambda d, t: bar.update(d - bar.n))
    return stats, samples


def _eval_settings(args):
    from moeviz.evaluation import EvalSettings

    return EvalSettings(measure_latency=not args.no_latency, accelerator=args.accelerator).validate()


def _evaluator(args, lm):
    from moeviz.evaluation import Evaluator, load_eval_samples

    seq_len = _seq_len(args, lm, "eval_seq_len", DEFAULT_EVAL_SEQ_LEN)
    held = load_eval_samples(lm.tokenizer, args.eval_data, seq_len=seq_len, max_samples=args.eval_samples,
                             max_seq_len=lm.max_context)
    return Evaluator(lm, held, _eval_settings(args))


def _seq_len(args, lm, name: str = "seq_len", default: int = DEFAULT_SEQ_LEN) -> int:
    """The window length asked for; unset, the default shortened to the context of a model built for
    fewer tokens (only a length the user typed is refused for exceeding it)."""
    return getattr(args, name) or min(default, lm.max_context or default)


def _check_data_files(args) -> None:
    """Missing text files fail before the model loads (reading them needs its tokenizer, so the
    rest of their checks come after)."""
    from moeviz.errors import CalibrationDataError

    for flag in ("data", "eval_data"):
        path = getattr(args, flag, None)
        if path is not None and not Path(path).expanduser().is_file():
            raise CalibrationDataError(f"--{flag.replace('_', '-')}: file {path} does not exist")


# Count options: name -> smallest valid value (0 would crash the batching loop or give NaN metrics).
_COUNTS = {"samples": 1, "batch_size": 1, "eval_samples": 1, "record_tokens": 0}


def _check_counts(args) -> None:
    from moeviz.errors import SettingsError

    for name, low in _COUNTS.items():
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise SettingsError(f"--{name.replace('_', '-')}: must be at least {low}, got {value}")


def _check_before_load(args) -> None:
    """Everything that can be checked without the model: a bad option fails in a second, not after
    loading and calibrating."""
    _eval_settings(args)
    _check_counts(args)
    _check_data_files(args)
    _task_settings(args)


def _task_settings(args):
    """TaskSettings of --tasks / --include-path / --limit / --num-fewshot / --task-seed (None without
    --tasks); without lm-eval installed, one line naming the extra. Task names are checked here too."""
    if not hasattr(args, "tasks"):
        return None
    from moeviz.evaluation.tasks import TaskSettings, require_lm_eval, resolve_tasks

    settings = TaskSettings.from_cli(args.tasks, args.include_path, args.limit, args.num_fewshot, args.task_seed)
    if settings is not None:
        require_lm_eval()
        resolve_tasks(settings)
    return settings


def _read_plan(path: str):
    """The plan file, parsed and validated as far as possible without a model (ratios, bits, names)."""
    from moeviz.compression.plan import CompressionPlan
    from moeviz.errors import PlanError

    path = Path(path)
    if not path.is_file():
        raise PlanError(f"plan file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PlanError(f"plan file {path} is not UTF-8 text; give the JSON file the app's Export page writes") from None
    return CompressionPlan.from_json(text).validate()


def _add_method_args(p: argparse.ArgumentParser, sweep: bool = False) -> None:
    """Second-order settings (SparseGPT / GPTQ, moeviz.compression.second_order) on top of the plan."""
    if not sweep:
        p.add_argument("--method", default=None,
                       help=f"pruning metric instead of the plan's ({', '.join(METRICS)})")
    p.add_argument("--quant-method", default=None, choices=["rtn", "gptq"],
                   help="weight quantization method instead of the plan's (rtn, gptq)")
    p.add_argument("--hessian", default=None, choices=["router_weighted", "plain"],
                   help="SparseGPT / GPTQ Hessian per expert: Σ g² x xᵀ over routed tokens, or Σ x xᵀ")
    p.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing Hessian diagonal")
    p.add_argument("--percdamp", type=float, default=None, help="SparseGPT / GPTQ damping (fraction of mean diag H)")


def _with_methods(args, plan):
    """The plan with the command line's method settings applied, validated."""
    if getattr(args, "method", None):
        plan.pruning.metric = args.method
    if args.quant_method:
        plan.quant.method = args.quant_method
    if args.hessian:
        plan.hessian = args.hessian
    if args.act_order:
        plan.act_order = True
    if args.percdamp is not None:
        plan.percdamp = args.percdamp
    return plan.validate()


def _check_against_model(args, plans) -> None:
    """The checks that need the model's shapes and context, made on a weightless (meta-device) copy
    built from its config: a plan that does not fit fails before the weights load, not after calibrating."""
    from moeviz.compression.apply import check_plan_fits
    from moeviz.data import check_seq_len
    from moeviz.models.loading import inspect_model

    shape = inspect_model(args.model, trust_remote_code=args.trust_remote_code)
    for plan in plans:
        check_plan_fits(plan, shape.layers, routing_known=False)
    for typed in (args.seq_len, args.eval_seq_len):
        if typed is not None:
            check_seq_len(typed, shape.max_context)


def _check_loaded(lm, plans) -> None:
    """Checks that need the loaded model (whether its routing rule was verified, so removed experts can
    be re-routed): made before calibrating."""
    from moeviz.compression.apply import check_plan_fits

    for plan in plans:
        check_plan_fits(plan, lm.layers)


def cmd_evaluate(args) -> int:
    from moeviz.session import Session
    from moeviz.store import RunStore

    plan = _with_methods(args, _read_plan(args.plan))
    _check_before_load(args)
    _check_against_model(args, [plan])
    lm = _load(args)
    _check_loaded(lm, [plan])
    stats, samples = _calibrated(args, lm)
    tasks = _task_settings(args)
    session = Session(lm, _evaluator(args, lm), None if args.no_store else RunStore(args.store), stats, samples)
    result, run_id, _ = session.evaluate(plan, tasks=tasks)
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2))
    m = result.metrics()
    summary = {k: m[k] for k in ("perplexity", "base_perplexity", "accuracy", "base_accuracy",
                                 "compression_ratio", "compression_ratio_bf16", "export_compression_ratio",
                                 "experts_compression_ratio", "projected_decode_ms",
                                 "mean_cv", "mean_topk_overlap", "mean_kl")}
    summary.update({f"{k}_95ci": [m.get(f"{k}_lo"), m.get(f"{k}_hi")] for k in ("perplexity", "accuracy", "mean_kl")})
    if result.tasks:
        summary["tasks"] = {name: {k: t[k] for k in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n")}
                            for name, t in result.tasks.items()}
        summary["task_average"], summary["task_average_stderr"] = m.get("task_average"), m.get("task_average_stderr")
    # measured on this machine, back to back; the compressed side on low-bit kernels where it has them
    summary.update({k: m[k] for k in ("measured_decode_ms", "base_measured_decode_ms", "packed_expert_bytes") if k in m})
    summary["latency_kernels"] = result.packed["kernels"] if result.packed else None
    print(json.dumps(summary | {"run_id": run_id}, indent=2))
    return 0


def cmd_sweep(args) -> int:
    from tqdm import tqdm

    from moeviz.compression.plan import CompressionPlan, QuantSettings
    from moeviz.evaluation import grid_plans
    from moeviz.session import Session
    from moeviz.store import RunStore

    # Validate the whole grid before loading anything, so bad input fails in a second.
    plans = grid_plans(args.methods, args.sparsities, args.bits, structure=args.structure,
                       base=_with_methods(args, CompressionPlan(quant=QuantSettings(group_size=args.group_size))))
    _check_before_load(args)
    _check_against_model(args, plans)
    lm = _load(args)
    _check_loaded(lm, plans)
    stats, samples = _calibrated(args, lm)
    evaluator = _evaluator(args, lm)
    tasks = _task_settings(args)
    with tqdm(total=len(plans), desc="sweep", unit="plan", file=sys.stderr) as bar:
        session = Session(lm, evaluator, None if args.no_store else RunStore(args.store), stats, samples)
        df = session.sweep(plans, progress=lambda d, t, row: bar.update(d - bar.n), tasks=tasks)
    df.to_csv(args.csv, index=False)
    if args.json:  # every plan's task scores (with the base's) and intervals, for a paper's table
        keep = [c for c in df.columns if c != "plan_json"]
        Path(args.json).write_text(json.dumps(dict(
            sweep_id=df.attrs.get("sweep_id"), task_settings=None if tasks is None else tasks.to_dict(),
            runs=[{k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}
                  for row in df[keep].to_dict("records")],
            tasks=df.attrs.get("task_results", [])), indent=2, default=str))
    print(f"{len(df)} plans evaluated; results in {args.csv}" + (f"; sweep {df.attrs['sweep_id']}" if df.attrs.get("sweep_id") else ""))
    return 0


def cmd_sensitivity(args) -> int:
    from tqdm import tqdm

    from moeviz.errors import SettingsError
    from moeviz.sensitivity import SensitivityGrid
    from moeviz.sensitivity.cache import sensitivity_cached
    from moeviz.sensitivity.measure import first_windows

    grid = SensitivityGrid(sparsities=tuple(args.sparsities), bits=tuple(args.bits), metric=args.metric,
                           group_size=args.group_size).validate()
    budget = [(k, getattr(args, k)) for k in ("budget_sparsity", "budget_bits", "budget_ratio") if getattr(args, k) is not None]
    if len(budget) > 1:
        raise SettingsError("give at most one of --budget-sparsity, --budget-bits, --budget-ratio")
    _check_counts(args)
    if args.sens_samples < 1:
        raise SettingsError(f"--sens-samples: must be at least 1, got {args.sens_samples}")
    _check_data_files(args)
    lm = _load(args)
    stats, samples = _calibrated(args, lm)
    sub = first_windows(samples, args.sens_samples)
    with tqdm(total=len(grid.settings()) * len(lm.layers), desc="sensitivity", unit="setting×layer",
              file=sys.stderr) as bar:
        sens, cached = sensitivity_cached(lm, stats, sub, grid, progress=lambda d, t: bar.update(d - bar.n),
                                          measure=not args.estimate_only)
    summary = sens.summary()
    print(f"sensitivity of {sum(sens.num_experts)} experts × {len(sens.settings)} settings on {sens.n_tokens} tokens"
          + (" (cached)" if cached else f" in {sens.seconds:.1f} s on {sens.threads} thread(s)"))
    for name, rho in summary.get("rank_correlation", {}).items():
        print(f"  proxy {name}: Spearman rank correlation per layer " + " ".join(f"{r:.3f}" for r in rho))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(summary=summary,
                                                   measured=None if sens.measured is None else sens.measured.tolist(),
                                                   estimated={k: v.tolist() for k, v in sens.estimated.items()}),
                                              indent=1))
    if budget:
        from moeviz.sensitivity.budget import Budget, optimise_plan

        kind, value = budget[0]
        kind = dict(budget_sparsity="mean_sparsity", budget_bits="mean_bits", budget_ratio="experts_ratio")[kind]
        result = optimise_plan(lm, sens, Budget(kind, value), kind="fisher" if args.estimate_only else "measured",
                               target=args.target)
        out = Path(args.plan_out)
        out.write_text(result.plan.to_json())
        print(f"plan for {kind} {value}: predicted Δ loss {result.predicted_delta:.4f}, experts "
              f"{result.experts_bytes} bytes (ratio {result.experts_ratio:.2f}×) -> {out}")
    return 0


def cmd_compare(args) -> int:
    """Evaluate a checkpoint compressed elsewhere against its base (--model) exactly as a moeviz plan is."""
    from moeviz.compare import external_checkpoint
    from moeviz.evaluation.sweep import store_result
    from moeviz.store import RunStore

    lm = _load(args)
    compressed = external_checkpoint(lm, args.compressed, name=args.name)
    result = _evaluator(args, lm).evaluate(compressed)
    run_id = None if args.no_store else store_result(RunStore(args.store), result, compressed.plan, lm.fingerprint,
                                                      None, name=compressed.plan.name)
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2))
    m = result.metrics()
    keys = ("perplexity", "base_perplexity", "accuracy", "base_accuracy", "compression_ratio",
            "experts_compression_ratio", "mean_cv", "base_mean_cv", "mean_topk_overlap", "mean_kl",
            "measured_decode_ms", "base_measured_decode_ms")
    print(json.dumps({k: m[k] for k in keys if k in m} | {"run_id": run_id}, indent=2))
    return 0


def cmd_export(args) -> int:
    from moeviz.compression.apply import Compressor
    from moeviz.export import check_destination, export_format, export_model, exported_files

    plan = _with_methods(args, _read_plan(args.plan))
    _check_before_load(args)
    check_destination(_source(args), args.out, args.overwrite)  # before loading, and again when writing
    _check_against_model(args, [plan])
    lm = _load(args)
    _check_loaded(lm, [plan])
    stats, samples = _calibrated(args, lm)
    compressed = Compressor(lm, stats).apply(plan, samples)  # applied once: evaluated and exported as is
    deploy = compressed.storage.deployability
    print("deployable to:")
    for line in deploy.lines():
        print(f"  {line}")
    fmt = export_format(args.format, compressed)
    result = None if args.no_eval else _evaluator(args, lm).evaluate(compressed).to_dict()
    out = export_model(lm, compressed, args.out, overwrite=args.overwrite, result=result, format=fmt)
    files = exported_files(out)
    ratio = compressed.storage.base_bytes / max(files.data_bytes, 1)
    print(f"exported to {out} ({fmt}: {files.file_bytes:,} bytes of safetensors, {ratio:.2f}× smaller than the base's tensors)")
    print(f"load it with: {files.load[0]}")
    return 0


def cmd_recover(args) -> int:
    from tqdm import tqdm

    from moeviz.compression.apply import Compressor
    from moeviz.evaluation import evaluate_plan
    from moeviz.recovery import RecoverySettings, gap_recovered, recover_and_evaluate
    from moeviz.store import RunStore

    plan = _read_plan(args.plan)
    settings = RecoverySettings(steps=args.steps, learning_rate=args.lr, batch_size=args.batch_size,
                                lambda_expert=args.lambda_expert, lambda_router=args.lambda_router,
                                train=args.train, max_seconds=args.max_seconds, seed=args.seed).validate()
    _check_before_load(args)
    if args.out:
        from moeviz.export import check_destination

        check_destination(_source(args), args.out, args.overwrite)  # fail before loading and training
    _check_against_model(args, [plan])
    lm = _load(args)
    _check_loaded(lm, [plan])
    stats, samples = _calibrated(args, lm)
    compressor, evaluator = Compressor(lm, stats), _evaluator(args, lm)
    store = None if args.no_store else RunStore(args.store)
    before, parent = evaluate_plan(compressor, evaluator, plan, store, samples=samples)
    with tqdm(total=settings.steps, desc="recovery", unit="step", file=sys.stderr) as bar:
        def progress(step, total, row):
            bar.update(step - bar.n)
            bar.set_postfix(ce=f"{row['ce']:.3f}", mse=f"{row['expert_mse']:.3g}", kl=f"{row['router_kl']:.3g}")

        recovery, after, run_id, model = recover_and_evaluate(compressor, evaluator, plan, samples, settings, store,
                                                              parent, progress=progress)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(recovery=recovery.to_dict(), before=before.to_dict(),
                                                   after=after.to_dict()), indent=2))
    base = evaluator.base.loss["perplexity"]
    print(json.dumps(dict(
        base_perplexity=base, perplexity_before=before.perplexity, perplexity_after=after.perplexity,
        gap_recovered=gap_recovered(before.perplexity, after.perplexity, base),
        accuracy_before=before.accuracy, accuracy_after=after.accuracy, steps=recovery.steps_done,
        stopped_early=recovery.stopped_early, seconds=recovery.seconds, lambda_expert=recovery.lambda_expert,
        lambda_router=recovery.lambda_router, parent_run_id=parent, run_id=run_id), indent=2))
    if args.out:
        from moeviz.export import export_model

        print(f"exported to {export_model(lm, model, args.out, overwrite=args.overwrite, result=after.to_dict())}")
    return 0


def cmd_app(args) -> int:
    from moeviz.resources import APP_FILE

    if not APP_FILE.exists():
        raise MoevizError(f"the app ({APP_FILE}) is missing from this installation; reinstall moeviz")
    # Passed on the command line because Streamlit reads .streamlit/config.toml from the working directory,
    # which is not the checkout once moeviz is installed. No file watcher: a user's app never reloads itself,
    # and watching walks every imported file (an idle server used most of a core on a virtualenv).
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP_FILE), "--server.address", args.address,
           "--server.port", str(args.port), "--server.fileWatcherType", "none", "--server.headless", "true",
           "--browser.gatherUsageStats", "false"]
    return subprocess.call(cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeviz", description="Visualise and compress Mixture-of-Experts LMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="describe a model's MoE layers (JSON)")
    _add_model_args(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("calibrate", help="run one calibration pass and save its statistics")
    _add_model_args(p)
    p.add_argument("--data", default=None,
                   help="calibration text: a .txt or .jsonl file (default: the bundled calibration text)")
    p.add_argument("--text-key", default="text", help="JSON field holding the text in a .jsonl file")
    p.add_argument("--samples", type=int, default=64, help="number of sequences (default 64)")
    p.add_argument("--seq-len", type=int, default=None,
                   help=f"tokens per sequence (default {DEFAULT_SEQ_LEN}, or the model's context if shorter)")
    p.add_argument("--seed", type=int, default=0, help="seed for choosing the sequences (default 0)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--record-tokens", type=int, default=4096,
                   help="tokens whose full routing is recorded for drift / token views (default 4096)")
    p.add_argument("--out", required=True, help="folder for stats.json + stats.safetensors")
    p.set_defaults(func=cmd_calibrate)

    def add_eval_args(p):
        _add_model_args(p)
        p.add_argument("--data", default=None, help="calibration text (.txt/.jsonl; default: bundled)")
        p.add_argument("--samples", type=int, default=64, help="calibration sequences (default 64)")
        p.add_argument("--seq-len", type=int, default=None,
                       help=f"calibration tokens per sequence (default {DEFAULT_SEQ_LEN}, or the model's context "
                            "if shorter)")
        p.add_argument("--seed", type=int, default=0, help="calibration seed (default 0)")
        p.add_argument("--eval-data", default=None, help="held-out text (.txt/.jsonl; default: bundled held-out)")
        p.add_argument("--eval-seq-len", type=int, default=None,
                       help=f"held-out window length (default {DEFAULT_EVAL_SEQ_LEN}, or the model's context if shorter)")
        p.add_argument("--eval-samples", type=int, default=64, help="held-out windows, at most (default 64)")
        p.add_argument("--accelerator", default="NVIDIA H100 SXM", help="device of the projected (roofline) latency")
        p.add_argument("--no-latency", action="store_true", help="skip the measured latency on this machine")
        p.add_argument("--store", default=None, help="run store file (default: runs.sqlite in $MOEVIZ_DATA_DIR)")
        p.add_argument("--no-store", action="store_true", help="do not store the run(s)")

    def add_task_args(p):
        g = p.add_argument_group("task accuracy (lm-eval-harness: pip install 'moeviz[eval]')")
        g.add_argument("--tasks", default=None, metavar="A,B",
                       help="lm-eval tasks run on the base and compressed model: 'bundled' (moeviz's offline "
                            "tasks from its held-out text), task names / tags from --include-path, or lm-eval's "
                            "standard tasks when their data sets are available (online or cached)")
        g.add_argument("--include-path", default=None, metavar="DIR", help="folder of lm-eval task YAML files")
        g.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N items of each task")
        g.add_argument("--num-fewshot", type=int, default=0, help="few-shot examples per item (default 0)")
        g.add_argument("--task-seed", type=int, default=1234, help="lm-eval's seeds (default 1234, lm-eval's)")

    p = sub.add_parser("evaluate", help="apply a plan (JSON) and evaluate it against the base model")
    add_eval_args(p)
    p.add_argument("--plan", required=True, help="plan file written by the app's Export page or CompressionPlan.to_json")
    p.add_argument("--json", default=None, help="also write every detail of the result to this JSON file")
    _add_method_args(p)
    add_task_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("sweep", help="evaluate a method × sparsity × bits grid; runs stored, table to CSV")
    add_eval_args(p)
    p.add_argument("--methods", nargs="+", default=list(SCORE_METRICS), help=f"pruning metrics ({', '.join(METRICS)})")
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.25, 0.5, 0.75], help="global sparsities in [0, 1)")
    p.add_argument("--bits", nargs="+", type=int, default=[16], help="expert weight bits (2, 3, 4, 8, 16)")
    p.add_argument("--structure", default="unstructured", help=f"unstructured or N:M such as {', '.join(NM_PATTERNS)}")
    p.add_argument("--group-size", type=int, default=128, help="quantization group size (-1 = whole row)")
    p.add_argument("--csv", default="moeviz_sweep.csv", help="output table (default moeviz_sweep.csv)")
    p.add_argument("--json", default=None, help="also write every plan's metrics and task scores to this JSON file")
    _add_method_args(p, sweep=True)
    add_task_args(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("sensitivity", help="measure each expert's Δ loss at a grid of settings; fit a plan to a budget")
    add_eval_args(p)
    p.add_argument("--sens-samples", type=int, default=16,
                   help="calibration windows the sensitivity is measured on (the first N; default 16)")
    p.add_argument("--metric", default="moe_pruner", help=f"pruning metric ({', '.join(SCORE_METRICS)})")
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.0, 0.3, 0.5, 0.7, 0.9], help="grid sparsities")
    p.add_argument("--bits", nargs="+", type=int, default=[16, 8, 4, 3, 2], help="grid bit widths")
    p.add_argument("--group-size", type=int, default=128, help="quantization group size (-1 = whole row)")
    p.add_argument("--json", default=None, help="write the sensitivity arrays and summary to this JSON file")
    p.add_argument("--estimate-only", action="store_true",
                   help="only the one-backward Fisher proxy (large models); a fitted plan then uses it")
    p.add_argument("--budget-sparsity", type=float, default=None, help="fit a plan to this mean expert sparsity")
    p.add_argument("--budget-bits", type=float, default=None, help="fit a plan to this mean bit width (bits 16 = dense)")
    p.add_argument("--budget-ratio", type=float, default=None, help="fit a plan to this experts compression ratio (×)")
    p.add_argument("--plan-out", default="moeviz_plan.json", help="where the fitted plan goes (default moeviz_plan.json)")
    p.add_argument("--target", choices=("any", "hf-dense", "vllm"), default="hf-dense",
                   help="what the fitted plan must export to: hf-dense (default: the same removal count in every "
                        "layer), vllm (also one bit width per layer among 4, 8, 16), any (no constraint; may not export)")
    p.set_defaults(func=cmd_sensitivity)

    p = sub.add_parser("compare", help="evaluate a checkpoint compressed by another tool (compressed-tensors or dense, "
                                       "same architecture) against its base (--model), as a plan is; run stored")
    add_eval_args(p)
    p.add_argument("--compressed", required=True, help="the compressed checkpoint: folder or hub id")
    p.add_argument("--name", default=None, help="run name (default: external: <folder name>)")
    p.add_argument("--json", default=None, help="also write the whole result to this JSON file")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("export", help="apply a plan and save the compressed model as a Hugging Face folder")
    add_eval_args(p)
    p.add_argument("--plan", required=True, help="plan JSON")
    p.add_argument("--out", required=True, help="new folder for the exported model (never the source folder)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-eval", action="store_true", help="skip evaluating the plan for the report")
    p.add_argument("--format", choices=("auto", "dense", "compressed-tensors"), default="auto",
                   help="compressed-tensors: quantized experts packed (llm-compressor's format, served by vLLM); "
                        "dense: every weight in the model dtype; auto (default): compressed-tensors when the plan "
                        "quantizes experts in a way it can hold, else dense")
    _add_method_args(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("recover", help="distil a compressed plan from the base model; unrecovered and recovered runs stored")
    add_eval_args(p)
    p.add_argument("--plan", required=True, help="plan JSON")
    p.add_argument("--steps", type=int, default=100, help="training steps (default 100)")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (default 3e-4)")
    p.add_argument("--batch-size", type=int, default=4, help="calibration windows per step (default 4)")
    p.add_argument("--lambda-expert", type=float, default=None,
                   help="weight of the expert-output MSE (default: balanced so it equals the CE at the start)")
    p.add_argument("--lambda-router", type=float, default=None,
                   help="weight of the router KL (default: balanced so it equals the CE at the start; 0 = off)")
    p.add_argument("--train", default="experts", choices=["experts", "experts+router"], help="what trains")
    p.add_argument("--max-seconds", type=float, default=None, help="stop training after this many seconds")
    p.add_argument("--out", default=None, help="also export the recovered model to this new folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--json", default=None, help="write the loss history and both results to this JSON file")
    p.set_defaults(func=cmd_recover)

    p = sub.add_parser("app", help="start the Streamlit app")
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--address", default="localhost", help="listen address (default localhost only)")
    p.set_defaults(func=cmd_app)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runtime_config.configure()  # the process-wide settings (allocator, loader reads, kernels), env switches
    try:
        return args.func(args)
    except MoevizError as e:
        print(f"moeviz: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
