"""The embedded demo MoE: its training command cannot rot, and the shipped files match the card."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"
MODEL_DIR = SAMPLE / "demo-moe"


def test_tiny_training_runs_end_to_end(tmp_path):
    from transformers import AutoTokenizer, MixtralForCausalLM

    from moeviz.demo.__main__ import main

    out = tmp_path / "demo-moe"
    assert main(["train", "--tiny", "--out", str(out), "--seed", "1"]) == 0
    model = MixtralForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token and tok.bos_token and tok.pad_token
    ids = tok("def f(x):\n    return x + 1", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    # The fixed eval files were written next to the model folder, disjoint, with domain labels.
    cal = [json.loads(l) for l in (tmp_path / "calibration.jsonl").read_text().splitlines()]
    held = [json.loads(l) for l in (tmp_path / "heldout.jsonl").read_text().splitlines()]
    assert {r["domain"] for r in held} == {"prose", "code", "tabular"}
    assert not {r["text"] for r in cal} & {r["text"] for r in held}
    assert json.loads((out / "moeviz_card.json").read_text())["heldout_perplexity"] > 0


def test_shipped_model_matches_card():
    from transformers import AutoModelForCausalLM

    from moeviz.demo.evaluate import heldout_windows, load_demo, score, slice_windows

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR)
    cfg = model.config
    assert cfg.model_type == "mixtral"
    assert cfg.num_local_experts == 8 and cfg.num_experts_per_tok == 2
    assert cfg.num_hidden_layers >= 4
    del model

    card = json.loads((MODEL_DIR / "moeviz_card.json").read_text())
    model, tok = load_demo(MODEL_DIR)
    windows = heldout_windows(tok, SAMPLE / "heldout.jsonl", card["eval"]["seq_len"])
    # Full held-out set is as large as the card says (>= ~16k tokens, all three domains).
    assert {d: len(w) for d, w in windows.items()} == card["eval"]["n_windows"]
    assert card["eval"]["n_tokens"] >= 16_000
    res = score(model, slice_windows(windows, card["slice"]["windows_per_domain"]))
    assert res["overall"]["perplexity"] == pytest.approx(card["slice"]["perplexity"], rel=0.01)


def test_shipped_files_within_size_limits():
    model_bytes = sum(p.stat().st_size for p in MODEL_DIR.rglob("*") if p.is_file())
    assert model_bytes <= 20 * 1024**2
    for name in ("config.json", "model.safetensors", "tokenizer.json", "moeviz_card.json"):
        assert (MODEL_DIR / name).is_file(), name
    for name in ("calibration.jsonl", "heldout.jsonl"):
        path = SAMPLE / name
        assert path.stat().st_size <= 1.5 * 1024**2
        rows = [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines()]
        assert rows and all(set(r) == {"text", "domain"} for r in rows)
        assert {r["domain"] for r in rows} == {"prose", "code", "tabular"}
    assert (SAMPLE / "README.md").is_file()
    cal = {r["text"] for r in map(json.loads, (SAMPLE / "calibration.jsonl").read_text().splitlines())}
    held = {r["text"] for r in map(json.loads, (SAMPLE / "heldout.jsonl").read_text().splitlines())}
    assert not cal & held
