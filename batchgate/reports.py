"""Cost reports: exact aggregates of run ledgers as Parquet, CSV, one offline HTML page and a terminal table.

Read-only over ``results.jsonl``; never imported by ``runner``.  Conventions every figure follows:

- Spend (tokens, costs, attempts, retries) sums over *every* ledger row: a prompt that failed in one
  run and succeeded on resume was billed twice.  Request counts (requests, ok, failed) use the *latest*
  row per (ledger directory, prompt id).
- Costs are summed with ``math.fsum``, so a report's total equals the exact sum of the ledger's
  ``total_cost_usd`` to 1e-9 over millions of rows.
- Unconfirmed cost (attempts cut before their usage chunk) is always reported apart from confirmed cost.
  Rows the runner could not price yet are priced here from the same model's confirmed rows and flagged
  as an estimate.
- Percentiles are numpy's default ``linear`` method (Hyndman and Fan type 7) over rows with a value.
"""

from __future__ import annotations

import glob
import io
import itertools
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
import pyarrow.parquet as pq

from batchgate.errors import InputError, LedgerError
from batchgate.ledger import LEDGER_NAME, complete_end, write_atomic
from batchgate.models import LEDGER_VERSION

__all__ = [
    "ALL",
    "REPORT_FORMATS",
    "REPORT_KEYS",
    "SUMMARY_METRICS",
    "ReportResult",
    "build_reports",
    "find_ledgers",
    "load_ledger",
]

#: Columns a summary can be grouped by (``--by``).
REPORT_KEYS: tuple[str, ...] = ("job", "model", "day", "status")
#: Output formats (``--format``); ``all`` means every one of them.
REPORT_FORMATS: tuple[str, ...] = ("csv", "parquet", "html")

ALL = "(all)"  # key value of rows that span every value of that key (totals, per-day rows)
NONE = "(none)"  # key value of rows whose ledger field was null

