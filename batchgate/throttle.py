"""Concurrency and request-rate gate shared by every worker, in the spirit of trio's CapacityLimiter.

Three things bound when an attempt may start:

- **What the key allows** (GonkaGate documents 50 concurrent, 600/min and 200 per 10 s per key): a
  concurrency ceiling and two token buckets, on by default so a run never provokes the 429s the
  numbers predict.  A caller who knows better raises them (``None`` = unlimited).
- **What the server says now**: the concurrency limit slows down in proportion to the share of 429s
  over the last ``share_window`` outcomes, and only when that share exceeds ``share_threshold``.  A
  few scattered 429s (a busy gateway) are not overload: halving on each one collapsed a run to
  concurrency 1.  ``Retry-After`` belongs to the request it came with (the retry policy waits it);
  it never pauses the other workers.  Successes grow the limit back by ``1/limit`` each (AIMD),
  and eight times slower in the last 10% below a limit that hit an edge (TCP CUBIC's plateau): a
  server that refuses above 50 streams answers 429 to the 51st at once, so each slot too many
  churns out 429s far faster than the slots below it succeed (a share of over twice the
  threshold); probing that edge slowly keeps the steady 429 share near zero, and past it growth
  is fast again (the server's limit has grown).
- **An outage**: ``outage_after`` failed attempts in a row (connection refused, 5xx, stalls) pause
  every start for a doubling time (up to ``max_pause_s``) and then let one probe through, so a
  network blip costs the probes and not the retries of every prompt in the file.

When nothing limits, :meth:`Throttle.acquire` returns without awaiting (the hot path).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType

__all__ = [
    "KEY_BURST_10S",
    "KEY_CONCURRENCY",
    "KEY_RPM",
    "REASONS",
    "ShareWindow",
    "Throttle",
    "ThrottleStatistics",
    "TokenBucket",
]

# One GonkaGate key's documented allowance (../shared/docs/gonkagate-api.md, "Rate limits").
KEY_CONCURRENCY = 50
KEY_RPM = 600
KEY_BURST_10S = 200

# How much slower the limit grows just below the level a 429 slow-down last cut it from.
PLATEAU_SLOWDOWN = 8.0

# What ThrottleStatistics.reason may say.
REASONS = ("ok", "429 slow-down", "key limit", "outage pause", "rpm")


class TokenBucket:
    """``capacity`` tokens refilled at ``rate`` per second; a start takes one.

    Pure arithmetic on a caller-given clock, so it is tested without an event loop.  Tokens may
    go negative: a start that finds none reserves the next one and waits :meth:`take`'s answer,
    which keeps waiters in order without waking them all for every token.
    """

    __slots__ = ("_stamp", "capacity", "rate", "tokens")

    def __init__(self, capacity: float, rate: float, now: float) -> None:
        if capacity < 1 or rate <= 0:
            raise ValueError("a bucket needs capacity >= 1 and a positive rate")
        self.capacity = float(capacity)
        self.rate = float(rate)
        self.tokens = float(capacity)
        self._stamp = now

    def refill(self, now: float) -> None:
        if now > self._stamp:
            self.tokens = min(self.capacity, self.tokens + (now - self._stamp) * self.rate)
            self._stamp = now

    def available(self, now: float) -> bool:
        """Whether a token is there now (refilled first: skipping that while full would over-credit)."""
        self.refill(now)
        return self.tokens >= 1.0

    def take(self, now: float) -> float:
        """Take a token; the seconds to wait before using it (0.0 when one was there)."""
        self.refill(now)
        self.tokens -= 1.0
        return 0.0 if self.tokens >= 0.0 else -self.tokens / self.rate

    def give_back(self) -> None:
        """Return a token taken by a start that never happened (cancelled while waiting)."""
        self.tokens = min(self.capacity, self.tokens + 1.0)

    def limit_to(self, remaining: float, now: float) -> None:
        """The server says only ``remaining`` starts are left now: never believe in more."""
        self.refill(now)
        self.tokens = min(self.tokens, remaining)


class ShareWindow:
    """Share of 429s among the last ``size`` outcomes (a ring of booleans with a running count)."""

    __slots__ = ("_hits", "_ring", "size")

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("the window needs at least one outcome")
        self.size = size
        self._ring: deque[bool] = deque(maxlen=size)
        self._hits = 0

    def add(self, rate_limited: bool) -> None:
        ring = self._ring
        if len(ring) == self.size:
            self._hits -= ring[0]
        ring.append(rate_limited)
        self._hits += rate_limited

    @property
    def full(self) -> bool:
        return len(self._ring) == self.size

    @property
    def hits(self) -> int:
        return self._hits

    @property
    def share(self) -> float:
        return self._hits / len(self._ring) if self._ring else 0.0

    def clear(self) -> None:
        self._ring.clear()
        self._hits = 0

    def __len__(self) -> int:
        return len(self._ring)


def with_headroom(capacity: float) -> float:
    """A bucket's capacity less 2% (at least one token), kept in hand so requests that reach the
    server bunched (network and scheduling jitter) still find its bucket a token ahead of ours."""
    return max(1.0, capacity - max(1.0, 0.02 * capacity))


def slowed_limit(limit: float, share: float, floor: float = 1.0) -> float:
    """The limit after a slow-down: cut by the 429 share, at most halved, never below ``floor``.

    If a share ``s`` of attempts was refused, the server accepted ``1 - s`` of what was sent, so
    that is what to send; halving at most keeps one noisy window from collapsing the run.
    """
    return max(floor, limit * max(0.5, 1.0 - share))


@dataclass(frozen=True, slots=True)
class ThrottleStatistics:
    """A snapshot for the progress display (like trio's ``CapacityLimiter.statistics()``)."""

    limit: int  # attempts allowed in flight now
    max_concurrency: int  # the ceiling: min(asked concurrency, key_concurrency)
    in_flight: int
    waiting: int  # callers blocked in acquire()
    reason: str  # what holds starts back: "ok" | "429 slow-down" | "key limit" | "outage pause" | "rpm"
    slowdowns: int
    rate_limited: int  # 429s seen
    outage_pauses: int


class Throttle:
    """Gate for starting attempts: :meth:`acquire` before and :meth:`release` after each (or ``async with``).

    ``max_concurrency`` is what the caller asked for, ``rpm`` the caller's own even spacing of
    starts.  ``key_concurrency``, ``key_rpm`` (per ``rate_window_s``) and ``key_burst_10s`` (per
    ``burst_window_s``) are the key's documented allowance; ``None`` lifts one.  The windows are
    parameters so tests can shrink them.
    """

    def __init__(
        self,
        max_concurrency: int,
        rpm: float | None = None,
        *,
        key_concurrency: int | None = KEY_CONCURRENCY,
        key_rpm: float | None = KEY_RPM,
        key_burst_10s: float | None = KEY_BURST_10S,
        rate_window_s: float = 60.0,
        burst_window_s: float = 10.0,
        share_window: int = 100,
        share_threshold: float = 0.05,
        outage_after: int = 5,
        max_pause_s: float = 60.0,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        now = time.monotonic()
        ceiling = max_concurrency if key_concurrency is None else min(max_concurrency, key_concurrency)
        self.asked_concurrency = max_concurrency
        self.max_concurrency = ceiling
        self.key_limited = ceiling < max_concurrency
        self.limit = float(ceiling)
        self.min_limit_seen = float(ceiling)
        self.in_flight = 0
        self.waiting = 0
        self.slowdowns = 0
        self.rate_limited = 0
        self.outage_pauses = 0
        self._buckets = tuple(
            TokenBucket(with_headroom(n), n / window, now)
            for n, window in ((key_rpm, rate_window_s), (key_burst_10s, burst_window_s))
            if n is not None
        )
        self._window = ShareWindow(share_window)
        self._stale = 0  # outcomes still due from attempts started before the last slow-down
        self._share_threshold = share_threshold
        self._threshold = float(ceiling)  # slow start below it (after an outage), +1/limit above
        self._cut_from = math.inf  # the limit at the last 429 slow-down: growth is slow just below it
        self._failures_in_a_row = 0
        self._outage_after = outage_after
        self._pause_s = 0.0
        self._max_pause_s = max_pause_s
        self._interval = 60.0 / rpm if rpm else 0.0
        self._next_start = 0.0
        self._paused_until = 0.0
        self._reason = "ok"
        self._cut_reason = "429 slow-down"  # what brought the limit below the ceiling last
        self._waiters: deque[asyncio.Future[None]] = deque()

    # -- the gate --------------------------------------------------------------------------------

    async def acquire(self) -> None:
        """Wait until an attempt may start; count it in flight."""
        if self.in_flight < self.limit and not self._waiters and not self._interval and self._paused_until == 0.0:
            if not self._buckets:
                self.in_flight += 1
                return
            now = time.monotonic()
            for b in self._buckets:
                if not b.available(now):
                    break
            else:
                for b in self._buckets:
                    b.tokens -= 1.0
                self.in_flight += 1
                return
        self.waiting += 1
        try:
            await self._acquire_slow()
        finally:
            self.waiting -= 1

    async def _acquire_slow(self) -> None:
        while True:
            now = time.monotonic()
            if self._paused_until > now:
                self._reason = "outage pause"
                await asyncio.sleep(self._paused_until - now)
                continue
            self._paused_until = 0.0  # over: the hot path may serve again
            if self.in_flight < self.limit and not self._waiters:
                self.in_flight += 1
                break
            if self.limit < self.max_concurrency:
                self._reason = self._cut_reason
            else:
                self._reason = "key limit" if self.key_limited else "ok"
            # Queue; release() hands the slot over (in_flight already counts us when woken), so
            # a caller that just released cannot barge ahead of those waiting (FIFO, like trio).
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            except BaseException:
                if fut.done() and not fut.cancelled():
                    self.release()  # granted, then cancelled before running: pass it on
                else:
                    fut.cancel()
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(fut)  # no dead entry may hold a free slot's taker back
                raise
            break
        # A concurrency slot is ours: reserve a token in every bucket (and the rpm spacing) and
        # wait for the latest of them, holding the slot like a reservation.
        now = time.monotonic()
        delay = 0.0
        for b in self._buckets:
            delay = max(delay, b.take(now))
        if delay > 0.0:
            self._reason = "key limit"
        if self._interval:
            start = max(now, self._next_start)
            self._next_start = start + self._interval
            if start - now > delay:
                delay = start - now
                self._reason = "rpm"
        if self._paused_until - now > delay:  # an outage began while we queued: we are its probe
            delay = self._paused_until - now
        if delay > 0.0:
            try:
                await asyncio.sleep(delay)
            except BaseException:
                for b in self._buckets:
                    b.give_back()
                self.release()
                raise

    def release(self) -> None:
        """An attempt ended (however it ended): its slot goes to the next waiter."""
        self.in_flight -= 1
        if self._waiters:
            self._wake()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    # -- what the attempts teach -----------------------------------------------------------------

    def on_success(self) -> None:
        self._failures_in_a_row = 0
        self._pause_s = 0.0
        if self._stale:
            self._stale -= 1
        else:
            self._window.add(False)
        if self.limit < self.max_concurrency:
            step = 1.0 if self.limit < self._threshold else 1.0 / self.limit
            if 0.9 * self._cut_from <= self.limit < self._cut_from:
                step /= PLATEAU_SLOWDOWN
            self.limit = min(float(self.max_concurrency), self.limit + step)
            if self._waiters:
                self._wake()

    def on_failure(self) -> None:
        """A failed attempt that was not a 429; enough of them in a row mean an outage."""
        self._failures_in_a_row += 1
        if self._failures_in_a_row < self._outage_after:
            return
        self._failures_in_a_row = 0
        self._pause_s = min(self._max_pause_s, self._pause_s * 2 or 0.5)
        self._paused_until = max(self._paused_until, time.monotonic() + self._pause_s)
        self._threshold = max(1.0, max(self.limit, self._threshold) / 2)
        self.limit = 1.0
        self.min_limit_seen = 1.0
        self.outage_pauses += 1
        self._cut_reason = "outage pause"

    def on_rate_limited(self, retry_after: float | None = None) -> None:
        """A 429 (throttling, not quota). ``retry_after`` is for that request's retry alone.

        The limit slows down only when the window is full and its 429 share exceeds the
        threshold.  The window then starts afresh and ignores the outcomes of the attempts already
        in flight (they started under the old limit), so one burst of 429s counts once, as TCP
        cuts its window once per round trip.
        """
        self.rate_limited += 1
        if self._stale:
            self._stale -= 1
            return
        window = self._window
        window.add(True)
        if window.full and window.share > self._share_threshold:
            # An edge answers every start above it at once, so its share is far above the
            # threshold; scattered 429s (a busy gateway) barely cross it and set no plateau.
            edge = window.share > 2 * self._share_threshold
            self._cut_from = self.limit if edge else math.inf
            self.limit = slowed_limit(self.limit, window.share)
            self._threshold = self.limit
            self.min_limit_seen = min(self.min_limit_seen, self.limit)
            self.slowdowns += 1
            self._cut_reason = "429 slow-down"
            window.clear()
            self._stale = self.in_flight

    def on_headers(self, headers: Mapping[str, str]) -> None:
        """Believe ``X-RateLimit-Remaining`` (requests) when a server sends it; cheap, optional.

        GonkaGate documents no such headers; OpenAI-style gateways send
        ``x-ratelimit-remaining-requests``.  A remaining count caps every bucket's tokens.
        """
        raw = headers.get("x-ratelimit-remaining-requests") or headers.get("x-ratelimit-remaining")
        if raw is None or not self._buckets:
            return
        try:
            remaining = float(raw)
        except ValueError:
            return
        if remaining >= 0:
            now = time.monotonic()
            for b in self._buckets:
                b.limit_to(remaining, now)

    # -- for the progress display ----------------------------------------------------------------

    def statistics(self) -> ThrottleStatistics:
        return ThrottleStatistics(
            limit=math.ceil(self.limit),
            max_concurrency=self.max_concurrency,
            in_flight=self.in_flight,
            waiting=self.waiting,
            reason=self.reason,
            slowdowns=self.slowdowns,
            rate_limited=self.rate_limited,
            outage_pauses=self.outage_pauses,
        )

    @property
    def reason(self) -> str:
        """What holds starts back now ("ok" when nobody waits)."""
        if self._paused_until > time.monotonic():
            return "outage pause"
        if not self.waiting:
            return "ok"
        return self._reason

    def _wake(self) -> None:
        """Hand free slots to waiters in order (each woken waiter already counts in flight)."""
        waiters = self._waiters
        while waiters and self.in_flight < self.limit:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                self.in_flight += 1
