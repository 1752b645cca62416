"""Task accuracy with lm-eval-harness on the model in memory (moeviz.evaluation.tasks), the bundled offline
tasks (moeviz.evaluation.bundled_tasks), the store's task rows and the CLI options. Item counts are kept
small with `limit`."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from moeviz.compression import CompressionPlan, PruningSettings
from moeviz.compression.apply import Compressor
from moeviz.data import bundled_documents
from moeviz.errors import SettingsError
from moeviz.evaluation.bundled_tasks import BUNDLED_TASKS_DIR, TASK_SPECS, build_items, write_tasks
from moeviz.evaluation.tasks import TaskSettings, TasksUnavailableError, evaluate_tasks, require_lm_eval, task_average

pytest.importorskip("lm_eval", reason="the eval extra (lm-eval-harness) is not installed")


@pytest.fixture(scope="module")
def demo():
    from moeviz.models import load_model

    return load_model()  # the bundled demo MoE: a real tokenizer and a model that has learnt the text


def test_bundled_task_files_are_rebuilt_byte_for_byte(tmp_path):
    counts = write_tasks(tmp_path, seed=0)
    assert sum(counts.values()) >= 300
    shipped = sorted(p.name for p in BUNDLED_TASKS_DIR.iterdir() if p.is_file())
    assert shipped == sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    for name in shipped:
        assert (tmp_path / name).read_bytes() == (BUNDLED_TASKS_DIR / name).read_bytes(), name


def test_items_are_cut_from_the_held_out_text():
    """Brute force: every item's context is the text right before its offset in its document, the answer
    is the text that follows, the distractors differ from it; no context is blank (lm-eval asserts)."""
    docs = bundled_documents("heldout")
    items = build_items(docs, seed=0)
    assert set(items) == {s.name for s in TASK_SPECS}
    for spec in TASK_SPECS:
        domain_docs = [d for d in docs if d.domain == spec.domain]
        assert len(items[spec.name]) == spec.n_items
        for it in items[spec.name]:
            text = domain_docs[it["doc"]].text
            answer = it["choices"][it["label"]]
            assert len(it["choices"]) == 4 == len(set(it["choices"]))
            assert text[:it["offset"]].endswith(it["context"]) and it["context"].strip()
            assert text[it["offset"]:].startswith(answer)
            if spec.kind == "real_text":  # corrupted copies: the same words in another order, or one replaced
                assert all(len(c.split()) == len(answer.split()) for c in it["choices"])
    assert build_items(docs, seed=1)["moeviz_code_cloze"] != items["moeviz_code_cloze"]


def test_without_lm_eval_one_line_names_the_extra(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(TasksUnavailableError, match=r"pip install 'moeviz\[eval\]'"):
        require_lm_eval()
    from moeviz.cli import main

    plan = tmp_path / "plan.json"
    plan.write_text("{}")
    assert main(["evaluate", "--plan", str(plan), "--tasks", "bundled", "--no-store"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moeviz: error:") and "moeviz[eval]" in err and "\n" not in err


def test_settings_are_checked(monkeypatch):
    with pytest.raises(SettingsError, match="need --tasks"):
        TaskSettings.from_cli("", limit=3)
    with pytest.raises(SettingsError, match="limit"):
        TaskSettings(limit=0).validate()
    from moeviz.evaluation import tasks as tasks_mod

    # A name not found among the bundled / included tasks is looked up among lm-eval's ~15k own tasks
    # (seconds to index): here only the bundled ones stand in for them.
    real = tasks_mod.task_manager
    monkeypatch.setattr(tasks_mod, "task_manager", lambda include, defaults: real(include, False))
    with pytest.raises(SettingsError, match="unknown task.*did you mean moeviz_code_cloze"):
        tasks_mod.resolve_tasks(TaskSettings(tasks=["moeviz_code_clozee"], include_path=str(BUNDLED_TASKS_DIR)))
    assert TaskSettings(limit=3, batch_size=4).key() == TaskSettings(limit=3, batch_size=64).key()
    assert task_average({"a": dict(acc=0.5, acc_stderr=0.3), "b": dict(acc=1.0, acc_stderr=0.4)}) == \
        pytest.approx((0.75, 0.25))


def test_lazy_materialised_and_base_agree_and_base_is_untouched(demo):
    """The same plan applied lazily (experts compressed inside the forward) and materialised gives the same
    loglikelihoods; a dense plan gives the base model's; evaluating leaves the base's weights as they were."""
    settings = TaskSettings(tasks=["moeviz_code_cloze"], limit=5, batch_size=8)
    before = {k: v.clone() for k, v in demo.model.state_dict().items()}
    comp = Compressor(demo, None)
    plan = CompressionPlan(pruning=PruningSettings(metric="magnitude", sparsity=0.7))
    mat = evaluate_tasks(comp.apply(plan).model, demo.tokenizer, settings, keep_samples=True)
    lazy_model = comp.apply(plan, lazy=True)
    lazy = evaluate_tasks(lazy_model.model, demo.tokenizer, settings, lazy=True, keep_samples=True)
    base = evaluate_tasks(demo.model, demo.tokenizer, settings, keep_samples=True)
    dense = evaluate_tasks(comp.apply(CompressionPlan()).model, demo.tokenizer, settings, keep_samples=True)
    ll = lambda r: torch.tensor([s["loglikelihoods"] for s in r.samples["moeviz_code_cloze"]])  # noqa: E731
    torch.testing.assert_close(ll(lazy), ll(mat), rtol=0, atol=1e-4)
    torch.testing.assert_close(ll(dense), ll(base), rtol=0, atol=1e-4)
    assert not torch.allclose(ll(mat), ll(base), atol=1e-2)  # 70 % pruning moves them
    t = mat.tasks["moeviz_code_cloze"]
    assert t["n"] == 5 and t["limit"] == 5 and t["num_fewshot"] == 0 and t["seed"] == 1234 and t["version"] == 1.0
    targets = [s["target"] for s in mat.samples["moeviz_code_cloze"]]
    assert t["acc"] == pytest.approx(sum(int(torch.tensor(row).argmax() == tg)
                                         for row, tg in zip(ll(mat).tolist(), targets)) / 5)
    assert all(torch.equal(v, demo.model.state_dict()[k]) for k, v in before.items())


_LM_EVAL_ON_FOLDER = textwrap.dedent("""
    import json, sys
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    folder, include, task, limit, out = sys.argv[1:6]
    res = simple_evaluate(model=HFLM(pretrained=folder, batch_size=8, device="cpu"), tasks=[task], limit=int(limit),
                          task_manager=TaskManager(include_path=include, include_defaults=False), log_samples=True,
                          random_seed=1234, numpy_random_seed=1234, torch_random_seed=1234, fewshot_random_seed=1234)
    json.dump(dict(acc=res["results"][task]["acc,none"], acc_norm=res["results"][task]["acc_norm,none"],
                   ll=[[float(r[0]) for r in s["filtered_resps"]] for s in sorted(res["samples"][task],
                                                                                  key=lambda s: s["doc_id"])]),
              open(out, "w"))
