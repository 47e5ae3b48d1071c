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
import itertools
import math
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import orjson

from .errors import LedgerError, OutputLocked

if TYPE_CHECKING:  # numpy is imported where an index holds answers: a fresh run never pays for it
    import numpy as np
    import numpy.typing as npt

    _U64 = npt.NDArray[np.uint64]
    _Bools = npt.NDArray[np.bool_]
    _Columns = tuple[_U64, _U64, _U64]

__all__ = [
    "LEDGER_NAME",
    "AnswerIndex",
    "DonePrefix",
    "IdSet",
    "IntentLog",
    "Ledger",
    "PossiblyBilled",
    "ResumeIndex",
    "complete_end",
    "ledger_spend",
    "lock_output_dir",
    "open_attempts",
    "possibly_billed_of",
    "read_possibly_billed",
    "row_key",
    "write_atomic",
]

LEDGER_NAME = "results.jsonl"
TORN_NAME = "results.torn.jsonl"
SPILL_NAME = "results.spill.jsonl"
LOCK_NAME = ".batchgate.lock"
INTENTS_DIR = "intents"
POSSIBLY_BILLED_NAME = "possibly_billed.jsonl"
INDEX_NAME = "results.index"
_FSYNC_EVERY_S = 1.0
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_KEEP_DAMAGED = 20  # line numbers of damaged rows kept for the message


class IdSet:
    """A compact set of prompt ids: 128-bit BLAKE2 digests as two sorted uint64 columns.

    A resume over ten million finished prompts must not hold ten million strings (~1 GB as a
    set); 16 bytes an id is 160 MB. At 128 bits a wrong "already done" is not a practical
    concern (~1e-24 for ten million ids); the one approximation, two ids sharing the first 64
    bits (~1e-6 at ten million), errs the safe way: the answer is bought again, never skipped.
    """

    def __init__(self, ids: Iterable[str] = ()) -> None:
        import numpy as np

        self._pending = bytearray()
        self._hi: _U64 = np.empty(0, dtype=np.uint64)
        self._lo: _U64 = np.empty(0, dtype=np.uint64)
        for rid in ids:
            self.add(rid)

    def add(self, rid: str) -> None:
        self._pending += _digest(rid)

    def __len__(self) -> int:
        self._freeze()
        return len(self._hi)

    def __contains__(self, rid: object) -> bool:
        return isinstance(rid, str) and bool(self.contains([rid])[0])

    def contains(self, ids: Sequence[str]) -> _Bools:
        """Membership of many ids at once (one vectorised search)."""
        import numpy as np

        self._freeze()
        if not len(self._hi) or not ids:
            return np.zeros(len(ids), dtype=bool)
        keys = np.frombuffer(b"".join(_digest(rid) for rid in ids), dtype=np.uint64).reshape(-1, 2)
        at = np.minimum(np.searchsorted(self._hi, keys[:, 0]), len(self._hi) - 1)
        found: _Bools = (self._hi[at] == keys[:, 0]) & (self._lo[at] == keys[:, 1])
        return found

    def _freeze(self) -> None:
        if not self._pending:
            return
        import numpy as np

        fresh = np.frombuffer(self._pending, dtype=np.uint64).reshape(-1, 2)
        hi = np.concatenate([self._hi, fresh[:, 0]])
        lo = np.concatenate([self._lo, fresh[:, 1]])
        del fresh
        self._pending = bytearray()
        order = np.argsort(hi, kind="stable")
        self._hi, self._lo = hi[order], lo[order]


