"""End to end in a real headless Chromium (Debian's package, driven by Playwright): start
`streamlit run app.py` on a free localhost port, run the default flow, check that plotly charts
render, and save a screenshot of each page under test-artifacts/screenshots/."""

import contextlib
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "test-artifacts" / "screenshots"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = [pytest.mark.browser, pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    port = free_port()
    env = {**os.environ, "MOEVIZ_DATA_DIR": str(tmp_path_factory.mktemp("data"))}
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.port", str(port),
                             "--server.address", "localhost", "--server.headless", "true"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://localhost:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("streamlit did not start within 90 s")
    yield url
    proc.terminate()
    proc.wait(20)


def nav(page, title):
    # Sidebar navigation keeps the browser session (and its calibration); a fresh URL would not.
    page.locator("[data-testid='stSidebarNav']").get_by_text(title, exact=True).click()
    page.wait_for_timeout(500)


def wait_for_charts(page, n, timeout_s=60):
    """Charts appear one by one as the script runs: wait until at least n plotly charts are drawn."""
    page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {n}",
                           timeout=timeout_s * 1000)


def shoot_charts(page, prefix):
    """A 1440x900 screenshot with each pair of charts in view, to check titles, axes and legends."""
    charts = page.locator(".js-plotly-plot")
    for i in range(0, charts.count(), 2):
        charts.nth(i).scroll_into_view_if_needed()
        page.wait_for_timeout(300)
        page.screenshot(path=SHOTS / f"{prefix}_charts{i // 2}.png")


def metric_value(page, label):
    """The value of the st.metric labelled `label`."""
    box = page.locator("[data-testid='stMetric']").filter(has_text=label).first
    return box.locator("[data-testid='stMetricValue']").inner_text()


ERROR_BARS = """() => [...document.querySelectorAll('.js-plotly-plot')].some(div => (div.data || []).some(t =>
    t.yaxis === 'y2' && t.error_y && (t.error_y.array || []).length > 0))"""


# Run ids (customdata[0]) of one trace of the n-th plotly chart, in point order.
RUN_IDS = """({chart, trace}) => ((document.querySelectorAll('.js-plotly-plot')[chart].data[trace] || {}).customdata || [])
    .map(c => (c && typeof c[0] === 'number') ? c[0] : null)"""
N_TRACES = "(chart) => document.querySelectorAll('.js-plotly-plot')[chart].data.length"
# Viewport centre of point i of trace t (found through the d3 datum of each drawn trace group, so traces on a second
# y axis, drawn in another layer, are still found by their index).
POINT_XY = """({chart, trace, i}) => {
    const gd = document.querySelectorAll('.js-plotly-plot')[chart];
    const g = [...gd.querySelectorAll('g.trace.scatter')].find(el => el.__data__ && el.__data__[0] && el.__data__[0].trace.index === trace);
    const r = g.querySelectorAll('path.point')[i].getBoundingClientRect();
    return [r.x + r.width / 2, r.y + r.height / 2];
}"""

# Every drawn marker of the n-th chart as [trace index, point index, x, y (viewport centre), run id or null].
POINTS = """(chart) => {
    const gd = document.querySelectorAll('.js-plotly-plot')[chart];
    const pts = [];
    for (const g of gd.querySelectorAll('g.trace.scatter')) {
        if (!(g.__data__ && g.__data__[0])) continue;
        const t = g.__data__[0].trace;
        g.querySelectorAll('path.point').forEach((p, i) => {
            const r = p.getBoundingClientRect();
            const c = (t.customdata || [])[i];
            pts.push([t.index, i, r.x + r.width / 2, r.y + r.height / 2, (c && typeof c[0] === 'number') ? c[0] : null]);
        });
    }
    return pts;
}"""


