"""Cost reports: exact aggregates of run ledgers as Parquet, CSV, one offline HTML page and a terminal table.

Read-only over ``results.jsonl``; never imported by ``runner``.  Layers, each importing only those
before it: ``data`` (the public numbers a report is made of) -> ``load`` (finding ledgers, staging them
with DuckDB) -> ``summary`` (aggregates) -> ``formats`` / ``text`` / ``charts`` -> ``page`` -> ``build``.
DuckDB, pyarrow and pandas are imported only inside the functions that use them.

Each ledger's rows are staged once as typed Parquet parts in ``.report-cache/`` beside it (one per
appended byte range), so a report after a run parses only what that run appended; ``requests.parquet``
is those parts' row groups joined as bytes, not re-encoded.  ``requests.parquet``
has one fixed schema (``REQUEST_COLUMNS``, every field nullable), so runs read together, e.g.::

    duckdb -c "SELECT model, sum(total_cost_usd) FROM 'reports/*/requests.parquet' GROUP BY model"
"""

from .build import ALL_DIR, DAY_DATASET, ReportResult, build_reports, default_out_dir, load_ledger
from .data import (
    ALL,
    NONE,
    REPORT_FORMATS,
    REPORT_KEYS,
    SUMMARY_METRICS,
    Histogram,
    ReportData,
    RunCurve,
    SkippedLine,
)
from .formats import csv_number
from .load import CACHE_DIR, REQUEST_COLUMNS, find_ledgers

__all__ = [
    "ALL",
    "ALL_DIR",
    "CACHE_DIR",
    "DAY_DATASET",
    "NONE",
    "REPORT_FORMATS",
    "REPORT_KEYS",
    "REQUEST_COLUMNS",
    "SUMMARY_METRICS",
    "Histogram",
    "ReportData",
    "ReportResult",
    "RunCurve",
    "SkippedLine",
    "build_reports",
    "csv_number",
    "default_out_dir",
    "find_ledgers",
    "load_ledger",
]
