"""Export: round trip through AutoModelForCausalLM, physical expert removal, atomicity, refusals."""

import json

import pytest
import torch
import transformers

from moeviz.calibration import calibrate
from moeviz.compression import CompressionPlan, PruningSettings, QuantSettings
from moeviz.compression.apply import Compressor
from moeviz.compression.removal import experts_to_remove
from moeviz.data import tokenize_documents
from moeviz.errors import MoevizError
from moeviz.export import export_model
from moeviz.models import load_model
from documents import documents

DOCS = documents(20)


def folder_bytes(path):
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "granitemoe", "phimoe", "gpt_oss"])
def test_round_trip_reproduces_the_compressed_model(family, loaded_tiny, tmp_path):
    lm = loaded_tiny(family)
    samples = tokenize_documents(DOCS, lm.tokenizer, 4, 16)
    stats = calibrate(lm, samples, batch_size=4)
    if family == "deepseek_v3":  # group-limited routing: one expert from each of the 2 groups of 4
        removed = [(layer, e) for layer in range(2) for e in (1, 6)]
    else:
        removed = experts_to_remove(stats, 1, "frequency")
    plan = CompressionPlan(pruning=PruningSettings(metric="moe_pruner", sparsity=0.5),
                           quant=QuantSettings(bits=4, group_size=-1), removed_experts=removed)
    cm = Compressor(lm, stats).apply(plan)
    out = export_model(lm, cm, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=samples.input_ids).logits, cm.model(input_ids=samples.input_ids).logits,
                                   rtol=1e-4, atol=1e-4)
    reloaded = load_model(out)
    assert reloaded.layers[0].num_experts == lm.layers[0].num_experts - len(removed) // len(lm.layers)
    assert folder_bytes(out) < folder_bytes(lm.info.source and __import__("pathlib").Path(lm.info.source))
    assert CompressionPlan.from_json((out / "moeviz_plan.json").read_text()) == plan
    assert "compression ratio" in (out / "moeviz_report.md").read_text()
    # Pruned zeros are real in the file.
    w = reloaded.layers[0].weight("gate")
    assert (w == 0).float().mean() >= 0.45


def test_deepseek_uneven_group_removal_is_refused(loaded_tiny, tmp_path):
    lm = loaded_tiny("deepseek_v3")
    cm = Compressor(lm, None).apply(CompressionPlan(removed_experts=[(0, 1), (0, 2), (1, 1), (1, 2)]))
    with pytest.raises(MoevizError, match=r"removes \[2, 0\] experts from its 2 routing groups"):
        export_model(lm, cm, tmp_path / "out")


def test_refusals_and_atomicity(loaded_tiny, tmp_path, monkeypatch):
    lm = loaded_tiny("mixtral")
    cm = Compressor(lm, None).apply(CompressionPlan(pruning=PruningSettings(metric="magnitude", sparsity=0.3)))
    with pytest.raises(MoevizError, match="source model's folder"):
        export_model(lm, cm, lm.info.source + "/sub")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "results.csv").write_text("a,b")  # an empty folder would be used as is
    with pytest.raises(MoevizError, match="already exists"):
        export_model(lm, cm, tmp_path / "taken")
    uneven = Compressor(lm, None).apply(CompressionPlan(removed_experts=[(0, 1)]))
    with pytest.raises(MoevizError, match=r"removed experts per layer are \[1, 0\]"):
        export_model(lm, uneven, tmp_path / "uneven")

    def boom(self, *a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(transformers.PreTrainedTokenizerFast, "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_model(lm, cm, tmp_path / "partial")
    assert not (tmp_path / "partial").exists()
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]  # no temporary folder left either


def test_demo_export_reproduces_in_app_metrics(tmp_path, demo_model):
    """The exported demo model, reloaded through load_model and evaluated like any model, gives the
    perplexity and accuracy the app showed for the plan."""
    from moeviz.compression.apply import Compressor
    from moeviz.evaluation import EvalSettings, Evaluator, load_eval_samples

    lm = demo_model
    samples = tokenize_documents(DOCS, lm.tokenizer, 4, 64)
    stats = calibrate(lm, samples)
    plan = CompressionPlan(pruning=PruningSettings(metric="moe_pruner", sparsity=0.5),
                           quant=QuantSettings(bits=4, group_size=64), removed_experts=experts_to_remove(stats, 1))
    held = load_eval_samples(lm.tokenizer, seq_len=128, max_samples=8)
    settings = EvalSettings(measure_latency=False)
    cm = Compressor(lm, stats).apply(plan)
    in_app = Evaluator(lm, held, settings).evaluate(cm)
    out = export_model(lm, cm, tmp_path / "demo-compressed", result=in_app.to_dict())
    reloaded = load_model(out)
    again = Evaluator(reloaded, held, settings).base
    assert again.loss["perplexity"] == pytest.approx(in_app.perplexity, rel=1e-5)
    assert again.loss["accuracy"] == pytest.approx(in_app.accuracy, abs=1e-9)
    assert reloaded.info.num_experts == 7 and folder_bytes(out) < folder_bytes(lm.info.source and __import__("pathlib").Path(lm.info.source))
