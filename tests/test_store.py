"""Tests of moeviz.store: round trip, concurrent writers, a writer killed mid-sweep, migrations."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moeviz import store as store_mod
from moeviz.evaluation.pareto import pareto_front
from moeviz.store import RunRecord, RunStore, data_dir, new_sweep_id

REPO = Path(__file__).resolve().parents[1]


def record(i: int, model="model-a", **kw) -> RunRecord:
    return RunRecord(
        name=f"run {i}",
        model_fingerprint=model,
        plan={"sparsity": 0.1 * i, "layers": [{"experts": [0, 1]}]},
        metrics={
            "perplexity": 10.0 + i,
            "accuracy": 0.5 - 0.01 * i,
            "compression_ratio": 1.0 + 0.5 * i,
            "per_domain": {"code": {"perplexity": 20.0 + i}},
            "drift": [0.1, 0.2],
        },
        **kw,
    )


def test_data_dir_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("MOEVIZ_DATA_DIR", str(tmp_path / "d"))
    assert data_dir() == tmp_path / "d"
    assert RunStore().path == tmp_path / "d" / "runs.sqlite"
    monkeypatch.delenv("MOEVIZ_DATA_DIR")
    if sys.platform.startswith("linux"):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert data_dir() == tmp_path / "xdg" / "moeviz"


def test_round_trip_and_queries(tmp_path):
    s = RunStore(tmp_path / "runs.sqlite")
    assert s._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    sweep = new_sweep_id()
    assert sweep != new_sweep_id() and s.new_sweep_id().startswith("sweep-")
    r0 = record(0, sweep_id=sweep, duration_s=1.5, calibration_fingerprint="cal", eval_fingerprint="ev")
    id0 = s.add_run(r0)
    id1 = s.add_run(record(1, sweep_id=sweep))
    id2 = s.add_run(record(2, model="model-b", parent_run_id=id0))
    s.add_run(RunRecord(name="nan", model_fingerprint="model-a", plan={}, metrics={"perplexity": float("nan")}))

    got = s.get_run(id0)
    assert got.plan == r0.plan and got.metrics == r0.metrics
    assert (got.name, got.sweep_id, got.duration_s, got.calibration_fingerprint) == ("run 0", sweep, 1.5, "cal")
    assert got.id == id0 and got.created_at.endswith("+00:00") and got.moeviz_version
    assert s.get_run(id2).parent_run_id == id0
    assert s.get_run(4).metrics == {"perplexity": None}  # NaN stored as JSON null

    df = s.runs(model_fingerprint="model-a")
    assert list(df["id"]) == [id0, id1, 4]
    assert df.loc[df["id"] == id1, "perplexity"].item() == 11.0
    assert df.loc[df["id"] == id1, "per_domain.code.perplexity"].item() == 21.0
    assert math.isnan(df.loc[df["id"] == 4, "perplexity"].item())
    assert "drift" not in df.columns  # lists are not numeric columns
    assert list(s.runs(sweep_id=sweep)["id"]) == [id0, id1]
    assert len(s.runs()) == 4
    assert s.runs(model_fingerprint="nope").empty

    # Pareto on model-a: run 0 (cr 1.0, acc .5) and run 1 (cr 1.5, acc .49) trade off; the NaN run has neither.
    runs = s.runs(model_fingerprint="model-a")
    assert list(pareto_front(runs, "compression_ratio", "accuracy")["id"]) == [id0, id1]
    assert list(pareto_front(runs, "compression_ratio", "perplexity", maximize_y=False)["id"]) == [id0, id1]

    assert s.delete_run(id0) is True and s.delete_run(id0) is False
    assert s.get_run(id2).parent_run_id is None  # child kept, link cleared
    with pytest.raises(KeyError):
        s.get_run(id0)
    s.close()
    # Reopening finds the same data.
    with RunStore(tmp_path / "runs.sqlite") as s2:
        assert len(s2.runs()) == 3 and s2.schema_version == len(store_mod.MIGRATIONS)


WRITER_SCRIPT = """
import sys, time
from pathlib import Path
from moeviz.store import RunStore, RunRecord
path, tag, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
while not go.exists():  # both processes start, then create/migrate the new file at the same moment
    time.sleep(0.01)