# Every ledger field but ``content``: reports never need the answers, and over a million rows they
# are most of the bytes.  Unknown fields (newer writers) are ignored, missing ones read as null.
_SCHEMA = pa.schema(
    [
        ("v", pa.int64()),
        ("id", pa.string()),
        ("job", pa.string()),
        ("run_id", pa.string()),
        ("model", pa.string()),
        ("status", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("total_tokens", pa.int64()),
        ("base_cost_usd", pa.float64()),
        ("platform_fee_usd", pa.float64()),
        ("total_cost_usd", pa.float64()),
        ("unconfirmed_completion_tokens", pa.int64()),
        ("unconfirmed_cost_usd", pa.float64()),
        ("attempts", pa.int64()),
        ("retry_causes", pa.list_(pa.string())),
        ("started_at", pa.string()),
        ("ttft_s", pa.float64()),
        ("latency_s", pa.float64()),
        ("error", pa.struct([("type", pa.string()), ("status", pa.int64()), ("message", pa.string())])),
    ]
)
_CATEGORIES = ("job", "run_id", "model", "status", "finish_reason", "error_type")
_COSTS = ("base_cost_usd", "platform_fee_usd", "total_cost_usd")
_BLOCK = 4 << 20  # Arrow JSON block; a line longer than this sends the file down the slow path
_PCTS = (50, 95, 99)
_MAX_TABLE_ROWS = 30  # terminal table: the costliest groups, then one "… more" line

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


@dataclass
class ReportResult:
    """What ``build_reports`` wrote and the headline numbers, for the CLI to print."""

    files: list[Path]
    totals: dict[str, float | int]
    table: str


# -- finding ledgers ---------------------------------------------------------------------------------


def find_ledgers(paths: Sequence[str | Path]) -> list[Path]:
    """Resolve run directories, globs, parent directories or ledger files to ``results.jsonl`` paths.

    A directory holding no ``results.jsonl`` itself is searched recursively (a month of nightly runs).
    Returns sorted, de-duplicated paths per argument, in argument order.
    Raises ``InputError`` naming the path when one does not exist, or when nothing is found at all.
    """
    found: list[Path] = []
    seen: set[Path] = set()
    for raw in paths:
        text = str(raw)
        if glob.has_magic(text):
            matches = sorted(glob.glob(os.path.expanduser(text), recursive=True))
            if not matches:
                raise InputError(f"{text}: the pattern matches nothing")
            candidates = [Path(m) for m in matches]
        else:
            path = Path(text).expanduser()
            if not path.exists():
                raise InputError(f"{text}: no such file or directory")
            candidates = [path]
        for path in candidates:
            for ledger in _ledgers_under(path):
                key = ledger.resolve()
                if key not in seen:
                    seen.add(key)
                    found.append(ledger)
    if not found:
        shown = ", ".join(str(p) for p in paths) or "(no paths given)"
        raise InputError(f"no {LEDGER_NAME} found in {shown}; pass a run's output directory")
    return found


def _ledgers_under(path: Path) -> list[Path]:
    if path.is_file():
        if path.name != LEDGER_NAME:
            raise InputError(f"{path}: not a run ledger (expected a {LEDGER_NAME} or a run directory)")
        return [path]
    if not path.is_dir():
        return []
    own = path / LEDGER_NAME
    if own.is_file():
        return [own]
    return sorted(p for p in path.rglob(LEDGER_NAME) if p.is_file())


# -- loading -----------------------------------------------------------------------------------------


@dataclass
class _Loaded:
    frame: pd.DataFrame
    ledgers: list[Path]
    skipped_lines: int = 0  # unreadable lines inside ledgers (a torn last line is not counted)
    prices: dict[str, float] = field(default_factory=dict)  # learnt USD per completion token


def load_ledger(paths: Sequence[Path]) -> pd.DataFrame:
    """Read ledgers into one typed requests table, one row per ledger row.

    Adds ``ledger`` (the run directory), ``latest`` (last row of its (ledger, id): request counts use
    only those), ``retries``, ``started_at``/``finished_at`` timestamps, ``day`` (UTC), the ``error``
    object split into ``error_type``/``error_status``/``error_message``, and
    ``unconfirmed_estimate_usd`` (this report's price for cut attempts the ledger left unpriced).
    A torn last line (crash mid-write) is skipped.  Raises ``LedgerError`` for an unreadable ledger.
    """
    return _load(paths).frame


def _load(paths: Sequence[Path]) -> _Loaded:
    paths = list({Path(p).resolve(): Path(p) for p in paths}.values())  # the same ledger twice counts once
    tables: list[pa.Table] = []
    skipped = 0
    for code, path in enumerate(paths):
        table, bad = _read_ledger(Path(path))
        skipped += bad
        tables.append(table.append_column("ledger", pa.array(np.full(table.num_rows, code, np.int32))))
    table = pa.concat_tables(tables) if tables else _SCHEMA.empty_table()
    versions = table["v"].drop_null()
    if len(versions) and pc.max(versions).as_py() > LEDGER_VERSION:
        raise LedgerError(
            f"a ledger was written by a newer batchgate (format v{pc.max(versions).as_py()}, "
            f"this one reads up to v{LEDGER_VERSION}); upgrade batchgate"
        )
    names = [str(Path(p).parent) for p in paths]
    frame = _to_frame(table, names)
    del table, tables
    pa.default_memory_pool().release_unused()  # the JSON reader's blocks: give them back before aggregating
    prices = _price_unconfirmed(frame)
    return _Loaded(frame=frame, ledgers=list(paths), skipped_lines=skipped, prices=prices)


def _read_ledger(path: Path) -> tuple[pa.Table, int]:
    """Arrow-parse one ledger; fall back to a line-checking pass only when Arrow refuses the file."""
    parse = pj.ParseOptions(explicit_schema=_SCHEMA, unexpected_field_behavior="ignore")
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            end = complete_end(f, size)
            if end == 0:
                return _SCHEMA.empty_table(), 0
            f.seek(0)
            source: Any = path if end == size else _Prefix(f, end)
            try:
                reader = pj.open_json(source, read_options=pj.ReadOptions(block_size=_BLOCK), parse_options=parse)
                return reader.read_all(), 0
            except pa.ArrowInvalid as fast_error:
                return _read_checked(path, end, parse, fast_error)
    except OSError as e:
        raise LedgerError(f"{path}: cannot read the ledger: {e.strerror or e}") from e


class _Prefix(io.RawIOBase):
    """The first ``limit`` bytes of an open file, so Arrow never sees a torn last line."""

    def __init__(self, f: IO[bytes], limit: int) -> None:
        self._f = f
        self._left = limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self._left)
        if want <= 0:
            return 0
        got = self._f.readinto(memoryview(buffer)[:want])  # type: ignore[attr-defined]
        self._left -= got
        return int(got)


