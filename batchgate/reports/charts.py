"""Report charts as hand-written inline SVG, drawn from ``ReportData`` aggregates (never per row).

Plain string building, no plotting library: importing and laying out matplotlib cost most of a
report's CPU.  Every chart is a pure function of the data (same data, same bytes), bounded in size
(a capped number of bars, bins and line points), needs no script and loads nothing.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import NamedTuple

from .data import NONE, Histogram, ReportData, RunCurve, is_missing

__all__ = ["MAX_LINE_POINTS", "downsample", "nice_ticks", "render_charts"]

#: The most points one spend line is drawn with; longer curves are downsampled.
MAX_LINE_POINTS = 500

_BLUE, _ORANGE, _GREY, _RED = "#2f6fdf", "#f0a030", "#9aa3b0", "#d0453a"
_PALETTE = (_BLUE, _ORANGE, "#3aa676", "#8e5bd6", _RED, "#2bb0c4", "#b5894a", _GREY)
_INK, _MUTED, _AXIS, _GRID = "#1d2430", "#5d6776", "#c5ccd6", "#eceff3"
_FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif"  # the page's stack
_W, _H = 600, 330  # drawn about this size on the page, so font sizes are what a reader sees
_MAX_MODELS, _MAX_CAUSES, _MAX_BINS, _MAX_DAYS = 12, 10, 120, 92
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")  # what XML 1.0 cannot hold
_TIME_STEPS = (
    *(1, 2, 5, 10, 15, 30),
    *(60 * m for m in (1, 2, 5, 10, 15, 30)),
    *(3600 * h for h in (1, 2, 3, 6, 12)),
    *(86400 * d for d in (1, 2, 7, 14, 30, 61, 91, 182, 365)),
)  # seconds: steps a clock or calendar reader expects


def render_charts(data: ReportData) -> list[tuple[str, str, str]]:
    """(id, inline SVG, caption) per chart; cost by day only when there is more than one day."""
    out = [
        ("cost-by-model", _chart_cost_by_model(data), "Confirmed cost per model; unconfirmed shown apart."),
        ("spend-over-time", _chart_spend(data), "Confirmed spend accumulating as requests finish."),
        ("latency", _chart_latency(data), "Every row with a value; the slowest 0.5% share the last bin."),
        ("failures", _chart_failures(data), "Failed attempts by cause and failed requests by error type."),
    ]
    if len(data.cost_by_day) > 1:
        out.append(("cost-by-day", _chart_cost_by_day(data), "Confirmed cost per UTC day."))
    return out


# --- numbers -------------------------------------------------------------------------------------


def nice_ticks(lo: float, hi: float, max_ticks: int = 8, *, integer: bool = False) -> list[float]:
    """Evenly spaced round values (1, 2 or 5 times a power of ten) covering ``[lo, hi]``, at most ``max_ticks``.

    Round steps are what make an axis readable at a glance.  A degenerate range (one value, NaN) still
    gets two ticks, from zero; ``integer`` keeps the step at 1 or more (counts).
    """
    max_ticks = max(3, max_ticks)
    lo, hi = (min(max(_num(v), -1e300), 1e300) for v in (lo, hi))  # hi - lo stays finite
    lo, hi = min(lo, hi), max(lo, hi)
    if hi - lo <= max(abs(lo), abs(hi)) * 1e-9 or hi - lo < 1e-12:
        lo, hi = min(0.0, lo), max(0.0, hi)
        if hi - lo < 1e-12:
            lo, hi = 0.0, 1.0
    exponent = math.floor(math.log10((hi - lo) / (max_ticks - 1)))
    if integer:
        exponent = max(exponent, 0)
    for e in (exponent, exponent + 1, exponent + 2):
        for m in (1, 2, 5):
            step = m * 10.0**e if e >= 0 else m / 10 ** (-e)
            first = math.floor(lo / step + 1e-9)
            last = max(math.ceil(hi / step - 1e-9), first + 1)  # the tolerance must not leave one tick
            if last - first + 1 <= max_ticks:
                return [(i * m * 10**e if e >= 0 else i * m / 10 ** (-e)) + 0.0 for i in range(first, last + 1)]
    raise AssertionError("unreachable: a step ten times the raw step always fits")  # pragma: no cover


def _num(value: object) -> float:
    """A finite float, or 0 for a null, NaN, infinity or anything unreadable: charts never see NaN."""
    if is_missing(value):
        return 0.0
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.0
    return number if math.isfinite(number) else 0.0


def _decimals(step: float) -> int:
    """Decimals a tick step needs: 0.5 -> 1, 0.02 -> 2, 20 -> 0."""
    return min(12, max(0, -math.floor(math.log10(step) + 1e-9))) if step > 0 else 0


def _step(ticks: Sequence[float]) -> float:
    return ticks[1] - ticks[0] if len(ticks) > 1 else 1.0


def _usd_tick(value: float, step: float) -> str:
    """Axis dollars with as many decimals as the step needs ($20, $0.25, $0.0005)."""
    if abs(value) < step * 1e-6:
        return "$0"
    return ("-" if value < 0 else "") + f"${abs(value):,.{_decimals(step)}f}"


def _money(value: float) -> str:
    """About four significant digits, at least cents: $138.16, $0.4391, $0.000123."""
    if value <= 0:
        return "$0"
    if value < 5e-7:
        return "<$0.000001"
    digits = min(6, max(2, 3 - math.floor(math.log10(value))))
    return f"${value:,.{digits}f}"


def _seconds(value: float) -> str:
    """A latency for a legend: 0.0123s, 1.23s, 12.3s."""
    digits = min(4, max(1, 2 - math.floor(math.log10(value)))) if value > 0 else 2
    return f"{value:.{digits}f}s"


def _count(value: float) -> str:
    return f"{round(value):,}"


# --- text ----------------------------------------------------------------------------------------


def _clean(text: object) -> str:
    """Ledger text as a label: ``(none)`` for a null, ``""`` for blank, characters XML cannot hold replaced."""
    value = NONE if is_missing(text) else str(text)
    return _XML_INVALID.sub("\ufffd", value) if value.strip() else '""'


def _esc(text: str) -> str:
    """XML-escaped, quotes included, so data text is safe in an element and in an attribute."""
    return html.escape(_XML_INVALID.sub("\ufffd", text), quote=True)


def _short(text: str, limit: int) -> str:
    """At most ``limit`` characters, an ellipsis marking the cut; the full text goes in a tooltip."""
    return text if len(text) <= limit else text[: max(1, limit - 1)] + "…"


def _width(text: str, size: float) -> float:
    """Rough rendered width of sans-serif text: enough to lay out margins without measuring fonts."""
    return len(text) * size * 0.58


def _f(value: float) -> str:
    """A coordinate, to 0.1 px: short and deterministic."""
    text = f"{value:.1f}".removesuffix(".0")
    return "0" if text == "-0" else text


# --- SVG pieces ----------------------------------------------------------------------------------


class _Box(NamedTuple):
    """A rectangle in SVG user units."""

    x: float
    y: float
    w: float
    h: float

    @property
    def right(self) -> float:
        return self.x + self.w

    @property
    def bottom(self) -> float:
        return self.y + self.h


class _Scale(NamedTuple):
    """Linear map from a data domain to pixels; a zero-width domain maps to the middle (no division by zero)."""

    d0: float
    d1: float
    r0: float
    r1: float

    def __call__(self, value: float) -> float:
        span = self.d1 - self.d0
        if span == 0:
            return (self.r0 + self.r1) / 2
        return self.r0 + (_num(value) - self.d0) / span * (self.r1 - self.r0)


def _text(
    x: float,
    y: float,
    text: str,
    *,
    size: float = 11,
    anchor: str = "start",
    fill: str = _MUTED,
    bold: bool = False,
    extra: str = "",
) -> str:
    weight = ' font-weight="600"' if bold else ""
    anchor_attr = "" if anchor == "start" else f' text-anchor="{anchor}"'
    return (
        f'<text x="{_f(x)}" y="{_f(y)}" font-size="{_f(size)}" fill="{fill}"{anchor_attr}{weight}{extra}>'
        f"{_esc(text)}</text>"
    )


def _rect(x: float, y: float, w: float, h: float, fill: str, tip: str | None = None) -> str:
    body = f'<rect x="{_f(x)}" y="{_f(y)}" width="{_f(max(w, 0.0))}" height="{_f(max(h, 0.0))}" fill="{fill}"'
    return body + (f"><title>{_esc(tip)}</title></rect>" if tip is not None else "/>")


def _line(d: str, stroke: str, width: float = 1, extra: str = "") -> str:
    return f'<path d="{d}" fill="none" stroke="{stroke}" stroke-width="{_f(width)}"{extra}/>'


def _svg(title: str, body: Sequence[str], *, show_title: bool = True) -> str:
    """The chart's root: scales to its container (viewBox, width 100%), the page's font, a bold title."""
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_W} {_H}" width="100%" role="img" '
        f'aria-label="{_esc(title)}" font-family="{_FONT}">'
        + (_text(14, 24, title, size=15, fill=_INK, bold=True) if show_title else "")
        + "".join(body)
        + "</svg>"
    )


def _panel_title(box: _Box, title: str) -> str:
    return _text(box.x, box.y + 14, title, size=14, fill=_INK, bold=True)


def _note(box: _Box, message: str) -> str:
    """What an empty chart says instead of drawing axes over nothing."""
    return _text(box.x + box.w / 2, box.y + box.h / 2, message, size=14, anchor="middle", fill=_GREY)


def _legend(right: float, y: float, entries: Sequence[tuple[str, str, str]]) -> list[str]:
    """A one-row legend ending at ``right``: (colour, label, kind) with kind ``bar``, ``line`` or a dash array."""
    out: list[str] = []
    x = right
    for colour, label, kind in reversed(entries):
        x -= _width(label, 11.5)
        out.append(_text(x, y + 4, label, size=11.5, fill=_INK))
        x -= 22
        if kind == "bar":
            out.append(_rect(x, y - 5, 14, 10, colour))
        else:
            dash = "" if kind == "line" else f' stroke-dasharray="{kind}"'
            out.append(_line(f"M{_f(x)} {_f(y)}h16", colour, 2, dash))
        x -= 14
    backing = _rect(x + 6, y - 8, right - x - 4, 16, "#fff").replace("/>", ' fill-opacity="0.85"/>')
    return [backing, *out]


def _y_grid(x0: float, x1: float, scale: _Scale, ticks: Sequence[float], label: Callable[[float], str]) -> list[str]:
    """Horizontal grid lines with their values at the left."""
    out = []
    for tick in ticks:
        y = scale(tick)
        out.append(_line(f"M{_f(x0)} {_f(y)}H{_f(x1)}", _GRID))
        out.append(_text(x0 - 6, y, label(tick), size=11, anchor="end", extra=' dy="0.35em"'))
    return out


def _left_margin(ticks: Sequence[float], label: Callable[[float, float], str]) -> float:
    """Room for the widest y tick label, from the chart's left edge."""
    return 20 + max(_width(label(t, _step(ticks)), 11) for t in ticks)


