"""One streamed chat-completion attempt over aiohttp.

Posts a pre-encoded body, feeds the response into :class:`~batchgate.sse.SSEDecoder`, assembles
every choice's content, reasoning, refusal and tool calls into a :class:`Completion`, and maps
every failure onto the :mod:`batchgate.errors` tree. It never retries, schedules or writes files.

Every attempt ends: an idle stream (comments are not progress) is cut by the :class:`StallWatch`,
a long one by its :class:`AttemptLimits` deadline, a huge answer by its size cap, a huge event by
the decoder's cap. Redirects are never followed, so the key never leaves its origin.

The per-chunk loop is the hottest code in batchgate: one ``orjson.loads`` and a few dict lookups
per chunk; anything but a plain content delta goes to a slower side path.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import math
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from .errors import (
    AnswerTooLong,
    ApiError,
    AttemptTimeout,
    ConnectFailed,
    DeadlineExceeded,
    FatalApiError,
    RateLimited,
    Redirected,
    StreamInterrupted,
    StreamProtocolError,
    error_class,
    status_for_code,
)
from .models import BATCHGATE_VERSION
from .sse import DEFAULT_MAX_EVENT_BYTES, SSEDecoder, SSEOverflow
from .usage import Usage, parse_usage

__all__ = [
    "RETRY_AFTER_CAP_S",
    "AttemptLimits",
    "Choice",
    "Completion",
    "ConnectFailed",
    "StallWatch",
    "make_session",
    "parse_retry_after",
    "request_headers",
    "stream_completion",
]


_loads = orjson.loads
_monotonic = time.monotonic
_USER_AGENT = f"batchgate/{BATCHGATE_VERSION}"
_CUT = (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, ConnectionError)
#: A Retry-After longer than this is capped (and the message says so): minutes, not a day.
RETRY_AFTER_CAP_S = 300.0
_ERROR_BODY_BYTES = 64 << 10
_MAX_CHOICES = 128


@dataclass(frozen=True, slots=True)
class AttemptLimits:
    """Bounds of one attempt; the runner computes them per request (e.g. from ``max_tokens``)."""

    deadline_s: float | None = None  # wall time from the POST to the end of the stream
    max_answer_chars: int | None = None  # content + reasoning + tool-call characters, all choices
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES  # one SSE line or event


@dataclass(slots=True)
class Choice:
    """One choice of an answer; ``tool_calls`` items are ``{index, id, type, function: {name, arguments}}``."""

    index: int
    content: str = ""
    reasoning: str | None = None
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    finish_reason: str | None = None


@dataclass(slots=True)
class Completion:
    """What one successful attempt produced (or, as ``ApiError.partial``, what a failed one got)."""

    choices: list[Choice]  # sorted by index; choices[0] is "the" answer
    usage: Usage | None = None  # None: the stream ended with [DONE] and no usage
    usage_raw: Any = None  # the server's block, kept when it failed validation
    ttft_s: float | None = None
    received_chars: int = 0  # content + reasoning + refusal + tool-call name/argument characters
    received_events: int = 0  # data events that were chunks
    request_id: str | None = None  # the response's x-request-id
    warnings: list[str] = field(default_factory=list)
    received_tokens: int = 0  # text pieces received: the old, packing-dependent measure

    @property
    def content(self) -> str:
        return self.choices[0].content if self.choices else ""

    @property
    def reasoning(self) -> str | None:
        return self.choices[0].reasoning if self.choices else None

    @property
    def refusal(self) -> str | None:
        return self.choices[0].refusal if self.choices else None

    @property
    def tool_calls(self) -> list[dict[str, Any]] | None:
        return self.choices[0].tool_calls if self.choices else None

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason if self.choices else None


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


def session_secrets(session: aiohttp.ClientSession, headers: dict[str, str] | None = None) -> list[str]:
    """The bearer tokens this session (and these request headers) send: what error messages must not show."""
    out: list[str] = []
    for source in (session.headers, headers or {}):
        auth = source.get("Authorization")
        if auth:
            out.append(auth.split(None, 1)[-1] if auth[:7].lower() == "bearer " else auth)
    return out


class _Watched:
    __slots__ = ("expired", "last", "stalled", "task")

    def __init__(self, task: asyncio.Task[Any] | None) -> None:
        self.last = _monotonic()
        self.stalled = False
        self.expired = False
        self.task = task


def _expire(w: _Watched) -> None:
    w.expired = True
    if w.task is not None:
        w.task.cancel()


class StallWatch:
    """Detects stalled streams with one periodic check for all of them.

    Each stream stamps the time of its last data event (comments are not progress); every
    ``idle_s / 4`` the watch cancels the attempts that have been silent for longer than ``idle_s``
    and the attempt turns that cancellation into :class:`~batchgate.errors.AttemptTimeout`.
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


