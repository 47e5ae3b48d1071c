"""One streamed chat-completion attempt over aiohttp.

Posts a pre-encoded body, feeds the response into :class:`~batchgate.sse.SSEDecoder` and maps
every failure onto the :mod:`batchgate.errors` tree.  It never retries, schedules or writes files.
The per-chunk loop is the hottest code in batchgate: one ``orjson.loads`` and a few dict lookups
per chunk, content pieces collected in a list and joined once.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import importlib.metadata
import time
import urllib.parse
import urllib.request
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from .errors import (
    ApiError,
    AttemptTimeout,
    AuthError,
    BadRequest,
    InsufficientBalance,
    RateLimited,
    ServerError,
    StreamInterrupted,
    StreamProtocolError,
)
from .sse import SSEDecoder

__all__ = ["Completion", "ConnectFailed", "StallWatch", "make_session", "stream_completion"]


def _version() -> str:
    try:
        return importlib.metadata.version("batchgate")
    except importlib.metadata.PackageNotFoundError:
        return "dev"


_loads = orjson.loads
_monotonic = time.monotonic
_USER_AGENT = f"batchgate/{_version()}"
_CUT = (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, ConnectionError)


class ConnectFailed(StreamInterrupted):
    """The server could not be reached at all (refused, DNS, TLS)."""

    kind = "connect_failed"


class Completion:
    """What one successful attempt produced."""

    __slots__ = ("content", "finish_reason", "received_tokens", "ttft_s", "usage")

    def __init__(
        self,
        content: str,
        finish_reason: str | None,
        usage: dict[str, Any] | None,
        ttft_s: float | None,
        received_tokens: int,
    ) -> None:
        self.content = content
        self.finish_reason = finish_reason
        self.usage = usage
        self.ttft_s = ttft_s
        self.received_tokens = received_tokens


def env_proxy(url: str) -> str | None:
    """The proxy the environment names for ``url`` (HTTPS_PROXY / HTTP_PROXY, minus NO_PROXY).

    Looked up once per run: aiohttp's ``trust_env`` redoes it (and reads ~/.netrc) on every
    request, which cost ~20% of the client's CPU. Loopback is never proxied.
    """
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if not host or host == "localhost" or host.startswith("127.") or host == "::1":
        return None
    if urllib.request.proxy_bypass(host):
        return None
    return urllib.request.getproxies().get(parts.scheme)


def make_session(
    api_key: str,
    *,
    concurrency: int,
    connect_timeout_s: float,
    idle_timeout_s: float | None = None,
    base_url: str | None = None,
) -> aiohttp.ClientSession:
    """One session for the whole run: pool sized to the concurrency, key in default headers.

    Leave ``idle_timeout_s`` None when a :class:`StallWatch` guards the streams: aiohttp's own
    read timeout re-arms a timer on every read, which costs more than the whole SSE parse.
    """
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency, ttl_dns_cache=300)
    timeout = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=connect_timeout_s, sock_read=idle_timeout_s)
    headers = {
        "Authorization": f"Bearer {api_key}",
        "Content-Type": "application/json",
        "Accept": "text/event-stream",
        "User-Agent": _USER_AGENT,
    }
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        headers=headers,
        raise_for_status=False,
        auto_decompress=True,
        proxy=env_proxy(base_url) if base_url else None,  # HTTPS_PROXY / NO_PROXY, as curl honours them
    )


class _Watched:
    __slots__ = ("last", "stalled", "task")

    def __init__(self, task: asyncio.Task[Any] | None) -> None:
        self.last = _monotonic()
        self.stalled = False
        self.task = task


class StallWatch:
    """Detects stalled streams with one periodic check for all of them.

    Each stream stamps the time of its last read; every ``idle_s / 4`` the watch cancels the
    attempts that have been silent for longer than ``idle_s`` and the attempt turns that
    cancellation into :class:`~batchgate.errors.AttemptTimeout`.
    """

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s
        self._streams: set[_Watched] = set()
        self._task: asyncio.Task[None] | None = None

    def watch(self) -> _Watched:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        w = _Watched(asyncio.current_task())
        self._streams.add(w)
        return w

    def unwatch(self, w: _Watched) -> None:
        self._streams.discard(w)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        idle = self.idle_s
        while True:
            await asyncio.sleep(idle / 4)
            deadline = _monotonic() - idle
            for w in [w for w in self._streams if w.last < deadline]:
                self._streams.discard(w)
                w.stalled = True
                if w.task is not None:
                    w.task.cancel()


def request_headers(prompt_id: str) -> dict[str, str]:
    """Per-request headers: the prompt id lets the server side (and our simulator) match requests."""
    return {"X-Client-Request-Id": quote(prompt_id, safe="")[:256]}


async def stream_completion(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str] | None = None,
    watch: StallWatch | None = None,
) -> Completion:
    """Run one attempt to completion.

    Raises an :class:`~batchgate.errors.ApiError` subclass carrying what was received before
    the failure (for unconfirmed-cost accounting).
    """
    started = _monotonic()
    watched = watch.watch() if watch is not None else _Watched(None)
    parts: list[str] = []
    append = parts.append
    usage: dict[str, Any] | None = None
    finish: str | None = None
    ttft: float | None = None
    done = False

    def consume(payloads: list[bytes]) -> None:
        # The per-event hot path: one orjson.loads and a few dict lookups.
        nonlocal usage, finish, ttft, done
        for payload in payloads:
            if payload == b"[DONE]":
                done = True
                continue
            obj = _loads(payload)
            choices = obj.get("choices")
            if choices:
                choice = choices[0]
                delta = choice.get("delta")
                if delta:
                    text = delta.get("content")
                    if text:
                        if ttft is None:
                            ttft = _monotonic() - started
                        append(text)
                reason = choice.get("finish_reason")
                if reason:
                    finish = reason
            if obj.get("usage"):
                usage = obj["usage"]
            elif "error" in obj:
                raise _stream_error(obj["error"], parts)

    try:
        async with session.post(url, data=body, headers=headers) as resp:
            if resp.status != 200:
                raise await _http_error(resp)
            decoder = SSEDecoder()
            feed = decoder.feed
            async for raw in resp.content.iter_any():
                watched.last = _monotonic()
                events = feed(raw)
                if events:
                    consume(events)
            consume(decoder.flush())  # a last event the server did not end with a blank line
    except ApiError:
        raise
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        if watched.stalled and task is not None and task.uncancel() == 0:
            raise AttemptTimeout(
                f"no data for {watch.idle_s if watch else '?'}s (stalled stream)",
                received_tokens=len(parts),
                content="".join(parts),
            ) from None
        exc.received_tokens = len(parts)  # type: ignore[attr-defined]  # the runner shows it as unconfirmed
        raise
    except orjson.JSONDecodeError as exc:
        raise StreamProtocolError(
            f"server sent a chunk that is not JSON: {exc}", received_tokens=len(parts), content="".join(parts)
        ) from None
    except (AttributeError, TypeError, IndexError, KeyError) as exc:
        raise StreamProtocolError(
            f"server sent a chunk that is not a chat.completion.chunk ({type(exc).__name__}: {exc})",
            received_tokens=len(parts),
            content="".join(parts),
        ) from None
    except aiohttp.ClientConnectorError as exc:
        raise ConnectFailed(f"cannot connect to {url}: {exc.os_error or exc}") from None
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise AttemptTimeout(
            f"no data for too long ({type(exc).__name__})", received_tokens=len(parts), content="".join(parts)
        ) from None
    except _CUT as exc:
        raise StreamInterrupted(
            f"connection lost mid-stream ({type(exc).__name__}: {exc})",
            received_tokens=len(parts),
            content="".join(parts),
        ) from None
    finally:
        if watch is not None:
            watch.unwatch(watched)
    if usage is None and not done:
        raise StreamInterrupted(
            "stream ended before its usage chunk", received_tokens=len(parts), content="".join(parts)
        )
    return Completion("".join(parts), finish, usage, ttft, len(parts))


def _stream_error(err: Any, parts: list[str]) -> ApiError:
    message = err.get("message") if isinstance(err, dict) else str(err)
    code = err.get("code") if isinstance(err, dict) else None
    status = code if isinstance(code, int) else None
    kind = err.get("type") if isinstance(err, dict) else None
    if status == 402 or kind == "insufficient_balance":
        return InsufficientBalance(
            f"error sent mid-stream: {message}", status=402, received_tokens=len(parts), content="".join(parts)
        )
    return StreamInterrupted(
        f"error sent mid-stream: {message}", status=status, received_tokens=len(parts), content="".join(parts)
    )


async def _http_error(resp: aiohttp.ClientResponse) -> ApiError:
    status = resp.status
    try:
        raw = await resp.read()
    except (TimeoutError, aiohttp.ClientError):
        raw = b""
    message = _error_message(raw) or resp.reason or "no message"
    if status == 429:
        if _error_code(raw) == "insufficient_quota":  # GonkaGate's current form of "balance spent"
            return InsufficientBalance(message, status=status)
        return RateLimited(message, status=status, retry_after=parse_retry_after(resp.headers.get("Retry-After")))
    if status >= 500:
        return ServerError(message, status=status)
    if status in (408, 409, 425):
        return ServerError(message, status=status)
    if status in (401, 403):
        return AuthError(message, status=status)
    if status == 402:
        return InsufficientBalance(message, status=status)
    return BadRequest(message, status=status)


def _error_code(raw: bytes) -> object:
    try:
        obj = _loads(raw)
    except orjson.JSONDecodeError:
        return None
    err = obj.get("error") if isinstance(obj, dict) else None
    return err.get("code") if isinstance(err, dict) else None


def _error_message(raw: bytes) -> str:
    try:
        obj = _loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", "replace").strip()[:300]
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        message = err.get("message") if isinstance(err, dict) else None
        if isinstance(message, str):
            return message[:300]
        if isinstance(err, str):
            return err[:300]
    return raw.decode("utf-8", "replace").strip()[:300]


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