def _digest(rid: str) -> bytes:
    return hashlib.blake2b(rid.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def row_key(rid: str, sample: int = 0) -> str:
    """The ledger's key for one answer: the id alone for sample 0 (as v1 ledgers have it)."""
    return rid if not sample else f"{rid}\x00{sample}"


def _fp64(fingerprint: object) -> int:
    """64 bits of a fingerprint, 0 when the row has none (a v1 row: trusted as it is)."""
    if isinstance(fingerprint, str) and len(fingerprint) >= 16:
        try:
            return int(fingerprint[:16], 16) or 1
        except ValueError:
            return 1
    return 0


class AnswerIndex:
    """The ok answers of a ledger: key digest -> fingerprint of the request that bought it.

    The latest ok row of a key wins (a prompt re-run after an edit supersedes its old answer).
    24 bytes an answer, so ten million of them fit in 240 MB at most, with no strings kept.
    Empty (``columns is None``) it needs no numpy, so a first run does not import it.
    """

    def __init__(self) -> None:
        self._pending = bytearray()
        self._fps: list[int] = []
        self.columns: _Columns | None = None  # (hi, lo, fingerprint) sorted by key; None when empty

    def add(self, key: str, fingerprint: object = None) -> None:
        self._pending += _digest(key)
        self._fps.append(_fp64(fingerprint))

    def __len__(self) -> int:
        self._freeze()
        return 0 if self.columns is None else len(self.columns[0])

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and bool(self.contains([key])[0])

    def contains(self, keys: Sequence[str]) -> _Bools:
        """Whether each key has an ok row, whatever request bought it."""
        done, stale = self.lookup(keys, [""] * len(keys))
        return done | stale

    def lookup(self, keys: Sequence[str], fingerprints: Sequence[str]) -> tuple[_Bools, _Bools]:
        """(done, stale) per key: done = an ok row whose fingerprint matches (or is unknown);
        stale = an ok row bought for a request that has changed since."""
        import numpy as np

        self._freeze()
        n = len(keys)
        if self.columns is None or not len(self.columns[0]) or not n:
            none = np.zeros(n, dtype=bool)
            return none, none.copy()
        hi, lo, fps = self.columns
        q = np.frombuffer(b"".join(_digest(k) for k in keys), dtype=np.uint64).reshape(-1, 2)
        at = np.minimum(np.searchsorted(hi, q[:, 0]), len(hi) - 1)
        # Several keys may share the first 64 bits; walk forward over that run (rare).
        found = np.zeros(n, dtype=bool)
        fp = np.zeros(n, dtype=np.uint64)
        for step in range(4):
            idx = np.minimum(at + step, len(hi) - 1)
            hit = (~found) & (hi[idx] == q[:, 0]) & (lo[idx] == q[:, 1])
            found |= hit
            fp[hit] = fps[idx][hit]
        want = np.array([_fp64(f) for f in fingerprints], dtype=np.uint64)
        same = (fp == 0) | (want == 0) | (fp == want)
        return found & same, found & ~same

    def to_bytes(self) -> list[bytes]:
        """The three columns as little-endian uint64 bytes (``results.index``'s layout)."""
        self._freeze()
        if self.columns is None:
            return [b"", b"", b""]
        return [a.astype("<u8").tobytes() for a in self.columns]

    def _freeze(self) -> None:
        if not self._pending:
            return
        import numpy as np

        fresh = np.frombuffer(self._pending, dtype=np.uint64).reshape(-1, 2)
        new_fp = np.array(self._fps, dtype=np.uint64)
        if self.columns is None:
            hi, lo, fp = fresh[:, 0].copy(), fresh[:, 1].copy(), new_fp
        else:
            hi = np.concatenate([self.columns[0], fresh[:, 0]])
            lo = np.concatenate([self.columns[1], fresh[:, 1]])
            fp = np.concatenate([self.columns[2], new_fp])
        del fresh
        self._pending = bytearray()
        self._fps = []
        order = np.lexsort((lo, hi))  # stable: equal keys keep ledger order
        hi, lo, fp = hi[order], lo[order], fp[order]
        last = np.ones(len(hi), dtype=bool)  # keep the latest row of each key
        if len(hi) > 1:
            last[:-1] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
        self.columns = (hi[last], lo[last], fp[last])


@dataclass(slots=True)
class ResumeIndex:
    """What an existing ledger says about its answers."""

    answers: AnswerIndex = field(default_factory=AnswerIndex)
    rows: int = 0
    failed_rows: int = 0
    unreadable_lines: int = 0
    damaged_lines: list[int] = field(default_factory=list)  # the first few, 1-based
    torn_bytes: int = 0  # size of a torn last line set aside into results.torn.jsonl
    spilled_rows: int = 0  # rows folded back in from a spill file an earlier run left
    lines: int = 0  # lines of the ledger read (for the line numbers of damaged ones)
    prefix: tuple[int, int, int] | None = None  # (input, line, requests before it), all ok: start there
    prefix_tail: tuple[int, int] | None = None  # where reading resumes should the inputs grow (DonePrefix.tail)
    from_cache: bool = False  # the resume index beside the ledger covered most of it

    @property
    def ok_ids(self) -> AnswerIndex:
        return self.answers


class Ledger:
    """Appends rows to ``results.jsonl`` and reads it back for resume.

    Symlinks are refused (``O_NOFOLLOW``): a planted link must not make a run append to, or
    truncate, a file outside its output directory.
    """

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.path = out_dir / LEDGER_NAME
        self._fd: int | None = None
        self._pending: list[bytes] = []
        self._last_fsync = time.monotonic()
        self._dirty = False
        self._index: ResumeIndex | None = None
        self._open_size = 0  # the ledger's size once open() had read it: what the index's full part covers
        self._prefix: DonePrefix | None = None
        self._old_full: _OldFull | None = None
        self.spilled_to: Path | None = None

    def open(self, prefix_key: str | None = None, appended: tuple[str, int] | None = None) -> ResumeIndex:
        """Repair a torn tail, fold in spilled rows, index the existing rows, open for appending.

        ``prefix_key``: the identity of this run's inputs and settings; when the done prefix the
        last run stored has the same, only the answers beyond it are loaded (``index.prefix``).
        ``appended``: (the key before lines were appended to the inputs, the first input that
        grew): a prefix stored under that key holds too when it stops at or before that input.
        """
        _ensure_dir(self.out_dir)
        index = ResumeIndex()
        _refuse_symlink(self.path)
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW, 0o644)
        except OSError as exc:
            raise LedgerError(f"{self.path}: cannot open for writing ({exc.strerror})") from None
        index.torn_bytes = self._repair_tail()
        index.spilled_rows = self._fold_spills()
        start, lines, self._old_full = _load_index(self.out_dir / INDEX_NAME, self.path, index, prefix_key, appended)
        index.from_cache = start > 0
        _index_rows(self.path, index, start, lines)
        self._index = index
        self._open_size = self.path.stat().st_size
        return index

    def set_prefix(self, prefix: DonePrefix | None) -> None:
        """What :meth:`close` stores beside the answers for the next run's start."""
        self._prefix = prefix

    def append(self, row: dict[str, Any]) -> None:
        """Queue a row; :meth:`flush` writes every queued row in one system call."""
        self._pending.append(orjson.dumps(row) + b"\n")

    @property
    def pending(self) -> int:
        return len(self._pending)

    def flush(self, *, sync: bool = False) -> None:
        """Write queued rows; raises LedgerError (rows stay queued) when the disk refuses them.

        Without ``sync`` no fsync happens here: :meth:`sync` runs once a second off the event
        loop (the runner's job), so a slow disk never stalls the streams.
        """
        if self._pending and self._fd is not None:
            _write_all(self._fd, b"".join(self._pending), self.path)
            self._pending.clear()
            self._dirty = True
        if sync:
            self.sync()

    def sync(self) -> None:
        """fsync what was written; safe to call from a worker thread."""
        fd = self._fd
        if fd is None or not self._dirty:
            return
        self._dirty = False
        try:
            os.fsync(fd)
        except OSError as exc:
            raise LedgerError(f"{self.path}: cannot sync to disk ({exc.strerror})") from None
        self._last_fsync = time.monotonic()

    def close(self) -> None:
        """Write everything; rows the disk refuses go to a spill file, never nowhere.

        Raises LedgerError naming where the rows went when the ledger refused them.
        """
        if self._fd is None:
            return
        try:
            self.flush(sync=True)
        except LedgerError as exc:
            where = self._spill()
            self._pending.clear()
            os.close(self._fd)
            self._fd = None
            if where is None:
                raise LedgerError(f"{exc}; the rows could not be saved anywhere") from None
            self.spilled_to = where
            raise LedgerError(f"{exc}; its rows were saved to {where} and the next run folds them in") from None
        os.close(self._fd)
        self._fd = None
        if self._index is not None:
            with contextlib.suppress(OSError):  # the index only saves time; a rerun rebuilds it
                _save_index(
                    self.out_dir / INDEX_NAME, self.path, self._index, self._prefix, self._old_full, self._open_size
                )

    def _spill(self) -> Path | None:
        data = b"".join(self._pending)
        for where in (self.out_dir / SPILL_NAME, _tmp_spill(self.out_dir)):
            try:
                fd = os.open(where, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW, 0o600)
                try:
                    _write_all(fd, data, where)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except (OSError, LedgerError):
                continue
            return where
        return None

    def _fold_spills(self) -> int:
        """Append the whole rows of spill files an earlier run left, then remove them."""
        folded = 0
        for spill in (self.out_dir / SPILL_NAME, _tmp_spill(self.out_dir)):
            if not spill.is_file() or spill.is_symlink():
                continue
            with open(spill, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                end = complete_end(f, size)
                f.seek(0)
                data = f.read(end)
            if data and not data.endswith(b"\n"):
                data += b"\n"
            if data:
                assert self._fd is not None
                _write_all(self._fd, data, self.path)
                os.fsync(self._fd)
                folded += data.count(b"\n")
            spill.unlink()
        return folded

    def _repair_tail(self) -> int:
        """Make the file end on a row boundary; keep a complete row that only lacks its newline."""
        fd = os.open(self.path, os.O_RDWR | _NOFOLLOW)
        with os.fdopen(fd, "r+b") as f:
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
            torn_fd = os.open(self.out_dir / TORN_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW, 0o644)
            with os.fdopen(torn_fd, "ab") as torn:
                torn.write(tail + b"\n")
            f.truncate(end)
            return len(tail)


def _tmp_spill(out_dir: Path) -> Path:
    """Where rows go when the output directory's disk refuses them: a file the next run can find."""
    tag = hashlib.blake2b(str(out_dir.resolve()).encode(), digest_size=6).hexdigest()
    return Path(tempfile.gettempdir()) / f"batchgate-spill-{tag}.jsonl"


def _refuse_symlink(path: Path) -> None:
    if path.is_symlink():
        raise LedgerError(f"{path} is a symbolic link; batchgate writes only real files inside --out")


def _ensure_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LedgerError(f"{out_dir}: cannot create the output directory ({exc.strerror})") from None
    if out_dir.is_symlink() and not out_dir.is_dir():
        raise LedgerError(f"{out_dir} is a dangling symbolic link")


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


def _index_rows(path: Path, index: ResumeIndex, start: int = 0, lines: int = 0) -> None:
    loads = orjson.loads
    add_ok = index.answers.add
    damaged = index.damaged_lines
    number = lines
    with open(path, "rb") as f:
        f.seek(start)
        for number, line in enumerate(f, lines + 1):
            if len(line) <= 1:
                continue
            try:
                row = loads(line)
                rid = row["id"]
                status = row["status"]
                sample = row.get("sample") or 0
                if not isinstance(rid, str) or not isinstance(sample, int):
                    raise TypeError
            except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
                index.unreadable_lines += 1
                if len(damaged) < _KEEP_DAMAGED:
                    damaged.append(number)
                continue
            index.rows += 1
            if status == "ok":
                add_ok(row_key(rid, sample), row.get("fingerprint"))
            else:
                index.failed_rows += 1
    index.lines = number


_INDEX_MAGIC = b"batchgate-index 2\n"
_TAIL_CHECK = 4096


def _tail_digest(path: Path, size: int) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, size - _TAIL_CHECK))
        return hashlib.blake2b(f.read(min(size, _TAIL_CHECK)), digest_size=16).hexdigest()


