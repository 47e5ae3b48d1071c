"""Finding ledgers and reading them into one typed, ordered Parquet staging file with DuckDB.

The fast path is one parallel DuckDB scan of every ledger (``read_json`` with fixed column types,
insertion order kept, so the staging file's row number is the ledger order).  A ledger DuckDB
refuses (a torn tail, garbage, NUL bytes, a wrongly typed field) or that holds a non-string id goes
down a checked path: its complete prefix is tried as is, then line by line, and the lines that are
not ledger rows are left out and reported with their line numbers.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import orjson

from batchgate.errors import InputError, LedgerError
from batchgate.ledger import LEDGER_NAME, complete_end, write_atomic
from batchgate.models import LEDGER_VERSION

from .data import SkippedLine

if TYPE_CHECKING:
    import duckdb

__all__ = [
    "CACHE_DIR",
    "LEDGER_COLUMNS",
    "REQUEST_COLUMNS",
    "Staged",
    "StagedPart",
    "connect",
    "copy_ordered",
    "find_ledgers",
    "sql_text",
    "stage",
]

#: Ledger fields the reports read, with the DuckDB type each is read as (v1 and v2; a missing key is null).
#: ``id`` is read as JSON so a number where a string belongs can be told apart and refused.
LEDGER_COLUMNS: dict[str, str] = {
    "v": "BIGINT",
    "id": "JSON",
    "sample": "BIGINT",
    "job": "VARCHAR",
    "run_id": "VARCHAR",
    "model": "VARCHAR",
    "status": "VARCHAR",
    "finish_reason": "VARCHAR",
    "prompt_tokens": "BIGINT",
    "completion_tokens": "BIGINT",
    "total_tokens": "BIGINT",
    "base_cost_usd": "DOUBLE",
    "platform_fee_usd": "DOUBLE",
    "total_cost_usd": "DOUBLE",
    "unconfirmed_completion_tokens": "BIGINT",
    "unconfirmed_cost_usd": "DOUBLE",
    "attempts": "BIGINT",
    "retry_causes": "VARCHAR[]",
    "started_at": "VARCHAR",
    "ttft_s": "DOUBLE",
    "latency_s": "DOUBLE",
    "error": "STRUCT(type VARCHAR, status BIGINT, message VARCHAR, code VARCHAR, request_id VARCHAR)",
    "request_id": "VARCHAR",
    "fingerprint": "VARCHAR",
    "cost_status": "VARCHAR",
    "cached": "BOOLEAN",
    "cached_cost_usd": "DOUBLE",
    "reasoning": "VARCHAR",
    "tool_calls": "JSON",
}
_MAX_OBJECT = 16 << 20  # DuckDB's per-line limit (its default); a longer line goes down the checked path
_PARQUET_OPTIONS = "FORMAT parquet, COMPRESSION snappy, ROW_GROUP_SIZE 50000"
_MEMORY_LIMIT = os.environ.get("BATCHGATE_REPORT_MEMORY", "160MB")


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


# -- DuckDB ------------------------------------------------------------------------------------------


def connect(workdir: Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with a bounded buffer pool spilling into ``workdir``, UTC, order kept."""
    import duckdb

    con = duckdb.connect(":memory:")
    con.execute(f"SET memory_limit = {sql_text(_MEMORY_LIMIT)}")
    con.execute(f"SET temp_directory = {sql_text(str(workdir / 'spill'))}")
    con.execute("SET preserve_insertion_order = true")  # the staging file's row order is the ledger order
    con.execute("SET TimeZone = 'UTC'")
    con.execute("SET enable_progress_bar = false")
    return con


def copy_ordered(con: duckdb.DuckDBPyConnection, query: str, out: Path) -> None:
    """``COPY (query) TO out`` as snappy Parquet, rows in the query's order, on one DuckDB thread.

    An order-keeping COPY on two threads under the bounded buffer pool holds batches that finished
    out of order until their turn: measured over 1M ledger rows it took 1.5-2x the wall time, and more
    memory, than one thread doing the same work.
    """
    threads = con.execute("SELECT current_setting('threads')").fetchone()
    con.execute("SET threads = 1")
    try:
        con.execute(f"COPY ({query}) TO {sql_text(str(out))} ({_PARQUET_OPTIONS})")
    finally:
        con.execute(f"SET threads = {int(threads[0]) if threads else 1}")


def sql_text(value: str) -> str:
    """A SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


# -- staging -----------------------------------------------------------------------------------------


#: Beside each ledger: its rows already staged as Parquet parts, one per appended byte range.
CACHE_DIR = ".report-cache"
_INDEX = "index.json"
_CACHE_FORMAT = 2
_TAIL = 1 << 16  # bytes before a part's end whose hash proves the ledger still begins the same way


@dataclass(frozen=True, slots=True)
class StagedPart:
    """Typed rows (``REQUEST_COLUMNS``) of one ledger's byte range, in ledger order."""

    path: Path
    rows: int
    ledger: Path
    recorded: str  # the ``ledger`` column as the part holds it (the run directory as it was reached then)


