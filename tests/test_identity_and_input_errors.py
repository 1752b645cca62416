"""Identity and input errors: a loaded model's identity includes dtype and device, session results
belong to one model, and bad input gives one clear line (exit 2 from the CLI), never a traceback,
and plan errors come before the model loads or calibrates."""

import json
import math
from pathlib import Path

import pytest
import torch
import transformers

import moeviz.models
from moeviz.cli import main
from moeviz.compression.plan import CompressionPlan, PruningSettings
from moeviz.compression.table import apply_table_edits, expert_table
from moeviz.data import decode_text, documents_from_file, load_calibration_data
from moeviz.errors import CalibrationDataError, ModelSourceError, PlanError
from moeviz.models import load_model
from moeviz.models.loading import model_fingerprint
from tiny_models import build_tiny_model, tiny_tokenizer

APP = str(Path(__file__).resolve().parents[1] / "app.py")
CONTEXT = 64  # max_position_embeddings of the tiny models


def one_line_error(capsys, *argv) -> str:
    """Run the CLI in-process; assert exit status 2 and a single `moeviz: error:` line on stderr."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moeviz: error:") and "\n" not in err and "Traceback" not in err, err
    return err


def write_cal(tmp_path) -> Path:
    data = tmp_path / "cal.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"calibration sentence {i} about experts. " * 6}) for i in range(30)))
    return data


def eval_argv(model, data):
    return ["--model", str(model), "--data", str(data), "--samples", "4", "--seq-len", "16", "--eval-data", str(data),
            "--eval-seq-len", "16", "--eval-samples", "4", "--no-latency", "--no-store"]


# ------------------------------------------------------------------------------------- identity

def test_fingerprint_differs_by_dtype(tiny_model_dirs):
    f32 = load_model(tiny_model_dirs["mixtral"], dtype="float32")
    bf16 = load_model(tiny_model_dirs["mixtral"], dtype="bfloat16")
    assert f32.fingerprint != bf16.fingerprint
    assert load_model(tiny_model_dirs["mixtral"], dtype="float32").fingerprint == f32.fingerprint  # stable


def test_fingerprint_differs_by_device():
    assert model_fingerprint("abc", "float32", "cpu") != model_fingerprint("abc", "float32", "cuda:0")
    assert model_fingerprint("abc", "float32", "cpu") == model_fingerprint("abc", "float32", "cpu")


def test_stats_of_another_dtype_are_refused(tiny_model_dirs):
    """The session compressor and the stats cache are keyed by fingerprint: float32 statistics must
    not be used to compress the bfloat16 load."""
    from moeviz.calibration import calibrate
    from moeviz.compression.apply import Compressor

    f32 = load_model(tiny_model_dirs["olmoe"], dtype="float32")
    bf16 = load_model(tiny_model_dirs["olmoe"], dtype="bfloat16")
    stats = calibrate(f32, load_calibration_data(f32.tokenizer, n_samples=2, seq_len=16))
    with pytest.raises(PlanError, match="recalibrate"):
        Compressor(bf16, stats)


# ------------------------------------------------------------------------------------- app session

def _app(model_dir):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=180)
    at.session_state["model_source"] = str(model_dir)
    return at


def _ok(at):
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def test_session_results_keyed_by_model(tiny_model_dirs, tmp_path):
    at = _app(tiny_model_dirs["mixtral"]).run()
    at.switch_page("pages/6_export.py").run()
    _ok(at)
    plan = at.session_state["plan"]
    fake = dict(plan=plan, perplexity=1.0)
    at.session_state["last_result"] = fake
    at.session_state["last_run_id"] = 7
    at.session_state["recovery"] = dict(run_id=8, parent_run_id=7, plan=plan, result=fake)
    at.session_state["recovered_model"] = object()
    at.run()
    _ok(at)
    labels = lambda: [b.proto.label for b in at.get("download_button")]  # noqa: E731
    assert "Last evaluation, all details (JSON)" in labels()  # same model: the session's results are offered
    assert any("recovered" in o for o in at.radio[0].options)
    at.session_state["dtype"] = "bfloat16"  # same folder, another model as far as results go
    at.run()
    _ok(at)
    assert "Last evaluation, all details (JSON)" not in labels()
    assert not any("recovered" in o for o in at.radio[0].options)
    for key in ("last_result", "last_run_id", "recovery", "recovered_model"):
        assert at.session_state[key] is None, key


def test_export_page_sequential_plan(tiny_model_dirs, tmp_path):
    at = _app(tiny_model_dirs["mixtral"]).run()
    _ok(at)
    at.number_input[0].set_value(4)
    at.number_input[1].set_value(16)
    next(b for b in at.button if b.label == "Run calibration").click().run()
    _ok(at)
    at.session_state["plan"] = CompressionPlan(pruning=PruningSettings(metric="wanda", sparsity=0.5),
                                               sequential=True).to_dict()
    at.switch_page("pages/6_export.py").run()
    _ok(at)
    out = tmp_path / "exported-sequential"
    next(t for t in at.text_input if t.label == "Output folder").set_value(str(out))
    next(b for b in at.button if b.label == "Export model").click().run()
    _ok(at)
    assert json.loads((out / "moeviz_plan.json").read_text())["sequential"] is True


# ------------------------------------------------------------------------------------- plan input

def test_plan_file_json_list_one_line_exit_2(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text("[1, 2]")
    err = one_line_error(capsys, "evaluate", "--plan", str(plan), "--no-store")
    assert "expected a JSON object" in err and "got a list" in err


@pytest.mark.parametrize("text, message", [
    ('{"pruning": [1]}', "pruning must be a JSON object"),
    ('{"overrides": [3]}', "overrides[0] must be an object"),
    ('{"removed_experts": [[1]]}', "[layer, expert] integer pairs"),
    ('{"pruning": {"sparsty": 0.5}}', "pruning has unknown field(s) sparsty"),
    ('{"pruning": {"sparsity": 1.0}}', "pruning.sparsity: 1.0 is outside [0, 1)"),
    ('{"quant": {"bits": 5}}', "quant.bits: 5 bits is not supported"),
])
def test_malformed_plan_fields_are_named(text, message):
    with pytest.raises(PlanError) as e:
        CompressionPlan.from_json(text).validate()
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.fixture
def no_model_load(monkeypatch):
    """Any attempt to load a model fails the test: the error must come first."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(moeviz.models, "load_model", refuse)


