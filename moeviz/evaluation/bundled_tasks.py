"""Small multiple-choice tasks built from moeviz's bundled held-out text, shipped in `sample_data/tasks/`.

They let the demo report task accuracy the way papers do (lm-eval-harness, zero-shot, acc / acc_norm with
their stderr) with no network. Every item is cut from `sample_data/heldout.jsonl` (never trained on, see
sample_data/README.md) by a seeded generator, so the files are fixed and this module rebuilds them
byte for byte:

    python -m moeviz.evaluation.bundled_tasks --out sample_data/tasks [--seed 0]

Two kinds of item, four choices each (chance = 25 %):

* **real text** (`moeviz_{prose,code,tabular}_real_text`): the context is up to `CONTEXT_CHARS` characters
  of a document ending before a word; the choices are the document's next `SPAN_WORDS` words and three
  corrupted copies of them (two neighbouring words swapped, twice at different places, and one word
  replaced by another word of the same document). Same words, same length: only a model that knows the
  language (or the code, or the table's layout) tells the real text apart. Measured on the demo, this
  kind is the one compression moves (a first design, "which line comes next" among other lines of the
  document, stayed near chance for prose and did not move under 70 % pruning).
* **cloze** (`moeviz_code_cloze`, `moeviz_tabular_cloze`): the context ends inside a line, just before
  an identifier (code) or a table cell (tables); the answer is that identifier / cell. Code: the
  identifier occurs earlier in the context and the distractors are three other identifiers of the
  context (the model must know *which* name fits, not just copy one). Tables: the distractors are
  three other values of the same column of the same table (for `a + b = c` tables the column is c).

Each task is one JSONL file (`context`, `choices`, `label`, provenance) and one lm-eval YAML; the YAMLs
load their file with `_moeviz_load.py` beside them (an lm-eval `custom_dataset`), so
`lm_eval --include_path sample_data/tasks --tasks moeviz_bundled` works from any directory and reads
nothing but these files (no datasets cache, no network).
"""

from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from moeviz.data import Document, bundled_documents
from moeviz.resources import SAMPLE_DATA_DIR

BUNDLED_TASKS_DIR = SAMPLE_DATA_DIR / "tasks"
TAG = "moeviz_bundled"  # lm-eval tag naming every bundled task
VERSION = 1  # bump when the items change (recorded with every result)
CONTEXT_CHARS = 140
SPAN_WORDS = 5
N_CHOICES = 4


@dataclass(frozen=True)
class TaskSpec:
    name: str
    domain: str
    kind: str  # "real_text" or "cloze"
    n_items: int


TASK_SPECS = (
    TaskSpec("moeviz_prose_real_text", "prose", "real_text", 80),
    TaskSpec("moeviz_code_real_text", "code", "real_text", 80),
    TaskSpec("moeviz_tabular_real_text", "tabular", "real_text", 40),
    TaskSpec("moeviz_code_cloze", "code", "cloze", 60),
    TaskSpec("moeviz_tabular_cloze", "tabular", "cloze", 60),
)
BUNDLED_TASK_NAMES = tuple(s.name for s in TASK_SPECS)

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{2,}")
_KEYWORDS = set(__import__("keyword").kwlist) | {"self", "None", "True", "False"}


def _context_before(text: str, end: int) -> str:
    """Up to CONTEXT_CHARS characters of `text` ending at `end`, starting at a line start."""
    start = max(0, end - CONTEXT_CHARS)
    if start > 0:
        nl = text.find("\n", start)
        start = nl + 1 if 0 <= nl < end else start
    return text[start:end]