def click_point(page, chart: int, trace: int, i: int, away_from: tuple[float, float] | None = None) -> None:
    """Hover then click point i of trace `trace` of the `chart`-th plotly chart, as a person does (plotly picks
    the point under the cursor). away_from: a neighbouring marker's centre; the click then lands on the far
    side of the point's marker (4 px off its centre), where this point is the nearest one."""
    page.locator(".js-plotly-plot").nth(chart).scroll_into_view_if_needed()
    page.wait_for_timeout(300)
    x, y = page.evaluate(POINT_XY, {"chart": chart, "trace": trace, "i": i})
    if away_from is not None:
        dx, dy = x - away_from[0], y - away_from[1]
        d = math.hypot(dx, dy)
        if d > 0:
            x, y = x + 4 * dx / d, y + 4 * dy / d
    page.mouse.move(x, y)
    page.wait_for_timeout(300)
    page.mouse.click(x, y)


def check_right_axis_ticks_are_round(page):
    """The right-hand axis of the first chart: ticks evenly spaced by 1, 2 or 5 × 10^k (not 1.594, 1.437, …)."""
    labels = page.locator(".js-plotly-plot").first.locator("g.y2tick text").all_text_contents()
    values = [float(v.replace("−", "-").replace(",", "")) for v in labels if v and v.strip()]
    assert len(values) >= 2, labels
    steps = {round(b - a, 9) for a, b in zip(values, values[1:])}
    assert len(steps) == 1, labels
    step = steps.pop()
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert any(abs(mantissa - m) < 1e-6 for m in (1, 2, 2.5, 5)), labels