@pytest.mark.parametrize("plan, extra, message", [
    ("[]", [], "expected a JSON object"),
    ('{"pruning": {"sparsity": 1.5}}', [], "pruning.sparsity: 1.5 is outside [0, 1)"),
    ('{"quant": {"bits": 5}}', [], "quant.bits: 5 bits is not supported"),
    ('{"pruning": {"structure": "5:3"}}', [], "needs 0 < N < M"),
    ("{}", ["--accelerator", "TPU v9"], "accelerator: unknown 'TPU v9'"),
    ("{}", ["--data", "/no/such.jsonl"], "--data: file /no/such.jsonl does not exist"),
])
@pytest.mark.parametrize("command", ["evaluate", "export", "recover"])
def test_plan_errors_before_model_loads(command, plan, extra, message, no_model_load, tmp_path, capsys):
    path = tmp_path / "plan.json"
    path.write_text(plan)
    argv = [command, "--plan", str(path), "--no-store", *extra] + (["--out", str(tmp_path / "o")] if command == "export" else [])
    assert message in one_line_error(capsys, *argv)


@pytest.mark.parametrize("extra, message", [
    (["--sparsities", "1.5"], "pruning.sparsity: 1.5 is outside [0, 1)"),
    (["--bits", "5"], "quant.bits: 5 bits is not supported"),
    (["--structure", "banana"], "neither 'unstructured' nor 'N:M'"),
    (["--accelerator", "TPU v9"], "accelerator: unknown 'TPU v9'"),
])
def test_sweep_errors_before_model_loads(extra, message, no_model_load, capsys):
    assert message in one_line_error(capsys, "sweep", "--no-store", *extra)


def test_sweep_structure_3_5_one_line_exit_2(tiny_model_dirs, no_model_load, capsys):
    """3:5 parses, but the tiny model's 32-wide rows are not a multiple of 5: found from the shapes of
    a weightless copy, before the model loads (it used to be a ValueError traceback mid-sweep)."""
    err = one_line_error(capsys, "sweep", "--model", str(tiny_model_dirs["mixtral"]), "--structure", "3:5", "--no-store")
    assert "pruning.structure: 3:5 needs rows whose width is a multiple of 5" in err


def test_plan_index_errors_before_model_loads(tiny_model_dirs, no_model_load, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"removed_experts": [[0, 9]]}))
    err = one_line_error(capsys, "evaluate", "--model", str(tiny_model_dirs["mixtral"]), "--plan", str(plan), "--no-store")
    assert "expert 9 does not exist; layer 0 has 4 experts" in err


