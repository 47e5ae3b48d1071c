"""Finding ledgers and reading them into one typed, ordered Parquet staging file with DuckDB.

The fast path is one DuckDB scan of every ledger (``read_json`` with fixed column types, insertion
order kept on one thread, so the staging file's row number is the ledger order).  A ledger DuckDB
refuses (a torn tail, garbage, NUL bytes, a wrongly typed field) or that holds a non-string id goes
down a checked path: its complete prefix is tried as is, then line by line, and the lines that are
not ledger rows are left out and reported with their line numbers.

Parts of one schema are joined into one Parquet file by copying their row groups as bytes
(``join_parts``): ``requests.parquet`` after an append costs a file copy, not a re-encoding.
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
    "join_parts",
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


# -- parts into one Parquet file, byte for byte -------------------------------------------------------
#
# The parts of one report share one schema (``REQUEST_COLUMNS``, written by one COPY), so their row
# groups can follow one another in one file unchanged: the column chunks are copied as bytes and only
# the footer (Thrift compact protocol) is rewritten, with every absolute offset of a later part moved
# by where its bytes now begin.  A footer this code does not fully understand is never rewritten.

_MAGIC = b"PAR1"
# (struct, field id) of the absolute file offsets: ColumnChunk.file_offset, RowGroup.file_offset,
# ColumnMetaData data_page / index_page / dictionary_page / bloom_filter offsets.
_CHUNK_OFFSETS = frozenset({2})
_GROUP_OFFSETS = frozenset({5})
_META_OFFSETS = frozenset({9, 10, 11, 14})
_PAGE_INDEX = frozenset({4, 5, 6, 7})  # ColumnChunk offset/column index: pages listed by offset, refused


class _Unsupported(ValueError):
    """A footer outside what ``join_parts`` rewrites."""


def _varint(b: bytes, i: int) -> tuple[int, int]:
    shift = out = 0
    while True:
        c = b[i]
        i += 1
        out |= (c & 0x7F) << shift
        if c < 0x80:
            return out, i
        shift += 7


def _read_value(b: bytes, i: int, kind: int) -> tuple[Any, int]:
    if kind in (1, 2):
        return kind == 1, i
    if kind == 3:
        return b[i], i + 1
    if kind in (4, 5, 6):
        v, i = _varint(b, i)
        return (v >> 1) ^ -(v & 1), i
    if kind == 7:
        return b[i : i + 8], i + 8
    if kind == 8:
        n, i = _varint(b, i)
        return b[i : i + n], i + n
    if kind in (9, 10):
        head = b[i]
        i += 1
        n, item = head >> 4, head & 0x0F
        if n == 15:
            n, i = _varint(b, i)
        if item in (1, 2):
            raise _Unsupported("a list of booleans")
        items = []
        for _ in range(n):
            v, i = _read_value(b, i, item)
            items.append(v)
        return (kind, item, items), i
    if kind == 12:
        return _read_struct(b, i)
    raise _Unsupported(f"Thrift type {kind}")


def _read_struct(b: bytes, i: int) -> tuple[list[list[Any]], int]:
    fields: list[list[Any]] = []
    last = 0
    while True:
        head = b[i]
        i += 1
        if head == 0:
            return fields, i
        kind, delta = head & 0x0F, head >> 4
        if delta:
            fid = last + delta
        else:
            v, i = _varint(b, i)
            fid = (v >> 1) ^ -(v & 1)
        value, i = _read_value(b, i, kind)
        fields.append([fid, kind, value])
        last = fid


def _put_varint(out: bytearray, n: int) -> None:
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _write_value(out: bytearray, kind: int, value: Any) -> None:
    if kind in (4, 5, 6):
        _put_varint(out, (value << 1) ^ (value >> 63))
    elif kind == 3:
        out.append(value)
    elif kind == 7:
        out += value
    elif kind == 8:
        _put_varint(out, len(value))
        out += value
    elif kind in (9, 10):
        _, item, items = value
        if len(items) < 15:
            out.append(len(items) << 4 | item)
        else:
            out.append(0xF0 | item)
            _put_varint(out, len(items))
        for v in items:
            _write_value(out, item, v)
    elif kind == 12:
        _write_struct(out, value)
    else:
        raise _Unsupported(f"Thrift type {kind}")


def _write_struct(out: bytearray, fields: list[list[Any]]) -> None:
    last = 0
    for fid, kind, value in fields:
        if kind in (1, 2):
            kind = 1 if value else 2
        if 0 < fid - last <= 15:
            out.append((fid - last) << 4 | kind)
        else:
            out.append(kind)
            _put_varint(out, (fid << 1) ^ (fid >> 63))
        if kind not in (1, 2):
            _write_value(out, kind, value)
        last = fid
    out.append(0)


def _footer(path: Path) -> tuple[list[list[Any]], int]:
    """A Parquet file's decoded ``FileMetaData`` and where it begins; ``_Unsupported`` if not re-encodable."""
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(size - 8)
        tail = f.read(8)
        length = int.from_bytes(tail[:4], "little")
        if tail[4:] != _MAGIC or length + 12 > size:
            raise _Unsupported("not a Parquet file")
        f.seek(size - 8 - length)
        raw = f.read(length)
    meta, end = _read_struct(raw, 0)
    encoded = bytearray()
    _write_struct(encoded, meta)
    if end != length or bytes(encoded) != raw:
        raise _Unsupported("a footer that does not read back as written")
    return meta, size - 8 - length