def test_default_flow_in_chromium(app_url):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1440, "height": 900})  # the width the app must read well at
        page.goto(app_url)
        page.get_by_text("MixtralForCausalLM").wait_for(timeout=60_000)
        page.get_by_role("button", name="Run calibration").click()
        page.get_by_text("for the bundled text").wait_for(timeout=120_000)
        page.screenshot(path=SHOTS / "1_model_and_calibration.png", full_page=True)

        nav(page, "Routing")
        page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
        wait_for_charts(page, 3)
        page.screenshot(path=SHOTS / "2_routing.png", full_page=True)
        wait_for_charts(page, 5)
        shoot_charts(page, "2_routing")

        nav(page, "Architecture")
        # The diagram itself (its key of numbered pruning targets), not just any svg on the page.
        page.locator("[data-testid='stGraphVizChart'] svg text").filter(has_text="pruning targets").first.wait_for(
            timeout=60_000)
        page.wait_for_timeout(300)
        page.screenshot(path=SHOTS / "3_architecture.png", full_page=True)

        nav(page, "Compress")
        page.get_by_text("Compression ratio (plan)").wait_for(timeout=60_000)
        page.get_by_text("Quality proxy (live)").wait_for(timeout=60_000)  # live, before any evaluation
        wait_for_charts(page, 1)
        page.screenshot(path=SHOTS / "4_compress.png")
        ratio = metric_value(page, "Compression ratio (plan)")
        page.get_by_role("button", name="Evaluate", exact=True).click()
        page.get_by_text("Stored as run").wait_for(timeout=180_000)
        wait_for_charts(page, 2)
        page.get_by_text("Result (compressed vs base)").scroll_into_view_if_needed()
        page.screenshot(path=SHOTS / "4a_compress_result.png")
        page.get_by_text("Per-expert settings").scroll_into_view_if_needed()
        page.screenshot(path=SHOTS / "4c_expert_table.png")

        # A refresh keeps model, calibration (from the on-disk cache), plan and page: all in the URL.
        url = page.url
        assert "/compress" in url and "calib=" in url and "plan=" in url, url
        page.reload()
        page.get_by_text("Compression ratio (plan)").wait_for(timeout=120_000)  # calibrated: the page is not blocked
        assert page.url == url and metric_value(page, "Compression ratio (plan)") == ratio
        page.get_by_role("button", name="Evaluate", exact=True).click()  # the same plan: its stored run is reused at once
        page.get_by_text("no duplicate stored").wait_for(timeout=60_000)
        wait_for_charts(page, 2)
        shoot_charts(page, "4_compress")
        # Already timed back to back by the evaluation (5 repeats); measured again with 9.
        page.get_by_text("Decode, compressed (back to back)").wait_for(timeout=60_000)
        page.get_by_role("button", name="Measure base and compressed back to back").click()
        page.get_by_text("medians of 9 interleaved repeats").wait_for(timeout=120_000)
        wait_for_charts(page, 3)
        page.get_by_text("Decode, compressed (back to back)").scroll_into_view_if_needed()
        page.screenshot(path=SHOTS / "4d_latency_back_to_back.png")
        page.get_by_role("button", name="Recover").click()  # default settings: 50 steps on the demo model
        page.get_by_text("Perplexity gap recovered").wait_for(timeout=300_000)
        wait_for_charts(page, 3)
        page.get_by_text("Recover by distillation").scroll_into_view_if_needed()  # the app scrolls inside its own container
        page.screenshot(path=SHOTS / "4b_recovery.png")

        nav(page, "Trade-offs")
        page.get_by_role("heading", name="Pareto front").wait_for(timeout=60_000)  # this page's own content, not the previous page's charts
        wait_for_charts(page, 4)
        page.get_by_role("heading", name="Trade-offs").scroll_into_view_if_needed()
        page.wait_for_timeout(500)
        # The recovery run is drawn as an arrow from its parent (plotly annotation arrows).
        page.wait_for_function("document.querySelectorAll('.annotation-arrow-g').length >= 1", timeout=60_000)
        page.screenshot(path=SHOTS / "5_tradeoffs.png")
        shoot_charts(page, "5_tradeoffs")
        check_right_axis_ticks_are_round(page)
        # Measured latency: every evaluation timed base and compressed back to back, drawn with IQR bars.
        page.get_by_text("measured, back to back with the base").click()
        page.wait_for_function(ERROR_BARS, timeout=60_000)
        page.get_by_text("timed back to back with the base").first.wait_for(timeout=60_000)
        page.locator(".js-plotly-plot").first.scroll_into_view_if_needed()
        page.wait_for_timeout(500)
        page.screenshot(path=SHOTS / "5d_measured_latency.png")
        check_right_axis_ticks_are_round(page)
        # Clicking a point of the accuracy / latency chart (the 1st chart) selects its run: one that is not on the
        # Pareto front (the pruned run, dominated by its recovery), so the Pareto click below must change the selection.
        # Of those points, the one farthest from any other drawn point (markers of one ratio stack up; a click
        # there may land on a neighbour or the recovery arrow).
        front = page.evaluate(RUN_IDS, {"chart": 3, "trace": 1})  # trace 1 of the Pareto chart: the front
        page.locator(".js-plotly-plot").first.scroll_into_view_if_needed()
        page.wait_for_timeout(300)
        points = page.evaluate(POINTS, 0)  # [[trace, i, x, y, run id]]

        def nearest_other(p):  # the closest marker of another run (markers of one ratio stack up on two axes)
            others = [q for q in points if q[4] != p[4]]
            return min(others, key=lambda q: math.hypot(q[2] - p[2], q[3] - p[3]), default=None)

        candidates = sorted((p for p in points if p[4] is not None and p[4] not in front),
                            key=lambda p: -math.hypot(p[2] - nearest_other(p)[2], p[3] - nearest_other(p)[3]))
        # The clearest point first, clicked on its side away from the other run's marker; if the click still lands
        # elsewhere, the next one. At least one click must select its run.
        selected = None
        for p in candidates:
            wait_idle(page)  # a click while the script reruns can be dropped with the old chart
            other = nearest_other(p)
            click_point(page, 0, p[0], p[1], away_from=(other[2], other[3]))
            picked = (p[0], p[1], p[4])
            try:
                page.get_by_role("heading", name=f"Selected run #{picked[2]}:").wait_for(timeout=20_000)
            except PlaywrightTimeout:
                continue
            selected = picked
            break
        assert selected is not None, "no click on the accuracy / latency chart selected its run"
        assert f"run={selected[2]}" in page.url
        # Clicking a point of the Pareto chart (the 4th chart) selects its run and can load its plan.
        click_point(page, 3, 1, 0)
        page.get_by_role("heading", name=f"Selected run #{front[0]}:").wait_for(timeout=60_000)
        page.wait_for_timeout(500)
        assert "run=" in page.url
        page.get_by_text("Selected run #").scroll_into_view_if_needed()
        page.screenshot(path=SHOTS / "5b_selected_run.png")
        page.get_by_role("button", name="Load this plan into Compress").click()
        page.get_by_role("heading", name="Compress").first.wait_for(timeout=60_000)
        page.get_by_text("Compression ratio (plan)").wait_for(timeout=60_000)

        nav(page, "Export")
        # exact: "Load a plan (JSON)" on the Compress page contains the text too (the shot was of Compress)
        page.get_by_text("Plan (JSON)", exact=True).wait_for(timeout=60_000)
        page.get_by_text("the exact call that loads it").wait_for(timeout=60_000)  # the Export page's own caption
        page.screenshot(path=SHOTS / "6_export.png", full_page=True)

        # A per-expert override: the table tints that row's read-only cells and names the cell set by hand.
        nav(page, "Compress")
        page.get_by_text("Edit one expert by number").click()
        form = page.locator("[data-testid='stForm']").filter(has=page.get_by_role("button", name="Set expert"))
        before = metric_value(page, "Quality proxy (live)")
        form.get_by_role("textbox", name="Sparsity").fill("80 %")
        form.get_by_role("button", name="Set expert").click()
        page.wait_for_function(f"""() => [...document.querySelectorAll("[data-testid='stMetric']")].some(m =>
            m.innerText.includes('Quality proxy (live)') && !m.innerText.includes('{before}'))""", timeout=60_000)
        page.get_by_text("Per-expert settings").scroll_into_view_if_needed()
        page.wait_for_timeout(500)
        page.screenshot(path=SHOTS / "4e_override_highlighted.png")
        browser.close()