@dataclass(slots=True)
class DonePrefix:
    """Every request before (input, line) was answered ok: ``requests`` of them (see ``batchgate.resume``)."""

    key: str  # batchgate.resume.inputs_key of the run that wrote it
    input: int
    line: int
    requests: int
    beyond: list[tuple[str, str | None]] = field(default_factory=list)  # ok answers past the prefix
    # Every input read to its end: (input, line) just past the last record, where a run resumes
    # reading when lines were appended since (``input``/``line`` then say: past every input).
    tail: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class _OldFull:
    """The full part of an index a run started from the prefix did not load: copied on save, never held."""

    header: dict[str, Any]
    path: Path
    offset: int
    length: int

    def chunks(self) -> Iterator[bytes]:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            left = self.length
            while left > 0:
                piece = f.read(min(left, 1 << 20))
                if not piece:
                    raise OSError("the resume index shrank while it was copied")
                left -= len(piece)
                yield piece


def _save_index(
    index_path: Path,
    ledger: Path,
    index: ResumeIndex,
    prefix: DonePrefix | None,
    old_full: _OldFull | None,
    open_size: int,
) -> None:
    """``results.index``: the ok answers of the ledger's first bytes, and the done prefix.

    The full part holds the answers the run read at open (``open_size`` bytes): the rows the run
    itself appended are not kept in memory to be indexed (flat memory at any size); a full resume
    reads them from the ledger, one run's worth.  ``old_full``: a run that started from the
    prefix never loaded every answer; it copies the full part the index had.
    """
    size = ledger.stat().st_size
    tail = _tail_digest(ledger, size)
    if old_full is None:
        body = index.answers.to_bytes()
        full = {
            "covered": open_size,
            "tail": _tail_digest(ledger, open_size),
            "n": len(index.answers),
            "rows": index.rows,
            "failed_rows": index.failed_rows,
            "unreadable_lines": index.unreadable_lines,
            "damaged_lines": index.damaged_lines,
            "lines": index.lines,
        }
        parts: Iterable[bytes] = body
    else:
        full, parts = old_full.header, old_full.chunks()
    header: dict[str, Any] = {"full": full, "prefix": None}
    extra = b""
    if prefix is not None:
        beyond = AnswerIndex()
        for key, fp in prefix.beyond:
            beyond.add(key, fp)
        extra = b"".join(beyond.to_bytes())
        header["prefix"] = {
            "key": prefix.key,
            "covered": size,
            "tail": tail,
            "input": prefix.input,
            "line": prefix.line,
            "requests": prefix.requests,
            "resume_at": None if prefix.tail is None else list(prefix.tail),
            "m": len(beyond),
            "lines": index.lines,
        }
    write_atomic(index_path, itertools.chain([_INDEX_MAGIC, orjson.dumps(header) + b"\n"], parts, [extra]))


