"""The batchgate error tree.

The retry decision is the class and nothing else::

    BatchgateError
    ├── InputError                  bad prompt file / job file / option (exit 2)
    │   └── JobFileError
    ├── LedgerError                 the run record cannot be read or written
    ├── OutputLocked                another runner holds the output directory (exit 4)
    └── ApiError                    one attempt failed talking to the API
        ├── RetryableError          worth another attempt
        │   ├── RateLimited         429, carries retry_after seconds
        │   ├── ServerError         5xx
        │   ├── StreamInterrupted   reset / disconnect / payload error / error sent mid-stream
        │   ├── StreamProtocolError a chunk that is not JSON (a garbled stream is worth a retry)
        │   └── AttemptTimeout      connect or idle timeout (also a TimeoutError)
        ├── Interrupted             cancelled by a second signal mid-stream (recorded, never raised)
        └── FatalApiError           retrying cannot help
            ├── AuthError           401 / 403
            ├── InsufficientBalance 402: the whole run stops starting requests (exit 3)
            └── BadRequest          400 / 404 / 422 and other 4xx

Every ``ApiError`` keeps what an attempt received before it failed (``received_tokens``,
``content``) so that a stream cut after tokens arrived can be accounted as unconfirmed spend.
"""

from __future__ import annotations

__all__ = [
    "ApiError",
    "AttemptTimeout",
    "AuthError",
    "BadRequest",
    "BatchgateError",
    "FatalApiError",
    "InputError",
    "InsufficientBalance",
    "Interrupted",
    "JobFileError",
    "LedgerError",
    "OutputLocked",
    "RateLimited",
    "RetryableError",
    "ServerError",
    "StreamInterrupted",
    "StreamProtocolError",
]


class BatchgateError(Exception):
    """Root of every error batchgate raises on purpose."""


class InputError(BatchgateError):
    """A user mistake in prompts, options or job files; the message names file and line."""


class JobFileError(InputError):
    """A TOML job file that cannot be used."""


class LedgerError(BatchgateError):
    """The run ledger cannot be read or written."""


class OutputLocked(BatchgateError):
    """Another batchgate process owns the output directory."""

    def __init__(self, path: str, pid: int | None) -> None:
        self.path = path
        self.pid = pid
        holder = f"pid {pid}" if pid else "another process"
        super().__init__(f"{path} is in use by {holder}; wait for it to finish or choose another --out")


class ApiError(BatchgateError):
    """One attempt failed; ``kind`` is the short cause recorded in the ledger."""

    kind = "api_error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        received_tokens: int = 0,
        content: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.received_tokens = received_tokens
        self.content = content

    def __str__(self) -> str:
        return f"{self.status} {self.message}" if self.status else self.message

    def as_record(self) -> dict[str, object]:
        """The ``error`` object written to the ledger."""
        return {"type": self.kind, "status": self.status, "message": self.message}


class RetryableError(ApiError):
    kind = "retryable"


class RateLimited(RetryableError):
    kind = "rate_limited"

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.retry_after = retry_after


class ServerError(RetryableError):
    kind = "server_error"


class StreamInterrupted(RetryableError):
    kind = "stream_interrupted"


class StreamProtocolError(RetryableError):
    """Bytes from the server that are not the SSE/JSON we expect."""

    kind = "protocol_error"


class AttemptTimeout(RetryableError, TimeoutError):
    kind = "timeout"


class Interrupted(ApiError):
    """A request abandoned by a second SIGINT/SIGTERM after tokens arrived: its spend is unconfirmed."""

    kind = "interrupted"


class FatalApiError(ApiError):
    kind = "fatal"


class AuthError(FatalApiError):
    kind = "auth"


class InsufficientBalance(FatalApiError):
    kind = "insufficient_balance"


class BadRequest(FatalApiError):
    kind = "bad_request"


class LengthCut(FatalApiError):
    """An answer cut at ``max_tokens`` that the run was told to count as failed (``--on-length fail``)."""

    kind = "length"
