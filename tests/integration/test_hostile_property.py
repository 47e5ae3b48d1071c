"""Property: whatever chunks and usage blocks a server streams, an attempt yields a Completion or raises an ApiError."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import orjson
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchgate.client import AttemptLimits, Completion, StallWatch, make_session, stream_completion
from batchgate.errors import ApiError

KEY = "gp-Property.Test_key0001"

scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.sampled_from(["stop", "tool_calls", "length", "0.001", "12", "-1", KEY]),
)
anything = st.recursive(
    scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A value of the right shape most of the time, anything at all sometimes."""
    return st.one_of(strategy, strategy, strategy, anything)


tool_call = st.fixed_dictionaries(
    {},
    optional={
        "index": maybe(st.integers(0, 3)),
        "id": maybe(st.text(max_size=5)),
        "type": maybe(st.just("function")),
        "function": maybe(
            st.fixed_dictionaries(
                {}, optional={"name": maybe(st.text(max_size=5)), "arguments": maybe(st.text(max_size=8))}
            )
        ),
    },
)
delta = st.fixed_dictionaries(
    {},
    optional={
        "role": maybe(st.just("assistant")),
        "content": maybe(
            st.one_of(
                st.text(max_size=8),
                st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": maybe(st.text(max_size=4))})),
            )
        ),
        "reasoning_content": maybe(st.text(max_size=8)),
        "reasoning": maybe(st.text(max_size=8)),
        "refusal": maybe(st.text(max_size=8)),
        "tool_calls": maybe(st.lists(maybe(tool_call), max_size=2)),
    },
)
choice = st.fixed_dictionaries(
    {},
    optional={
        "index": maybe(st.integers(0, 2)),
        "delta": maybe(delta),
        "finish_reason": maybe(st.sampled_from(["stop", "tool_calls"])),
    },
)
number = st.one_of(st.integers(0, 10**6), st.floats(0, 1), st.floats(0, 1).map(str), anything)
usage = st.fixed_dictionaries(
    {},
    optional={
        k: number
        for k in (
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
            "base_cost_usd",
            "platform_fee_usd",
            "total_cost_usd",
        )
    },
)
chunk = st.fixed_dictionaries(
    {},
    optional={
        "id": st.just("c"),
        "choices": maybe(st.lists(maybe(choice), max_size=3)),
        "usage": maybe(usage),
        "error": st.one_of(st.none(), st.none(), anything),
    },
)
event = st.one_of(
    chunk.map(orjson.dumps),
    chunk.map(orjson.dumps),
    anything.map(orjson.dumps),
    st.sampled_from([b"[DONE]", b"null", b"", b"{oops", b"[DONE] x"]),
    st.binary(max_size=12),
)
framing = st.sampled_from([b"\n\n", b"\r\n\r\n", b"\n", b"\r"])


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, int]:
    parts = []
    for ev in draw(st.lists(event, max_size=10)):
        parts.append(draw(st.sampled_from([b"data: ", b"data:", b": c\ndata: "])) + ev + draw(framing))
    return b"".join(parts), draw(st.sampled_from([200, 200, 200, 400, 429, 500, 302]))


async def one_attempt(body: bytes, status: int) -> Completion:
    async def handler(request: web.Request) -> web.StreamResponse:
        if status != 200:
            return web.Response(status=status, body=body, headers={"Location": "http://127.0.0.1:9/x"})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(body)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    watch = StallWatch(2.0)
    try:
        async with make_session(KEY, concurrency=1, connect_timeout_s=2.0) as session:
            return await stream_completion(
                session,
                f"http://127.0.0.1:{port}/v1/chat/completions",
                b"{}",
                None,
                watch,
                limits=AttemptLimits(deadline_s=5.0, max_answer_chars=10_000, max_event_bytes=4096),
            )
    finally:
        await watch.close()
        await runner.cleanup()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_any_stream_yields_a_completion_or_an_api_error(case: tuple[bytes, int]) -> None:
    body, status = case
    try:
        comp = asyncio.run(one_attempt(body, status))
    except ApiError as exc:
        assert isinstance(exc.message, str) and KEY not in str(exc)
        if exc.partial is not None:
            assert isinstance(exc.partial.content, str)
        return
    assert status == 200
    assert isinstance(comp.content, str) and comp.choices and comp.choices[0].index == 0
    assert [c.index for c in comp.choices] == sorted(c.index for c in comp.choices)
    for c in comp.choices:
        assert isinstance(c.content, str)
        assert c.reasoning is None or isinstance(c.reasoning, str)
        assert c.refusal is None or isinstance(c.refusal, str)
        assert c.finish_reason is None or isinstance(c.finish_reason, str)
        for call in c.tool_calls or ():
            assert isinstance(call["function"]["name"], str) and isinstance(call["function"]["arguments"], str)
    if comp.usage is not None:
        for v in (comp.usage.total_cost_usd, comp.usage.base_cost_usd, comp.usage.platform_fee_usd):
            assert v is None or (math.isfinite(v) and v >= 0)
        assert comp.usage.confirmed == (
            comp.usage.total_cost_usd is not None and "usage_malformed" not in comp.warnings
        )
    assert comp.received_chars >= 0 and comp.received_chars <= len(body)