def _x_grid(y0: float, y1: float, scale: _Scale, ticks: Sequence[float], label: Callable[[float], str]) -> list[str]:
    """Vertical grid lines with their values below."""
    out = []
    for tick in ticks:
        x = scale(tick)
        out.append(_line(f"M{_f(x)} {_f(y0)}V{_f(y1)}", _GRID))
        out.append(_text(x, y1 + 15, label(tick), size=11, anchor="middle"))
    return out


# --- horizontal bars (cost by model, failures) ---------------------------------------------------


class _Bar(NamedTuple):
    label: str  # full text; shortened on the axis
    parts: tuple[float, ...]  # stacked values, one per colour
    note: str  # printed at the bar's end
    tip: str  # tooltip


def _hbars(
    box: _Box,
    bars: Sequence[_Bar],
    colours: Sequence[str],
    tick_label: Callable[[float, float], str],
    *,
    label_chars: int,
    max_ticks: int,
    integer: bool = False,
) -> list[str]:
    """Labelled horizontal bars, biggest first, with a value axis below: the layout both bar charts share."""
    label_chars = min(label_chars, int(box.w * 0.4 / _width("x", 12)))
    labels = [_short(bar.label, label_chars) for bar in bars]
    label_w = max(_width(label, 12) for label in labels)
    note_w = max(_width(bar.note, 11) for bar in bars) + 8
    left, right = box.x + label_w + 12, max(box.x + label_w + 60, box.right - note_w)
    top, bottom = box.y, box.bottom - 22
    ticks = nice_ticks(0, max(sum(bar.parts) for bar in bars), max_ticks, integer=integer)
    x = _Scale(ticks[0], ticks[-1], left, right)
    out = _x_grid(top, bottom, x, ticks, lambda t: tick_label(t, _step(ticks)))
    band = (bottom - top) / len(bars)
    height = min(band * 0.7, 26)
    for i, (bar, label) in enumerate(zip(bars, labels, strict=True)):
        middle = top + band * (i + 0.5)
        parts = [f"<g><title>{_esc(bar.tip)}</title>"]
        start = 0.0
        for value, colour in zip(bar.parts, colours, strict=False):
            if value > 0:
                parts.append(_rect(x(start), middle - height / 2, x(start + value) - x(start), height, colour))
            start += value
        parts.append(_text(left - 8, middle, label, size=12, anchor="end", fill=_INK, extra=' dy="0.35em"'))
        parts.append(_text(x(start) + 5, middle, bar.note, size=11, fill=_INK, extra=' dy="0.35em"'))
        out.append("".join(parts) + "</g>")
    out.append(_line(f"M{_f(left)} {_f(top)}V{_f(bottom)}", _AXIS))
    return out


