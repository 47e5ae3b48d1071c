"""The terminal table: the costliest groups and the totals, fitted to the terminal's width."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .data import ReportData, format_value

__all__ = ["text_table"]

_MAX_TABLE_ROWS = 30  # the costliest groups, then one "… more" line
_NUMERIC = (
    ("requests", "requests", "{:,}"),
    ("failed", "failed", "{:,}"),
    ("total_tokens", "tokens", "{:,}"),
    ("total_cost_usd", "cost_usd", "{:,.6f}"),
    ("unconfirmed_cost_usd", "unconf_usd", "{:,.6f}"),
    ("latency_p50_s", "p50_s", "{:.2f}"),
    ("latency_p95_s", "p95_s", "{:.2f}"),
)
_GAP = 2
_MIN_KEY = 8
#: Dropped in this order when even the narrowest key columns leave no room (money columns stay).
_DROPPABLE = ("latency_p95_s", "latency_p50_s", "total_tokens", "failed", "requests")


def text_table(data: ReportData, width: int) -> str:
    """Group rows (the costliest first when there are many) and the totals, within ``width`` columns.

    Key columns keep their full text while it fits; when it does not, model names lose their
    ``org/`` prefix first, then the widest key column is cut in the middle (names differ in their tails).
    """
    columns = list(_NUMERIC)
    while True:
        table = _render(data, width, columns)
        fits = max(len(line) for line in table[: len(table) - len(_notes_of(data))]) <= width
        droppable = [c for c in columns if c[0] in _DROPPABLE]
        if fits or not droppable:
            return "\n".join(table)
        columns.remove(min(droppable, key=lambda c: _DROPPABLE.index(c[0])))


def _notes_of(data: ReportData) -> list[str]:
    return notes(data.totals, [f"{s.ledger}:{s.line}" for s in data.skipped])


def _render(data: ReportData, width: int, numeric: list[tuple[str, str, str]]) -> list[str]:
    by = data.by
    groups = [r for r in data.summary if r["level"] == "group"]
    ranked = sorted(range(len(groups)), key=lambda i: -groups[i]["total_cost_usd"])[:_MAX_TABLE_ROWS]
    shown = [groups[i] for i in sorted(ranked)]
    total = next(r for r in data.summary if r["level"] == "total")
    rows = [[str(r[k]) for k in by] + [format_value(fmt, r[name]) for name, _, fmt in numeric] for r in shown]
    total_row = (["TOTAL"] + [""] * (len(by) - 1) if by else []) + [
        format_value(fmt, total[name]) for name, _, fmt in numeric
    ]
    header = list(by) + [label for _, label, _ in numeric]
    widths = _widths(header, [*rows, total_row])
    if "model" in by and sum(widths) + _GAP * (len(widths) - 1) > width:
        m = by.index("model")
        for r in rows:  # "org/name": the name alone is what tells models apart in a narrow column
            r[m] = r[m].rsplit("/", 1)[-1]
        widths = _widths(header, [*rows, total_row])
    key_room = width - sum(widths[len(by) :]) - _GAP * (len(header) - 1)
    while by and sum(widths[: len(by)]) > key_room and max(widths[: len(by)]) > _MIN_KEY:
        widest = widths.index(max(widths[: len(by)]))  # narrow the widest key column first
        widths[widest] -= 1

    def line(cells: Sequence[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            out.append(_shorten(cell, widths[i]).ljust(widths[i]) if i < len(by) else cell.rjust(widths[i]))
        return (" " * _GAP).join(out).rstrip()

    rule = line(["-" * w for w in widths])
    lines = [line(header), rule, *(line(r) for r in rows)]
    if len(groups) > len(shown):
        lines.append(f"… {len(groups) - len(shown)} more groups in summary.csv")
    if rows:
        lines.append(rule)
    lines.append(line(total_row))
    return lines + _notes_of(data)


def _widths(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[int]:
    return [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]


def _shorten(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head) :]


def notes(totals: dict[str, Any], skipped_at: Sequence[str]) -> list[str]:
    """Lines under the table: estimates, unpriced tokens, skipped ledger lines (the first few by place)."""
    out = []
    if totals["unconfirmed_estimated_usd"]:
        out.append(
            f"unconf_usd includes ${totals['unconfirmed_estimated_usd']:,.6f} estimated here from learnt prices; "
            "it is never in cost_usd"
        )
    if totals["unconfirmed_unpriced_tokens"]:
        out.append(
            f"{totals['unconfirmed_unpriced_tokens']:,} unconfirmed tokens have no learnt price: not in unconf_usd"
        )
    if totals.get("possibly_billed_attempts"):
        unpriced = totals.get("possibly_billed_unpriced") or 0
        out.append(
            f"possibly billed: up to ${totals['possibly_billed_usd']:,.6f} for {totals['possibly_billed_attempts']:,} "
            "attempts in flight when a run died"
            + (f" ({unpriced:,} not priced)" if unpriced else "")
            + "; never in cost_usd"
        )
    if totals["skipped_lines"]:
        where = ", ".join(skipped_at[:5]) + (f" and {len(skipped_at) - 5} more" if len(skipped_at) > 5 else "")
        out.append(f"{totals['skipped_lines']:,} unreadable ledger lines were skipped: {where}")
    return out