def _line_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each line of `text` (end excludes the newline)."""
    spans, pos = [], 0
    for line in text.split("\n"):
        spans.append((pos, pos + len(line)))
        pos += len(line) + 1
    return spans


def _choices(rng: random.Random, answer: str, distractors: list[str]) -> tuple[list[str], int]:
    options = [answer] + distractors
    rng.shuffle(options)
    return options, options.index(answer)


def _code_cloze_items(docs: list[Document], spec: TaskSpec, rng: random.Random) -> list[dict]:
    candidates = []
    for di, d in enumerate(docs):
        for m in _IDENT.finditer(d.text):
            if m.group() not in _KEYWORDS and m.start() >= 120:
                candidates.append((di, m.start(), m.group()))
    rng.shuffle(candidates)
    items, used = [], set()
    for di, pos, answer in candidates:
        if len(items) == spec.n_items:
            break
        text = docs[di].text
        context = _context_before(text, pos)
        seen = sorted({w for w in _IDENT.findall(context) if w not in _KEYWORDS})
        # The name occurs before (so it is inferable) and the line has started (a context never ends blank).
        if answer not in seen or not context.split("\n")[-1].strip() or (di, pos) in used:
            continue
        pool = [w for w in seen if w != answer and not w.startswith(answer) and not answer.startswith(w)]
        if len(pool) < N_CHOICES - 1:
            continue
        used.add((di, pos))
        options, label = _choices(rng, answer, rng.sample(pool, N_CHOICES - 1))
        items.append(dict(context=context, choices=options, label=label, doc=di, offset=pos))
    return items


_ARITH = re.compile(r"^(-?\d+ [-+x] -?\d+ = )(-?\d+)$")


def _table_cells(text: str) -> list[tuple[int, int, int]]:
    """(start, end, column) of every cell of a table document: CSV cells after the first column and the
    header, or the result of `a op b = c` lines (column 0)."""
    cells = []
    for li, (s, e) in enumerate(_line_spans(text)):
        line = text[s:e]
        m = _ARITH.match(line)
        if m:
            cells.append((s + len(m.group(1)), e, 0))
        elif "," in line and li > 0:
            pos = s
            for col, field in enumerate(line.split(",")):
                if col > 0 and field:
                    cells.append((pos, pos + len(field), col))
                pos += len(field) + 1
    return cells


def _tabular_cloze_items(docs: list[Document], spec: TaskSpec, rng: random.Random) -> list[dict]:
    candidates = []
    for di, d in enumerate(docs):
        cells = _table_cells(d.text)
        by_col: dict[int, set[str]] = {}
        for s, e, col in cells:
            by_col.setdefault(col, set()).add(d.text[s:e])
        for s, e, col in cells:
            if s >= 150:
                candidates.append((di, s, e, sorted(by_col[col])))
    rng.shuffle(candidates)
    items = []
    for di, s, e, column in candidates:
        if len(items) == spec.n_items:
            break
        text = docs[di].text
        answer, context = text[s:e], _context_before(text, s)
        pool = [v for v in column if v != answer]
        if len(pool) < N_CHOICES - 1 or not context.strip():
            continue
        options, label = _choices(rng, answer, rng.sample(pool, N_CHOICES - 1))
        items.append(dict(context=context, choices=options, label=label, doc=di, offset=s))
    return items


_WORD = re.compile(r"\S+")


def _perturbed_items(docs: list[Document], spec: TaskSpec, rng: random.Random) -> list[dict]:
    """The next `SPAN_WORDS` words of the text against three corrupted copies of them: two neighbouring
    words swapped (two different swaps) and one word replaced by another word of the same document."""
    candidates = []
    for di, d in enumerate(docs):
        words = list(_WORD.finditer(d.text))
        for wi in range(8, len(words) - SPAN_WORDS):
            candidates.append((di, wi))
    rng.shuffle(candidates)
    items, used = [], set()
    for di, wi in candidates:
        if len(items) == spec.n_items:
            break
        text = docs[di].text
        words = list(_WORD.finditer(text))
        span = words[wi:wi + SPAN_WORDS]
        start, end = span[0].start(), span[-1].end()
        context = _context_before(text, start)
        if not context.strip() or any(abs(w - wi) < SPAN_WORDS for d2, w in used if d2 == di):
            continue
        toks = [w.group() for w in span]
        seps = [text[a.end():b.start()] for a, b in zip(span, span[1:])]
        join = lambda ts: "".join(t + s for t, s in zip(ts, seps + [""]))  # noqa: E731
        answer = join(toks)
        options = set()
        pairs = [i for i in range(SPAN_WORDS - 1) if toks[i] != toks[i + 1]]
        rng.shuffle(pairs)
        for i in pairs[:2]:
            t = list(toks)
            t[i], t[i + 1] = t[i + 1], t[i]
            options.add(join(t))
        vocab = sorted({w.group() for w in words} - set(toks))
        if vocab:
            t = list(toks)
            t[rng.randrange(SPAN_WORDS)] = rng.choice(vocab)
            options.add(join(t))
        options.discard(answer)
        if len(options) < N_CHOICES - 1:
            continue
        used.add((di, wi))
        opts, label = _choices(rng, answer, sorted(options)[:N_CHOICES - 1])
        items.append(dict(context=context, choices=opts, label=label, doc=di, offset=start))
    return items


def build_items(documents: list[Document], seed: int = 0) -> dict[str, list[dict]]:
    """{task name: items}; items of a task come from one domain's documents, in the order of the file."""
    out = {}
    for spec in TASK_SPECS:
        docs = [d for d in documents if d.domain == spec.domain]
        rng = random.Random(f"moeviz-tasks|{seed}|{spec.name}")  # str seeds are hashed stably (sha512)
        if spec.kind == "real_text":
            items = _perturbed_items(docs, spec, rng)
        elif spec.domain == "code":
            items = _code_cloze_items(docs, spec, rng)
        else:
            items = _tabular_cloze_items(docs, spec, rng)
        if len(items) < spec.n_items:
            raise ValueError(f"{spec.name}: only {len(items)} of {spec.n_items} items could be built")
        out[spec.name] = [dict(id=f"{spec.name}-{i}", domain=spec.domain, kind=spec.kind, **it)
                          for i, it in enumerate(items)]
    return out


