"""Adaptive concurrency and a requests-per-minute cap, shared by every worker.

On a 429 the whole run backs off, like TCP: the concurrency limit halves (at most once per
``cooldown_s``, so a burst of 429s from one overloaded moment counts once) and nobody starts an
attempt before the server's ``Retry-After`` has passed.

An outage (``outage_after`` failed attempts in a row, none succeeding: connection refused, 5xx,
stalls) collapses the limit to one probe and pauses everyone for a doubling time (up to
``max_pause_s``).  Waiting here costs a prompt no attempt, so a network blip at 3 a.m. fails at
most the probes instead of burning the retries of every prompt in the file.

Successes grow the limit back: by one per success below the threshold set at the last
slow-down (slow start), by ``1/limit`` above it.  When nothing limits (limit at its maximum,
no rpm cap, no pause) :meth:`Throttle.acquire` returns without awaiting.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

__all__ = ["Throttle"]


class Throttle:
    """Gate for starting attempts; call :meth:`acquire` before and :meth:`release` after each."""

    def __init__(
        self,
        max_concurrency: int,
        rpm: float | None = None,
        cooldown_s: float = 1.0,
        outage_after: int = 5,
        max_pause_s: float = 60.0,
    ) -> None:
        self.max_concurrency = max_concurrency
        self.limit = float(max_concurrency)
        self.min_limit_seen = float(max_concurrency)
        self.in_flight = 0
        self.slowdowns = 0
        self.outage_pauses = 0
        self._threshold = float(max_concurrency)
        self._failures_in_a_row = 0
        self._outage_after = outage_after
        self._pause_s = 0.0
        self._max_pause_s = max_pause_s
        self._interval = 60.0 / rpm if rpm else 0.0
        self._next_start = 0.0
        self._paused_until = 0.0
        self._cooldown_s = cooldown_s
        self._last_slowdown = -1e9
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        if not self._blocked() and not self._interval:
            self.in_flight += 1
            return
        while True:
            now = time.monotonic()
            if self._paused_until > now:
                await asyncio.sleep(self._paused_until - now)
                continue
            if self.in_flight >= max(1, int(self.limit)):
                fut = asyncio.get_running_loop().create_future()
                self._waiters.append(fut)
                try:
                    await fut
                finally:
                    if not fut.done():
                        fut.cancel()
                continue
            if self._interval:
                start = max(now, self._next_start)
                self._next_start = start + self._interval
                self.in_flight += 1
                if start > now:
                    try:
                        await asyncio.sleep(start - now)
                    except BaseException:
                        self.release()
                        raise
                return
            self.in_flight += 1
            return

    def release(self) -> None:
        self.in_flight -= 1
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                break

    def on_success(self) -> None:
        self._failures_in_a_row = 0
        self._pause_s = 0.0
        if self.limit < self.max_concurrency:
            step = 1.0 if self.limit < self._threshold else 1.0 / self.limit
            self.limit = min(float(self.max_concurrency), self.limit + step)
            self._wake(int(self.limit) - self.in_flight)

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

    def on_rate_limited(self, retry_after: float | None) -> None:
        now = time.monotonic()
        if retry_after:
            self._paused_until = max(self._paused_until, now + retry_after)
        if now - self._last_slowdown >= self._cooldown_s:
            self._last_slowdown = now
            self.limit = max(1.0, self.limit / 2)
            self._threshold = self.limit
            self.min_limit_seen = min(self.min_limit_seen, self.limit)
            self.slowdowns += 1

    def _blocked(self) -> bool:
        return self.in_flight >= self.limit or self._paused_until > time.monotonic()

    def _wake(self, n: int) -> None:
        while n > 0 and self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                n -= 1
