"""Deterministic three-domain corpus built only from what every Python installation ships.

Domains
-------
* ``prose``   -- the interpreter's own documentation topics (``pydoc_data.topics``, English
  prose from the Python Language Reference) plus long docstrings of standard-library modules.
* ``code``    -- standard-library source files (code, comments and docstrings).
* ``tabular`` -- CSV tables, arithmetic tables and sensor logs generated from a seeded RNG.

Every document carries a domain label and a stable ``doc_id``.  The train / calibration /
held-out split is made per *source* (a whole documentation topic, a whole stdlib file, a
whole generated table) so no held-out text leaks into training through a neighbouring chunk.

Python docs and stdlib source are distributed under the PSF License Version 2.
"""
from __future__ import annotations

import ast
import hashlib
import json
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

DOMAINS = ("prose", "code", "tabular")

# Stdlib folders we do not read: tests (huge, repetitive), vendored / generated data tables,
# GUI demos, and the documentation topics themselves (already the prose domain).
_SKIP_DIRS = {
    "test", "tests", "site-packages", "dist-packages", "idlelib", "lib2to3", "tkinter",
    "turtledemo", "ensurepip", "encodings", "pydoc_data", "__pycache__", "unittest", "distutils",
}
_CHUNK_CHARS = 2400  # documents are cut at line / paragraph boundaries near this size


@dataclass(frozen=True)
class Doc:
    text: str
    domain: str
    source: str  # split unit: all chunks of one source land in the same split


def _stable_hash(s: str, seed: int) -> int:
    # Python's hash() is salted per process; sha1 keeps the split identical across runs.
    return int.from_bytes(hashlib.sha1(f"{seed}:{s}".encode()).digest()[:8], "big")


def _chunk(text: str, sep: str, max_chars: int = _CHUNK_CHARS) -> list[str]:
    """Greedily pack ``sep``-separated pieces into chunks of about ``max_chars``."""
    chunks, cur = [], ""
    for piece in text.split(sep):
        if cur and len(cur) + len(piece) + len(sep) > max_chars:
            chunks.append(cur)
            cur = piece
        else:
            cur = f"{cur}{sep}{piece}" if cur else piece
    if cur.strip():
        chunks.append(cur)
    return [c for c in chunks if len(c.strip()) >= 80]


# ----------------------------------------------------------------------------- prose + code
def stdlib_files(limit: int | None = None) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for p in sorted(root.rglob("*.py")):
        parts = p.relative_to(root).parts
        if set(parts[:-1]) & _SKIP_DIRS or parts[0].startswith("test"):
            continue
        files.append(p)
    return files[:limit] if limit else files


def prose_docs(limit: int | None = None) -> list[Doc]:
    from pydoc_data.topics import topics  # stdlib: the text behind help('keywords') etc.

    docs = []
    for name in sorted(topics)[:limit]:
        for chunk in _chunk(topics[name].strip(), "\n\n"):
            docs.append(Doc(chunk, "prose", f"topic:{name}"))
    return docs


