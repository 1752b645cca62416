"""Trade-off figures from a sweep DataFrame (`run_sweep`) or a run-store DataFrame (`RunStore.runs()`).

Both frames are accepted: run ids come from ``run_id`` (sweep) or ``id`` (store); the method from a
``method`` column, else from ``plan_json`` (the plan's pruning metric). Base-model reference values
come from the ``base_<metric>`` columns (e.g. ``base_accuracy``, ``base_projected_decode_ms``); the
base model has compression ratio 1.

Accuracy-like fractions are drawn in % (×100); axis titles carry units. Every function returns a
figure with an explanatory annotation (never raises) for an empty frame or missing columns.

Selection: in `pareto_chart` and `tradeoff_chart`, every point of a run carries ``customdata`` with
``customdata[0]`` = run id (``None`` when the frame has no ids) and ``customdata[1]`` = run name, so
``st.plotly_chart(fig, on_select="rerun")`` selections identify runs. Base-model markers carry no
customdata.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from moeviz.compression.plan import method_name
from moeviz.evaluation.pareto import pareto_mask
from moeviz.figures._common import BASE_COLOR, color_for, empty_figure
from moeviz.registry import RESULT_METRICS

_TEMPLATE = "plotly_white"
# Compression ratios a chart's x axis can count (the base is 1.0 on each)
RATIO_COLUMNS = ("compression_ratio", "compression_ratio_bf16", "export_compression_ratio", "experts_compression_ratio")

# column -> (axis title with unit, display scale), and the columns where lower is better (moeviz.registry)
COLUMNS: dict[str, tuple[str, float]] = {m.name: (m.label, m.scale) for m in RESULT_METRICS}
MINIMIZE = {m.name for m in RESULT_METRICS if not m.higher_is_better}


def _task_column(col: str) -> tuple[str, float] | None:
    """Task accuracy columns (moeviz.evaluation.tasks.task_metrics): task_acc[name], task_acc_norm[name],
    task_average; shown in %."""
    if col == "task_average":
        return "Task accuracy, average over tasks (%)", 100.0
    for prefix, what in (("task_acc_norm[", "acc_norm"), ("task_acc[", "acc")):
        if col.startswith(prefix) and col.endswith("]"):
            return f"Task accuracy, {col[len(prefix):-1]} ({what}, %)", 100.0
    return None


def axis_title(col: str) -> str:
    return (_task_column(col) or COLUMNS.get(col, (col, 1.0)))[0]


def _scale(col: str) -> float:
    return (_task_column(col) or COLUMNS.get(col, (col, 1.0)))[1]


def _fmt(col: str) -> str:
    """hovertemplate number format for a displayed column."""
    return ".2f" if _scale(col) != 1 else ".4g"


def _is_empty(df) -> bool:
    return df is None or not isinstance(df, pd.DataFrame) or len(df) == 0


def _missing(df: pd.DataFrame, cols) -> list[str]:
    return [c for c in cols if c not in df.columns or pd.to_numeric(df[c], errors="coerce").notna().sum() == 0]


def _guard(df, cols, title: str) -> go.Figure | None:
    if _is_empty(df):
        return empty_figure("No runs yet: run a sweep or evaluate a plan to fill this chart.", title)
    miss = _missing(df, cols)
    if miss:
        return empty_figure(f"No values for {', '.join(miss)} in these runs.", title)
    return None


def run_ids(df: pd.DataFrame) -> list:
    """Run id per row: ``run_id`` (sweep frame) or ``id`` (run store), else None."""
    for c in ("run_id", "id"):
        if c in df.columns and df[c].notna().any():
            return [None if pd.isna(v) else int(v) for v in df[c]]
    return [None] * len(df)


def _plan_metric(plan_json) -> str:
    try:
        return method_name(json.loads(plan_json))
    except Exception:  # noqa: BLE001 - any malformed plan just falls back
        return "runs"


def methods(df: pd.DataFrame, method_col: str | None = None) -> list[str]:
    """Method (colour group) per row: `method_col`, ``method``, the plan's pruning metric, or "runs";
    recovery runs (a ``parent_run_id``) form their own group, "<method> + KD recovery", so they are
    not joined into their parent method's line."""
    if method_col is not None:
        ms = [str(v) for v in df[method_col]]
    elif "method" in df.columns:
        ms = [str(v) if not pd.isna(v) else "runs" for v in df["method"]]
    elif "plan_json" in df.columns:
        ms = [_plan_metric(v) for v in df["plan_json"]]
    else:
        ms = ["runs"] * len(df)
    if "parent_run_id" in df.columns:
        ms = [m if pd.isna(p) else f"{m} + KD recovery" for m, p in zip(ms, df["parent_run_id"])]
    return ms