def test_evaluate_unknown_accelerator_one_line_exit_2(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text("{}")
    err = one_line_error(capsys, "evaluate", "--plan", str(plan), "--accelerator", "TPU v9", "--no-store")
    assert "'NVIDIA H100 SXM'" in err  # the choices are listed


def test_blank_bits_cell_gives_plan_error(loaded_tiny):
    lm = loaded_tiny("mixtral")
    plan = CompressionPlan()
    table = expert_table(plan, lm.layers, None)
    edited = [dict(r) for r in table]
    edited[3]["bits"] = math.nan  # what st.data_editor returns for an emptied cell
    with pytest.raises(PlanError, match=r"layer 0 expert 3: the bits cell is empty; enter one of 2, 3, 4, 8, 16"):
        apply_table_edits(plan, table, edited)
    edited[3]["bits"], edited[5]["sparsity"] = 16, None
    with pytest.raises(PlanError, match=r"layer 1 expert 1: the sparsity cell is empty"):
        apply_table_edits(plan, table, edited)
    edited[5]["sparsity"], edited[5]["remove"] = 0.0, None  # an emptied checkbox leaves the expert as it was
    assert apply_table_edits(plan, table, edited).removed_experts == []


# ------------------------------------------------------------------------------------- model input

@pytest.fixture(scope="module")
def nan_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nan_model")
    model = build_tiny_model("mixtral")
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[2, 0, 0] = float("nan")
        model.model.layers[1].mlp.experts.down_proj[2, 0, 1] = float("inf")
    model.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_nan_weights_refused_naming_tensor(nan_model_dir, capsys):
    with pytest.raises(ModelSourceError, match=r"weight model\.layers\.1\.mlp\.experts\.down_proj .* holds 1 NaN and 1 "
                                               r"infinite values; the checkpoint is corrupt"):
        load_model(nan_model_dir)
    assert "model.layers.1.mlp.experts.down_proj" in one_line_error(capsys, "info", "--model", str(nan_model_dir))


def test_unknown_model_type_message_is_short(tmp_path):
    """transformers' refusal lists ~300 causal LM classes (kilobytes); moeviz keeps one short line."""
    vit = tmp_path / "vit"
    transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16).save_pretrained(vit)
    (vit / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelSourceError) as e:
        load_model(vit)
    msg = str(e.value)
    assert "model type 'vit'" in msg and "AutoModelForCausalLM" in msg
    assert len(msg) < 300 and "\n" not in msg and "LlamaForCausalLM" not in msg
    config = json.loads((vit / "config.json").read_text())
    (vit / "config.json").write_text(json.dumps({**config, "model_type": "no_such_type"}))
    with pytest.raises(ModelSourceError) as e:
        load_model(vit)
    assert "no_such_type" in str(e.value) and len(str(e.value)) < 300 and "\n" not in str(e.value)


def test_offline_hub_id_one_line_exit_2(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "--local-dir" in one_line_error(capsys, "info", "--model", "someone/some-moe")


# ------------------------------------------------------------------------------------- text input

def test_binary_text_refused(tmp_path, capsys, tiny_model_dirs):
    png = tmp_path / "picture.txt"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4)
    with pytest.raises(CalibrationDataError, match=r"picture.txt is a binary file, not text \(NUL byte at offset 8\)"):
        documents_from_file(png)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps({"text": "café"}, ensure_ascii=False).encode("latin-1"))
    with pytest.raises(CalibrationDataError, match=r"latin.jsonl is not UTF-8 text \(byte 0xe9"):
        documents_from_file(latin)
    assert decode_text("\ufeffhello".encode("utf-8"), "bom.txt") == "hello"  # a UTF-8 BOM is fine
    err = one_line_error(capsys, "calibrate", "--model", str(tiny_model_dirs["mixtral"]), "--data", str(png),
                         "--out", str(tmp_path / "stats"))
    assert "binary file" in err and not (tmp_path / "stats").exists()


def test_seq_len_above_context_refused(tmp_path, capsys, tiny_model_dirs, loaded_tiny):
    with pytest.raises(CalibrationDataError, match=f"sequence length 65 is above the model's context of {CONTEXT} "
                                                   f"tokens; choose at most {CONTEXT}"):
        load_calibration_data(loaded_tiny("mixtral").tokenizer, seq_len=65, n_samples=1,
                              max_seq_len=loaded_tiny("mixtral").max_context)
    err = one_line_error(capsys, "calibrate", "--model", str(tiny_model_dirs["mixtral"]), "--seq-len", "128",
                         "--out", str(tmp_path / "stats"))
    assert f"above the model's context of {CONTEXT} tokens" in err
    data = write_cal(tmp_path)
    argv = eval_argv(tiny_model_dirs["mixtral"], data)
    argv[argv.index("--eval-seq-len") + 1] = "100"
    plan = tmp_path / "plan.json"
    plan.write_text("{}")
    assert "sequence length 100 is above" in one_line_error(capsys, "evaluate", "--plan", str(plan), *argv)


