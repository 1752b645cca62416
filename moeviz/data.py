"""Calibration and evaluation text: load documents, tokenise, chunk into fixed-length samples.

A document is a piece of text with an optional domain label ("prose", "code", ...). Samples are
windows of `seq_len` tokens cut from the concatenation of one domain's documents (separated by the
tokenizer's EOS), so every sample carries exactly one domain label; the windows are chosen with a
seeded generator, round-robin across domains so that each domain is represented.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from moeviz.errors import CalibrationDataError
from moeviz.resources import SAMPLE_DATA_DIR  # the checkout's copy, or the installed one

BUNDLED_CALIBRATION = SAMPLE_DATA_DIR / "calibration.jsonl"
BUNDLED_HELDOUT = SAMPLE_DATA_DIR / "heldout.jsonl"
DEFAULT_DOMAIN = "text"


@dataclass
class Document:
    text: str
    domain: str = DEFAULT_DOMAIN


@dataclass
class TokenSamples:
    """`input_ids` [n_samples, seq_len] with one domain label per sample."""

    input_ids: torch.Tensor
    domains: list[str]
    source: str
    seed: int
    fingerprint: str
    domain_names: list[str] = field(default_factory=list)

    @property
    def n_samples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.numel())

    def domain_index(self) -> torch.Tensor:
        """[n_samples] index of each sample's domain in `domain_names`."""
        return torch.tensor([self.domain_names.index(d) for d in self.domains], dtype=torch.long)

    def describe(self) -> dict:
        return dict(source=self.source, n_samples=self.n_samples, seq_len=self.seq_len, seed=self.seed,
                    n_tokens=self.n_tokens, domains=self.domain_names, fingerprint=self.fingerprint)


# ---------------------------------------------------------------- documents from sources

def documents_from_text(text: str, domain: str = DEFAULT_DOMAIN) -> list[Document]:
    """Plain text (e.g. an uploaded .txt): one document per blank-line-separated block."""
    blocks = [b.strip() for b in text.replace("\r\n", "\n").split("\n\n")]
    return [Document(b, domain) for b in blocks if b]


def documents_from_jsonl(lines: Iterable[str], text_key: str = "text", domain_key: str = "domain",
                         name: str = "jsonl") -> list[Document]:
    docs = []
    for i, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationDataError(f"{name} line {i} is not valid JSON: {e.msg}") from e
        if not isinstance(obj, dict) or not isinstance(obj.get(text_key), str):
            keys = ", ".join(obj) if isinstance(obj, dict) else type(obj).__name__
            raise CalibrationDataError(f"{name} line {i} has no string field {text_key!r} (found: {keys})")
        docs.append(Document(obj[text_key], str(obj.get(domain_key) or DEFAULT_DOMAIN)))
    return docs


def decode_text(data: bytes, name: str) -> str:
    """UTF-8 text from a file's bytes; CalibrationDataError for anything else. A binary file decoded
    leniently yields replacement characters that tokenise into garbage statistics (cached for good)."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    nul = data.find(b"\0")
    if nul >= 0:
        raise CalibrationDataError(f"{name} is a binary file, not text (NUL byte at offset {nul}); "
                                   "give a UTF-8 .txt or .jsonl file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationDataError(
            f"{name} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "give a UTF-8 .txt or .jsonl file (re-save it as UTF-8 if it is text in another encoding)"
        ) from None


def documents_from_file(path: str | Path, text_key: str = "text") -> list[Document]:
    """A .txt file (domain = the file's stem) or a .jsonl file with text and optional domain fields."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CalibrationDataError(f"calibration file {path} does not exist")
    text = decode_text(path.read_bytes(), path.name)
    if path.suffix == ".jsonl":
        # split on "\n" only, as reading the file line by line did: splitlines() would also cut at
        # U+2028 and other separators that JSON allows unescaped inside strings
        return documents_from_jsonl(text.split("\n"), text_key=text_key, name=path.name)
    return documents_from_text(text, domain=path.stem)


def documents_from_hf_dataset(name: str, config: str | None = None, split: str = "train", column: str = "text",
                              domain_column: str | None = None, data_files=None,
                              max_documents: int = 10_000) -> list[Document]:
    """A Hugging Face dataset by name (hub or cached) or a local loader with `data_files`."""
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split, data_files=data_files)
    except Exception as e:  # datasets raises many types (connection, missing config, ...)
        raise CalibrationDataError(
            f"cannot load dataset {name!r} (config={config!r}, split={split!r}): {str(e).splitlines()[0]}"
        ) from e
    if column not in ds.column_names:
        raise CalibrationDataError(f"dataset {name!r} has no column {column!r} (columns: {', '.join(ds.column_names)})")
    docs = []
    for row in ds.select(range(min(len(ds), max_documents))):
        text = row[column]
        if isinstance(text, str) and text.strip():
            docs.append(Document(text, str(row[domain_column]) if domain_column else name))
    return docs


