"""Memory: loading holds the checkpoint once (moeviz.models.loading), export streams one decoder layer at a time
(moeviz.export).

Each measurement runs in its own process on a ~150 M-parameter 2-layer Mixtral (float32, ~0.6 GB):
the peak is the kernel's high-water mark (`VmHWM`, reset with /proc/self/clear_refs before the step),
so no sampling can miss it. `MALLOC_MMAP_THRESHOLD_` is fixed, as in tests/test_lazy.py: glibc would
otherwise keep freed temporaries in its heap and RSS would count memory no longer held.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rss_scripts import preamble, skip_without_disk

MEMORY_SCRIPT = preamble() + r"""
def reset_peak():
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS

r = dict(params=params, checkpoint=ckpt, layer_bytes=layer_bytes)
reset_peak()
r["before_load"] = status("VmRSS")
lm = moeviz.load_model(folder)
r["load_peak"] = status("VmHWM")
gc.collect()
r["after_load"] = status("VmRSS")
if sys.argv[2] == "export":
    ids = torch.randint(3, 128, (4, 64), generator=torch.Generator().manual_seed(0))
    stats = moeviz.calibrate(lm, TokenSamples(ids, ["text"] * 4, "random", 0, "random-4x64", ["text"]), batch_size=4)
    plan = CompressionPlan(pruning=PruningSettings(metric="moe_pruner", sparsity=0.5),
                           quant=QuantSettings(bits=4, group_size=128), removed_experts=[(0, 3), (1, 5)])
    cm = Compressor(lm, stats).apply(plan, lazy=sys.argv[3] == "lazy")
    reset_peak()
    r["before_export"] = status("VmRSS")
    exported = tempfile.mkdtemp(prefix="moeviz-mem-export-")
    atexit.register(shutil.rmtree, exported, True)
    export_model(lm, cm, exported, overwrite=True)
    r["export_peak"] = status("VmHWM")
    shutil.rmtree(exported)
shutil.rmtree(folder)
print(json.dumps(r))
"""


def _measure(*args: str) -> dict:
    skip_without_disk()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]),
               MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(Path(__file__).parent), *args],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_loading_holds_the_checkpoint_once():
    """Peak RSS while `load_model` runs ≤ 1.2 × (RSS before + checkpoint bytes), and RSS after loading
    ≤ RSS before + 1.1 × checkpoint: no safetensors mapping left resident beside the loaded copy
    (transformers' mmap path holds ~2 × the checkpoint on this model)."""
    r = _measure("load")
    assert 90e6 < r["params"] < 200e6
    assert r["load_peak"] <= 1.2 * (r["before_load"] + r["checkpoint"]), r
    assert r["after_load"] - r["before_load"] <= 1.1 * r["checkpoint"], r


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lazy", "eager"])
def test_export_streams_one_layer_at_a_time(mode):
    """Exporting a pruned + quantized plan with expert removal adds at most 2 × one decoder layer's bytes
    to the RSS it starts from (one layer's working set: its compressed tensors, the per-expert copies
    transformers' checkpoint format makes of one fused tensor, a few experts' compression temporaries):
    no full compressed state dict, no second model, no shard held in memory (the previous export
    added 5.1 layers here). The lazy model's experts are compressed during export."""
    r = _measure("export", mode)
    assert r["export_peak"] - r["before_export"] <= 2 * r["layer_bytes"], r


# ---- streamed export: the same files as before, in shards, loadable -----------------------------

def _export_setup(loaded_tiny, family):
    from moeviz.calibration import calibrate
    from moeviz.compression import CompressionPlan, PruningSettings, QuantSettings
    from moeviz.compression.apply import Compressor
    from moeviz.data import Document, tokenize_documents

    lm = loaded_tiny(family)
    docs = [Document("The quick brown fox jumps over the lazy dog. " * 20, "prose"),
            Document("x = [i * i for i in range(10)]\n" * 20, "code")]
    samples = tokenize_documents(docs, lm.tokenizer, 4, 16)
    removed = [(l, e) for l in range(len(lm.layers)) for e in ((1, 6) if family == "deepseek_v3" else (2,))]
    plan = CompressionPlan(pruning=PruningSettings(metric="wanda", sparsity=0.5), quant=QuantSettings(bits=4, group_size=8),
                           removed_experts=removed if lm.info.expert_removal else [])
    return lm, samples, Compressor(lm, calibrate(lm, samples, batch_size=4)), plan


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        part = load_file(f)
        assert not out.keys() & part.keys()
        out.update(part)
    return out


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_streamed_export_writes_what_save_pretrained_writes(family, loaded_tiny, tmp_path):
    """The streamed file holds exactly the tensors (names, dtypes, values) and config that transformers'
    own save_pretrained writes for the same model (here: the export loaded back and saved again), and
    the model it gives computes the compressed model's logits."""
    import transformers

    from moeviz.export import export_model

    lm, samples, comp, plan = _export_setup(loaded_tiny, family)
    cm = comp.apply(plan, lazy=True)
    out = export_model(lm, cm, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=samples.input_ids).logits, cm.model(input_ids=samples.input_ids).logits,
                                   rtol=1e-4, atol=1e-4)
    back.save_pretrained(tmp_path / "resaved")
    mine, theirs = _tensors(out), _tensors(tmp_path / "resaved")
    assert mine.keys() == theirs.keys()
    assert all(mine[k].dtype == theirs[k].dtype and torch.equal(mine[k], theirs[k]) for k in mine)
    assert json.loads((out / "config.json").read_text()) == json.loads((tmp_path / "resaved" / "config.json").read_text())


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe"])
def test_sharded_export_equals_the_single_file(family, loaded_tiny, tmp_path, monkeypatch):
    """Small shards: several files whose index maps every tensor to the file holding it, the same
    tensors as one file, loadable by transformers and by moeviz; and a lazy layer compressed one expert
    per chunk gives the bits of the materialised model's export."""
    import transformers

    import moeviz.compression.lazy as lazy
    from moeviz.export import export_model
    from moeviz.models import load_model

    lm, samples, comp, plan = _export_setup(loaded_tiny, family)
    one = export_model(lm, comp.apply(plan), tmp_path / "one")
    monkeypatch.setattr(lazy, "LAYER_CHUNK_BYTES", 1)  # one expert per compress call
    many = export_model(lm, comp.apply(plan, lazy=True), tmp_path / "many", max_shard_bytes=20_000)
    files = sorted(p.name for p in many.glob("*.safetensors"))
    assert [p.name for p in one.glob("*.safetensors")] == ["model.safetensors"] and len(files) >= 3
    index = json.loads((many / "model.safetensors.index.json").read_text())
    a, b = _tensors(one), _tensors(many)
    assert a.keys() == b.keys() == index["weight_map"].keys() and set(index["weight_map"].values()) == set(files)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in b.values())
    from safetensors import safe_open

    for name, file in index["weight_map"].items():
        with safe_open(many / file, "pt") as f:
            assert name in f.keys()
    back = transformers.AutoModelForCausalLM.from_pretrained(many).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=samples.input_ids).logits,
                                   transformers.AutoModelForCausalLM.from_pretrained(one)(input_ids=samples.input_ids).logits,
                                   rtol=0, atol=0)
    assert load_model(many).info.num_parameters == load_model(one).info.num_parameters