def _field(fields: list[list[Any]], fid: int) -> Any:
    return next((value for f, _, value in fields if f == fid), None)


def _shift(fields: list[list[Any]], offsets: frozenset[int], delta: int) -> None:
    for f in fields:
        if f[0] in offsets and f[2]:
            f[2] += delta


def join_parts(parts: Sequence[Path], out: Path) -> bool:
    """Write the rows of ``parts``, in order, as the one Parquet file ``out``, copying their row groups as
    bytes (no decoding, no re-encoding).  Returns False, having written nothing, when the parts do not
    share one schema of nullable columns or a footer holds what this does not rewrite (page indexes,
    encryption, file paths): the caller then writes ``out`` with DuckDB.
    """
    if not parts:
        return False
    try:
        footers = [_footer(p) for p in parts]
    except (OSError, _Unsupported, IndexError):
        return False
    first = footers[0][0]
    schema = _field(first, 2)
    if schema is None or any(_field(meta, 2) != schema for meta, _ in footers):
        return False
    if any(_field(element, 3) == 0 for element in schema[2][1:]):  # a REQUIRED column: not REQUEST_COLUMNS
        return False
    if {f[0] for f in first} - {1, 2, 3, 4, 5, 6, 7}:
        return False  # encryption or fields unknown here
    groups: list[list[list[Any]]] = []
    begin = 0  # where the current part's bytes after its magic land in ``out``
    for number, (meta, data_end) in enumerate(footers):
        delta = 0 if number == 0 else begin - len(_MAGIC)
        for group in _field(meta, 4)[2]:
            for chunk in _field(group, 1)[2]:
                if _field(chunk, 1) is not None or {f[0] for f in chunk} & _PAGE_INDEX:
                    return False
                _shift(chunk, _CHUNK_OFFSETS, delta)
                column = _field(chunk, 3)
                if column is None:
                    return False
                _shift(column, _META_OFFSETS, delta)
            _shift(group, _GROUP_OFFSETS, delta)
            if _field(group, 7) is not None:  # RowGroup.ordinal: renumbered
                next(f for f in group if f[0] == 7)[2] = len(groups)
            groups.append(group)
        begin += data_end - (0 if number == 0 else len(_MAGIC))
    meta = []
    for fid, kind, value in first:
        if fid == 3:
            value = sum(_field(m, 3) for m, _ in footers)
        elif fid == 4:
            value = (value[0], value[1], groups)
        meta.append([fid, kind, value])
    footer = bytearray()
    _write_struct(footer, meta)
    with out.open("wb") as f:
        for number, (path, (_, data_end)) in enumerate(zip(parts, footers, strict=True)):
            skip = 0 if number == 0 else len(_MAGIC)
            with path.open("rb") as src:
                _copy_bytes(src, f, skip, data_end - skip)
        f.write(footer + len(footer).to_bytes(4, "little") + _MAGIC)
    return True


def _copy_bytes(src: IO[bytes], dst: IO[bytes], start: int, length: int) -> None:
    dst.flush()
    done = 0
    try:
        while done < length:
            n = os.copy_file_range(src.fileno(), dst.fileno(), length - done, start + done)
            if n <= 0:
                break
            done += n
    except OSError:
        pass
    if done < length:  # no copy_file_range here: through user space
        src.seek(start + done)
        dst.seek(0, os.SEEK_END)
        left = length - done
        while left > 0:
            chunk = src.read(min(left, 16 << 20))
            if not chunk:
                raise OSError(f"{src.name}: shorter than its footer says")
            dst.write(chunk)
            left -= len(chunk)
    dst.seek(0, os.SEEK_END)