def series_keys(df: pd.DataFrame, ms: list[str] | None = None) -> list[str]:
    """Which runs form one line: runs whose plans differ in the swept value (pruning sparsity) alone, i.e.
    same method, structure, bits, allocation, overrides, removal, router and activation settings; or, within
    one sweep over budgets (per-expert overrides / removal chosen by the optimiser), in that budget alone. With no
    ``plan_json`` column the method is the series (a sweep frame built by hand). A recovery run (a
    ``parent_run_id``) is always a series of its own: a point, linked to its parent by an arrow."""
    ms = ms if ms is not None else methods(df)
    if "plan_json" not in df.columns:
        return list(ms)
    parents = df["parent_run_id"] if "parent_run_id" in df.columns else [None] * len(df)
    sweeps = df["sweep_id"] if "sweep_id" in df.columns else [None] * len(df)
    keys = []
    for i, (m, raw, parent, sweep) in enumerate(zip(ms, df["plan_json"], parents, sweeps)):
        if parent is not None and not pd.isna(parent):
            keys.append(f"{m}|recovery|{i}")
            continue
        try:
            plan = json.loads(raw) if isinstance(raw, str) else dict(raw)
            plan.pop("name", None)
            plan.get("pruning", {}).pop("sparsity", None)
            if isinstance(sweep, str) and (plan.get("overrides") or plan.get("removed_experts")):
                # A sweep over budgets (the sensitivity optimiser): its swept value is the budget, and the
                # per-expert choices are what each budget produced, so those plans form one curve.
                plan.pop("overrides", None)
                plan.pop("removed_experts", None)
                plan["sweep"] = sweep
            keys.append(f"{m}|{json.dumps(plan, sort_keys=True)}")
        except Exception:  # noqa: BLE001 - a run without a readable plan is a point of its own
            keys.append(f"{m}|unreadable|{i}")
    return keys


OPTIMISED = "optimised"


def _series(df, ms) -> list[tuple[str, list[int]]]:
    """(label, row indices) per series, in order of first appearance. The label is the method, or
    "<method> · optimised" for a sweep over budgets (the sensitivity optimiser's plans): a curve of its
    own colour and legend entry, not its method's."""
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(series_keys(df, ms)):
        groups.setdefault(k, []).append(i)
    return [(f"{ms[rows[0]]} · {OPTIMISED}" if '"sweep":' in key else ms[rows[0]], rows) for key, rows in groups.items()]


def _series_colors(series) -> dict[str, str]:
    return _method_colors([label for label, _ in series])


def _round_ticks(fig: go.Figure) -> go.Figure:
    """A right-hand (overlaying) axis gets its own round ticks: plotly.js would otherwise place its ticks
    at the left axis' grid lines ("sync"), labelled 1.594, 1.437, …"""
    for axis in fig.select_yaxes():
        if getattr(axis, "overlaying", None):
            axis.update(tickmode="auto", nticks=6)
    return fig


def _names(df: pd.DataFrame) -> list[str]:
    return [str(v) for v in df["name"]] if "name" in df.columns else [f"run {i}" for i in range(len(df))]


def base_value(df: pd.DataFrame, col: str) -> float | None:
    """The base model's value of `col`: the first finite ``base_<col>`` (1.0 for compression ratios)."""
    if col in RATIO_COLUMNS:
        return 1.0
    bc = f"base_{col}"
    if bc in df.columns:
        vals = pd.to_numeric(df[bc], errors="coerce").dropna()
        if len(vals):
            return float(vals.iloc[0])
    return None


def _num(df: pd.DataFrame, col: str) -> np.ndarray:
    return pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=float)


def _method_colors(ms: list[str]) -> dict[str, str]:
    return {m: color_for(i) for i, m in enumerate(dict.fromkeys(ms))}


