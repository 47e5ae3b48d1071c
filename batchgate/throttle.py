"""Adaptive concurrency and a requests-per-minute cap, shared by every worker.

On a 429 the whole run backs off, like TCP: the concurrency limit halves (at most once per
``cooldown_s``, so a burst of 429s from one overloaded moment counts once) and nobody starts an
attempt before the server's ``Retry-After`` has passed.  Each success adds ``1/limit``, so the
limit grows back by about one per round of requests once the errors stop.  When nothing limits
(limit at its maximum, no rpm cap, no pause) :meth:`Throttle.acquire` returns without awaiting,
keeping the common path cheap.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

__all__ = ["Throttle"]


class Throttle:
    """Gate for starting attempts; call :meth:`acquire` before and :meth:`release` after each."""

    def __init__(self, max_concurrency: int, rpm: float | None = None, cooldown_s: float = 1.0) -> None:
        self.max_concurrency = max_concurrency
        self.limit = float(max_concurrency)
        self.min_limit_seen = float(max_concurrency)
        self.in_flight = 0
        self.slowdowns = 0
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
        if self.limit < self.max_concurrency:
            self.limit = min(float(self.max_concurrency), self.limit + 1.0 / self.limit)
            self._wake(int(self.limit) - self.in_flight)

    def on_rate_limited(self, retry_after: float | None) -> None:
        now = time.monotonic()
        if retry_after:
            self._paused_until = max(self._paused_until, now + retry_after)
        if now - self._last_slowdown >= self._cooldown_s:
            self._last_slowdown = now
            self.limit = max(1.0, self.limit / 2)
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