class _Lines(io.RawIOBase):
    """A ledger with the unreadable lines left out, fed to Arrow as a stream."""

    def __init__(self, lines: Iterator[bytes]) -> None:
        self._lines = lines
        self._buffer = bytearray()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while len(self._buffer) < len(buffer):
            line = next(self._lines, None)
            if line is None:
                break
            self._buffer += line
        n = min(len(buffer), len(self._buffer))
        buffer[:n] = self._buffer[:n]
        del self._buffer[:n]
        return n


def _read_checked(path: Path, end: int, parse: pj.ParseOptions, fast_error: Exception) -> tuple[pa.Table, int]:
    """Slow path: find lines that are not JSON objects (e.g. a torn line a resume wrote after), skip them."""

    def lines() -> Iterator[bytes]:
        with path.open("rb") as f:
            offset = 0
            for line in f:
                offset += len(line)
                yield line
                if offset >= end:
                    return

    bad: set[int] = set()
    longest = 0
    for number, line in enumerate(lines(), 1):
        longest = max(longest, len(line))
        if not line.strip():
            continue
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError:
            bad.add(number)
            continue
        if not isinstance(row, dict):
            bad.add(number)
    good = (line for number, line in enumerate(lines(), 1) if number not in bad)
    block = max(_BLOCK, 1 << (2 * longest + 2).bit_length())
    try:
        reader = pj.open_json(_Lines(good), read_options=pj.ReadOptions(block_size=block), parse_options=parse)
        return reader.read_all(), len(bad)
    except pa.ArrowInvalid as e:
        raise LedgerError(f"{path}: not a batchgate ledger: {e}") from fast_error


def _to_frame(table: pa.Table, ledgers: list[str]) -> pd.DataFrame:
    n = table.num_rows
    cols: dict[str, Any] = {
        "ledger": pd.Categorical.from_codes(table["ledger"].to_numpy(), categories=ledgers or ["?"])
    }
    cols["v"] = table["v"]
    cols["id"] = table["id"]
    for name in ("job", "run_id", "model", "status", "finish_reason"):
        cols[name] = table[name]
    for name in (
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        *_COSTS,
        "unconfirmed_completion_tokens",
        "unconfirmed_cost_usd",
        "attempts",
    ):
        cols[name] = table[name]
    cols["retry_causes"] = table["retry_causes"]
    cols["started_at"] = _timestamps(table["started_at"])
    cols["ttft_s"] = table["ttft_s"]
    cols["latency_s"] = table["latency_s"]
    error = table["error"]
    cols["error_type"] = pc.struct_field(error, "type")
    cols["error_status"] = pc.struct_field(error, "status")
    cols["error_message"] = pc.struct_field(error, "message")
    for name in _CATEGORIES:
        cols[name] = pc.dictionary_encode(cols[name])
    arrow = pa.table({k: v for k, v in cols.items() if k != "ledger"})
    frame = arrow.to_pandas(
        types_mapper={
            pa.int64(): pd.Int64Dtype(),
            pa.string(): pd.StringDtype("pyarrow"),
            pa.list_(pa.string()): pd.ArrowDtype(pa.list_(pa.string())),
        }.get,
        split_blocks=True,
    )
    frame.insert(0, "ledger", cols["ledger"])
    for name in _CATEGORIES:  # Arrow orders categories by first appearance; reports list them sorted
        frame[name] = frame[name].cat.reorder_categories(sorted(frame[name].cat.categories))
    attempts = frame["attempts"]
    frame.insert(frame.columns.get_loc("attempts") + 1, "retries", (attempts.fillna(0) - 1).clip(lower=0))
    started = frame["started_at"]
    frame.insert(
        frame.columns.get_loc("started_at") + 1,
        "finished_at",
        (started + pd.to_timedelta(frame["latency_s"], unit="s")).astype("datetime64[us, UTC]"),
    )
    frame["day"] = _days(started)
    frame["latest"] = ~frame.duplicated(["ledger", "id"], keep="last") if n else pd.Series([], dtype=bool)
    frame["unconfirmed_estimate_usd"] = np.nan
    return frame


def _timestamps(column: pa.ChunkedArray) -> pa.ChunkedArray | pa.Array:
    stamp = pa.timestamp("us", "UTC")
    try:
        return pc.cast(column, stamp)
    except pa.ArrowInvalid:
        # Arrow's cast takes ISO-8601 with Z or an offset; anything odder, pandas parses (NaT if not a time).
        text = pd.Series(column.to_pandas(), copy=False)
        parsed = pd.to_datetime(text, format="ISO8601", utc=True, errors="coerce")
        return pa.array(parsed.astype("datetime64[us, UTC]"), type=stamp)