def _read_index_header(index_path: Path) -> tuple[dict[str, Any], int] | None:
    if index_path.is_symlink() or not index_path.is_file():
        return None
    with open(index_path, "rb") as f:
        if f.readline() != _INDEX_MAGIC:
            return None
        header = orjson.loads(f.readline())
        return (header, f.tell()) if isinstance(header, dict) else None


def _valid_cover(part: dict[str, Any], ledger: Path) -> bool:
    covered = int(part["covered"])
    return covered <= ledger.stat().st_size and (not covered or _tail_digest(ledger, covered) == part["tail"])


def _load_columns(index_path: Path, offset: int, n: int) -> tuple[bool, _Columns | None]:
    """(whole, the three columns of ``n`` answers at ``offset``; None for none, without numpy)."""
    if n == 0:
        return True, None
    import numpy as np

    with open(index_path, "rb") as f:
        f.seek(offset)
        hi, lo, fp = (np.frombuffer(f.read(8 * n), dtype="<u8").astype(np.uint64) for _ in range(3))
    return len(hi) == len(lo) == len(fp) == n, (hi, lo, fp)


def _prefix_start(
    pre: dict[str, Any], prefix_key: str | None, appended: tuple[str, int] | None
) -> tuple[int, int] | None:
    """Where a stored prefix lets this run start reading, or None when it does not hold."""
    if prefix_key is not None and pre["key"] == prefix_key:
        return int(pre["input"]), int(pre["line"])
    if appended is None or pre["key"] != appended[0]:
        return None
    tail = pre.get("resume_at")
    if isinstance(tail, list) and len(tail) == 2 and int(pre["input"]) > appended[1]:
        at = (int(tail[0]), int(tail[1]))  # read to the end before: go on just past the last record
    else:
        at = (int(pre["input"]), int(pre["line"]))
    return at if at[0] <= appended[1] else None  # never past a line that was appended


