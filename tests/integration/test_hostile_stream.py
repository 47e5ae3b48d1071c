"""Streams as real gateways, proxies and flaky upstreams send them: every shape understood, cut, or a clear error.

Each test runs a tiny aiohttp server that sends exactly the bytes in question.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import orjson
import pytest
from aiohttp import web
from chatserver import BODY, Handler, serve

from batchgate.client import AttemptLimits, Completion, StallWatch, make_session, stream_completion
from batchgate.errors import (
    AnswerTooLong,
    AttemptTimeout,
    DeadlineExceeded,
    StreamInterrupted,
    StreamProtocolError,
)

KEY = "gp-hostile-stream-key-0123"


async def attempt(url: str, *, idle_s: float = 2.0, limits: AttemptLimits | None = None) -> Completion:
    watch = StallWatch(idle_s)
    async with make_session(KEY, concurrency=2, connect_timeout_s=2.0) as session:
        try:
            return await stream_completion(session, url, BODY, None, watch, limits=limits)
        finally:
            await watch.close()


def sse(*events: bytes | dict[str, Any]) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, bytes) else orjson.dumps(e)) + b"\n\n" for e in events)


def chunk(delta: dict[str, Any] | None = None, *, index: int = 0, finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "choices": [{"index": index, "delta": delta or {}, "finish_reason": finish}],
    }


USAGE = {
    "choices": [],
    "usage": {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
        "base_cost_usd": 0.001,
        "platform_fee_usd": 0.0001,
        "total_cost_usd": 0.0011,
    },
}


def streaming(body: bytes, headers: dict[str, str] | None = None) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", **(headers or {})})
        await resp.prepare(request)
        await resp.write(body)
        await resp.write_eof()
        return resp

    return handler


def trickling(head: bytes, piece: bytes, every_s: float, tail: bytes = b"", seconds: float = 30.0) -> Handler:
    """Send ``head``, then ``piece`` every ``every_s`` for ``seconds`` (i.e. for ever, for a test), then ``tail``."""

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(head)
        end = time.monotonic() + seconds
        try:
            while time.monotonic() < end:
                await asyncio.sleep(every_s)
                await resp.write(piece)
            await resp.write(tail)
        except (ConnectionError, RuntimeError):
            pass  # the client gave up, as it should
        return resp

    return handler


# -- everything an answer carries ------------------------------------------------------------------


async def test_tool_call_pieces_are_assembled_and_an_empty_content_answer_is_complete(aiohttp_server: Any) -> None:
    body = sse(
        chunk({"role": "assistant", "content": None}),
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_a",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": ""},
                    }
                ]
            }
        ),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 1,
                        "id": "call_b",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": "{}"},
                    }
                ]
            }
        ),
        chunk(finish="tool_calls"),
        USAGE,
        b"[DONE]",
    )
    comp = await attempt(await serve(aiohttp_server, streaming(body)))
    assert comp.content == "" and comp.finish_reason == "tool_calls"
    assert comp.tool_calls == [
        {
            "index": 0,
            "id": "call_a",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        },
        {"index": 1, "id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    ]
    assert comp.received_chars == len("get_weather") + len('{"city": "Paris"}') + len("get_time") + 2
    assert comp.usage is not None and comp.usage.total_cost_usd == 0.0011


async def test_reasoning_is_kept_beside_the_content(aiohttp_server: Any) -> None:
    body = sse(
        chunk({"role": "assistant", "content": None, "reasoning_content": "Let me"}),
        chunk({"reasoning_content": " think."}),
        chunk({"reasoning": " Still."}),  # the other spelling some servers use
        chunk({"content": "42", "reasoning_content": None}),
        chunk(finish="stop"),
        USAGE,
        b"[DONE]",
    )
    comp = await attempt(await serve(aiohttp_server, streaming(body)))
    assert comp.reasoning == "Let me think. Still." and comp.content == "42"
    assert comp.received_chars == len("Let me think. Still.") + 2 and comp.ttft_s is not None


async def test_n_choices_are_kept_apart(aiohttp_server: Any) -> None:
    body = sse(
        chunk({"content": "A1 "}, index=0),
        chunk({"content": "B1 "}, index=1),
        {"choices": [{"index": 1, "delta": {"content": "B2"}}, {"index": 0, "delta": {"content": "A2"}}]},
        chunk(index=1, finish="length"),
        chunk(index=0, finish="stop"),
        USAGE,
        b"[DONE]",
    )
    comp = await attempt(await serve(aiohttp_server, streaming(body)))
    assert [(c.index, c.content, c.finish_reason) for c in comp.choices] == [
        (0, "A1 A2", "stop"),
        (1, "B1 B2", "length"),
    ]
    assert comp.content == "A1 A2" and comp.finish_reason == "stop"


async def test_content_parts_are_joined_and_a_refusal_is_kept(aiohttp_server: Any) -> None:
    parts = [
        {"type": "text", "text": "Hel"},
        {"type": "image_url", "image_url": {"url": "x"}},
        {"type": "text", "text": "lo"},
    ]
    body = sse(chunk({"content": parts}), chunk({"content": None, "refusal": "I can't help with that."}), USAGE)
    comp = await attempt(await serve(aiohttp_server, streaming(body)))
    assert comp.content == "Hello" and comp.refusal == "I can't help with that."


async def test_request_id_is_kept(aiohttp_server: Any) -> None:
    comp = await attempt(
        await serve(aiohttp_server, streaming(sse(chunk({"content": "x"}), USAGE), {"x-request-id": "req_123"}))
    )
    assert comp.request_id == "req_123"


# -- usage blocks --------------------------------------------------------------------------------------


async def test_usage_with_numbers_as_strings_is_confirmed(aiohttp_server: Any) -> None:
    usage = {"choices": [], "usage": {k: str(v) for k, v in USAGE["usage"].items()}}  # type: ignore[attr-defined]
    comp = await attempt(await serve(aiohttp_server, streaming(sse(chunk({"content": "x"}), usage, b"[DONE]"))))
    assert comp.usage is not None and comp.usage.cost_status == "confirmed"
    assert comp.usage.total_cost_usd == pytest.approx(0.0011) and comp.usage.prompt_tokens == 3
    assert comp.usage_raw is None and comp.warnings == []


async def test_malformed_usage_still_delivers_the_answer_unconfirmed_with_the_raw_block(aiohttp_server: Any) -> None:
    raw = {"prompt_tokens": 3, "completion_tokens": [2], "total_cost_usd": "lots"}
    comp = await attempt(
        await serve(aiohttp_server, streaming(sse(chunk({"content": "paid for"}), {"choices": [], "usage": raw})))
    )
    assert comp.content == "paid for"
    assert comp.usage is not None and comp.usage.cost_status == "unconfirmed" and comp.usage.total_cost_usd is None
    assert comp.usage_raw == raw and "usage_malformed" in comp.warnings


async def test_two_different_usage_blocks_keep_the_last_and_warn(aiohttp_server: Any) -> None:
    first = {"choices": [], "usage": {**USAGE["usage"], "total_cost_usd": 0.5}}  # type: ignore[dict-item]
    body = sse(chunk({"content": "x"}, finish="stop") | {"usage": first["usage"]}, USAGE, b"[DONE]")
    comp = await attempt(await serve(aiohttp_server, streaming(body)))
    assert comp.usage is not None and comp.usage.total_cost_usd == 0.0011
    assert "usage_twice" in comp.warnings


async def test_the_same_usage_block_twice_is_no_warning(aiohttp_server: Any) -> None:
    body = sse(chunk({"content": "x"}, finish="stop") | {"usage": USAGE["usage"]}, USAGE, b"[DONE]")
    comp = await attempt(await serve(aiohttp_server, streaming(body)))
    assert comp.warnings == []


async def test_done_without_usage_is_complete_with_no_usage(aiohttp_server: Any) -> None:
    comp = await attempt(await serve(aiohttp_server, streaming(sse(chunk({"content": "x"}), b"[DONE]"))))
    assert comp.usage is None and comp.content == "x"


# -- odd chunks ------------------------------------------------------------------------------------------


async def test_nulls_are_understood(aiohttp_server: Any) -> None:
    body = sse(
        {**chunk({"content": "a"}), "error": None},
        {"choices": [None]},
        b"null",
        b"",
        {"choices": None, "usage": None},
        chunk({"content": "b"}, finish="stop"),
        USAGE,
    )
    comp = await attempt(await serve(aiohttp_server, streaming(body)))
    assert comp.content == "ab" and comp.finish_reason == "stop"


async def test_data_after_done_is_ignored(aiohttp_server: Any) -> None:
    body = sse(chunk({"content": "kept"}), USAGE, b"[DONE]", chunk({"content": " not kept"}), b"{garbage", USAGE)
    comp = await attempt(await serve(aiohttp_server, streaming(body)))
    assert comp.content == "kept"


@pytest.mark.parametrize(
    ("event", "words"),
    [
        (chunk({"content": 5}), "delta.content is a int"),
        (chunk({"content": "x"}, finish=7), "finish_reason is a int"),  # type: ignore[arg-type]
        ({"choices": [{"index": 0, "delta": [1]}]}, "choices[0].delta is a list"),
        ({"choices": [[1]]}, "choices[0] is a list"),
        ({"choices": {"index": 0}}, "choices is a dict"),
        ({"choices": [{"index": "1", "delta": {"content": "x"}}]}, "choice index '1'"),
        (chunk({"tool_calls": {"index": 0}}), "delta.tool_calls is a dict"),
        (chunk({"tool_calls": [{"index": 0, "function": {"arguments": 12}}]}), "arguments are a int"),
        (b"[1, 2]", "a data event is a JSON list"),
        (b'"text"', "a data event is a JSON str"),
        (b"{oops", "not JSON"),
    ],
)
async def test_wrong_types_are_a_retryable_protocol_error_that_says_what(
    aiohttp_server: Any, event: bytes | dict[str, Any], words: str
) -> None:
    body = sse(chunk({"content": "before "}), event, USAGE)
    with pytest.raises(StreamProtocolError, match=re.escape(words)) as info:
        await attempt(await serve(aiohttp_server, streaming(body)))
    assert info.value.partial is not None and info.value.partial.content.startswith("before ")
    assert info.value.received_chars >= len("before ")


# -- every attempt ends -------------------------------------------------------------------------------


async def test_keep_alive_comments_alone_do_not_hold_off_the_stall_timeout(aiohttp_server: Any) -> None:
    handler = trickling(sse(chunk({"content": "hi"})), b": keep-alive\n\n", 0.05)
    t0 = time.monotonic()
    with pytest.raises(AttemptTimeout) as info:
        await attempt(await serve(aiohttp_server, handler), idle_s=0.4)
    assert time.monotonic() - t0 < 2.0
    assert info.value.partial is not None and info.value.partial.content == "hi"


async def test_slow_data_with_keep_alives_between_is_progress(aiohttp_server: Any) -> None:
    piece = b": keep-alive\n\n" + sse(chunk({"content": "."}))
    handler = trickling(b"", piece, 0.1, tail=sse(USAGE, b"[DONE]"), seconds=1.0)
    comp = await attempt(await serve(aiohttp_server, handler), idle_s=0.4)
    assert 5 <= len(comp.content) <= 11


async def test_an_endless_answer_is_cut_at_its_deadline(aiohttp_server: Any) -> None:
    handler = trickling(b"", sse(chunk({"content": "more "})), 0.01)
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded, match=r"deadline of 0\.6 s") as info:
        await attempt(await serve(aiohttp_server, handler), idle_s=5.0, limits=AttemptLimits(deadline_s=0.6))
    assert 0.6 <= time.monotonic() - t0 < 2.0
    assert isinstance(info.value, AttemptTimeout)  # retried or failed like a stall
    assert info.value.received_chars > 0 and info.value.partial is not None
    assert info.value.partial.content.startswith("more more ") and info.value.partial.usage is None


async def test_an_answer_over_its_size_cap_is_cut(aiohttp_server: Any) -> None:
    handler = trickling(b"", sse(*[chunk({"content": "0123456789"})] * 20), 0.001)
    with pytest.raises(AnswerTooLong, match="past its cap of 5000") as info:
        await attempt(await serve(aiohttp_server, handler), limits=AttemptLimits(max_answer_chars=5000))
    assert 5000 < info.value.received_chars < 5000 + 400  # cut within a read or two of the cap
    assert info.value.partial is not None and len(info.value.partial.content) == info.value.received_chars


async def test_an_answer_under_its_size_cap_completes(aiohttp_server: Any) -> None:
    body = sse(*[chunk({"content": "0123456789"})] * 100, USAGE, b"[DONE]")
    comp = await attempt(await serve(aiohttp_server, streaming(body)), limits=AttemptLimits(max_answer_chars=1000))
    assert len(comp.content) == 1000


async def test_a_huge_line_is_a_protocol_error_not_a_memory_hog(aiohttp_server: Any) -> None:
    handler = trickling(b'data: {"choices":[{"delta":{"content":"', b"x" * 65536, 0.0)
    t0 = time.monotonic()
    with pytest.raises(StreamProtocolError, match="longer than 1048576 bytes"):
        await attempt(await serve(aiohttp_server, handler), limits=AttemptLimits(max_event_bytes=1 << 20))
    assert time.monotonic() - t0 < 3.0


async def test_a_server_that_keeps_the_stream_open_after_done_still_delivers(aiohttp_server: Any) -> None:
    handler = trickling(sse(chunk({"content": "done"}), USAGE, b"[DONE]"), b": keep-alive\n\n", 0.05)
    t0 = time.monotonic()
    comp = await attempt(await serve(aiohttp_server, handler), idle_s=0.4)
    assert comp.content == "done" and comp.usage is not None
    assert time.monotonic() - t0 < 2.0


async def test_cut_before_usage_keeps_the_partial(aiohttp_server: Any) -> None:
    with pytest.raises(StreamInterrupted) as info:
        await attempt(
            await serve(aiohttp_server, streaming(sse(chunk({"reasoning_content": "hmm"}), chunk({"content": "ab"}))))
        )
    part = info.value.partial
    assert part is not None and part.reasoning == "hmm" and part.content == "ab"
    assert info.value.received_chars == 5 and info.value.content == "ab"
