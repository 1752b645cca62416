"""Exports never delete what a user cannot afford to lose (issue: --overwrite on a parent of the source
model deleted the model and everything beside it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import moeviz
from moeviz.cli import main
from moeviz.compression import CompressionPlan, PruningSettings
from moeviz.compression.apply import Compressor
from moeviz.data import SAMPLE_DATA_DIR
from moeviz.destination import EXPORT_MARKER, check_destination
from moeviz.errors import MoevizError
from moeviz.export import export_model
from moeviz.models import load_model
from moeviz.store import data_dir

CHECKOUT = Path(moeviz.__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its bytes, to prove nothing was touched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def user_folder(tiny_model_dirs, tmp_path):
    """A user's project folder: their model plus a notes file beside it."""
    parent = tmp_path / "project"
    shutil.copytree(tiny_model_dirs["mixtral"], parent / "my-moe")
    (parent / "notes.txt").write_text("two weeks of results")
    return parent


def test_overwrite_into_the_parent_of_the_source_model_is_refused_and_nothing_is_lost(user_folder):
    lm = load_model(user_folder / "my-moe")
    cm = Compressor(lm, None).apply(CompressionPlan(pruning=PruningSettings(metric="magnitude", sparsity=0.5)))
    before = snapshot(user_folder)
    for out in (user_folder, user_folder.parent):
        with pytest.raises(MoevizError, match="contains the source model's folder"):
            export_model(lm, cm, out, overwrite=True)
    assert snapshot(user_folder) == before


def test_cli_overwrite_of_a_parent_folder_exits_2_before_loading(user_folder, tmp_path, capsys, monkeypatch):
    import moeviz.models

    def must_not_load(*a, **k):
        raise AssertionError("the destination must be refused before the model loads")

    monkeypatch.setattr(moeviz.models, "load_model", must_not_load)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"pruning": {"metric": "magnitude", "sparsity": 0.5}}))
    before = snapshot(user_folder)
    code = main(["export", "--model", str(user_folder / "my-moe"), "--plan", str(plan), "--out", str(user_folder),
                 "--overwrite"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "contains the source model's folder" in err
    assert snapshot(user_folder) == before


@pytest.mark.parametrize("out, what", [
    (lambda src: src, "is the source model's folder"),
    (lambda src: src / "sub", "into the source model's folder"),
    (lambda src: SAMPLE_DATA_DIR, "is moeviz's bundled sample data"),
    (lambda src: SAMPLE_DATA_DIR / "demo-moe", "is the source model's folder"),  # the demo is the source
    (lambda src: CHECKOUT.parent, "contains"),
    (lambda src: Path(moeviz.__file__).parent, "is the installed moeviz package"),
    (lambda src: Path.home(), "is your home directory"),
    (lambda src: Path.home().parent, "contains your home directory"),
    (lambda src: data_dir(), "moeviz's data folder"),
    (lambda src: Path("/"), "filesystem root"),
])
def test_protected_destinations_are_refused_even_with_overwrite(out, what, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # a home of the test's own
    (tmp_path / "home").mkdir()
    source = SAMPLE_DATA_DIR / "demo-moe"
    with pytest.raises(MoevizError, match=what.replace("(", r"\(")):
        check_destination(str(source), out(source), overwrite=True)


def test_the_checkout_is_protected_when_running_from_one():
    assert (CHECKOUT / "pyproject.toml").exists()
    with pytest.raises(MoevizError, match="moeviz project checkout"):
        check_destination(None, CHECKOUT, overwrite=True)


def test_only_a_folder_moeviz_wrote_is_replaced(tmp_path):
    source = str(SAMPLE_DATA_DIR / "demo-moe")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("draft")
    with pytest.raises(MoevizError, match="already exists"):
        check_destination(source, theirs, overwrite=False)
    with pytest.raises(MoevizError, match="not written by a moeviz export"):
        check_destination(source, theirs, overwrite=True)
    assert (theirs / "thesis.tex").read_text() == "draft"

    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / EXPORT_MARKER).write_text("{}")
    assert check_destination(source, ours, overwrite=True) == ours.resolve()
    (tmp_path / "empty").mkdir()
    assert check_destination(source, tmp_path / "empty", overwrite=False) == (tmp_path / "empty").resolve()
    assert check_destination(source, tmp_path / "new" / "deeper", overwrite=False) == (tmp_path / "new/deeper").resolve()
    (tmp_path / "file").write_text("x")
    with pytest.raises(MoevizError, match="is a file"):
        check_destination(source, tmp_path / "file", overwrite=True)


def test_a_symlink_to_the_source_is_refused(tmp_path):
    link = tmp_path / "link"
    link.symlink_to(SAMPLE_DATA_DIR / "demo-moe")
    with pytest.raises(MoevizError, match="symbolic link"):
        check_destination(str(SAMPLE_DATA_DIR / "demo-moe"), link, overwrite=True)
    # A path through a linked parent resolves to the real folder, which is then checked.
    (tmp_path / "linkdir").symlink_to(SAMPLE_DATA_DIR)
    with pytest.raises(MoevizError, match="is the source model's folder"):
        check_destination(str(SAMPLE_DATA_DIR / "demo-moe"), tmp_path / "linkdir" / "demo-moe", overwrite=True)


def test_re_export_replaces_a_previous_export_atomically(loaded_tiny, tmp_path):
    lm = loaded_tiny("mixtral")
    out = tmp_path / "exported"
    export_model(lm, Compressor(lm, None).apply(CompressionPlan(pruning=PruningSettings(metric="magnitude", sparsity=0.3))), out)
    plan = CompressionPlan(pruning=PruningSettings(metric="magnitude", sparsity=0.6))
    export_model(lm, Compressor(lm, None).apply(plan), out, overwrite=True)
    assert CompressionPlan.from_json((out / EXPORT_MARKER).read_text()) == plan
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]  # no temporary or old folder left


def test_export_page_refuses_a_parent_of_the_source(user_folder):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(CHECKOUT / "app.py"), default_timeout=180)
    at.session_state["model_source"] = str(user_folder / "my-moe")
    at.run()
    at.switch_page("pages/6_export.py").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    before = snapshot(user_folder)
    next(t for t in at.text_input if t.label == "Output folder").set_value(str(user_folder))
    next(c for c in at.checkbox if c.label.startswith("Replace")).check()
    next(b for b in at.button if b.label == "Export model").click().run()
    assert not at.exception
    assert any("contains the source model's folder" in e.value for e in at.error), [e.value for e in at.error]
    assert snapshot(user_folder) == before


def test_the_apps_default_folder_is_absolute_and_outside_the_checkout_and_refusals_name_the_callers_switch(tmp_path):
    from types import SimpleNamespace

    from moeviz.destination import check_destination
    from moeviz.export import default_export_folder
    from moeviz.models.loading import DEMO_MODEL_DIR

    lm = SimpleNamespace(info=SimpleNamespace(source=str(DEMO_MODEL_DIR), architecture="MixtralForCausalLM"))
    folder = default_export_folder(lm)
    assert folder.is_absolute() and folder.name == "demo-moe-compressed"
    assert Path(__file__).resolve().parents[1] not in folder.parents  # not inside the checkout
    check_destination(lm, folder, False)  # an allowed destination
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("1")
    with pytest.raises(MoevizError, match='tick "Replace"$'):
        check_destination(lm, tmp_path / "x", False, 'tick "Replace"')