""")


def test_agreement_with_lm_eval_run_on_the_exported_folder(demo, tmp_path):
    """moeviz's in-memory evaluation of a (dense) plan equals lm-eval's own simple_evaluate + HFLM on the
    exported Hugging Face folder, run in a separate process: same accuracies, same loglikelihoods."""
    from moeviz.export import export_model

    task, limit = "moeviz_prose_real_text", 8
    compressed = Compressor(demo, None).apply(CompressionPlan())
    ours = evaluate_tasks(compressed.model, demo.tokenizer, TaskSettings(tasks=[task], limit=limit, batch_size=8),
                          keep_samples=True)
    folder = export_model(demo, compressed, tmp_path / "exported")
    script = tmp_path / "lm_eval_on_folder.py"
    script.write_text(_LM_EVAL_ON_FOLDER)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TQDM_DISABLE="1")
    subprocess.run([sys.executable, str(script), str(folder), str(BUNDLED_TASKS_DIR), task, str(limit),
                    str(tmp_path / "theirs.json")], check=True, env=env, capture_output=True, timeout=300)
    theirs = json.loads((tmp_path / "theirs.json").read_text())
    assert ours.tasks[task]["acc"] == theirs["acc"] and ours.tasks[task]["acc_norm"] == theirs["acc_norm"]
    ours_ll = torch.tensor([s["loglikelihoods"] for s in ours.samples[task]])
    assert torch.equal(ours_ll, torch.tensor(theirs["ll"], dtype=ours_ll.dtype))  # exactly: same forward, same sums


def test_cli_evaluate_and_sweep_report_tasks(demo, tmp_path, capsys):
    """--tasks / --limit / --json on evaluate and sweep; the runs carry their task rows in the store."""
    from moeviz.cli import main
    from moeviz.store import RunStore

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"pruning": {"metric": "magnitude", "sparsity": 0.5}}))
    store = tmp_path / "runs.sqlite"
    common = ["--samples", "4", "--seq-len", "32", "--eval-samples", "4", "--eval-seq-len", "64", "--no-latency",
              "--store", str(store), "--tasks", "moeviz_tabular_cloze,moeviz_code_cloze", "--limit", "2"]
    assert main(["evaluate", "--plan", str(plan), "--json", str(tmp_path / "r.json")] + common) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["tasks"]) == {"moeviz_tabular_cloze", "moeviz_code_cloze"}
    assert set(out["tasks"]["moeviz_code_cloze"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}
    assert out["tasks"]["moeviz_code_cloze"]["n"] == 2 and len(out["perplexity_95ci"]) == 2
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["tasks"]["moeviz_code_cloze"]["n"] == 2 and saved["task_settings"]["limit"] == 2
    assert main(["sweep", "--methods", "magnitude", "--sparsities", "0.5", "0.7", "--csv", str(tmp_path / "s.csv"),
                 "--json", str(tmp_path / "s.json")] + common) == 0
    sweep = json.loads((tmp_path / "s.json").read_text())
    assert len(sweep["runs"]) == 2 and sweep["runs"][0]["reused"]  # 50 %: evaluated with these tasks before
    assert {r["name"] for r in sweep["tasks"]} == {"magnitude 50%", "magnitude 70%"}
    rows = RunStore(store).task_results()
    assert len(rows) == 2 * 2 * 2 and set(rows["model"]) == {"compressed", "base"} and set(rows["n"]) == {2}


def test_a_stored_run_is_reused_only_with_the_same_tasks(demo, tmp_path):
    from moeviz.data import Document, tokenize_documents
    from moeviz.evaluation import EvalSettings, Evaluator, evaluate_plan
    from moeviz.store import RunStore

    held = tokenize_documents([Document("def f(x):\n    return x + 1\n" * 40, "code")], demo.tokenizer, 2, 32)
    ev, store, comp = Evaluator(demo, held, EvalSettings(measure_latency=False)), RunStore(tmp_path / "r.sqlite"), \
        Compressor(demo, None)
    plan = CompressionPlan(pruning=PruningSettings(metric="magnitude", sparsity=0.5))
    plain, first = evaluate_plan(comp, ev, plan, store)
    assert plain.tasks is None
    two = TaskSettings(tasks=["moeviz_tabular_cloze"], limit=2)
    with_tasks, second = evaluate_plan(comp, ev, plan, store, tasks=two)
    assert second != first and with_tasks.tasks["moeviz_tabular_cloze"]["n"] == 2
    assert with_tasks.base_tasks["moeviz_tabular_cloze"]["n"] == 2 and with_tasks.task_settings["limit"] == 2
    assert evaluate_plan(comp, ev, plan, store, tasks=two)[1] == second  # same tasks: reused
    assert evaluate_plan(comp, ev, plan, store)[1] == second  # no tasks asked for: any run of the plan
    three = TaskSettings(tasks=["moeviz_tabular_cloze"], limit=3)
    assert evaluate_plan(comp, ev, plan, store, tasks=three)[1] not in (first, second)


def test_quality_view_axes_error_bars_and_task_table():
    import pandas as pd

    from moeviz.qualityview import accuracy_choices, task_rows, with_accuracy_spread

    df = pd.DataFrame({"accuracy": [0.5, 0.4], "accuracy_lo": [0.45, 0.35], "accuracy_hi": [0.55, 0.45],
                       "task_acc[a]": [0.6, 0.5], "task_acc_stderr[a]": [0.05, 0.04],
                       "base_task_acc[a]": [0.7, 0.7], "base_task_acc_stderr[a]": [0.03, 0.03],
                       "task_acc[b]": [0.8, None], "task_acc_stderr[b]": [0.1, None],
                       "task_average": [0.7, None], "task_average_stderr": [0.056, None]})
    assert list(accuracy_choices(df)) == ["accuracy", "task_average", "task_acc[a]", "task_acc[b]"]
    assert with_accuracy_spread(df, "accuracy")[1] == ("accuracy_lo", "accuracy_hi")
    out, (lo, hi) = with_accuracy_spread(df, "task_acc[a]")
    assert list(out[lo]) == pytest.approx([0.55, 0.46]) and list(out[hi]) == pytest.approx([0.65, 0.54])
    assert list(out[f"base_{lo}"]) == pytest.approx([0.67, 0.67]) and list(out[f"base_{hi}"]) == pytest.approx([0.73, 0.73])
    result = {"tasks": {"a": dict(acc=0.6, acc_stderr=0.05, n=10), "b": dict(acc=0.8, acc_stderr=0.1, n=20)},
              "base_tasks": {"a": dict(acc=0.7, acc_stderr=0.03, n=10), "b": dict(acc=0.9, acc_stderr=0.1, n=20)}}
    rows = task_rows(result)
    assert [r["task"] for r in rows] == ["a", "b", "average of 2 tasks"]
    assert rows[0]["difference"] == pytest.approx(-10.0) and rows[2]["accuracy"] == pytest.approx(70.0)
    assert rows[2]["stderr"] == pytest.approx(100 * (0.05 ** 2 + 0.1 ** 2) ** 0.5 / 2) and rows[2]["n"] == 30


def test_an_offloaded_model_is_evaluated_where_its_hooks_compute(tiny_model_dirs, tmp_path):
    """accelerate offload leaves the parameters on "meta": the inputs go to the hooks' execution device, and
    the loglikelihoods are those of the same plan on the model held in memory."""
    from moeviz.models import load_model

    settings = TaskSettings(tasks=["moeviz_tabular_cloze"], limit=3)
    plan = CompressionPlan(pruning=PruningSettings(metric="magnitude", sparsity=0.5))
    full = load_model(tiny_model_dirs["mixtral"])
    off = load_model(tiny_model_dirs["mixtral"], max_memory={"cpu": "60KB"}, offload_folder=tmp_path / "offload")
    assert off.model.device.type == "meta"
    a = evaluate_tasks(Compressor(full, None).apply(plan).model, full.tokenizer, settings, keep_samples=True)
    b = evaluate_tasks(Compressor(off, None).apply(plan, lazy=True).model, off.tokenizer, settings, lazy=True,
                       keep_samples=True)
    assert [s["loglikelihoods"] for s in a.samples["moeviz_tabular_cloze"]] == \
        [s["loglikelihoods"] for s in b.samples["moeviz_tabular_cloze"]]
