"""An opt-in answer cache shared by runs: delivered answers keyed by request fingerprint, so none is bought twice.

One SQLite file (``DIR/answers.sqlite3``) in WAL mode with a busy timeout: any number of runs
read and write it at once, each write a short transaction.  Writes are queued and go out in one
transaction per :meth:`AnswerCache.flush` (the runner calls it with its ledger flush), and at
most ``FLUSH_EVERY`` are held in memory, so a run of millions of prompts stays small.  The first
answer stored for a fingerprint wins: later puts of the same key are ignored, so every run that
hits it gets the same answer.
"""

from __future__ import annotations

import math
import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from .errors import BatchgateError

__all__ = [
    "CACHED_FIELDS",
    "CACHE_NAME",
    "AnswerCache",
    "CacheError",
    "CacheStats",
    "PruneResult",
    "cacheable",
    "row_from_cache",
]

CACHE_NAME = "answers.sqlite3"
FLUSH_EVERY = 512  # queued puts (and hit marks) held in memory before a flush is forced
BUSY_TIMEOUT_S = 30.0

#: The ledger-row fields of a delivered answer that the cache keeps (everything needed to write
#: the row of a later hit); the rest of a row (id, job, run_id, timings, attempts) belongs to the run.
CACHED_FIELDS: tuple[str, ...] = (
    "model",
    "content",
    "reasoning",
    "refusal",
    "tool_calls",
    "choices",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "base_cost_usd",
    "platform_fee_usd",
    "total_cost_usd",
    "cost_status",
    "usage_raw",
    "warnings",
    "request_id",
    "started_at",
    "parsed",
    "valid",
    "valid_error",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    fp TEXT PRIMARY KEY,          -- request_fingerprint(body, sample)
    model TEXT,
    cost_usd REAL NOT NULL,       -- what the answer cost when it was bought
    created_at REAL NOT NULL,     -- unix seconds
    used_at REAL NOT NULL,        -- last put or hit: prune --older-than goes by this
    hits INTEGER NOT NULL DEFAULT 0,
    row BLOB NOT NULL             -- orjson of the CACHED_FIELDS
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS answers_used_at ON answers(used_at);
"""


class CacheError(BatchgateError):
    """The answer cache cannot be opened, read or written."""


def cacheable(body: Mapping[str, Any], allow_nondeterministic: bool = False) -> bool:
    """Whether an answer to ``body`` may be served from the cache.

    Only ``temperature`` given as 0 is deterministic enough.  An absent temperature counts as
    nondeterministic: GonkaGate does not document its default, and OpenAI-compatible servers use
    1.0, so a cached reply could silently stand in for what should have been a fresh sample.
    Missing a cache hit costs money the user can opt into saving (``--cache-nondeterministic``);
    a wrong hit changes results without a word.
    """
    if allow_nondeterministic:
        return True
    temperature = body.get("temperature")
    return isinstance(temperature, int | float) and not isinstance(temperature, bool) and temperature == 0


def row_from_cache(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The cost fields of a row answered from the cache: it costs 0, the original cost is kept apart.

    Merge over the run's own fields (id, job, run_id, sample, fingerprint, timings); ``request_id``
    stays the id of the request that bought the answer.
    """
    row = {k: entry.get(k) for k in CACHED_FIELDS}
    row["cached_at"] = entry.get("cached_at")
    original = entry.get("total_cost_usd")
    row.update(
        status="ok",
        cached=True,
        cached_cost_usd=original if isinstance(original, int | float) else None,
        base_cost_usd=0.0,
        platform_fee_usd=0.0,
        total_cost_usd=0.0,
        unconfirmed_completion_tokens=0,
        unconfirmed_cost_usd=0.0,
        cost_status="confirmed",
        attempts=0,
        retry_causes=[],
        error=None,
    )
    return row


@dataclass(frozen=True, slots=True)
class CacheStats:
    path: Path
    entries: int
    answers_bytes: int  # stored answers (what --max-size bounds)
    file_bytes: int  # the database file and its WAL on disk
    hits: int  # answers served from the cache, over all runs
    original_cost_usd: float  # what the stored answers cost when bought
    saved_usd: float  # what the hits would have cost
    oldest_at: datetime | None
    last_used_at: datetime | None


@dataclass(frozen=True, slots=True)
class PruneResult:
    removed: int
    left: int
    answers_bytes: int  # after pruning


class AnswerCache:
    """Delivered answers by fingerprint. Safe to share between processes; one object per thread of use."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self._conn = conn
        self._lock = threading.Lock()  # flush may run in a worker thread while the loop calls get/put
        self._pending: dict[str, tuple[str | None, float, bytes]] = {}
        self._hits: dict[str, int] = {}

    @classmethod
    def open(cls, directory: Path) -> AnswerCache:
        """Open (creating) ``directory/answers.sqlite3``; raises CacheError naming the path."""
        path = Path(directory) / CACHE_NAME
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise CacheError(f"{path}: cannot open the answer cache ({exc})") from None
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
                raise CacheError(f"{path}: the answer cache needs a file system with WAL support")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            conn.close()
            raise CacheError(f"{path}: not a usable answer cache ({exc})") from None
        except CacheError:
            conn.close()
            raise
        return cls(path, conn)

    def get(self, fingerprint: str) -> dict[str, Any] | None:
        """The stored answer (its CACHED_FIELDS plus ``cached_at``, UTC ISO-8601), or None; counts a hit."""
        queued = self._pending.get(fingerprint)
        if queued is not None:
            blob, created = queued[2], time.time()
        else:
            with self._lock:
                try:
                    found = self._conn.execute(
                        "SELECT row, created_at FROM answers WHERE fp = ?", (fingerprint,)
                    ).fetchone()
                except sqlite3.Error as exc:
                    raise CacheError(f"{self.path}: cannot read the answer cache ({exc})") from None
            if found is None:
                return None
            blob, created = found
        self._hits[fingerprint] = self._hits.get(fingerprint, 0) + 1
        if self.pending >= FLUSH_EVERY:
            self.flush()
        entry: dict[str, Any] = orjson.loads(blob)
        entry["cached_at"] = datetime.fromtimestamp(created, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        return entry

    def put(self, fingerprint: str, row: Mapping[str, Any]) -> None:
        """Queue a delivered answer (a ledger row with status "ok"); raises ValueError for any other row."""
        if row.get("status", "ok") != "ok" or row.get("cached"):
            raise ValueError("only answers bought from the server go into the cache")
        cost = row.get("total_cost_usd")
        cost_usd = float(cost) if isinstance(cost, int | float) and math.isfinite(cost) else 0.0
        model = row.get("model")
        blob = orjson.dumps({k: row.get(k) for k in CACHED_FIELDS})
        self._pending.setdefault(fingerprint, (model if isinstance(model, str) else None, cost_usd, blob))
        if self.pending >= FLUSH_EVERY:
            self.flush()

    @property
    def pending(self) -> int:
        return len(self._pending) + len(self._hits)

    def flush(self) -> None:
        """Write queued answers and hit marks in one transaction; raises CacheError (queue kept) on failure."""
        if not self._pending and not self._hits:
            return
        now = time.time()
        answers = [(fp, m, c, now, now, b) for fp, (m, c, b) in self._pending.items()]
        hits = [(now, n, fp) for fp, n in self._hits.items()]
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    self._conn.executemany(
                        "INSERT OR IGNORE INTO answers (fp, model, cost_usd, created_at, used_at, row)"
                        " VALUES (?, ?, ?, ?, ?, ?)",
                        answers,
                    )
                    self._conn.executemany("UPDATE answers SET used_at = ?, hits = hits + ? WHERE fp = ?", hits)
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise CacheError(f"{self.path}: cannot write the answer cache ({exc})") from None
        self._pending.clear()
        self._hits.clear()

    def stats(self) -> CacheStats:
        """Counts and sizes of what is stored (queued puts not included until flushed)."""
        with self._lock:
            try:
                n, size, hits, cost, saved, oldest, used = self._conn.execute(
                    "SELECT count(*), coalesce(sum(length(row)), 0), coalesce(sum(hits), 0),"
                    " coalesce(sum(cost_usd), 0), coalesce(sum(cost_usd * hits), 0), min(created_at), max(used_at)"
                    " FROM answers"
                ).fetchone()
            except sqlite3.Error as exc:
                raise CacheError(f"{self.path}: cannot read the answer cache ({exc})") from None
        on_disk = sum(p.stat().st_size for p in (self.path, self.path.with_name(CACHE_NAME + "-wal")) if p.exists())
        return CacheStats(self.path, n, size, on_disk, hits, cost, saved, _when(oldest), _when(used))

    def prune(self, older_than_days: float | None = None, max_size_mb: float | None = None) -> PruneResult:
        """Drop answers unused for ``older_than_days``, then the least recently used until the answers fit
        in ``max_size_mb``; the file shrinks when no other run holds it open (VACUUM)."""
        self.flush()
        removed = 0
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    if older_than_days is not None:
                        cutoff = time.time() - older_than_days * 86400.0
                        removed += self._conn.execute("DELETE FROM answers WHERE used_at < ?", (cutoff,)).rowcount
                    if max_size_mb is not None:
                        removed += self._conn.execute(
                            "DELETE FROM answers WHERE fp IN (SELECT fp FROM (SELECT fp, sum(length(row))"
                            " OVER (ORDER BY used_at DESC, fp) AS acc FROM answers) WHERE acc > ?)",
                            (int(max_size_mb * 1024 * 1024),),
                        ).rowcount
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                left, size = self._conn.execute(
                    "SELECT count(*), coalesce(sum(length(row)), 0) FROM answers"
                ).fetchone()
            except sqlite3.Error as exc:
                raise CacheError(f"{self.path}: cannot prune the answer cache ({exc})") from None
            if removed:
                try:
                    self._conn.execute("VACUUM")
                    self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                except sqlite3.OperationalError:
                    pass  # another run is using the cache: the space is reused, the file shrinks next time
        return PruneResult(removed, left, size)

    def close(self) -> None:
        """Flush and close; idempotent."""
        try:
            self.flush()
        finally:
            with self._lock:
                self._conn.close()

    def __enter__(self) -> AnswerCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _when(unix: float | None) -> datetime | None:
    return None if unix is None else datetime.fromtimestamp(unix, UTC)