def _chart_cost_by_model(data: ReportData) -> str:
    """Confirmed cost per model as bars, the unconfirmed (cut streams) stacked after it in orange."""
    box = _Box(14, 48, _W - 28, _H - 56)
    items = [(_clean(m), max(_num(c), 0.0), max(_num(u), 0.0)) for m, c, u in data.cost_by_model]
    if not any(c > 0 or u > 0 for _, c, u in items):
        return _svg("Cost by model", [_note(box, "no spend recorded")])
    if len(items) > _MAX_MODELS:
        rest = items[_MAX_MODELS - 1 :]
        others = (f"{len(rest)} others", sum(c for _, c, _ in rest), sum(u for _, _, u in rest))
        items = [*items[: _MAX_MODELS - 1], others]
    bars = [
        _Bar(
            label=m,
            parts=(c, u),
            note=_money(c) + (f" + {_money(u)}" if u > 0 else ""),
            tip=f"{m}: {_money(c)} confirmed" + (f", {_money(u)} unconfirmed" if u > 0 else ""),
        )
        for m, c, u in items
    ]
    body = _hbars(box, bars, (_BLUE, _ORANGE), _usd_tick, label_chars=30, max_ticks=7)
    if any(u > 0 for _, _, u in items):
        body += _legend(_W - 16, 20, [(_BLUE, "confirmed", "bar"), (_ORANGE, "unconfirmed (cut streams)", "bar")])
    return _svg("Cost by model", body)


