"""The retry policy around one attempt (tenacity).

Only :class:`~batchgate.errors.RetryableError` is retried: exponential backoff with full jitter,
or the server's ``Retry-After`` on a 429.  Every failed attempt leaves its cause, and a stream cut
after tokens arrived leaves what it received, so the ledger can show unconfirmed spend.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt
from tenacity.wait import wait_random_exponential

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
    cut_tokens: int = 0  # completion tokens received by attempts cut before their usage chunk


class RetryPolicy:
    """Runs an attempt factory until it succeeds, fails for good, or attempts run out."""

    def __init__(
        self,
        max_attempts: int = 5,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        on_failed_attempt: Callable[[ApiError], None] | None = None,
    ) -> None:
        self.max_attempts = max_attempts
        self.on_failed_attempt = on_failed_attempt
        self._backoff = wait_random_exponential(multiplier=backoff_base_s, max=backoff_max_s)
        self._backoff_max_s = backoff_max_s
        self._retrying = AsyncRetrying(
            stop=stop_after_attempt(max_attempts),
            wait=self._wait,
            retry=retry_if_exception_type(RetryableError),
            reraise=True,
        )

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, RateLimited) and exc.retry_after is not None:
            return min(exc.retry_after, 4 * self._backoff_max_s)
        return float(self._backoff(state))

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
                if self.on_failed_attempt is not None:
                    self.on_failed_attempt(exc)
                raise

        try:
            outcome.completion = await self._retrying.copy()(tracked)
        except ApiError as exc:
            outcome.error = exc
            outcome.causes.pop()  # the final error is the row's error, not a retry cause
        return outcome