@contextlib.contextmanager
def calibrated_page(app_url):
    """A fresh browser session at 1440x900 on the app, calibrated on the bundled text."""
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        page.goto(app_url)
        page.get_by_role("button", name="Run calibration").click()
        page.get_by_text("for the bundled text").wait_for(timeout=120_000)
        yield page
        browser.close()


def test_stop_sweep_keeps_the_finished_runs(app_url):
    """The in-page Stop button ends a running sweep; the plans it finished are stored and shown."""
    with calibrated_page(app_url) as page:
        nav(page, "Trade-offs")
        page.get_by_role("button", name="Run sweep").click()
        page.get_by_text("Sweep: 1/6 plans").wait_for(timeout=120_000)  # one plan finished, with an ETA
        assert "left" in page.get_by_text("Sweep: 1/6 plans").inner_text()
        page.screenshot(path=SHOTS / "5c_sweep_running.png")
        page.get_by_role("button", name="Stop sweep").click()
        page.get_by_text("Sweep stopped").wait_for(timeout=60_000)
        page.get_by_role("heading", name="All runs").wait_for(timeout=60_000)
        assert page.get_by_text("plans evaluated and stored").count() == 0  # it did not run to the end
        # The finished plan(s) are stored: the sweep filter lists this sweep.
        page.get_by_text("Sweep", exact=True).scroll_into_view_if_needed()
        page.locator("[data-testid='stMultiSelect']").filter(has_text="Sweep").click()
        page.get_by_role("option").first.wait_for(timeout=30_000)


OPTIMISED_LINE = """() => [...document.querySelectorAll('.js-plotly-plot')].some(div => (div.data || []).some(t =>
    (t.mode || '').includes('lines') && (t.customdata || []).length >= 3 &&
    (t.customdata || []).every(c => String(c[1]).startsWith('optimised @'))))"""