def _load_index(
    index_path: Path,
    ledger: Path,
    index: ResumeIndex,
    prefix_key: str | None,
    appended: tuple[str, int] | None = None,
) -> tuple[int, int, _OldFull | None]:
    """(offset to read the ledger on from, lines before it, the full part kept when starting from the prefix).

    (0, 0, None) when the index is missing, damaged or stale: the ledger shorter than what the
    index covers, or the bytes at its covered end different (rewritten by hand).  Rows appended
    after it are fine: they are read as usual.
    """
    try:
        found = _read_index_header(index_path)
        if found is None:
            return 0, 0, None
        header, offset = found
        full, pre = header["full"], header.get("prefix")
        n = int(full["n"])
        at = None if pre is None else _prefix_start(pre, prefix_key, appended)
        if pre is not None and at is not None and _valid_cover(pre, ledger):
            whole, columns = _load_columns(index_path, offset + 24 * n, int(pre["m"]))
            if whole:
                index.answers.columns = columns
                index.prefix = (at[0], at[1], int(pre["requests"]))
                tail = pre.get("resume_at")
                index.prefix_tail = (int(tail[0]), int(tail[1])) if isinstance(tail, list) and len(tail) == 2 else None
                index.rows = int(full["rows"])
                return int(pre["covered"]), int(pre["lines"]), _OldFull(full, index_path, offset, 24 * n)
        if not _valid_cover(full, ledger):
            return 0, 0, None
        whole, columns = _load_columns(index_path, offset, n)
        if not whole:
            return 0, 0, None
    except (OSError, ValueError, KeyError, TypeError, orjson.JSONDecodeError):
        return 0, 0, None
    index.answers.columns = columns
    index.rows = int(full["rows"])
    index.failed_rows = int(full["failed_rows"])
    index.unreadable_lines = int(full["unreadable_lines"])
    index.damaged_lines = [int(x) for x in full["damaged_lines"]]
    return int(full["covered"]), int(full["lines"]), None


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
    _ensure_dir(out_dir)
    path = out_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o644)
    except OSError as exc:
        if path.is_symlink():
            raise LedgerError(
                f"{path} is a symbolic link; remove it (batchgate never follows links in --out)"
            ) from None
        raise LedgerError(f"{path}: cannot create the lock file ({exc.strerror})") from None
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


