"""Run every benchmarks/bench_*.py module's `run()` and write one JSON file per benchmark.

    python -m benchmarks [--out benchmarks/results] [--only calibration,masks]
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON results")
    parser.add_argument("--only", default="", help="comma-separated benchmark names (file names without bench_)")
    args = parser.parse_args()
    from moeviz import runtime_config

    runtime_config.configure()  # as the app and the CLI run
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(p.stem[len("bench_"):] for p in Path(__file__).parent.glob("bench_*.py"))
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    machine = dict(python=platform.python_version(), torch=torch.__version__, threads=torch.get_num_threads(),
                   processor=platform.processor() or platform.machine(), cpus=__import__("os").cpu_count())
    for name in names:
        t0 = time.perf_counter()
        result = importlib.import_module(f"benchmarks.bench_{name}").run()
        record = dict(benchmark=name, machine=machine, wall_seconds=time.perf_counter() - t0, result=result)
        (out / f"{name}.json").write_text(json.dumps(record, indent=2))
        print(f"{name}: {json.dumps(result)}")


if __name__ == "__main__":
    main()
