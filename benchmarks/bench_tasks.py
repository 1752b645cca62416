"""The bundled lm-eval tasks on the demo MoE (docs/TASKS.md): accuracy ± stderr of the base model and of
50 % / 70 % pruning with each method and 4-bit quantization, the paired change against the base, and the
time of one evaluation of all tasks at one torch thread (target ≤ 10 s).

    python -m benchmarks --only tasks        (or: python -m benchmarks.bench_tasks [--markdown])

"Beyond stderr": a plan's drop in task accuracy is compared with the standard error of the *paired*
per-item difference (the same items scored by both models), sqrt(var(d) / n) over the n items' 0/1
differences d, pooled over every task.
"""

from __future__ import annotations

import math
import statistics
import time

import torch

TARGET_S = 10.0
PLANS = [("base", {})] + [
    (f"{m} {int(s * 100)} %", dict(pruning=dict(metric=m, sparsity=s)))
    for m in ("magnitude", "wanda", "moe_pruner", "sparsegpt") for s in (0.5, 0.7)
] + [("4-bit RTN (group 128)", dict(quant=dict(bits=4))), ("4-bit GPTQ (group 128)", dict(quant=dict(bits=4, method="gptq")))]


def _load() -> float | None:
    try:
        import os

        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _correct(samples: dict) -> dict[str, list[int]]:
    """task -> per item 1 if the highest-loglikelihood choice is the answer (lm-eval's acc)."""
    return {t: [int(max(range(len(s["loglikelihoods"])), key=s["loglikelihoods"].__getitem__) == s["target"])
                for s in rows] for t, rows in samples.items()}


def run() -> dict:
    import moeviz
    from moeviz.compression.apply import Compressor
    from moeviz.compression.plan import CompressionPlan
    from moeviz.evaluation.tasks import TaskSettings, evaluate_tasks, task_average

    torch.set_num_threads(1)
    lm = moeviz.load_model()
    cal = moeviz.load_calibration_data(lm.tokenizer, n_samples=32, seq_len=128)
    stats = moeviz.calibrate(lm, cal)
    comp = Compressor(lm, stats)
    settings = TaskSettings()  # every bundled task, every item, zero-shot, seed 1234
    evaluate_tasks(lm.model, lm.tokenizer, TaskSettings(tasks=["moeviz_code_cloze"], limit=2))  # imports, warm-up
    times, cpu = [], []
    for _ in range(2):
        t0, c0 = time.perf_counter(), time.process_time()
        base = evaluate_tasks(lm.model, lm.tokenizer, settings, keep_samples=True)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    base_correct = _correct(base.samples)
    rows = []
    for name, d in PLANS:
        plan = CompressionPlan.from_dict(d)
        r = base if name == "base" else evaluate_tasks(comp.apply(plan, cal).model, lm.tokenizer, settings,
                                                       keep_samples=True)
        correct = _correct(r.samples)
        diffs = [c - b for t in correct for c, b in zip(correct[t], base_correct[t])]
        n = len(diffs)
        mean_d = sum(diffs) / n
        paired_se = math.sqrt(sum((x - mean_d) ** 2 for x in diffs) / (n - 1) / n) if n > 1 else float("nan")
        avg, avg_se = task_average(r.tasks)
        pooled = sum(sum(v) for v in correct.values()) / n
        rows.append(dict(
            plan=name, tasks={t: dict(acc=v["acc"], acc_stderr=v["acc_stderr"], acc_norm=v["acc_norm"], n=v["n"])
                              for t, v in r.tasks.items()},
            task_average=avg, task_average_stderr=avg_se, pooled_accuracy=pooled, items=n,
            paired_change_vs_base=mean_d, paired_change_stderr=paired_se,
            beyond_stderr=bool(name != "base" and abs(mean_d) > paired_se),
            beyond_2_stderr=bool(name != "base" and abs(mean_d) > 2 * paired_se),
        ))
    one = statistics.median(times)
    return dict(model="demo-moe", threads=torch.get_num_threads(), items=sum(t["n"] for t in base.tasks.values()),
                lm_eval_version=base.lm_eval_version, settings=settings.to_dict(),
                one_evaluation_s=one, evaluation_s_all=times, target_s=TARGET_S,
                # CPU seconds of this process in the same evaluations: at one thread, the wall time an idle
                # machine would show; on a shared machine the wall time above also counts waiting for a core.
                one_evaluation_cpu_s=statistics.median(cpu), load_average_1min=_load(),
                status="PASS" if one <= TARGET_S else "MISS", chance=0.25, rows=rows)


def markdown(result: dict) -> str:
    tasks = sorted(result["rows"][0]["tasks"])
    short = [t.removeprefix("moeviz_") for t in tasks]
    head = "| plan | " + " | ".join(short) + " | average | paired Δ vs base (pooled) |\n"
    head += "|---" * (len(tasks) + 3) + "|\n"
    lines = []
    for r in result["rows"]:
        cells = [f"{100 * r['tasks'][t]['acc']:.1f} ± {100 * r['tasks'][t]['acc_stderr']:.1f}" for t in tasks]
        delta = "—" if r["plan"] == "base" else (
            f"{100 * r['paired_change_vs_base']:+.1f} ± {100 * r['paired_change_stderr']:.1f}"
            + (" **" if r["beyond_2_stderr"] else " *" if r["beyond_stderr"] else ""))
        lines.append(f"| {r['plan']} | " + " | ".join(cells)
                     + f" | {100 * r['task_average']:.1f} ± {100 * r['task_average_stderr']:.1f} | {delta} |")
    return head + "\n".join(lines)


if __name__ == "__main__":
    import json
    import sys

    out = run()
    print(markdown(out) if "--markdown" in sys.argv else json.dumps(out, indent=2))