@dataclass(slots=True)
class PossiblyBilled:
    """Attempts that were sent but never ended in a row: a crash (or a cancel) may have been billed for them."""

    attempts: int = 0
    usd: float = 0.0  # their worst cases, where a price was known
    unpriced: int = 0  # attempts whose worst case had no price yet

    def add(self, other: PossiblyBilled) -> None:
        self.attempts += other.attempts
        self.usd = math.fsum((self.usd, other.usd))
        self.unpriced += other.unpriced


class IntentLog:
    """``DIR/intents/<run_id>.jsonl``: a line before every attempt is sent, a line when its row is written.

    A run that dies (``kill -9``, power cut) leaves the file behind; the next run reads it and
    counts every attempt without its row as *possibly billed*, at its worst case, into
    ``possibly_billed.jsonl`` (kept for good: a later run buying the answer again does not make
    the crashed attempt free).  A run that ends normally removes its file, after recording what
    it abandoned itself.  The start line is written at once (one ``write`` per attempt, never
    buffered past the send); done lines go out with the ledger's flush.
    """

    def __init__(self, out_dir: Path, run_id: str) -> None:
        self.out_dir = out_dir
        self.run_id = run_id
        self.dir = out_dir / INTENTS_DIR
        self.path = self.dir / f"{run_id}.jsonl"
        self._fd: int | None = None
        self._done: list[bytes] = []
        self._open: dict[str, list[float]] = {}  # key -> [attempts, worst usd, unpriced]

    def open(self) -> PossiblyBilled:
        """Resolve what crashed runs left; start this run's file; return the directory's total so far."""
        _refuse_symlink(self.dir)  # a linked intents/ would have this run write outside --out
        _ensure_dir(self.dir)
        for leftover in sorted(self.dir.glob("*.jsonl")):
            if leftover.is_symlink() or leftover == self.path:
                continue
            _record_possibly_billed(self.out_dir, leftover.stem, _unresolved(leftover))
            leftover.unlink()
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW, 0o644)
        except OSError as exc:
            raise LedgerError(f"{self.path}: cannot open for writing ({exc.strerror})") from None
        return read_possibly_billed(self.out_dir)

    def started(self, key: str, attempt: int, fingerprint: str | None, worst_usd: float | None) -> None:
        """Record an attempt about to be sent (one ``write``, before the request leaves)."""
        entry = self._open.get(key)
        if entry is None:
            entry = self._open[key] = [0, 0.0, 0]
        entry[0] += 1
        if worst_usd is None:
            entry[2] += 1
        else:
            entry[1] += worst_usd
        if self._fd is not None:
            line = orjson.dumps({"k": key, "a": attempt, "fp": fingerprint, "w": worst_usd}) + b"\n"
            try:
                os.write(self._fd, line)
            except OSError as exc:
                raise LedgerError(f"{self.path}: cannot append ({exc.strerror})") from None

    def finished(self, key: str) -> None:
        """Its row is queued in the ledger; the done line follows the ledger's next flush."""
        if self._open.pop(key, None) is not None:
            self._done.append(orjson.dumps({"k": key, "done": True}) + b"\n")

    def flush(self) -> None:
        """Write the done lines (after the ledger rows they vouch for)."""
        if self._done and self._fd is not None:
            data = b"".join(self._done)
            self._done.clear()
            with contextlib.suppress(OSError):  # a lost done line only overcounts, on the safe side
                os.write(self._fd, data)

    def close(self, *, clean: bool) -> PossiblyBilled:
        """End this run's log; what it still holds open was abandoned in flight and is counted."""
        left = _open_total(self._open)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if clean:
            if left.attempts:
                _record_possibly_billed(self.out_dir, self.run_id, left)
            self.path.unlink(missing_ok=True)
        return left


