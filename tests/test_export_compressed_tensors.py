"""compressed-tensors export: folders that plain transformers (and moeviz) load exactly, bytes as predicted,
deployability verdicts, refusals before anything is written, and llm-compressor-layout folders read back."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from moeviz.compression import CompressionPlan, PruningSettings, QuantSettings
from moeviz.compression.apply import Compressor
from moeviz.ct_export import plan_bits
from moeviz.compression.deployability import assess
from moeviz.errors import MoevizError
from moeviz.export import export_model, exported_files
from moeviz.models import load_model

# Runs in a fresh interpreter with no moeviz import: exactly what the folder's README tells a user to do.
PLAIN_TRANSFORMERS = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig
    for folder, ids_file, out_file in json.loads(sys.argv[1]):
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=CompressedTensorsConfig(dequantize=True))
        with torch.no_grad():
            torch.save(model.eval()(torch.load(ids_file)).logits, out_file)
    assert not any(m == "moeviz" or m.startswith("moeviz.") for m in sys.modules), "moeviz was imported"
""")


def plain_transformers_logits(jobs, tmp_path):
    """[(folder, input_ids)] -> logits computed by plain transformers + compressed-tensors in a subprocess."""
    args = []
    for i, (folder, ids) in enumerate(jobs):
        torch.save(ids, tmp_path / f"ids{i}.pt")
        args.append([str(folder), str(tmp_path / f"ids{i}.pt"), str(tmp_path / f"logits{i}.pt")])
    run = subprocess.run([sys.executable, "-c", PLAIN_TRANSFORMERS, json.dumps(args)], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return [torch.load(tmp_path / f"logits{i}.pt") for i in range(len(jobs))]


def tensor_bytes(folder):
    """Bytes of tensor data in the folder's safetensors (headers excluded), read from the headers."""
    total = 0
    for f in folder.glob("*.safetensors"):
        with f.open("rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        total += sum(e - b for k, v in header.items() if k != "__metadata__" for b, e in [v["data_offsets"]])
    return total


def assert_close_relative(got, want, rel=1e-5):
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= rel * scale, (got - want).abs().max().item()


@pytest.fixture(scope="module")
def demo():
    return load_model()


@pytest.mark.parametrize("quant", [QuantSettings(bits=4, group_size=128), QuantSettings(bits=8, group_size=-1)],
                         ids=["int4-g128", "int8-channel"])
def test_demo_export_loads_exactly_in_plain_transformers(demo, quant, tmp_path):
    plan = CompressionPlan(pruning=PruningSettings(metric="magnitude", sparsity=0.3), quant=quant)
    cm = Compressor(demo).apply(plan)
    out = export_model(demo, cm, tmp_path / "out", format="compressed-tensors")
    ids = torch.randint(3, 2048, (2, 24), generator=torch.Generator().manual_seed(0))
    (got,) = plain_transformers_logits([(out, ids)], tmp_path)
    with torch.no_grad():
        want = cm.model(ids).logits
    assert_close_relative(got, want)
    # Really smaller, and by the bytes the storage report and the deployability prediction say.
    storage = cm.storage
    data = tensor_bytes(out)
    assert data == storage.deployability.export_bytes == exported_files(out).data_bytes
    # Pruned weights ship as zeros, so the folder is within 2 % of the report of the same plan unpruned.
    unpruned = Compressor(demo).apply(CompressionPlan(quant=quant), lazy=True).storage
    assert unpruned.compressed_bytes <= data <= 1.02 * unpruned.compressed_bytes
    assert data < 0.5 * storage.base_bytes
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["format"]) == ("compressed-tensors", "pack-quantized")
    assert "lm_head" in config["ignore"] and any("gate" in i for i in config["ignore"])
    (group,) = config["config_groups"].values()
    assert group["weights"]["num_bits"] == quant.bits
    assert "CompressedTensorsConfig(dequantize=True)" in (out / "README.md").read_text()
    # moeviz reads its own export back exactly (through its dense copy).
    back = load_model(out)
    with torch.no_grad():
        assert_close_relative(back.model(ids).logits, want)
    assert back.info.source == str(out)


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "phimoe"]