class _BadChunk(Exception):
    """A data event that is not a chat.completion.chunk; becomes a StreamProtocolError."""


class _Acc:
    """One choice being assembled."""

    __slots__ = ("content", "extra_chars", "extra_pieces", "finish", "reasoning", "refusal", "tools")

    def __init__(self) -> None:
        self.content: list[str] = []
        self.reasoning: list[str] | None = None
        self.refusal: list[str] | None = None
        self.tools: dict[int, list[Any]] | None = None  # index -> [id, type, name parts, argument parts]
        self.finish: str | None = None
        self.extra_chars = 0  # reasoning, refusal and tool-call characters (content is counted at the end)
        self.extra_pieces = 0

    def choice(self, index: int) -> Choice:
        tools = None
        if self.tools is not None:
            tools = [
                {
                    "index": i,
                    "id": t[0],
                    "type": t[1] or "function",
                    "function": {"name": "".join(t[2]), "arguments": "".join(t[3])},
                }
                for i, t in sorted(self.tools.items())
            ]
        return Choice(
            index,
            "".join(self.content),
            "".join(self.reasoning) if self.reasoning is not None else None,
            "".join(self.refusal) if self.refusal is not None else None,
            tools,
            self.finish,
        )


def _tally(accs: dict[int, _Acc]) -> tuple[int, int]:
    """(characters, text pieces) received so far, over all choices; counted here, not per chunk."""
    chars = pieces = 0
    for acc in accs.values():
        chars += sum(map(len, acc.content)) + acc.extra_chars
        pieces += len(acc.content) + acc.extra_pieces
    return chars, pieces


def _diagnose(payload: bytes) -> str | None:
    """What is wrong with a chunk the fast loop choked on, in words (slow; only on failure)."""
    try:
        obj = _loads(payload)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return f"a data event is a JSON {type(obj).__name__}, not an object"
    choices = obj.get("choices")
    if choices is not None and not isinstance(choices, list):
        return f"choices is a {type(choices).__name__}, not a list"
    for i, ch in enumerate(choices or ()):
        if ch is None:
            continue
        if not isinstance(ch, dict):
            return f"choices[{i}] is a {type(ch).__name__}, not an object"
        delta = ch.get("delta")
        if delta and not isinstance(delta, dict):
            return f"choices[{i}].delta is a {type(delta).__name__}, not an object"
    return None


