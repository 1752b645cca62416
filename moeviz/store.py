"""Persistent store of evaluation runs, on SQLite (stdlib only).

* One file, ``runs.sqlite``, in the data dir (``$MOEVIZ_DATA_DIR``, else the user cache dir).
* WAL journal + busy timeout: several processes (the app, a CLI sweep) can read while one writes,
  and concurrent writers wait for each other instead of failing.
* Every run is written in one transaction, so a sweep killed mid-way keeps each finished run and
  never leaves a half-written one.
* The schema is versioned: ``schema_version`` holds the version, ``MIGRATIONS[i]`` brings a database
  from version i to i + 1, and opening a store applies the missing ones in order. To change the
  schema, append a migration; never edit one that has shipped.

Plans and metrics are stored as JSON; a few metrics are also copied into numeric columns
(``DENORMALISED_METRICS``) so the app can filter and sort without parsing JSON.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from moeviz.compression.plan import plan_key as canonical_plan_key
from moeviz.resources import data_dir  # noqa: F401  (moeviz.store.data_dir: where the run store lives)

DB_FILENAME = "runs.sqlite"
BUSY_TIMEOUT_MS = 30_000

# Top-level keys of RunRecord.metrics copied into columns of the same name: those of schema version 1
# (its CREATE TABLE, frozen) and those added by later migrations.
_V1_METRICS = (
    "perplexity",
    "accuracy",
    "compression_ratio",
    "experts_compression_ratio",
    "measured_decode_ms",
    "projected_decode_ms",
    "mean_cv",
    "mean_topk_overlap",
)
# Version 3: measured latency is base and compressed timed back to back; its spread (quartiles), the
# base's median of the same loop, and whether the machine looked busy (1.0) are kept per run.
_V3_METRICS = (
    "base_measured_decode_ms",
    "measured_decode_q1_ms",
    "measured_decode_q3_ms",
    "latency_busy",
)
# Version 4: task accuracy (lm-eval-harness, moeviz.evaluation.tasks): the unweighted task average and its
# standard error, and the bootstrap intervals of perplexity and accuracy (moeviz.evaluation.uncertainty).
_V4_METRICS = (
    "task_average",
    "task_average_stderr",
    "perplexity_lo",
    "perplexity_hi",
    "accuracy_lo",
    "accuracy_hi",
)
DENORMALISED_METRICS = _V1_METRICS + _V3_METRICS + _V4_METRICS

_MIGRATION_1 = [
    """
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY,
        sweep_id TEXT,
        parent_run_id INTEGER REFERENCES runs(id) ON DELETE SET NULL,
        name TEXT NOT NULL,
        model_fingerprint TEXT NOT NULL,
        calibration_fingerprint TEXT,
        eval_fingerprint TEXT,
        plan_json TEXT NOT NULL,
        metrics_json TEXT NOT NULL,
    """
    + "".join(f"        {m} REAL,\n" for m in _V1_METRICS)
    + """
        duration_s REAL,
        created_at TEXT NOT NULL,
        moeviz_version TEXT
    )
    """,
    "CREATE INDEX runs_model ON runs(model_fingerprint)",
    "CREATE INDEX runs_sweep ON runs(sweep_id)",
    "CREATE INDEX runs_parent ON runs(parent_run_id)",
]

# Version 2: tags on runs (a JSON list of strings; NULL = none), and plans stored by content id
# (a plan too long for a URL is referenced as ?plan_id=…).
_MIGRATION_2 = [
    "ALTER TABLE runs ADD COLUMN tags TEXT",
    """
    CREATE TABLE plans (
        id TEXT PRIMARY KEY,
        plan_json TEXT NOT NULL,
        created_at TEXT NOT NULL
    )
    """,
]

# Version 3: the back-to-back latency columns, filled from the metrics of runs stored before (old runs
# have the base median only where their evaluation measured it, and no spread or busy flag: NULL).
_MIGRATION_3 = [f"ALTER TABLE runs ADD COLUMN {m} REAL" for m in _V3_METRICS] + [
    f"UPDATE runs SET {m} = json_extract(metrics_json, '$.{m}') "
    f"WHERE json_valid(metrics_json) AND typeof(json_extract(metrics_json, '$.{m}')) IN ('real', 'integer')"
    for m in _V3_METRICS
]

# Version 4: the task / interval columns (filled from older runs' metrics where present), and one row per
# (run, model, task) in run_tasks: model is "compressed" or "base" (the base model's score on the same
# task, run with the same settings), with everything needed to report it (version, n, few-shot, seed).
_MIGRATION_4 = [f"ALTER TABLE runs ADD COLUMN {m} REAL" for m in _V4_METRICS] + [
    f"UPDATE runs SET {m} = json_extract(metrics_json, '$.{m}') "
    f"WHERE json_valid(metrics_json) AND typeof(json_extract(metrics_json, '$.{m}')) IN ('real', 'integer')"
    for m in _V4_METRICS
] + [
    """
    CREATE TABLE run_tasks (
        run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
        model TEXT NOT NULL,
        task TEXT NOT NULL,
        version TEXT,
        acc REAL,
        acc_stderr REAL,
        acc_norm REAL,
        acc_norm_stderr REAL,
        n INTEGER,
        num_fewshot INTEGER,
        seed INTEGER,
        item_limit INTEGER,
        PRIMARY KEY (run_id, model, task)
    )
    """,
    "CREATE INDEX run_tasks_task ON run_tasks(task)",
]

# MIGRATIONS[i] upgrades a database from schema version i to i + 1 (a list of SQL statements).
MIGRATIONS: list[list[str]] = [_MIGRATION_1, _MIGRATION_2, _MIGRATION_3, _MIGRATION_4]

_BASE_COLUMNS = (
    "id", "sweep_id", "parent_run_id", "name", "model_fingerprint", "calibration_fingerprint",
    "eval_fingerprint", "duration_s", "created_at", "moeviz_version",
)


def plan_key(plan: dict) -> str:
    """`compression.plan.plan_key` of a stored plan (arrays, numpy numbers and NaN made plain JSON first)."""
    return canonical_plan_key(_jsonable(plan or {}))


def _tags(raw) -> list[str]:
    return list(json.loads(raw)) if raw else []


def clean_tags(tags) -> list[str]:
    """Tags as typed ("a, b" or a list): stripped, non-empty, unique, in order."""
    if isinstance(tags, str):
        tags = tags.split(",")
    out = []
    for t in tags or []:
        t = str(t).strip()
        if t and t not in out:
            out.append(t)
    return out


@dataclass
class RunRecord:
    """One evaluated compression plan. ``id`` and ``created_at`` are filled in by the store."""

    name: str
    model_fingerprint: str
    plan: dict
    metrics: dict
    calibration_fingerprint: str | None = None
    eval_fingerprint: str | None = None
    sweep_id: str | None = None
    parent_run_id: int | None = None  # a recovery run points at its unrecovered parent
    duration_s: float | None = None
    created_at: str | None = None  # UTC ISO 8601
    moeviz_version: str | None = None
    id: int | None = None
    tags: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # denormalised columns as read back (informative)


def _jsonable(obj):
    """Plain JSON: tensors/arrays -> lists, numpy scalars -> numbers, NaN/inf -> None (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "tolist"):  # torch.Tensor, numpy array or scalar
        return _jsonable(obj.tolist())
    if hasattr(obj, "__dataclass_fields__"):
        from dataclasses import asdict

        return _jsonable(asdict(obj))
    return obj