def test_seq_len_above_context_refused_before_model_loads(tmp_path, capsys, tiny_model_dirs, no_model_load):
    plan = tmp_path / "plan.json"
    plan.write_text("{}")
    err = one_line_error(capsys, "sweep", "--model", str(tiny_model_dirs["mixtral"]), "--seq-len", "65", "--no-store")
    assert "sequence length 65 is above the model's context of 64 tokens" in err


def test_eval_windows_default_to_a_short_context(tmp_path, capsys, tiny_model_dirs):
    """Without --eval-seq-len, a model built for fewer than 256 tokens is evaluated on its context."""
    data = write_cal(tmp_path)
    argv = eval_argv(tiny_model_dirs["mixtral"], data)
    i = argv.index("--eval-seq-len")
    del argv[i:i + 2]
    plan = tmp_path / "plan.json"
    plan.write_text("{}")
    assert main(["evaluate", "--plan", str(plan), "--json", str(tmp_path / "r.json"), *argv]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["eval_tokens"] == 4 * CONTEXT  # 4 windows (--eval-samples) of the model's 64 tokens, not 256


@pytest.mark.parametrize("argv, message", [
    (["calibrate", "--batch-size", "0", "--out", "x"], "--batch-size: must be at least 1, got 0"),
    (["calibrate", "--samples", "0", "--out", "x"], "--samples: must be at least 1, got 0"),
    (["sweep", "--eval-samples", "0", "--no-store"], "--eval-samples: must be at least 1, got 0"),  # was: NaN metrics
])
def test_bad_counts_refused_before_model_loads(argv, message, no_model_load, capsys):
    assert message in one_line_error(capsys, *argv)


@pytest.mark.parametrize("device, message", [
    ("tpu", "unknown device 'tpu'; use cpu, cuda, cuda:N or mps"),
    ("cuda:99", "device 'cuda:99'"),
])
def test_unusable_device_one_line_exit_2(device, message, tiny_model_dirs, capsys):
    assert message in one_line_error(capsys, "info", "--model", str(tiny_model_dirs["mixtral"]), "--device", device)


def test_app_seq_len_above_context_refused(tiny_model_dirs):
    at = _app(tiny_model_dirs["mixtral"]).run()
    _ok(at)
    at.number_input[0].set_value(2)
    at.number_input[1].set_value(CONTEXT + 1)
    next(b for b in at.button if b.label == "Run calibration").click().run()
    assert not at.exception and f"above the model's context of {CONTEXT} tokens" in at.error[0].value
    assert at.session_state["stats"] is None


def test_truncated_safetensors_refused(tiny_model_dirs, tmp_path, capsys):
    import shutil

    folder = tmp_path / "truncated"
    shutil.copytree(tiny_model_dirs["mixtral"], folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted download
    err = one_line_error(capsys, "info", "--model", str(folder))
    assert "cannot read the weights" in err and "damaged or incomplete" in err


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path):
    """JSON allows U+2028 unescaped inside a string; the file is split on newlines only."""
    path = tmp_path / "sep.jsonl"
    path.write_text(json.dumps({"text": "first\u2028second"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert [d.text for d in documents_from_file(path)] == ["first\u2028second"]


def test_library_refuses_windows_past_the_context(loaded_tiny, tmp_path):
    """Library callers that cut their own windows are checked too: the stats cache and the evaluator."""
    from moeviz.data import Document, tokenize_documents
    from moeviz.evaluation import Evaluator
    from moeviz.workspace import calibrate_cached

    lm = loaded_tiny("mixtral")
    long = tokenize_documents([Document("a long text about experts. " * 40)], lm.tokenizer, 1, CONTEXT + 8)
    with pytest.raises(CalibrationDataError, match="above the model's context"):
        calibrate_cached(lm, long, cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing cached
    with pytest.raises(CalibrationDataError, match="above the model's context"):
        Evaluator(lm, long)


def test_folder_without_tokenizer_one_line_exit_2(tmp_path, capsys):
    folder = tmp_path / "no-tokenizer"
    build_tiny_model("mixtral").save_pretrained(folder)  # weights and config, no tokenizer
    capsys.readouterr()  # save_pretrained's progress bar
    err = one_line_error(capsys, "info", "--model", str(folder))
    assert "cannot load the tokenizer" in err and "it has no tokenizer files" in err


def test_default_seq_len_shortened_to_context(tmp_path, capsys, tiny_model_dirs):
    """Only a length the user typed is refused: unset, --seq-len (128) fits a 64-token model."""
    from moeviz.calibration import CalibrationStats

    out = tmp_path / "stats"
    assert main(["calibrate", "--model", str(tiny_model_dirs["mixtral"]), "--data", str(write_cal(tmp_path)),
                 "--samples", "2", "--out", str(out)]) == 0
    assert CalibrationStats.load(out).n_tokens == 2 * CONTEXT
