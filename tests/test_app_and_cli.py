"""The CLI runs end to end and reports bad input in one line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moeviz.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_cli_info_and_calibrate(tiny_model_dirs, tmp_path, capsys):
    assert main(["info", "--model", str(tiny_model_dirs["olmoe"])]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_moe_layers"] == 2 and info["num_experts"] == 8
    data = tmp_path / "cal.jsonl"
    data.write_text("\n".join(json.dumps({"text": "some calibration text number %d. " % i * 8, "domain": "d"})
                              for i in range(20)))
    out = tmp_path / "stats"
    assert main(["calibrate", "--model", str(tiny_model_dirs["olmoe"]), "--data", str(data), "--samples", "4",
                 "--seq-len", "16", "--out", str(out)]) == 0
    assert "calibrated 64 tokens" in capsys.readouterr().out
    from moeviz.calibration import CalibrationStats

    assert CalibrationStats.load(out).n_tokens == 64


@pytest.mark.parametrize("argv, message", [
    (["info", "--model", "/no/such/folder"], "does not exist"),
    (["calibrate", "--data", "/no/such.txt", "--out", "x"], "does not exist"),
])
def test_cli_errors_are_one_line_with_status_2(argv, message, tiny_model_dirs, capsys):
    if argv[0] == "calibrate":
        argv = argv[:1] + ["--model", str(tiny_model_dirs["mixtral"])] + argv[1:]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moeviz: error:") and message in err and "\n" not in err


def test_console_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "moeviz", "calibrate", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--seq-len" in out.stdout


def test_cli_evaluate_and_sweep_store_runs(tiny_model_dirs, tmp_path, capsys):
    import pandas as pd

    from moeviz.store import RunStore

    model = str(tiny_model_dirs["mixtral"])
    data = tmp_path / "cal.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"calibration sentence {i} about experts. " * 6, "domain": "d"})
                              for i in range(30)))
    common = ["--model", model, "--data", str(data), "--samples", "4", "--seq-len", "16", "--eval-data", str(data),
              "--eval-seq-len", "16", "--eval-samples", "4", "--no-latency", "--store", str(tmp_path / "runs.sqlite")]
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"pruning": {"metric": "wanda", "sparsity": 0.5}}))
    assert main(["evaluate", "--plan", str(plan), "--json", str(tmp_path / "r.json")] + common) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["compression_ratio"] > 1 and out["run_id"] == 1
    assert json.loads((tmp_path / "r.json").read_text())["plan"]["pruning"]["sparsity"] == 0.5
    csv = tmp_path / "sweep.csv"
    assert main(["sweep", "--methods", "magnitude", "moe_pruner", "--sparsities", "0.2", "0.6", "--group-size", "-1",
                 "--csv", str(csv)] + common) == 0
    df = pd.read_csv(csv)
    assert len(df) == 4 and set(df["method"]) == {"magnitude", "moe_pruner"}
    assert len(RunStore(tmp_path / "runs.sqlite").runs()) == 5


@pytest.mark.parametrize("argv, message", [
    (["sweep", "--sparsities", "1.5"], "pruning.sparsity: 1.5 is outside [0, 1)"),
    (["sweep", "--bits", "5"], "quant.bits: 5 bits is not supported"),
    (["evaluate", "--plan", "/no/plan.json"], "plan file /no/plan.json does not exist"),
])
def test_cli_evaluate_sweep_errors(argv, message, capsys):
    assert main(argv + ["--no-store"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moeviz: error:") and message in err


def test_cli_export(tiny_model_dirs, tmp_path, capsys):
    import transformers

    data = tmp_path / "cal.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"calibration sentence {i} about experts. " * 6}) for i in range(30)))
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"pruning": {"metric": "magnitude", "sparsity": 0.5}, "removed_experts": [[0, 1], [1, 2]]}))
    argv = ["export", "--model", str(tiny_model_dirs["mixtral"]), "--data", str(data), "--samples", "4", "--seq-len",
            "16", "--eval-data", str(data), "--eval-seq-len", "16", "--eval-samples", "4", "--no-latency",
            "--plan", str(plan), "--out", str(tmp_path / "exported")]
    assert main(argv) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    assert model.config.num_local_experts == 3
    assert "perplexity" in (tmp_path / "exported" / "moeviz_report.md").read_text()
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err


def test_cli_recover_stores_linked_runs_and_exports(tiny_model_dirs, tmp_path, capsys):
    from moeviz.store import RunStore

    data = tmp_path / "cal.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"calibration sentence {i} about experts. " * 6}) for i in range(30)))
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"pruning": {"metric": "moe_pruner", "sparsity": 0.5}}))
    store = tmp_path / "runs.sqlite"
    argv = ["recover", "--model", str(tiny_model_dirs["qwen3_moe"]), "--data", str(data), "--samples", "4",
            "--seq-len", "16", "--eval-data", str(data), "--eval-seq-len", "16", "--eval-samples", "4", "--no-latency",
            "--plan", str(plan), "--steps", "3", "--batch-size", "2", "--store", str(store),
            "--out", str(tmp_path / "recovered"), "--json", str(tmp_path / "rec.json")]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.split("\nexported to")[0])
    assert out["steps"] == 3 and out["parent_run_id"] == 1 and out["run_id"] == 2
    assert RunStore(store).get_run(2).parent_run_id == 1
    assert len(json.loads((tmp_path / "rec.json").read_text())["recovery"]["history"]) == 3
    assert "## Recovery" in (tmp_path / "recovered" / "moeviz_report.md").read_text()
    # The destination is checked before any training: an existing folder fails at once.
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err
    assert len(RunStore(store).runs()) == 2
    assert main(argv[:-4] + ["--steps", "0"]) == 2 and "recovery.steps" in capsys.readouterr().err