def _number(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _flatten(d: dict, prefix: str = "") -> dict:
    """Nested dict -> {"a.b": number} for numeric leaves only."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


def _task_scores(metrics: dict) -> list[tuple[str, str, dict]]:
    """(model, task, scores) of a run's task results: metrics["tasks"] / ["base_tasks"], else those of
    metrics["details"] (an EvalResult as stored by `store_result`)."""
    details = metrics.get("details") if isinstance(metrics.get("details"), dict) else {}
    out = []
    for model, key in (("compressed", "tasks"), ("base", "base_tasks")):
        tasks = metrics.get(key) if isinstance(metrics.get(key), dict) else details.get(key)
        for task, scores in (tasks or {}).items():
            if isinstance(scores, dict):
                out.append((model, str(task), scores))
    return out


def _write_tasks(conn: sqlite3.Connection, run_id: int, metrics: dict) -> None:
    rows = _task_scores(metrics)
    if not rows:
        return
    conn.execute("DELETE FROM run_tasks WHERE run_id = ?", (int(run_id),))
    for model, task, sc in rows:
        version = sc.get("version")
        conn.execute(
            "INSERT INTO run_tasks (run_id, model, task, version, acc, acc_stderr, acc_norm, acc_norm_stderr, n, "
            "num_fewshot, seed, item_limit) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (int(run_id), model, task, None if version is None else str(version),
             *[_number(sc.get(k)) for k in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")],
             *[None if sc.get(k) is None else int(sc[k]) for k in ("n", "num_fewshot", "seed", "limit")]))


def _is_lock_error(e: sqlite3.OperationalError) -> bool:
    text = str(e).lower()
    return "locked" in text or "busy" in text


def _retry_while_locked(fn, timeout_s: float = BUSY_TIMEOUT_MS / 1000):
    """Call `fn` until it stops failing with "database is locked", for at most `timeout_s`.

    Some statements do not wait on busy_timeout: switching the journal mode needs an exclusive lock
    and fails at once while another process holds any lock (as happens when two processes open a new
    store together), and SQLite may return SQLITE_BUSY without waiting to avoid a deadlock. Both are
    transient, so they are retried with a capped exponential backoff."""
    deadline = time.monotonic() + timeout_s
    delay = 0.002
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as e:
            if not _is_lock_error(e) or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _enable_wal(conn: sqlite3.Connection) -> None:
    # WAL is a persistent property of the file: once one process has switched it, later opens only
    # read the mode (no exclusive lock needed).
    mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    if str(mode).lower() != "wal":
        conn.execute("PRAGMA journal_mode = WAL")


def new_sweep_id() -> str:
    """A unique id grouping the runs of one sweep: UTC timestamp + random suffix (sortable)."""
    return datetime.now(timezone.utc).strftime("sweep-%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:8]


class RunStore:
    """Runs of every model, in one SQLite file. Safe to share between threads and processes."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else data_dir() / DB_FILENAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode (isolation_level=None): transactions are opened explicitly in `_write`,
        # with BEGIN IMMEDIATE, so DDL in migrations is transactional too.
        # check_same_thread=False + a lock: Streamlit reruns a script in different threads.
        self._conn = sqlite3.connect(
            str(self.path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
        )
        self._lock = threading.RLock()
        self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        _retry_while_locked(lambda: _enable_wal(self._conn))
        # NORMAL is durable against process crashes in WAL mode (only an OS crash can lose the
        # last commits), and much cheaper than FULL's fsync per transaction.
        self._conn.execute("PRAGMA synchronous = NORMAL")
        self._conn.execute("PRAGMA foreign_keys = ON")
        self._migrate()

    # -- plumbing ----------------------------------------------------------------------------------

    @contextmanager
    def _write(self):
        """One write transaction. BEGIN IMMEDIATE takes the write lock up front: a deferred
        transaction that reads first and then writes can fail with 'database is locked' at once
        (without waiting for busy_timeout) when another process committed in between."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _migrate(self) -> None:
        _retry_while_locked(self._migrate_once)

    def _migrate_once(self) -> None:
        with self._write() as conn:
            # Inside the write transaction, so two processes opening a new file migrate it once.
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            version = row[0] if row else 0
            if row is None:
                conn.execute("INSERT INTO schema_version (version) VALUES (0)")
            if version > len(MIGRATIONS):
                raise RuntimeError(
                    f"{self.path} has run-store schema version {version}, newer than this moeviz "
                    f"({len(MIGRATIONS)}); upgrade moeviz or set MOEVIZ_DATA_DIR to another folder"
                )
            for v in range(version, len(MIGRATIONS)):
                for statement in MIGRATIONS[v]:
                    conn.execute(statement)
                conn.execute("UPDATE schema_version SET version = ?", (v + 1,))

    @property
    def schema_version(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT version FROM schema_version").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- runs --------------------------------------------------------------------------------------

    def add_run(self, record: RunRecord) -> int:
        """Insert a run in one transaction and return its id (also set on `record`)."""
        from moeviz import __version__

        created = record.created_at or datetime.now(timezone.utc).isoformat()
        version = record.moeviz_version or __version__
        metrics = _jsonable(record.metrics or {})
        row = {
            "sweep_id": record.sweep_id,
            "parent_run_id": record.parent_run_id,
            "name": record.name,
            "model_fingerprint": record.model_fingerprint,
            "calibration_fingerprint": record.calibration_fingerprint,
            "eval_fingerprint": record.eval_fingerprint,
            "plan_json": json.dumps(_jsonable(record.plan or {}), allow_nan=False, sort_keys=True),
            "metrics_json": json.dumps(metrics, allow_nan=False, sort_keys=True),
            **{m: _number(metrics.get(m)) for m in DENORMALISED_METRICS},
            "duration_s": _number(record.duration_s),
            "created_at": created,
            "moeviz_version": version,
            "tags": json.dumps(clean_tags(record.tags)) if record.tags else None,
        }
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self._write() as conn:
            run_id = conn.execute(f"INSERT INTO runs ({cols}) VALUES ({marks})", tuple(row.values())).lastrowid
            _write_tasks(conn, run_id, metrics)
        record.id, record.created_at, record.moeviz_version = run_id, created, version
        return run_id

    def _select(self, where: str = "", params: tuple = ()) -> list[dict]:
        with self._lock:
            cur = self._conn.execute(f"SELECT * FROM runs {where} ORDER BY id", params)
            names = [c[0] for c in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]

    @staticmethod
    def _record(row: dict) -> RunRecord:
        return RunRecord(
            plan=json.loads(row["plan_json"]),
            metrics=json.loads(row["metrics_json"]),
            extra={m: row[m] for m in DENORMALISED_METRICS},
            tags=_tags(row.get("tags")),
            **{c: row[c] for c in _BASE_COLUMNS},
        )

    def get_run(self, run_id: int) -> RunRecord:
        rows = self._select("WHERE id = ?", (int(run_id),))
        if not rows:
            raise KeyError(f"no run with id {run_id} in {self.path}")
        return self._record(rows[0])

    def runs(self, model_fingerprint: str | None = None, sweep_id: str | None = None):
        """pandas.DataFrame, one row per run (ordered by id): the base columns, the denormalised
        metrics, ``plan_json``, and every other numeric metric flattened as ``"a.b"`` columns."""
        import pandas as pd

        clauses, params = [], []
        if model_fingerprint is not None:
            clauses.append("model_fingerprint = ?")
            params.append(model_fingerprint)
        if sweep_id is not None:
            clauses.append("sweep_id = ?")
            params.append(sweep_id)
        rows = self._select(("WHERE " + " AND ".join(clauses)) if clauses else "", tuple(params))
        base = list(_BASE_COLUMNS) + list(DENORMALISED_METRICS) + ["plan_json"]
        records = []
        for r in rows:
            rec = {c: r[c] for c in base}
            rec["tags"] = ", ".join(_tags(r.get("tags")))
            metrics = json.loads(r["metrics_json"])
            for k, v in _flatten(metrics).items():
                if k not in rec:
                    rec[k] = v
            # the accelerator the latency was projected on (a string: _flatten keeps numbers only)
            rec["projected_device"] = ((metrics.get("details") or {}).get("latency_projected") or {}).get("device")
            records.append(rec)
        df = pd.DataFrame.from_records(records, columns=None if records else base + ["tags"])
        for m in DENORMALISED_METRICS:
            df[m] = pd.to_numeric(df[m], errors="coerce")
        return df

    def delete_run(self, run_id: int) -> bool:
        """Delete a run (recovery runs that pointed at it keep existing, with parent_run_id NULL)."""
        with self._write() as conn:
            return conn.execute("DELETE FROM runs WHERE id = ?", (int(run_id),)).rowcount > 0

    def find_run(self, model_fingerprint: str, plan: dict, calibration_fingerprint: str | None = None,
                 eval_fingerprint: str | None = None) -> RunRecord | None:
        """The latest evaluation run (not a recovery: no parent) of this exact plan (its name aside) on
        the same model, calibration and held-out text, or None. Evaluating an unchanged plan again
        reuses it instead of storing a duplicate."""
        key = plan_key(plan)
        rows = self._select("WHERE model_fingerprint = ? AND parent_run_id IS NULL AND calibration_fingerprint IS ? "
                            "AND eval_fingerprint IS ?", (model_fingerprint, calibration_fingerprint, eval_fingerprint))
        for row in reversed(rows):
            if plan_key(json.loads(row["plan_json"])) == key:
                return self._record(row)
        return None

    def update_metrics(self, run_id: int, extra: dict) -> dict:
        """Merge `extra` into a run's metrics (top-level keys replaced), e.g. a later latency measurement,
        and the denormalised columns it names; returns the merged metrics."""
        with self._write() as conn:
            row = conn.execute("SELECT metrics_json FROM runs WHERE id = ?", (int(run_id),)).fetchone()
            if row is None:
                raise KeyError(f"no run with id {run_id} in {self.path}")
            metrics = {**json.loads(row[0]), **_jsonable(extra)}
            cols = [m for m in DENORMALISED_METRICS if m in extra]
            conn.execute(f"UPDATE runs SET {''.join(f'{m} = ?, ' for m in cols)}metrics_json = ? WHERE id = ?",
                         (*[_number(metrics[m]) for m in cols], json.dumps(metrics, allow_nan=False, sort_keys=True),
                          int(run_id)))
            _write_tasks(conn, run_id, _jsonable(extra))
        return metrics

    def task_results(self, model_fingerprint: str | None = None, run_id: int | None = None):
        """pandas.DataFrame of task scores, one row per (run, model, task): run_id, run name, model
        ("compressed" / "base"), task, version, acc, acc_stderr, acc_norm, acc_norm_stderr, n, num_fewshot,
        seed, item_limit."""
        import pandas as pd

        clauses, params = [], []
        if model_fingerprint is not None:
            clauses.append("r.model_fingerprint = ?")
            params.append(model_fingerprint)
        if run_id is not None:
            clauses.append("t.run_id = ?")
            params.append(int(run_id))
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        with self._lock:
            cur = self._conn.execute(
                f"SELECT t.run_id, r.name, t.model, t.task, t.version, t.acc, t.acc_stderr, t.acc_norm, "
                f"t.acc_norm_stderr, t.n, t.num_fewshot, t.seed, t.item_limit FROM run_tasks t "
                f"JOIN runs r ON r.id = t.run_id {where} ORDER BY t.run_id, t.model DESC, t.task", tuple(params))
            names = [c[0] for c in cur.description]
            return pd.DataFrame(cur.fetchall(), columns=names)

    def rename_run(self, run_id: int, name: str) -> None:
        name = str(name).strip()
        if not name:
            raise ValueError("a run name cannot be empty")
        with self._write() as conn:
            if conn.execute("UPDATE runs SET name = ? WHERE id = ?", (name, int(run_id))).rowcount == 0:
                raise KeyError(f"no run with id {run_id} in {self.path}")

    def set_tags(self, run_id: int, tags) -> list[str]:
        """Replace a run's tags ("a, b" or a list); returns them cleaned."""
        tags = clean_tags(tags)
        with self._write() as conn:
            if conn.execute("UPDATE runs SET tags = ? WHERE id = ?",
                            (json.dumps(tags) if tags else None, int(run_id))).rowcount == 0:
                raise KeyError(f"no run with id {run_id} in {self.path}")
        return tags

    def save_plan(self, plan: dict) -> str:
        """Store a plan under a short content id (the same plan always gets the same id)."""
        import hashlib

        text = json.dumps(_jsonable(plan), sort_keys=True, allow_nan=False)
        plan_id = hashlib.sha256(text.encode()).hexdigest()[:16]
        with self._write() as conn:
            conn.execute("INSERT OR IGNORE INTO plans (id, plan_json, created_at) VALUES (?, ?, ?)",
                         (plan_id, text, datetime.now(timezone.utc).isoformat()))
        return plan_id

    def get_plan(self, plan_id: str) -> dict:
        with self._lock:
            row = self._conn.execute("SELECT plan_json FROM plans WHERE id = ?", (str(plan_id),)).fetchone()
        if row is None:
            raise KeyError(f"no stored plan with id {plan_id} in {self.path}")
        return json.loads(row[0])

    new_sweep_id = staticmethod(new_sweep_id)


__all__ = ["DENORMALISED_METRICS", "MIGRATIONS", "RunRecord", "RunStore", "clean_tags", "data_dir", "new_sweep_id", "plan_key"]