def _custom(ids: list, names: list[str], rows) -> list[list]:
    return [[ids[i], names[i]] for i in rows]


def add_recovery_arrows(fig: go.Figure, df: pd.DataFrame, x: str, y: str, yref: str = "y") -> int:
    """Arrow annotations from each parent run's point to its recovery run's point (rows whose
    ``parent_run_id`` names another row's id). Returns the number of arrows drawn."""
    if "parent_run_id" not in df.columns:
        return 0
    ids = run_ids(df)
    xs, ys = _num(df, x) * _scale(x), _num(df, y) * _scale(y)
    pos = {rid: i for i, rid in enumerate(ids) if rid is not None}
    n = 0
    for i, parent in enumerate(df["parent_run_id"]):
        if pd.isna(parent) or int(parent) not in pos:
            continue
        j = pos[int(parent)]
        if not all(math.isfinite(v) for v in (xs[i], ys[i], xs[j], ys[j])):
            continue
        fig.add_annotation(x=xs[i], y=ys[i], ax=xs[j], ay=ys[j], xref="x", yref=yref, axref="x", ayref=yref,
                           showarrow=True, arrowhead=3, arrowsize=1.2, arrowwidth=1.5, arrowcolor="#444444",
                           text="", hovertext=f"recovery: run {int(parent)} → run {ids[i]}", name="recovery")
        n += 1
    return n


# ---------------------------------------------------------------------------------- main chart
def infer_latency_kind(latency_col: str) -> str:
    if "measured" in latency_col:
        return "measured"
    if "projected" in latency_col:
        return "projected"
    raise ValueError(f"cannot tell whether {latency_col!r} is measured or projected: pass latency_kind")


def latency_axis_title(kind: str, device: str | None = None, unit: str = "ms/token") -> str:
    if kind == "measured":
        return f"Decode latency, measured (this machine) ({unit})"
    if kind == "projected":
        return f"Decode latency, projected (device{': ' + device if device else ''}) ({unit})"
    raise ValueError("latency_kind must be 'measured' or 'projected'")


def default_latency_col(df) -> str:
    """The measured latency (this machine; compressed experts on low-bit kernels where the plan has them)
    where any run has it, else the roofline projection."""
    if isinstance(df, pd.DataFrame) and "measured_decode_ms" in df.columns and \
            pd.to_numeric(df["measured_decode_ms"], errors="coerce").notna().any():
        return "measured_decode_ms"
    return "projected_decode_ms"


def projected_device(df) -> str | None:
    """The accelerator(s) the runs' latency was projected on (``projected_device`` column), or None."""
    if not isinstance(df, pd.DataFrame) or "projected_device" not in df.columns:
        return None
    devices = [str(d) for d in dict.fromkeys(df["projected_device"]) if isinstance(d, str) and d]
    return ", ".join(devices) or None