@dataclass
class Staged:
    """The ledgers' rows in ledger order: Parquet parts, ledger after ledger, range after range."""

    parts: list[StagedPart]
    ledgers: list[Path]
    skipped: list[SkippedLine] = field(default_factory=list)


def stage(con: duckdb.DuckDBPyConnection, ledgers: Sequence[Path], workdir: Path, *, cache: bool = True) -> Staged:
    """Stage ``ledgers`` as typed Parquet; damaged lines are left out and listed, never fatal.

    With ``cache``, each ledger's parts are kept in ``CACHE_DIR`` beside it and reused while the
    ledger still begins with the bytes they were read from (same file, same tail hash): only bytes
    appended since the last report are parsed, so a report costs in proportion to what a run added.
    Raises ``LedgerError`` for a ledger that cannot be read at all, or one written by a newer batchgate.
    """
    ledgers = list({p.resolve(): p for p in ledgers}.values())  # the same ledger twice counts once
    parts: list[StagedPart] = []
    skipped: list[SkippedLine] = []
    for number, ledger in enumerate(ledgers):
        mine, bad = _stage_ledger(con, ledger, workdir / f"ledger-{number}", cache)
        parts += mine
        skipped += bad
    if parts:
        files = "[" + ", ".join(sql_text(str(p.path)) for p in parts) + "]"
        newest = con.execute(f"SELECT max(v) FROM read_parquet({files})").fetchone()
        if newest and newest[0] is not None and newest[0] > LEDGER_VERSION:
            raise LedgerError(
                f"a ledger was written by a newer batchgate (format v{newest[0]}, "
                f"this one reads up to v{LEDGER_VERSION}); upgrade batchgate"
            )
    return Staged(parts=parts, ledgers=ledgers, skipped=skipped)


def _stage_ledger(
    con: duckdb.DuckDBPyConnection, ledger: Path, scratch: Path, cache: bool
) -> tuple[list[StagedPart], list[SkippedLine]]:
    scratch.mkdir(parents=True, exist_ok=True)
    home = ledger.parent / CACHE_DIR
    try:
        with ledger.open("rb") as f:
            st = os.fstat(f.fileno())
            size = st.st_size
            end = complete_end(f, size)
            index = _valid_index(home, st, f, end) if cache else []
            f.seek(max(0, end - _TAIL))
            tail = hashlib.blake2b(f.read(end - max(0, end - _TAIL)), digest_size=16).hexdigest()
    except OSError as e:
        raise LedgerError(f"{ledger}: cannot read the ledger: {e.strerror or e}") from e
    start = index[-1]["end"] if index else 0
    if start < end:
        where = home if cache and _writable(home) else scratch
        if not index and where == home:
            for old in home.glob("part-*.parquet"):  # a ledger that changed: its old parts mean nothing
                old.unlink(missing_ok=True)
        if start == 0 and end == size:
            source = ledger
        else:
            source = scratch / f"range-{start}.jsonl"
            _copy_range(ledger, source, start, end)
        staged = scratch / f"range-{start}.parquet"
        bad = _stage_source(con, source, ledger, staged, start)
        rows = con.execute(f"SELECT count(*) FROM read_parquet({sql_text(str(staged))})").fetchone()
        name = f"part-{start:015d}-{end:015d}.parquet"
        shutil.move(staged, where / name)
        index.append(
            {
                "start": start,
                "end": end,
                "file": name,
                "rows": int(rows[0]) if rows else 0,
                "tail": tail,
                "name": str(ledger.parent),
                "skipped": [[s.line, s.reason] for s in bad],
                "dir": str(where),
            }
        )
        if where == home:
            body = {"format": _CACHE_FORMAT, "dev": st.st_dev, "ino": st.st_ino, "parts": index}
            with contextlib.suppress(OSError):
                write_atomic(home / _INDEX, orjson.dumps(body))
                kept = {e["file"] for e in index}
                for stray in home.glob("part-*.parquet"):  # a part whose index a killed report never wrote
                    if stray.name not in kept:
                        stray.unlink(missing_ok=True)
    parts = [StagedPart(Path(e["dir"]) / e["file"], e["rows"], ledger, str(e["name"])) for e in index]
    skipped = [SkippedLine(ledger, int(line), str(reason)) for e in index for line, reason in e["skipped"]]
    if end < size:  # a torn last line: a crash mid-write, or a run still writing; read once it is whole
        reason = "torn last line (a crash mid-write, or a run still writing)"
        skipped.append(SkippedLine(ledger, _count_lines(ledger, end) + 1, reason))
    return parts, skipped


