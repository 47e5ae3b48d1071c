"""Error answers: one class per row of the docs' status/code table, request ids kept, the key never echoed back."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import Any

import orjson
import pytest
from aiohttp import web
from chatserver import BODY, Handler, serve

from batchgate.client import RETRY_AFTER_CAP_S, Completion, StallWatch, make_session, stream_completion
from batchgate.errors import (
    ApiError,
    AuthError,
    BadRequest,
    ConnectFailed,
    InsufficientBalance,
    ModelNotFound,
    QuotaExhausted,
    RateLimited,
    Redirected,
    RetryableError,
    ServerError,
    StreamInterrupted,
)

KEY = "gp-Error7Test.Key_abcdef"


async def attempt(url: str) -> Completion:
    watch = StallWatch(2.0)
    async with make_session(KEY, concurrency=2, connect_timeout_s=2.0) as session:
        try:
            return await stream_completion(session, url, BODY, None, watch)
        finally:
            await watch.close()


def answer(
    status: int, code: str | int | None = None, message: str = "nope", headers: dict[str, str] | None = None
) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        err: dict[str, Any] = {"message": message, "type": "error"}
        if code is not None:
            err["code"] = code
        return web.json_response(
            {"error": err}, status=status, headers={"x-request-id": "req-err-1", **(headers or {})}
        )

    return handler


def sse(*events: dict[str, Any] | bytes) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, bytes) else orjson.dumps(e)) + b"\n\n" for e in events)


def streaming(body: bytes) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "x-request-id": "req-stream-1"})
        await resp.prepare(request)
        await resp.write(body)
        await resp.write_eof()
        return resp

    return handler


# One row per line of ../shared/docs/gonkagate-api.md "Statuses and codes".
DOCS_TABLE = [
    (400, "invalid_request_error", BadRequest),
    (401, "invalid_api_key", AuthError),
    (402, None, InsufficientBalance),
    (403, "account_deactivated", AuthError),
    (404, "model_not_found", ModelNotFound),
    (429, "insufficient_quota", QuotaExhausted),
    (429, "rate_limit_exceeded", RateLimited),
    (429, "transfer_agent_capacity_reached", RateLimited),
    (429, None, RateLimited),
    (429, "some_new_code", RateLimited),
    (500, None, ServerError),
    (503, "service_unavailable", ServerError),
    (504, None, ServerError),
]


@pytest.mark.parametrize(("status", "code", "cls"), DOCS_TABLE)
async def test_docs_table_row(aiohttp_server: Any, status: int, code: str | None, cls: type[ApiError]) -> None:
    with pytest.raises(ApiError) as info:
        await attempt(await serve(aiohttp_server, answer(status, code)))
    err = info.value
    assert type(err) is cls
    assert err.status == status and err.code == code and err.request_id == "req-err-1"
    assert err.as_record()["request_id"] == "req-err-1" and "req-err-1" in str(err)


async def test_quota_429_stops_like_402_and_is_not_a_rate_limit(aiohttp_server: Any) -> None:
    handler = answer(429, "insufficient_quota", "Insufficient balance", headers={"Retry-After": "1"})
    with pytest.raises(QuotaExhausted) as info:
        await attempt(await serve(aiohttp_server, handler))
    assert isinstance(info.value, InsufficientBalance) and not isinstance(info.value, RetryableError)
    assert info.value.as_record()["code"] == "insufficient_quota"


async def test_old_integer_codes_still_decide_by_status(aiohttp_server: Any) -> None:
    with pytest.raises(InsufficientBalance):
        await attempt(await serve(aiohttp_server, answer(402, 402)))
    with pytest.raises(RateLimited) as info:
        await attempt(await serve(aiohttp_server, answer(429, 429)))
    assert info.value.code == "429"


async def test_retry_after_is_honoured_up_to_a_cap_and_the_message_says_so(aiohttp_server: Any) -> None:
    with pytest.raises(RateLimited) as info:
        await attempt(await serve(aiohttp_server, answer(429, "rate_limit_exceeded", headers={"Retry-After": "7"})))
    assert info.value.retry_after == 7.0 and "capped" not in info.value.message
    with pytest.raises(RateLimited) as info:
        await attempt(await serve(aiohttp_server, answer(429, "rate_limit_exceeded", headers={"Retry-After": "86400"})))
    assert info.value.retry_after == RETRY_AFTER_CAP_S == 300.0
    assert "Retry-After 86400 s capped to 300 s" in info.value.message


# -- the key never survives into a message ---------------------------------------------------------------


async def test_a_400_that_echoes_the_authorization_header_is_redacted(aiohttp_server: Any) -> None:
    async def echo(request: web.Request) -> web.Response:
        headers = dict(request.headers)
        assert headers["Authorization"] == f"Bearer {KEY}"  # the server really got the key...
        return web.json_response({"error": {"message": f"bad request; headers were {headers}"}}, status=400)

    with pytest.raises(BadRequest) as info:
        await attempt(await serve(aiohttp_server, echo))
    texts = [info.value.message, str(info.value), repr(info.value), orjson.dumps(info.value.as_record()).decode()]
    for text in texts:  # ...and no text built from the answer carries it
        assert KEY not in text and KEY[3:] not in text
    assert "[REDACTED]" in info.value.message and "bad request; headers were" in info.value.message


async def test_a_plain_text_echo_and_a_mid_stream_echo_are_redacted(aiohttp_server: Any) -> None:
    async def echo(request: web.Request) -> web.Response:
        return web.Response(status=500, text=f"upstream said: authorization: {request.headers['Authorization']}")

    with pytest.raises(ServerError) as info:
        await attempt(await serve(aiohttp_server, echo))
    assert KEY not in str(info.value) and "upstream said" in str(info.value)
    body = sse({"choices": [{"delta": {"content": "x"}}]}, {"error": {"message": f"proxy got key {KEY}"}})
    with pytest.raises(StreamInterrupted) as info2:
        await attempt(await serve(aiohttp_server, streaming(body)))
    assert KEY not in str(info2.value) and "proxy got key [REDACTED]" in str(info2.value)


# -- errors sent mid-stream -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("err", "cls", "status"),
    [
        ({"message": "balance gone", "code": "insufficient_quota"}, QuotaExhausted, 429),
        ({"message": "slow down", "code": "rate_limit_exceeded"}, RateLimited, 429),
        ({"message": "balance", "type": "insufficient_balance", "code": 402}, InsufficientBalance, 402),
        ({"message": "upstream exploded", "code": 500}, StreamInterrupted, 500),
        ({"message": "upstream exploded", "type": "server_error"}, StreamInterrupted, 500),
        ({"message": "who knows"}, StreamInterrupted, None),
        ("a bare string", StreamInterrupted, None),
    ],
)
async def test_mid_stream_error_objects_are_classed_by_code(
    aiohttp_server: Any, err: Any, cls: type[ApiError], status: int | None
) -> None:
    body = sse({"choices": [{"delta": {"content": "partial"}}]}, {"error": err})
    with pytest.raises(ApiError) as info:
        await attempt(await serve(aiohttp_server, streaming(body)))
    assert type(info.value) is cls and info.value.status == status
    assert info.value.request_id == "req-stream-1"
    assert info.value.partial is not None and info.value.partial.content == "partial"
    assert "error sent mid-stream" in info.value.message


# -- redirects and unreachable hosts ----------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_redirect_to_another_origin_is_not_followed(aiohttp_server: Any, status: int) -> None:
    hits: list[dict[str, str]] = []

    async def elsewhere(request: web.Request) -> web.Response:
        hits.append(dict(request.headers))
        return web.Response(text="gotcha")

    other = web.Application()
    other.router.add_route("*", "/{tail:.*}", elsewhere)
    other_server = await aiohttp_server(other)
    target = str(other_server.make_url("/v1/chat/completions"))

    async def redirect(request: web.Request) -> web.Response:
        return web.Response(status=status, headers={"Location": target, "x-request-id": "req-redir"})

    with pytest.raises(Redirected) as info:
        await attempt(await serve(aiohttp_server, redirect))
    assert hits == []  # neither the body nor the key went to the other port
    assert info.value.location == target and target in info.value.message
    assert isinstance(info.value, BadRequest) and info.value.status == status and info.value.request_id == "req-redir"


async def test_a_refused_port_is_a_fast_connect_failure() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    t0 = time.monotonic()
    with pytest.raises(ConnectFailed, match=f"127.0.0.1:{port}"):
        await attempt(f"http://127.0.0.1:{port}/v1/chat/completions")
    assert time.monotonic() - t0 < 2.0


async def test_an_error_body_in_many_pieces_is_read_whole(aiohttp_server: Any) -> None:
    body = orjson.dumps({"error": {"message": "x" * 200, "code": "insufficient_quota"}})

    async def slow(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=429, headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        for i in range(0, len(body), 16):
            await resp.write(body[i : i + 16])
            await asyncio.sleep(0.002)
        await resp.write_eof()
        return resp

    with pytest.raises(QuotaExhausted):
        await attempt(await serve(aiohttp_server, slow))


async def test_a_black_holed_host_is_a_connect_failure_within_the_connect_timeout() -> None:
    # A listener that never accepts, its backlog filled: the kernel drops further SYNs, as a black hole does.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        fillers.append(s)
    try:
        t0 = time.monotonic()
        async with make_session(KEY, concurrency=1, connect_timeout_s=0.3) as session:
            with pytest.raises(ConnectFailed):
                await stream_completion(session, f"http://127.0.0.1:{port}/v1/chat/completions", BODY)
        assert time.monotonic() - t0 < 2.0
    finally:
        for s in fillers:
            s.close()
        listener.close()