def code_and_docstring_docs(files: list[Path]) -> tuple[list[Doc], list[Doc]]:
    """Code chunks of each stdlib file, plus its long docstrings as extra prose."""
    root = Path(sysconfig.get_paths()["stdlib"])
    code, prose = [], []
    for p in files:
        rel = p.relative_to(root).as_posix()
        try:
            src = p.read_text(encoding="utf-8")
            tree = ast.parse(src)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        for chunk in _chunk(src.expandtabs(4), "\n"):
            code.append(Doc(chunk, "code", f"stdlib:{rel}"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 300:  # short docstrings are mostly signatures, not prose
                    # Same source key as the code: a file's docstrings share its split.
                    prose.append(Doc(doc.strip(), "prose", f"stdlib:{rel}"))
    return code, prose


# ----------------------------------------------------------------------------- tabular
_REGIONS = ["north", "south", "east", "west", "central"]
_PRODUCTS = ["widget", "gadget", "bolt", "nut", "gear", "spring", "valve", "pump", "hinge", "lever"]
_STATIONS = ["alpha", "bravo", "delta", "echo", "kilo", "lima", "oscar", "tango"]


def _sales_table(rng: random.Random) -> str:
    # Prices are fixed per document, so a model can learn to copy them from earlier rows.
    prices = {p: round(rng.uniform(0.5, 60.0), 2) for p in _PRODUCTS}
    oid, day, month = rng.randint(1000, 90000), rng.randint(1, 20), rng.randint(1, 12)
    lines = ["order_id,date,region,product,qty,unit_price,total"]
    for _ in range(rng.randint(25, 45)):
        oid += 1
        day += rng.choice([0, 0, 1, 1, 2])
        if day > 28:
            day, month = 1, month % 12 + 1
        prod = rng.choice(_PRODUCTS)
        qty = rng.randint(1, 12)
        lines.append(f"{oid},2024-{month:02d}-{day:02d},{rng.choice(_REGIONS)},{prod},{qty},"
                     f"{prices[prod]:.2f},{qty * prices[prod]:.2f}")
    return "\n".join(lines)


def _arith_table(rng: random.Random) -> str:
    a = rng.randint(2, 30)
    op = rng.choice(["x", "+", "-"])
    fn = {"x": lambda a, b: a * b, "+": lambda a, b: a + b, "-": lambda a, b: a - b}[op]
    start = rng.randint(1, 40)
    lines = [f"# table of {a} ({op})"]
    lines += [f"{a} {op} {b} = {fn(a, b)}" for b in range(start, start + rng.randint(20, 40))]
    return "\n".join(lines)


def _sensor_log(rng: random.Random) -> str:
    # Slowly drifting readings at a fixed cadence: structured, partly predictable numbers.
    st, temp, hum = rng.choice(_STATIONS), rng.uniform(-5, 30), rng.uniform(20, 90)
    step = rng.choice([5, 10, 15, 30])
    h, m = rng.randint(0, 20), 0
    lines = ["time,station,temp_c,humidity_pct,status"]
    for _ in range(rng.randint(25, 45)):
        temp += rng.uniform(-0.6, 0.6)
        hum = min(99.0, max(5.0, hum + rng.uniform(-1.5, 1.5)))
        status = "ok" if rng.random() > 0.08 else rng.choice(["warn", "fault"])
        lines.append(f"{h:02d}:{m:02d},{st},{temp:.1f},{hum:.0f},{status}")
        m += step
        h, m = (h + m // 60) % 24, m % 60
    return "\n".join(lines)


def tabular_docs(n: int, seed: int) -> list[Doc]:
    gens = [_sales_table, _arith_table, _sensor_log]
    docs = []
    for i in range(n):
        rng = random.Random(_stable_hash(f"tab{i}", seed))  # one seeded stream per document
        docs.append(Doc(gens[i % 3](rng), "tabular", f"tab:{i}"))
    return docs


# ----------------------------------------------------------------------------- split + io
def build_corpus(seed: int = 0, tiny: bool = False, n_tabular: int = 6000) -> list[Doc]:
    files = stdlib_files(limit=12 if tiny else None)
    code, doc_prose = code_and_docstring_docs(files)
    prose = prose_docs(limit=6 if tiny else None) + doc_prose
    tab = tabular_docs(60 if tiny else n_tabular, seed)
    return prose + code + tab


def split_corpus(docs: list[Doc], eval_chars: dict[str, tuple[int, int]], seed: int = 0,
                 max_source_chars: int = 5000) -> tuple[list[Doc], list[Doc], list[Doc]]:
    """Split by source into (train, calibration, heldout).

    ``eval_chars[domain] = (heldout_chars, calibration_chars)``: sources are visited in a seeded
    hash order and whole sources go to held-out until its budget is met, then calibration.
    Held-out prose and code come only from documentation topics / whole stdlib files.
    """
    by_source: dict[str, list[Doc]] = {}
    for d in docs:
        by_source.setdefault(d.source, []).append(d)
    order = sorted(by_source, key=lambda s: _stable_hash(s, seed))
    train, calib, held = [], [], []
    filled = {dom: [0, 0] for dom in DOMAINS}
    for src in order:
        group = by_source[src]
        # Eval prose comes only from doc topics (clean prose); eval code only from code chunks.
        eval_group = [d for d in group if not (d.domain == "prose" and src.startswith("stdlib:"))]
        dom = eval_group[0].domain if eval_group else None
        for k, bucket in ((0, held), (1, calib)):
            if dom and filled[dom][k] < eval_chars[dom][k]:
                # Take only the first few chunks of a source so one big file cannot dominate;
                # the rest of that source is dropped, never trained on.
                taken = 0
                for d in eval_group:
                    if taken >= max_source_chars or filled[dom][k] >= eval_chars[dom][k]:
                        break
                    bucket.append(d)
                    taken += len(d.text)
                    filled[dom][k] += len(d.text)
                break
        else:
            train += group
    return train, calib, held


def write_jsonl(path: Path, docs: list[Doc]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d.text, "domain": d.domain}, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
