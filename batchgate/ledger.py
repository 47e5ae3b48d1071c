"""The run ledger: ``DIR/results.jsonl``, append-only, one JSON row per finished request.

It is the sole record of run state: resume reads it back, reports aggregate it.  Rows are
appended with ``O_APPEND`` in batches (everything finished in one event-loop tick goes out in
one ``write``), so ``kill -9`` can lose at most the rows of the current tick, and a crash can
leave at most one torn last line, which :meth:`Ledger.open` sets aside on the next run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt
import orjson

from .errors import LedgerError, OutputLocked

__all__ = ["LEDGER_NAME", "IdSet", "Ledger", "ResumeIndex", "complete_end", "lock_output_dir", "write_atomic"]

LEDGER_NAME = "results.jsonl"
TORN_NAME = "results.torn.jsonl"
LOCK_NAME = ".batchgate.lock"
_FSYNC_EVERY_S = 1.0


class IdSet:
    """A compact set of prompt ids: 128-bit BLAKE2 digests as two sorted uint64 columns.

    A resume over ten million finished prompts must not hold ten million strings (~1 GB as a
    set); 16 bytes an id is 160 MB. At 128 bits a wrong "already done" is not a practical
    concern (~1e-24 for ten million ids); the one approximation, two ids sharing the first 64
    bits (~1e-6 at ten million), errs the safe way: the answer is bought again, never skipped.
    """

    def __init__(self, ids: Iterable[str] = ()) -> None:
        self._pending = bytearray()
        self._hi: npt.NDArray[np.uint64] = np.empty(0, dtype=np.uint64)
        self._lo: npt.NDArray[np.uint64] = np.empty(0, dtype=np.uint64)
        for rid in ids:
            self.add(rid)

    def add(self, rid: str) -> None:
        self._pending += _digest(rid)

    def __len__(self) -> int:
        self._freeze()
        return len(self._hi)

    def __contains__(self, rid: object) -> bool:
        return isinstance(rid, str) and bool(self.contains([rid])[0])

    def contains(self, ids: Sequence[str]) -> npt.NDArray[np.bool_]:
        """Membership of many ids at once (one vectorised search)."""
        self._freeze()
        if not len(self._hi) or not ids:
            return np.zeros(len(ids), dtype=bool)
        keys = np.frombuffer(b"".join(_digest(rid) for rid in ids), dtype=np.uint64).reshape(-1, 2)
        at = np.minimum(np.searchsorted(self._hi, keys[:, 0]), len(self._hi) - 1)
        found: npt.NDArray[np.bool_] = (self._hi[at] == keys[:, 0]) & (self._lo[at] == keys[:, 1])
        return found

    def _freeze(self) -> None:
        if not self._pending:
            return
        fresh = np.frombuffer(self._pending, dtype=np.uint64).reshape(-1, 2)
        hi = np.concatenate([self._hi, fresh[:, 0]])
        lo = np.concatenate([self._lo, fresh[:, 1]])
        del fresh
        self._pending = bytearray()
        order = np.argsort(hi, kind="stable")
        self._hi, self._lo = hi[order], lo[order]


def _digest(rid: str) -> bytes:
    return hashlib.blake2b(rid.encode("utf-8", "surrogatepass"), digest_size=16).digest()


@dataclass(slots=True)
class ResumeIndex:
    """What an existing ledger says about its ids."""

    ok_ids: IdSet = field(default_factory=IdSet)
    rows: int = 0
    failed_rows: int = 0
    unreadable_lines: int = 0
    torn_bytes: int = 0  # size of a torn last line set aside into results.torn.jsonl


class Ledger:
    """Appends rows to ``results.jsonl`` and reads it back for resume."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.path = out_dir / LEDGER_NAME
        self._fd: int | None = None
        self._pending: list[bytes] = []
        self._last_fsync = time.monotonic()

    def open(self) -> ResumeIndex:
        """Repair a torn tail, index the existing rows, and open for appending."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        index = ResumeIndex()
        if self.path.exists():
            index.torn_bytes = self._repair_tail()
            _index_rows(self.path, index)
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise LedgerError(f"{self.path}: cannot open for writing ({exc.strerror})") from None
        return index

    def append(self, row: dict[str, Any]) -> None:
        """Queue a row; :meth:`flush` writes every queued row in one system call."""
        self._pending.append(orjson.dumps(row) + b"\n")

    @property
    def pending(self) -> int:
        return len(self._pending)

    def flush(self, *, sync: bool = False) -> None:
        """Write queued rows; raises LedgerError (rows stay queued) when the disk refuses them."""
        if self._pending and self._fd is not None:
            _write_all(self._fd, b"".join(self._pending), self.path)
            self._pending.clear()
        if self._fd is not None and (sync or time.monotonic() - self._last_fsync >= _FSYNC_EVERY_S):
            try:
                os.fsync(self._fd)
            except OSError as exc:
                raise LedgerError(f"{self.path}: cannot sync to disk ({exc.strerror})") from None
            self._last_fsync = time.monotonic()

    def close(self) -> None:
        if self._fd is not None:
            try:
                self.flush(sync=True)
            finally:
                os.close(self._fd)
                self._fd = None
                self._pending.clear()

    def _repair_tail(self) -> int:
        """Make the file end on a row boundary; keep a complete row that only lacks its newline."""
        with open(self.path, "r+b") as f:
            size = f.seek(0, os.SEEK_END)
            end = complete_end(f, size)
            if end == size:
                if size:
                    f.seek(size - 1)
                    if f.read(1) != b"\n":
                        f.write(b"\n")
                return 0
            f.seek(end)
            tail = f.read()
            with open(self.out_dir / TORN_NAME, "ab") as torn:
                torn.write(tail + b"\n")
            f.truncate(end)
            return len(tail)


def complete_end(f: IO[bytes], size: int) -> int:
    """Offset just past the last complete row of a ledger of ``size`` bytes.

    A last line without its newline counts as complete when it parses as a row (the crash
    came between the row and its newline); otherwise it is torn and the offset stops before it.
    """
    if size == 0:
        return 0
    f.seek(size - 1)
    if f.read(1) == b"\n":
        return size
    pos, start, window = size, 0, 1 << 16
    while pos > 0:  # walk back to the last newline, a bounded window at a time
        lo = max(0, pos - window)
        f.seek(lo)
        nl = f.read(pos - lo).rfind(b"\n")
        if nl >= 0:
            start = lo + nl + 1
            break
        pos = lo
    f.seek(start)
    try:
        row = orjson.loads(f.read(size - start))
    except orjson.JSONDecodeError:
        row = None
    return size if isinstance(row, dict) and "id" in row and "status" in row else start


def _index_rows(path: Path, index: ResumeIndex) -> None:
    loads = orjson.loads
    add_ok = index.ok_ids.add
    with open(path, "rb") as f:
        for line in f:
            if len(line) <= 1:
                continue
            try:
                row = loads(line)
                rid = row["id"]
                status = row["status"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                index.unreadable_lines += 1
                continue
            index.rows += 1
            if status == "ok":
                add_ok(rid)
            else:
                index.failed_rows += 1


def _write_all(fd: int, data: bytes, path: Path) -> None:
    """Append all of ``data`` or nothing: a write the disk cut short is taken back off the file."""
    view = memoryview(data)
    done = 0
    while done < len(data):
        try:
            done += os.write(fd, view[done:])
        except OSError as exc:
            if done:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, os.fstat(fd).st_size - done)
            raise LedgerError(f"{path}: cannot append ({exc.strerror})") from None


def write_atomic(path: Path, data: bytes | Iterable[bytes]) -> None:
    """Write then rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            if isinstance(data, bytes):
                f.write(data)
            else:
                for part in data:
                    f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class _DirLock:
    def __init__(self, fd: int) -> None:
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1


def lock_output_dir(out_dir: Path) -> _DirLock:
    """Take the directory's lock or raise OutputLocked naming the holder's pid.

    ``flock`` is released by the kernel when its holder dies, so a ``kill -9`` never leaves a
    lock that blocks the next run.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            pid = int(os.pread(fd, 32, 0).decode().strip() or 0) or None
        except (OSError, ValueError):
            pid = None
        os.close(fd)
        raise OutputLocked(str(out_dir), pid) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return _DirLock(fd)