_LOADER = '''"""Loads a moeviz bundled task file (lm-eval `custom_dataset`): the JSONL beside this file, so the task
works from any working directory and reads nothing else. Written by moeviz.evaluation.bundled_tasks."""

import json
from pathlib import Path


def load(file, **_metadata):
    import datasets

    rows = [json.loads(line) for line in (Path(__file__).parent / file).read_text(encoding="utf-8").splitlines()
            if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
'''


def _yaml(spec: TaskSpec, n: int, seed: int) -> str:
    return f"""# moeviz bundled task: {spec.kind.replace('_', ' ')} items from the held-out {spec.domain} text ({n} items).
# Generated by `python -m moeviz.evaluation.bundled_tasks --out sample_data/tasks --seed {seed}`; do not edit.
task: {spec.name}
tag: {TAG}
dataset_path: json
custom_dataset: !function _moeviz_load.load
dataset_kwargs:
  file: {spec.name}.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: {VERSION}.0
  seed: {seed}
"""


def write_tasks(out: str | Path = BUNDLED_TASKS_DIR, seed: int = 0, documents: list[Document] | None = None) -> dict:
    """Write every task's JSONL + YAML and the loader into `out`; returns {task: number of items}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    items = build_items(documents if documents is not None else bundled_documents("heldout"), seed)
    (out / "_moeviz_load.py").write_text(_LOADER, encoding="utf-8")
    counts = {}
    for spec in TASK_SPECS:
        rows = items[spec.name]
        (out / f"{spec.name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                                 encoding="utf-8")
        (out / f"{spec.name}.yaml").write_text(_yaml(spec, len(rows), seed), encoding="utf-8")
        counts[spec.name] = len(rows)
    return counts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(BUNDLED_TASKS_DIR), help="folder for the task files")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    counts = write_tasks(args.out, args.seed)
    print(f"{sum(counts.values())} items in {len(counts)} tasks -> {args.out}: {counts}")


if __name__ == "__main__":
    main()
