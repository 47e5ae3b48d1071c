"""The retry policy around one attempt (tenacity).

Only :class:`~batchgate.errors.RetryableError` is retried: exponential backoff with full jitter,
or the server's ``Retry-After`` on a 429.  Every failed attempt leaves its cause, and a stream cut
after tokens arrived leaves what it received, so the ledger can show unconfirmed spend.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from .client import Completion
from .errors import ApiError, RateLimited, RetryableError

__all__ = ["Outcome", "RetryPolicy"]


@dataclass(slots=True)
class Outcome:
    """The end of a prompt's attempts: a completion, or the error that ended them."""

    completion: Completion | None = None
    error: ApiError | None = None
    attempts: int = 0
    causes: list[str] = field(default_factory=list)
    cut_tokens: int = 0  # content events received by attempts cut before their usage chunk
    cut_chars: int = 0  # characters (content, reasoning, tool arguments) those attempts received


class RetryPolicy:
    """Runs an attempt factory until it succeeds, fails for good, or attempts run out.

    The first attempt runs bare: tenacity's machinery (and the reference cycles it leaves for
    the garbage collector) is paid only by prompts that actually need a retry, which keeps the
    per-request CPU of a healthy run low.
    """

    def __init__(
        self,
        max_attempts: int = 5,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        on_failed_attempt: Callable[[ApiError], None] | None = None,
    ) -> None:
        self.max_attempts = max_attempts
        self.on_failed_attempt = on_failed_attempt
        self._backoff_base_s = backoff_base_s
        self._backoff_max_s = backoff_max_s
        self._retrying = AsyncRetrying(
            stop=stop_after_attempt(max_attempts - 1),  # the bare first attempt counts too
            wait=self._wait_after_retry,
            retry=retry_if_exception_type(RetryableError),
            reraise=True,
        )

    def backoff(self, failures: int, exc: BaseException | None) -> float:
        """Seconds to wait after the ``failures``-th failed attempt: Retry-After, else full jitter."""
        if isinstance(exc, RateLimited) and exc.retry_after is not None:
            return min(exc.retry_after, 4 * self._backoff_max_s)
        return random.uniform(0, min(self._backoff_max_s, self._backoff_base_s * 2 ** (failures - 1)))

    def _wait_after_retry(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        return self.backoff(state.attempt_number + 1, exc)

    async def run(self, attempt: Callable[[], Awaitable[Completion]]) -> Outcome:
        """Never raises an ApiError: the outcome carries it."""
        outcome = Outcome()

        async def tracked() -> Completion:
            outcome.attempts += 1
            try:
                return await attempt()
            except ApiError as exc:
                outcome.causes.append(exc.kind)
                outcome.cut_tokens += exc.received_tokens
                outcome.cut_chars += getattr(exc, "received_chars", 0) or 0
                if self.on_failed_attempt is not None:
                    self.on_failed_attempt(exc)
                raise

        try:
            outcome.completion = await tracked()
            return outcome
        except RetryableError as exc:
            if self.max_attempts <= 1:
                return self._failed(outcome, exc)
            await asyncio.sleep(self.backoff(1, exc))
        except ApiError as exc:
            return self._failed(outcome, exc)
        try:
            outcome.completion = await self._retrying.copy()(tracked)
        except ApiError as exc:
            return self._failed(outcome, exc)
        return outcome

    @staticmethod
    def _failed(outcome: Outcome, exc: ApiError) -> Outcome:
        outcome.error = exc
        outcome.causes.pop()  # the final error is the row's error, not a retry cause
        return outcome