def test_sensitivity_heatmap_and_the_optimised_curve(app_url):
    """Sensitivity page: measure, see the heatmap, evaluate optimised plans at three budgets; Trade-offs then
    draws them as one curve of their own (a line through exactly the optimised runs)."""
    with calibrated_page(app_url) as page:
        nav(page, "Sensitivity")
        windows = page.get_by_label("Calibration windows measured", exact=True).and_(page.get_by_test_id("stNumberInputField"))
        windows.fill("4")  # a quick measurement: 4 windows of the calibration text
        windows.press("Enter")  # a rerun (the measurement is a button, not a form's submission)
        wait_idle(page)
        page.get_by_role("button", name="Measure sensitivity").click()
        page.get_by_role("heading", name="Sensitivity heatmap").wait_for(timeout=300_000)
        wait_for_charts(page, 1)
        page.get_by_role("heading", name="Sensitivity heatmap").scroll_into_view_if_needed()
        page.screenshot(path=SHOTS / "7_sensitivity.png")
        page.get_by_role("button", name="Evaluate optimised plans").click()
        page.get_by_text("optimised @ 70%").first.wait_for(state="attached", timeout=300_000)  # a data-grid cell
        nav(page, "Trade-offs")
        page.get_by_role("heading", name="Pareto front").wait_for(timeout=60_000)
        wait_for_charts(page, 4)
        page.wait_for_function(OPTIMISED_LINE, timeout=60_000)
        # Its own legend entry (and colour), not its method's.
        page.wait_for_function("""() => [...document.querySelectorAll('.js-plotly-plot')].some(div =>
            (div.data || []).some(t => (t.name || '').includes('· optimised') && t.showlegend !== false))""", timeout=30_000)
        assert page.locator("g.legend text").filter(has_text="optimised").count() >= 1
        page.locator(".js-plotly-plot").nth(1).scroll_into_view_if_needed()
        page.screenshot(path=SHOTS / "7b_optimised_curve.png")


def choose(page, label, option):
    """Pick `option` in the st.selectbox labelled `label`, as a person does (open the list, click). A click
    that lands while a rerun redraws the box can leave it closed: then click again."""
    box = page.locator("[data-testid='stSelectbox']").filter(has_text=label).first
    for attempt in range(3):
        box.click()
        try:
            page.get_by_role("option", name=option, exact=True).click(timeout=5_000)
            break
        except Exception:
            if attempt == 2:
                raise
            page.keyboard.press("Escape")
    page.wait_for_timeout(300)


def wait_idle(page, timeout_s=120):
    """Until the script run the last click started has finished (Streamlit's status widget gone)."""
    page.wait_for_timeout(300)
    page.wait_for_function("!document.querySelector(\"[data-testid='stStatusWidget']\")", timeout=timeout_s * 1000)


# While a SparseGPT job runs: the per-layer progress text with time left and the Stop button, at the same moment.
JOB_RUNNING = r"""() => {
    const text = document.body.innerText;
    // the page's own Stop button (st.button), not the toolbar's
    const stop = [...document.querySelectorAll("[data-testid='stButton'] button")].some(b => b.innerText.trim() === 'Stop');
    return stop && /SparseGPT[^\n]*layer \d+\/\d+ · about \d+ s left/.test(text);
}"""

SERIES = """() => {
    const traces = [...document.querySelectorAll('.js-plotly-plot')].flatMap(div => div.data || []);
    const color = m => (traces.find(t => (t.name || '').split(' · ')[0] === m && t.showlegend !== false) || {}).marker;
    const a = color('sparsegpt'), b = color('magnitude'), c = color('sparsegpt + gptq');
    return a && b && c && a.color !== b.color && c.color !== a.color && c.color !== b.color;
}"""


