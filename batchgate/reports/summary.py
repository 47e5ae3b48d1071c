"""Aggregates with DuckDB over the staged rows: the typed requests table, the summary, the chart data.

Conventions every figure follows:

- Spend (tokens, costs, attempts, retries) sums over *every* ledger row: a prompt that failed in one
  run and succeeded on resume was billed twice.  Request counts (requests, ok, failed) use the
  *latest* row per (ledger directory, prompt id, sample).
- Costs are summed with DuckDB's compensated ``fsum``, so a total matches ``math.fsum`` of the ledger
  to 1e-9 over millions of rows.
- Unconfirmed cost (attempts cut before their usage chunk) is always apart from confirmed cost.
  Rows the runner could not price yet are priced here from the same model's confirmed rows and
  flagged as an estimate.
- Percentiles are exact: ``quantile_cont``, linear interpolation between order statistics (numpy's
  default, Hyndman and Fan type 7), over rows with a value.

Memory stays flat: DuckDB streams the Parquet files; only aggregates (and, for the quantiles, one
float per row of the column at hand) are held.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .data import (
    ALL,
    NONE,
    PERCENTILES,
    SUMMARY_INTS,
    SUMMARY_METRICS,
    Histogram,
    ReportData,
    RunCurve,
)
from .load import REQUEST_COLUMNS, Staged, copy_ordered, sql_text

if TYPE_CHECKING:
    import duckdb

__all__ = [
    "NO_DAY",
    "PARTITION_KEY",
    "REQUESTS_VIEW",
    "ROWS_VIEW",
    "aggregate",
    "chart_data",
    "learn_prices",
    "open_requests",
    "request_schema",
    "write_requests",
    "write_requests_by_day",
]

#: DuckDB views: ``requests.parquet`` plus ``unconfirmed_estimate_usd`` (``ROWS_VIEW``), and that plus
#: ``latest`` (``REQUESTS_VIEW``; a join, so only the queries that count requests read it).
ROWS_VIEW = "req_rows"
REQUESTS_VIEW = "req"
_QS = "[" + ", ".join(str(q / 100) for q in PERCENTILES) + "]"


def _scan(staged: Staged) -> str:
    files = "[" + ", ".join(sql_text(str(p.path)) for p in staged.parts) + "]"
    return f"read_parquet({files})"


# -- unconfirmed prices ------------------------------------------------------------------------------


def learn_prices(con: duckdb.DuckDBPyConnection, staged: Staged) -> dict[str, float]:
    """USD per completion token for each model with cut attempts the ledger left unpriced.

    Learnt from the model's confirmed rows: the least-squares fit
    ``total_cost ~ a*prompt_tokens + b*completion_tokens`` when it is well conditioned and positive,
    else the ratio ``sum(total_cost) / sum(completion_tokens)``.
    """
    if not staged.parts:
        return {}
    src = _scan(staged)
    rows = con.execute(
        f"""WITH wanted AS (
                SELECT DISTINCT model FROM {src}
                WHERE unconfirmed_cost_usd IS NULL AND coalesce(unconfirmed_completion_tokens, 0) > 0
                  AND model IS NOT NULL)
            SELECT model, count(*), sum(p * p), sum(p * c), sum(c * c), sum(p * y), sum(c * y), fsum(y), fsum(c)
            FROM (SELECT model, CAST(prompt_tokens AS DOUBLE) AS p, CAST(completion_tokens AS DOUBLE) AS c,
                         total_cost_usd AS y FROM {src}
                  WHERE total_cost_usd > 0 AND completion_tokens > 0 AND prompt_tokens IS NOT NULL
                    AND model IN (SELECT model FROM wanted))
            GROUP BY model"""
    ).fetchall()
    prices: dict[str, float] = {}
    for model, n, spp, spc, scc, spy, scy, cost, tokens in rows:
        price = _fit(int(n), spp, spc, scc, spy, scy)
        prices[str(model)] = price if price is not None else float(cost) / float(tokens)
    return prices


def _fit(n: int, spp: float, spc: float, scc: float, spy: float, scy: float) -> float | None:
    """The completion-token price ``b`` of the 2x2 normal equations, or None when ill-conditioned."""
    if n < 2:
        return None
    # Eigenvalues of the symmetric Gram matrix [[spp, spc], [spc, scc]]: the squared singular
    # values of the design matrix.  Collinear token counts (a fixed prompt/answer ratio) cannot
    # separate the two prices.
    mean, radius = (spp + scc) / 2, math.hypot((spp - scc) / 2, spc)
    high, low = mean + radius, mean - radius
    if not (low > 0 and math.sqrt(high / low) < 1e6):
        return None
    det = spp * scc - spc * spc
    a, b = (scc * spy - spc * scy) / det, (spp * scy - spc * spy) / det  # Cramer's rule
    return b if b > 0 and a >= -1e-9 * b else None


# -- the requests view ------------------------------------------------------------------------------


#: Up to this many rows the superseded ones are found by a DuckDB window; beyond, by DuckDB group-bys of
#: key hashes, one slice of the keys at a time, each keeping only the keys seen more than once.
SMALL_LEDGER_ROWS = 200_000
_SLICE_ROWS = 250_000  # keys a group-by holds at once: the peak stays that of ~250k keys whatever the rows
_KEY_HASHES = ("hash(ledger, id, sample)", "hash(sample, id, ledger, 'batchgate')")


def create_superseded(con: duckdb.DuckDBPyConnection, rows: int) -> int:
    """Table ``superseded(n)``: row numbers (``seq``) of rows a later row of the same (ledger, id,
    sample) replaced.  Returns how many.

    All in DuckDB: nothing of a row reaches Python, no numpy or pyarrow is imported.  Small ledgers use
    a window.  Big ones group two independent 64-bit hashes of the key (128 bits, as ``ledger.IdSet``
    does: over ten million rows the chance that two keys share both is ~1e-25), a slice of the first
    hash's values per pass, keeping only the keys that repeat (a resume's retried prompts): a key seen
    twice supersedes its first row; the rows of keys seen more often are found by one join.
    Measured over 1M and 2M rows: faster and lighter than the window's sort or a group-by of the key
    strings; one pass per 250k rows (each a scan of four columns, ~0.06 s) keeps the peak flat.
    """
    if rows <= SMALL_LEDGER_ROWS:
        con.execute(
            f"""CREATE OR REPLACE TEMP TABLE superseded AS SELECT seq AS n FROM {ROWS_VIEW}
                QUALIFY row_number() OVER (PARTITION BY ledger, id, sample ORDER BY seq DESC) > 1"""
        )
    else:
        a, b = _KEY_HASHES
        slices = -(-rows // _SLICE_ROWS)
        keys = f"SELECT seq AS n, {a} AS a, {b} AS b FROM {ROWS_VIEW}"
        con.execute("CREATE OR REPLACE TEMP TABLE repeated (a UBIGINT, b UBIGINT, keep BIGINT, first BIGINT, c BIGINT)")
        for part in range(slices):
            con.execute(
                f"""INSERT INTO repeated SELECT a, b, max(n), min(n), count(*)
                    FROM ({keys} WHERE {a} % {slices} = {part}) GROUP BY a, b HAVING count(*) > 1"""
            )
        # A key seen twice (the common resume) supersedes its first row; more often, all but its last.
        con.execute("CREATE OR REPLACE TEMP TABLE superseded AS SELECT first AS n FROM repeated WHERE c = 2")
        more = con.execute("SELECT count(*) FROM repeated WHERE c > 2").fetchone()
        if more and more[0]:
            con.execute(
                f"""INSERT INTO superseded SELECT r.n FROM ({keys}) r
                    JOIN (SELECT * FROM repeated WHERE c > 2) k ON r.a = k.a AND r.b = k.b WHERE r.n < k.keep"""
            )
        con.execute("DROP TABLE repeated")
    found = con.execute("SELECT count(*) FROM superseded").fetchone()
    return int(found[0]) if found else 0


def open_requests(con: duckdb.DuckDBPyConnection, staged: Staged, prices: dict[str, float]) -> None:
    """Create the views: the staged rows with ``seq`` (ledger order), the estimate, then ``latest``."""
    if prices:
        cases = " ".join(f"WHEN {sql_text(m)} THEN CAST({p!r} AS DOUBLE)" for m, p in sorted(prices.items()))
        estimate = (
            "CASE WHEN unconfirmed_cost_usd IS NULL AND coalesce(unconfirmed_completion_tokens, 0) > 0 "
            f"THEN (CASE model {cases} END) * unconfirmed_completion_tokens END"
        )
    else:
        estimate = "NULL"
    if staged.parts:
        offsets, names, first = [], [], 0
        for part in staged.parts:
            path = sql_text(str(part.path))
            offsets.append(f"WHEN {path} THEN {first}")
            names.append(f"WHEN {path} THEN {sql_text(str(part.ledger.parent))}")
            first += part.rows
        columns = ", ".join(
            f"CASE filename {' '.join(names)} END AS ledger" if c == "ledger" else c for c in REQUEST_COLUMNS
        )
        source = f"""SELECT {columns}, file_row_number + CASE filename {" ".join(offsets)} END AS seq
                     FROM read_parquet([{", ".join(sql_text(str(p.path)) for p in staged.parts)}],
                                       file_row_number = true, filename = true)"""
    else:
        types = ", ".join(f"CAST(NULL AS {t}) AS {c}" for c, t in REQUEST_COLUMNS.items())
        source = f"SELECT {types}, CAST(NULL AS BIGINT) AS seq WHERE false"
    con.execute(
        f"""CREATE OR REPLACE TEMP VIEW {ROWS_VIEW} AS
            SELECT *, CAST({estimate} AS DOUBLE) AS unconfirmed_estimate_usd FROM ({source})"""
    )
    replaced = create_superseded(con, sum(p.rows for p in staged.parts))
    latest = "s.n IS NULL" if replaced else "true"
    join = "LEFT JOIN superseded s ON r.seq = s.n" if replaced else ""
    view = f"SELECT r.*, {latest} AS latest FROM {ROWS_VIEW} r {join}"
    con.execute(f"CREATE OR REPLACE TEMP VIEW {REQUESTS_VIEW} AS {view}")
    con.execute(f"CREATE OR REPLACE TEMP TABLE {_COLUMN_STATS} (name VARCHAR, n BIGINT, biggest DOUBLE, qs DOUBLE[])")


def write_requests(con: duckdb.DuckDBPyConnection, out: Path) -> None:
    """``requests.parquet``: the staged rows of every ledger in one file, ``REQUEST_COLUMNS`` in ledger order.

    Every field must stay nullable whatever this run held, or two runs would not read together: DuckDB
    marks a column required when its statistics prove it has no null, so a branch that can (but never
    does) add a null row keeps them unproven.  Should a DuckDB still write a required field, the file
    is written again through pyarrow with the fixed schema.
    """
    nulls = ", ".join(f"CAST(NULL AS {kind}) AS {name}" for name, kind in REQUEST_COLUMNS.items())
    query = f"SELECT {', '.join(REQUEST_COLUMNS)} FROM {ROWS_VIEW} UNION ALL SELECT {nulls} WHERE random() > 2"
    copy_ordered(con, query, out)
    required = con.execute(
        f"""SELECT count(*) FROM parquet_schema({sql_text(str(out))})
            WHERE repetition_type = 'REQUIRED' AND coalesce(num_children, 0) = 0"""
    ).fetchone()  # leaf columns, read by DuckDB: pyarrow (and numpy under it) only when a rewrite is due
    if required is not None and required[0] == 0:
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = request_schema()
    reader = con.sql(f"SELECT {', '.join(REQUEST_COLUMNS)} FROM {ROWS_VIEW}").to_arrow_reader(50_000)
    with pq.ParquetWriter(str(out), schema, compression="snappy") as writer:
        for batch in reader:
            writer.write_table(pa.Table.from_batches([batch]).cast(schema), row_group_size=50_000)


#: The partition key of the ``requests/`` dataset; rows with no day (an unreadable start time) go to this one.
PARTITION_KEY = "day"
NO_DAY = "unknown"


def write_requests_by_day(con: duckdb.DuckDBPyConnection, out: Path) -> None:
    """``requests/``: the same rows as ``requests.parquet``, as a hive dataset ``day=YYYY-MM-DD/*.parquet``.

    For histories of many days that DuckDB, Spark, Polars and pandas read with partition pruning.
    ``day`` lives in the directory names only (readers add it back: DuckDB as a DATE, pyarrow and
    pandas as a string), and is never null: pyarrow cannot read a null partition beside others.
    Every other column keeps ``request_schema()``, nullable, in every file.
    """
    import pyarrow as pa
    import pyarrow.dataset as ds

    schema = request_schema()
    day = f"coalesce(strftime({PARTITION_KEY}, '%Y-%m-%d'), {sql_text(NO_DAY)}) AS {PARTITION_KEY}"
    columns = [name for name in REQUEST_COLUMNS if name != PARTITION_KEY]
    query = f"SELECT {', '.join(columns)}, {day} FROM {ROWS_VIEW}"
    # Through pyarrow with the fixed schema: DuckDB's own partitioned COPY marks a column required
    # whenever one partition's statistics prove it has no null, and files of one dataset must agree.
    reader = con.sql(query).to_arrow_reader(50_000)
    file_schema = pa.schema([schema.field(name) for name in columns])
    target = pa.schema([*file_schema, pa.field(PARTITION_KEY, pa.string())])
    ds.write_dataset(
        (batch.cast(target) for batch in reader),
        out,
        schema=target,
        format="parquet",
        partitioning=ds.partitioning(pa.schema([pa.field(PARTITION_KEY, pa.string())]), flavor="hive"),
        basename_template="part-{i}.parquet",
        existing_data_behavior="error",
        max_rows_per_group=50_000,
        file_options=ds.ParquetFileFormat().make_write_options(compression="snappy"),
    )


def request_schema() -> Any:
    """The Arrow schema of ``requests.parquet`` (``pyarrow.Schema``), from ``REQUEST_COLUMNS``."""
    import pyarrow as pa

    kinds = {
        "VARCHAR": pa.string(),
        "BIGINT": pa.int64(),
        "DOUBLE": pa.float64(),
        "BOOLEAN": pa.bool_(),
        "DATE": pa.date32(),
        "TIMESTAMPTZ": pa.timestamp("us", tz="UTC"),
        "VARCHAR[]": pa.list_(pa.field("element", pa.string())),
    }
    return pa.schema([pa.field(name, kinds[kind], nullable=True) for name, kind in REQUEST_COLUMNS.items()])


# -- the summary -------------------------------------------------------------------------------------


_METRIC_SQL = """
    count(*) FILTER (WHERE latest) AS requests,
    count(*) FILTER (WHERE latest AND status = 'ok') AS ok,
    count(*) FILTER (WHERE latest AND status = 'failed') AS failed,
    count(*) AS rows,
    sum(coalesce(attempts, 0)) AS attempts,
    sum(retries) AS retries,
    sum(coalesce(prompt_tokens, 0)) AS prompt_tokens,
    sum(coalesce(completion_tokens, 0)) AS completion_tokens,
    sum(coalesce(total_tokens, 0)) AS total_tokens,
    fsum(coalesce(base_cost_usd, 0)) AS base_cost_usd,
    fsum(coalesce(platform_fee_usd, 0)) AS platform_fee_usd,
    fsum(coalesce(total_cost_usd, 0)) AS total_cost_usd,
    fsum(coalesce(unconfirmed_cost_usd, 0) + coalesce(unconfirmed_estimate_usd, 0)) AS unconfirmed_cost_usd,
    fsum(coalesce(unconfirmed_estimate_usd, 0)) AS unconfirmed_estimated_usd,
    sum(coalesce(unconfirmed_completion_tokens, 0)) AS unconfirmed_completion_tokens,
    sum(CASE WHEN unconfirmed_cost_usd IS NULL AND unconfirmed_estimate_usd IS NULL
             THEN coalesce(unconfirmed_completion_tokens, 0) ELSE 0 END) AS unconfirmed_unpriced_tokens,
    sum(completion_tokens) FILTER (WHERE status = 'ok' AND latency_s > 0 AND completion_tokens IS NOT NULL)
        AS tps_tokens,
    sum(latency_s) FILTER (WHERE status = 'ok' AND latency_s > 0 AND completion_tokens IS NOT NULL)
        AS tps_seconds
"""


def aggregate(
    con: duckdb.DuckDBPyConnection, staged: Staged, by: Sequence[str], prices: dict[str, float]
) -> ReportData:
    """The summary rows (``by`` groups, then UTC days when the data spans several, then the total) and totals."""
    days_row = con.execute(f"SELECT count(DISTINCT day) FROM {ROWS_VIEW}").fetchone()
    days = int(days_row[0]) if days_row else 0
    per_day = days > 1 and "day" not in by
    key_columns = [*by, "day"] if per_day else list(by)
    # The sums of every level in one scan (GROUPING SETS: their states are a few numbers a group), the
    # percentiles one level and one column at a time: an exact quantile holds every value of its column,
    # so the peak stays one float a row.
    levels = [("group", list(by))] if by else []
    if per_day:
        levels.append(("day", ["day"]))
    levels.append(("total", []))
    used = list(dict.fromkeys(k for _, keys in levels for k in keys))
    fetched = _level_metrics(con, used, [keys for _, keys in levels])
    summary: list[dict[str, Any]] = []
    for level, keys in levels:
        quantiles = {name: _quantiles(con, keys, f"{name}_s") for name in ("latency", "ttft")}
        mask = sum(1 << (len(used) - 1 - i) for i, k in enumerate(used) if k not in keys)
        for r in fetched.get(mask, []):
            out: dict[str, Any] = {"level": level}
            for k in key_columns:
                out[k] = (NONE if r[f"k_{k}"] is None else str(r[f"k_{k}"])) if k in keys else ALL
            label = tuple(out[k] for k in keys)
            for name in ("latency", "ttft"):
                r[f"{name}_q"] = quantiles[name].get(label)
            out.update(_metrics(r))
            summary.append(out)
    order = {"group": 0, "day": 1, "total": 2}
    summary.sort(key=lambda row: (order[row["level"]], *((row[k] == NONE, row[k]) for k in key_columns)))
    total = next(row for row in summary if row["level"] == "total")
    totals: dict[str, float | int] = {name: total[name] for name in SUMMARY_METRICS}
    causes = retry_causes(con, ROWS_VIEW)
    totals.update(_run_totals(con, staged, days, causes))
    return ReportData(
        by=list(by),
        key_columns=key_columns,
        summary=summary,
        totals=totals,
        ledgers=list(staged.ledgers),
        skipped=list(staged.skipped),
        prices=dict(prices),
        retry_causes=causes,
    )


#: Metrics that are sums of floats: combined across groups with ``math.fsum`` (exact to the last bit of each part).
_FLOAT_SUMS = frozenset(
    {
        "base_cost_usd",
        "platform_fee_usd",
        "total_cost_usd",
        "unconfirmed_cost_usd",
        "unconfirmed_estimated_usd",
        "tps_seconds",
    }
)


def _level_metrics(
    con: duckdb.DuckDBPyConnection, used: Sequence[str], sets: Sequence[Sequence[str]]
) -> dict[int, list[dict[str, Any]]]:
    """``_METRIC_SQL`` for each grouping set, keyed by its mask (bit set: key not grouped), from one scan.

    DuckDB groups by every key at once (a few rows: groups x days); each level adds those rows up here,
    counts as integers and sums of floats with ``math.fsum``.  One scan instead of one per level, and
    flat: DuckDB's own GROUPING SETS materialised the scanned rows (+110 MB over 1M rows, measured).
    """
    select = ", ".join(f"{_key_expr(k)} AS k_{k}" for k in used)
    query = f"SELECT {select + ',' if select else ''} {_METRIC_SQL} FROM {REQUESTS_VIEW}"
    if used:
        query += " GROUP BY ALL"
    cursor = con.execute(query)
    names = [d[0] for d in cursor.description]
    finest = [dict(zip(names, values, strict=True)) for values in cursor.fetchall()]
    metrics = [n for n in names if not n.startswith("k_")]
    out: dict[int, list[dict[str, Any]]] = {}
    for keys in sets:
        mask = sum(1 << (len(used) - 1 - i) for i, k in enumerate(used) if k not in keys)
        groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        for r in finest:
            groups.setdefault(tuple(r[f"k_{k}"] for k in keys), []).append(r)
        if not keys and not groups:
            groups[()] = [{n: None for n in names}]  # no rows: the total still has its row
        rows = []
        for label, members in groups.items():
            row: dict[str, Any] = {f"k_{k}": v for k, v in zip(keys, label, strict=True)}
            for name in metrics:
                values = [m[name] for m in members if m[name] is not None]
                if not values:
                    row[name] = None
                elif name in _FLOAT_SUMS:
                    row[name] = math.fsum(values)
                else:
                    row[name] = sum(values)
            rows.append(row)
        out[mask] = rows
    return out


#: Percentiles of the whole ledger also give the histograms' top (p99.5): one pass over each column.
_TOTAL_QS = "[" + ", ".join(str(q / 100) for q in (*PERCENTILES, 99.5)) + "]"
_COLUMN_STATS = "column_stats"


def _quantiles(con: duckdb.DuckDBPyConnection, keys: Sequence[str], column: str) -> dict[tuple[str, ...], Any]:
    if not keys:  # the total: kept (with the count, the maximum and p99.5) for the chart of this column
        con.execute(
            f"""INSERT INTO {_COLUMN_STATS} SELECT {sql_text(column)}, count({column}), max({column}),
                quantile_cont({column}, {_TOTAL_QS}) FROM {ROWS_VIEW}"""
        )
        row = con.execute(f"SELECT qs FROM {_COLUMN_STATS} WHERE name = {sql_text(column)}").fetchone()
        qs = row[0] if row else None
        return {(): None if qs is None else qs[: len(PERCENTILES)]}
    select = ", ".join(f"{_key_expr(k)} AS k_{k}" for k in keys)
    query = f"SELECT {select}, quantile_cont({column}, {_QS}) FROM {ROWS_VIEW} GROUP BY ALL"
    out: dict[tuple[str, ...], Any] = {}
    for row in con.execute(query).fetchall():
        out[tuple(NONE if v is None else str(v) for v in row[:-1])] = row[-1]
    return out


def _key_expr(key: str) -> str:
    """A key as grouped: the column itself (a ``day`` DATE groups as such; its label is ``str(date)``,
    YYYY-MM-DD, formatted once a group rather than once a row)."""
    return key


def _metrics(r: dict[str, Any]) -> dict[str, Any]:
    m: dict[str, Any] = {}
    for name in SUMMARY_METRICS:
        if name in SUMMARY_INTS:
            m[name] = int(r[name] or 0)
        elif name in r:
            m[name] = float(r[name] or 0.0)
    requests, tokens, cost = m["requests"], m["total_tokens"], m["total_cost_usd"]
    m["cost_per_1k_requests_usd"] = cost / requests * 1000 if requests else math.nan
    m["cost_per_1m_tokens_usd"] = cost / tokens * 1e6 if tokens else math.nan
    for name in ("latency", "ttft"):
        values = r[f"{name}_q"] or [math.nan] * len(PERCENTILES)
        for q, value in zip(PERCENTILES, values, strict=True):
            m[f"{name}_p{q}_s"] = math.nan if value is None else float(value)
    seconds = r["tps_seconds"] or 0.0
    m["tokens_per_s"] = int(r["tps_tokens"] or 0) / seconds if seconds > 0 else math.nan
    return {name: m[name] for name in SUMMARY_METRICS}


def _run_totals(
    con: duckdb.DuckDBPyConnection, staged: Staged, days: int, causes: dict[str, int]
) -> dict[str, float | int]:
    src = ROWS_VIEW
    spans = con.execute(
        f"""SELECT epoch_us(max(coalesce(finished_at, started_at))) - epoch_us(min(started_at))
            FROM {src} GROUP BY ledger, run_id"""
    ).fetchall()
    from ..ledger import PossiblyBilled, possibly_billed_of

    possibly = PossiblyBilled()
    for ledger in staged.ledgers:
        possibly.add(possibly_billed_of(ledger.parent))
    return {
        "possibly_billed_attempts": possibly.attempts,
        "possibly_billed_usd": possibly.usd,
        "possibly_billed_unpriced": possibly.unpriced,
        "ledgers": len(staged.ledgers),
        "runs": len(spans),
        "days": days,
        "wall_s": math.fsum(s / 1e6 for (s,) in spans if s is not None),
        "skipped_lines": len(staged.skipped),
        "rate_limited": causes.get("rate_limited", 0),
    }


def retry_causes(con: duckdb.DuckDBPyConnection, src: str) -> dict[str, int]:
    """Failed attempts per cause, over every row's ``retry_causes``, the commonest first."""
    rows = con.execute(
        f"""SELECT cause, count(*) AS n FROM (SELECT unnest(retry_causes) AS cause FROM {src})
            WHERE cause IS NOT NULL GROUP BY cause ORDER BY n DESC, cause"""
    ).fetchall()
    return {str(c): int(n) for c, n in rows}


# -- chart data --------------------------------------------------------------------------------------

_SPEND_BINS = 300
_HIST_BINS = 60


def chart_data(con: duckdb.DuckDBPyConnection, data: ReportData) -> None:
    """Fill ``data``'s chart fields: binned aggregates only, never one value per row."""
    src = ROWS_VIEW
    span = con.execute(
        f"SELECT epoch_us(min(started_at)), epoch_us(max(coalesce(finished_at, started_at))) FROM {src}"
    ).fetchone()
    if span:
        data.first_start_us, data.last_end_us = span
    data.cost_by_model = [
        (NONE if m is None else str(m), float(c), float(u))
        for m, c, u in con.execute(
            f"""SELECT model, fsum(coalesce(total_cost_usd, 0)),
                       fsum(coalesce(unconfirmed_cost_usd, 0) + coalesce(unconfirmed_estimate_usd, 0))
                FROM {src} GROUP BY model ORDER BY 2 DESC, 1"""
        ).fetchall()
    ]
    data.latency = _histogram(con, src, "latency_s")
    data.ttft = _histogram(con, src, "ttft_s")
    data.failed_by_error = {
        str(k): int(n)
        for k, n in con.execute(
            f"""SELECT coalesce(error_type, 'unknown') AS k, count(*) AS n FROM {REQUESTS_VIEW}
                WHERE latest AND status = 'failed' GROUP BY k ORDER BY n DESC, k"""
        ).fetchall()
    }
    data.cost_by_day = [
        (str(d), float(c))
        for d, c in con.execute(
            f"""SELECT strftime(day, '%Y-%m-%d'), fsum(coalesce(total_cost_usd, 0)) FROM {src}
                WHERE day IS NOT NULL GROUP BY day ORDER BY day"""
        ).fetchall()
    ]
    _spend(con, src, data)


def _histogram(con: duckdb.DuckDBPyConnection, src: str, column: str) -> Histogram | None:
    """60 bins up to p99.5; slower values pile into the last bin, so a few outliers cannot flatten it."""
    row = con.execute(f"SELECT n, biggest, qs FROM {_COLUMN_STATS} WHERE name = {sql_text(column)}").fetchone()
    if row is None:  # not kept by ``aggregate``
        query = f"SELECT count({column}), max({column}), quantile_cont({column}, {_TOTAL_QS}) FROM {src}"
        row = con.execute(query).fetchone()
    if not row or not row[0]:
        return None
    n, biggest, all_qs = row
    top, qs = all_qs[-1], all_qs[: len(PERCENTILES)]
    top = float(top) if top and top > 0 else (float(biggest) or 1.0)
    counts = [0] * _HIST_BINS
    for b, k in con.execute(
        f"""SELECT least(CAST(floor(least(greatest({column}, 0), {top!r}) / {top!r} * {_HIST_BINS}) AS BIGINT),
                         {_HIST_BINS - 1}) AS b, count(*)
            FROM {src} WHERE {column} IS NOT NULL GROUP BY b"""
    ).fetchall():
        counts[int(b)] = int(k)
    edges = [top * i / _HIST_BINS for i in range(_HIST_BINS + 1)]
    return Histogram(
        counts=counts,
        edges=edges,
        percentiles={q: float(v) for q, v in zip(PERCENTILES, qs, strict=True)},
        values=int(n),
    )


def _spend(con: duckdb.DuckDBPyConnection, src: str, data: ReportData) -> None:
    """One run: cumulative spend against the clock.  Several: the costliest 8 against time since each start."""
    runs = con.execute(
        f"""SELECT ledger, run_id, epoch_us(min(least(started_at, coalesce(finished_at, started_at)))) AS begin,
                   epoch_us(max(coalesce(finished_at, started_at))) AS finish, fsum(coalesce(total_cost_usd, 0)) AS c
            FROM {src} WHERE coalesce(finished_at, started_at) IS NOT NULL
            GROUP BY ledger, run_id ORDER BY c DESC, begin"""
    ).fetchall()
    data.run_count = len(runs)
    if not runs:
        return
    if len(runs) == 1:
        _, _, lo, hi, _ = runs[0]
        width = max(hi - lo, 1)
        bins = con.execute(
            f"""SELECT least(CAST(floor((epoch_us(coalesce(finished_at, started_at)) - {lo}) / {width} * {_SPEND_BINS})
                                 AS BIGINT), {_SPEND_BINS - 1}) AS b,
                       fsum(coalesce(total_cost_usd, 0)),
                       fsum(coalesce(unconfirmed_cost_usd, 0) + coalesce(unconfirmed_estimate_usd, 0))
                FROM {src} WHERE coalesce(finished_at, started_at) IS NOT NULL GROUP BY b"""
        ).fetchall()
        confirmed, unconfirmed = [0.0] * _SPEND_BINS, [0.0] * _SPEND_BINS
        for b, c, u in bins:
            confirmed[int(b)], unconfirmed[int(b)] = c, u
        data.spend_single = RunCurve(
            label=str(runs[0][1]),
            edges=_edges(lo, width),
            spent=_running(confirmed),
            unconfirmed=_running(unconfirmed) if any(unconfirmed) else None,
        )
        return
    for ledger, run_id, lo, hi, _ in runs[:8]:
        width = max(hi - lo, 1)
        run_filter = "run_id IS NULL" if run_id is None else f"run_id = {sql_text(run_id)}"
        bins = con.execute(
            f"""SELECT least(CAST(floor((epoch_us(coalesce(finished_at, started_at)) - {lo}) / {width} * {_SPEND_BINS})
                                 AS BIGINT), {_SPEND_BINS - 1}) AS b, fsum(coalesce(total_cost_usd, 0))
                FROM {src} WHERE ledger = {sql_text(ledger)} AND {run_filter}
                  AND coalesce(finished_at, started_at) IS NOT NULL GROUP BY b"""
        ).fetchall()
        spent = [0.0] * _SPEND_BINS
        for b, c in bins:
            spent[int(b)] = c
        when = (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=int(lo))).strftime("%Y-%m-%d %H:%M")
        data.spend_runs.append(
            RunCurve(
                label=f"{NONE if run_id is None else run_id} · {when}",
                edges=[e / 1e6 for e in _edges(0, width)],
                spent=_running(spent),
            )
        )


def _edges(lo: float, width: float) -> list[float]:
    """``_SPEND_BINS + 1`` evenly spaced edges from ``lo`` to ``lo + width`` (numpy.linspace's)."""
    step = width / _SPEND_BINS
    return [lo + i * step for i in range(_SPEND_BINS)] + [lo + width]


def _running(values: list[float]) -> list[float]:
    """0, then the running sum: spend accumulated up to each edge."""
    return [0.0, *itertools.accumulate(values)]