FRAGMENT_SCRIPT = preamble(layers=1, experts=8) + r"""
lm = moeviz.load_model(folder)  # frees the per-expert tensors it stacks
before = rss()
temporaries, kept = [], []
for i in range(64):  # 2 MB temporaries between small tensors that stay: a fragmented heap if not mmapped
    temporaries.append(torch.ones(512 * 1024))
    kept.append(torch.ones(40 * 1024))
peak = rss()
del temporaries
print(json.dumps(dict(before=before, peak=peak, after=rss())))
"""


def test_freed_temporaries_are_given_back_after_loading():
    """After load_model with the runtime configuration applied (without MALLOC_MMAP_THRESHOLD_ set), memory of freed multi-MB temporaries goes
    back to the system even when small long-lived tensors sit between them: glibc's raised mmap threshold
    would put them on the heap and keep them (the 5.8 GB RSS growth of a lazy evaluation, docs/SCALE.md)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", FRAGMENT_SCRIPT, str(Path(__file__).parent)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    held = 64 * 2 * 2**20
    assert r["peak"] - r["before"] >= 0.5 * held, r  # the temporaries were resident (some may reuse free heap)
    assert r["after"] - r["before"] <= 0.25 * held, r


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_loading_reads_without_leaving_the_checkpoint_mapped(family, tiny_model_dirs):
    """load_model gives transformers' own tensors (every dtype) and leaves no mapping of the checkpoint
    in the process: transformers' mmap path keeps the file mapped through the tensors it does not convert."""
    import transformers

    from moeviz.models import load_model

    folder = tiny_model_dirs[family]
    for dtype in ("float32", "bfloat16"):
        lm = load_model(folder, dtype=dtype)
        mapped = [line for line in Path("/proc/self/maps").read_text().splitlines() if str(folder) in line]
        assert mapped == [], mapped
        ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).state_dict()
        got = lm.model.state_dict()
        assert got.keys() == ref.keys()
        assert all(got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]) for k in got)
        del ref, lm
        gc.collect()  # the reference model's mapping goes with its tensors