def tradeoff_chart(df: pd.DataFrame, accuracy_col: str = "accuracy", latency_col: str | None = None,
                   ratio_col: str = "compression_ratio", latency_kind: str | None = None,
                   method_col: str | None = None, device: str | None = None,
                   show_recovery: bool = True, latency_spread: tuple[str, str] | None = None,
                   busy_col: str = "latency_busy", accuracy_spread: tuple[str, str] | None = None) -> go.Figure:
    """Compression ratio (x) vs accuracy (left y, solid lines, circles) and decode latency (right y,
    dotted lines, diamonds), one colour per method, each method sorted by ratio. The base model is a
    black star at ratio 1 on both axes. The right axis says "projected (device)" or "measured (this
    machine)" (`latency_kind`, inferred from `latency_col` when None). With ``parent_run_id`` values,
    recovery arrows go from parent to child on the accuracy axis. `latency_spread`: (low, high) columns
    drawn as asymmetric error bars on the latency points (e.g. the quartiles of interleaved repeats; the
    base star gets ``base_<low>`` / ``base_<high>``); a series whose spreads all overlap is drawn as points
    with a note, never a line. Runs with `busy_col` = 1 (timed while the machine was busy) are open diamonds.
    A sweep over budgets (optimised plans) is its own series, "<method> · optimised".
    `accuracy_spread`: (low, high) columns of the accuracy (a confidence interval, or ± a task's stderr),
    drawn the same way: error bars, the base star's from ``base_<low>`` / ``base_<high>``, and a series
    whose intervals all overlap drawn as points, not a line.
    latency_col None: measured where the runs have it, else projected (`default_latency_col`). A projected
    latency names its accelerator in the chart title and axis (`device`, else the ``projected_device`` column).
    """
    latency_col = latency_col or default_latency_col(df)
    kind = latency_kind or infer_latency_kind(latency_col)
    device = device or (projected_device(df) if kind == "projected" else None)
    title = "Accuracy and latency vs compression"
    guard = _guard(df, [ratio_col, accuracy_col], title)
    if guard is not None:
        return guard
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    has_latency = latency_col in df.columns and pd.to_numeric(df[latency_col], errors="coerce").notna().any()
    ids, names, ms = run_ids(df), _names(df), methods(df, method_col)
    series = _series(df, ms)
    colors = _series_colors(series)
    xr, acc = _num(df, ratio_col), _num(df, accuracy_col) * _scale(accuracy_col)
    lat = _num(df, latency_col) if has_latency else np.full(len(df), np.nan)
    b_lat = base_value(df, latency_col)
    # Tiny models project to microseconds per token: show µs rather than ticks like 0.001594 ms.
    finite = [v for v in list(lat) + [b_lat or np.nan] if math.isfinite(v)]
    lat_scale, lat_unit = (1000.0, "µs/token") if finite and max(finite) < 0.1 else (1.0, "ms/token")
    lat = lat * lat_scale
    ytitle2 = latency_axis_title(kind, device, lat_unit)
    shown_legend: set[str] = set()
    spread_cols = latency_spread if latency_spread and all(c in df.columns for c in latency_spread) else None
    acc_spread = accuracy_spread if accuracy_spread and all(c in df.columns for c in accuracy_spread) else None
    noise_acc = []
    busy = (_num(df, busy_col) == 1) if busy_col in df.columns else np.zeros(len(df), dtype=bool)
    noise_series = []
    for m, series_rows in series:
        color = colors[m]
        rows = sorted((i for i in series_rows if math.isfinite(xr[i])), key=lambda i: xr[i])
        for values, second, symbol, dash, what, col in (
            (acc, False, "circle", "solid", "accuracy", accuracy_col),
            (lat, True, "diamond", "dot", "latency", latency_col),
        ):
            keep = [i for i in rows if math.isfinite(values[i])]
            if not keep:
                continue
            unit = "%" if _scale(col) == 100 else (f" {lat_unit}" if what == "latency" else "")
            name = f"{m} · {what}"
            error, joined, symbols, notes = None, len(keep) > 1, symbol, [""] * len(keep)
            if what == "latency":
                symbols = [f"{symbol}-open" if busy[i] else symbol for i in keep]
                notes = ["<br>machine busy while timing" if busy[i] else "" for i in keep]
            if what == "latency" and spread_cols:
                lo, hi = (_num(df, c)[keep] * lat_scale for c in spread_cols)
                error = dict(type="data", symmetric=False, array=np.nan_to_num(hi - values[keep]),
                             arrayminus=np.nan_to_num(values[keep] - lo), color=color, thickness=1.5, width=4)
                ok = np.isfinite(lo) & np.isfinite(hi)
                if joined and ok.sum() > 1 and np.nanmax(lo[ok]) <= np.nanmin(hi[ok]):
                    # Every point's spread overlaps every other's: a line would draw noise as a trend.
                    joined = False
                    noise_series.append(m)
                notes = [n + (f"<br>IQR {a:.3g}–{b:.3g}{unit}" if math.isfinite(a) and math.isfinite(b) else "")
                         for n, a, b in zip(notes, lo, hi)]
            if what == "accuracy" and acc_spread:
                lo, hi = (_num(df, c)[keep] * _scale(col) for c in acc_spread)
                error = dict(type="data", symmetric=False, array=np.nan_to_num(hi - values[keep]),
                             arrayminus=np.nan_to_num(values[keep] - lo), color=color, thickness=1.5, width=4)
                ok = np.isfinite(lo) & np.isfinite(hi)
                if joined and ok.sum() > 1 and np.nanmax(lo[ok]) <= np.nanmin(hi[ok]):
                    joined = False  # every interval overlaps every other: no trend beyond the noise
                    noise_acc.append(m)
                notes = [n + (f"<br>{a:.2f}–{b:.2f}{unit}" if math.isfinite(a) and math.isfinite(b) else "")
                         for n, a, b in zip(notes, lo, hi)]
            fig.add_trace(go.Scatter(
                error_y=error,
                x=xr[keep], y=values[keep], mode="lines+markers" if joined else "markers", name=name,
                legendgroup=m, showlegend=name not in shown_legend,
                line=dict(color=color, dash=dash), marker=dict(symbol=symbols, size=8, color=color),
                customdata=[[ids[i], names[i], n] for i, n in zip(keep, notes)],
                hovertemplate=(f"<b>%{{customdata[1]}}</b><br>run %{{customdata[0]}} · {m}<br>"
                               f"compression %{{x:.3g}}×<br>{what}{' (' + kind + ')' if what == 'latency' else ''}: "
                               f"%{{y:{_fmt(col)}}}{unit}%{{customdata[2]}}<extra></extra>"),
            ), secondary_y=second)
            shown_legend.add(name)
    b_acc = base_value(df, accuracy_col)
    if b_acc is not None:
        acc_error = None
        if acc_spread and all(f"base_{c}" in df.columns for c in acc_spread):
            blo, bhi = (base_value(df, c) for c in acc_spread)
            if blo is not None and bhi is not None:
                k = _scale(accuracy_col)
                acc_error = dict(type="data", symmetric=False, array=[(bhi - b_acc) * k], arrayminus=[(b_acc - blo) * k],
                                 color=BASE_COLOR, thickness=1.5, width=4)
        fig.add_trace(go.Scatter(x=[1.0], y=[b_acc * _scale(accuracy_col)], mode="markers", name="base model",
                                 error_y=acc_error,
                                 legendgroup="base", marker=dict(symbol="star", size=14, color=BASE_COLOR),
                                 hovertemplate="<b>base model</b><br>accuracy %{y:.2f}%<extra></extra>"),
                      secondary_y=False)
    if b_lat is not None and has_latency:
        base_error = None
        if spread_cols and all(f"base_{c}" in df.columns for c in spread_cols):
            blo, bhi = (base_value(df, c) for c in spread_cols)
            if blo is not None and bhi is not None:
                base_error = dict(type="data", symmetric=False, array=[(bhi - b_lat) * lat_scale],
                                  arrayminus=[(b_lat - blo) * lat_scale], color=BASE_COLOR, thickness=1.5, width=4)
        fig.add_trace(go.Scatter(x=[1.0], y=[b_lat * lat_scale], mode="markers", name="base model · latency", legendgroup="base",
                                 error_y=base_error,
                                 marker=dict(symbol="star-diamond", size=13, color=BASE_COLOR),
                                 hovertemplate=f"<b>base model</b><br>latency ({kind}) %{{y:.4g}} {lat_unit}<extra></extra>"),
                      secondary_y=True)
    if show_recovery:
        add_recovery_arrows(fig, df, ratio_col, accuracy_col)
    fig.update_xaxes(title_text=axis_title(ratio_col))
    fig.update_yaxes(title_text=axis_title(accuracy_col), secondary_y=False)
    fig.update_yaxes(title_text=ytitle2, secondary_y=True, showgrid=False)
    if not has_latency:
        fig.add_annotation(text=f"no {kind} latency in these runs", xref="paper", yref="paper", x=1, y=1.06,
                           showarrow=False, font=dict(size=11, color="#777777"))
    for series, what, why, y, name in ((noise_series, "Latency spreads (IQR)", "this machine's noise", 1.0, "latency-noise"),
                                       (noise_acc, "Accuracy intervals", "the noise of the items", 1.05, "accuracy-noise")):
        if series:
            fig.add_annotation(
                text=f"{what} overlap within {', '.join(dict.fromkeys(series))}: drawn as points, not a trend (within {why})",
                xref="paper", yref="paper", x=0, xanchor="left", y=y, yanchor="bottom", showarrow=False,
                font=dict(size=11, color="#8a4b00"), name=name)
    if busy.any() and has_latency:
        fig.add_annotation(text="open diamonds: timed while the machine was busy", xref="paper", yref="paper", x=1,
                           xanchor="right", y=-0.12, yanchor="top", showarrow=False, font=dict(size=11, color="#777777"))
    where = (f" on {device}, roofline" if device else ", roofline") if kind == "projected" else " on this machine"
    fig.update_layout(title=title + f" (latency {kind}{where})", template=_TEMPLATE, legend=dict(title="Method · metric", orientation="h", yanchor="top", y=-0.2),
                      hovermode="closest")
    if has_latency:
        _band_axes(fig)
    return _round_ticks(fig)