def _chart_failures(data: ReportData) -> str:
    """Two panels: failed attempts by retry cause, failed requests by error type; ten biggest each."""
    half = (_W - 28) / 2
    body: list[str] = []
    panels = (
        ("Failed attempts by cause", data.retry_causes, _ORANGE, "no failed attempts"),
        ("Failed requests by error", data.failed_by_error, _RED, "no failed requests"),
    )
    for i, (title, counts, colour, empty) in enumerate(panels):
        box = _Box(14 + i * (half + 10), 10, half - 10, _H - 18)
        body.append(_panel_title(box, title))
        inner = _Box(box.x, box.y + 26, box.w, box.h - 26)
        items = sorted(((_clean(k), round(_num(v))) for k, v in counts.items()), key=lambda kv: (-kv[1], kv[0]))
        items = [(k, v) for k, v in items if v > 0][:_MAX_CAUSES]
        if not items:
            body.append(_note(inner, empty))
            continue
        bars = [_Bar(label=k, parts=(v,), note=_count(v), tip=f"{k}: {v:,}") for k, v in items]
        body += _hbars(inner, bars, (colour,), lambda t, _: _count(t), label_chars=18, max_ticks=5, integer=True)
    return _svg("Failures", body, show_title=False)


# --- spend over time -----------------------------------------------------------------------------


