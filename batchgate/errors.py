"""The batchgate error tree, the status/code table that picks a class, and secret redaction.

The retry decision is the class and nothing else::

    BatchgateError
    ├── InputError                  bad prompt file / job file / option (exit 2)
    │   └── JobFileError
    ├── LedgerError                 the run record cannot be read or written
    ├── OutputLocked                another runner holds the output directory (exit 4)
    └── ApiError                    one attempt failed talking to the API
        ├── RetryableError          worth another attempt
        │   ├── RateLimited         429 rate_limit_exceeded / transfer_agent_capacity_reached / unknown code
        │   ├── ServerError         5xx (and 408/409/425)
        │   ├── StreamInterrupted   reset / disconnect / payload error / error sent mid-stream
        │   │   └── ConnectFailed   the server could not be reached at all (refused, DNS, TLS, connect timeout)
        │   ├── StreamProtocolError bytes that are not the SSE/JSON we expect, or an event over the size cap
        │   ├── AnswerTooLong       the answer passed AttemptLimits.max_answer_chars
        │   └── AttemptTimeout      idle (stalled) stream (also a TimeoutError)
        │       └── DeadlineExceeded  the attempt passed AttemptLimits.deadline_s
        ├── Interrupted             cancelled by a second signal mid-stream (recorded, never raised)
        └── FatalApiError           retrying cannot help
            ├── AuthError           401 / 403
            ├── InsufficientBalance 402: the whole run stops starting requests (exit 3)
            │   └── QuotaExhausted  429 insufficient_quota: the same, in the current docs' form
            └── BadRequest          400 / 404 / 422 and other 4xx
                ├── ModelNotFound   404 model_not_found
                └── Redirected      a 3xx answer to a POST (never followed: the key stays on its origin)

The class comes from :func:`error_class`: one table keyed by HTTP status and GonkaGate's string
``error.code``, falling back on the status alone. Every ``ApiError`` keeps what the attempt
received before it failed (``received_tokens``, ``received_chars``, ``content``, ``partial``) so a
stream cut after tokens arrived is accounted as unconfirmed spend, plus the server's ``code`` and
the ``x-request-id`` of the response. Messages are redacted of API keys and bearer tokens on the
way in: servers echo request headers back in error bodies.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import Completion

__all__ = [
    "AnswerTooLong",
    "ApiError",
    "AttemptTimeout",
    "AuthError",
    "BadRequest",
    "BatchgateError",
    "ConnectFailed",
    "DeadlineExceeded",
    "FatalApiError",
    "InputError",
    "InsufficientBalance",
    "Interrupted",
    "JobFileError",
    "LedgerError",
    "ModelNotFound",
    "OutputLocked",
    "QuotaExhausted",
    "RateLimited",
    "Redirected",
    "RetryableError",
    "ServerError",
    "StreamInterrupted",
    "StreamProtocolError",
    "error_class",
    "redact",
    "status_for_code",
]

REDACTED = "[REDACTED]"
# "Bearer <token>" in any case, and anything shaped like a GonkaGate key (gp-... / gpm-...).
_TOKEN_RE = re.compile(r"(?i)(\bbearer\s+)[^\s\"',;}\]]+|\bgpm?-[A-Za-z0-9][A-Za-z0-9._-]{7,}")


def _sub(m: re.Match[str]) -> str:
    return m.group(1) + REDACTED if m.group(1) else REDACTED


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every secret, every ``Bearer <token>`` and every key-shaped word replaced.

    Secrets shorter than 4 characters are ignored (replacing "a" everywhere hides nothing and
    garbles everything).
    """
    for secret in secrets:
        if secret and len(secret) >= 4 and secret in text:
            text = text.replace(secret, REDACTED)
    if "earer" in text or "EARER" in text or "gp" in text:
        text = _TOKEN_RE.sub(_sub, text)
    return text


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
    """One attempt failed; ``kind`` is the short cause recorded in the ledger.

    ``message`` is redacted (Bearer tokens, key-shaped words, and ``secrets``) before it is kept.
    """

    kind = "api_error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
        received_tokens: int = 0,
        received_chars: int = 0,
        content: str = "",
        partial: Completion | None = None,
        secrets: Iterable[str] = (),
    ) -> None:
        message = redact(message, secrets)
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.request_id = request_id
        self.received_tokens = received_tokens
        self.received_chars = received_chars
        self.content = content
        self.partial = partial

    def __str__(self) -> str:
        text = f"{self.status} {self.message}" if self.status else self.message
        return f"{text} (request id {self.request_id})" if self.request_id else text

    def as_record(self) -> dict[str, object]:
        """The ``error`` object written to the ledger."""
        rec: dict[str, object] = {"type": self.kind, "status": self.status, "message": self.message}
        if self.code is not None:
            rec["code"] = self.code
        if self.request_id is not None:
            rec["request_id"] = self.request_id
        return rec