def _band_axes(fig: go.Figure, share: float = 0.42) -> None:
    """Accuracy in the upper band of the plot, latency in the lower one (each `share` of the height, a gap
    between): on two overlaid axes a run's accuracy circle and latency diamond, or the base model's two
    stars, otherwise land on the same pixels whenever the two values sit at the same height of their
    own axes, and one hides the other. Ranges cover every point and error bar; zoom still works."""
    values: dict[str, list[float]] = {"y": [], "y2": []}
    for trace in fig.data:
        ys = np.asarray([v for v in (trace.y if trace.y is not None else ()) if v is not None], dtype=float)
        err = trace.error_y
        up = np.asarray(err.array, dtype=float) if err is not None and err.array is not None else np.zeros(len(ys))
        down = np.asarray(err.arrayminus, dtype=float) if err is not None and err.arrayminus is not None else up
        if len(up) == len(ys) == len(down):
            ys = np.concatenate([ys, ys + up, ys - down])
        values.setdefault(trace.yaxis or "y", []).extend(v for v in ys if math.isfinite(v))
    for axis, upper in (("y", True), ("y2", False)):
        v = values.get(axis)
        if not v:
            continue
        lo, hi = min(v), max(v)
        span = (hi - lo) or max(abs(hi) * 0.02, 1e-9)  # one value: a band around it
        full = span / share  # the axis' whole range, of which the data takes `share`
        pad = 0.04 * full
        r = [hi + pad - full, hi + pad] if upper else [lo - pad, lo - pad + full]
        fig.update_yaxes(range=r, secondary_y=axis == "y2")