def _valid_index(home: Path, st: os.stat_result, f: IO[bytes], end: int) -> list[dict[str, Any]]:
    """The cached parts when they still describe the ledger's first bytes; [] otherwise."""
    try:
        body = orjson.loads((home / _INDEX).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return []
    try:
        if body.get("format") != _CACHE_FORMAT or (body["dev"], body["ino"]) != (st.st_dev, st.st_ino):
            return []
        parts: list[dict[str, Any]] = body["parts"]
        expected = 0
        for part in parts:
            if part["start"] != expected or not isinstance(part["name"], str) or not (home / part["file"]).is_file():
                return []
            part["dir"] = str(home)  # wherever the ledger is reached from now
            expected = part["end"]
        if not parts or expected > end:
            return []
        f.seek(max(0, expected - _TAIL))
        tail = hashlib.blake2b(f.read(expected - max(0, expected - _TAIL)), digest_size=16).hexdigest()
        return parts if tail == parts[-1]["tail"] else []
    except (KeyError, TypeError, AttributeError):
        return []


def _writable(home: Path) -> bool:
    try:
        home.mkdir(exist_ok=True)
    except OSError:
        return False
    return os.access(home, os.W_OK)


def _stage_source(
    con: duckdb.DuckDBPyConnection, source: Path, ledger: Path, out: Path, start: int
) -> list[SkippedLine]:
    """Stage one byte range (``source``, starting at ``start`` in ``ledger``); return its damaged lines."""
    import duckdb

    name = str(ledger.parent)
    try:
        _copy(con, [str(source)], [name], out)
        if _ids_are_strings(con, out):
            return []
    except duckdb.InterruptException:  # a signal, not a damaged ledger
        raise
    except duckdb.Error:
        pass
    kept = out.with_suffix(".rows.jsonl")
    good, bad = _filter_lines(source, source.stat().st_size, kept)
    base = _count_lines(ledger, start) if bad and start else 0
    if not good and bad:
        first = bad[0]
        raise LedgerError(f"{ledger}:{first[0] + base}: not a batchgate ledger ({first[1]}; no line is a ledger row)")
    try:
        _copy(con, [str(kept)], [name], out)
    except duckdb.Error as e:
        raise LedgerError(f"{ledger}: not a batchgate ledger: {e}") from e
    return [SkippedLine(ledger, n + base, why) for n, why in bad]


#: ``requests.parquet``: one row per ledger row in ledger order, every column with one fixed type whatever a run
#: held (DuckDB types; v1 ledgers read the v2 columns as null).
REQUEST_COLUMNS: dict[str, str] = {
    "ledger": "VARCHAR",
    "v": "BIGINT",
    "id": "VARCHAR",
    "sample": "BIGINT",
    "job": "VARCHAR",
    "run_id": "VARCHAR",
    "model": "VARCHAR",
    "status": "VARCHAR",
    "finish_reason": "VARCHAR",
    "prompt_tokens": "BIGINT",
    "completion_tokens": "BIGINT",
    "total_tokens": "BIGINT",
    "base_cost_usd": "DOUBLE",
    "platform_fee_usd": "DOUBLE",
    "total_cost_usd": "DOUBLE",
    "unconfirmed_completion_tokens": "BIGINT",
    "unconfirmed_cost_usd": "DOUBLE",
    "attempts": "BIGINT",
    "retries": "BIGINT",
    "retry_causes": "VARCHAR[]",
    "started_at": "TIMESTAMPTZ",
    "finished_at": "TIMESTAMPTZ",
    "day": "DATE",
    "ttft_s": "DOUBLE",
    "latency_s": "DOUBLE",
    "error_type": "VARCHAR",
    "error_status": "BIGINT",
    "error_message": "VARCHAR",
    "error_code": "VARCHAR",
    "request_id": "VARCHAR",
    "fingerprint": "VARCHAR",
    "cost_status": "VARCHAR",
    "cached": "BOOLEAN",
    "cached_cost_usd": "DOUBLE",
    "has_reasoning": "BOOLEAN",
    "has_tool_calls": "BOOLEAN",
}
_SOURCE_EXPR: dict[str, str] = {
    "id": "CASE WHEN json_type(id) = 'VARCHAR' THEN id ->> '$' END",
    "sample": "coalesce(sample, 0)",
    "retries": "greatest(coalesce(attempts, 0) - 1, 0)",
    "started_at": "ts",
    "finished_at": "ts + to_microseconds(CAST(round(latency_s * 1e6) AS BIGINT))",
    "day": "CAST(ts AS DATE)",
    "error_type": "error.type",
    "error_status": "error.status",
    "error_message": "error.message",
    "error_code": "error.code",
    "request_id": "coalesce(request_id, error.request_id)",
    # Only presence of reasoning / tool calls is reported: the texts stay in the ledger.
    "has_reasoning": "coalesce(reasoning, '') <> ''",
    "has_tool_calls": "coalesce(json_array_length(tool_calls), 0) > 0",
}


def _copy(con: duckdb.DuckDBPyConnection, sources: list[str], names: list[str], out: Path) -> None:
    """One parallel scan of every source, in order, into the typed ``out`` (``names``: each source's run dir)."""
    if not sources:
        raise LedgerError("no ledger to read")
    columns = "{" + ", ".join(f"{sql_text(k)}: {sql_text(t)}" for k, t in LEDGER_COLUMNS.items()) + "}"
    files = "[" + ", ".join(sql_text(s) for s in sources) + "]"
    which = " ".join(f"WHEN {sql_text(s)} THEN {sql_text(n)}" for s, n in zip(sources, names, strict=True))
    exprs = dict(_SOURCE_EXPR, ledger=f"CASE filename {which} END")
    select = ",\n".join(f"CAST({exprs.get(name, name)} AS {kind}) AS {name}" for name, kind in REQUEST_COLUMNS.items())
    query = f"""SELECT {select}
        FROM (SELECT *, try_cast(started_at AS TIMESTAMPTZ) AS ts
              FROM read_json({files}, format = 'newline_delimited', columns = {columns}, filename = true,
                             maximum_object_size = {_MAX_OBJECT}))"""
    copy_ordered(con, query, out)


def _ids_are_strings(con: duckdb.DuckDBPyConnection, out: Path) -> bool:
    row = con.execute(f"SELECT count(*) FROM read_parquet({sql_text(str(out))}) WHERE id IS NULL").fetchone()
    return row is not None and row[0] == 0


def _count_lines(path: Path, end: int) -> int:
    lines = 0
    with path.open("rb") as f:
        left = end
        while left > 0:
            chunk = f.read(min(left, 16 << 20))
            if not chunk:
                break
            lines += chunk.count(b"\n")
            left -= len(chunk)
    return lines


def _copy_range(src: Path, dst: Path, start: int, end: int) -> None:
    with src.open("rb") as f, dst.open("wb") as out:
        f.seek(start)
        left = end - start
        while left > 0:
            chunk = f.read(min(left, 16 << 20))
            if not chunk:
                break
            out.write(chunk)
            left -= len(chunk)


def _lines(path: Path, end: int) -> Iterator[bytes]:
    with path.open("rb") as f:
        offset = 0
        for line in f:
            if offset >= end:
                return
            offset += len(line)
            yield line


def _filter_lines(ledger: Path, end: int, out: Path) -> tuple[int, list[tuple[int, str]]]:
    """Copy the lines that are ledger rows to ``out``; return how many, and (line, reason) of the others."""
    good = 0
    bad: list[tuple[int, str]] = []
    with out.open("wb") as f:
        for number, line in enumerate(_lines(ledger, end), 1):
            if not line.strip():
                continue
            reason = _row_problem(line)
            if reason:
                bad.append((number, reason))
                continue
            f.write(line if line.endswith(b"\n") else line + b"\n")
            good += 1
    return good, bad


_INT, _FLOAT, _TEXT, _BOOL = "BIGINT", "DOUBLE", "VARCHAR", "BOOLEAN"
_ERROR_FIELDS = {"type": _TEXT, "status": _INT, "message": _TEXT, "code": _TEXT, "request_id": _TEXT}


def _row_problem(line: bytes) -> str | None:
    """Why a line is not a ledger row DuckDB would read with ``LEDGER_COLUMNS``, or None."""
    try:
        row = orjson.loads(line)
    except orjson.JSONDecodeError:
        return "not JSON" if b"\x00" not in line else "not JSON (NUL bytes)"
    if not isinstance(row, dict):
        return f"a JSON {type(row).__name__}, not an object"
    if not isinstance(row.get("id"), str):
        return "id is not a string"
    for name, kind in LEDGER_COLUMNS.items():
        value = row.get(name)
        if value is None or name == "id":
            continue
        if not _fits(value, kind):
            return f"{name} has the wrong type ({type(value).__name__})"
    return None


def _fits(value: Any, kind: str) -> bool:
    if kind == _INT:
        return (isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63) or (
            isinstance(value, float) and value.is_integer()
        )
    if kind == _FLOAT:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == _TEXT:
        return isinstance(value, str)
    if kind == _BOOL:
        return isinstance(value, bool)
    if kind == "VARCHAR[]":
        return isinstance(value, list) and all(v is None or isinstance(v, str) for v in value)
    if kind == "JSON":
        return True
    if kind.startswith("STRUCT"):
        return isinstance(value, dict) and all(
            value.get(k) is None or _fits(value[k], t) for k, t in _ERROR_FIELDS.items()
        )
    return True