class RetryableError(ApiError):
    kind = "retryable"


class RateLimited(RetryableError):
    kind = "rate_limited"

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class ServerError(RetryableError):
    kind = "server_error"


class StreamInterrupted(RetryableError):
    kind = "stream_interrupted"


class ConnectFailed(StreamInterrupted):
    """The server could not be reached at all (refused, DNS, TLS, connect timeout)."""

    kind = "connect_failed"


class StreamProtocolError(RetryableError):
    """Bytes from the server that are not the SSE/JSON we expect."""

    kind = "protocol_error"


class AnswerTooLong(RetryableError):
    """The answer passed its size cap (a server ignoring ``max_tokens``); cut, the partial is unconfirmed."""

    kind = "answer_too_long"


class AttemptTimeout(RetryableError, TimeoutError):
    kind = "timeout"


class DeadlineExceeded(AttemptTimeout):
    """The attempt ran past its deadline while data still arrived."""

    kind = "deadline"


class Interrupted(ApiError):
    """A request abandoned by a second SIGINT/SIGTERM after tokens arrived: its spend is unconfirmed."""

    kind = "interrupted"


class FatalApiError(ApiError):
    kind = "fatal"


class AuthError(FatalApiError):
    kind = "auth"


class InsufficientBalance(FatalApiError):
    kind = "insufficient_balance"


class QuotaExhausted(InsufficientBalance):
    """429 ``insufficient_quota``: the prepaid balance is too low (the current docs' form of 402)."""

    kind = "insufficient_quota"


class BadRequest(FatalApiError):
    kind = "bad_request"


class ModelNotFound(BadRequest):
    kind = "model_not_found"


class Redirected(BadRequest):
    """A redirect answered a POST; not followed, so the request (and the key) never left its origin."""

    kind = "redirected"

    def __init__(self, message: str, *, location: str | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.location = location


#: (status, error.code) -> class; (status, None) is the status's default. The docs' table, one row each.
_TABLE: dict[tuple[int, str | None], type[ApiError]] = {
    (400, None): BadRequest,
    (401, None): AuthError,
    (402, None): InsufficientBalance,
    (403, None): AuthError,
    (404, None): BadRequest,
    (404, "model_not_found"): ModelNotFound,
    (408, None): ServerError,
    (409, None): ServerError,
    (425, None): ServerError,
    (429, None): RateLimited,
    (429, "insufficient_quota"): QuotaExhausted,
    (429, "rate_limit_exceeded"): RateLimited,
    (429, "transfer_agent_capacity_reached"): RateLimited,
}

#: The status a code implies when it comes without one (an error object sent mid-stream).
_CODE_STATUS: dict[str, int] = {
    "invalid_request_error": 400,
    "invalid_api_key": 401,
    "authentication_error": 401,
    "insufficient_balance": 402,
    "account_deactivated": 403,
    "model_not_found": 404,
    "insufficient_quota": 429,
    "rate_limit_exceeded": 429,
    "rate_limit_error": 429,
    "transfer_agent_capacity_reached": 429,
    "server_error": 500,
    "service_unavailable": 503,
}


def error_class(status: int, code: str | None = None) -> type[ApiError]:
    """The class for an HTTP error answer: by status, then by ``error.code``; unknown codes fall back on status."""
    cls = _TABLE.get((status, code)) if code is not None else None
    if cls is not None:
        return cls
    cls = _TABLE.get((status, None))
    if cls is not None:
        return cls
    if 300 <= status < 400:
        return Redirected
    if status >= 500:
        return ServerError
    return BadRequest


def status_for_code(code: str | None) -> int | None:
    """The HTTP status a known ``error.code`` stands for (an int-like code is taken as a status)."""
    if code is None:
        return None
    status = _CODE_STATUS.get(code)
    if status is None and code.isdigit() and len(code) == 3:
        status = int(code)
    return status


class LengthCut(FatalApiError):
    """An answer cut at ``max_tokens`` that the run was told to count as failed (``--on-length fail``)."""

    kind = "length"