# ---------------------------------------------------------------------------------- per-method lines
def _per_method_lines(df, y: str, x: str, method_col, log_y: bool, title: str,
                      spread: tuple[str, str] | None = None) -> go.Figure:
    guard = _guard(df, [x, y], title)
    if guard is not None:
        return guard
    ids, names, ms = run_ids(df), _names(df), methods(df, method_col)
    xs, ys = _num(df, x) * _scale(x), _num(df, y) * _scale(y)
    fig = go.Figure()
    series = _series(df, ms)
    colors, shown_legend = _series_colors(series), set()
    for m, series_rows in series:
        color = colors[m]
        rows = sorted((i for i in series_rows if math.isfinite(xs[i]) and math.isfinite(ys[i])), key=lambda i: xs[i])
        if not rows:
            continue
        error = None
        if spread and all(c in df.columns for c in spread):  # (low, high) columns: a confidence interval
            lo, hi = (_num(df, c)[rows] * _scale(y) for c in spread)
            error = dict(type="data", symmetric=False, array=np.nan_to_num(hi - ys[rows]),
                         arrayminus=np.nan_to_num(ys[rows] - lo), color=color, thickness=1.5, width=4)
        fig.add_trace(go.Scatter(
            error_y=error,
            x=xs[rows], y=ys[rows], mode="lines+markers" if len(rows) > 1 else "markers", name=m, legendgroup=m,
            showlegend=m not in shown_legend, line=dict(color=color),
            marker=dict(size=8, color=color), customdata=_custom(ids, names, rows),
            hovertemplate=(f"<b>%{{customdata[1]}}</b><br>run %{{customdata[0]}} · {m}<br>{axis_title(x)}: "
                           f"%{{x:{_fmt(x)}}}<br>{axis_title(y)}: %{{y:{_fmt(y)}}}<extra></extra>"),
        ))
        shown_legend.add(m)
    b = base_value(df, y)
    if b is not None:
        v = b * _scale(y)
        fig.add_hline(y=v, line=dict(color=BASE_COLOR, dash="dash", width=1))
        # Annotations on a log axis take log10 coordinates: a value there would stretch the axis to 10^v.
        if not log_y or v > 0:
            fig.add_annotation(text=f"base model {v:.4g}", xref="paper", x=0, xanchor="left", yanchor="bottom",
                               y=math.log10(v) if log_y else v, showarrow=False, font=dict(size=11, color="#555555"))
        # an invisible trace so the reference line appears in the legend
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name="base model",
                                 line=dict(color=BASE_COLOR, dash="dash", width=1), hoverinfo="skip"))
    fig.update_layout(title=title, template=_TEMPLATE, xaxis=dict(title=axis_title(x)),
                      yaxis=dict(title=axis_title(y) + (" (log scale)" if log_y else ""),
                                 type="log" if log_y else "linear"),
                      legend=dict(title="Method"))
    return fig


