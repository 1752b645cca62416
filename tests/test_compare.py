"""moeviz compare: a checkpoint compressed elsewhere, evaluated against its base exactly as a plan is."""

import json

import pytest
import torch

from moeviz.cli import main
from moeviz.compare import external_checkpoint
from moeviz.compression import CompressionPlan, PruningSettings, QuantSettings
from moeviz.compression.apply import Compressor
from moeviz.errors import MoevizError
from moeviz.evaluation import EvalSettings, Evaluator
from moeviz.export import export_model
from moeviz.models import load_model
from documents import documents
from moeviz.data import tokenize_documents


def test_an_exported_checkpoint_evaluates_as_its_plan_did(loaded_tiny, tmp_path):
    """A compressed-tensors folder (as another tool would hand it over) gives the perplexity, drift and CV of
    the plan that wrote it, and its storage is the files' bytes."""
    lm = loaded_tiny("qwen3_moe")
    plan = CompressionPlan(pruning=PruningSettings(metric="magnitude", sparsity=0.5),
                           quant=QuantSettings(bits=4, group_size=-1))
    cm = Compressor(lm).apply(plan)
    folder = export_model(lm, cm, tmp_path / "ct", format="compressed-tensors")
    ev = Evaluator(lm, tokenize_documents(documents(), lm.tokenizer, 2, 24, seed=3), EvalSettings(measure_latency=False))
    want = ev.evaluate(cm)
    external = external_checkpoint(lm, folder)
    got = ev.evaluate(external)
    assert got.perplexity == pytest.approx(want.perplexity, rel=1e-5)
    assert got.accuracy == pytest.approx(want.accuracy, abs=1e-9)
    assert [d["kl"] for d in got.drift] == pytest.approx([d["kl"] for d in want.drift], rel=1e-4, abs=1e-9)
    packed = sum(t["bytes"] for t in external.storage.tensors)
    assert packed < 0.4 * external.storage.experts_base_bytes  # 4-bit codes, from the files
    assert {s.bits for s in external.experts} == {4}
    assert abs(sum(s.zero_fraction for s in external.experts) / len(external.experts) - 0.5) < 0.05
    assert external.plan.name == "external: ct"


def test_a_checkpoint_of_another_shape_is_refused(loaded_tiny, tiny_model_dirs):
    with pytest.raises(MoevizError, match="cannot be compared"):
        external_checkpoint(loaded_tiny("qwen3_moe"), tiny_model_dirs["mixtral"])


def test_cli_compare_stores_the_run(tiny_model_dirs, tmp_path, capsys):
    lm = load_model(tiny_model_dirs["mixtral"])
    folder = export_model(lm, Compressor(lm).apply(CompressionPlan(quant=QuantSettings(bits=8, group_size=-1))),
                          tmp_path / "int8", format="compressed-tensors")
    store = tmp_path / "runs.sqlite"
    assert main(["compare", "--model", str(tiny_model_dirs["mixtral"]), "--compressed", str(folder), "--samples", "2",
                 "--seq-len", "16", "--eval-samples", "2", "--eval-seq-len", "16", "--no-latency",
                 "--store", str(store)]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{"):])["run_id"] == 1
    from moeviz.store import RunStore

    runs = RunStore(store).runs()
    assert list(runs["name"]) == ["external: int8"] and runs["compression_ratio"].iloc[0] > 1.5