def downsample(count: int, limit: int = MAX_LINE_POINTS) -> list[int]:
    """Indices of at most ``limit`` evenly spread points out of ``count``, both ends kept."""
    if count <= limit:
        return list(range(count))
    return sorted({round(i * (count - 1) / (limit - 1)) for i in range(limit)})


def _steps(xs: Sequence[float], ys: Sequence[float], x: _Scale, y: _Scale) -> str:
    """A steps-post path: each value holds until the next point, as cumulative spend does."""
    parts = [f"M{_f(x(xs[0]))} {_f(y(ys[0]))}"]
    for xv, yv in zip(xs[1:], ys[1:], strict=True):
        parts.append(f"H{_f(x(xv))}V{_f(y(yv))}")
    return "".join(parts)


def _curve_points(curve: RunCurve) -> tuple[list[float], list[float], list[float] | None]:
    """A curve's finite points, at most ``MAX_LINE_POINTS`` of them."""
    n = min(len(curve.edges), len(curve.spent), *([len(curve.unconfirmed)] if curve.unconfirmed is not None else []))
    keep = downsample(n)
    xs = [_num(curve.edges[i]) for i in keep]
    ys = [_num(curve.spent[i]) for i in keep]
    extra = None if curve.unconfirmed is None else [_num(curve.unconfirmed[i]) for i in keep]
    return xs, ys, extra


def _utc(seconds: float) -> datetime:
    """Epoch seconds as a UTC time, clamped to the years datetime can hold (a corrupt ledger must not raise)."""
    return datetime.fromtimestamp(min(max(seconds, -62_135_596_800), 253_402_300_799), UTC)


def _time_ticks(t0: float, t1: float) -> tuple[list[float], list[list[str]]]:
    """Clock ticks (epoch seconds) inside ``[t0, t1]``, at most 7, and their labels (a date under a new day)."""
    span = t1 - t0
    step = next((s for s in _TIME_STEPS if span / s <= 6), float(math.ceil(span / 6 / 86400) * 86400) or 1.0)
    ticks = [k * step for k in range(math.ceil(t0 / step - 1e-9), math.floor(t1 / step + 1e-9) + 1)] or [t0]
    labels: list[list[str]] = []
    last_day = ""
    for tick in ticks:
        when = _utc(tick)
        day = f"{when:%b} {when.day}"
        if step >= 30 * 86400:
            labels.append([f"{when:%Y-%m-%d}"])
        elif step >= 86400:
            labels.append([day])
        else:
            clock = f"{when:%H:%M:%S}" if step < 60 else f"{when:%H:%M}"
            labels.append([clock, day] if day != last_day else [clock])
        last_day = day
    return ticks, labels


