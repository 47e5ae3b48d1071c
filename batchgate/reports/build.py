"""``build_reports``: find the ledgers, stage them, aggregate, write every asked-for file atomically."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from batchgate.errors import InputError
from batchgate.ledger import write_atomic

from . import formats as report_files
from . import page
from .data import REPORT_FORMATS, REPORT_KEYS, ReportData
from .load import Staged, connect, find_ledgers, join_parts, sql_text, stage
from .summary import (
    PARTITION_KEY,
    REQUESTS_VIEW,
    aggregate,
    chart_data,
    learn_prices,
    open_requests,
    write_requests,
    write_requests_by_day,
)
from .text import text_table

if TYPE_CHECKING:
    import duckdb
    import pandas as pd

__all__ = ["ALL_DIR", "DAY_DATASET", "ReportResult", "build_reports", "default_out_dir", "load_ledger"]

#: Where a report over several runs goes by default, under their common parent.
ALL_DIR = "_all"
#: The requests as a hive dataset partitioned by day (``build_reports(partition_by_day=True)``).
DAY_DATASET = "requests"
REQUESTS_FILE = "requests.parquet"


@dataclass
class ReportResult:
    """What ``build_reports`` wrote and the headline numbers, for the CLI to print."""

    files: list[Path]
    totals: dict[str, float | int]
    table: str
    data: ReportData


def build_reports(
    paths: Sequence[str | Path],
    out_dir: Path | None = None,
    *,
    by: Sequence[str] = ("job", "model"),
    formats: Sequence[str] = REPORT_FORMATS,
    width: int | None = None,
    partition_by_day: bool = False,
) -> ReportResult:
    """Read the ledgers under ``paths`` and write the reports into ``out_dir``, each file atomically.

    ``out_dir`` defaults to the ledger's own directory for one ledger, and to ``_all/`` under the
    runs' common parent for several.  Writes ``requests.parquet`` and ``summary.parquet`` (parquet),
    ``summary.csv`` (csv), ``report.html`` (html).  With ``partition_by_day`` the requests go to
    ``requests/day=YYYY-MM-DD/part-N.parquet`` (a hive dataset) instead of ``requests.parquet``;
    either layout removes the other from ``out_dir``, so no stale copy is left.  ``width`` is the
    terminal table's width (default: the terminal's).  Returns the files written, the totals and the terminal table.
    Raises ``InputError`` for bad keys/formats or no ledger found; ``LedgerError`` for an unreadable ledger.
    """
    keys = _check_keys(by)
    kinds = _check_formats(formats)
    ledgers = find_ledgers(paths)
    out = Path(out_dir) if out_dir is not None else default_out_dir(paths, ledgers)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{out}: cannot create the report directory: {e.strerror or e}") from e
    report_files.clean_stale(out)
    scratch = report_files.scratch_path(out)
    files: list[Path] = []
    try:  # from before the directory exists: a signal between its mkdir and here would leave it behind
        report_files.make_scratch(scratch)
        con = connect(scratch)
        try:
            staged = stage(con, ledgers, scratch)
            prices = learn_prices(con, staged)
            open_requests(con, staged, prices)
            data = aggregate(con, staged, keys, prices)
            if "html" in kinds:
                chart_data(con, data)
            source = _source_of(staged) if "parquet" in kinds and not partition_by_day else None
            unchanged = source is not None and _stamp_matches(out / REQUESTS_FILE, source)
            if "parquet" in kinds and partition_by_day:
                try:
                    write_requests_by_day(con, scratch / DAY_DATASET)
                except OSError as e:  # a full or failing disk: name the report, not a scratch path
                    raise InputError(f"{out / DAY_DATASET}: cannot write the report: {e.strerror or e}") from e
            elif (
                "parquet" in kinds and not unchanged and not _parts_are_the_table(con, staged, scratch / REQUESTS_FILE)
            ):
                write_requests(con, scratch / REQUESTS_FILE)
                source = None  # written by DuckDB: no stamp
        finally:
            con.close()
        if "parquet" in kinds and partition_by_day:
            files.append(_swap_dir_into_place(scratch / DAY_DATASET, out / DAY_DATASET, scratch))
            _remove(out / REQUESTS_FILE)
        elif "parquet" in kinds:
            if unchanged:  # the very bytes it holds would be written again: leave it be
                files.append(out / REQUESTS_FILE)
            else:
                files.append(_move_into_place(scratch / REQUESTS_FILE, out / REQUESTS_FILE))
                _stamp(out / REQUESTS_FILE, source)
            _remove(out / DAY_DATASET)
        if "parquet" in kinds:
            report_files.summary_parquet(data.summary, data.key_columns, scratch / "summary.parquet")
            files.append(_move_into_place(scratch / "summary.parquet", out / "summary.parquet"))
        if "csv" in kinds:
            files.append(_write(out / "summary.csv", report_files.summary_csv(data.summary, data.key_columns)))
        if "html" in kinds:
            files.append(_write(out / "report.html", page.render_html(data).encode()))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    columns = width if width is not None else shutil.get_terminal_size((100, 24)).columns
    return ReportResult(files=files, totals=data.totals, table=text_table(data, columns), data=data)


def default_out_dir(paths: Sequence[str | Path], ledgers: Sequence[Path]) -> Path:
    """One ledger: its own directory.  Several: ``_all/`` under the one directory given, else their common parent."""
    if len(ledgers) == 1:
        return ledgers[0].parent
    if len(paths) == 1 and Path(paths[0]).is_dir():
        return Path(paths[0]) / ALL_DIR
    common = Path(os.path.commonpath([str(p.parent.resolve()) for p in ledgers]))
    return common / ALL_DIR


def load_ledger(paths: Sequence[Path]) -> pd.DataFrame:
    """Read ledgers into one typed requests table (the columns of ``requests.parquet``), one row per ledger row.

    Adds ``latest`` (the last row of its (ledger, id, sample): request counts use only those) and
    ``unconfirmed_estimate_usd`` (this report's price for cut attempts the ledger left unpriced).
    Damaged lines are left out (``build_reports`` lists them).  Raises ``LedgerError`` for an unreadable ledger.
    """
    import pandas as pd

    with tempfile.TemporaryDirectory(prefix="batchgate-load-") as tmp:
        work = Path(tmp)
        con = connect(work)
        try:
            staged = stage(con, [Path(p) for p in paths], work, cache=False)  # a read leaves no trace
            open_requests(con, staged, learn_prices(con, staged))
            query = f"SELECT * FROM {REQUESTS_VIEW} ORDER BY seq"
            table = con.sql(query).to_arrow_table()
        finally:
            con.close()
    import pyarrow as pa

    # Nullable integers stay integers (Int64), not floats with NaN.
    frame: pd.DataFrame = table.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)
    return frame


def _parts_as_they_stand(staged: Staged) -> bool:
    """Whether the parts' bytes are the requests table: each part's ``ledger`` column names its run
    directory as reached now (a part staged through another path holds another name)."""
    return bool(staged.parts) and all(p.recorded == str(p.ledger.parent) for p in staged.parts)


def _parts_are_the_table(con: duckdb.DuckDBPyConnection, staged: Staged, out: Path) -> bool:
    """Write ``out`` from the parts' bytes when they hold the table as it stands (each part's ``ledger``
    column names its run directory as reached now): one part is copied, several joined row group after
    row group, with no re-encoding.  False, having written nothing, when DuckDB has to write it.

    A joined file is read back (its footer, every row group's row count, the last row) before it
    counts: a footer rewritten wrong is never a report, it is written again by DuckDB.
    """
    if not _parts_as_they_stand(staged):
        return False
    if len(staged.parts) == 1:
        shutil.copyfile(staged.parts[0].path, out)
        return True
    if not join_parts([p.path for p in staged.parts], out):
        return False
    import duckdb

    rows = sum(p.rows for p in staged.parts)
    try:
        found = con.execute(
            f"""SELECT (SELECT count(*) FROM read_parquet({sql_text(str(out))})),
                       (SELECT sum(row_group_num_rows) FROM (SELECT DISTINCT row_group_id, row_group_num_rows
                                                             FROM parquet_metadata({sql_text(str(out))}))),
                       (SELECT id FROM read_parquet({sql_text(str(out))}, file_row_number = true)
                        WHERE file_row_number = {rows - 1})"""
        ).fetchone()
        last = con.execute(
            f"SELECT id FROM read_parquet({sql_text(str(staged.parts[-1].path))}, file_row_number = true) "
            f"WHERE file_row_number = {staged.parts[-1].rows - 1}"
        ).fetchone()
    except duckdb.Error:
        found = last = None
    if found is None or last is None or found[0] != rows or found[1] != rows or found[2] != last[0]:
        out.unlink(missing_ok=True)
        return False
    return True


def _source_of(staged: Staged) -> list[list[Any]] | None:
    """What ``requests.parquet`` is made of when its bytes are the parts' (each part's path, size,
    time and inode); None when DuckDB has to write it."""
    if not _parts_as_they_stand(staged):
        return None
    try:
        stats = [(p.path, p.path.stat()) for p in staged.parts]
    except OSError:
        return None
    return [[str(path), st.st_size, st.st_mtime_ns, st.st_ino] for path, st in stats]


def _stamp_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.from")


def _identity_of(target: Path) -> list[int] | None:
    try:
        st = os.stat(target, follow_symlinks=False)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino] if stat.S_ISREG(st.st_mode) else None


def _stamp_matches(target: Path, source: list[list[Any]]) -> bool:
    """Whether ``target`` is, untouched, what an earlier report wrote from these very parts."""
    try:
        stamp = orjson.loads(_stamp_path(target).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return False
    here = _identity_of(target)
    return isinstance(stamp, dict) and here is not None and stamp.get("parts") == source and stamp.get("file") == here


def _stamp(target: Path, source: list[list[Any]] | None) -> None:
    """Remember what ``target`` was written from (a convenience: without it the next report writes it again)."""
    path = _stamp_path(target)
    here = _identity_of(target)
    with contextlib.suppress(OSError):
        if source is None or here is None:
            path.unlink(missing_ok=True)
        else:
            write_atomic(path, orjson.dumps({"parts": source, "file": here}))


def _move_into_place(src: Path, dst: Path) -> Path:
    try:
        with src.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(src, dst)
    except OSError as e:
        raise InputError(f"{dst}: cannot write the report: {e.strerror or e}") from e
    return dst


def _swap_dir_into_place(src: Path, dst: Path, scratch: Path) -> Path:
    """Put the directory ``src`` at ``dst``: the old one moves aside into ``scratch`` first (one
    rename each; a reader between them finds no dataset, never a half-written one)."""
    try:
        for part in src.rglob("*.parquet"):
            with part.open("rb+") as f:
                os.fsync(f.fileno())
        if dst.is_symlink() or dst.is_file():
            dst.unlink()
        elif dst.exists():
            os.replace(dst, scratch / "previous-requests")
        os.replace(src, dst)
    except OSError as e:
        raise InputError(f"{dst}: cannot write the report: {e.strerror or e}") from e
    return dst


def _remove(path: Path) -> None:
    """The other layout of the requests, now stale: a file or symlink, or a directory holding only
    ``day=...`` partitions (anything else there is not ours and stays)."""
    try:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir() and all(entry.name.startswith(f"{PARTITION_KEY}=") for entry in path.iterdir()):
            shutil.rmtree(path)
    except OSError as e:
        raise InputError(f"{path}: cannot remove the previous report: {e.strerror or e}") from e


def _write(path: Path, data: bytes) -> Path:
    report_files.write_file(path, data)
    return path


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