def _days(started: pd.Series) -> pd.Categorical:
    """UTC calendar day of each start, built from a few unique day numbers (strftime per row is slow)."""
    stamps = started.to_numpy(dtype="datetime64[us]", na_value=np.datetime64("NaT"))
    days = stamps.astype("datetime64[D]")
    valid = ~np.isnat(days)
    unique, inverse = np.unique(days[valid], return_inverse=True)
    codes = np.full(len(days), -1, dtype=np.int32)
    codes[valid] = inverse
    return pd.Categorical.from_codes(codes, categories=[str(d) for d in unique])


def _price_unconfirmed(frame: pd.DataFrame) -> dict[str, float]:
    """Estimate cut attempts the ledger left unpriced (``unconfirmed_cost_usd`` null) per model.

    The price per completion token comes from the model's confirmed rows: the least-squares fit
    ``total_cost ~ a*prompt_tokens + b*completion_tokens`` when it is well conditioned and positive,
    else the ratio ``sum(total_cost) / sum(completion_tokens)``.  Returns the learnt prices.
    """
    cut = frame["unconfirmed_completion_tokens"].fillna(0).to_numpy(dtype=np.int64)
    unpriced = frame["unconfirmed_cost_usd"].isna().to_numpy(dtype=bool) & (cut > 0)
    if not unpriced.any():
        return {}
    models = frame["model"].cat.codes.to_numpy()
    prompt = frame["prompt_tokens"].to_numpy(dtype=np.float64, na_value=np.nan)
    completion = frame["completion_tokens"].to_numpy(dtype=np.float64, na_value=np.nan)
    cost = frame["total_cost_usd"].to_numpy(dtype=np.float64, na_value=np.nan)
    confirmed = (cost > 0) & (completion > 0) & ~np.isnan(prompt)
    prices: dict[str, float] = {}
    estimate = np.full(len(frame), np.nan)
    for code in np.unique(models[unpriced]):
        if code < 0:  # no model recorded: nothing to learn from
            continue
        mine = confirmed & (models == code)
        price = _learn_price(prompt[mine], completion[mine], cost[mine])
        if price is None:
            continue
        prices[str(frame["model"].cat.categories[code])] = price
        rows = unpriced & (models == code)
        estimate[rows] = price * cut[rows]
    frame["unconfirmed_estimate_usd"] = estimate
    return prices


def _learn_price(prompt: np.ndarray, completion: np.ndarray, cost: np.ndarray) -> float | None:
    if not len(cost):
        return None
    if len(cost) >= 2:
        (a, b), _, rank, singular = np.linalg.lstsq(np.column_stack([prompt, completion]), cost, rcond=None)
        # Collinear token counts (a fixed prompt/answer ratio) cannot separate the two prices.
        if rank == 2 and singular[0] < 1e6 * singular[-1] and b > 0 and a >= -1e-9 * b:
            return float(b)
    return math.fsum(cost) / math.fsum(completion)


# -- aggregation -------------------------------------------------------------------------------------


class _Columns:
    """The ledger as plain numpy arrays, nulls resolved once for every grouping."""

    def __init__(self, frame: pd.DataFrame) -> None:
        def ints(name: str) -> np.ndarray:
            return np.asarray(frame[name].fillna(0).to_numpy(dtype=np.int64))

        def floats(name: str) -> np.ndarray:
            values: np.ndarray = np.asarray(frame[name].to_numpy(dtype=np.float64, na_value=np.nan))
            return np.where(np.isnan(values), 0.0, values)

        self.latest = frame["latest"].to_numpy(dtype=bool)
        self.ok = frame["status"].eq("ok").to_numpy(dtype=bool, na_value=False)
        self.failed = frame["status"].eq("failed").to_numpy(dtype=bool, na_value=False)
        self.latency = frame["latency_s"].to_numpy(dtype=np.float64, na_value=np.nan)
        self.ttft = frame["ttft_s"].to_numpy(dtype=np.float64, na_value=np.nan)
        ledger_ints = ("attempts", "retries", "prompt_tokens", "completion_tokens", "total_tokens")
        self.ints = {name: ints(name) for name in (*ledger_ints, "unconfirmed_completion_tokens")}
        self.floats = {name: floats(name) for name in _COSTS}
        known = floats("unconfirmed_cost_usd")
        estimate = floats("unconfirmed_estimate_usd")
        self.floats["unconfirmed_cost_usd"] = known + estimate  # one of the two is 0 on every row
        self.floats["unconfirmed_estimated_usd"] = estimate
        unpriced = frame["unconfirmed_cost_usd"].isna() & frame["unconfirmed_estimate_usd"].isna()
        tokens = self.ints["unconfirmed_completion_tokens"]
        self.ints["unconfirmed_unpriced_tokens"] = np.where(unpriced.to_numpy(dtype=bool), tokens, 0)
        # Throughput: completion tokens per second of request latency, over ok rows that have both.
        has_tokens = frame["completion_tokens"].notna().to_numpy(dtype=bool)
        throughput = self.ok & (np.nan_to_num(self.latency) > 0) & has_tokens
        self.ints["tps_tokens"] = np.where(throughput, self.ints["completion_tokens"], 0)
        self.floats["tps_seconds"] = np.where(throughput, self.latency, 0.0)