s = RunStore(path)
for i in range(20):
    s.add_run(RunRecord(name=f"run {i}", model_fingerprint=tag, plan={"i": i}, metrics={"accuracy": 0.5}))
s.close()
"""


def test_two_processes_write_concurrently(tmp_path):
    # Plain subprocesses (not multiprocessing's spawn, which re-imports whatever __main__ the test
    # runner has, e.g. a Streamlit script loaded by an earlier AppTest).
    path = str(tmp_path / "runs.sqlite")
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, path, tag, str(go)], cwd=REPO)
             for tag in ("p1", "p2")]
    time.sleep(0.5)
    go.touch()
    for p in procs:
        assert p.wait(60) == 0
    s = RunStore(path)
    df = s.runs()
    assert len(df) == 40
    assert sorted(df["model_fingerprint"].value_counts().items()) == [("p1", 20), ("p2", 20)]
    assert sorted(df["name"][df["model_fingerprint"] == "p1"]) == sorted(f"run {i}" for i in range(20))


def test_open_waits_for_a_lock_held_while_switching_to_wal(tmp_path):
    # The race CI hit: another process holds a lock on a store that is not in WAL mode yet (e.g. it is
    # creating or migrating the same new file) while this one opens it. `PRAGMA journal_mode = WAL`
    # does not wait on busy_timeout, so opening failed at once with "database is locked".
    import threading

    path = tmp_path / "runs.sqlite"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE t (x)")
    other.execute("BEGIN IMMEDIATE")  # a write lock on a database still in rollback-journal mode
    threading.Timer(0.3, lambda: other.execute("COMMIT")).start()
    t0 = time.monotonic()
    with RunStore(path) as s:
        assert time.monotonic() - t0 >= 0.25  # it waited for the lock instead of failing
        assert s._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        s.add_run(record(0))
        assert len(s.runs()) == 1
    other.close()


@pytest.mark.slow  # spawns many interpreters: about a minute on 2 cores
def test_many_processes_open_a_new_store_at_once(tmp_path):
    # Four writers create and migrate the same new file at the same moment, three times over.
    for attempt in range(3):
        path = str(tmp_path / f"runs{attempt}.sqlite")
        go = tmp_path / f"go{attempt}"
        tags = [f"p{i}" for i in range(4)]
        procs = [subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, path, tag, str(go)], cwd=REPO,
                                  stderr=subprocess.PIPE, text=True) for tag in tags]
        time.sleep(0.5)
        go.touch()
        for p in procs:
            assert p.wait(120) == 0, p.stderr.read()
            p.stderr.close()
        with RunStore(path) as s:
            assert sorted(s.runs()["model_fingerprint"].value_counts().items()) == [(t, 20) for t in tags]


KILL_SCRIPT = """
import sys, time
from moeviz.store import RunStore, RunRecord
s = RunStore(sys.argv[1])
i = 0
while True:
    # A large payload so that writes take a while and a kill can land inside one.
    s.add_run(RunRecord(name=f"run {i}", model_fingerprint="m", plan={"i": i, "blob": list(range(20000))},
                        metrics={"i": i, "accuracy": 0.5, "per_layer": [float(j) for j in range(5000)]}))
    print(i, flush=True)
    i += 1
    time.sleep(0.005)