def _unresolved(path: Path) -> PossiblyBilled:
    """Attempts in an intents file without their done line (memory: what was in flight, not the file)."""
    with open(path, "rb") as f:
        return open_attempts(f)


def open_attempts(lines: Iterable[bytes]) -> PossiblyBilled:
    """The attempts an intents log's ``lines`` started and never finished (``batchgate status`` reads
    a live run's log with them).  A line that does not parse (a torn last line) announced nothing sent.
    """
    open_: dict[str, list[float]] = {}
    loads = orjson.loads
    for line in lines:
        try:
            obj = loads(line)
            key = obj["k"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            continue
        if obj.get("done"):
            open_.pop(key, None)
            continue
        entry = open_.setdefault(key, [0, 0.0, 0])
        entry[0] += 1
        worst = obj.get("w")
        if isinstance(worst, int | float) and not isinstance(worst, bool) and math.isfinite(worst):
            entry[1] += float(worst)
        else:
            entry[2] += 1
    return _open_total(open_)


def _open_total(open_: dict[str, list[float]]) -> PossiblyBilled:
    """The sum of open intents, each ``[attempts, worst usd, unpriced attempts]`` (the USD exactly)."""
    return PossiblyBilled(
        int(sum(e[0] for e in open_.values())),
        math.fsum(e[1] for e in open_.values()),
        int(sum(e[2] for e in open_.values())),
    )


def _record_possibly_billed(out_dir: Path, run_id: str, found: PossiblyBilled) -> None:
    if not found.attempts:
        return
    row = {"v": 1, "run_id": run_id, "attempts": found.attempts, "usd": found.usd, "unpriced": found.unpriced}
    path = out_dir / POSSIBLY_BILLED_NAME
    _refuse_symlink(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW, 0o644)
    except OSError as exc:
        raise LedgerError(f"{path}: cannot open for writing ({exc.strerror})") from None
    try:
        _write_all(fd, orjson.dumps(row) + b"\n", path)
        os.fsync(fd)
    finally:
        os.close(fd)


def possibly_billed_of(out_dir: Path) -> PossiblyBilled:
    """Everything a directory may have been billed for without a row: resolved crashes, and runs that died since."""
    total = read_possibly_billed(out_dir)
    intents = out_dir / INTENTS_DIR
    if intents.is_dir():
        for leftover in sorted(intents.glob("*.jsonl")):
            if not leftover.is_symlink():
                total.add(_unresolved(leftover))  # a run still alive counts its in-flight attempts too
    return total


def read_possibly_billed(out_dir: Path) -> PossiblyBilled:
    """The directory's possibly-billed total over every run that died or abandoned attempts."""
    total = PossiblyBilled()
    path = out_dir / POSSIBLY_BILLED_NAME
    if not path.is_file():
        return total
    with open(path, "rb") as f:
        for line in f:
            try:
                obj = orjson.loads(line)
                total.add(PossiblyBilled(int(obj["attempts"]), float(obj["usd"]), int(obj.get("unpriced", 0))))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
    return total


def ledger_spend(path: Path) -> float:
    """What a ledger's rows say was spent: confirmed plus estimated unconfirmed (a streaming, exact sum)."""
    from .pricing import RunningSum

    total = RunningSum()
    if not path.is_file():
        return 0.0
    with open(path, "rb") as f:
        for line in f:
            try:
                row = orjson.loads(line)
                cost = float(row.get("total_cost_usd") or 0.0) + float(row.get("unconfirmed_cost_usd") or 0.0)
            except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
                continue
            if math.isfinite(cost) and cost > 0:
                total.add(cost)
    return total.value
