"""moeviz.runtime_config: the process-wide settings are applied by entry points only, switchable, restored."""

import os

import pytest
import transformers.modeling_utils as modeling_utils

from moeviz import runtime_config
from moeviz.runtime_config import RuntimeConfig


@pytest.fixture
def restore_runtime():
    """Whatever a test configures, the suite's configuration (tests/conftest.py) comes back after it."""
    before = runtime_config.current()
    yield
    runtime_config.configure(before)


def test_plain_reads_switch_on_and_off_and_restore_the_process(restore_runtime, monkeypatch):
    runtime_config.configure(RuntimeConfig(plain_reads=False, fixed_mmap_threshold=False))
    monkeypatch.setenv("HF_DEACTIVATE_ASYNC_LOAD", "keep-me")  # a user's own value, set before configuring
    original = modeling_utils.safe_open
    assert not runtime_config.plain_reads_installed() and os.environ["HF_DEACTIVATE_ASYNC_LOAD"] == "keep-me"
    runtime_config.configure(RuntimeConfig(plain_reads=True, fixed_mmap_threshold=False))
    assert modeling_utils.safe_open is not original and os.environ["HF_DEACTIVATE_ASYNC_LOAD"] == "1"
    wrapped = modeling_utils.safe_open
    runtime_config.configure(RuntimeConfig(plain_reads=True, fixed_mmap_threshold=False))  # idempotent
    assert modeling_utils.safe_open is wrapped
    runtime_config.configure(RuntimeConfig(plain_reads=False, fixed_mmap_threshold=False))
    assert modeling_utils.safe_open is original and os.environ["HF_DEACTIVATE_ASYNC_LOAD"] == "keep-me"


def test_load_model_changes_nothing_in_the_process(restore_runtime, tiny_model_dirs):
    """A library call leaves the loader and the environment as it found them; the reads it makes are
    transformers' own unless the configuration installed plain (pread) reads."""
    from moeviz.models import load_model

    runtime_config.configure(RuntimeConfig(plain_reads=False, fixed_mmap_threshold=False))
    original, env = modeling_utils.safe_open, dict(os.environ)
    seen = []

    def spy(*a, **kw):  # transformers' reader, as the loader calls it
        seen.append(kw.get("backend"))
        return original(*a, **kw)

    modeling_utils.safe_open = spy
    try:
        load_model(tiny_model_dirs["mixtral"])
        assert seen and "pread" not in seen and modeling_utils.safe_open is spy and dict(os.environ) == env
        seen.clear()
        runtime_config.configure(RuntimeConfig(plain_reads=True, fixed_mmap_threshold=False))  # wraps the spy
        load_model(tiny_model_dirs["mixtral"])
        assert seen and set(seen) == {"pread"}
        runtime_config.configure(RuntimeConfig(plain_reads=False, fixed_mmap_threshold=False))
        assert modeling_utils.safe_open is spy
    finally:
        modeling_utils.safe_open = original


def test_environment_switches_map_onto_the_configuration():
    assert RuntimeConfig.from_env({}) == RuntimeConfig()
    assert RuntimeConfig.from_env({"MOEVIZ_NO_NUMBA": "1", "MOEVIZ_PRUNE_THREADS": "3"}) == \
        RuntimeConfig(fused_kernels=False, prune_threads=3)
    assert runtime_config.LIBRARY_DEFAULT.fused_kernels and not runtime_config.LIBRARY_DEFAULT.plain_reads


def test_using_restores_the_previous_configuration(restore_runtime):
    before = runtime_config.current()
    with runtime_config.using(fused_kernels=False, prune_threads=2) as now:
        assert runtime_config.current() == now and not now.fused_kernels and now.prune_threads == 2
    assert runtime_config.current() == before


def test_the_cli_entry_point_configures_the_process(restore_runtime, monkeypatch, tiny_model_dirs, capsys):
    from moeviz import cli

    applied = []
    monkeypatch.setattr(runtime_config, "configure", lambda config=None: applied.append(config))
    assert cli.main(["info", "--model", str(tiny_model_dirs["mixtral"])]) == 0
    assert applied == [None]  # RuntimeConfig.from_env(): the environment switches apply


def test_the_app_entry_point_configures_the_process():
    """app.py (run by Streamlit) applies it at module level, before any page runs."""
    import ast
    from pathlib import Path

    tree = ast.parse((Path(__file__).resolve().parents[1] / "app.py").read_text())
    calls = [n for n in tree.body if isinstance(n, ast.Expr) and isinstance(n.value, ast.Call)]
    assert any(ast.unparse(c.value.func) == "runtime_config.configure" for c in calls)
