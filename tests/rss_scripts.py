"""The common start of the memory tests' subprocess scripts (tests/test_memory.py, tests/test_lazy.py).

Each measurement runs in a fresh process (`python -c PREAMBLE + body`, argv[1] = the tests folder) so
that its RSS is its own. The preamble imports the libraries (numba included: it loads once per process,
~150 MB, like torch, and is not what the tests measure), defines `rss()` (resident bytes now) and
`status(key)` (a /proc/self/status field in bytes, e.g. VmHWM), and saves a random float32 Mixtral with
the given shapes to `folder`; it leaves `params`, `layer_bytes` and `ckpt` (checkpoint bytes) defined.
"""

from __future__ import annotations

import shutil
import tempfile

import pytest

# The scripts write a ~0.6 GB checkpoint (and an export beside it) to the temporary folder.
DISK_NEEDED = 2 * 1024**3


def skip_without_disk(needed: int = DISK_NEEDED) -> None:
    """Skip (with the numbers) where the temporary folder's disk cannot hold the scripts' checkpoints:
    a full disk is the machine's state, not a memory regression."""
    free = shutil.disk_usage(tempfile.gettempdir()).free
    if free < needed:
        pytest.skip(f"needs {needed / 1024**3:.1f} GiB free in {tempfile.gettempdir()}, has {free / 1024**3:.2f} GiB")


def preamble(layers: int = 2, experts: int = 32) -> str:
    return f'''
import atexit, gc, json, os, shutil, sys, tempfile, threading, time, torch, transformers
sys.path.insert(0, sys.argv[1])
from tiny_models import tiny_tokenizer
import moeviz
from moeviz import runtime_config; runtime_config.configure()  # as the app and the CLI run
from moeviz.compression import CompressionPlan, PruningSettings, QuantSettings, fused_prune
from moeviz.compression.apply import Compressor
from moeviz.data import TokenSamples
from moeviz.evaluation import EvalSettings, Evaluator
from moeviz.export import export_model
fused_prune.enabled()

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

folder = tempfile.mkdtemp(prefix="moeviz-mem-")
atexit.register(shutil.rmtree, folder, True)  # also when the script fails half-way
cfg = transformers.MixtralConfig(vocab_size=128, hidden_size=512, intermediate_size=1536, num_hidden_layers={layers},
                                 num_local_experts={experts}, num_experts_per_tok=2, num_attention_heads=8,
                                 num_key_value_heads=8, max_position_embeddings=256, tie_word_embeddings=False)
torch.manual_seed(0)
m = transformers.AutoModelForCausalLM.from_config(cfg)
params = sum(p.numel() for p in m.parameters())
layer_bytes = sum(p.numel() * p.element_size() for p in m.model.layers[0].parameters())
m.save_pretrained(folder, safe_serialization=True)
tiny_tokenizer(128).save_pretrained(folder)
del m
gc.collect()
ckpt = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))
'''