def perplexity_vs_ratio(df: pd.DataFrame, log_y: bool = False, ratio_col: str = "compression_ratio",
                        method_col: str | None = None,
                        spread: tuple[str, str] | None = ("perplexity_lo", "perplexity_hi")) -> go.Figure:
    """Perplexity vs compression ratio, one line per method (sorted by ratio); base as a dashed line;
    `spread` columns (the 95 % bootstrap interval, where runs have it) as error bars."""
    return _per_method_lines(df, "perplexity", ratio_col, method_col, log_y, "Perplexity vs compression", spread)


def cv_vs_ratio(df: pd.DataFrame, ratio_col: str = "compression_ratio", method_col: str | None = None) -> go.Figure:
    """Load-balance CV (mean over layers) vs compression ratio per method; base CV dashed."""
    return _per_method_lines(df, "mean_cv", ratio_col, method_col, False, "Load balance vs compression")


# ---------------------------------------------------------------------------------- drift
def _drift_rows(result) -> list[dict]:
    if hasattr(result, "drift"):
        return list(result.drift)
    if isinstance(result, dict):
        if "drift" in result:
            return list(result["drift"])
        if isinstance(result.get("details"), dict):
            return list(result["details"].get("drift", []))
        return []
    return list(result or [])


def drift_per_layer(result) -> go.Figure:
    """Routing drift of one run per layer: top-k overlap and top-1 change rate (left axis, 0–1) and
    router KL divergence (right axis, nats). `result`: an `EvalResult`, its ``to_dict()``, a run's
    metrics dict with ``"details"``, or the drift list (dicts: layer, topk_overlap, top1_change_rate, kl)."""
    rows = _drift_rows(result)
    title = "Routing drift per layer (compressed vs base, same tokens)"
    if not rows:
        return empty_figure("No routing-drift data in this result.", title)
    x = [r.get("layer", i) for i, r in enumerate(rows)]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    for key, name, color, symbol in (("topk_overlap", "top-k overlap", color_for(0), "circle"),
                                     ("top1_change_rate", "top-1 change rate", color_for(3), "square")):
        fig.add_trace(go.Scatter(x=x, y=[r[key] for r in rows], mode="lines+markers", name=name,
                                 line=dict(color=color), marker=dict(symbol=symbol, size=8),
                                 hovertemplate=f"MoE layer %{{x}}<br>{name}: %{{y:.3f}}<extra></extra>"),
                      secondary_y=False)
    fig.add_trace(go.Bar(x=x, y=[r["kl"] for r in rows], name="KL(base ‖ compressed)", marker_color="#bbbbbb",
                         opacity=0.6, hovertemplate="MoE layer %{x}<br>KL: %{y:.4g} nats<extra></extra>"),
                  secondary_y=True)
    fig.update_xaxes(title_text="MoE layer (index)", dtick=1)
    fig.update_yaxes(title_text="Overlap / change rate (fraction of tokens, 0–1)", range=[0, 1.05],
                     secondary_y=False)
    fig.update_yaxes(title_text="Router KL divergence (nats per token)", secondary_y=True, showgrid=False,
                     rangemode="tozero")
    fig.update_layout(title=title, template=_TEMPLATE, legend=dict(title="Drift measure"))
    return _round_ticks(fig)


