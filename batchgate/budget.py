"""Spending caps that outlive a run: a total per output directory, daily and monthly (UTC) per budget file.

State is an append-only JSONL file (``<out>/spend.jsonl``, or a shared ``--budget-file``), written
under ``fcntl.flock`` so several processes (resumed runs, cron entries, parallel jobs) can share one
cap and never jointly pass it.  A process does not lock the file per request: it takes a *lease*
(a chunk of the cap left, ``max(need, 5 % of what is left)``), reserves from it in memory, and
gives the unused part back when it closes.  Records:

- ``lease``  {id, pid, host, day, month, usd, exp}: grant ``usd`` more to lease ``id`` (repeatable)
- ``settle`` {id, usd, day, month}: lease ``id`` is closed and cost ``usd`` in the end
- ``spend``  {usd, day, month}: spend recorded without a lease (a store with no cap, or a carry-over)

An unsettled lease counts in full against every cap, whether its holder runs or was killed
with ``-9``: what a dead process reserved may have been billed, so a crash costs at most one
lease of headroom and the cap is never passed.  Spend is dated by the moment it was reserved.
Torn last lines (a writer killed mid-``write``) are skipped; the next writer starts a new line.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import math
import os
import secrets
import socket
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from .errors import InputError, LedgerError

__all__ = [
    "LEASE_FRACTION",
    "SPEND_NAME",
    "BudgetStatus",
    "CapBook",
    "CapSpec",
    "CapStop",
    "Reservation",
    "ScopeStatus",
    "Tally",
    "Window",
    "budget_status",
    "format_usd",
    "lease_size",
    "window_at",
]

SPEND_NAME = "spend.jsonl"
LEASE_FRACTION = 0.05
LEASE_TTL_S = 3600.0
FLUSH_EVERY_S = 1.0
_EPS = 1e-12  # float noise below a nano-cent is not money

# ---------------------------------------------------------------- pure: caps, calendar, arithmetic

SCOPES = ("total", "daily", "monthly")


@dataclass(frozen=True, slots=True)
class CapSpec:
    """The caps a run enforces, in USD; None means no such cap."""

    max_total_cost_usd: float | None = None
    daily_cap_usd: float | None = None
    monthly_cap_usd: float | None = None

    def __post_init__(self) -> None:
        for name, flag in (
            ("max_total_cost_usd", "--max-total-cost"),
            ("daily_cap_usd", "--daily-cap"),
            ("monthly_cap_usd", "--monthly-cap"),
        ):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise InputError(f"{flag} must be a USD amount >= 0, not {value!r}")

    def limit(self, scope: str) -> float | None:
        return {"total": self.max_total_cost_usd, "daily": self.daily_cap_usd, "monthly": self.monthly_cap_usd}[scope]

    @property
    def any(self) -> bool:
        return any(self.limit(s) is not None for s in SCOPES)


@dataclass(frozen=True, slots=True)
class Window:
    """The UTC calendar day and month a moment falls in, and when each ends."""

    day: str  # "2026-12-01"
    month: str  # "2026-12"
    day_resets: datetime
    month_resets: datetime

    def key(self, scope: str) -> str:
        return {"total": "", "daily": self.day, "monthly": self.month}[scope]

    def resets(self, scope: str) -> datetime | None:
        return {"total": None, "daily": self.day_resets, "monthly": self.month_resets}[scope]


def window_at(now: datetime) -> Window:
    """The calendar window of an aware datetime (converted to UTC); raises ValueError on a naive one."""
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("window_at needs an aware datetime")
    u = now.astimezone(UTC)
    day0 = datetime(u.year, u.month, u.day, tzinfo=UTC)
    nxt_month = datetime(u.year + (u.month == 12), u.month % 12 + 1, 1, tzinfo=UTC)
    return Window(f"{u:%Y-%m-%d}", f"{u:%Y-%m}", day0 + timedelta(days=1), nxt_month)


def lease_size(need: float, left: float, fraction: float = LEASE_FRACTION) -> float:
    """How much to lease for a reservation of ``need`` when ``left`` is free; 0.0 when it does not fit."""
    if need > left + _EPS:
        return 0.0
    return max(0.0, min(left, max(need, fraction * left)))


def format_usd(usd: float) -> str:
    """``$1.00``, ``$0.99``, ``$0.0086``: cents, or more digits only when they carry something."""
    text = f"{usd:.6f}".rstrip("0")
    whole, _, frac = text.partition(".")
    return f"${whole}.{frac.ljust(2, '0')}"


@dataclass(slots=True)
class LeaseRecord:
    """An unsettled lease as the file tells it."""

    id: str
    pid: int
    host: str
    day: str
    month: str
    usd: float
    expires: float  # unix seconds

    def holder_alive(self, now_s: float, host: str) -> bool:
        """Its holder still runs (same host: the pid exists; other host: the lease has not expired)."""
        if self.host != host:
            return now_s < self.expires
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


@dataclass(slots=True)
class Tally:
    """The sums a spend file adds up to; :meth:`apply` folds one record in (pure)."""

    settled_total: float = 0.0
    settled_day: dict[str, float] = field(default_factory=dict)
    settled_month: dict[str, float] = field(default_factory=dict)
    open: dict[str, LeaseRecord] = field(default_factory=dict)
    unreadable: int = 0

    def apply(self, rec: Any) -> None:
        try:
            op = rec["op"]
            usd = float(rec["usd"])
            if not math.isfinite(usd) or usd < 0:
                raise ValueError(usd)
            if op == "lease":
                lease = self.open.get(rec["id"])
                if lease is None:
                    self.open[rec["id"]] = LeaseRecord(
                        str(rec["id"]),
                        int(rec["pid"]),
                        str(rec["host"]),
                        str(rec["day"]),
                        str(rec["month"]),
                        usd,
                        float(rec["exp"]),
                    )
                else:
                    lease.usd += usd
                    lease.expires = max(lease.expires, float(rec["exp"]))
                return
            if op == "settle":
                lease = self.open.pop(rec["id"], None)
                day, month = (lease.day, lease.month) if lease else (str(rec["day"]), str(rec["month"]))
            elif op == "spend":
                day, month = str(rec["day"]), str(rec["month"])
            else:
                raise ValueError(op)
        except (KeyError, TypeError, ValueError):
            self.unreadable += 1
            return
        self.settled_total += usd
        self.settled_day[day] = self.settled_day.get(day, 0.0) + usd
        self.settled_month[month] = self.settled_month.get(month, 0.0) + usd

    def settled(self, scope: str, key: str) -> float:
        if scope == "total":
            return self.settled_total
        return (self.settled_day if scope == "daily" else self.settled_month).get(key, 0.0)

    def leases(self, scope: str, key: str) -> list[LeaseRecord]:
        if scope == "total":
            return list(self.open.values())
        attr = "day" if scope == "daily" else "month"
        return [lease for lease in self.open.values() if getattr(lease, attr) == key]

    def used(self, scope: str, key: str) -> float:
        """Settled spend plus every unsettled lease of the window: what the cap must count."""
        return self.settled(scope, key) + math.fsum(lease.usd for lease in self.leases(scope, key))


# ---------------------------------------------------------------- results


_SCOPE_WORDS = {"total": "total", "daily": "daily", "monthly": "monthly"}


@dataclass(frozen=True, slots=True)
class CapStop:
    """A cap that leaves too little for the next request: which, how much, when it frees up."""

    scope: str  # "total" | "daily" | "monthly"
    limit_usd: float
    used_usd: float  # settled + reserved (by running or killed processes)
    reserved_usd: float  # the part of used_usd held by unsettled leases
    resets_at: datetime | None  # None: the total cap never resets
    path: Path

    @property
    def message(self) -> str:
        held = (
            f" ({format_usd(self.reserved_usd)} of it reserved by running or killed runs)"
            if self.reserved_usd > _EPS
            else ""
        )
        cap = f"{_SCOPE_WORDS[self.scope]} cap {format_usd(self.limit_usd)} used up: {format_usd(self.used_usd)}"
        if self.resets_at is None:
            return f"{cap} spent by all runs of {self.path.parent}{held}; raise --max-total-cost to go on"
        when = "today" if self.scope == "daily" else "this month"
        return f"{cap} spent {when} (UTC){held}; resets {self.resets_at:%Y-%m-%dT%H:%MZ} ({self.path})"

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True, slots=True)
class Reservation:
    """What :meth:`CapBook.try_reserve` granted; hand it back to :meth:`CapBook.settle`. Always truthy."""

    usd: float
    day: str
    month: str
    holdings: tuple[_Holding, ...] = field(repr=False)


@dataclass(frozen=True, slots=True)
class ScopeStatus:
    """One window of one spend file, for ``batchgate budget status``."""

    path: Path
    scope: str  # "total" | "daily" | "monthly"
    key: str  # "" | "2026-12-01" | "2026-12"
    settled_usd: float
    running_usd: float  # leases of processes that still run
    possibly_spent_usd: float  # leases of processes that died before settling: may have been billed
    resets_at: datetime | None

    @property
    def used_usd(self) -> float:
        return self.settled_usd + self.running_usd + self.possibly_spent_usd


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    scopes: list[ScopeStatus]
    unreadable_lines: int


# ---------------------------------------------------------------- file I/O


def _open_spend_file(path: Path, *, create: bool) -> int | None:
    """Open without following a symlink (a budget file is shared: it must be the file it says)."""
    flags = (os.O_RDWR | os.O_APPEND | os.O_CREAT if create else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, flags, 0o644)
    except FileNotFoundError:
        if create:
            raise InputError(f"{path}: cannot create the budget file (no such directory)") from None
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(
                f"{path}: is a symbolic link; spend is only recorded in a real file (give its path)"
            ) from None
        raise InputError(f"{path}: cannot open the budget file ({exc.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InputError(f"{path}: the budget file must be a regular file")
    return fd


class _SpendFile:
    """One spend file: an fd, the records read so far (folded into a Tally) and the lock."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.tally = Tally()
        self._offset = 0
        self._partial = b""

    @contextlib.contextmanager
    def locked(self, shared: bool = False) -> Iterator[None]:
        fcntl.flock(self.fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            self.refresh()
            yield
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def refresh(self) -> None:
        """Fold in what other processes appended since the last read (append-only: only new bytes)."""
        while True:
            chunk = os.pread(self.fd, 1 << 20, self._offset)
            if not chunk:
                return
            self._offset += len(chunk)
            lines = (self._partial + chunk).split(b"\n")
            self._partial = lines.pop()  # bytes after the last newline: torn, or the rest comes next read
            for line in lines:
                if line.strip():
                    try:
                        self.tally.apply(orjson.loads(line))
                    except orjson.JSONDecodeError:
                        self.tally.unreadable += 1

    def append(self, records: list[dict[str, Any]], *, sync: bool) -> None:
        """Append records (caller holds the lock and has refreshed); a torn tail gets its newline first."""
        data = b"".join(orjson.dumps(r) + b"\n" for r in records)
        if self._partial:
            data = b"\n" + data
            self.tally.unreadable += 1
            self._partial = b""
        view, done = memoryview(data), 0
        try:
            while done < len(data):
                done += os.write(self.fd, view[done:])
            if sync:
                os.fsync(self.fd)
        except OSError as exc:
            raise LedgerError(f"{self.path}: cannot record spend ({exc.strerror})") from None
        self._offset += len(data)
        for rec in records:
            self.tally.apply(rec)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(slots=True, eq=False)
class _Holding:
    """This process's lease in one store for one calendar window."""

    id: str
    day: str
    month: str
    granted: float = 0.0
    outstanding: float = 0.0  # reserved, not yet settled
    spent: float = 0.0  # settled actual cost
    closed: bool = False

    @property
    def available(self) -> float:
        return self.granted - self.outstanding - self.spent


class _Store:
    """A spend file plus the caps counted in it and this process's leases there."""

    def __init__(self, file: _SpendFile, caps: dict[str, float], book: CapBook) -> None:
        self.file = file
        self.caps = caps  # scope -> limit
        self.book = book
        self.current: _Holding | None = None
        self.retired: list[_Holding] = []  # leases of past windows still waiting for reservations to settle
        self.unleased: dict[tuple[str, str], float] = {}  # spend of a cap-less store not yet written

    def holding(self, w: Window) -> _Holding:
        cur = self.current
        if cur is not None and (cur.day, cur.month) == (w.day, w.month):
            return cur
        if cur is not None:
            self.retired.append(cur)
            self.settle_done()
        self.current = _Holding(f"{os.getpid()}-{secrets.token_hex(6)}", w.day, w.month)
        return self.current

    def left(self, w: Window, mine: _Holding | None) -> tuple[float, str]:
        """USD this process may still reserve in the window (lock held), and the tightest scope."""
        best, which = math.inf, ""
        for scope, limit in self.caps.items():
            free = limit - self.file.tally.used(scope, w.key(scope))
            if free < best:
                best, which = free, scope
        if mine is not None:
            best += max(0.0, mine.available)
        return best, which

    def lease_record(self, h: _Holding, usd: float) -> dict[str, Any]:
        return {
            "op": "lease",
            "id": h.id,
            "pid": os.getpid(),
            "host": self.book.host,
            "day": h.day,
            "month": h.month,
            "usd": usd,
            "exp": round(time.time() + LEASE_TTL_S, 3),
            "at": self.book.now_iso(),
        }

    def grow(self, h: _Holding, need: float, w: Window) -> bool:
        """Lease enough for ``need`` more under the lock; False (nothing written) when a cap is too tight."""
        with self.file.locked():
            left, _ = self.left(w, None)
            short = need - max(0.0, h.available)
            size = lease_size(short, left, self.book.lease_fraction)
            if size <= 0.0 or short > left + _EPS:
                return False
            self.file.append([self.lease_record(h, size)], sync=True)
        h.granted += size
        return True

    def force(self, h: _Holding, usd: float) -> None:
        """Record spend beyond the lease (an answer dearer than its reservation): the truth, cap or not."""
        with self.file.locked():
            self.file.append([self.lease_record(h, usd)], sync=True)
        h.granted += usd

    def settle_done(self, everything: bool = False) -> None:
        """Write ``settle`` for retired leases with nothing outstanding (or all of them, at close)."""
        done = [h for h in self.retired if everything or h.outstanding <= _EPS]
        if everything and self.current is not None:
            done.append(self.current)
            self.current = None
        records = []
        for h in done:
            if h.granted > 0 and not h.closed:
                records.append(
                    {
                        "op": "settle",
                        "id": h.id,
                        "day": h.day,
                        "month": h.month,
                        "usd": h.spent + max(0.0, h.outstanding),
                    }
                )
            h.closed = True
        self.retired = [h for h in self.retired if not h.closed]
        records += [
            {"op": "spend", "day": d, "month": m, "usd": usd} for (d, m), usd in self.unleased.items() if usd > 0
        ]
        self.unleased.clear()
        if records:
            with self.file.locked():
                self.file.append(records, sync=True)


class CapBook:
    """The persistent caps of one run: reserve before a request, settle after, close at the end.

    Not thread-safe: one event loop calls it.  Reservations never block on another process
    except when the current lease runs out (one locked append).
    """

    def __init__(
        self, caps: CapSpec, stores: list[_Store], now: Callable[[], datetime], lease_fraction: float, host: str
    ) -> None:
        self.caps = caps
        self.stores = stores
        self.now = now
        self.lease_fraction = lease_fraction
        self.host = host
        self.refused: CapStop | None = None
        self._last_flush = time.monotonic()
        for s in stores:
            s.book = self

    @classmethod
    def open(
        cls,
        caps: CapSpec,
        out_dir: Path | None,
        budget_file: Path | None = None,
        *,
        now: Callable[[], datetime] | None = None,
        prior_spend_usd: float = 0.0,
        lease_fraction: float = LEASE_FRACTION,
    ) -> CapBook:
        """Open the spend files: ``<out_dir>/spend.jsonl`` (total cap; daily/monthly too without a
        budget file) and ``budget_file`` (daily/monthly).  ``prior_spend_usd``: what the directory's
        ledger says earlier runs spent; recorded once when ``spend.jsonl`` is new or knows less.
        Raises InputError for a symlinked or unusable file.
        """
        clock = now or (lambda: datetime.now(UTC))
        book = cls(caps, [], clock, lease_fraction, socket.gethostname())
        calendar = {s: v for s in ("daily", "monthly") if (v := caps.limit(s)) is not None}
        try:
            if out_dir is not None:
                fd = _open_spend_file(out_dir / SPEND_NAME, create=True)
                assert fd is not None
                mine = {"total": caps.max_total_cost_usd} if caps.max_total_cost_usd is not None else {}
                if budget_file is None:
                    mine.update(calendar)
                store = _Store(_SpendFile(out_dir / SPEND_NAME, fd), {k: float(v) for k, v in mine.items()}, book)
                book.stores.append(store)
                with store.file.locked():
                    carry = (
                        prior_spend_usd
                        - store.file.tally.settled_total
                        - math.fsum(lease.usd for lease in store.file.tally.open.values())
                    )
                    if carry > _EPS:
                        w = window_at(clock())
                        store.file.append(
                            [{"op": "spend", "day": w.day, "month": w.month, "usd": carry, "carry": True}], sync=True
                        )
            if budget_file is not None:
                fd = _open_spend_file(budget_file, create=True)
                assert fd is not None
                book.stores.append(_Store(_SpendFile(budget_file, fd), calendar, book))
        except BaseException:
            book.close()
            raise
        return book

    def now_iso(self) -> str:
        return self.now().astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")

    def exhausted(self, need_usd: float = 0.0) -> CapStop | None:
        """The first cap that leaves this process less than ``need_usd`` (or nothing at all), re-read from disk."""
        w = window_at(self.now())
        for store in self.stores:
            if not store.caps:
                continue
            with store.file.locked(shared=True):
                for scope, limit in store.caps.items():
                    key = w.key(scope)
                    used = store.file.tally.used(scope, key)
                    mine = store.current if store.current is not None and store.current.day == w.day else None
                    free = limit - used + (max(0.0, mine.available) if mine else 0.0)
                    if free <= _EPS or free < need_usd - _EPS:
                        others = [x.usd for x in store.file.tally.leases(scope, key) if not mine or x.id != mine.id]
                        held = math.fsum(others) + (max(0.0, mine.outstanding) if mine else 0.0)
                        return CapStop(
                            scope,
                            limit,
                            used - (max(0.0, mine.available) if mine else 0.0),
                            max(0.0, held),
                            w.resets(scope),
                            store.file.path,
                        )
        return None

    def try_reserve(self, usd: float) -> Reservation | None:
        """Reserve ``usd`` (a request's worst case) under every cap; None (see :attr:`refused`) if one is too tight."""
        if not (math.isfinite(usd) and usd >= 0):
            raise ValueError(f"cannot reserve {usd!r} USD")
        w = window_at(self.now())
        taken: list[_Holding] = []
        for store in self.stores:
            if not store.caps:
                continue
            h = store.holding(w)
            if h.available < usd - _EPS and not store.grow(h, usd, w):
                self.refused = self.exhausted(usd) or self._stop_for(store, w)
                return None
            taken.append(h)
        for h in taken:
            h.outstanding += usd
        return Reservation(usd, w.day, w.month, tuple(taken))

    def settle(self, reservation: Reservation, actual_usd: float) -> None:
        """The request cost ``actual_usd`` in the end (confirmed + unconfirmed); the rest goes back to the lease."""
        if not (math.isfinite(actual_usd) and actual_usd >= 0):
            raise ValueError(f"cannot settle {actual_usd!r} USD")
        for store in self.stores:
            h = next((h for h in reservation.holdings if h is store.current or h in store.retired), None)
            if h is None:
                if not store.caps:
                    key = (reservation.day, reservation.month)
                    store.unleased[key] = store.unleased.get(key, 0.0) + actual_usd
                continue
            h.outstanding -= reservation.usd
            h.spent += actual_usd
            over = h.spent + max(0.0, h.outstanding) - h.granted
            if over > _EPS:
                store.force(h, over)
            if h is not store.current and h.outstanding <= _EPS:
                store.settle_done()

    def flush(self, *, force: bool = False) -> None:
        """Write spend not under a lease (stores without a cap); call it with the ledger's flush.

        At most once a second unless ``force``: each write is an fsync, and the ledger keeps the rows anyway.
        """
        if not force and time.monotonic() - self._last_flush < FLUSH_EVERY_S:
            return
        self._last_flush = time.monotonic()
        for store in self.stores:
            if store.unleased:
                store.settle_done()

    def close(self) -> None:
        """Settle every lease (unsettled reservations count as spent in full) and close the files."""
        try:
            for store in self.stores:
                if store.file.fd >= 0:
                    store.settle_done(everything=True)
        finally:
            for store in self.stores:
                store.file.close()

    def _stop_for(self, store: _Store, w: Window) -> CapStop:
        _, scope = store.left(w, None)
        scope = scope or next(iter(store.caps))
        key = w.key(scope)
        used = store.file.tally.used(scope, key)
        held = math.fsum(lease.usd for lease in store.file.tally.leases(scope, key))
        return CapStop(scope, store.caps[scope], used, held, w.resets(scope), store.file.path)

    def __enter__(self) -> CapBook:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def budget_status(
    out_dir: Path | None, budget_file: Path | None = None, *, now: datetime | None = None
) -> BudgetStatus:
    """What each spend file says for the total, today and this month (read-only, shared lock)."""
    moment = now or datetime.now(UTC)
    w = window_at(moment)
    host, now_s = socket.gethostname(), moment.timestamp()
    scopes: list[ScopeStatus] = []
    unreadable = 0
    paths = ([out_dir / SPEND_NAME] if out_dir is not None else []) + ([budget_file] if budget_file is not None else [])
    for path in paths:
        fd = _open_spend_file(path, create=False)
        if fd is None:
            continue
        file = _SpendFile(path, fd)
        try:
            with file.locked(shared=True):
                pass
        finally:
            file.close()
        t = file.tally
        unreadable += t.unreadable
        for scope in SCOPES:
            key = w.key(scope)
            leases = t.leases(scope, key)
            alive = [lease.usd for lease in leases if lease.holder_alive(now_s, host)]
            dead = [lease.usd for lease in leases if not lease.holder_alive(now_s, host)]
            scopes.append(
                ScopeStatus(path, scope, key, t.settled(scope, key), math.fsum(alive), math.fsum(dead), w.resets(scope))
            )
    return BudgetStatus(scopes, unreadable)