"""


def test_killed_writer_leaves_only_complete_runs(tmp_path):
    path = tmp_path / "runs.sqlite"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(5):  # five runs committed (printed after their commit)
            assert proc.stdout.readline(), "writer exited early"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL

    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    s = RunStore(path)
    df = s.runs()
    assert len(df) >= 5
    for run_id in df["id"]:
        r = s.get_run(int(run_id))
        i = r.metrics["i"]
        assert r.name == f"run {i}" and r.plan["i"] == i and len(r.plan["blob"]) == 20000
        assert len(r.metrics["per_layer"]) == 5000
    assert sorted(df["name"]) == sorted(f"run {i}" for i in range(len(df)))  # no gaps, no partial run
    s.add_run(record(0))  # still writable after the crash


def test_migrates_older_schema(tmp_path, monkeypatch):
    # Version 0: a file from before the store existed (no schema_version table).
    path0 = tmp_path / "v0.sqlite"
    sqlite3.connect(path0).close()
    assert RunStore(path0).schema_version == len(store_mod.MIGRATIONS)

    # The current version with data, then a hypothetical next migration appended: data kept, column added.
    path = tmp_path / "runs.sqlite"
    s = RunStore(path)
    run_id = s.add_run(record(3))
    s.close()
    migration_2 = ["ALTER TABLE runs ADD COLUMN energy_j REAL", "UPDATE runs SET energy_j = 7.0"]
    monkeypatch.setattr(store_mod, "MIGRATIONS", store_mod.MIGRATIONS + [migration_2])
    s = RunStore(path)
    assert s.schema_version == len(store_mod.MIGRATIONS)
    assert s._conn.execute("SELECT energy_j FROM runs WHERE id = ?", (run_id,)).fetchone()[0] == 7.0
    assert s.get_run(run_id).metrics == record(3).metrics
    s.close()
    RunStore(path).close()  # reopening at the current version applies nothing twice

    # A database newer than the code is refused rather than misread.
    monkeypatch.setattr(store_mod, "MIGRATIONS", store_mod.MIGRATIONS[:1])
    with pytest.raises(RuntimeError, match="newer"):
        RunStore(path)


def test_failed_write_leaves_nothing(tmp_path):
    s = RunStore(tmp_path / "runs.sqlite")
    with pytest.raises(sqlite3.IntegrityError):  # name is NOT NULL
        s.add_run(RunRecord(name=None, model_fingerprint="m", plan={}, metrics={"accuracy": 1.0}))
    assert s.runs().empty
    s.add_run(record(0))
    assert len(s.runs()) == 1
    json.dumps(s.runs().drop(columns=["plan_json"]).to_dict("records"))


def test_find_rename_tag_and_stored_plans(tmp_path):
    from moeviz.store import plan_key

    s = RunStore(tmp_path / "runs.sqlite")
    plan = {"pruning": {"sparsity": 0.5}, "name": ""}
    a = s.add_run(RunRecord(name="a", model_fingerprint="m", plan=plan, metrics={"accuracy": 0.5},
                            calibration_fingerprint="c", eval_fingerprint="e"))
    # The same plan (its name aside) on the same model, calibration and text is found; anything else is not.
    assert s.find_run("m", {**plan, "name": "renamed plan"}, "c", "e").id == a
    assert s.find_run("m", plan, "c", "other text") is None and s.find_run("m2", plan, "c", "e") is None
    assert s.find_run("m", {"pruning": {"sparsity": 0.6}, "name": ""}, "c", "e") is None
    s.add_run(RunRecord(name="recovered", model_fingerprint="m", plan=plan, metrics={}, calibration_fingerprint="c",
                        eval_fingerprint="e", parent_run_id=a))
    assert s.find_run("m", plan, "c", "e").id == a  # a recovery run is not the plan's evaluation
    assert plan_key(plan) == plan_key({**plan, "name": "x"})

    s.rename_run(a, "  baseline 50 %  ")
    assert s.set_tags(a, "keep, paper,keep, ") == ["keep", "paper"]
    r = s.get_run(a)
    assert r.name == "baseline 50 %" and r.tags == ["keep", "paper"]
    assert s.runs().set_index("id").loc[a, "tags"] == "keep, paper"
    with pytest.raises(ValueError):
        s.rename_run(a, " ")
    with pytest.raises(KeyError):
        s.set_tags(999, "x")

    pid = s.save_plan(plan)
    assert s.save_plan(plan) == pid and s.get_plan(pid) == plan
    with pytest.raises(KeyError):
        s.get_plan("nope")


def test_version_1_file_gets_tags_and_plans(tmp_path, monkeypatch):
    path = tmp_path / "runs.sqlite"
    monkeypatch.setattr(store_mod, "MIGRATIONS", store_mod.MIGRATIONS[:1])
    old = RunStore(path)
    old._conn.execute("INSERT INTO runs (name, model_fingerprint, plan_json, metrics_json, created_at) "
                      "VALUES ('old', 'm', '{}', '{}', 'then')")
    old.close()
    monkeypatch.undo()
    s = RunStore(path)
    assert s.schema_version == len(store_mod.MIGRATIONS) >= 2
    r = s.runs()
    assert list(r["name"]) == ["old"] and list(r["tags"]) == [""]
    assert s.set_tags(int(r["id"][0]), "a") == ["a"] and s.get_run(int(r["id"][0])).tags == ["a"]


def test_version_2_file_gets_the_latency_columns_filled_from_its_runs(tmp_path, monkeypatch):
    """Migration 3 adds the back-to-back latency columns and fills them from each run's metrics; a run
    stored before (base timed once, no spread) keeps NULL there and stays readable."""
    path = tmp_path / "runs.sqlite"
    monkeypatch.setattr(store_mod, "MIGRATIONS", store_mod.MIGRATIONS[:2])
    old = RunStore(path)
    for name, metrics in (("old", {"measured_decode_ms": 5.0}),
                          ("ab", {"measured_decode_ms": 4.0, "base_measured_decode_ms": 6.0, "measured_decode_q1_ms": 3.5,
                                  "measured_decode_q3_ms": 4.5, "latency_busy": 1.0})):
        old._conn.execute("INSERT INTO runs (name, model_fingerprint, plan_json, metrics_json, created_at) "
                          "VALUES (?, 'm', '{}', ?, 'then')", (name, json.dumps(metrics)))
    old.close()
    monkeypatch.undo()
    s = RunStore(path)
    assert s.schema_version == len(store_mod.MIGRATIONS) >= 3
    cols = ["base_measured_decode_ms", "measured_decode_q1_ms", "measured_decode_q3_ms", "latency_busy"]
    rows = s._conn.execute(f"SELECT name, {', '.join(cols)} FROM runs ORDER BY id").fetchall()
    assert rows == [("old", None, None, None, None), ("ab", 6.0, 3.5, 4.5, 1.0)]
    df = s.runs().set_index("name")
    assert df.loc["ab", "latency_busy"] == 1.0 and math.isnan(df.loc["old", "latency_busy"])
    new = s.add_run(RunRecord(name="new", model_fingerprint="m", plan={}, metrics={"latency_busy": 0.0,
                                                                                    "measured_decode_q3_ms": 2.0}))
    assert s.get_run(new).extra["latency_busy"] == 0.0 and s.get_run(new).extra["measured_decode_q3_ms"] == 2.0


def test_version_3_file_gets_task_rows_and_interval_columns(tmp_path, monkeypatch):
    """Migration 4: the task / interval columns filled from old runs' metrics, a run_tasks table; a run's task
    scores (compressed and base, from its details) become rows, replaced on update, deleted with the run."""
    path = tmp_path / "runs.sqlite"
    monkeypatch.setattr(store_mod, "MIGRATIONS", store_mod.MIGRATIONS[:3])
    old = RunStore(path)
    old._conn.execute("INSERT INTO runs (name, model_fingerprint, plan_json, metrics_json, created_at) "
                      "VALUES ('old', 'm', '{}', ?, 'then')", (json.dumps({"perplexity_lo": 9.5}),))
    old.close()
    monkeypatch.undo()
    s = RunStore(path)
    assert s.schema_version == len(store_mod.MIGRATIONS) >= 4
    assert s._conn.execute("SELECT perplexity_lo, task_average FROM runs").fetchall() == [(9.5, None)]
    assert s.task_results().empty
    score = dict(acc=0.5, acc_stderr=0.1, acc_norm=0.25, acc_norm_stderr=0.05, n=40, version=1.0, num_fewshot=0,
                 seed=1234, limit=None)
    run = s.add_run(RunRecord(name="t", model_fingerprint="m", plan={}, metrics={
        "task_average": 0.5, "details": {"tasks": {"a": score}, "base_tasks": {"a": dict(score, acc=0.75)}}}))
    rows = s.task_results(run_id=run).set_index("model")
    assert rows.loc["compressed", "acc"] == 0.5 and rows.loc["base", "acc"] == 0.75
    assert rows.loc["base", "n"] == 40 and rows.loc["base", "version"] == "1.0" and rows.loc["base", "seed"] == 1234
    assert s.get_run(run).extra["task_average"] == 0.5
    s.update_metrics(run, {"tasks": {"b": score}})
    assert set(s.task_results(run_id=run)["task"]) == {"b"}
    s.delete_run(run)
    assert s.task_results().empty
