"""`moeviz` command line: the same library functions as the app, headless.

    moeviz info      [--model M]                       describe the model's MoE layers
    moeviz calibrate [--model M] [--data D] --out DIR  one calibration pass, statistics to DIR
    moeviz app       [--port P]                        start the Streamlit app (localhost)

Errors from bad input print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from moeviz.errors import MoevizError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="model folder or Hugging Face hub id (default: the bundled demo MoE)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weight dtype once loaded (default: the checkpoint's)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default: cpu)")
    p.add_argument("--device-map-auto", action="store_true",
                   help="spread a model too large for one device over all devices (accelerate)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run code from the model's repository (off by default; only for repositories you trust)")


def _load(args):
    from moeviz.models import load_model

    return load_model(args.model, dtype=args.dtype, device=args.device,
                      device_map="auto" if args.device_map_auto else None, trust_remote_code=args.trust_remote_code)


def cmd_info(args) -> int:
    lm = _load(args)
    print(json.dumps(lm.info.to_dict(), indent=2, default=str))
    return 0


def cmd_calibrate(args) -> int:
    from tqdm import tqdm

    from moeviz.calibration import calibrate
    from moeviz.data import load_calibration_data

    lm = _load(args)
    samples = load_calibration_data(lm.tokenizer, args.data, n_samples=args.samples, seq_len=args.seq_len,
                                    seed=args.seed, text_key=args.text_key)
    with tqdm(total=samples.n_samples, desc="calibrating", unit="sample", file=sys.stderr) as bar:
        stats = calibrate(lm, samples, batch_size=args.batch_size, record_tokens=args.record_tokens,
                          progress=lambda done, total: bar.update(done - bar.n))
    stats.save(args.out)
    util = stats.utilization_matrix()
    print(f"calibrated {stats.n_tokens} tokens in {stats.seconds:.1f} s over {len(stats.layers)} MoE layers; "
          f"utilization min {float(util.min()):.3f} max {float(util.max()):.3f}; statistics in {args.out}")
    return 0


def cmd_app(args) -> int:
    app = Path(__file__).resolve().parents[1] / "app.py"
    if not app.exists():
        raise MoevizError(f"app.py not found next to the moeviz package ({app}); run from a source checkout")
    cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.address", args.address,
           "--server.port", str(args.port)]
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
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--seed", type=int, default=0, help="seed for choosing the sequences (default 0)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--record-tokens", type=int, default=4096,
                   help="tokens whose full routing is recorded for drift / token views (default 4096)")
    p.add_argument("--out", required=True, help="folder for stats.json + stats.safetensors")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("app", help="start the Streamlit app")
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--address", default="localhost", help="listen address (default localhost only)")
    p.set_defaults(func=cmd_app)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MoevizError as e:
        print(f"moeviz: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
