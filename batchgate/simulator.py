"""A local GonkaGate: a real aiohttp server speaking the streaming wire format, with seeded faults.

It keeps its own account (:class:`Billing`) of every request it billed, so tests, ``run --simulate``
and benchmarks can compare batchgate's cost report with what the server charged, to 1e-9. It never
imports ``client``, ``retry`` or ``runner``: it is an independent check on them.

What a request gets, in order of the checks:

* 401 ``authentication_error``: no ``Authorization: Bearer gp-...`` header.
* 400 ``invalid_request_error``: body is not JSON, ``model`` or ``messages`` missing or malformed.
* 402 ``insufficient_balance``: billed spend has reached ``balance_usd``.
* one seeded fault draw per request (the rates are disjoint slices of one uniform draw, so each
  rate is the fault's own frequency): 429 with ``Retry-After``, 500, or, for streams only, a reset
  (connection closed after *k* tokens), a stall (*k* tokens, then ``stall_s`` of silence, then the
  rest) or a mid-stream ``data: {"error": ...}`` after *k* tokens; 1 <= k < completion length.
* otherwise the docs' stream: role chunk, content chunks, a final chunk with ``usage`` and costs,
  ``data: [DONE]``; or, for ``"stream": false``, one ``chat.completion`` JSON.

The answer text is a pure function of (seed, model, messages, max_tokens): retries and restarts
with the same seed get the same words, so tests can check what the client stored.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import hashlib
import math
import random
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, BinaryIO

import orjson
from aiohttp import web

__all__ = [
    "BILLING_KEY",
    "CONFIG_KEY",
    "DEFAULT_PRICES",
    "Billing",
    "RunningSimulator",
    "SimulatorConfig",
    "create_app",
    "running_simulator",
    "serve",
    "serve_forever",
]

#: USD per 1M (prompt, completion) tokens.  The first entry reproduces the docs' example
#: (10 prompt + 5 completion tokens cost $0.000075 base, $0.0000075 fee).
DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "Qwen/Qwen3-235B-A22B-Instruct-2507-FP8": (2.5, 10.0),
    "Qwen/Qwen3-32B-FP8": (0.4, 1.6),
    "meta-llama/Llama-3.3-70B-Instruct": (0.9, 2.7),
    "deepseek-ai/DeepSeek-V3": (1.2, 4.8),
}

#: How long a shutting-down server waits for open streams before cancelling them (billed "cut").
_SHUTDOWN_TIMEOUT_S = 0.25
#: How often a stalled stream checks whether its client has gone away.
_STALL_POLL_S = 0.05
#: Chunks gathered into one write when there is no pause between them.
_CHUNKS_PER_WRITE = 64

# Content vocabulary: one word (plus a trailing space) is one completion token.  A few non-ASCII
# words and a quoted one make clients decode UTF-8 split across reads and JSON escapes.
_WORDS = (
    "the of and to in is that for it as with was on be by this are from or an at which not "
    "have has but all were they their one more can its also when been into than other some "
    "model token stream answer batch prompt cost price ledger server client request retry "
    "cent budget queue window gate signal vector matrix latency cache shard replica kernel "
    "river mountain forest ocean desert valley harbor meadow island canyon glacier prairie "
    "quickly slowly carefully simply clearly rarely often never always sometimes perhaps "
    "bright quiet ancient modern gentle sharp hollow silver golden crimson amber violet "
    "build measure compare explain describe consider imagine remember follow balance "
    "however therefore moreover meanwhile otherwise indeed finally first second third "
    "café naïve Zürich façade jalapeño 東京 日本語 señor crème brûlée "
)
_VOCAB: tuple[str, ...] = (*_WORDS.split(), '"quoted"', "back\\slash", "done.", "well,", "(aside)")
_PIECES: tuple[str, ...] = tuple(word + " " for word in _VOCAB)
_PIECE_JSON: dict[str, bytes] = {piece: orjson.dumps(piece) for piece in _PIECES}

_KEEPALIVE = b": keep-alive\n\n"
_DONE = b"data: [DONE]\n\n"
_MIDSTREAM_ERROR = (
    b"data: "
    + orjson.dumps({"error": {"message": "upstream model error", "type": "server_error", "code": 500}})
    + b"\n\n"
)
_ROLE_DELTA = b'{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
_CONTENT_TAIL = b'},"finish_reason":null}]}\n\n'
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


@dataclass
class SimulatorConfig:
    """Everything that shapes the simulator's answers, timing, faults and prices.

    Raises ``ValueError`` (from ``__post_init__``) for rates outside [0, 1], request-level fault
    rates adding up to more than 1, or a bad completion-length range.
    """

    seed: int = 0
    token_delay_s: float = 0.0  # pause between content chunks (0 = write as fast as possible)
    first_token_delay_s: float = 0.0  # pause between the role chunk and the first content chunk
    tokens_per_chunk: int = 1  # content pieces ("tokens") per SSE chunk
    min_completion_tokens: int = 8
    max_completion_tokens: int = 64  # cap; a request's max_tokens caps it further
    # Fault rates, each a probability per request in [0, 1]:
    reset_rate: float = 0.0  # close the connection after k tokens; no usage chunk
    stall_rate: float = 0.0  # after k tokens send nothing for stall_s, then finish normally
    stall_s: float = 30.0
    rate_limit_rate: float = 0.0  # 429 with Retry-After: retry_after_s
    retry_after_s: float = 0.05
    server_error_rate: float = 0.0  # 500 before any streaming
    midstream_error_rate: float = 0.0  # after k tokens, a `data: {"error": ...}` event, then EOF
    keepalive_rate: float = 0.0  # per chunk: an extra `: keep-alive` comment before it
    balance_usd: float | None = None  # None = unlimited; once billed spend reaches it, 402
    prices: dict[str, tuple[float, float]] = field(default_factory=lambda: dict(DEFAULT_PRICES))
    default_price: tuple[float, float] = (1.0, 4.0)  # any model not in `prices`
    platform_fee_rate: float = 0.10
    billing_log: str | None = None  # append one JSON line per billed request

    def __post_init__(self) -> None:
        rates = {
            "reset_rate": self.reset_rate,
            "stall_rate": self.stall_rate,
            "rate_limit_rate": self.rate_limit_rate,
            "server_error_rate": self.server_error_rate,
            "midstream_error_rate": self.midstream_error_rate,
            "keepalive_rate": self.keepalive_rate,
        }
        for name, rate in rates.items():
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {rate}")
        if sum(rates.values()) - self.keepalive_rate > 1.0 + 1e-12:
            raise ValueError("reset, stall, rate-limit, server-error and mid-stream rates add up to more than 1")
        if not 1 <= self.min_completion_tokens <= self.max_completion_tokens:
            raise ValueError("need 1 <= min_completion_tokens <= max_completion_tokens")
        if self.tokens_per_chunk < 1:
            raise ValueError("tokens_per_chunk must be at least 1")
        for name in ("token_delay_s", "first_token_delay_s", "stall_s", "retry_after_s", "platform_fee_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")

    def price(self, model: str) -> tuple[float, float]:
        """USD per 1M (prompt, completion) tokens for ``model``; ``default_price`` if unlisted."""
        return self.prices.get(model, self.default_price)

    def costs(self, model: str, prompt_tokens: int, completion_tokens: int) -> tuple[float, float, float]:
        """The (base, platform fee, total) USD the simulator sends and bills for a request."""
        in_price, out_price = self.price(model)
        base = prompt_tokens * in_price / 1e6 + completion_tokens * out_price / 1e6
        fee = base * self.platform_fee_rate
        return base, fee, base + fee


class Billing:
    """The simulator's account: one record per request that was billed, in the order billed.

    A record is ``{"seq", "response_id", "client_request_id", "model", "stream", "status",
    "fault", "finish_reason", "prompt_tokens", "completion_tokens", "base_cost_usd",
    "platform_fee_usd", "total_cost_usd", "content", "at"}``.  ``status`` is ``"completed"``
    when the usage chunk (or the JSON answer) was written, else ``"cut"``, billed for the prompt
    plus the tokens actually sent (``content`` is the text sent).  ``fault`` is ``None``,
    ``"reset"``, ``"midstream_error"``, ``"stall"`` or ``"disconnect"``.

    ``events`` counts what the server did per request: ``unauthorized``, ``bad_request``,
    ``insufficient_balance``, ``rate_limited``, ``server_error`` (unbilled answers), ``reset``,
    ``stall``, ``midstream_error`` (injected faults), ``completed`` and ``cut`` (billed).
    """

    def __init__(self, log_path: str | None = None) -> None:
        self.records: list[dict[str, Any]] = []
        self.events: collections.Counter[str] = collections.Counter()
        self.log_path = log_path
        self._log: BinaryIO | None = open(log_path, "ab") if log_path else None  # noqa: SIM115
        self._spent = 0.0  # running sum for the balance check; reports use fsum

    def add(self, record: dict[str, Any]) -> None:
        """Append a record (``seq`` is set here) and its billing-log line, flushed at once."""
        record["seq"] = len(self.records)
        self.records.append(record)
        self.events[record["status"]] += 1
        self._spent += record["total_cost_usd"]
        if self._log is not None:
            # Flushed per record: tests read the log right after killing clients.
            self._log.write(orjson.dumps(record) + b"\n")
            self._log.flush()

    @property
    def spent_usd(self) -> float:
        """Everything billed so far, completed and cut (exact sum)."""
        return math.fsum(r["total_cost_usd"] for r in self.records)

    def completed_total_usd(self) -> float:
        """Exact sum of ``total_cost_usd`` over completed requests."""
        return math.fsum(r["total_cost_usd"] for r in self.records if r["status"] == "completed")

    def cut_total_usd(self) -> float:
        """Exact sum of ``total_cost_usd`` over cut requests (spend the client cannot confirm)."""
        return math.fsum(r["total_cost_usd"] for r in self.records if r["status"] == "cut")

    def completed_count_by_client_id(self) -> collections.Counter[str | None]:
        """Completed requests per ``X-Client-Request-Id``; a count above 1 means billed twice."""
        return collections.Counter(r["client_request_id"] for r in self.records if r["status"] == "completed")

    def completed(self) -> list[dict[str, Any]]:
        """The completed records."""
        return [r for r in self.records if r["status"] == "completed"]

    def cut(self) -> list[dict[str, Any]]:
        """The cut records."""
        return [r for r in self.records if r["status"] == "cut"]

    def close(self) -> None:
        """Close the billing log; records stay readable in memory."""
        if self._log is not None:
            self._log.close()
            self._log = None

    def _over_balance(self, balance_usd: float | None) -> bool:
        return balance_usd is not None and self._spent >= balance_usd


BILLING_KEY = web.AppKey("batchgate_simulator_billing", Billing)
CONFIG_KEY = web.AppKey("batchgate_simulator_config", SimulatorConfig)


class _Fault(enum.Enum):
    NONE = "none"
    RATE_LIMIT = "rate_limited"
    SERVER_ERROR = "server_error"
    RESET = "reset"
    STALL = "stall"
    MIDSTREAM = "midstream_error"


_STREAM_FAULTS = (_Fault.RESET, _Fault.STALL, _Fault.MIDSTREAM)


@dataclass(slots=True)
class _Answer:
    """What the model 'generates' for one request, before any fault."""

    prompt_tokens: int
    pieces: list[str]  # one completion token each, a word plus a trailing space
    finish_reason: str


@dataclass(slots=True)
class _Call:
    """One accepted chat-completions request."""

    response_id: str
    client_request_id: str | None
    model: str
    stream: bool
    answer: _Answer


class _HttpError(Exception):
    def __init__(self, status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.headers = headers

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.type, "code": self.status}}
        return web.Response(
            status=self.status, body=orjson.dumps(body), content_type="application/json", headers=self.headers
        )


def _content_chars(content: Any) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):  # OpenAI content parts
        return sum(
            len(part["text"]) if isinstance(part, dict) and isinstance(part.get("text"), str) else 0 for part in content
        )
    return len(orjson.dumps(content))


def _prompt_tokens(messages: list[dict[str, Any]]) -> int:
    return sum(math.ceil(_content_chars(m.get("content")) / 4) + 4 for m in messages)


def _answer(config: SimulatorConfig, model: str, messages: list[dict[str, Any]], max_tokens: int | None) -> _Answer:
    """The deterministic answer: words and length hang on (seed, model, messages), max_tokens cuts it."""
    canonical = orjson.dumps(messages, option=orjson.OPT_SORT_KEYS)
    digest = hashlib.blake2b(b"%d\0%s\0%s" % (config.seed, model.encode(), canonical), digest_size=16).digest()
    rng = random.Random(int.from_bytes(digest, "big"))
    prompt_tokens = _prompt_tokens(messages)
    lo, hi = config.min_completion_tokens, config.max_completion_tokens
    # Longer prompts get longer answers (plus noise), so estimating cost from prompt size works.
    natural = min(hi, max(lo, lo + prompt_tokens // 2 + rng.randint(0, (hi - lo) // 8)))
    pieces = rng.choices(_PIECES, k=natural)
    if max_tokens is not None and max_tokens < natural:
        return _Answer(prompt_tokens, pieces[:max_tokens], "length")
    return _Answer(prompt_tokens, pieces, "stop")


def _parse_body(raw: bytes) -> tuple[str, list[dict[str, Any]], int | None, bool]:
    """(model, messages, max_tokens, stream) from a request body; raises a 400 ``_HttpError``."""

    def bad(message: str) -> _HttpError:
        return _HttpError(400, "invalid_request_error", message)

    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' must be a non-empty string")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list")
    if not all(isinstance(m, dict) for m in messages):
        raise bad("every message must be an object")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if max_tokens is not None and (type(max_tokens) is not int or max_tokens < 1):
        raise bad("'max_tokens' must be a positive integer")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("'stream' must be a boolean")
    return model, messages, max_tokens, stream


def _usage(config: SimulatorConfig, model: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    base, fee, total = config.costs(model, prompt_tokens, completion_tokens)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "base_cost_usd": base,
        "platform_fee_usd": fee,
        "total_cost_usd": total,
    }


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class _SSEResponse(web.StreamResponse):
    # Hold the headers back so they leave with the first chunk: one send() for a whole fast stream.
    _send_headers_immediately = False


class _Out:
    """Buffered chunk writer for one stream; ``sent`` counts tokens handed to the transport."""

    __slots__ = ("buf", "pending", "resp", "sent", "usage_written")

    def __init__(self, resp: web.StreamResponse) -> None:
        self.resp = resp
        self.buf: list[bytes] = []
        self.pending = 0
        self.sent = 0
        self.usage_written = False

    async def flush(self, *, last: bool = False) -> None:
        """Write the buffer; ``last`` also ends the chunked body (the buffer holds the usage chunk)."""
        data = b"".join(self.buf)
        tokens = self.pending
        self.buf.clear()
        self.pending = 0
        try:
            if last:
                await self.resp.write_eof(data)
            elif data:
                await self.resp.write(data)
        except asyncio.CancelledError:
            # aiohttp hands the bytes to the transport before it can block in drain().
            self.sent += tokens
            self.usage_written = last
            raise
        self.sent += tokens
        self.usage_written = last


class _Simulator:
    """Request handlers bound to one config, one account and one fault RNG."""

    def __init__(self, config: SimulatorConfig, billing: Billing) -> None:
        self.config = config
        self.billing = billing
        self.rng = random.Random(config.seed)
        self.requests = 0
        # Disjoint slices of [0, 1): each fault's probability is exactly its rate.
        self.fault_edges: list[tuple[float, _Fault]] = []
        edge = 0.0
        for rate, fault in (
            (config.rate_limit_rate, _Fault.RATE_LIMIT),
            (config.server_error_rate, _Fault.SERVER_ERROR),
            (config.reset_rate, _Fault.RESET),
            (config.stall_rate, _Fault.STALL),
            (config.midstream_error_rate, _Fault.MIDSTREAM),
        ):
            if rate > 0:
                edge += rate
                self.fault_edges.append((edge, fault))

    def _check_auth(self, request: web.Request) -> None:
        auth = request.headers.get("Authorization", "")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or not key.strip().startswith("gp-"):
            self.billing.events["unauthorized"] += 1
            message = "missing API key" if not auth else "invalid API key (GonkaGate keys start with 'gp-')"
            raise _HttpError(401, "authentication_error", message)

    async def models(self, request: web.Request) -> web.Response:
        try:
            self._check_auth(request)
        except _HttpError as exc:
            return exc.response()
        data = [
            {
                "id": model,
                "object": "model",
                "created": 0,
                "owned_by": "batchgate-simulator",
                "pricing": {"prompt_usd_per_1m": prices[0], "completion_usd_per_1m": prices[1]},
            }
            for model, prices in self.config.prices.items()
        ]
        return web.json_response({"object": "list", "data": data}, dumps=lambda o: orjson.dumps(o).decode())

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        config = self.config
        try:
            self._check_auth(request)
            try:
                model, messages, max_tokens, stream = _parse_body(await request.read())
            except _HttpError:
                self.billing.events["bad_request"] += 1
                raise
            if self.billing._over_balance(config.balance_usd):
                self.billing.events["insufficient_balance"] += 1
                raise _HttpError(
                    402,
                    "insufficient_balance",
                    f"insufficient balance: ${self.billing._spent:.6f} of ${config.balance_usd} spent",
                )
            # Always three draws per request, so one seed gives one fault sequence.
            fault_u, position_u, keepalive_seed = (
                self.rng.random(),
                self.rng.random(),
                self.rng.getrandbits(32),
            )
            fault = next((f for edge, f in self.fault_edges if fault_u < edge), _Fault.NONE)
            if fault is _Fault.RATE_LIMIT:
                self.billing.events["rate_limited"] += 1
                raise _HttpError(
                    429,
                    "rate_limit_error",
                    "rate limit exceeded, retry later",
                    {"Retry-After": f"{config.retry_after_s:g}"},
                )
            if fault is _Fault.SERVER_ERROR:
                self.billing.events["server_error"] += 1
                raise _HttpError(500, "server_error", "internal server error")
        except _HttpError as exc:
            return exc.response()

        self.requests += 1
        answer = _answer(config, model, messages, max_tokens)
        n = len(answer.pieces)
        call = _Call(
            response_id=f"chatcmpl-sim{config.seed:x}x{self.requests:08d}",
            client_request_id=request.headers.get("X-Client-Request-Id"),
            model=model,
            stream=stream,
            answer=answer,
        )
        if not stream:
            return self._json_answer(call)
        if fault in _STREAM_FAULTS:
            self.billing.events[fault.value] += 1
            # 1 <= k < n; a one-token answer can only fail before its token.
            fault_at = 1 + int(position_u * (n - 1)) if n > 1 else 0
        else:
            fault = _Fault.NONE
            fault_at = -1
        return await self._stream(request, call, fault, fault_at, keepalive_seed)

    def _bill(self, call: _Call, completion_tokens: int, status: str, fault: str | None) -> dict[str, Any]:
        """Record one billed request in the account; returns the usage object to send."""
        answer = call.answer
        usage = _usage(self.config, call.model, answer.prompt_tokens, completion_tokens)
        self.billing.add(
            {
                "seq": 0,
                "response_id": call.response_id,
                "client_request_id": call.client_request_id,
                "model": call.model,
                "stream": call.stream,
                "status": status,
                "fault": fault,
                "finish_reason": answer.finish_reason if status == "completed" else None,
                "prompt_tokens": answer.prompt_tokens,
                "completion_tokens": completion_tokens,
                "base_cost_usd": usage["base_cost_usd"],
                "platform_fee_usd": usage["platform_fee_usd"],
                "total_cost_usd": usage["total_cost_usd"],
                "content": "".join(answer.pieces[:completion_tokens]),
                "at": _now_iso(),
            }
        )
        return usage

    def _json_answer(self, call: _Call) -> web.Response:
        answer = call.answer
        usage = self._bill(call, len(answer.pieces), "completed", None)
        body = {
            "id": call.response_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": call.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(answer.pieces)},
                    "finish_reason": answer.finish_reason,
                }
            ],
            "usage": usage,
        }
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def _stream(
        self, request: web.Request, call: _Call, fault: _Fault, fault_at: int, keepalive_seed: int
    ) -> web.StreamResponse:
        """Write the SSE answer, injecting ``fault`` before token ``fault_at``; bill it either way."""
        config = self.config
        created = int(time.time())
        head = b'data: {"id":"%s","object":"chat.completion.chunk","created":%d,"model":%s,"choices":[' % (
            call.response_id.encode(),
            created,
            orjson.dumps(call.model),
        )
        content_head = head + b'{"index":0,"delta":{"content":'
        pieces = call.answer.pieces
        n = len(pieces)
        per_chunk = config.tokens_per_chunk
        delay = config.token_delay_s
        keepalive_rate = config.keepalive_rate
        keepalive_rng = random.Random(keepalive_seed) if keepalive_rate > 0 else None
        batch_limit = _CHUNKS_PER_WRITE if delay == 0 else 1

        resp = _SSEResponse(headers=_SSE_HEADERS)
        resp.headers["X-Request-Id"] = call.response_id
        await resp.prepare(request)
        out = _Out(resp)
        out.buf.append(head + _ROLE_DELTA)
        # Set to None once billed; otherwise the finally clause bills the stream.
        cut_reason: str | None = "stall" if fault is _Fault.STALL else "disconnect"
        try:
            if fault_at < 0 and keepalive_rng is None and delay == 0 and config.first_token_delay_s == 0:
                # Fast path: the whole answer in one write.
                if per_chunk == 1:
                    out.buf += [content_head + _PIECE_JSON[piece] + _CONTENT_TAIL for piece in pieces]
                else:
                    out.buf += [
                        content_head + orjson.dumps("".join(pieces[i : i + per_chunk])) + _CONTENT_TAIL
                        for i in range(0, n, per_chunk)
                    ]
                out.pending = n
            else:
                if config.first_token_delay_s > 0:
                    await out.flush()
                    await asyncio.sleep(config.first_token_delay_s)
                start = 0
                while start < n:
                    if start == fault_at:
                        await out.flush()
                        if fault is _Fault.STALL:
                            await self._stall(request)
                        elif fault is _Fault.RESET:
                            self._bill(call, out.sent, "cut", "reset")
                            cut_reason = None
                            # close() still delivers what was written, then FIN: the client sees a
                            # chunked body that never ends (ClientPayloadError) after exactly k tokens.
                            if request.transport is not None:
                                request.transport.close()
                            return resp
                        else:
                            out.buf.append(_MIDSTREAM_ERROR)
                            await out.flush()
                            self._bill(call, out.sent, "cut", "midstream_error")
                            cut_reason = None
                            with contextlib.suppress(ConnectionResetError):
                                await resp.write_eof()
                            return resp
                    # A chunk never straddles the fault position.
                    end = min(n, start + per_chunk, fault_at if start < fault_at else n)
                    if delay > 0 and start > 0:
                        await out.flush()
                        await asyncio.sleep(delay)
                    if keepalive_rng is not None and keepalive_rng.random() < keepalive_rate:
                        out.buf.append(_KEEPALIVE)
                    piece = pieces[start] if end - start == 1 else "".join(pieces[start:end])
                    out.buf.append(content_head + (_PIECE_JSON.get(piece) or orjson.dumps(piece)) + _CONTENT_TAIL)
                    out.pending += end - start
                    if len(out.buf) >= batch_limit:
                        await out.flush()
                    start = end
            final = {
                "id": call.response_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": call.model,
                "choices": [{"index": 0, "delta": {}, "finish_reason": call.answer.finish_reason}],
                "usage": _usage(config, call.model, call.answer.prompt_tokens, n),
            }
            out.buf.append(b"data: " + orjson.dumps(final) + b"\n\n" + _DONE)
            await out.flush(last=True)
        except ConnectionResetError:
            # The client went away; aiohttp's own write_eof() after we return fails quietly.
            return resp
        finally:
            if cut_reason is not None:
                if out.usage_written:
                    self._bill(call, n, "completed", "stall" if fault is _Fault.STALL else None)
                else:
                    self._bill(call, out.sent, "cut", cut_reason)
        return resp

    async def _stall(self, request: web.Request) -> None:
        """Send nothing for ``stall_s``; end early (as a disconnect) if the client leaves."""
        deadline = time.monotonic() + self.config.stall_s
        while True:
            transport = request.transport
            if transport is None or transport.is_closing():
                raise ConnectionResetError("client left during a stall")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            await asyncio.sleep(min(remaining, _STALL_POLL_S))


def create_app(config: SimulatorConfig) -> web.Application:
    """The simulator as an aiohttp app; ``app[BILLING_KEY]`` is its account.

    Run it with ``handler_cancellation=True`` and ``access_log=None`` (as :func:`running_simulator`
    does) so that a client leaving mid-stream is billed ``cut`` at once and nothing is logged per
    request.  The billing log is closed on app cleanup.
    """
    billing = Billing(config.billing_log)
    simulator = _Simulator(config, billing)
    app = web.Application(client_max_size=64 * 1024**2)
    app[BILLING_KEY] = billing
    app[CONFIG_KEY] = config
    app.router.add_post("/v1/chat/completions", simulator.chat_completions)
    app.router.add_get("/v1/models", simulator.models)

    async def close_log(_app: web.Application) -> None:
        billing.close()

    app.on_cleanup.append(close_log)
    return app


@dataclass(frozen=True)
class RunningSimulator:
    """A listening simulator: point a client at ``base_url``; read its account in ``billing``."""

    base_url: str
    billing: Billing
    config: SimulatorConfig
    host: str
    port: int
    app: web.Application


@contextlib.asynccontextmanager
async def running_simulator(
    config: SimulatorConfig, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[RunningSimulator]:
    """Serve the simulator on the current event loop for the ``async with`` body (port 0 = any free).

    On exit, open streams get a moment (up to ~0.5 s) to finish and are then cancelled and billed ``cut``.
    """
    app = create_app(config)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=_SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=4096)
        await site.start()
        bound_port = int(runner.addresses[0][1])
        url_host = f"[{host}]" if ":" in host else host
        yield RunningSimulator(
            base_url=f"http://{url_host}:{bound_port}/v1",
            billing=app[BILLING_KEY],
            config=config,
            host=host,
            port=bound_port,
            app=app,
        )
    finally:
        await runner.cleanup()


async def serve_forever(
    config: SimulatorConfig, host: str = "127.0.0.1", port: int = 0, on_ready: Callable[[str], None] = print
) -> None:
    """Serve until cancelled, calling ``on_ready(base_url)`` once listening (the CLI prints it)."""
    async with running_simulator(config, host, port) as sim:
        on_ready(sim.base_url)
        await asyncio.Event().wait()


def serve(
    config: SimulatorConfig, host: str = "127.0.0.1", port: int = 0, on_ready: Callable[[str], None] = print
) -> None:
    """Blocking entry for ``batchgate simulate``: serve until SIGINT or SIGTERM, then shut down cleanly.

    Shutting down bills open streams as ``cut`` and closes the billing log.
    """

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await serve_forever(config, host, port, on_ready)

    asyncio.run(main())
