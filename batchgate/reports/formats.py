"""Report files: the summary as CSV and Parquet with fixed types, files put in place atomically.

Every file is written to a temporary name beside its target and renamed over it, so a reader (or a
killed report) never leaves half a file; temporary files and scratch directories a killed report left
behind are removed by the next report into the same directory.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from batchgate.errors import InputError
from batchgate.ledger import write_atomic

from .data import SUMMARY_INTS, SUMMARY_METRICS

__all__ = ["clean_stale", "csv_number", "make_scratch", "scratch_path", "summary_csv", "summary_parquet", "write_file"]

# ledger.write_atomic's ".NAME.PID.tmp" and this package's ".report-PID.tmp" scratch directories.
_STALE = re.compile(r"^\.(?:.+\.(\d+)\.tmp|report-(\d+)\.tmp)$")


def csv_number(value: float) -> str:
    """A float as the shortest text that reads back to it at 15 significant digits: no float noise.

    Fifteen digits is what a double holds exactly in decimal, so every number the ledger wrote (the
    server's decimals) prints as written, and a sum prints without the 17th-digit noise of its binary
    rounding (``0.0014625600000000001`` -> ``0.00146256``); the ledger and the Parquet keep the exact value.
    """
    if math.isnan(value):
        return ""
    text = f"{value:.15g}"
    return text if "e" in text or "." in text or "inf" in text else text + ".0"


def summary_csv(summary: Sequence[dict[str, Any]], key_columns: Sequence[str]) -> bytes:
    """The summary table as CSV: integers as integers, floats through ``csv_number``, nulls empty."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    columns = ["level", *key_columns, *SUMMARY_METRICS]
    writer.writerow(columns)
    for row in summary:
        cells = []
        for name in columns:
            value = row[name]
            cells.append(csv_number(value) if isinstance(value, float) else str(value))
        writer.writerow(cells)
    return buffer.getvalue().encode()


def summary_parquet(summary: Sequence[dict[str, Any]], key_columns: Sequence[str], path: Path) -> None:
    """The summary table as Parquet at ``path``: keys strings, counts int64, money and times float64, always.

    Written by DuckDB rather than pyarrow: pyarrow imports pandas (~0.2 s) the first time it turns
    Python values into an array, which every end-of-run report would pay for a few dozen rows.
    """
    import duckdb

    columns = {"level": "VARCHAR", **dict.fromkeys(key_columns, "VARCHAR")}
    columns.update({m: "BIGINT" if m in SUMMARY_INTS else "DOUBLE" for m in SUMMARY_METRICS})
    names = list(columns)
    con = duckdb.connect()
    try:
        con.execute(f"CREATE TABLE summary ({', '.join(f'{_ident(n)} {t}' for n, t in columns.items())})")
        if summary:
            marks = ", ".join("?" for _ in names)
            con.executemany(f"INSERT INTO summary VALUES ({marks})", [[row[n] for n in names] for row in summary])
        target = "'" + str(path).replace("'", "''") + "'"
        # A branch that can (but never does) add a null row keeps every column nullable: DuckDB
        # marks a column required when its statistics prove it has no null.
        nulls = ", ".join(f"CAST(NULL AS {t})" for t in columns.values())
        query = f"SELECT * FROM summary UNION ALL SELECT {nulls} WHERE random() > 2"
        con.execute(f"COPY ({query}) TO {target} (FORMAT parquet)")
    finally:
        con.close()


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically; ``InputError`` naming the path when the disk refuses."""
    try:
        write_atomic(path, data)
    except OSError as e:
        raise InputError(f"{path}: cannot write the report: {e.strerror or e}") from e


def scratch_path(out_dir: Path) -> Path:
    """This process's scratch directory inside ``out_dir`` (same file system: its files are renamed into place)."""
    return out_dir / f".report-{os.getpid()}.tmp"


def make_scratch(path: Path) -> None:
    """Create ``path`` empty (a crashed report of a process with our pid may have left it)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()


def clean_stale(out_dir: Path) -> list[Path]:
    """Remove temporary files and scratch directories of reports that were killed (their process is gone)."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in out_dir.iterdir():
            match = _STALE.match(entry.name)
            if not match:
                continue
            pid = int(match.group(1) or match.group(2))
            if pid != os.getpid() and _alive(pid):
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
