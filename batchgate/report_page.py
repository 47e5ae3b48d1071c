"""The report page: one self-contained HTML file with headline cards, charts and the summary table.

Charts are matplotlib figures inlined as SVG (Agg backend, no script, no external URL) and plot
aggregates (binned, per model, per cause), never every row, so the page stays small and quick to
open over a million-row ledger.  Kept apart from :mod:`batchgate.reports` so the numbers do not
depend on (or import) a plotting library.
"""

from __future__ import annotations

import html
import io
import itertools
import math
import warnings
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

from batchgate.reports import _PCTS, ALL, NONE, _fmt, _Loaded, _missing, _retry_causes

__all__ = ["render_html"]

_MAX_HTML_ROWS = 500  # summary rows shown on the page; the CSV and Parquet have them all


# -- HTML --------------------------------------------------------------------------------------------

_CSS = """
:root { color-scheme: light; --ink: #1d2430; --muted: #5d6776; --line: #e3e7ee; --accent: #2f6fdf; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: var(--ink); background: #f6f7fa; }
main { max-width: 1180px; margin: 0 auto; padding: 28px 24px 48px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 32px 0 12px; }
.sub { color: var(--muted); margin: 0 0 20px; font-size: 13px; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(165px, 1fr)); gap: 12px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 12px 14px; }
.card .label { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .value { font-size: 21px; font-weight: 650; margin-top: 2px; font-variant-numeric: tabular-nums; }
.card .detail { color: var(--muted); font-size: 12px; margin-top: 2px; }
.card.primary .value { color: var(--accent); }
.est { display: inline-block; font-size: 11px; font-weight: 600; color: #8a5a00; background: #fff3d6;
       border-radius: 4px; padding: 0 5px; margin-left: 4px; vertical-align: middle; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(480px, 1fr)); gap: 14px; }
figure.chart { margin: 0; background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 10px; }
figure.chart svg { width: 100%; height: auto; display: block; }
figure.chart figcaption { color: var(--muted); font-size: 12px; padding: 2px 6px 0; }
.tablewrap { overflow-x: auto; background: #fff; border: 1px solid var(--line); border-radius: 10px; }
table { border-collapse: collapse; width: 100%; font-size: 12px; font-variant-numeric: tabular-nums; }
th, td { padding: 6px 8px; border-bottom: 1px solid var(--line); white-space: nowrap; }
th { background: #fafbfc; text-align: right; font-weight: 600; color: var(--muted); position: sticky; top: 0; }
td { text-align: right; }
th.key, td.key { text-align: left; }
td.key { white-space: normal; max-width: 17em; overflow-wrap: anywhere; }
td.all { color: #a3abb8; }
tr.total td { font-weight: 650; background: #f2f6ff; }
tr.day td { background: #fcfcfd; }
.notes { color: var(--muted); font-size: 12.5px; }
.notes li { margin: 3px 0; }
.warn { color: #8a3b00; }
"""


