"""CLI: ``python -m moeviz.demo {train,evaluate}``."""
from __future__ import annotations

import argparse
import dataclasses
import sys


def main(argv=None) -> int:
    from moeviz.demo.train import TINY_OVERRIDES, TrainSettings

    d = TrainSettings()
    ap = argparse.ArgumentParser(prog="python -m moeviz.demo", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train tokenizer + demo Mixtral (seeded, CPU)",
                       description="Build the corpus from this Python installation (pydoc topics, "
                       "stdlib source, seeded tables), train a byte-level BPE tokenizer and a small "
                       "MixtralForCausalLM, save it with save_pretrained, then evaluate it and write "
                       "moeviz_card.json. The fixed calibration/held-out jsonl files are written to "
                       "--data-dir, or reused (and excluded from training) if they already exist.")
    t.add_argument("--out", default=d.out, help="model folder (default: %(default)s)")
    t.add_argument("--data-dir", default=None, help="folder of calibration.jsonl/heldout.jsonl (default: parent of --out)")
    t.add_argument("--steps", type=int, default=d.steps, help="optimizer steps (default: %(default)s)")
    t.add_argument("--seed", type=int, default=d.seed, help="seed for corpus split, tables, init, sampling")
    t.add_argument("--batch-size", type=int, default=d.batch_size)
    t.add_argument("--seq-len", type=int, default=d.seq_len)
    t.add_argument("--lr", type=float, default=d.lr, help="peak AdamW lr (warmup then cosine)")
    t.add_argument("--warmup", type=int, default=d.warmup)
    t.add_argument("--vocab-size", type=int, default=d.vocab_size)
    t.add_argument("--hidden-size", type=int, default=d.hidden_size)
    t.add_argument("--intermediate-size", type=int, default=d.intermediate_size)
    t.add_argument("--layers", type=int, default=d.num_layers)
    t.add_argument("--aux-loss-coef", type=float, default=d.aux_loss_coef, help="router load-balancing weight")
    t.add_argument("--threads", type=int, default=d.threads, help="torch.set_num_threads")
    t.add_argument("--tiny", action="store_true", help="smoke-test size: tiny corpus slice, model and step count")
    t.add_argument("--rewrite-eval-data", action="store_true", help="regenerate the jsonl files even if present")
    t.add_argument("--no-eval", action="store_true", help="skip the evaluation / card after training")

    e = sub.add_parser("evaluate", help="held-out ppl / accuracy / routing / pruning of a model folder")
    e.add_argument("--model", default=d.out)
    e.add_argument("--heldout", default=None, help="jsonl (default: <model>/../heldout.jsonl)")
    e.add_argument("--seq-len", type=int, default=256)
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--write-card", action="store_true", help="(re)write <model>/moeviz_card.json")
    e.add_argument("--no-prune", action="store_true", help="skip the 50%% pruning evaluation")
    a = ap.parse_args(argv)

    if a.cmd == "train":
        s = TrainSettings(
            out=a.out, data_dir=a.data_dir, seed=a.seed, steps=a.steps, batch_size=a.batch_size,
            seq_len=a.seq_len, lr=a.lr, warmup=a.warmup, vocab_size=a.vocab_size,
            hidden_size=a.hidden_size, intermediate_size=a.intermediate_size, num_layers=a.layers,
            aux_loss_coef=a.aux_loss_coef, threads=a.threads, tiny=a.tiny,
            rewrite_eval_data=a.rewrite_eval_data, evaluate=not a.no_eval)
        if a.tiny:  # explicit flags still win over the tiny defaults
            explicit = {k for k in vars(a) if f"--{k.replace('_', '-')}" in " ".join(argv or sys.argv)}
            s = dataclasses.replace(s, **{k: v for k, v in TINY_OVERRIDES.items() if k not in explicit})
        from moeviz.demo.train import run
        run(s)
    else:
        import torch
        from pathlib import Path
        from moeviz.demo.evaluate import evaluate_model
        torch.set_num_threads(a.threads)
        held = a.heldout or Path(a.model).parent / "heldout.jsonl"
        evaluate_model(a.model, held, seq_len=a.seq_len, write_card=a.write_card, prune=not a.no_prune)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
