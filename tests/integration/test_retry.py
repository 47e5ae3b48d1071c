"""The retry policy: which errors are retried, how long it waits, what it records."""

from __future__ import annotations

import time

from batchgate.client import Choice, Completion
from batchgate.errors import ApiError, AuthError, RateLimited, ServerError, StreamInterrupted
from batchgate.retry import RetryPolicy
from batchgate.usage import parse_usage


def scripted(*steps: ApiError | None) -> tuple[list[int], object]:
    calls: list[int] = []

    async def attempt() -> Completion:
        calls.append(1)
        step = steps[len(calls) - 1]
        if step is not None:
            raise step
        return Completion([Choice(0, "answer", finish_reason="stop")], parse_usage({"total_cost_usd": 0.1}))

    return calls, attempt


async def test_first_attempt_success_records_one_attempt() -> None:
    calls, attempt = scripted(None)
    out = await RetryPolicy(5, 0.001, 0.01).run(attempt)  # type: ignore[arg-type]
    assert out.completion is not None and out.attempts == 1 and out.causes == [] and len(calls) == 1


async def test_retryable_errors_are_retried_with_causes_and_cut_tokens() -> None:
    seen: list[str] = []
    calls, attempt = scripted(ServerError("500"), StreamInterrupted("cut", received_tokens=7), None)
    policy = RetryPolicy(5, 0.001, 0.01, on_failed_attempt=lambda e: seen.append(e.kind))
    out = await policy.run(attempt)  # type: ignore[arg-type]
    assert out.completion is not None
    assert out.attempts == 3 and len(calls) == 3
    assert out.causes == ["server_error", "stream_interrupted"] == seen
    assert out.cut_tokens == 7


async def test_fatal_error_is_not_retried() -> None:
    calls, attempt = scripted(AuthError("bad key", status=401), None)
    out = await RetryPolicy(5, 0.001, 0.01).run(attempt)  # type: ignore[arg-type]
    assert isinstance(out.error, AuthError) and out.attempts == 1 and out.causes == [] and len(calls) == 1


async def test_attempts_run_out() -> None:
    for max_attempts in (1, 2, 4):
        calls, attempt = scripted(*[ServerError("500")] * 6)
        out = await RetryPolicy(max_attempts, 0.001, 0.01).run(attempt)  # type: ignore[arg-type]
        assert isinstance(out.error, ServerError)
        assert out.attempts == len(calls) == max_attempts
        assert out.causes == ["server_error"] * (max_attempts - 1)


async def test_retry_after_is_honoured_over_backoff() -> None:
    _calls, attempt = scripted(RateLimited("slow down", status=429, retry_after=0.2), None)
    t0 = time.monotonic()
    out = await RetryPolicy(3, 0.0, 1.0).run(attempt)  # type: ignore[arg-type]
    assert out.completion is not None and out.causes == ["rate_limited"]
    assert time.monotonic() - t0 >= 0.19


def test_absurd_retry_after_is_capped() -> None:
    policy = RetryPolicy(3, 0.5, 30.0)
    assert policy.backoff(1, RateLimited("x", retry_after=3600)) == 120.0


def test_backoff_grows_exponentially_and_is_capped() -> None:
    policy = RetryPolicy(10, 0.1, 1.0)
    for failures, cap in ((1, 0.1), (2, 0.2), (3, 0.4), (8, 1.0)):
        waits = [policy.backoff(failures, ServerError("x")) for _ in range(200)]
        assert all(0 <= w <= cap for w in waits)
        assert max(waits) > cap * 0.8  # full jitter spans the whole range
