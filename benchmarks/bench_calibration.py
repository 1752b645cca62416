"""Calibration pass vs a plain forward pass over the same tokens, same model (target ≤ 1.2×).

Uses the bundled demo model when it is present, otherwise a random Mixtral of the same shape.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import moeviz
from moeviz.models.loading import DEMO_MODEL_DIR


def _model():
    if (DEMO_MODEL_DIR / "config.json").exists():
        return moeviz.load_model(DEMO_MODEL_DIR), "demo-moe"
    import transformers

    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from tiny_models import tiny_tokenizer

    config = transformers.MixtralConfig(vocab_size=4096, hidden_size=128, intermediate_size=256,
                                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                        num_local_experts=8, num_experts_per_tok=2)
    folder = Path(tempfile.mkdtemp()) / "mixtral-like"
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return moeviz.load_model(folder), "random Mixtral, demo shape"


def run(n_samples: int = 32, seq_len: int = 256, batch_size: int = 8, repeats: int = 3) -> dict:
    lm, name = _model()
    vocab = lm.model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n_samples, seq_len), generator=g)
    samples = moeviz.TokenSamples(ids, ["text"] * n_samples, "random ids", 0, "bench", ["text"])

    @torch.no_grad()
    def plain():
        for i in range(0, n_samples, batch_size):
            lm.model(input_ids=ids[i:i + batch_size], use_cache=False)

    def calib():
        moeviz.calibrate(lm, samples, batch_size=batch_size)

    plain(), calib()  # warm-up
    t_plain, t_calib = [], []
    for _ in range(repeats):  # interleave so drift in machine load hits both equally
        t0 = time.perf_counter(); plain(); t_plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); calib(); t_calib.append(time.perf_counter() - t0)
    p, c = statistics.median(t_plain), statistics.median(t_calib)
    return dict(model=name, experts_implementation=lm.model.config._experts_implementation,
                tokens=n_samples * seq_len, plain_forward_s=p, calibration_s=c, ratio=c / p,
                target_ratio=1.2, calibration_tokens_per_s=n_samples * seq_len / c)


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
