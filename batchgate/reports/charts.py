"""Report charts: matplotlib figures as inline SVG, drawn from ``ReportData`` aggregates (never per row).

The only module of the package that imports matplotlib, and only when a page is asked for.
"""

from __future__ import annotations

import io
import itertools
import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from .data import NONE, Histogram, ReportData, is_missing

__all__ = ["render_charts"]

_BLUE, _ORANGE, _GREY, _RED = "#2f6fdf", "#f0a030", "#9aa3b0", "#d0453a"


def render_charts(data: ReportData) -> list[tuple[str, str, str]]:
    """(id, inline SVG, caption) per chart."""
    import matplotlib

    style: Any = {
        "svg.hashsalt": "batchgate",
        "svg.fonttype": "path",
        "font.size": 9.5,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.edgecolor": "#c5ccd6",
        "axes.titlesize": 11,
        "axes.titleweight": "bold",
        "axes.titlelocation": "left",
        "xtick.color": "#4a5463",
        "ytick.color": "#4a5463",
        "axes.grid": True,
        "axes.axisbelow": True,
        "grid.color": "#eceff3",
        "grid.linewidth": 0.8,
    }
    out = []
    with matplotlib.rc_context(style), warnings.catch_warnings():
        # Cosmetic font/layout warnings must not fail a report (pytest runs with warnings as errors).
        warnings.simplefilter("ignore")
        for name, draw, caption in (
            ("cost-by-model", _chart_cost_by_model, "Confirmed cost per model; unconfirmed shown apart."),
            ("spend-over-time", _chart_spend, "Confirmed spend accumulating as requests finish."),
            ("latency", _chart_latency, "Every row with a value; the slowest 0.5% share the last bin."),
            ("failures", _chart_failures, "Failed attempts by cause and failed requests by error type."),
        ):
            out.append((name, _svg(draw, data), caption))
        if len(data.cost_by_day) > 1:
            out.append(("cost-by-day", _svg(_chart_cost_by_day, data), "Confirmed cost per UTC day."))
    return out


def _svg(draw: Callable[[Any, ReportData], None], data: ReportData) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.2, 3.6), dpi=100, layout="constrained")
    draw(fig, data)
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    text = buffer.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog and DOCTYPE (it names an external DTD)


def _label(text: Any) -> str:
    """Ledger text as a literal matplotlib label: a ``$`` would otherwise start mathtext."""
    value = NONE if is_missing(text) else str(text)
    value = value if len(value) <= 38 else value[:37] + "…"
    return value.replace("$", r"\$")


def _empty(ax: Any, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color=_GREY, fontsize=11)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


def _chart_cost_by_model(fig: Any, data: ReportData) -> None:
    ax = fig.add_subplot()
    ax.set_title("Cost by model")
    items = [(m, c, u) for m, c, u in data.cost_by_model]
    if not items or not any(c > 0 or u > 0 for _, c, u in items):
        _empty(ax, "no spend recorded")
        return
    if len(items) > 12:
        rest = items[11:]
        items = [*items[:11], (f"{len(rest)} others", sum(c for _, c, _ in rest), sum(u for _, _, u in rest))]
    items = items[::-1]
    confirmed = np.array([c for _, c, _ in items])
    unconfirmed = np.array([u for _, _, u in items])
    y = np.arange(len(items))
    ax.barh(y, confirmed, color=_BLUE, label="confirmed")
    has_unconfirmed = bool((unconfirmed > 0).any())
    if has_unconfirmed:
        ax.barh(
            y,
            unconfirmed,
            left=confirmed,
            color=_ORANGE,
            hatch="///",
            edgecolor="white",
            linewidth=0,
            label="unconfirmed (cut streams)",
        )
    ax.set_yticks(y, [_label(m) for m, _, _ in items])
    ax.grid(axis="y", visible=False)
    widest = float((confirmed + unconfirmed).max())
    for yi, (c, u) in enumerate(zip(confirmed, unconfirmed, strict=True)):
        text = _money(c) + (f" + {_money(u)}" if u > 0 else "")
        ax.text(c + u + widest * 0.01, yi, text, va="center", fontsize=8.5, color="#333")
    ax.set_xlim(0, widest * (1.45 if has_unconfirmed else 1.3))
    ax.xaxis.set_major_formatter(_usd_axis())
    if has_unconfirmed:
        fig.legend(loc="outside lower center", ncols=2, frameon=False, fontsize=8)