def _chart_spend(data: ReportData) -> str:
    """One run: cumulative spend against the UTC clock.  Several: one line per run against time since its start."""
    if data.spend_single is not None and min(len(data.spend_single.edges), len(data.spend_single.spent)) > 0:
        return _spend_single(data.spend_single)
    runs = [curve for curve in data.spend_runs[: len(_PALETTE)] if min(len(curve.edges), len(curve.spent)) > 0]
    if runs:
        return _spend_runs(runs, max(data.run_count, len(data.spend_runs)))
    return _svg("Cumulative spend", [_note(_Box(14, 48, _W - 28, _H - 56), "no timestamps recorded")])


def _spend_single(curve: RunCurve) -> str:
    xs_us, ys, cut = _curve_points(curve)
    xs = [v / 1e6 for v in xs_us]
    t0, t1 = min(xs), max(xs)
    if t1 - t0 < 1e-6:
        t0, t1 = t0 - 0.5, t1 + 0.5  # a single moment: half a second either side
    tops = ys if cut is None else [a + b for a, b in zip(ys, cut, strict=True)]
    ticks = nice_ticks(0, max([*ys, *tops]), 6)
    left, right, top, bottom = _left_margin(ticks, _usd_tick), _W - 24, 48, _H - 50
    x, y = _Scale(t0, t1, left, right), _Scale(ticks[0], ticks[-1], bottom, top)
    body = _y_grid(left, right, y, ticks, lambda t: _usd_tick(t, _step(ticks)))
    time_ticks, time_labels = _time_ticks(t0, t1)
    for tick, lines in zip(time_ticks, time_labels, strict=True):
        body.append(_line(f"M{_f(x(tick))} {_f(bottom)}v5", _AXIS))
        body += [_text(x(tick), bottom + 17 + 13 * i, text, size=11, anchor="middle") for i, text in enumerate(lines)]
    line = _steps(xs, ys, x, y)
    body.append(f'<path d="{line}V{_f(y(ticks[0]))}H{_f(x(xs[0]))}Z" fill="{_BLUE}" fill-opacity="0.08"/>')
    total = f"{_money(ys[-1])} confirmed by {_utc(xs[-1]):%Y-%m-%d %H:%M:%S} UTC"
    body.append(f"<g><title>{_esc(total)}</title>{_line(line, _BLUE, 2)}</g>")
    if cut is not None:
        body.append(_line(_steps(xs, tops, x, y), _ORANGE, 1.5, ' stroke-dasharray="6 4"'))
        body += _legend(_W - 16, 20, [(_BLUE, "confirmed", "line"), (_ORANGE, "+ unconfirmed", "6 4")])
    body.append(_line(f"M{left} {_f(bottom)}H{right}", _AXIS))
    body.append(_text((left + right) / 2, _H - 8, "time (UTC)", size=11, anchor="middle"))
    return _svg("Cumulative spend", body)


def _spend_runs(runs: Sequence[RunCurve], run_count: int) -> str:
    points = [_curve_points(curve) for curve in runs]
    longest = max(max(xs) for xs, _, _ in points)
    unit, scale = ("minutes", 60.0) if longest < 2 * 3600 else ("hours", 3600.0)
    x_ticks = nice_ticks(0, longest / scale, 8)
    y_ticks = nice_ticks(0, max(max(ys) for _, ys, _ in points), 6)
    left, right, top, bottom = _left_margin(y_ticks, _usd_tick), _W - 24, 48, _H - 50
    x = _Scale(x_ticks[0], x_ticks[-1], left, right)
    y = _Scale(y_ticks[0], y_ticks[-1], bottom, top)
    body = _y_grid(left, right, y, y_ticks, lambda t: _usd_tick(t, _step(y_ticks)))
    x_decimals = _decimals(_step(x_ticks))
    for tick in x_ticks:
        body.append(_line(f"M{_f(x(tick))} {_f(bottom)}v5", _AXIS))
        body.append(_text(x(tick), bottom + 17, f"{tick:,.{x_decimals}f}", size=11, anchor="middle"))
    body.append(_line(f"M{left} {_f(bottom)}H{right}", _AXIS))
    body.append(_text((left + right) / 2, _H - 8, f"{unit} since the run started", size=11, anchor="middle"))
    legend_y = top + 10
    if run_count > len(runs):
        body.append(_text(left + 10, legend_y, f"the {len(runs)} costliest of {run_count} runs", size=11))
        legend_y += 16
    for colour, curve, (xs, ys, _) in zip(_PALETTE, runs, points, strict=False):
        label = _clean(curve.label)
        tip = f"{label}: {_money(ys[-1])}"
        path = _line(_steps([v / scale for v in xs], ys, x, y), colour, 1.8)
        key = _line(f"M{_f(left + 10)} {_f(legend_y)}h16", colour, 2.5)
        text = _text(left + 32, legend_y + 4, _short(label, 44), size=11, fill=_INK)
        body.append(f"<g><title>{_esc(tip)}</title>{path}{key}{text}</g>")
        legend_y += 15
    return _svg("Cumulative spend per run", body)


