"""Bad input gets a clear, actionable message that names what was found."""

import json

import pytest
import torch
import transformers

from moeviz.data import (
    Document, documents_from_file, documents_from_jsonl, documents_from_text, load_calibration_data,
    tokenize_documents,
)
from moeviz.errors import CalibrationDataError, InsufficientMemoryError, ModelSourceError, NotAnMoEModelError
from moeviz.models import load_model
from moeviz.models import loading
from tiny_models import COMMON, tiny_tokenizer


def test_missing_folder(tmp_path):
    with pytest.raises(ModelSourceError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_folder_without_config_lists_what_it_found(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelSourceError, match=r"no config.json \(found: notes.txt\)"):
        load_model(tmp_path)


def test_pickle_only_weights_are_refused(tmp_path, tiny_model_dirs):
    import shutil

    shutil.copy(tiny_model_dirs["mixtral"] / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(ModelSourceError, match="safetensors only"):
        load_model(tmp_path)


def test_offline_hub_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="cannot load hub model 'someone/some-moe'.*--local-dir"):
        load_model("someone/some-moe")


def test_not_a_path_nor_hub_id():
    with pytest.raises(ModelSourceError, match="not a Hugging Face hub id"):
        load_model("definitely not a model")


def test_non_moe_model_is_refused_before_loading_weights(tmp_path):
    config = transformers.LlamaConfig(**{**COMMON, "intermediate_size": 16})
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(NotAnMoEModelError, match=r"^LlamaForCausalLM has no MoE layers: no module holds fused expert tensors") as e:
        load_model(tmp_path)
    assert "\n" not in str(e.value) and len(str(e.value)) < 300


def test_model_too_large_is_refused_with_sizes(tiny_model_dirs, monkeypatch):
    monkeypatch.setattr(loading, "available_bytes", lambda device="cpu": 1000)
    with pytest.raises(InsufficientMemoryError, match=r"needs about .* only 1000 B is available on cpu"):
        load_model(tiny_model_dirs["mixtral"])


def test_memory_estimate_counts_parameters_in_the_requested_dtype(tiny_model_dirs):
    config = transformers.AutoConfig.from_pretrained(tiny_model_dirs["mixtral"])
    n = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(config).parameters())
    assert loading.check_memory(n, config, torch.bfloat16, "cpu", None) == 2 * n
    assert loading.check_memory(n, config, torch.float32, "cpu", None) == 4 * n


def test_unknown_dtype(tiny_model_dirs):
    with pytest.raises(ModelSourceError, match="unsupported dtype 'int3'"):
        load_model(tiny_model_dirs["mixtral"], dtype="int3")


def test_dtype_is_applied(tiny_model_dirs):
    lm = load_model(tiny_model_dirs["olmoe"], dtype="bfloat16")
    assert lm.layers[0].experts.gate_up_proj.dtype == torch.bfloat16 and lm.info.dtype == "bfloat16"
    assert not any(p.requires_grad for p in lm.model.parameters()) and not lm.model.training


# ---------------------------------------------------------------- calibration data

def test_empty_text():
    with pytest.raises(CalibrationDataError, match="contains no text: found 0 non-empty documents"):
        tokenize_documents(documents_from_text("  \n\n  "), tiny_tokenizer(), 4, 16)


def test_too_few_tokens_says_found_and_needed():
    docs = [Document("short text", "prose")]
    with pytest.raises(CalibrationDataError, match=r"found 11 tokens in 1 documents.*8 samples × 16 = 128 tokens"):
        tokenize_documents(docs, tiny_tokenizer(), 8, 16)


def test_chunking_is_seeded_balanced_and_labelled():
    tok = tiny_tokenizer()
    docs = [Document("a" * 400, "prose"), Document("b" * 400, "code"), Document("c" * 40, "tiny")]
    s1 = tokenize_documents(docs, tok, 6, 16, seed=3)
    s2 = tokenize_documents(docs, tok, 6, 16, seed=3)
    assert torch.equal(s1.input_ids, s2.input_ids) and s1.fingerprint == s2.fingerprint
    assert s1.input_ids.shape == (6, 16)
    assert {d: s1.domains.count(d) for d in set(s1.domains)} == {"code": 2, "prose": 2, "tiny": 2}
    a, b = tok("a")["input_ids"][0], tok("b")["input_ids"][0]
    for row, d in zip(s1.input_ids, s1.domains):  # each window comes from its own domain's text
        if d == "prose":
            assert (row[row != tok.eos_token_id] == a).all()
        if d == "code":
            assert (row[row != tok.eos_token_id] == b).all()
    assert tokenize_documents(docs, tok, 6, 16, seed=4).fingerprint != s1.fingerprint


def test_jsonl_errors_name_the_line(tmp_path):
    with pytest.raises(CalibrationDataError, match="line 2 is not valid JSON"):
        documents_from_jsonl(['{"text": "ok"}', "{oops"])
    with pytest.raises(CalibrationDataError, match=r"line 1 has no string field 'text' \(found: body\)"):
        documents_from_jsonl(['{"body": "x"}'])
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "hello", "domain": "greeting"}) + "\n\n")
    assert documents_from_file(p) == [Document("hello", "greeting")]
    with pytest.raises(CalibrationDataError, match="does not exist"):
        documents_from_file(tmp_path / "missing.txt")


def test_txt_file_domain_is_its_stem(tmp_path):
    p = tmp_path / "legal.txt"
    p.write_text("first block\n\nsecond block")
    assert documents_from_file(p) == [Document("first block", "legal"), Document("second block", "legal")]
    s = load_calibration_data(tiny_tokenizer(), p, n_samples=1, seq_len=8)
    assert s.domains == ["legal"]
