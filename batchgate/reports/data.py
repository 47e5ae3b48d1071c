"""The numbers a report is made of, as plain public data: what the page, the charts and the table receive.

Nothing here computes or imports an engine; ``summary`` fills these, the renderers only read them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ALL",
    "NONE",
    "PERCENTILES",
    "REPORT_FORMATS",
    "REPORT_KEYS",
    "SUMMARY_INTS",
    "SUMMARY_METRICS",
    "Histogram",
    "ReportData",
    "RunCurve",
    "SkippedLine",
    "format_value",
    "is_missing",
]

#: Columns a summary can be grouped by (``--by``).
REPORT_KEYS: tuple[str, ...] = ("job", "model", "day", "status")
#: Output formats (``--format``); ``all`` means every one of them.
REPORT_FORMATS: tuple[str, ...] = ("csv", "parquet", "html")

ALL = "(all)"  # key value of rows that span every value of that key (totals, per-day rows)
NONE = "(none)"  # key value of rows whose ledger field was null
PERCENTILES: tuple[int, ...] = (50, 95, 99)

#: Summary columns after the keys, in order.
SUMMARY_METRICS: tuple[str, ...] = (
    "requests",
    "ok",
    "failed",
    "rows",
    "attempts",
    "retries",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "base_cost_usd",
    "platform_fee_usd",
    "total_cost_usd",
    "unconfirmed_cost_usd",
    "unconfirmed_estimated_usd",
    "unconfirmed_completion_tokens",
    "unconfirmed_unpriced_tokens",
    "cost_per_1k_requests_usd",
    "cost_per_1m_tokens_usd",
    "latency_p50_s",
    "latency_p95_s",
    "latency_p99_s",
    "ttft_p50_s",
    "ttft_p95_s",
    "ttft_p99_s",
    "tokens_per_s",
)

#: Summary metrics that are counts (integer columns); the rest are floats.
SUMMARY_INTS = frozenset(
    {
        "requests",
        "ok",
        "failed",
        "rows",
        "attempts",
        "retries",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "unconfirmed_completion_tokens",
        "unconfirmed_unpriced_tokens",
    }
)


@dataclass(frozen=True, slots=True)
class SkippedLine:
    """A ledger line the report could not use: where it is and why."""

    ledger: Path
    line: int
    reason: str


@dataclass(frozen=True, slots=True)
class Histogram:
    """Binned values (every row with a value): ``counts[i]`` lies in ``[edges[i], edges[i+1])``."""

    counts: list[int]
    edges: list[float]
    percentiles: dict[int, float]
    values: int


@dataclass(frozen=True, slots=True)
class RunCurve:
    """Cumulative confirmed spend of one run: ``spent[i]`` dollars by ``edges_s[i]`` seconds (or epoch µs)."""

    label: str
    edges: list[float]
    spent: list[float]
    unconfirmed: list[float] | None = None


@dataclass(slots=True)
class ReportData:
    """Everything a rendered report shows, already aggregated: no per-row data, whatever the ledger size.

    ``summary`` is the summary table (one dict per row: ``level``, the key columns, then
    ``SUMMARY_METRICS``), ``totals`` its total row plus run-level figures.
    """

    by: list[str]
    key_columns: list[str]
    summary: list[dict[str, Any]]
    totals: dict[str, float | int]
    ledgers: list[Path]
    skipped: list[SkippedLine] = field(default_factory=list)
    prices: dict[str, float] = field(default_factory=dict)  # learnt USD per completion token
    first_start_us: int | None = None  # epoch microseconds, UTC
    last_end_us: int | None = None
    cost_by_model: list[tuple[str, float, float]] = field(default_factory=list)  # model, confirmed, unconfirmed
    spend_single: RunCurve | None = None  # one run: against the clock (edges in epoch µs)
    spend_runs: list[RunCurve] = field(default_factory=list)  # several: against seconds since each start
    run_count: int = 0
    latency: Histogram | None = None
    ttft: Histogram | None = None
    retry_causes: dict[str, int] = field(default_factory=dict)
    failed_by_error: dict[str, int] = field(default_factory=dict)
    cost_by_day: list[tuple[str, float]] = field(default_factory=list)


def is_missing(value: Any) -> bool:
    """Null in any of its spellings (None, NaN, pandas NA)."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return type(value).__name__ in {"NAType", "NaTType"}


def format_value(fmt: str, value: Any) -> str:
    """``fmt.format(value)``, or ``-`` for a null."""
    return "-" if is_missing(value) else fmt.format(value)