def _text_of(value: Any, what: str) -> str:
    """Text from a string, a list of content parts (text parts joined), or a ``{text|content}`` object."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        out = []
        for part in value:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict):
                text = part.get("text")
                if text is None and part.get("type") in (None, "text"):
                    text = part.get("content")
                if isinstance(text, str):
                    out.append(text)
                elif text is not None:
                    raise _BadChunk(f"{what} has a part whose text is a {type(text).__name__}")
            elif part is not None:
                raise _BadChunk(f"{what} has a part that is a {type(part).__name__}")
        return "".join(out)
    if isinstance(value, dict):
        text = value.get("text", value.get("content"))
        if isinstance(text, str):
            return text
    raise _BadChunk(f"{what} is a {type(value).__name__}, not text")


def _extras(acc: _Acc, delta: dict[str, Any]) -> int:
    """The rarer parts of a delta (reasoning, refusal, tool calls); characters received."""
    n = 0
    reasoning = delta.get("reasoning_content") or delta.get("reasoning")
    if reasoning:
        text = _text_of(reasoning, "delta.reasoning")
        if text:
            if acc.reasoning is None:
                acc.reasoning = []
            acc.reasoning.append(text)
            n += len(text)
    refusal = delta.get("refusal")
    if refusal:
        text = _text_of(refusal, "delta.refusal")
        if acc.refusal is None:
            acc.refusal = []
        acc.refusal.append(text)
        n += len(text)
    calls = delta.get("tool_calls")
    if calls:
        if not isinstance(calls, list):
            raise _BadChunk(f"delta.tool_calls is a {type(calls).__name__}, not a list")
        if acc.tools is None:
            acc.tools = {}
        for call in calls:
            if call is not None:
                n += _tool_piece(acc.tools, call)
    if n:
        acc.extra_chars += n
        acc.extra_pieces += 1
    return n


def _tool_piece(tools: dict[int, list[Any]], call: Any) -> int:
    """Fold one ``delta.tool_calls[]`` piece into the calls by index: name and arguments concatenated."""
    if not isinstance(call, dict):
        raise _BadChunk(f"a delta.tool_calls item is a {type(call).__name__}")
    index = call.get("index")
    call_id = call.get("id")
    if call_id is not None and not isinstance(call_id, str):
        raise _BadChunk(f"tool call id is a {type(call_id).__name__}")
    if index is None:  # not the OpenAI form, but seen: a new id is a new call, else the last one goes on
        known = [i for i, t in tools.items() if call_id is not None and t[0] == call_id]
        index = known[0] if known else (len(tools) if call_id is not None or not tools else max(tools))
    elif isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < _MAX_CHOICES:
        raise _BadChunk(f"tool call index {index!r} is not a small non-negative integer")
    slot = tools.get(index)
    if slot is None:
        slot = tools[index] = [None, None, [], []]
    if call_id and slot[0] is None:
        slot[0] = call_id
    kind = call.get("type")
    if isinstance(kind, str) and kind:
        slot[1] = kind
    fn = call.get("function")
    if fn is None:
        return 0
    if not isinstance(fn, dict):
        raise _BadChunk(f"tool call function is a {type(fn).__name__}")
    n = 0
    name = fn.get("name")
    if name:
        if not isinstance(name, str):
            raise _BadChunk(f"tool call name is a {type(name).__name__}")
        if "".join(slot[2]) != name:  # some servers repeat the whole name in every piece
            slot[2].append(name)
            n += len(name)
    args = fn.get("arguments")
    if args:
        if isinstance(args, dict | list):  # sent parsed: keep it as the JSON text OpenAI would send
            args = orjson.dumps(args).decode()
        elif not isinstance(args, str):
            raise _BadChunk(f"tool call arguments are a {type(args).__name__}")
        slot[3].append(args)
        n += len(args)
    return n


def _new_acc(accs: dict[int, _Acc], index: Any) -> _Acc:
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < _MAX_CHOICES:
        raise _BadChunk(f"choice index {index!r} is not a small non-negative integer")
    acc = accs[index] = _Acc()
    return acc


async def stream_completion(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str] | None = None,
    watch: StallWatch | None = None,
    *,
    limits: AttemptLimits | None = None,
) -> Completion:
    """Run one attempt to completion.

    Raises an :class:`~batchgate.errors.ApiError` subclass carrying what was received before
    the failure (``partial``, ``received_chars``; for unconfirmed-cost accounting), the
    server's ``code`` and the response's ``request_id``.
    """
    started = _monotonic()
    watched = watch.watch() if watch is not None else _Watched(asyncio.current_task())
    timer: asyncio.TimerHandle | None = None
    max_event = DEFAULT_MAX_EVENT_BYTES
    max_chars: float = math.inf
    if limits is not None:
        max_event = limits.max_event_bytes
        if limits.max_answer_chars is not None:
            max_chars = limits.max_answer_chars
        if limits.deadline_s is not None:
            timer = asyncio.get_running_loop().call_at(started + limits.deadline_s, _expire, watched)
    acc0 = _Acc()
    accs: dict[int, _Acc] = {0: acc0}
    usage_raw: Any = None
    warnings: list[str] = []
    ttft: float | None = None
    events_seen = 0
    done = False
    request_id: str | None = None

    def consume(payloads: list[bytes]) -> None:
        # The per-event hot path: one orjson.loads and a few dict lookups for a plain content delta.
        nonlocal usage_raw, ttft, done
        try:
            for payload in payloads:
                if payload == b"[DONE]":
                    done = True
                    return  # anything after [DONE] is ignored
                if not payload:
                    continue
                obj = _loads(payload)
                if obj is None:
                    continue  # "data: null": nothing to take
                # Wrong types fail on their own below (AttributeError, TypeError) and _diagnose
                # names what was wrong: cheaper than checking every type of every chunk.
                choices = obj.get("choices")
                if choices:
                    for ch in choices:
                        if ch is None:
                            continue  # "choices": [null]
                        index = ch.get("index", 0)
                        if index == 0:
                            acc = acc0
                        else:
                            acc = accs.get(index) if index.__class__ is int else None  # type: ignore[assignment]
                            if acc is None:
                                acc = _new_acc(accs, index)
                        delta = ch.get("delta")
                        if delta:
                            text = delta.get("content")
                            if text:
                                if text.__class__ is not str:
                                    text = _text_of(text, "delta.content")
                                acc.content.append(text)
                                if ttft is None:
                                    ttft = _monotonic() - started
                            if (text is None or len(delta) != 1) and _extras(acc, delta) and ttft is None:
                                ttft = _monotonic() - started
                        reason = ch.get("finish_reason")
                        if reason:
                            if reason.__class__ is not str:
                                raise _BadChunk(f"finish_reason is a {type(reason).__name__}, not a string")
                            acc.finish = reason
                elif choices is not None and choices.__class__ is not list:
                    raise _BadChunk(f"choices is a {type(choices).__name__}, not a list")
                u = obj.get("usage")
                if u:
                    if usage_raw is not None and u != usage_raw and "usage_twice" not in warnings:
                        warnings.append("usage_twice")
                    usage_raw = u
                if "error" in obj:
                    err = obj["error"]
                    if err:  # "error": null is not an error
                        raise _MidStream(err)
        except (_BadChunk, _MidStream):
            raise
        except orjson.JSONDecodeError as exc:
            raise _BadChunk(f"a chunk is not JSON ({exc})") from None
        except (AttributeError, TypeError, IndexError, KeyError, ValueError, RecursionError) as exc:
            raise _BadChunk(_diagnose(payload) or f"{type(exc).__name__}: {exc}") from None

    def result() -> Completion:
        if len(accs) > 1:
            accs_sorted = dict(sorted(accs.items()))
            accs.clear()
            accs.update(accs_sorted)
        choices = [acc.choice(i) for i, acc in accs.items()]
        usage = parse_usage(usage_raw) if usage_raw is not None else None
        raw = None
        warns = warnings
        if usage is not None:
            if usage.warnings:
                warns = [*warnings, *usage.warnings]
            if not usage.confirmed:
                raw = usage_raw
        chars = pieces = 0
        for choice, acc in zip(choices, accs.values(), strict=True):  # the joined text is at hand: no second pass
            chars += len(choice.content) + acc.extra_chars
            pieces += len(acc.content) + acc.extra_pieces
        return Completion(choices, usage, raw, ttft, chars, events_seen, request_id, warns, pieces)

    def failure(cls: type[ApiError], message: str, **kw: Any) -> ApiError:
        part = result()
        return cls(
            message,
            request_id=kw.pop("request_id", request_id),
            received_tokens=part.received_tokens,
            received_chars=part.received_chars,
            content=part.content,
            partial=part,
            secrets=session_secrets(session, headers),
            **kw,
        )

    try:
        async with session.post(url, data=body, headers=headers, allow_redirects=False) as resp:
            request_id = resp.headers.get("x-request-id")
            if resp.status != 200:
                raise await _http_error(resp, session_secrets(session, headers), request_id)
            decoder = SSEDecoder(max_event)
            feed = decoder.feed
            took_data = decoder.took_data
            # Characters received never exceed bytes received, so the exact count (a pass over
            # the pieces) is only needed once the bytes could have passed the cap; it then tells
            # how many more bytes can come before the next count.
            nbytes = 0
            check_at = max_chars
            async for raw in resp.content.iter_any():
                events = feed(raw)
                if events:
                    if done:
                        continue  # data after [DONE] is ignored
                    watched.last = _monotonic()
                    events_seen += len(events)
                    consume(events)
                    nbytes += len(raw)
                    if nbytes > check_at:
                        chars = _tally(accs)[0]
                        if chars > max_chars:
                            raise failure(
                                AnswerTooLong,
                                f"answer cut at {chars} characters, past its cap of {max_chars:.0f}"
                                " (the server may be ignoring max_tokens)",
                            )
                        check_at = nbytes + (max_chars - chars)
                elif took_data():
                    watched.last = _monotonic()  # part of a data line: progress; a comment is not
            if not done:
                consume(decoder.flush())  # a last event the server did not end with a blank line
    except ApiError:
        raise
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        if (watched.stalled or watched.expired) and task is not None and task.uncancel() == 0:
            if not done:
                if watched.expired:
                    raise failure(
                        DeadlineExceeded, f"attempt cut at its deadline of {limits.deadline_s if limits else 0:g} s"
                    ) from None
                raise failure(
                    AttemptTimeout, f"no data for {watch.idle_s if watch else '?'}s (stalled stream)"
                ) from None
            # else: [DONE] had arrived and only the close was late; the answer is complete.
        else:
            chars, pieces = _tally(accs)
            exc.received_tokens = pieces  # type: ignore[attr-defined]  # the runner shows it as unconfirmed
            exc.received_chars = chars  # type: ignore[attr-defined]
            raise
    except _BadChunk as exc:
        raise failure(StreamProtocolError, f"server sent a chunk that is not a chat.completion.chunk: {exc}") from None
    except _MidStream as exc:
        raise _stream_error(exc.err, failure) from None
    except SSEOverflow as exc:
        if not done:
            raise failure(StreamProtocolError, f"server sent {exc}; stream abandoned") from None
    except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError, aiohttp.InvalidURL) as exc:
        detail = getattr(exc, "os_error", None) or exc
        raise ConnectFailed(f"cannot connect to {url}: {type(exc).__name__}: {detail}") from None
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        if not done:
            raise failure(AttemptTimeout, f"no data for too long ({type(exc).__name__})") from None
    except _CUT as exc:
        if not done:
            raise failure(StreamInterrupted, f"connection lost mid-stream ({type(exc).__name__}: {exc})") from None
    except aiohttp.ClientError as exc:
        if not done:
            raise failure(StreamInterrupted, f"HTTP failure mid-stream ({type(exc).__name__}: {exc})") from None
    finally:
        if timer is not None:
            timer.cancel()
        if watch is not None:
            watch.unwatch(watched)
    if usage_raw is None and not done:
        raise failure(StreamInterrupted, "stream ended before its usage chunk")
    return result()


class _MidStream(Exception):
    def __init__(self, err: Any) -> None:
        super().__init__("error sent mid-stream")
        self.err = err


def _code_of(value: Any) -> str | None:
    if isinstance(value, str) and value:
        return value[:100]
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _stream_error(err: Any, failure: Any) -> ApiError:
    """An ``error`` object sent as a data event: classed by its code when it names one, else a retryable cut."""
    if isinstance(err, dict):
        message = err.get("message")
        message = message if isinstance(message, str) else orjson.dumps(err).decode()
        code = _code_of(err.get("code"))
        kind = _code_of(err.get("type"))
        status = err.get("status")
        if isinstance(status, bool) or not isinstance(status, int):
            status = status_for_code(code) or status_for_code(kind)
    else:
        message, code, kind, status = str(err), None, None, None
    cls: type[ApiError] = StreamInterrupted
    if status is not None:
        found = _classify(status, code, kind)
        if issubclass(found, FatalApiError | RateLimited):
            cls = found
    return failure(cls, f"error sent mid-stream: {message[:300]}", status=status, code=code)  # type: ignore[no-any-return]


def _classify(status: int, code: str | None, kind: str | None) -> type[ApiError]:
    cls = error_class(status, code)
    if kind is not None and cls is error_class(status):
        cls = error_class(status, kind)
    return cls


async def _http_error(resp: aiohttp.ClientResponse, secrets: Iterable[str], request_id: str | None) -> ApiError:
    status = resp.status
    if 300 <= status < 400:
        location = resp.headers.get("Location") or "(no Location)"
        origin = f"{resp.url.scheme}://{resp.url.host}:{resp.url.port}"
        return Redirected(
            f"the server answered HTTP {status} redirecting to {location[:300]}; batchgate does not follow "
            f"redirects of a POST (the API key stays on {origin}): point --base-url at the final address",
            status=status,
            location=location,
            request_id=request_id,
            secrets=secrets,
        )
    try:
        raw = await read_capped(resp, _ERROR_BODY_BYTES)
    except (TimeoutError, aiohttp.ClientError):
        raw = b""
    message, code, kind = _error_fields(raw)
    message = message or resp.reason or "no message"
    cls = _classify(status, code, kind)
    if cls is RateLimited:
        retry_after = parse_retry_after(resp.headers.get("Retry-After"))
        if retry_after is not None and retry_after > RETRY_AFTER_CAP_S:
            message += f" (Retry-After {retry_after:.0f} s capped to {RETRY_AFTER_CAP_S:.0f} s)"
            retry_after = RETRY_AFTER_CAP_S
        return RateLimited(
            message, status=status, code=code, retry_after=retry_after, request_id=request_id, secrets=secrets
        )
    return cls(message, status=status, code=code, request_id=request_id, secrets=secrets)


async def read_capped(resp: aiohttp.ClientResponse, cap: int) -> bytes:
    """The body up to ``cap`` bytes (a hostile error body cannot fill memory); one read may return less."""
    buf = bytearray()
    while len(buf) < cap:
        piece = await resp.content.read(cap - len(buf))
        if not piece:
            break
        buf += piece
    return bytes(buf)


def _error_fields(raw: bytes) -> tuple[str, str | None, str | None]:
    """(message, code, type) of an error body; the message is the body's text when it is not the JSON form."""
    try:
        obj = _loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", "replace").strip()[:300], None, None
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict):
            message = err.get("message")
            code, kind = _code_of(err.get("code")), _code_of(err.get("type"))
            if isinstance(message, str):
                return message[:300], code, kind
            return raw.decode("utf-8", "replace").strip()[:300], code, kind
        if isinstance(err, str):
            return err[:300], None, None
    return raw.decode("utf-8", "replace").strip()[:300], None, None


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date); callers cap it."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - time.time())