# ---------------------------------------------------------------------------------- pareto
def pareto_chart(df: pd.DataFrame, x: str = "compression_ratio", y: str = "accuracy",
                 maximize_x: bool | None = None, maximize_y: bool | None = None,
                 show_recovery: bool = True) -> go.Figure:
    """All runs as faint points (trace "all runs") and the Pareto front (trace "Pareto front")
    highlighted and connected in x order. Direction per objective defaults to maximise, except the
    columns in `MINIMIZE` (perplexity, latency, CV, KL, …). Every run point has ``customdata[0]`` =
    run id and ``customdata[1]`` = name. A base-model star is added when a base value is known.
    Recovery arrows (parent → child) when ``parent_run_id`` is set."""
    title = f"Pareto front: {axis_title(y).split(' (')[0]} vs {axis_title(x).split(' (')[0]}"
    guard = _guard(df, [x, y], title)
    if guard is not None:
        return guard
    mx = (x not in MINIMIZE) if maximize_x is None else maximize_x
    my = (y not in MINIMIZE) if maximize_y is None else maximize_y
    df = df.reset_index(drop=True)
    ids, names, ms = run_ids(df), _names(df), methods(df)
    xs, ys = _num(df, x) * _scale(x), _num(df, y) * _scale(y)
    mask = pareto_mask(df, x, y, mx, my)
    finite = [i for i in range(len(df)) if math.isfinite(xs[i]) and math.isfinite(ys[i])]
    front = sorted(np.flatnonzero(mask).tolist(), key=lambda i: (xs[i], ys[i]))
    hover = ("<b>%{customdata[1]}</b><br>run %{customdata[0]} · %{customdata[2]}<br>"
             f"{axis_title(x)}: %{{x:{_fmt(x)}}}<br>{axis_title(y)}: %{{y:{_fmt(y)}}}<extra></extra>")
    fig = go.Figure()
    fig.add_trace(go.Scatter(
        x=xs[finite], y=ys[finite], mode="markers", name="all runs",
        marker=dict(size=8, color="#9e9e9e", opacity=0.45),
        customdata=[[ids[i], names[i], ms[i]] for i in finite], hovertemplate=hover,
    ))
    fig.add_trace(go.Scatter(
        x=xs[front], y=ys[front], mode="lines+markers", name="Pareto front",
        line=dict(color=color_for(3), width=2), marker=dict(size=11, color=color_for(3), line=dict(width=1, color="#ffffff")),
        customdata=[[ids[i], names[i], ms[i]] for i in front], hovertemplate=hover,
    ))
    bx, by = base_value(df, x), base_value(df, y)
    if bx is not None and by is not None:
        fig.add_trace(go.Scatter(x=[bx * _scale(x)], y=[by * _scale(y)], mode="markers", name="base model",
                                 marker=dict(symbol="star", size=14, color=BASE_COLOR),
                                 hovertemplate="<b>base model</b><br>%{x:.4g}, %{y:.4g}<extra></extra>"))
    if show_recovery:
        add_recovery_arrows(fig, df, x, y)
    arrows = lambda up: "higher is better" if up else "lower is better"  # noqa: E731
    fig.update_layout(
        # No clickmode/dragmode here: with "event+select" / "select", Streamlit's on_select returned no
        # points for a click, so clicking a run never loaded its plan.
        title=title, template=_TEMPLATE, legend=dict(title="Runs"),
        xaxis=dict(title=f"{_named_axis(df, x)} → {arrows(mx)}"), yaxis=dict(title=f"{_named_axis(df, y)} → {arrows(my)}"),
    )
    return fig


def _named_axis(df: pd.DataFrame, col: str) -> str:
    """The axis title, a projected latency's with its accelerator named (``projected_device`` column)."""
    device = projected_device(df) if col == "projected_decode_ms" else None
    return latency_axis_title("projected", device) if device else axis_title(col)


__all__ = [
    "COLUMNS", "MINIMIZE", "add_recovery_arrows", "axis_title", "base_value", "cv_vs_ratio", "drift_per_layer",
    "infer_latency_kind", "latency_axis_title", "methods", "pareto_chart", "perplexity_vs_ratio", "run_ids",
    "series_keys", "tradeoff_chart",
]