# --- latency -------------------------------------------------------------------------------------


def _chart_latency(data: ReportData) -> str:
    """Two histograms side by side: whole-request latency and time to first token, with percentile lines."""
    half = (_W - 28) / 2
    body = _histogram(_Box(14, 10, half - 10, _H - 18), "Request latency", data.latency, _BLUE, "requests")
    body += _histogram(_Box(14 + half + 10, 10, half - 10, _H - 18), "Time to first token", data.ttft, _ORANGE, None)
    return _svg("Latency", body, show_title=False)


def _bins(hist: Histogram) -> tuple[list[float], list[int]]:
    """Usable edges and counts, at most ``_MAX_BINS`` bins (neighbours merged): a bounded chart for any input."""
    n = min(len(hist.counts), len(hist.edges) - 1)
    if n <= 0:
        return [], []
    group = math.ceil(n / _MAX_BINS)
    edges = [_num(hist.edges[i]) for i in range(0, n, group)] + [_num(hist.edges[n])]
    counts = [sum(max(round(_num(c)), 0) for c in hist.counts[i : min(i + group, n)]) for i in range(0, n, group)]
    return edges, counts


def _histogram(box: _Box, title: str, hist: Histogram | None, colour: str, y_label: str | None) -> list[str]:
    out = [_panel_title(box, title)]
    edges, counts = _bins(hist) if hist is not None else ([], [])
    if hist is None or not edges:
        return [*out, _note(_Box(box.x, box.y + 26, box.w, box.h - 26), "none recorded")]
    lo, hi = min(0.0, edges[0]), max(edges[-1], edges[0])
    if hi - lo < 1e-12:
        hi = lo + 1.0
    y_ticks = nice_ticks(0, max(counts), 5, integer=True)
    gutter = max(_width(_count(t), 11) for t in y_ticks) + (24 if y_label is not None else 8)
    left, right, top, bottom = box.x + gutter, box.right - 8, box.y + 30, box.bottom - 30
    slack = (hi - lo) * 1e-9
    x_ticks = [t for t in nice_ticks(lo, hi, 6) if lo - slack <= t <= hi + slack]
    x, y = _Scale(lo, hi, left, right), _Scale(0, y_ticks[-1], bottom, top)
    out += _y_grid(left, right, y, y_ticks, _count)
    decimals = _decimals(_step(x_ticks))
    for tick in x_ticks:
        out.append(_line(f"M{_f(x(tick))} {_f(bottom)}v5", _AXIS))
        out.append(_text(x(tick), bottom + 16, f"{tick:.{decimals}f}", size=11, anchor="middle"))
    gap = 0.6 if (right - left) / len(counts) > 3 else 0.0
    for a, b, k in zip(edges, edges[1:], counts, strict=False):
        if k > 0:
            tip = f"{a:.3g}–{b:.3g} s: {k:,}"
            out.append(_rect(x(a), y(k), x(b) - x(a) - gap, y(0) - y(k), colour, tip))
    out.append(_line(f"M{_f(left)} {_f(bottom)}H{_f(right)}", _AXIS))
    legend: list[tuple[str, str, str]] = []
    for (q, value), dash in zip(sorted(hist.percentiles.items()), ("line", "4 3", "1.5 2.5"), strict=False):
        at = _num(value)
        if at == value and lo <= at <= hi:  # a missing or non-finite percentile is not drawn
            extra = "" if dash == "line" else f' stroke-dasharray="{dash}"'
            out.append(_line(f"M{_f(x(at))} {_f(top)}V{_f(bottom)}", _INK, 1, extra))
            legend.append((_INK, f"p{q} {_seconds(at)}", dash))
    for i, (ink, label, dash) in enumerate(legend):
        out += _legend(right - 2, top + 6 + 15 * i, [(ink, label, dash)])
    out.append(_text((left + right) / 2, box.bottom - 2, f"seconds ({_count(hist.values)} rows)", anchor="middle"))
    if y_label is not None:
        middle = (top + bottom) / 2
        out.append(
            _text(
                box.x + 8,
                middle,
                y_label,
                anchor="middle",
                extra=f' transform="rotate(-90 {_f(box.x + 8)} {_f(middle)})"',
            )
        )
    return out