_INT_SUMS = (
    "attempts",
    "retries",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "unconfirmed_completion_tokens",
    "unconfirmed_unpriced_tokens",
    "tps_tokens",
)
_FLOAT_SUMS = (*_COSTS, "unconfirmed_cost_usd", "unconfirmed_estimated_usd", "tps_seconds")


def _spans(codes: np.ndarray, groups: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Row order that puts each group's rows together, and each group's [start, end) in that order."""
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(groups + 1))
    return order, list(itertools.pairwise(bounds.tolist()))


def _sums(cols: _Columns, codes: np.ndarray, groups: int) -> dict[str, np.ndarray | list[float]]:
    """Additive metrics per group, summing every row once: the finest grouping, combined later."""
    order, spans = _spans(codes, groups)
    out: dict[str, np.ndarray | list[float]] = {
        "requests": np.bincount(codes[cols.latest], minlength=groups),
        "ok": np.bincount(codes[cols.latest & cols.ok], minlength=groups),
        "failed": np.bincount(codes[cols.latest & cols.failed], minlength=groups),
        "rows": np.bincount(codes, minlength=groups),
    }
    for name in _INT_SUMS:
        values = cols.ints[name]
        out[name] = np.zeros(groups, np.int64) if not values.any() else np.add.reduceat(values[order], _starts(spans))
    for name in _FLOAT_SUMS:
        values = cols.floats[name]
        if not values.any():
            out[name] = [0.0] * groups
            continue
        ordered = values[order]
        parts = [ordered[a:b] for a, b in spans]
        if name == "tps_seconds":  # a rate's denominator: pairwise summation is plenty
            out[name] = [float(part.sum()) for part in parts]
        else:  # money: exact; zeros (failed rows, whole runs without cut streams) add nothing
            out[name] = [math.fsum(part[part != 0]) for part in parts]
    return out


def _starts(spans: list[tuple[int, int]]) -> np.ndarray:
    return np.array([a for a, _ in spans], dtype=np.intp)


def _combine(sums: dict[str, Any], mapping: np.ndarray, groups: int) -> dict[str, list[Any]]:
    """Roll the finest groups' sums up to coarser groups: integers add, money re-summed with fsum.

    fsum of correctly rounded partials stays within ~1e-16 relative of the fsum over all rows.
    """
    order, spans = _spans(mapping, groups)
    out: dict[str, list[Any]] = {}
    for name, values in sums.items():
        if isinstance(values, np.ndarray):
            total = np.zeros(groups, dtype=np.int64)
            np.add.at(total, mapping, values.astype(np.int64))
            out[name] = total.tolist()
        else:
            ordered = [values[i] for i in order.tolist()]
            out[name] = [math.fsum(ordered[a:b]) for a, b in spans]
    return out


def _metrics(cols: _Columns, sums: dict[str, list[Any]], codes: np.ndarray | None, groups: int) -> dict[str, list[Any]]:
    """Summary columns for one level from its sums; percentiles from the rows (``codes`` None: one group)."""
    m = {name: sums[name] for name in SUMMARY_METRICS if name in sums}
    m["cost_per_1k_requests_usd"] = [
        c / r * 1000 if r else math.nan for c, r in zip(sums["total_cost_usd"], sums["requests"], strict=True)
    ]
    m["cost_per_1m_tokens_usd"] = [
        c / t * 1e6 if t else math.nan for c, t in zip(sums["total_cost_usd"], sums["total_tokens"], strict=True)
    ]
    if codes is None:
        order, spans = np.arange(len(cols.latency)), [(0, len(cols.latency))]
    else:
        order, spans = _spans(codes, groups)
    for name, values in (("latency", cols.latency), ("ttft", cols.ttft)):
        ordered = values[order]
        rows = []
        for a, b in spans:
            part = ordered[a:b]
            part = part[~np.isnan(part)]
            rows.append(np.percentile(part, _PCTS).tolist() if len(part) else [math.nan] * len(_PCTS))
        for i, q in enumerate(_PCTS):
            m[f"{name}_p{q}_s"] = [row[i] for row in rows]
    m["tokens_per_s"] = [
        t / s if s > 0 else math.nan for t, s in zip(sums["tps_tokens"], sums["tps_seconds"], strict=True)
    ]
    return {name: m[name] for name in SUMMARY_METRICS}


def _summarise(frame: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """Rows per ``by`` group, then per day (when the data spans days and ``day`` is not a key), then totals."""
    cols = _Columns(frame)
    per_day = frame["day"].dropna().nunique() > 1 and "day" not in by
    key_columns = [*by, "day"] if per_day else list(by)
    n = len(frame)
    if key_columns and n:
        fine_codes, fine_labels = _group(frame, key_columns)
    else:
        fine_codes, fine_labels = np.zeros(n, dtype=np.int64), [()]
    fine = _sums(cols, fine_codes, len(fine_labels))
    # Any row of a fine group tells which coarser group the whole fine group belongs to.
    one_row = np.zeros(len(fine_labels), dtype=np.int64)
    one_row[fine_codes] = np.arange(n)

    parts = []
    levels: list[tuple[str, list[str]]] = []
    if by and n:
        levels.append(("group", list(by)))
    if per_day:
        levels.append(("day", ["day"]))
    levels.append(("total", []))
    for level, keys in levels:
        if keys:
            codes, labels = _group(frame, keys)
            mapping = codes[one_row]
        else:
            codes, labels, mapping = None, [()], np.zeros(len(fine_labels), dtype=np.int64)
        metrics = _metrics(cols, _combine(fine, mapping, len(labels)), codes, len(labels))
        data: dict[str, Any] = {"level": [level] * len(labels)}
        for name in key_columns:
            if name in keys:
                i = keys.index(name)
                data[name] = [NONE if _missing(label[i]) else str(label[i]) for label in labels]
            else:
                data[name] = [ALL] * len(labels)
        data.update(metrics)
        parts.append(pd.DataFrame(data))
    summary = pd.concat(parts, ignore_index=True)
    for name in ["level", *key_columns]:
        summary[name] = summary[name].astype(object)
    return summary


def _group(frame: pd.DataFrame, keys: Sequence[str]) -> tuple[np.ndarray, list[tuple[Any, ...]]]:
    grouped = frame.groupby(list(keys), observed=True, dropna=False, sort=True)
    codes = grouped.ngroup().to_numpy(dtype=np.int64)
    index = grouped.size().index
    labels = [label if isinstance(label, tuple) else (label,) for label in index]
    return codes, labels


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def _totals(loaded: _Loaded, summary: pd.DataFrame) -> dict[str, float | int]:
    frame = loaded.frame
    row = summary[summary["level"] == "total"].iloc[0]
    totals: dict[str, float | int] = {}
    for name in SUMMARY_METRICS:
        value = row[name]
        totals[name] = int(value) if isinstance(value, (int, np.integer)) else float(value)
    totals["ledgers"] = len(loaded.ledgers)
    totals["runs"] = int(frame.groupby(["ledger", "run_id"], observed=True).ngroups) if len(frame) else 0
    totals["days"] = int(frame["day"].nunique())
    totals["wall_s"] = _wall_seconds(frame)
    totals["skipped_lines"] = loaded.skipped_lines
    causes = _retry_causes(frame)
    totals["rate_limited"] = int(causes.get("rate_limited", 0))
    return totals


def _wall_seconds(frame: pd.DataFrame) -> float:
    """Sum over runs of first start to last finish: the time runs took, not the gaps between them."""
    if not len(frame):
        return 0.0
    ends = frame["finished_at"].fillna(frame["started_at"])
    spans = (
        pd.DataFrame({"ledger": frame["ledger"], "run": frame["run_id"], "start": frame["started_at"], "end": ends})
        .groupby(["ledger", "run"], observed=True, dropna=False)
        .agg(start=("start", "min"), end=("end", "max"))
    )
    seconds = (spans["end"] - spans["start"]).dt.total_seconds().dropna()
    return math.fsum(seconds.to_numpy())


def _retry_causes(frame: pd.DataFrame) -> dict[str, int]:
    """Failed attempts per cause, over every row's ``retry_causes``."""
    if not len(frame):
        return {}
    flat = pc.list_flatten(pa.array(frame["retry_causes"].array))  # ArrowDtype: no copy
    counts = pc.value_counts(flat.drop_null()) if len(flat) else []
    out = {str(item["values"]): int(item["counts"]) for item in (c.as_py() for c in counts)}
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


# -- writing -----------------------------------------------------------------------------------------


def build_reports(
    paths: Sequence[str | Path],
    out_dir: Path | None = None,
    *,
    by: Sequence[str] = ("job", "model"),
    formats: Sequence[str] = REPORT_FORMATS,
) -> ReportResult:
    """Read the ledgers under ``paths`` and write the reports into ``out_dir``, each file atomically.

    ``out_dir`` defaults to the ledger's own directory when there is one ledger.  Writes
    ``requests.parquet`` and ``summary.parquet`` (parquet), ``summary.csv`` (csv), ``report.html`` (html).
    Returns the files written, the totals and a terminal table.
    Raises ``InputError`` for bad keys/formats, no ledger found, or several ledgers without ``out_dir``;
    ``LedgerError`` for an unreadable ledger.
    """
    keys = _check_keys(by)
    kinds = _check_formats(formats)
    ledgers = find_ledgers(paths)
    if out_dir is None:
        if len(ledgers) > 1:
            raise InputError(
                f"found {len(ledgers)} ledgers; a report over several runs needs an output directory (--out)"
            )
        out_dir = ledgers[0].parent
    out_dir = Path(out_dir)
    loaded = _load(ledgers)
    summary = _summarise(loaded.frame, keys)
    totals = _totals(loaded, summary)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{out_dir}: cannot create the report directory: {e.strerror or e}") from e
    # Each file is rendered in memory, then written through a temporary file and renamed into place.
    outputs: list[tuple[str, Callable[[], bytes]]] = []
    if "parquet" in kinds:
        outputs.append(("requests.parquet", lambda: _parquet_bytes(loaded.frame)))
        outputs.append(("summary.parquet", lambda: _parquet_bytes(summary)))
    if "csv" in kinds:
        outputs.append(("summary.csv", lambda: summary.to_csv(index=False).encode()))
    if "html" in kinds:
        outputs.append(("report.html", lambda: _page(loaded, summary, keys, totals).encode()))
    files: list[Path] = []
    for name, render in outputs:
        path = out_dir / name
        try:
            write_atomic(path, render())
        except OSError as e:
            raise InputError(f"{path}: cannot write the report: {e.strerror or e}") from e
        files.append(path)
    return ReportResult(files=files, totals=totals, table=_text_table(summary, keys, totals))


def _split(values: Sequence[str] | str) -> list[str]:
    """``("job", "model")``, ``["job,model"]`` and ``"job,model"`` all mean the same (CLI flags)."""
    items = [values] if isinstance(values, str) else list(values)
    return [part.strip() for item in items for part in item.split(",") if part.strip()]


def _check_keys(by: Sequence[str]) -> list[str]:
    keys = _split(by)
    unknown = [k for k in keys if k not in REPORT_KEYS]
    if unknown:
        raise InputError(f"cannot group by {', '.join(unknown)}; choose from {', '.join(REPORT_KEYS)}")
    return list(dict.fromkeys(keys))


def _check_formats(formats: Sequence[str]) -> set[str]:
    kinds = set(_split(formats))
    if "all" in kinds:
        return set(REPORT_FORMATS)
    unknown = sorted(kinds - set(REPORT_FORMATS))
    if unknown or not kinds:
        raise InputError(f"unknown report format {', '.join(unknown) or '(none)'}; choose from csv, parquet, html, all")
    return kinds


def _parquet_bytes(frame: pd.DataFrame) -> bytes:
    table = pa.Table.from_pandas(frame, preserve_index=False)
    meta = table.schema.metadata or {}
    if b"pandas" in meta:
        # pandas cannot read back its own name for Arrow list dtypes ("list<item: string>[pyarrow]");
        # record them as object columns, which read back as arrays of strings.
        pandas_meta = orjson.loads(meta[b"pandas"])
        for column in pandas_meta.get("columns", []):
            if str(column.get("numpy_type", "")).startswith("list<"):
                column["numpy_type"] = "object"
        table = table.replace_schema_metadata({**meta, b"pandas": orjson.dumps(pandas_meta)})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return bytes(sink.getvalue().to_pybytes())


# -- terminal table ----------------------------------------------------------------------------------


def _text_table(summary: pd.DataFrame, by: Sequence[str], totals: dict[str, float | int]) -> str:
    """Group rows (the costliest first when there are many) and the totals, under ~100 columns."""
    groups = summary[summary["level"] == "group"]
    shown = groups.sort_values("total_cost_usd", ascending=False, kind="stable").head(_MAX_TABLE_ROWS)
    shown = shown.sort_index()
    numeric = [
        ("requests", "requests", "{:,}"),
        ("failed", "failed", "{:,}"),
        ("total_tokens", "tokens", "{:,}"),
        ("total_cost_usd", "cost_usd", "{:,.6f}"),
        ("unconfirmed_cost_usd", "unconf_usd", "{:,.6f}"),
        ("latency_p50_s", "p50_s", "{:.2f}"),
        ("latency_p95_s", "p95_s", "{:.2f}"),
    ]
    rows: list[list[str]] = []
    for _, r in shown.iterrows():
        rows.append([str(r[k]) for k in by] + [_fmt(fmt, r[name]) for name, _, fmt in numeric])
    if "model" in by and max((len(r[by.index("model")]) for r in rows), default=0) > 24:
        for r in rows:  # "org/name": the name alone is what tells models apart in a narrow column
            r[by.index("model")] = r[by.index("model")].rsplit("/", 1)[-1]
    total = summary[summary["level"] == "total"].iloc[0]
    total_row = ["TOTAL"] + [""] * (len(by) - 1) if by else []
    total_row += [_fmt(fmt, total[name]) for name, _, fmt in numeric]
    header = list(by) + [label for _, label, _ in numeric]
    widths = [max(len(header[i]), *(len(r[i]) for r in [*rows, total_row])) for i in range(len(header))]
    key_room = 100 - sum(widths[len(by) :]) - 2 * (len(header) - 1)
    while by and sum(widths[: len(by)]) > key_room and max(widths[: len(by)]) > 10:
        widest = widths.index(max(widths[: len(by)]))  # narrow the widest key column first
        widths[widest] -= 1

    def line(cells: list[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            if i < len(by):
                out.append(_shorten(cell, widths[i]).ljust(widths[i]))
            else:
                out.append(cell.rjust(widths[i]))
        return "  ".join(out).rstrip()

    lines = [line(header), line(["-" * w for w in widths])]
    lines += [line(r) for r in rows]
    if len(groups) > len(shown):
        lines.append(f"… {len(groups) - len(shown)} more groups in summary.csv")
    if rows:
        lines.append(line(["-" * w for w in widths]))
    lines.append(line(total_row))
    lines += _notes(totals)
    return "\n".join(lines)


def _shorten(text: str, width: int) -> str:
    """Cut the middle, not the end: model names differ in their tails (``…-32B-FP8``)."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head) :]


def _notes(totals: dict[str, float | int]) -> list[str]:
    notes = []
    if totals["unconfirmed_estimated_usd"]:
        notes.append(
            f"unconf_usd includes ${totals['unconfirmed_estimated_usd']:,.6f} estimated here from learnt prices; "
            "it is never in cost_usd"
        )
    if totals["unconfirmed_unpriced_tokens"]:
        notes.append(
            f"{totals['unconfirmed_unpriced_tokens']:,} unconfirmed tokens have no learnt price: not in unconf_usd"
        )
    if totals["skipped_lines"]:
        notes.append(f"{totals['skipped_lines']:,} unreadable ledger lines were skipped")
    return notes


def _fmt(fmt: str, value: Any) -> str:
    if _missing(value):
        return "-"
    return fmt.format(value)


def _page(loaded: _Loaded, summary: pd.DataFrame, by: Sequence[str], totals: dict[str, float | int]) -> str:
    from batchgate.report_page import render_html  # matplotlib loads only when a page is asked for

    return render_html(loaded, summary, by, totals)
