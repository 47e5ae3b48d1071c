"""One attempt against real loopback servers: every way a response can go wrong maps to one error class."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiohttp import web
from chatserver import Handler, serve

from batchgate.client import StallWatch, make_session, parse_retry_after, stream_completion
from batchgate.errors import (
    AttemptTimeout,
    AuthError,
    BadRequest,
    InsufficientBalance,
    RateLimited,
    ServerError,
    StreamInterrupted,
    StreamProtocolError,
)
from batchgate.simulator import SimulatorConfig, running_simulator


async def attempt(url: str, *, idle_s: float = 2.0) -> Any:
    watch = StallWatch(idle_s)
    async with make_session("gp-test", concurrency=4, connect_timeout_s=2.0) as session:
        try:
            return await stream_completion(
                session, url, b'{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}', None, watch
            )
        finally:
            await watch.close()


def sse(*events: bytes) -> bytes:
    return b"".join(b"data: " + e + b"\n\n" for e in events)


CHUNK = b'{"choices":[{"index":0,"delta":{"content":"hi "},"finish_reason":null}]}'
USAGE = (
    b'{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5,'
    b'"base_cost_usd":0.001,"platform_fee_usd":0.0001,"total_cost_usd":0.0011}}'
)


def streaming(body: bytes, *, close_early: bool = False) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(body)
        if close_early:
            assert request.transport is not None
            request.transport.close()
            return resp
        await resp.write_eof()
        return resp

    return handler


def status(code: int, message: str = "nope", headers: dict[str, str] | None = None) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": message}}, status=code, headers=headers)

    return handler


async def test_usage_chunk_with_empty_choices_and_crlf(aiohttp_server: Any) -> None:
    body = sse(CHUNK, CHUNK, USAGE, b"[DONE]").replace(b"\n", b"\r\n")
    comp = await attempt(await serve(aiohttp_server, streaming(b": keep-alive\r\n\r\n" + body)))
    assert comp.content == "hi hi " and comp.received_tokens == 2
    assert comp.usage.total_cost_usd == 0.0011


async def test_stream_without_done_but_with_usage_is_complete(aiohttp_server: Any) -> None:
    comp = await attempt(await serve(aiohttp_server, streaming(sse(CHUNK, USAGE))))
    assert comp.usage is not None and comp.content == "hi "


@pytest.mark.parametrize(
    ("handler", "error", "retryable_status"),
    [
        (status(401), AuthError, 401),
        (status(403), AuthError, 403),
        (status(402, "balance spent"), InsufficientBalance, 402),
        (status(400), BadRequest, 400),
        (status(404), BadRequest, 404),
        (status(422), BadRequest, 422),
        (status(500), ServerError, 500),
        (status(503), ServerError, 503),
        (status(429, headers={"Retry-After": "2"}), RateLimited, 429),
    ],
)
async def test_http_statuses_map_to_error_classes(
    aiohttp_server: Any, handler: Handler, error: type[Exception], retryable_status: int
) -> None:
    with pytest.raises(error) as info:
        await attempt(await serve(aiohttp_server, handler))
    assert info.value.status == retryable_status  # type: ignore[attr-defined]
    if isinstance(info.value, RateLimited):
        assert info.value.retry_after == 2.0


async def test_server_message_is_kept(aiohttp_server: Any) -> None:
    with pytest.raises(InsufficientBalance, match="balance spent"):
        await attempt(await serve(aiohttp_server, status(402, "balance spent")))


async def test_error_sent_mid_stream_keeps_received_tokens(aiohttp_server: Any) -> None:
    body = sse(CHUNK, CHUNK, b'{"error":{"message":"upstream exploded","code":500}}')
    with pytest.raises(StreamInterrupted, match="upstream exploded") as info:
        await attempt(await serve(aiohttp_server, streaming(body)))
    assert info.value.received_tokens == 2


async def test_stream_cut_before_usage(aiohttp_server: Any) -> None:
    with pytest.raises(StreamInterrupted) as info:
        await attempt(await serve(aiohttp_server, streaming(sse(CHUNK, CHUNK, CHUNK))))
    assert info.value.received_tokens == 3 and info.value.content == "hi hi hi "


async def test_connection_dropped_mid_stream(aiohttp_server: Any) -> None:
    handler = streaming(sse(CHUNK), close_early=True)
    with pytest.raises(StreamInterrupted) as info:
        await attempt(await serve(aiohttp_server, handler))
    assert info.value.received_tokens == 1


async def test_chunk_that_is_not_json_is_retryable(aiohttp_server: Any) -> None:
    with pytest.raises(StreamProtocolError):
        await attempt(await serve(aiohttp_server, streaming(sse(CHUNK, b"{oops"))))


async def test_stalled_stream_times_out_with_what_it_received() -> None:
    cfg = SimulatorConfig(stall_rate=1.0, stall_s=10.0, min_completion_tokens=10, max_completion_tokens=10)
    async with running_simulator(cfg) as sim:
        t0 = time.monotonic()
        with pytest.raises(AttemptTimeout) as info:
            await attempt(sim.base_url + "/chat/completions", idle_s=0.3)
        took = time.monotonic() - t0
    assert 0.3 <= took < 2.0
    assert info.value.received_tokens >= 1


async def test_server_that_never_answers_times_out(aiohttp_server: Any) -> None:
    async def silent(request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.Response()

    t0 = time.monotonic()
    with pytest.raises(AttemptTimeout):
        await attempt(await serve(aiohttp_server, silent), idle_s=0.3)
    assert time.monotonic() - t0 < 2.0


async def test_a_real_cancellation_is_not_mistaken_for_a_stall(aiohttp_server: Any) -> None:
    async def silent(request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.Response()

    url = await serve(aiohttp_server, silent)
    task = asyncio.create_task(attempt(url, idle_s=5.0))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_retry_after_forms() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("-1") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    http_date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 60))
    assert 55 < (parse_retry_after(http_date) or 0) <= 61


async def test_request_carries_key_user_agent_and_stream_accept(aiohttp_server: Any) -> None:
    seen: dict[str, str] = {}

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.update(request.headers)
        return await streaming(sse(CHUNK, USAGE, b"[DONE]"))(request)

    await attempt(await serve(aiohttp_server, handler))
    assert seen["Authorization"] == "Bearer gp-test"
    assert seen["User-Agent"].startswith("batchgate/")
    assert seen["Accept"] == "text/event-stream"


async def test_usage_event_without_final_blank_line_still_completes(aiohttp_server: Any) -> None:
    body = sse(CHUNK) + b"data: " + USAGE + b"\n"  # EOF right after the usage line
    comp = await attempt(await serve(aiohttp_server, streaming(body)))
    assert comp.usage is not None and comp.usage.total_cost_usd == 0.0011


@pytest.mark.parametrize("odd", [b"1", b'"hello"', b"[1, 2]", b'{"choices": "nope"}', b'{"choices": [{"delta": 5}]}'])
async def test_json_that_is_not_a_chunk_is_a_protocol_error(aiohttp_server: Any, odd: bytes) -> None:
    with pytest.raises(StreamProtocolError):
        await attempt(await serve(aiohttp_server, streaming(sse(CHUNK, odd, USAGE))))