def test_tiny_families_export_loads_exactly_in_plain_transformers(loaded_tiny, tmp_path):
    jobs, wants = [], []
    for family in FAMILIES:
        lm = loaded_tiny(family)
        plan = CompressionPlan(quant=QuantSettings(bits=4, group_size=-1),
                               removed_experts=[(l.index, 1) for l in lm.layers] if family != "deepseek_v3" else [])
        cm = Compressor(lm).apply(plan)
        out = export_model(lm, cm, tmp_path / family, format="compressed-tensors")
        assert tensor_bytes(out) == cm.storage.deployability.export_bytes, family
        ids = torch.randint(3, 90, (1, 12), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            wants.append(cm.model(ids).logits)
        jobs.append((out, ids))
    for family, got, want in zip(FAMILIES, plain_transformers_logits(jobs, tmp_path), wants):
        assert got.shape == want.shape, family
        assert_close_relative(got, want)


@pytest.mark.parametrize("family", ["gpt_oss", "granitemoe"])  # checkpoints with fused expert tensors
def test_fused_expert_checkpoints_are_refused_before_writing(family, loaded_tiny, tmp_path):
    lm = loaded_tiny(family)
    cm = Compressor(lm).apply(CompressionPlan(quant=QuantSettings(bits=4, group_size=-1)))
    with pytest.raises(MoevizError, match="fused tensors"):
        export_model(lm, cm, tmp_path / "out", format="compressed-tensors")
    assert not (tmp_path / "out").exists()


def test_asymmetric_and_per_layer_schemes_load_in_moeviz_and_say_transformers_cannot(demo, tmp_path):
    plan = CompressionPlan.from_dict({"quant": {"bits": 4, "group_size": 64, "symmetric": False},
                                      "overrides": [{"layer": 2, "bits": 8}]})
    cm = Compressor(demo).apply(plan)
    out = export_model(demo, cm, tmp_path / "out", format="compressed-tensors")
    files = exported_files(out)
    assert files.load[0].startswith("moeviz.load_model") and "NOT transformers" in files.load[1]
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert sorted(g["weights"]["num_bits"] for g in groups.values()) == [4, 8]
    ids = torch.randint(3, 2048, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_close_relative(load_model(out).model(ids).logits, cm.model(ids).logits)


def test_a_folder_written_by_compressed_tensors_itself_loads_in_moeviz(demo, tmp_path):
    """llm-compressor's layout: every expert Linear packed by compressed-tensors' compressor, config group
    targeting "Linear", lm_head and routers ignored; written here without moeviz's exporter."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    from safetensors.torch import load_file, save_file
    import shutil

    from moeviz.compression.quantize import quantize_weight

    src = tmp_path / "src"
    shutil.copytree(demo.info.source, src)
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=4, type="int", symmetric=True,
                                                                              strategy="group", group_size=64))
    packer = BaseCompressor.get_value_from_registry("pack-quantized")
    state, want = load_file(src / "model.safetensors"), {}
    out = {}
    for key, w in state.items():
        if ".experts." in key:
            qw = quantize_weight(w, 4, 64, True)
            want[key] = qw.dequantized
            for name, t in packer.compress({"weight": w, "weight_scale": qw.scales.to(w.dtype)}, scheme).items():
                out[key[: -len("weight")] + name] = t
        else:
            out[key] = w
    save_file(out, src / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    qc = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                            quantization_status="compressed", ignore=["lm_head", "re:.*block_sparse_moe.gate"])
    config["quantization_config"] = {"quant_method": "compressed-tensors", **qc.model_dump(exclude=["quant_method"])}
    (src / "config.json").write_text(json.dumps(config))

    lm = load_model(src)
    for layer in lm.layers:
        for e in range(layer.num_experts):
            key = f"model.layers.{layer.index}.block_sparse_moe.experts.{e}."
            torch.testing.assert_close(layer.weight("gate")[e], want[key + "w1.weight"], rtol=0, atol=0)
            torch.testing.assert_close(layer.weight("down")[e], want[key + "w2.weight"], rtol=0, atol=0)
    assert lm.info.source == str(src)


@pytest.mark.parametrize("plan, message", [
    (CompressionPlan(quant=QuantSettings(bits=3)), "3-bit experts cannot be served"),
    (CompressionPlan.from_dict({"quant": {"bits": 4}, "overrides": [{"layer": 1, "expert": 2, "bits": 8}]}),
     "MoE layer 1 has experts at 4, 8 bits"),
    (CompressionPlan(pruning=PruningSettings(metric="magnitude", sparsity=0.5)), "quantizes no expert"),
])
def test_plans_compressed_tensors_cannot_hold_are_refused_before_writing(demo, plan, message, tmp_path):
    cm = Compressor(demo).apply(plan, lazy=True)
    with pytest.raises(MoevizError, match=message):
        export_model(demo, cm, tmp_path / "out", format="compressed-tensors")
    assert not any(tmp_path.iterdir())
    assert cm.storage.deployability.export_format == "dense"


def test_deployability_verdicts(demo):
    def verdicts(d):
        bits, removed = plan_bits(CompressionPlan.from_dict(d), demo.layers)
        out = assess(CompressionPlan.from_dict(d), demo.layers, bits, removed, 4, 0)
        return {v.target: v.ok for v in out.verdicts}, out

    ok, _ = verdicts({"quant": {"bits": 4}})
    assert ok == {"hf-dense": True, "ct-transformers": True, "ct-vllm": True}
    ok, _ = verdicts({"quant": {"bits": 4}, "overrides": [{"layer": 1, "bits": 8}]})  # one scheme per layer
    assert ok == {"hf-dense": True, "ct-transformers": False, "ct-vllm": True}
    ok, _ = verdicts({"quant": {"bits": 4, "symmetric": False}})
    assert ok == {"hf-dense": True, "ct-transformers": False, "ct-vllm": False}
    ok, d = verdicts({"quant": {"bits": 4}, "removed_experts": [[0, 1]]})  # uneven removal: nothing holds it
    assert ok == {"hf-dense": False, "ct-transformers": False, "ct-vllm": False}
    assert d.export_format is None and "[1, 0, 0, 0]" in d.verdicts[0].reasons[0]
    ok, d = verdicts({"pruning": {"structure": "2:4"}})
    assert ok["hf-dense"] and not ok["ct-vllm"]
    assert any("no 2:4 speed-up" in k for k in d.verdicts[0].keeps)
    # Bytes: a removed expert per layer takes its three projections out of the file.
    _, full = verdicts({"quant": {"bits": 4}})
    _, fewer = verdicts({"quant": {"bits": 4}, "removed_experts": [[l, 3] for l in range(4)]})
    e = demo.layers[0]
    one = sum(o * (-(-n * 4 // 32)) * 4 + o * (n // 128) * 4 + 16 for o, n in (e.weight(p).shape[-2:] for p in e.projections()))
    router_row = 4 * demo.layers[0].router_weight.shape[-1]
    assert full.export_bytes - fewer.export_bytes == 4 * (one + router_row)


def test_storage_report_counts_against_bf16_too(demo):
    s = Compressor(demo).apply(CompressionPlan(quant=QuantSettings(bits=4, group_size=128)), lazy=True).storage.summary()
    assert s["checkpoint_dtype"] == "float32"
    n = sum(p.numel() for p in demo.model.parameters())
    # bf16: every dense tensor at 2 bytes, 4-bit experts + one 2-byte scale per 128 weights
    experts = sum(layer.num_experts * layer.expert_param_count() for layer in demo.layers)
    want = 2 * (n - experts) + experts // 2 + (experts // 128) * 2
    assert s["compression_ratio_bf16"] == pytest.approx(2 * n / want)
    assert s["compression_ratio"] > s["compression_ratio_bf16"]


def test_bf16_checkpoint_keeps_the_codes_and_bounds_the_scale_rounding(tiny_model_dirs, tmp_path):
    """A bf16 checkpoint stores its scales in bf16 (as llm-compressor does): the integer codes are moeviz's, and
    each unpacked weight is within 2^-7 of its magnitude of the value moeviz evaluated (8 bits: the worst case)."""
    lm = load_model(tiny_model_dirs["qwen3_moe"], dtype="bfloat16")
    cm = Compressor(lm).apply(CompressionPlan(quant=QuantSettings(bits=8, group_size=-1)))
    out = export_model(lm, cm, tmp_path / "out", format="compressed-tensors")
    files = exported_files(out)
    assert 0 < files.max_relative_deviation <= 2 ** -7
    assert "at most" in (out / "moeviz_report.md").read_text()
    back = load_model(out, dtype="bfloat16")
    for a, b in zip(back.layers, cm.layers):
        w, v = a.weight("gate").float(), b.weight("gate").float()
        assert ((w - v).abs() <= 2 ** -7 * v.abs() + 1e-30).all()


@pytest.mark.parametrize("format", ["dense", "compressed-tensors"])
def test_fused_experts_converted_a_few_at_a_time_write_the_same_file(demo, format, tmp_path, monkeypatch):
    """Export converts a fused [E, ...] tensor a few experts at a time (peak memory: a slice's per-expert
    copies, not the layer's); slices of 3 (uneven: 8 = 3 + 3 + 2) must write byte-identical tensors."""
    import moeviz.export as export
    from safetensors.torch import load_file

    cm = Compressor(demo).apply(CompressionPlan(quant=QuantSettings(bits=4, group_size=128)), lazy=True)
    monkeypatch.setattr(export, "EXPERTS_PER_CONVERSION", 10**6)
    whole = load_file(export_model(demo, cm, tmp_path / "whole", format=format) / "model.safetensors")
    monkeypatch.setattr(export, "EXPERTS_PER_CONVERSION", 3)
    sliced = load_file(export_model(demo, cm, tmp_path / "sliced", format=format) / "model.safetensors")
    assert whole.keys() == sliced.keys()
    assert all(torch.equal(whole[k], sliced[k]) for k in whole)


def test_compress_page_note_warns_only_when_a_plan_loses_something(demo):
    from moeviz.compression.deployability import export_note

    def note(d):
        st = Compressor(demo).apply(CompressionPlan.from_dict(d), lazy=True).storage
        return export_note(st.summary(), st.deployability)

    caption, warning = note({"pruning": {"metric": "magnitude", "sparsity": 0.5}})
    assert warning is None and "exportable as dense: 1.00×" in caption  # pruning ships as zeros: said, not warned
    assert note({"quant": {"bits": 4}})[1] is None
    assert "cannot be packed for vLLM" in note({"quant": {"bits": 3}})[1]
    assert "cannot be exported" in note({"removed_experts": [[0, 1]]})[1]