def _chart_spend(fig: Any, data: ReportData) -> None:
    """One run: cumulative spend against the clock.  Several: one line per run against time since its start."""
    import matplotlib.dates as mdates

    ax = fig.add_subplot()
    if data.spend_single is not None:
        curve = data.spend_single
        ax.set_title("Cumulative spend")
        x = np.array(curve.edges).astype(np.int64).astype("datetime64[us]")
        y = np.array(curve.spent)
        ax.plot(x, y, color=_BLUE, linewidth=2, label="confirmed", drawstyle="steps-post")
        ax.fill_between(x, y, step="post", color=_BLUE, alpha=0.08)
        if curve.unconfirmed is not None:
            cut = np.array(curve.unconfirmed)
            ax.plot(
                x, y + cut, color=_ORANGE, linewidth=1.4, linestyle="--", label="+ unconfirmed", drawstyle="steps-post"
            )
            ax.legend(loc="upper left", frameon=False, fontsize=8.5)
        locator = mdates.AutoDateLocator(maxticks=7)  # type: ignore[no-untyped-call]
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]
    elif data.spend_runs:
        ax.set_title("Cumulative spend per run")
        palette = (_BLUE, _ORANGE, "#3aa676", "#8e5bd6", _RED, "#2bb0c4", "#b5894a", _GREY)
        longest = max(curve.edges[-1] for curve in data.spend_runs) / 3600
        unit, scale = ("minutes", 1 / 60) if longest < 2 else ("hours", 1 / 3600)
        for colour, curve in zip(palette, data.spend_runs, strict=False):
            ax.plot(
                np.array(curve.edges) * scale,
                curve.spent,
                color=colour,
                linewidth=1.6,
                drawstyle="steps-post",
                label=_label(curve.label),
            )
        ax.set_xlim(left=0)
        ax.set_xlabel(f"{unit} since the run started")
        shown = len(data.spend_runs)
        title = None if data.run_count <= shown else f"the {shown} costliest of {data.run_count} runs"
        ax.legend(loc="upper left", frameon=False, fontsize=7.5, title=title, title_fontsize=7.5)
    else:
        ax.set_title("Cumulative spend")
        _empty(ax, "no timestamps recorded")
        return
    ax.set_ylabel("USD")
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_formatter(_usd_axis())


def _usd_axis() -> Any:
    """Tick labels in dollars with as many decimals as the tick step needs ($20, $0.25, $0.0005)."""
    from matplotlib.ticker import Formatter

    class Usd(Formatter):
        def __call__(self, value: float, pos: int | None = None) -> str:
            if value == 0:
                return "0"
            locs = sorted(self.locs)
            step = min((b - a for a, b in itertools.pairwise(locs) if b > a), default=abs(value))
            digits = next((d for d in range(7) if abs(round(step * 10**d) - step * 10**d) < 1e-6), 6)
            return f"\\${value:,.{digits}f}"

    return Usd()


def _money(value: float) -> str:
    """About four significant digits, at least cents: $138.16, $0.4391, $0.000123 (``$`` escaped for mathtext)."""
    if value <= 0:
        return "\\$0"
    digits = min(6, max(2, 3 - math.floor(math.log10(value))))
    return f"\\${value:,.{digits}f}"


def _chart_latency(fig: Any, data: ReportData) -> None:
    left, right = fig.subplots(1, 2)
    _histogram(left, "Request latency", data.latency, _BLUE)
    _histogram(right, "Time to first token", data.ttft, _ORANGE)
    left.set_ylabel("requests")


def _histogram(ax: Any, title: str, hist: Histogram | None, colour: str) -> None:
    ax.set_title(title, fontsize=10)
    if hist is None:
        _empty(ax, "none recorded")
        return
    top = hist.edges[-1]
    ax.stairs(hist.counts, hist.edges, fill=True, color=colour, alpha=0.85)
    for (q, value), style in zip(hist.percentiles.items(), ("-", "--", ":"), strict=True):
        if value <= top:
            ax.axvline(value, color="#333", linewidth=0.9, linestyle=style, label=f"p{q} {value:.2f}s")
    ax.set_xlabel(f"seconds ({hist.values:,} rows)")
    ax.set_xlim(0, top * 1.02)
    ax.grid(axis="x", visible=False)
    ax.legend(loc="upper right", frameon=False, fontsize=7.5, handlelength=1.6)


def _chart_failures(fig: Any, data: ReportData) -> None:
    left, right = fig.subplots(1, 2)
    _bars(left, "Failed attempts by cause", data.retry_causes, _ORANGE, "no failed attempts")
    _bars(right, "Failed requests by error", data.failed_by_error, _RED, "no failed requests")


def _bars(ax: Any, title: str, counts: dict[str, int], color: str, empty: str) -> None:
    ax.set_title(title, fontsize=10)
    if not counts:
        _empty(ax, empty)
        return
    items = sorted(counts.items(), key=lambda kv: -kv[1])[:10][::-1]
    y = np.arange(len(items))
    values = [v for _, v in items]
    ax.barh(y, values, color=color)
    ax.set_yticks(y, [_label(k) for k, _ in items])
    ax.grid(axis="y", visible=False)
    for yi, v in enumerate(values):
        ax.text(v, yi, f" {v:,}", va="center", fontsize=8.5)
    ax.set_xlim(0, max(values) * 1.25)
    ax.xaxis.get_major_locator().set_params(integer=True)


def _chart_cost_by_day(fig: Any, data: ReportData) -> None:
    ax = fig.add_subplot()
    ax.set_title("Cost by day (UTC)")
    x = np.arange(len(data.cost_by_day))
    ax.bar(x, [c for _, c in data.cost_by_day], color=_BLUE)
    step = max(1, len(data.cost_by_day) // 12)
    ax.set_xticks(x[::step], [d for d, _ in data.cost_by_day[::step]], rotation=30, ha="right")
    ax.grid(axis="x", visible=False)
    ax.yaxis.set_major_formatter(_usd_axis())