def bundled_documents(which: str = "calibration") -> list[Document]:
    """The fixed texts shipped with moeviz in sample_data/ ("calibration" or "heldout")."""
    path = {"calibration": BUNDLED_CALIBRATION, "heldout": BUNDLED_HELDOUT}[which]
    return documents_from_file(path)


# ---------------------------------------------------------------- tokenise and chunk

def _fingerprint(docs: list[Document], tokenizer, n_samples, seq_len, seed) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.domain.encode() + b"\0" + d.text.encode("utf-8", "replace") + b"\1")
    h.update(f"{getattr(tokenizer, 'name_or_path', '')}|{len(tokenizer)}|{n_samples}|{seq_len}|{seed}".encode())
    return h.hexdigest()[:16]


def check_seq_len(seq_len: int, max_context: int | None) -> int:
    """CalibrationDataError unless 2 <= seq_len <= the model's context (None: unknown, not checked).
    Past its context a model runs on positions it never saw (or fails on its position table)."""
    if seq_len < 2:
        raise CalibrationDataError(f"sequence length must be at least 2 tokens, got {seq_len}")
    if max_context is not None and seq_len > max_context:
        raise CalibrationDataError(
            f"sequence length {seq_len} is above the model's context of {max_context} tokens; "
            f"choose at most {max_context}"
        )
    return seq_len


def tokenize_documents(documents: list[Document], tokenizer, n_samples: int, seq_len: int, seed: int = 0,
                       source: str = "documents", all_windows: bool = False,
                       max_seq_len: int | None = None) -> TokenSamples:
    """Cut `n_samples` windows of `seq_len` tokens (all windows if `all_windows`), seeded and
    balanced across domains. max_seq_len: the model's context (`LoadedModel.max_context`)."""
    check_seq_len(seq_len, max_seq_len)
    if n_samples < 1 and not all_windows:
        raise CalibrationDataError(f"number of samples must be at least 1, got {n_samples}")
    documents = [d for d in documents if d.text.strip()]
    if not documents:
        raise CalibrationDataError(f"{source} contains no text: found 0 non-empty documents")

    eos = tokenizer.eos_token_id
    streams: dict[str, list[int]] = {}
    for doc in documents:
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        stream = streams.setdefault(doc.domain, [])
        stream.extend(ids)
        if eos is not None:
            stream.append(eos)

    # Every domain's stream -> non-overlapping windows [n_windows, seq_len].
    windows = {d: [s[i:i + seq_len] for i in range(0, len(s) - seq_len + 1, seq_len)] for d, s in streams.items()}
    total_tokens = sum(len(s) for s in streams.values())
    available = sum(len(w) for w in windows.values())
    wanted = available if all_windows else n_samples
    if available == 0 or available < wanted:
        raise CalibrationDataError(
            f"{source} is too short: found {total_tokens} tokens in {len(documents)} documents, enough for "
            f"{available} samples of {seq_len} tokens, but {wanted} samples × {seq_len} = {wanted * seq_len} "
            "tokens are needed. Lower the number of samples or the sequence length, or add text."
        )

    rng = random.Random(seed)
    domain_names = sorted(windows)
    for d in domain_names:
        rng.shuffle(windows[d])
    chosen: list[tuple[str, list[int]]] = []
    while len(chosen) < wanted:  # round-robin over domains so each is represented
        for d in domain_names:
            if windows[d] and len(chosen) < wanted:
                chosen.append((d, windows[d].pop()))
    if all_windows:  # deterministic order, independent of the seed
        chosen.sort(key=lambda x: x[0])
    input_ids = torch.tensor([w for _, w in chosen], dtype=torch.long)
    used = sorted({d for d, _ in chosen})
    return TokenSamples(
        input_ids=input_ids,
        domains=[d for d, _ in chosen],
        source=source,
        seed=seed,
        fingerprint=_fingerprint(documents, tokenizer, wanted, seq_len, seed),
        domain_names=used,
    )


def load_calibration_data(tokenizer, source: str | Path | list[Document] | None = None, n_samples: int = 64,
                          seq_len: int = 128, seed: int = 0, text_key: str = "text",
                          max_seq_len: int | None = None) -> TokenSamples:
    """Calibration samples from the bundled text (source None or "bundled"), a .txt / .jsonl file,
    or a list of Documents (uploaded text, a dataset loaded with `documents_from_hf_dataset`)."""
    if source is None or source == "bundled":
        docs, name = bundled_documents("calibration"), "bundled calibration text"
    elif isinstance(source, list):
        docs, name = source, "given documents"
    else:
        docs, name = documents_from_file(source, text_key=text_key), str(source)
    return tokenize_documents(docs, tokenizer, n_samples, seq_len, seed, source=name, max_seq_len=max_seq_len)
