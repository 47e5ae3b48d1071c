"""The throttle's pure parts (bucket arithmetic, the 429 share window) and its synchronous rules.

A coroutine that finishes on its first ``send(None)`` never awaited, which is exactly the
hot-path promise of :meth:`Throttle.acquire`; the tests that need one to block run in a loop
(an ``asyncio.sleep`` needs it) but never let it turn.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Coroutine
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchgate.throttle import (
    ShareWindow,
    Throttle,
    ThrottleStatistics,
    TokenBucket,
    slowed_limit,
    with_headroom,
)


def finishes_without_awaiting(coro: Coroutine[Any, Any, None]) -> bool:
    try:
        coro.send(None)
    except StopIteration:
        return True
    coro.close()
    return False


# -- TokenBucket -----------------------------------------------------------------------------------


def test_bucket_gives_its_capacity_at_once_then_one_token_per_interval() -> None:
    b = TokenBucket(3, 2.0, now=100.0)  # 3 tokens, 2 per second
    assert [b.take(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take(100.0) == pytest.approx(0.5)  # the 4th waits for the next token
    assert b.take(100.0) == pytest.approx(1.0)  # the 5th for the one after (reserved in order)
    b.give_back()  # the 5th was cancelled
    assert b.take(100.0) == pytest.approx(1.0)


def test_bucket_refills_up_to_capacity_only() -> None:
    b = TokenBucket(2, 1.0, now=0.0)
    b.take(0.0)
    b.take(0.0)
    assert not b.available(0.5)
    assert b.available(1.0)
    b.refill(1000.0)
    assert b.tokens == 2.0


def test_bucket_believes_a_lower_remaining_count() -> None:
    b = TokenBucket(10, 1.0, now=0.0)
    b.limit_to(1, 0.0)
    assert b.take(0.0) == 0.0 and b.take(0.0) == pytest.approx(1.0)
    b.limit_to(50, 0.0)  # never more than the capacity or what we had
    assert b.tokens == -1.0


def test_bucket_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0, 1.0, 0.0)
    with pytest.raises(ValueError):
        TokenBucket(5, 0.0, 0.0)


@given(
    capacity=st.integers(1, 30),
    rate=st.floats(0.5, 50.0),
    gaps=st.lists(st.floats(0.0, 0.3), min_size=1, max_size=200),
    window=st.floats(0.01, 5.0),
)
def test_bucket_never_allows_more_than_capacity_plus_refill_in_any_window(
    capacity: int, rate: float, gaps: list[float], window: float
) -> None:
    """Whatever the arrival pattern, starts in any window of T seconds <= capacity + rate * T."""
    b = TokenBucket(capacity, rate, now=0.0)
    now = 0.0
    starts: list[float] = []
    for gap in gaps:
        now += gap
        starts.append(now + b.take(now))
    starts.sort()
    lo = 0
    for hi, t in enumerate(starts):
        while starts[lo] < t - window:
            lo += 1
        assert hi - lo + 1 <= capacity + rate * window + 1e-6


# -- ShareWindow -----------------------------------------------------------------------------------


@given(st.integers(1, 20), st.lists(st.booleans(), max_size=300))
def test_share_window_matches_a_naive_count(size: int, outcomes: list[bool]) -> None:
    w = ShareWindow(size)
    naive: deque[bool] = deque(maxlen=size)
    for o in outcomes:
        w.add(o)
        naive.append(o)
        assert w.hits == sum(naive) and len(w) == len(naive)
        assert w.share == pytest.approx(sum(naive) / len(naive))
        assert w.full == (len(naive) == size)


def test_share_window_clear_and_empty() -> None:
    w = ShareWindow(4)
    assert w.share == 0.0 and not w.full
    for o in (True, True, False, True):
        w.add(o)
    assert w.full and w.share == 0.75
    w.clear()
    assert len(w) == 0 and w.hits == 0
    with pytest.raises(ValueError):
        ShareWindow(0)


def test_headroom_keeps_a_token_or_two_in_hand() -> None:
    assert (with_headroom(600), with_headroom(200), with_headroom(10), with_headroom(1)) == (588, 196, 9, 1)


def test_slowdown_is_proportional_to_the_share_and_at_most_halves() -> None:
    assert slowed_limit(50, 0.06) == pytest.approx(47.0)
    assert slowed_limit(200, 0.75) == 100.0
    assert slowed_limit(1.5, 0.4) == 1.0


# -- Throttle rules --------------------------------------------------------------------------------


def test_defaults_are_one_keys_allowance() -> None:
    t = Throttle(200)
    s = t.statistics()
    assert isinstance(s, ThrottleStatistics)
    assert (s.limit, s.max_concurrency, s.in_flight, s.waiting, s.reason) == (50, 50, 0, 0, "ok")
    assert [(b.capacity, b.rate) for b in t._buckets] == [(588, 10.0), (196, 20.0)]  # 2% headroom
    assert Throttle(8).max_concurrency == 8
    assert Throttle(200, key_concurrency=None).max_concurrency == 200
    assert Throttle(10, key_rpm=None, key_burst_10s=None)._buckets == ()
    with pytest.raises(ValueError):
        Throttle(0)
    with pytest.raises(AttributeError):
        s.limit = 3  # type: ignore[misc]  # frozen snapshot


async def test_acquire_does_not_await_when_nothing_limits() -> None:
    for t in (Throttle(3, key_rpm=None, key_burst_10s=None), Throttle(3)):
        for _ in range(3):
            assert finishes_without_awaiting(t.acquire())
        assert t.in_flight == 3
        assert not finishes_without_awaiting(t.acquire())  # the 4th must wait for a slot


async def test_the_burst_bucket_holds_starts_back_once_empty() -> None:
    t = Throttle(50, key_rpm=None, key_burst_10s=6, burst_window_s=1000.0)  # 5 after the headroom
    for _ in range(5):
        assert finishes_without_awaiting(t.acquire())
        t.release()
    assert not finishes_without_awaiting(t.acquire())


async def test_a_single_429_neither_slows_nor_pauses_anyone() -> None:
    t = Throttle(50, key_rpm=None, key_burst_10s=None)
    for _ in range(99):
        t.on_success()
    t.on_rate_limited(30.0)
    assert t.limit == 50 and t.slowdowns == 0 and t.rate_limited == 1
    assert finishes_without_awaiting(t.acquire())


def test_scattered_429s_below_the_threshold_never_slow_down() -> None:
    t = Throttle(50, share_window=100, share_threshold=0.05)
    for i in range(5000):
        t.on_rate_limited(1.0) if i % 25 == 0 else t.on_success()  # 4 %
    assert t.slowdowns == 0 and t.limit == 50 and t.rate_limited == 200


def test_a_high_429_share_slows_down_in_proportion_then_grows_back() -> None:
    t = Throttle(200, key_concurrency=None, share_window=20, share_threshold=0.05)
    for i in range(20):
        t.on_rate_limited(None) if i % 2 else t.on_success()  # 50 %
    assert t.slowdowns == 1 and t.limit == pytest.approx(100.0)
    assert t.statistics().limit == 100 and t.min_limit_seen == pytest.approx(100.0)
    t.on_rate_limited(None)  # the window started afresh: one more 429 is not a new slow-down
    assert t.slowdowns == 1
    for _ in range(100):
        t.on_success()
    assert 100.5 < t.limit < 102  # additive: about +1 per limit's worth of successes


def test_growth_is_slow_just_below_an_edge_and_normal_after_scattered_429s() -> None:
    """A 50 % share (an edge) sets a plateau below the cut level; a 7 % share (noise) sets none."""
    edge = Throttle(40, key_concurrency=None, share_window=20, share_threshold=0.05)
    for i in range(20):
        edge.on_rate_limited(None) if i % 2 else edge.on_success()
    assert edge.limit == pytest.approx(20.0)
    for _ in range(1000):
        edge.on_success()  # ~450 successes to 36 at +1/limit, then 8x slower towards 40
    assert 36 < edge.limit < 39, edge.limit

    noise = Throttle(40, key_concurrency=None, share_window=100, share_threshold=0.05)
    for i in range(100):
        noise.on_rate_limited(None) if i % 16 == 15 or i == 99 else noise.on_success()  # 7 of 100
    assert noise.slowdowns == 1 and noise.limit == pytest.approx(37.2)
    for _ in range(200):
        noise.on_success()  # ~110 successes back to the ceiling
    assert noise.limit == 40, noise.limit


async def test_failures_in_a_row_pause_everyone_and_leave_one_probe() -> None:
    t = Throttle(10, outage_after=3)
    t.on_failure()
    t.on_failure()
    t.on_success()  # the streak is broken
    t.on_failure()
    t.on_failure()
    assert t.outage_pauses == 0
    t.on_failure()
    assert t.outage_pauses == 1 and t.limit == 1.0 and t.min_limit_seen == 1.0
    assert t.statistics().reason == "outage pause"
    assert not finishes_without_awaiting(t.acquire())
    t.on_success()  # one that was in flight came back: slow start, but the pause runs its time
    assert t.statistics().reason == "outage pause" and t.limit == 2.0


async def test_rate_limit_headers_cap_the_buckets() -> None:
    t = Throttle(50, key_rpm=None, key_burst_10s=200, burst_window_s=1000.0)
    t.on_headers({"x-ratelimit-remaining-requests": "1"})
    t.on_headers({"x-ratelimit-remaining": "junk"})  # ignored
    assert finishes_without_awaiting(t.acquire())
    assert not finishes_without_awaiting(t.acquire())


def test_bucket_does_not_credit_time_spent_full() -> None:
    """Full for 100 s, then drained: the refill counts from the drain, not from 100 s ago."""
    b = TokenBucket(5, 1.0, now=0.0)
    for _ in range(5):
        assert b.available(100.0)
        b.take(100.0)
    assert not b.available(100.5)
    assert b.take(100.5) == pytest.approx(0.5)


async def test_cancelled_acquires_give_their_slot_and_tokens_back() -> None:
    t = Throttle(1, key_rpm=None, key_burst_10s=None)
    await t.acquire()
    queued = asyncio.create_task(t.acquire())
    await asyncio.sleep(0)
    assert t.statistics().waiting == 1 and t.statistics().reason == "ok"  # our own ceiling, not a key's
    queued.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await queued
    assert t.waiting == 0 and t.in_flight == 1
    granted = asyncio.create_task(t.acquire())
    await asyncio.sleep(0)
    t.release()  # hands the slot over: still one in flight, now the waiter's
    assert t.in_flight == 1
    granted.cancel()  # ...cancelled before it could run: the slot must come back
    with contextlib.suppress(asyncio.CancelledError):
        await granted
    assert t.in_flight == 0

    t = Throttle(5, key_rpm=None, key_burst_10s=2, burst_window_s=100.0)  # 1 token after headroom
    async with t:
        pass
    sleeper = asyncio.create_task(t.acquire())
    await asyncio.sleep(0.01)
    s = t.statistics()
    assert (s.in_flight, s.waiting, s.reason) == (1, 1, "key limit")  # holds its slot while it waits
    sleeper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sleeper
    assert t.in_flight == 0 and t.waiting == 0


async def test_the_key_ceiling_and_a_slow_down_are_named() -> None:
    t = Throttle(200, key_rpm=None, key_burst_10s=None, share_window=10)
    for _ in range(50):
        await t.acquire()
    blocked = asyncio.create_task(t.acquire())
    await asyncio.sleep(0)
    assert t.statistics().reason == "key limit"
    for _ in range(10):
        t.on_rate_limited(1.0)
    assert t.limit == 25 and t.slowdowns == 1
    for _ in range(50):
        t.release()
    await blocked
    assert t.in_flight == 1
    for _ in range(24):
        await t.acquire()
    blocked = asyncio.create_task(t.acquire())
    await asyncio.sleep(0)
    assert t.statistics().reason == "429 slow-down" and t.statistics().limit == 25
    blocked.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await blocked


@given(st.lists(st.sampled_from(["acquire", "acquire", "release", "cancel", "429", "ok"]), max_size=60))
def test_slots_are_never_lost_or_left_free_while_someone_waits(ops: list[str]) -> None:
    """Adversarial orders of acquire, release, cancel and outcomes: the count stays exact, and a
    free slot never sits next to a waiter (that would be a run that hangs)."""

    async def scenario() -> None:
        t = Throttle(4, key_rpm=None, key_burst_10s=None, share_window=4, share_threshold=0.3)
        tasks: list[asyncio.Task[None]] = []
        holders = 0
        for op in ops:
            if op == "acquire":
                tasks.append(asyncio.create_task(t.acquire()))
            elif op == "release" and holders:
                t.release()
                holders -= 1
            elif op == "cancel":
                pending = [x for x in tasks if not x.done()]
                if pending:
                    pending[0].cancel()
            elif op == "429":
                t.on_rate_limited(1.0)
            elif op == "ok":
                t.on_success()
            for _ in range(3):
                await asyncio.sleep(0)
            holders += sum(1 for x in tasks if x.done() and not x.cancelled())
            tasks = [x for x in tasks if not x.done()]
            assert t.in_flight == holders
            assert t.waiting == len(tasks)
            if tasks:
                assert t.in_flight >= t.limit
        for x in tasks:
            x.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(scenario())


async def test_after_the_pause_one_probe_goes_then_the_hot_path_is_back() -> None:
    t = Throttle(10, key_rpm=None, key_burst_10s=None, outage_after=1, max_pause_s=0.05)
    t.on_failure()
    t0 = asyncio.get_running_loop().time()
    await t.acquire()  # the probe waits the pause out
    assert asyncio.get_running_loop().time() - t0 >= 0.04
    assert not finishes_without_awaiting(t.acquire())  # limit 1: only the probe
    t.release()
    t.on_success()
    assert t.limit == 2.0 and finishes_without_awaiting(t.acquire())