def test_sparsegpt_job_progress_stop_result_and_its_own_series(app_url):
    """Compress on the demo model: magnitude 60 %, then SparseGPT 60 % as a job (per-layer progress with time
    left and a Stop button while it runs), a lower perplexity than magnitude's, the settings it ran with;
    then SparseGPT + GPTQ 4-bit; Trade-offs draws "sparsegpt" and "sparsegpt + gptq" as series of their own."""
    with calibrated_page(app_url) as page:
        nav(page, "Compress")
        page.get_by_text("Compression ratio (plan)").wait_for(timeout=60_000)
        choose(page, "Pruning metric", "magnitude")
        wait_idle(page)
        thumb = page.get_by_role("slider").first  # Global sparsity: 50 % → 60 % with the keyboard
        thumb.focus()
        thumb.press("ArrowRight")
        thumb.press("ArrowRight")
        page.locator("[data-testid='stSliderThumbValue']").filter(has_text="60%").first.wait_for(timeout=30_000)
        wait_idle(page)
        assert "GPTQ act-order" not in page.locator("[data-testid='stMain']").inner_text()  # 16 bits: no GPTQ options
        page.get_by_role("button", name="Evaluate", exact=True).click()
        page.get_by_text("Stored as run").wait_for(timeout=120_000)
        wait_idle(page)
        magnitude = float(metric_value(page, "Perplexity"))

        choose(page, "Pruning metric", "sparsegpt")
        wait_idle(page)
        page.get_by_text("Second-order solver settings").wait_for(timeout=30_000)  # shown for SparseGPT only
        page.get_by_text("Second-order solver settings").click()  # open: block size and damping
        page.get_by_text("Damping (percdamp)").wait_for(timeout=30_000)
        hessian = page.locator("[data-testid='stSelectbox']").filter(has_text="Hessian (SparseGPT / GPTQ)").first
        hessian.scroll_into_view_if_needed()
        hessian.locator("[data-testid='stTooltipIcon']").hover()  # its help text, as a person reads it
        page.wait_for_timeout(500)
        page.screenshot(path=SHOTS / "4f_sparsegpt_options.png")
        page.get_by_role("button", name="Evaluate", exact=True).click()
        page.wait_for_function(JOB_RUNNING, timeout=60_000, polling=50)
        page.screenshot(path=SHOTS / "4g_sparsegpt_running.png")  # taken while the job runs (or just after)
        page.get_by_text("s layer by layer at").wait_for(timeout=180_000)
        wait_idle(page)
        sparsegpt = float(metric_value(page, "Perplexity"))
        assert sparsegpt < magnitude, (sparsegpt, magnitude)
        caption = page.get_by_text("s layer by layer at").inner_text()
        assert caption.startswith("SparseGPT:") and "Hessian router-weighted" in caption, caption
        page.get_by_text("Result (compressed vs base)").scroll_into_view_if_needed()
        page.screenshot(path=SHOTS / "4h_sparsegpt_result.png")

        choose(page, "Expert weight bits", "4-bit")
        wait_idle(page)
        choose(page, "Quantization method", "GPTQ (second order)")
        wait_idle(page)
        page.get_by_text("GPTQ act-order").wait_for(timeout=30_000)
        page.get_by_role("button", name="Evaluate", exact=True).click()
        page.get_by_text("SparseGPT + GPTQ:").wait_for(timeout=180_000)
        wait_idle(page)

        nav(page, "Trade-offs")
        page.get_by_role("heading", name="Pareto front").wait_for(timeout=60_000)
        wait_for_charts(page, 4)
        page.wait_for_function(SERIES, timeout=60_000)
        legend = page.locator("g.legend text")
        assert legend.filter(has_text="sparsegpt + gptq").count() >= 1
        page.locator(".js-plotly-plot").first.scroll_into_view_if_needed()
        page.wait_for_timeout(300)
        page.screenshot(path=SHOTS / "5e_sparsegpt_series.png")
        page.get_by_role("heading", name="All runs").scroll_into_view_if_needed()
        page.wait_for_timeout(500)
        page.screenshot(path=SHOTS / "5f_runs_second_order.png")

        nav(page, "Sensitivity")  # it cannot measure SparseGPT / GPTQ: it says so
        page.get_by_text("which this page cannot measure").wait_for(timeout=60_000)
        page.screenshot(path=SHOTS / "7c_sensitivity_second_order_note.png")


