"""The report page: one self-contained HTML file with headline cards, charts and the summary table.

It renders a ``ReportData`` (aggregates only), so the page is small and quick over a million-row
ledger; the charts come from ``charts`` as hand-written inline SVG: no script, no external URL.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from .charts import render_charts
from .data import ALL, ReportData, format_value

__all__ = ["render_html"]

_MAX_HTML_ROWS = 500  # summary rows shown on the page; the CSV and Parquet have them all

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


def render_html(data: ReportData) -> str:
    """One self-contained page: inline CSS and SVG, no script, no external URL."""
    totals = data.totals
    charts = render_charts(data)
    if data.first_start_us is not None and data.last_end_us is not None:
        span = f"{_when_us(data.first_start_us)} → {_when_us(data.last_end_us)} UTC"
    else:
        span = "no rows"
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
            "Possibly billed",
            _usd(totals.get("possibly_billed_usd") or 0.0),
            f"{int(totals.get('possibly_billed_attempts') or 0):,} attempts in flight when a run died (worst case)",
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
        "Costs are the API's own numbers, summed exactly (compensated summation). Spend, tokens and attempts "
        "count every ledger row (a prompt retried on resume was billed each time); requests, ok and failed "
        "count the latest row per prompt, sample and run directory.",
        "Unconfirmed: attempts cut before the usage chunk arrived; they may or may not have been billed and are "
        "never added to the total.",
        "Percentiles are exact, with linear interpolation between order statistics (numpy's default). Tokens "
        "per second: completion tokens over request latency, ok rows.",
    ]
    if estimated:
        prices = ", ".join(f"{m}: ${p * 1e6:,.4f}/1M tokens" for m, p in sorted(data.prices.items()))
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
    if data.skipped:
        where = ", ".join(f"{s.ledger}:{s.line} ({s.reason})" for s in data.skipped[:10])
        more = f" and {len(data.skipped) - 10} more" if len(data.skipped) > 10 else ""
        note_html += (
            f'\n<li class="warn">{len(data.skipped):,} unreadable ledger lines were skipped: '
            f"{html.escape(where + more)}.</li>"
        )
    ledger_list = ", ".join(html.escape(str(p.parent)) for p in data.ledgers[:5])
    if len(data.ledgers) > 5:
        ledger_list += f" and {len(data.ledgers) - 5} more"
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M")
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
<p class="sub">{html.escape(span)} · {ledger_list} · generated {html.escape(generated)} UTC</p>
<section class="cards">
{card_html}
</section>
<h2>Charts</h2>
<section class="charts">
{chart_html}
</section>
{_html_tables(data)}
<h2>Notes</h2>
<ul class="notes">
{note_html}
</ul>
</main>
</body>
</html>
"""


def _html_tables(data: ReportData) -> str:
    """The ``by`` groups with the totals; then, when the data spans days, the days with the totals."""
    rows = data.summary
    groups = _html_table([r for r in rows if r["level"] != "day"], data.by)
    out = f'<h2>Summary</h2>\n<div class="tablewrap">{groups}</div>'
    if any(r["level"] == "day" for r in rows) and "day" not in data.by:
        days = _html_table([r for r in rows if r["level"] != "group"], ["day"])
        out += f'\n<h2>By day (UTC)</h2>\n<div class="tablewrap">{days}</div>'
    return out


_SHOWN = (
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
)


def _html_table(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> str:
    keys = list(keys) or ["level"]  # no grouping: one row, the totals
    hidden = 0
    if len(rows) > _MAX_HTML_ROWS:
        hidden = len(rows) - _MAX_HTML_ROWS
        rows = [*rows[: _MAX_HTML_ROWS - 1], rows[-1]]
    head = "".join(f'<th class="key">{html.escape(k if k != "level" else "")}</th>' for k in keys)
    head += "".join(f"<th>{html.escape(label)}</th>" for _, label, _ in _SHOWN)
    body = []
    for r in rows:
        level = str(r["level"])
        cells = "".join(_key_cell("TOTAL" if level == "total" and i == 0 else str(r[k])) for i, k in enumerate(keys))
        cells += "".join(f"<td>{format_value(fmt, r[name])}</td>" for name, _, fmt in _SHOWN)
        body.append(f'<tr class="{level}">{cells}</tr>')
    more = f'<p class="notes">&nbsp;{hidden:,} rows not shown; see summary.csv.</p>' if hidden else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{more}"


def _key_cell(value: str) -> str:
    if value == ALL:
        return '<td class="key all">all</td>'
    return f'<td class="key">{html.escape(value)}</td>'


def _usd(value: float | int) -> str:
    return f"${value:,.6f}"


def _when_us(micros: int) -> str:
    return datetime.fromtimestamp(micros / 1e6, UTC).strftime("%Y-%m-%d %H:%M")


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"