# --- cost by day ---------------------------------------------------------------------------------


def _day_label(day: str, same_year: bool) -> str:
    """``Mar 1`` when every day is in one year (the year goes under the axis), else the ISO date."""
    try:
        when = datetime.strptime(day, "%Y-%m-%d")
    except ValueError:
        return _short(day, 12)
    return f"{when:%b} {when.day}" if same_year else day


def _chart_cost_by_day(data: ReportData) -> str:
    """Confirmed cost per UTC day as columns; more than ``_MAX_DAYS`` days are grouped into runs of days."""
    box = _Box(14, 48, _W - 28, _H - 56)
    days = [(_clean(d), max(_num(c), 0.0)) for d, c in data.cost_by_day]
    if not any(c > 0 for _, c in days):
        return _svg("Cost by day (UTC)", [_note(box, "no spend recorded")])
    group = math.ceil(len(days) / _MAX_DAYS)
    columns = [
        (chunk[0][0], chunk[-1][0], sum(c for _, c in chunk))
        for chunk in (days[i : i + group] for i in range(0, len(days), group))
    ]
    years = {d[:4] for d, _ in days}
    same_year = len(years) == 1 and all(re.fullmatch(r"\d{4}-\d\d-\d\d", d) for d, _ in days)
    ticks = nice_ticks(0, max(c for _, _, c in columns), 6)
    left, right, top, bottom = _left_margin(ticks, _usd_tick), _W - 20, 48, _H - 50
    x = _Scale(0, len(columns), left, right)
    y = _Scale(ticks[0], ticks[-1], bottom, top)
    body = _y_grid(left, right, y, ticks, lambda t: _usd_tick(t, _step(ticks)))
    band = (right - left) / len(columns)
    every = math.ceil(len(columns) / 12)
    for i, (first, last, cost) in enumerate(columns):
        span = first if first == last else f"{first} – {last}"
        width = min(band * 0.72, 64)
        bar = _rect(x(i + 0.5) - width / 2, y(cost), width, y(0) - y(cost), _BLUE, f"{span}: {_money(cost)}")
        body.append(bar)
        if len(columns) <= 12 and cost > 0:
            body.append(_text(x(i + 0.5), y(cost) - 4, _money(cost), size=9.5, anchor="middle", fill=_INK))
        if i % every == 0:
            body.append(_text(x(i + 0.5), bottom + 16, _day_label(first, same_year), size=11, anchor="middle"))
    body.append(_line(f"M{left} {_f(bottom)}H{right}", _AXIS))
    axis = f"UTC day, {years.pop()}" if same_year else "UTC day"
    if group > 1:
        axis += f" ({group} days a column)"
    body.append(_text((left + right) / 2, _H - 8, axis, size=11, anchor="middle"))
    return _svg("Cost by day (UTC)", body)