def test_issue27_walkthrough_fixes(app_url):
    """Issue 27, in Chromium at 1440x900: a bad folder keeps the working model; out-of-range calibration numbers
    are refused on Run; Routing's layer selector sits above the charts it controls; Architecture draws the model
    as loaded with readable labels; on Sensitivity, Enter in a number field measures nothing, and the measurement
    (with its settings) survives a refresh."""
    with calibrated_page(app_url) as page:
        page.get_by_text("Local folder or hub id", exact=True).click()
        page.get_by_role("textbox", name="Folder or hub id (owner/name)").fill("/no/such/folder")
        page.get_by_role("button", name="Load model").click()
        page.get_by_text("The model loaded before is kept").wait_for(timeout=60_000)
        assert page.get_by_text("MixtralForCausalLM").count() >= 1  # still the demo, still calibrated
        page.screenshot(path=SHOTS / "27_1_failed_load_keeps_model.png", full_page=True)
        samples = page.get_by_label("Samples", exact=True).and_(page.get_by_test_id("stNumberInputField"))
        samples.fill("0")
        samples.press("Tab")
        page.get_by_role("button", name="Run calibration").click()
        page.get_by_text("must be at least 1").wait_for(timeout=60_000)
        assert page.get_by_text("Loaded cached statistics").count() == 0
        page.get_by_text("must be at least 1").scroll_into_view_if_needed()
        page.screenshot(path=SHOTS / "27_2_calibration_refused.png")
        samples.fill("64")
        samples.press("Tab")
        wait_idle(page)

        nav(page, "Routing")
        page.get_by_role("heading", name="One MoE layer").wait_for(timeout=60_000)
        wait_for_charts(page, 5)
        page.get_by_role("heading", name="One MoE layer").scroll_into_view_if_needed()
        page.wait_for_timeout(500)
        page.screenshot(path=SHOTS / "27_3_routing_layer_controls.png")

        nav(page, "Architecture")
        page.locator("[data-testid='stGraphVizChart'] svg text").filter(has_text="pruning targets").first.wait_for(
            timeout=60_000)
        page.wait_for_timeout(300)
        page.screenshot(path=SHOTS / "27_4_architecture_as_loaded.png", full_page=True)
        label = page.locator("[data-testid='stGraphVizChart'] svg text").filter(has_text="unquantized (bfloat16)")
        assert label.count() or page.locator("[data-testid='stGraphVizChart'] svg text").filter(
            has_text="unquantized (float32)").count()
        size = page.evaluate("""() => { const t = [...document.querySelectorAll("[data-testid='stGraphVizChart'] svg text")]
            .find(el => el.textContent.startsWith('e0 ')); return t.getBoundingClientRect().height; }""")
        assert size >= 12, size  # pixels of an expert label as drawn: readable at 1440 px

        nav(page, "Sensitivity")
        windows = page.get_by_label("Calibration windows measured", exact=True).and_(page.get_by_test_id("stNumberInputField"))
        windows.fill("2")
        windows.press("Enter")  # a rerun, not a measurement
        wait_idle(page)
        assert page.get_by_text("Measuring…").count() == 0
        assert page.get_by_role("heading", name="Sensitivity heatmap").count() == 0
        page.screenshot(path=SHOTS / "27_5_sensitivity_enter_measures_nothing.png")
        page.get_by_role("button", name="Measure sensitivity").click()
        page.get_by_role("heading", name="Sensitivity heatmap").wait_for(timeout=300_000)
        wait_for_charts(page, 1)
        page.reload()  # a browser refresh: a new session on the same URL
        page.get_by_role("heading", name="Sensitivity heatmap").wait_for(timeout=120_000)
        wait_for_charts(page, 1)
        assert page.get_by_label("Calibration windows measured", exact=True).and_(
            page.get_by_test_id("stNumberInputField")).input_value() == "2"
        page.get_by_role("heading", name="Sensitivity heatmap").scroll_into_view_if_needed()
        page.wait_for_timeout(500)
        page.screenshot(path=SHOTS / "27_6_sensitivity_after_refresh.png")
