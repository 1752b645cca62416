"""A non-editable `pip install .` gives a working moeviz: demo model, bundled texts and the app are
package data. Also: the app never runs a file watcher for users (an idle server used most of a core)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHECK_INSTALLED = r"""
import sys
from pathlib import Path
import moeviz
from moeviz.resources import APP_FILE, SAMPLE_DATA_DIR
here = Path(moeviz.__file__).resolve()
assert "site-packages" in here.parts, f"imported from the checkout: {here}"
assert APP_FILE.is_file() and SAMPLE_DATA_DIR.is_dir() and here.parent in APP_FILE.parents, APP_FILE
lm = moeviz.load_model()  # the bundled demo model
assert lm.info.num_experts == 8, lm.info
data = moeviz.load_calibration_data(lm.tokenizer, n_samples=2, seq_len=16)  # the bundled text
stats = moeviz.calibrate(lm, data)
assert stats.n_tokens == 32
from streamlit.testing.v1 import AppTest
at = AppTest.from_file(str(APP_FILE), default_timeout=180).run()
assert not at.exception, [e.value for e in at.exception]
assert any("MixtralForCausalLM" in m.value for m in at.markdown), [m.value for m in at.markdown]
assert [m.value for m in at.metric][:1] == ["4"], [m.value for m in at.metric]
print("installed moeviz works")
"""


@pytest.mark.slow
def test_non_editable_install_ships_demo_model_texts_and_app(tmp_path):
    # A copy of the checkout, so the build writes nothing into the real one.
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "test-artifacts", "results",
                                                             "__pycache__", "*.egg-info", "_bundled"))
    # A fresh virtual environment that sees this one's dependencies (torch, transformers, streamlit) through a
    # plain path entry: the editable moeviz of this environment is *not* activated there (its .pth hook is
    # not processed), so `import moeviz` can only find the installed copy.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "_moeviz_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", str(src)], check=True, cwd=tmp_path)
    shutil.rmtree(src)  # nothing may point back at the sources
    # A PYTHONPATH pointing at a checkout (as in a developer's shell) would shadow the installed copy.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([str(py), "-c", CHECK_INSTALLED], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "installed moeviz works" in run.stdout
    info = subprocess.run([str(venv / "bin" / "moeviz"), "info"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert info.returncode == 0 and '"num_experts": 8' in info.stdout, info.stderr[-2000:]


def test_user_facing_app_runs_without_a_file_watcher(monkeypatch):
    config = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    assert config["server"]["fileWatcherType"] == "none"
    assert config["server"]["address"] == "localhost"
    run_target = (REPO / "Makefile").read_text().split("\nrun:")[1].split("\n\n")[0]
    assert "--server.fileWatcherType none" in run_target

    import moeviz.cli

    seen = []
    monkeypatch.setattr(moeviz.cli.subprocess, "call", lambda cmd: seen.append(cmd) or 0)
    assert moeviz.cli.main(["app"]) == 0
    cmd = " ".join(seen[0])
    assert "--server.fileWatcherType none" in cmd and "--server.address localhost" in cmd
    assert "--browser.gatherUsageStats false" in cmd