def render_html(loaded: _Loaded, summary: pd.DataFrame, by: Sequence[str], totals: dict[str, float | int]) -> str:
    """One self-contained page: inline CSS and SVG, no script, no external URL."""
    frame = loaded.frame
    charts = _charts(frame, totals)
    started = frame["started_at"].min() if len(frame) else None
    ended = frame["finished_at"].fillna(frame["started_at"]).max() if len(frame) else None
    span = f"{_when(started)} → {_when(ended)} UTC" if started is not None and not pd.isna(started) else "no rows"
    estimated = bool(totals["unconfirmed_estimated_usd"])
    cards = [
        ("primary", "Total cost", _usd(totals["total_cost_usd"]), "confirmed by the API's usage"),
        (
            "",
            "Unconfirmed",
            _usd(totals["unconfirmed_cost_usd"]) + ('<span class="est">incl. estimate</span>' if estimated else ""),
            f"{int(totals['unconfirmed_completion_tokens']):,} tokens of cut streams, not in total",
        ),
        (
            "",
            "Requests",
            f"{int(totals['ok']):,} ok",
            f"{int(totals['failed']):,} failed · {int(totals['requests']):,} in all",
        ),
        (
            "",
            "Tokens",
            f"{int(totals['total_tokens']):,}",
            f"{int(totals['prompt_tokens']):,} prompt · {int(totals['completion_tokens']):,} completion",
        ),
        (
            "",
            "Wall time",
            _duration(float(totals["wall_s"])),
            f"{int(totals['runs']):,} run{'s' if totals['runs'] != 1 else ''} "
            f"· {int(totals['ledgers']):,} ledger{'s' if totals['ledgers'] != 1 else ''}",
        ),
        (
            "",
            "Retries",
            f"{int(totals['retries']):,}",
            f"{int(totals['attempts']):,} attempts · {int(totals['rate_limited']):,} rate limited",
        ),
    ]
    card_html = "\n".join(
        f'<div class="card {cls}"><div class="label">{html.escape(label)}</div>'
        f'<div class="value">{value}</div><div class="detail">{html.escape(detail)}</div></div>'
        for cls, label, value, detail in cards
    )
    chart_html = "\n".join(
        f'<figure class="chart" id="chart-{name}">{svg}<figcaption>{html.escape(caption)}</figcaption></figure>'
        for name, svg, caption in charts
    )
    notes = [
        "Costs are the API's own numbers, summed exactly (math.fsum). Spend, tokens and attempts count every "
        "ledger row (a prompt retried on resume was billed each time); requests, ok and failed count the "
        "latest row per prompt and run directory.",
        "Unconfirmed: attempts cut before the usage chunk arrived; they may or may not have been billed and are "
        "never added to the total.",
        "Percentiles use linear interpolation between order statistics (numpy's default). Tokens per second: "
        "completion tokens over request latency, ok rows.",
    ]
    if estimated:
        prices = ", ".join(f"{m}: ${p * 1e6:,.4f}/1M tokens" for m, p in sorted(loaded.prices.items()))
        notes.append(
            f"Estimate: {_usd(totals['unconfirmed_estimated_usd'])} of unconfirmed cost was priced by this report "
            f"from each model's confirmed rows ({prices})."
        )
    if totals["unconfirmed_unpriced_tokens"]:
        notes.append(
            f"{int(totals['unconfirmed_unpriced_tokens']):,} unconfirmed tokens belong to models with no confirmed "
            "row to learn a price from; they are not priced."
        )
    note_html = "\n".join(f"<li>{html.escape(n)}</li>" for n in notes)
    if totals["skipped_lines"]:
        skipped = int(totals["skipped_lines"])
        note_html += f'\n<li class="warn">{skipped:,} unreadable ledger lines were skipped.</li>'
    ledger_list = ", ".join(html.escape(str(p.parent)) for p in loaded.ledgers[:5])
    if len(loaded.ledgers) > 5:
        ledger_list += f" and {len(loaded.ledgers) - 5} more"
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>batchgate report · {html.escape(_usd(totals["total_cost_usd"]))}</title>
<style>{_CSS}</style>
</head>
<body>
<main>
<h1>batchgate cost report</h1>
<p class="sub">{html.escape(span)} · {ledger_list} · generated {html.escape(_when(datetime.now(UTC)))} UTC</p>
<section class="cards">
{card_html}
</section>
<h2>Charts</h2>
<section class="charts">
{chart_html}
</section>
{_html_tables(summary, by)}
<h2>Notes</h2>
<ul class="notes">
{note_html}
</ul>
</main>
</body>
</html>
"""


def _html_tables(summary: pd.DataFrame, by: Sequence[str]) -> str:
    """The ``by`` groups with the totals; then, when the data spans days, the days with the totals."""
    level = summary["level"]
    out = f'<h2>Summary</h2>\n<div class="tablewrap">{_html_table(summary[level != "day"], list(by))}</div>'
    if (level == "day").any() and "day" not in by:
        days = _html_table(summary[level != "group"], ["day"])
        out += f'\n<h2>By day (UTC)</h2>\n<div class="tablewrap">{days}</div>'
    return out


def _html_table(rows: pd.DataFrame, keys: list[str]) -> str:
    keys = keys or ["level"]  # no grouping: one row, the totals
    shown = [
        ("requests", "requests", "{:,}"),
        ("failed", "failed", "{:,}"),
        ("retries", "retries", "{:,}"),
        ("total_tokens", "tokens", "{:,}"),
        ("total_cost_usd", "cost $", "{:,.6f}"),
        ("unconfirmed_cost_usd", "unconf. $", "{:,.6f}"),
        ("cost_per_1m_tokens_usd", "$/1M tok", "{:,.4f}"),
        ("latency_p50_s", "p50 s", "{:.2f}"),
        ("latency_p95_s", "p95 s", "{:.2f}"),
        ("latency_p99_s", "p99 s", "{:.2f}"),
        ("ttft_p50_s", "ttft p50", "{:.2f}"),
        ("tokens_per_s", "tok/s", "{:,.0f}"),
    ]
    hidden = 0
    if len(rows) > _MAX_HTML_ROWS:
        hidden = len(rows) - _MAX_HTML_ROWS
        rows = pd.concat([rows.head(_MAX_HTML_ROWS - 1), rows.tail(1)])
    head = "".join(f'<th class="key">{html.escape(k if k != "level" else "")}</th>' for k in keys)
    head += "".join(f"<th>{html.escape(label)}</th>" for _, label, _ in shown)
    body = []
    for _, r in rows.iterrows():
        level = str(r["level"])
        cells = "".join(_key_cell("TOTAL" if level == "total" and i == 0 else str(r[k])) for i, k in enumerate(keys))
        cells += "".join(f"<td>{_fmt(fmt, r[name])}</td>" for name, _, fmt in shown)
        body.append(f'<tr class="{level}">{cells}</tr>')
    more = f'<p class="notes">&nbsp;{hidden:,} rows not shown; see summary.csv.</p>' if hidden else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{more}"


def _key_cell(value: str) -> str:
    if value == ALL:
        return '<td class="key all">all</td>'
    return f'<td class="key">{html.escape(value)}</td>'


def _usd(value: float | int) -> str:
    return f"${value:,.6f}"


def _when(value: Any) -> str:
    return str(pd.Timestamp(value).strftime("%Y-%m-%d %H:%M"))


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


# -- charts ------------------------------------------------------------------------------------------

_BLUE, _ORANGE, _GREY, _RED = "#2f6fdf", "#f0a030", "#9aa3b0", "#d0453a"


def _charts(frame: pd.DataFrame, totals: dict[str, float | int]) -> list[tuple[str, str, str]]:
    """(id, inline SVG, caption) per chart; every chart plots binned aggregates, never one mark per row."""
    import matplotlib  # deferred: only the HTML report needs it

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
            out.append((name, _svg(draw, frame), caption))
        if totals["days"] > 1:
            out.append(("cost-by-day", _svg(_chart_cost_by_day, frame), "Confirmed cost per UTC day."))
    return out


def _svg(draw: Callable[[Any, pd.DataFrame], None], frame: pd.DataFrame) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.2, 3.6), dpi=100, layout="constrained")
    draw(fig, frame)
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    text = buffer.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog and DOCTYPE (it names an external DTD)


def _label(text: Any) -> str:
    """Ledger text as a literal matplotlib label: a ``$`` would otherwise start mathtext."""
    value = NONE if _missing(text) else str(text)
    value = value if len(value) <= 38 else value[:37] + "…"
    return value.replace("$", r"\$")


def _empty(ax: Any, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color=_GREY, fontsize=11)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


def _chart_cost_by_model(fig: Any, frame: pd.DataFrame) -> None:
    ax = fig.add_subplot()
    ax.set_title("Cost by model")
    spend = pd.DataFrame(
        {
            "confirmed": frame["total_cost_usd"].fillna(0.0),
            "unconfirmed": frame["unconfirmed_cost_usd"].fillna(0.0) + frame["unconfirmed_estimate_usd"].fillna(0.0),
        }
    )
    # Bar lengths: float sums are plenty (the summary table has the exact ones).
    by_model = spend.groupby(frame["model"], observed=True, dropna=False).sum()
    by_model.index = pd.Index([NONE if _missing(m) else str(m) for m in by_model.index])
    by_model = by_model.sort_values("confirmed", ascending=False)
    if by_model.empty or not (by_model.to_numpy() > 0).any():
        _empty(ax, "no spend recorded")
        return
    if len(by_model) > 12:
        rest = by_model.iloc[11:].sum()
        by_model = pd.concat([by_model.iloc[:11], pd.DataFrame([rest], index=[f"{len(by_model) - 11} others"])])
    by_model = by_model.iloc[::-1]
    labels = [_label(m) for m in by_model.index]
    y = np.arange(len(by_model))
    ax.barh(y, by_model["confirmed"], color=_BLUE, label="confirmed")
    has_unconfirmed = bool((by_model["unconfirmed"] > 0).any())
    if has_unconfirmed:
        ax.barh(
            y,
            by_model["unconfirmed"],
            left=by_model["confirmed"],
            color=_ORANGE,
            hatch="///",
            edgecolor="white",
            linewidth=0,
            label="unconfirmed (cut streams)",
        )
    ax.set_yticks(y, labels)
    ax.grid(axis="y", visible=False)
    widest = float((by_model["confirmed"] + by_model["unconfirmed"]).max())
    for yi, (c, u) in enumerate(zip(by_model["confirmed"], by_model["unconfirmed"], strict=True)):
        text = _money(c) + (f" + {_money(u)}" if u > 0 else "")
        ax.text(c + u + widest * 0.01, yi, text, va="center", fontsize=8.5, color="#333")
    ax.set_xlim(0, widest * (1.45 if has_unconfirmed else 1.3))
    ax.xaxis.set_major_formatter(_usd_axis())
    if has_unconfirmed:
        fig.legend(loc="outside lower center", ncols=2, frameon=False, fontsize=8)


def _chart_spend(fig: Any, frame: pd.DataFrame) -> None:
    """One run: cumulative spend against the clock.  Several: one line per run against time since its start."""
    ax = fig.add_subplot()
    ends = frame["finished_at"].fillna(frame["started_at"])
    when = ends.to_numpy(dtype="datetime64[us]", na_value=np.datetime64("NaT"))
    valid = ~np.isnat(when)
    if not valid.any():
        ax.set_title("Cumulative spend")
        _empty(ax, "no timestamps recorded")
        return
    micros = when.astype(np.int64)
    confirmed = frame["total_cost_usd"].fillna(0.0).to_numpy(dtype=np.float64)
    unconfirmed = frame["unconfirmed_cost_usd"].fillna(0.0).to_numpy(dtype=np.float64) + frame[
        "unconfirmed_estimate_usd"
    ].fillna(0.0).to_numpy(dtype=np.float64)
    runs = frame.groupby(["ledger", "run_id"], observed=True, dropna=False, sort=False).ngroup().to_numpy()
    if len(np.unique(runs[valid])) <= 1:
        _spend_single(ax, micros[valid], confirmed[valid], unconfirmed[valid])
    else:
        starts = frame["started_at"].fillna(ends).to_numpy(dtype="datetime64[us]").astype(np.int64)
        names = frame["run_id"].astype(object).fillna(NONE).to_numpy()
        _, runs = np.unique(runs[valid], return_inverse=True)
        _spend_per_run(ax, runs, names[valid], starts[valid], micros[valid], confirmed[valid])
    ax.set_ylabel("USD")
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_formatter(_usd_axis())


def _binned_cumsum(micros: np.ndarray, weights: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    edges = np.linspace(lo, max(hi, lo + 1), 301)
    spent, _ = np.histogram(micros, bins=edges, weights=weights)
    return edges, np.concatenate([[0.0], np.cumsum(spent)])


def _spend_single(ax: Any, micros: np.ndarray, confirmed: np.ndarray, unconfirmed: np.ndarray) -> None:
    import matplotlib.dates as mdates

    ax.set_title("Cumulative spend")
    lo, hi = int(micros.min()), int(micros.max())
    edges, y = _binned_cumsum(micros, confirmed, lo, hi)
    x = edges.astype(np.int64).astype("datetime64[us]")
    ax.plot(x, y, color=_BLUE, linewidth=2, label="confirmed", drawstyle="steps-post")
    ax.fill_between(x, y, step="post", color=_BLUE, alpha=0.08)
    if unconfirmed.any():
        _, cut = _binned_cumsum(micros, unconfirmed, lo, hi)
        ax.plot(x, y + cut, color=_ORANGE, linewidth=1.4, linestyle="--", label="+ unconfirmed", drawstyle="steps-post")
        ax.legend(loc="upper left", frameon=False, fontsize=8.5)
    locator = mdates.AutoDateLocator(maxticks=7)  # type: ignore[no-untyped-call]
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]


def _spend_per_run(
    ax: Any, runs: np.ndarray, names: np.ndarray, starts: np.ndarray, micros: np.ndarray, confirmed: np.ndarray
) -> None:
    ax.set_title("Cumulative spend per run")
    run_count = int(runs.max()) + 1
    spend = np.bincount(runs, weights=confirmed, minlength=run_count)
    shown = sorted(np.argsort(-spend, kind="stable")[:8].tolist())
    palette = (_BLUE, _ORANGE, "#3aa676", "#8e5bd6", _RED, "#2bb0c4", "#b5894a", _GREY)
    curves = []
    for run in shown:
        rows = runs == run
        begin = int(min(starts[rows].min(), micros[rows].min()))  # NaT starts were filled with finishes
        elapsed = micros[rows] - begin
        edges, y = _binned_cumsum(elapsed, confirmed[rows], 0, int(elapsed.max()))
        when = str(np.datetime64(begin, "us").astype("datetime64[m]")).replace("T", " ")
        curves.append((edges / 3.6e9, y, _label(f"{names[rows][0]} · {when}")))
    longest = max(float(hours[-1]) for hours, _, _ in curves)
    unit, scale = ("minutes", 60.0) if longest < 2 else ("hours", 1.0)
    for colour, (hours, y, label) in zip(palette, curves, strict=False):
        ax.plot(hours * scale, y, color=colour, linewidth=1.6, drawstyle="steps-post", label=label)
    ax.set_xlim(left=0)
    ax.set_xlabel(f"{unit} since the run started")
    title = None if run_count <= len(shown) else f"the {len(shown)} costliest of {run_count} runs"
    ax.legend(loc="upper left", frameon=False, fontsize=7.5, title=title, title_fontsize=7.5)


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


def _chart_latency(fig: Any, frame: pd.DataFrame) -> None:
    left, right = fig.subplots(1, 2)
    _histogram(left, "Request latency", frame["latency_s"], _BLUE)
    _histogram(right, "Time to first token", frame["ttft_s"], _ORANGE)
    left.set_ylabel("requests")


def _histogram(ax: Any, title: str, column: pd.Series, colour: str) -> None:
    """60 bins up to p99.5; slower values pile into the last bin, so a few outliers cannot flatten it."""
    ax.set_title(title, fontsize=10)
    values = column.dropna().to_numpy(dtype=np.float64)
    if not len(values):
        _empty(ax, "none recorded")
        return
    top = float(np.percentile(values, 99.5))
    top = top if top > 0 else float(values.max()) or 1.0
    counts, edges = np.histogram(np.clip(values, 0, top), bins=np.linspace(0, top, 61))
    ax.stairs(counts, edges, fill=True, color=colour, alpha=0.85)
    for q, value, style in zip(_PCTS, np.percentile(values, _PCTS), ("-", "--", ":"), strict=True):
        if value <= top:
            ax.axvline(value, color="#333", linewidth=0.9, linestyle=style, label=f"p{q} {value:.2f}s")
    ax.set_xlabel(f"seconds ({len(values):,} rows)")
    ax.set_xlim(0, top * 1.02)
    ax.grid(axis="x", visible=False)
    ax.legend(loc="upper right", frameon=False, fontsize=7.5, handlelength=1.6)


def _chart_failures(fig: Any, frame: pd.DataFrame) -> None:
    left, right = fig.subplots(1, 2)
    causes = _retry_causes(frame)
    _bars(left, "Failed attempts by cause", causes, _ORANGE, "no failed attempts")
    failed = frame[frame["latest"] & (frame["status"] == "failed")]
    kinds = failed["error_type"].astype(object).fillna("unknown").value_counts().to_dict()
    _bars(right, "Failed requests by error", {str(k): int(v) for k, v in kinds.items()}, _RED, "no failed requests")


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


def _chart_cost_by_day(fig: Any, frame: pd.DataFrame) -> None:
    ax = fig.add_subplot()
    ax.set_title("Cost by day (UTC)")
    days = frame.groupby("day", observed=True)["total_cost_usd"].agg(lambda s: math.fsum(s.fillna(0.0)))
    x = np.arange(len(days))
    ax.bar(x, days.to_numpy(), color=_BLUE)
    step = max(1, len(days) // 12)
    ax.set_xticks(x[::step], [str(d) for d in days.index[::step]], rotation=30, ha="right")
    ax.grid(axis="x", visible=False)
    ax.yaxis.set_major_formatter(_usd_axis())
