"""The app's default flow on the demo model, timed through Streamlit's AppTest (same script, no
browser): from a changed sparsity value to an updated result (apply + evaluate + store + rerender;
target ≤ 2 s), and the cold start of `streamlit run app.py` until the server answers its health check
and the first page has run (AppTest cold run of app.py, model load included)."""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _button(at, label):
    return next(b for b in at.button if b.label == label)


def _server_cold_start() -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.port", str(port),
                             "--server.headless", "true"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                if urllib.request.urlopen(f"http://localhost:{port}/_stcore/health", timeout=1).read() == b"ok":
                    return time.perf_counter() - t0
            except OSError:
                time.sleep(0.1)
            if time.perf_counter() - t0 > 120:
                return float("nan")
    finally:
        proc.terminate()
        proc.wait(20)


def run() -> dict:
    os.environ.setdefault("MOEVIZ_DATA_DIR", tempfile.mkdtemp())
    from streamlit.testing.v1 import AppTest

    server_s = _server_cold_start()
    t0 = time.perf_counter()
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300).run()
    first_page_s = time.perf_counter() - t0
    _button(at, "Run calibration").click().run()
    at.switch_page("pages/4_compress.py").run()
    _button(at, "Evaluate").click().run()  # first evaluation also builds the base reference (once)
    times = []
    for sparsity in (0.3, 0.4, 0.6, 0.7):
        t0 = time.perf_counter()
        at.slider[0].set_value(sparsity)
        _button(at, "Apply settings").click().run()
        _button(at, "Evaluate").click().run()
        times.append(time.perf_counter() - t0)
        assert at.session_state["last_result"]["plan"]["pruning"]["sparsity"] == sparsity
    return dict(model="demo-moe", server_health_after_s=server_s, first_page_run_s=first_page_s,
                new_sparsity_to_updated_result_s=statistics.median(times), target_s=2.0,
                note="AppTest runs the page scripts without a browser; browser rendering time is not included")


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
