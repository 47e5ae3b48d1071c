"""The simulator over real loopback HTTP: wire format, determinism, every fault, and its billing."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchgate.simulator import (
    BILLING_KEY,
    DEFAULT_PRICES,
    Billing,
    SimulatorConfig,
    create_app,
    running_simulator,
    serve_forever,
)

MODEL = "Qwen/Qwen3-235B-A22B-Instruct-2507-FP8"
IN_PRICE, OUT_PRICE = 2.5, 10.0  # the docs' model, as the simulator's default table prices it
AUTH = {"Authorization": "Bearer gp-test"}

Event = dict[str, Any] | str  # a parsed `data:` payload, or "[DONE]"


def chat(content: str = "Hello!", *, stream: bool = True, model: str = MODEL, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], "stream": stream, **extra}


def parse_sse(raw: bytes) -> tuple[list[Event], int]:
    """Complete events in ``raw`` (a trailing partial event is dropped) and the comment count."""
    events: list[Event] = []
    comments = 0
    blocks = raw.split(b"\n\n")
    for block in blocks[:-1]:
        for line in block.split(b"\n"):
            if line.startswith(b":"):
                comments += 1
            elif line.startswith(b"data: "):
                payload = line[len(b"data: ") :]
                events.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
            else:
                raise AssertionError(f"unexpected SSE line {line!r}")
    return events, comments


def deltas(events: list[Event], index: int = 0) -> list[dict[str, Any]]:
    """The deltas of choice ``index``, in order."""
    return [
        c["delta"]
        for e in events
        if isinstance(e, dict)
        for c in e.get("choices", ())
        if c["index"] == index and c["delta"]
    ]


def content_of(events: list[Event], index: int = 0) -> str:
    return "".join(d.get("content") or "" for d in deltas(events, index))


def usage_of(events: list[Event]) -> dict[str, Any]:
    """The one usage block of a complete stream (in the finish chunk or in its own chunk after it)."""
    [usage] = [e["usage"] for e in events if isinstance(e, dict) and e.get("usage")]
    assert events[-1] == "[DONE]"
    return usage  # type: ignore[no-any-return]


def finish_of(events: list[Event], index: int = 0) -> str | None:
    reasons = [
        c["finish_reason"]
        for e in events
        if isinstance(e, dict)
        for c in e.get("choices", ())
        if c["index"] == index and c["finish_reason"]
    ]
    assert len(reasons) <= 1
    return reasons[0] if reasons else None


def tokens_in(text: str) -> int:
    # Every piece is one word plus a trailing space, and no word holds a space.
    return text.count(" ")


def expected_costs(prompt_tokens: int, completion_tokens: int) -> tuple[float, float, float]:
    base = prompt_tokens * IN_PRICE / 1e6 + completion_tokens * OUT_PRICE / 1e6
    fee = base * 0.10
    return base, fee, base + fee


async def post(
    session: aiohttp.ClientSession, base_url: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, Mapping[str, str], bytes]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with session.post(f"{base_url}/chat/completions", data=data, headers=AUTH | (headers or {})) as resp:
        return resp.status, resp.headers, await resp.read()


async def read_until_error(resp: aiohttp.ClientResponse) -> tuple[bytes, BaseException | None]:
    raw = b""
    try:
        async for data in resp.content.iter_any():
            raw += data
    except (aiohttp.ClientError, TimeoutError) as exc:
        return raw, exc
    return raw, None


async def wait_until(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


async def test_stream_wire_format_and_billing(session: aiohttp.ClientSession) -> None:
    async with (
        running_simulator(SimulatorConfig(seed=7, separate_usage_rate=0.0)) as sim,
        session.post(
            f"{sim.base_url}/chat/completions", json=chat(), headers=AUTH | {"X-Client-Request-Id": "req-1"}
        ) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events, comments = parse_sse(await resp.read())

    assert comments == 0
    assert events[-1] == "[DONE]"
    role, *middle, final, _done = events
    assert isinstance(role, dict) and isinstance(final, dict)
    assert role["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
    for event in events[:-1]:
        assert isinstance(event, dict)
        assert list(event)[:5] == ["id", "object", "created", "model", "choices"]
        assert event["object"] == "chat.completion.chunk"
        assert event["id"] == role["id"] and event["id"].startswith("chatcmpl-")
        assert event["model"] == MODEL
    for chunk in middle:
        assert isinstance(chunk, dict) and "usage" not in chunk
        assert chunk["choices"][0]["finish_reason"] is None
        assert tokens_in(chunk["choices"][0]["delta"]["content"]) == 1
    assert final["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]

    content = content_of(events)
    usage = final["usage"]
    assert usage["prompt_tokens"] == math.ceil(len("Hello!") / 4) + 4
    assert usage["completion_tokens"] == len(middle) == tokens_in(content)
    assert 8 <= usage["completion_tokens"] <= 64
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    base, fee, total = expected_costs(usage["prompt_tokens"], usage["completion_tokens"])
    assert (usage["base_cost_usd"], usage["platform_fee_usd"], usage["total_cost_usd"]) == (base, fee, total)

    [record] = sim.billing.records
    assert record["status"] == "completed" and record["fault"] is None
    assert record["client_request_id"] == "req-1"
    assert record["response_id"] == role["id"]
    assert record["content"] == content
    for key in ("prompt_tokens", "completion_tokens", "base_cost_usd", "platform_fee_usd", "total_cost_usd"):
        assert record[key] == usage[key]
    assert sim.billing.completed_total_usd() == total
    assert sim.billing.cut_total_usd() == 0.0


def test_default_prices_reproduce_the_docs_example() -> None:
    # docs: 10 prompt + 5 completion tokens -> base 0.000075, fee 0.0000075, total 0.0000825
    base, fee, total = SimulatorConfig().costs(MODEL, 10, 5)
    assert (base, fee, total) == pytest.approx((0.000075, 0.0000075, 0.0000825), abs=1e-15)
    assert len(DEFAULT_PRICES) >= 3 and len(set(DEFAULT_PRICES.values())) == len(DEFAULT_PRICES)
    assert SimulatorConfig().price("some/unknown-model") == SimulatorConfig().default_price


async def test_tokens_per_chunk_and_keepalives_keep_the_content(session: aiohttp.ClientSession) -> None:
    body = chat("Tell me about rivers and mountains in some detail please.")
    async with running_simulator(SimulatorConfig(seed=3, separate_usage_rate=0.0)) as plain:
        _, _, raw_plain = await post(session, plain.base_url, body)
    config = SimulatorConfig(seed=3, tokens_per_chunk=3, keepalive_rate=0.5, separate_usage_rate=0.0)
    async with running_simulator(config) as grouped:
        _, _, raw_grouped = await post(session, grouped.base_url, body)
    events_plain, comments_plain = parse_sse(raw_plain)
    events_grouped, comments_grouped = parse_sse(raw_grouped)
    n = tokens_in(content_of(events_plain))
    assert content_of(events_grouped) == content_of(events_plain)
    assert len(events_grouped) == 1 + math.ceil(n / 3) + 2  # role, content, final, [DONE]
    assert comments_plain == 0 and comments_grouped >= 1


async def test_max_tokens_cuts_the_answer_with_length(session: aiohttp.ClientSession) -> None:
    async with running_simulator(SimulatorConfig(seed=5)) as sim:
        _, _, full = await post(session, sim.base_url, chat())
        _, _, capped = await post(session, sim.base_url, chat(max_tokens=3))
        _, _, alias = await post(session, sim.base_url, chat(max_completion_tokens=3))
    full_events, capped_events = parse_sse(full)[0], parse_sse(capped)[0]
    assert finish_of(capped_events) == "length" and finish_of(full_events) == "stop"
    assert usage_of(capped_events)["completion_tokens"] == 3
    words = content_of(full_events).split(" ")
    assert content_of(capped_events) == " ".join(words[:3]) + " "
    assert content_of(parse_sse(alias)[0]) == content_of(capped_events)


async def test_content_is_deterministic(session: aiohttp.ClientSession) -> None:
    async def answer(seed: int, body: dict[str, Any]) -> str:
        async with running_simulator(SimulatorConfig(seed=seed)) as sim:
            _, _, raw = await post(session, sim.base_url, body)
            _, _, again = await post(session, sim.base_url, body)
        first, second = content_of(parse_sse(raw)[0]), content_of(parse_sse(again)[0])
        assert first == second  # a retry gets the same words
        return first

    body = chat("What is a token bucket?")
    first = await answer(11, body)
    assert await answer(11, body) == first  # across a restart with the same seed
    assert await answer(12, body) != first
    assert await answer(11, chat("What is a token bucket?", model="Qwen/Qwen3-32B-FP8")) != first
    assert await answer(11, chat("What is a leaky bucket?")) != first


async def test_longer_prompts_get_longer_answers(session: aiohttp.ClientSession) -> None:
    config = SimulatorConfig(seed=1, min_completion_tokens=8, max_completion_tokens=512)
    lengths: dict[str, list[int]] = {"short": [], "long": []}
    async with running_simulator(config) as sim:
        for i in range(10):
            for kind, text in (("short", f"hi {i}"), ("long", f"question {i} " + "lorem ipsum " * 60)):
                _, _, raw = await post(session, sim.base_url, chat(text, stream=False))
                lengths[kind].append(orjson.loads(raw)["usage"]["completion_tokens"])
    assert all(8 <= n <= 512 for n in lengths["short"] + lengths["long"])
    assert min(lengths["long"]) > max(lengths["short"])


async def test_non_streaming_answer_matches_the_stream(session: aiohttp.ClientSession) -> None:
    async with running_simulator(SimulatorConfig(seed=2)) as sim:
        _, _, streamed = await post(session, sim.base_url, chat())
        status, headers, raw = await post(session, sim.base_url, chat(stream=False))
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    body = orjson.loads(raw)
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": content_of(parse_sse(streamed)[0])}
    assert body["choices"][0]["finish_reason"] == "stop"
    completed = sim.billing.completed()
    assert [r["stream"] for r in completed] == [True, False]
    assert completed[1]["total_cost_usd"] == body["usage"]["total_cost_usd"]
    assert body["usage"]["total_cost_usd"] == expected_costs(6, body["usage"]["completion_tokens"])[2]


async def test_openai_sdk_reads_stream_and_json() -> None:
    async with (
        running_simulator(SimulatorConfig(seed=4)) as sim,
        openai.AsyncOpenAI(base_url=sim.base_url, api_key="gp-test", max_retries=0) as client,
    ):
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Write a poem"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usages = "", []
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
            if chunk.usage:
                usages.append(chunk.usage)
        completion = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Write a poem"}]
        )
        async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk-nope", max_retries=0) as bad_key:
            with pytest.raises(openai.AuthenticationError):
                await bad_key.models.list()

    [usage] = usages
    streamed_record, json_record = sim.billing.records
    assert text == streamed_record["content"] and text
    assert usage.completion_tokens == tokens_in(text)
    assert (usage.model_extra or {})["total_cost_usd"] == streamed_record["total_cost_usd"]
    assert completion.choices[0].message.content == text
    assert completion.usage is not None
    assert (completion.usage.model_extra or {})["total_cost_usd"] == json_record["total_cost_usd"]


async def test_models_lists_the_price_table(session: aiohttp.ClientSession) -> None:
    async with running_simulator(SimulatorConfig()) as sim:
        async with session.get(f"{sim.base_url}/models", headers=AUTH) as resp:
            assert resp.status == 200
            body = await resp.json()
        async with session.get(f"{sim.base_url}/models") as resp:
            assert resp.status == 401
    assert [m["id"] for m in body["data"]] == list(DEFAULT_PRICES)


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer sk-123"}, {"Authorization": "Basic gp-123"}, {"Authorization": "Bearer "}],
)
async def test_bad_key_is_401(session: aiohttp.ClientSession, headers: dict[str, str]) -> None:
    async with running_simulator(SimulatorConfig()) as sim:
        data = orjson.dumps(chat())
        async with session.post(f"{sim.base_url}/chat/completions", data=data, headers=headers) as resp:
            assert resp.status == 401
            error = (await resp.json())["error"]
    assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key" and error["message"]
    assert sim.billing.records == [] and sim.billing.events["unauthorized"] == 1


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[1, 2]",
        orjson.dumps({"model": MODEL, "stream": True}),
        orjson.dumps({"model": MODEL, "messages": []}),
        orjson.dumps({"model": MODEL, "messages": "hi"}),
        orjson.dumps({"model": MODEL, "messages": ["hi"]}),
        orjson.dumps({"messages": [{"role": "user", "content": "hi"}]}),
        orjson.dumps(chat(max_tokens=0)),
        orjson.dumps(chat(max_tokens="5")),
        orjson.dumps(chat(stream="yes")),
    ],
)
async def test_bad_request_is_400(session: aiohttp.ClientSession, body: bytes) -> None:
    async with running_simulator(SimulatorConfig()) as sim:
        status, _, raw = await post(session, sim.base_url, body)
    assert status == 400
    error = orjson.loads(raw)["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_request_error" and error["message"]
    assert sim.billing.records == []


async def test_rate_limit_is_429_with_retry_after(session: aiohttp.ClientSession) -> None:
    async with running_simulator(SimulatorConfig(rate_limit_rate=1.0, retry_after_s=0.25)) as sim:
        status, headers, raw = await post(session, sim.base_url, chat())
    assert status == 429
    assert float(headers["Retry-After"]) == 0.25
    assert orjson.loads(raw)["error"]["code"] == "rate_limit_exceeded"
    assert sim.billing.records == [] and sim.billing.events["rate_limited"] == 1


async def test_server_errors_mix_the_configured_statuses(session: aiohttp.ClientSession) -> None:
    config = SimulatorConfig(seed=1, server_error_rate=1.0, server_error_statuses=(500, 502, 503, 504))
    async with running_simulator(config) as sim:
        statuses = [(await post(session, sim.base_url, chat()))[0] for _ in range(40)]
    assert set(statuses) == {500, 502, 503, 504} and sim.billing.records == []


async def test_server_error_is_500_before_streaming(session: aiohttp.ClientSession) -> None:
    async with running_simulator(SimulatorConfig(server_error_rate=1.0)) as sim:
        status, headers, raw = await post(session, sim.base_url, chat())
    assert status == 500 and headers["Content-Type"].startswith("application/json")
    assert orjson.loads(raw)["error"]["type"] == "server_error"
    assert sim.billing.records == []


async def test_reset_cuts_the_connection_and_bills_what_was_sent(session: aiohttp.ClientSession) -> None:
    async with running_simulator(SimulatorConfig(seed=9, reset_rate=1.0)) as sim:
        for i in range(5):
            headers = AUTH | {"X-Client-Request-Id": f"r{i}"}
            async with session.post(f"{sim.base_url}/chat/completions", json=chat(f"q{i}"), headers=headers) as r:
                assert r.status == 200
                raw, error = await read_until_error(r)
            assert isinstance(error, aiohttp.ClientPayloadError | aiohttp.ServerDisconnectedError)
            events, _ = parse_sse(raw)
            assert "[DONE]" not in events and all("usage" not in e for e in events if isinstance(e, dict))
            [record] = [r for r in sim.billing.records if r["client_request_id"] == f"r{i}"]
            received = content_of(events)
            assert record["status"] == "cut" and record["fault"] == "reset"
            assert record["content"] == received
            assert record["completion_tokens"] == tokens_in(received) >= 1
            assert record["total_cost_usd"] == expected_costs(record["prompt_tokens"], tokens_in(received))[2]
    assert sim.billing.completed_total_usd() == 0.0
    assert sim.billing.cut_total_usd() == math.fsum(r["total_cost_usd"] for r in sim.billing.records)


async def test_midstream_error_event_ends_the_stream(session: aiohttp.ClientSession) -> None:
    async with running_simulator(SimulatorConfig(seed=9, midstream_error_rate=1.0)) as sim:
        status, _, raw = await post(session, sim.base_url, chat())  # the body ends cleanly
    assert status == 200
    events, _ = parse_sse(raw)
    assert events[-1] == {"error": {"message": "upstream model error", "type": "server_error", "code": "server_error"}}
    assert "[DONE]" not in events
    assert all("usage" not in e for e in events if isinstance(e, dict))
    [record] = sim.billing.records
    assert record["status"] == "cut" and record["fault"] == "midstream_error"
    assert record["completion_tokens"] == tokens_in(content_of(events)) >= 1


async def test_stall_trips_the_client_idle_timeout_and_is_billed_cut(session: aiohttp.ClientSession) -> None:
    async with running_simulator(SimulatorConfig(seed=9, stall_rate=1.0, stall_s=10.0)) as sim:
        started = time.monotonic()
        async with session.post(
            f"{sim.base_url}/chat/completions",
            json=chat(),
            headers=AUTH,
            timeout=aiohttp.ClientTimeout(sock_read=0.2),
        ) as resp:
            raw, error = await read_until_error(resp)
        assert isinstance(error, TimeoutError)
        assert time.monotonic() - started < 2.0
        # Leaving the `async with` dropped the connection: the server notices within its poll.
        await wait_until(lambda: len(sim.billing.records) == 1)
        [record] = sim.billing.records
        assert record["status"] == "cut" and record["fault"] == "stall"
        assert record["completion_tokens"] == tokens_in(content_of(parse_sse(raw)[0])) >= 1


async def test_short_stall_then_the_stream_completes(session: aiohttp.ClientSession) -> None:
    async with running_simulator(SimulatorConfig(seed=9, stall_rate=1.0, stall_s=0.2)) as sim:
        started = time.monotonic()
        status, _, raw = await post(session, sim.base_url, chat())
        elapsed = time.monotonic() - started
    events, _ = parse_sse(raw)
    assert status == 200 and events[-1] == "[DONE]" and elapsed >= 0.2
    [record] = sim.billing.records
    assert record["status"] == "completed" and record["fault"] == "stall"
    assert record["content"] == content_of(events)


async def test_first_token_delay_comes_after_the_role_chunk(session: aiohttp.ClientSession) -> None:
    config = SimulatorConfig(first_token_delay_s=0.2, token_delay_s=0.01, max_completion_tokens=8)
    async with running_simulator(config) as sim:
        started = time.monotonic()
        async with session.post(f"{sim.base_url}/chat/completions", json=chat(), headers=AUTH) as resp:
            first = await resp.content.readany()
            first_at = time.monotonic() - started
            raw = first + await resp.read()
        elapsed = time.monotonic() - started
    events, _ = parse_sse(first)
    assert first_at < 0.2 and len(events) == 1 and content_of(events) == ""  # the role chunk alone
    assert elapsed >= 0.2 + 7 * 0.01
    assert parse_sse(raw)[0][-1] == "[DONE]"


async def test_shutdown_bills_open_streams_as_cut(session: aiohttp.ClientSession) -> None:
    async with running_simulator(SimulatorConfig(stall_rate=1.0, stall_s=30.0)) as sim:
        resp = await session.post(f"{sim.base_url}/chat/completions", json=chat(), headers=AUTH)
        raw = await resp.content.readany()
        assert sim.billing.records == []
        started = time.monotonic()
    assert time.monotonic() - started < 2.0  # open streams are cancelled, not waited for
    rest, error = await read_until_error(resp)
    resp.release()
    assert error is not None
    [record] = sim.billing.records
    assert record["status"] == "cut" and record["fault"] == "stall"
    assert record["completion_tokens"] == tokens_in(content_of(parse_sse(raw + rest)[0])) >= 1


async def test_client_leaving_mid_stream_is_billed_cut(session: aiohttp.ClientSession) -> None:
    config = SimulatorConfig(seed=1, token_delay_s=0.02, min_completion_tokens=50, max_completion_tokens=50)
    async with running_simulator(config) as sim:
        async with session.post(f"{sim.base_url}/chat/completions", json=chat(), headers=AUTH) as resp:
            raw = b""
            while raw.count(b'"content":"') < 4:  # the role chunk and three tokens
                raw += await resp.content.readany()
            resp.close()
        await wait_until(lambda: len(sim.billing.records) == 1)
    [record] = sim.billing.records
    assert record["status"] == "cut" and record["fault"] == "disconnect"
    assert 3 <= record["completion_tokens"] < 50
    assert record["content"].startswith(content_of(parse_sse(raw)[0]))


@pytest.mark.parametrize(
    ("options", "status_out", "code"),
    [({}, 429, "insufficient_quota"), ({"quota_status": 402}, 402, "insufficient_balance")],
)
async def test_spent_balance_gives_quota_429_or_the_old_402(
    session: aiohttp.ClientSession, options: dict[str, Any], status_out: int, code: str
) -> None:
    async with running_simulator(SimulatorConfig(balance_usd=1e-4, **options)) as sim:
        statuses = [(await post(session, sim.base_url, chat()))[0] for _ in range(3)]
        status, headers, raw = await post(session, sim.base_url, chat(stream=False))
    assert statuses[0] == 200 and status_out in statuses
    first_out = statuses.index(status_out)
    assert all(s == status_out for s in statuses[first_out:]) and status == status_out
    assert "Retry-After" not in headers  # waiting does not help: top up
    assert sim.billing.spent_usd >= 1e-4
    assert math.fsum(r["total_cost_usd"] for r in sim.billing.records[:-1]) < 1e-4  # stopped right after
    error = orjson.loads(raw)["error"]
    assert error["code"] == code and "top up" in error["message"]
    assert len(sim.billing.records) == first_out
    assert (
        sim.billing.responses[-1]["code"] == code and sim.billing.responses[-1]["request_id"] == headers["x-request-id"]
    )


async def test_fault_rates_hold_and_billing_matches_the_client(session: aiohttp.ClientSession) -> None:
    config = SimulatorConfig(
        seed=2024,
        rate_limit_rate=0.1,
        server_error_rate=0.1,
        reset_rate=0.1,
        midstream_error_rate=0.1,
        keepalive_rate=0.2,
    )
    total = 400
    outcomes: dict[str, str] = {}
    received: dict[str, int] = {}
    confirmed_costs: list[float] = []
    gate = asyncio.Semaphore(50)

    async def one(i: int) -> None:
        cid = f"c{i}"
        async with (
            gate,
            session.post(
                f"{sim.base_url}/chat/completions",
                json=chat(f"prompt number {i} " * (i % 7 + 1)),
                headers=AUTH | {"X-Client-Request-Id": cid},
            ) as resp,
        ):
            if resp.status != 200:
                outcomes[cid] = str(resp.status)
                return
            raw, error = await read_until_error(resp)
        events, _ = parse_sse(raw)
        received[cid] = tokens_in(content_of(events))
        if error is not None:
            outcomes[cid] = "reset"
        elif isinstance(events[-1], dict) and "error" in events[-1]:
            outcomes[cid] = "midstream"
        else:
            confirmed_costs.append(usage_of(events)["total_cost_usd"])
            outcomes[cid] = "completed"

    async with running_simulator(config) as sim:
        await asyncio.gather(*(one(i) for i in range(total)))

    counts = {kind: list(outcomes.values()).count(kind) for kind in ("429", "500", "reset", "midstream")}
    for kind, n in counts.items():
        assert 20 <= n <= 60, (kind, n)  # expected 40 each; the seed makes this exact, not flaky
    billing = sim.billing
    assert billing.events["rate_limited"] == counts["429"] and billing.events["server_error"] == counts["500"]
    assert billing.events["reset"] == counts["reset"]
    assert billing.events["midstream_error"] == counts["midstream"]
    assert len(billing.completed()) == len(confirmed_costs) == total - sum(counts.values())
    assert len(billing.cut()) == counts["reset"] + counts["midstream"]
    assert abs(billing.completed_total_usd() - math.fsum(confirmed_costs)) <= 1e-9
    for record in billing.records:
        assert record["completion_tokens"] == received[record["client_request_id"]]
    assert min(r["completion_tokens"] for r in billing.cut()) >= 1  # faults strike after a token
    assert set(billing.completed_count_by_client_id().values()) == {1}


async def test_fault_sequence_is_seeded(session: aiohttp.ClientSession) -> None:
    async def statuses(seed: int) -> list[int]:
        async with running_simulator(SimulatorConfig(seed=seed, rate_limit_rate=0.5)) as sim:
            return [(await post(session, sim.base_url, chat(stream=False)))[0] for _ in range(30)]

    first = await statuses(1)
    assert set(first) == {200, 429}
    assert await statuses(1) == first
    assert await statuses(2) != first


async def test_billing_log_lines_match_records(session: aiohttp.ClientSession, tmp_path: Path) -> None:
    log = tmp_path / "billing.jsonl"
    config = SimulatorConfig(seed=8, reset_rate=0.4, billing_log=str(log))
    async with running_simulator(config) as sim:
        for i in range(10):
            async with session.post(f"{sim.base_url}/chat/completions", json=chat(f"q{i}"), headers=AUTH) as resp:
                await read_until_error(resp)
        # Flushed per record: readable while the server still runs.
        lines = log.read_bytes().splitlines()
        assert len(lines) == 10
    assert [orjson.loads(line) for line in lines] == sim.billing.records
    assert {r["status"] for r in sim.billing.records} == {"completed", "cut"}
    async with running_simulator(dataclasses.replace(config, reset_rate=0.0)) as again:  # appends
        await post(session, again.base_url, chat("q0"))
    assert len(log.read_bytes().splitlines()) == 11


async def test_duplicate_client_ids_are_counted(session: aiohttp.ClientSession) -> None:
    async with running_simulator(SimulatorConfig()) as sim:
        for cid in ("a", "b", "a"):
            await post(session, sim.base_url, chat(), {"X-Client-Request-Id": cid})
        await post(session, sim.base_url, chat())
    counts = sim.billing.completed_count_by_client_id()
    assert counts["a"] == 2 and counts["b"] == 1 and counts[None] == 1


async def test_create_app_under_aiohttp_server(aiohttp_server: Any, session: aiohttp.ClientSession) -> None:
    app = create_app(SimulatorConfig(seed=6))
    server = await aiohttp_server(app)
    status, _, raw = await post(session, str(server.make_url("/v1")), chat())
    assert status == 200
    billing = app[BILLING_KEY]
    assert isinstance(billing, Billing)
    assert billing.records[0]["content"] == content_of(parse_sse(raw)[0])


async def test_serve_forever_reports_its_url_and_stops_on_cancel(session: aiohttp.ClientSession) -> None:
    urls: list[str] = []
    task = asyncio.create_task(serve_forever(SimulatorConfig(), "127.0.0.1", 0, urls.append))
    await wait_until(lambda: bool(urls))
    assert urls[0].startswith("http://127.0.0.1:") and urls[0].endswith("/v1")
    assert (await post(session, urls[0], chat()))[0] == 200
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(aiohttp.ClientConnectorError):
        await post(session, urls[0], chat())


def test_serve_process_prints_url_and_exits_cleanly_on_sigterm(tmp_path: Path) -> None:
    log = tmp_path / "billing.jsonl"
    code = (
        "from batchgate.simulator import SimulatorConfig, serve\n"
        f"serve(SimulatorConfig(billing_log={str(log)!r}), "
        "on_ready=lambda url: print('listening on', url, flush=True))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:")
        url = line.split()[-1]

        async def one() -> int:
            async with aiohttp.ClientSession() as client_session:
                return (await post(client_session, url, chat()))[0]

        assert asyncio.run(one()) == 200
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert len(log.read_bytes().splitlines()) == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"reset_rate": 1.5},
        {"keepalive_rate": -0.1},
        {"reset_rate": 0.6, "rate_limit_rate": 0.6},
        {"min_completion_tokens": 10, "max_completion_tokens": 5},
        {"min_completion_tokens": 0},
        {"tokens_per_chunk": 0},
        {"stall_s": -1.0},
        {"fault_rate": 1.5},
        {"server_error_statuses": (418,)},
        {"quota_status": 400},
        {"key_concurrency_limit": 0},
        {"price_step_every": 0},
        {"growth_factor": 0.5},
        {"keep_records": -1},
    ],
)
def test_bad_config_is_rejected(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SimulatorConfig(**kwargs)


# -- GonkaGate as documented: request ids, string codes, the catalog, the account, per-key limits ----


async def get(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[int, Mapping[str, str], Any]:
    async with session.get(url, headers=headers) as resp:
        return resp.status, resp.headers, orjson.loads(await resp.read())


def root_of(sim: Any) -> str:
    return str(sim.base_url).removesuffix("/v1")


async def test_every_response_has_a_unique_request_id_matched_by_the_billing(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    log = tmp_path / "billing.jsonl"
    config = SimulatorConfig(seed=3, rate_limit_rate=0.3, server_error_rate=0.2, billing_log=str(log))
    ids: list[str] = []
    async with running_simulator(config) as sim:
        for i in range(30):
            status, headers, _ = await post(session, sim.base_url, chat(f"q{i}", stream=i % 2 == 0))
            ids.append(headers["x-request-id"])
            assert status in (200, 429, 500)
        for url, headers in (
            (f"{sim.base_url}/models", AUTH),
            (f"{sim.base_url}/models", {}),
            (f"{root_of(sim)}/api/v1/whoami", AUTH),
            (f"{root_of(sim)}/api/v1/public/pricing", {}),
            (f"{sim.base_url}/embeddings", AUTH),
        ):
            async with session.get(url, headers=headers) as resp:
                ids.append(resp.headers["x-request-id"])
        async with session.post(f"{sim.base_url}/chat/completions", data=b"{") as resp:  # no key
            assert resp.status == 401
            ids.append(resp.headers["x-request-id"])
    assert len(set(ids)) == len(ids) and all(i.startswith("req_") for i in ids)
    billing = sim.billing
    assert [r["request_id"] for r in billing.responses] == ids[:30] + ids[-1:]
    assert {r["status"] for r in billing.responses} == {200, 401, 429, 500}
    for answer in billing.responses:
        record = billing.record_for(answer["request_id"])
        assert (record is not None) == (answer["status"] == 200)
    assert [orjson.loads(line)["request_id"] for line in log.read_bytes().splitlines()] == [
        r["request_id"] for r in billing.records
    ]


@pytest.mark.parametrize(
    ("config", "body", "status", "code"),
    [
        ({}, b"{not json", 400, "invalid_request_error"),
        ({"strict_models": True}, chat(model="qwen/qwen3-32b-fp8"), 404, "model_not_found"),  # case matters
        ({"balance_usd": 0.0}, chat(), 429, "insufficient_quota"),
        ({"balance_usd": 0.0, "quota_status": 402}, chat(), 402, "insufficient_balance"),
        ({"rate_limit_rate": 1.0}, chat(), 429, "rate_limit_exceeded"),
        ({"rate_limit_rate": 1.0, "rate_limit_code": "transfer_agent_capacity_reached"}, chat(), 429,
         "transfer_agent_capacity_reached"),
        ({"server_error_rate": 1.0}, chat(), 500, "server_error"),
        ({"server_error_rate": 1.0, "server_error_statuses": (503,)}, chat(), 503, "service_unavailable"),
        ({"server_error_rate": 1.0, "server_error_statuses": (504,)}, chat(), 504, "gateway_timeout"),
        ({"account_deactivated": True}, chat(), 403, "account_deactivated"),
        ({"key_limits": True, "key_burst_limit": 1}, chat(), 429, "rate_limit_exceeded"),  # the second request
    ],
)  # fmt: skip
async def test_error_bodies_carry_string_codes(
    session: aiohttp.ClientSession, config: dict[str, Any], body: Any, status: int, code: str
) -> None:
    async with running_simulator(SimulatorConfig(**config)) as sim:
        if "key_limits" in config:
            assert (await post(session, sim.base_url, body))[0] == 200
        got, headers, raw = await post(session, sim.base_url, body)
    error = orjson.loads(raw)["error"]
    assert (got, error["code"]) == (status, code)
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    assert headers["Content-Type"].startswith("application/json") and headers["x-request-id"].startswith("req_")
    assert sim.billing.responses[-1] == {
        "request_id": headers["x-request-id"],
        "client_request_id": None,
        "status": status,
        "code": code,
    }


async def test_unknown_models_are_priced_by_default_and_404_when_strict(session: aiohttp.ClientSession) -> None:
    async with running_simulator(SimulatorConfig()) as lenient:
        status, _, raw = await post(session, lenient.base_url, chat(stream=False, model="made-up-model"))
    assert status == 200
    usage = orjson.loads(raw)["usage"]
    assert (
        usage["total_cost_usd"]
        == SimulatorConfig().costs("made-up-model", usage["prompt_tokens"], usage["completion_tokens"])[2]
    )
    async with running_simulator(SimulatorConfig(strict_models=True)) as strict:
        for model in ("qwen/qwen3-235b-a22b-instruct-2507-fp8", "moonshotai/Kimi-K2.6", MODEL):
            assert (await post(session, strict.base_url, chat(model=model)))[0] == 200
        status, _, raw = await post(session, strict.base_url, chat(model="made-up-model"))
    assert status == 404 and "made-up-model" in orjson.loads(raw)["error"]["message"]
    assert strict.billing.events["model_not_found"] == 1 and len(strict.billing.records) == 3


async def test_models_catalog_shape_loading_and_empty(session: aiohttp.ClientSession) -> None:
    async with running_simulator(SimulatorConfig(models_unavailable=2)) as sim:
        first = [await get(session, f"{sim.base_url}/models", AUTH) for _ in range(3)]
    assert [s for s, _, _ in first] == [503, 503, 200]
    assert first[0][2]["error"]["code"] == "service_unavailable"
    body = first[2][2]
    assert body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    assert ids == list(DEFAULT_PRICES)
    for model_id in ("qwen/qwen3-235b-a22b-instruct-2507-fp8", "moonshotai/Kimi-K2.6", "minimaxai/minimax-m2.7"):
        assert model_id in ids
    assert all({"id", "object", "created", "owned_by"} <= set(m) and m["object"] == "model" for m in body["data"])
    async with running_simulator(SimulatorConfig(models_unavailable=-1)) as down:
        assert {(await get(session, f"{down.base_url}/models", AUTH))[0] for _ in range(5)} == {503}
    async with running_simulator(SimulatorConfig(models_empty=True)) as empty:
        assert (await get(session, f"{empty.base_url}/models", AUTH))[2] == {"object": "list", "data": []}


async def test_whoami_reports_the_balance_left_as_a_string(session: aiohttp.ClientSession) -> None:
    async with running_simulator(SimulatorConfig(balance_usd=0.01)) as sim:
        url = f"{root_of(sim)}/api/v1/whoami"
        status, _, before = await get(session, url, AUTH)
        await post(session, sim.base_url, chat())
        _, _, after = await get(session, url, AUTH)
        unauthorized, _, denied = await get(session, url, {"Authorization": "Bearer sk-nope"})
    assert status == 200 and before["success"] is True
    assert before["data"]["balance"] == {"usd": "0.010000", "status": "active"}
    assert before["data"]["apiKey"]["status"] == "active"
    left = after["data"]["balance"]["usd"]
    assert isinstance(left, str) and float(left) == pytest.approx(0.01 - sim.billing.spent_usd, abs=1e-6)
    assert unauthorized == 401 and denied["error"]["code"] == "invalid_api_key"
    assert denied["success"] is False and denied["requestId"].startswith("req_")
    assert "gp-test" not in orjson.dumps(after).decode()  # the key is never echoed
    async with running_simulator(SimulatorConfig(balance_usd=1e-5)) as spent:
        await post(session, spent.base_url, chat())
        assert (await get(session, f"{root_of(spent)}/api/v1/whoami", AUTH))[2]["data"]["balance"] == {
            "usd": "0.000000",
            "status": "suspended",
        }
    async with running_simulator(SimulatorConfig(account_deactivated=True)) as off:
        status, _, body = await get(session, f"{root_of(off)}/api/v1/whoami", AUTH)
        assert status == 200 and body["data"]["balance"]["status"] == "suspended"
        assert (await get(session, f"{off.base_url}/models", AUTH))[0] == 403
    async with running_simulator(SimulatorConfig(account_endpoints=False)) as bare:
        assert (await get(session, f"{root_of(bare)}/api/v1/whoami", AUTH))[0] == 404
        assert (await get(session, f"{root_of(bare)}/api/v1/public/pricing"))[0] == 404


async def test_public_pricing_per_model_and_after_a_price_step(session: aiohttp.ClientSession) -> None:
    config = SimulatorConfig(price_step_every=2, price_step_factor=3.0)
    async with running_simulator(config) as sim:
        url = f"{root_of(sim)}/api/v1/public/pricing"
        status, _, before = await get(session, url)  # no key needed
        for _ in range(2):
            await post(session, sim.base_url, chat())
        _, _, after = await get(session, url)
    assert status == 200 and before["success"] is True
    assert before["data"]["fees"] == {"platformFeeRate": 0.1}
    models = {m["id"]: m["usdPer1MTokens"] for m in before["data"]["models"]}
    assert list(models) == list(DEFAULT_PRICES)
    for model_id, price in models.items():
        assert price["network"] == DEFAULT_PRICES[model_id][1]
        assert price["platformFee"] == pytest.approx(price["network"] * 0.1)
        assert price["total"] == pytest.approx(price["network"] * 1.1)
    stepped = {m["id"]: m["usdPer1MTokens"] for m in after["data"]["models"]}
    assert stepped[MODEL]["network"] == pytest.approx(3 * models[MODEL]["network"])


async def test_key_concurrency_limit_answers_429_until_a_slot_frees(session: aiohttp.ClientSession) -> None:
    config = SimulatorConfig(
        key_limits=True,
        key_concurrency_limit=3,
        limit_retry_after_s=0.5,
        token_delay_s=0.02,
        min_completion_tokens=40,
        max_completion_tokens=40,
    )
    async with running_simulator(config) as sim:
        url = f"{sim.base_url}/chat/completions"
        held = [await session.post(url, json=chat(f"q{i}"), headers=AUTH) for i in range(3)]
        assert [r.status for r in held] == [200, 200, 200]
        status, headers, raw = await post(session, sim.base_url, chat())
        assert status == 429 and float(headers["Retry-After"]) == 0.5
        assert orjson.loads(raw)["error"]["code"] == "rate_limit_exceeded"
        # A client leaving frees its slot.
        held[0].close()
        await wait_until(lambda: len(sim.billing.cut()) == 1)
        assert (await post(session, sim.base_url, chat(max_tokens=1)))[0] == 200
        # Another key has its own limit.
        assert (await post(session, sim.base_url, chat(), {"Authorization": "Bearer gp-other"}))[0] == 200
        for resp in held[1:]:
            assert parse_sse(await resp.read())[0][-1] == "[DONE]"
            resp.release()
        # The slot is back before the client sees [DONE]: a client that waits for its answers never meets a 429.
        gate = asyncio.Semaphore(3)

        async def one(i: int) -> int:
            async with gate:
                return (await post(session, sim.base_url, chat(f"r{i}", max_tokens=2)))[0]

        assert set(await asyncio.gather(*(one(i) for i in range(60)))) == {200}
    assert sim.billing.events["key_concurrency_limited"] == 1


async def test_key_request_windows_answer_429_with_whole_second_retry_after(session: aiohttp.ClientSession) -> None:
    config = SimulatorConfig(key_limits=True, key_burst_limit=5, key_burst_window_s=0.4, key_rpm_limit=8)
    async with running_simulator(config) as sim:
        burst = [(await post(session, sim.base_url, chat()))[:2] for _ in range(6)]
        assert [s for s, _ in burst] == [200] * 5 + [429]
        assert burst[-1][1]["Retry-After"] == "1"  # 0.4 s left, rounded up to whole seconds
        await asyncio.sleep(0.45)
        minute = [(await post(session, sim.base_url, chat()))[:2] for _ in range(4)]
        # 8 per minute: three more pass, then the minute window is full for ~60 s.
        assert [s for s, _ in minute] == [200, 200, 200, 429]
        assert 55 <= int(minute[-1][1]["Retry-After"]) <= 60
        assert (await post(session, sim.base_url, chat(), {"Authorization": "Bearer gp-fresh"}))[0] == 200
    assert sim.billing.events["key_rate_limited"] == 2
    assert len(sim.billing.records) == 9  # refused requests cost nothing


async def test_key_limits_are_off_by_default(session: aiohttp.ClientSession) -> None:
    config = SimulatorConfig(token_delay_s=0.01, min_completion_tokens=10, max_completion_tokens=10)
    async with running_simulator(config) as sim:
        statuses = await asyncio.gather(*(post(session, sim.base_url, chat(f"q{i}")) for i in range(120)))
    assert {s for s, _, _ in statuses} == {200}
    assert len(sim.billing.completed()) == 120


async def test_the_documented_key_limits_are_the_defaults() -> None:
    config = SimulatorConfig(key_limits=True)
    assert (config.key_concurrency_limit, config.key_rpm_limit, config.key_burst_limit) == (50, 600, 200)
    assert config.key_burst_window_s == 10.0


# -- reasoning, tool calls, several choices, where usage goes ---------------------------------------

REASONER = "moonshotai/Kimi-K2.6"
TOOLS = [
    {"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}},
]


def reasoning_of(events: list[Event], index: int = 0) -> str:
    return "".join(d.get("reasoning_content") or "" for d in deltas(events, index))


def tool_calls_of(events: list[Event], index: int = 0) -> list[dict[str, Any]]:
    """Tool calls assembled from their streamed pieces, as the OpenAI format asks."""
    calls: dict[int, dict[str, Any]] = {}
    for delta in deltas(events, index):
        for piece in delta.get("tool_calls") or ():
            call = calls.setdefault(piece["index"], {"index": piece["index"], "function": {"arguments": ""}})
            for key in ("id", "type"):
                if key in piece:
                    call[key] = piece[key]
            if "name" in piece["function"]:
                call["function"]["name"] = piece["function"]["name"]
            call["function"]["arguments"] += piece["function"].get("arguments", "")
    return [calls[i] for i in sorted(calls)]


async def test_reasoning_model_streams_reasoning_before_content(session: aiohttp.ClientSession) -> None:
    async with running_simulator(SimulatorConfig(seed=4)) as sim:
        _, _, raw = await post(session, sim.base_url, chat(model=REASONER))
        _, _, capped = await post(session, sim.base_url, chat(model=REASONER, max_tokens=3))
        _, _, as_json = await post(session, sim.base_url, chat(model=REASONER, stream=False))
    events, _ = parse_sse(raw)
    kinds = ["reasoning" if d.get("reasoning_content") else "content" for d in deltas(events) if "role" not in d]
    assert kinds[0] == "reasoning" and kinds[-1] == "content"
    assert kinds == sorted(kinds, key=lambda k: k != "reasoning")  # all reasoning first
    assert all(d["content"] is None for d in deltas(events) if d.get("reasoning_content"))
    reasoning, content = reasoning_of(events), content_of(events)
    usage = usage_of(events)
    assert usage["completion_tokens"] == tokens_in(reasoning) + tokens_in(content)  # reasoning is billed
    record = sim.billing.records[0]
    assert (record["reasoning"], record["content"]) == (reasoning, content)
    assert (
        record["total_cost_usd"]
        == SimulatorConfig().costs(REASONER, usage["prompt_tokens"], usage["completion_tokens"])[2]
    )
    capped_events = parse_sse(capped)[0]
    assert usage_of(capped_events)["completion_tokens"] == 3 and finish_of(capped_events) == "length"
    assert content_of(capped_events) == "" and reasoning_of(capped_events) == " ".join(reasoning.split(" ")[:3]) + " "
    message = orjson.loads(as_json)["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == (reasoning, content)


async def test_tools_give_tool_call_deltas(session: aiohttp.ClientSession) -> None:
    async with running_simulator(SimulatorConfig(seed=2)) as sim:
        answers = [parse_sse((await post(session, sim.base_url, chat(f"q{i}", tools=TOOLS)))[2])[0] for i in range(8)]
        forced = {"type": "function", "function": {"name": "lookup"}}
        _, _, raw_forced = await post(session, sim.base_url, chat(tools=TOOLS, tool_choice=forced))
        _, _, raw_none = await post(session, sim.base_url, chat(tools=TOOLS, tool_choice="none"))
        _, _, as_json = await post(session, sim.base_url, chat("q0", tools=TOOLS, stream=False))
        bad, _, _ = await post(session, sim.base_url, chat(tools=[{"type": "function"}]))
    counts = set()
    for i, events in enumerate(answers):
        calls = tool_calls_of(events)
        counts.add(len(calls))
        assert finish_of(events) == "tool_calls" and content_of(events) == ""
        for j, call in enumerate(calls):
            assert call["index"] == j and call["type"] == "function" and call["id"].startswith("call_")
            assert call["function"]["name"] in {"search", "lookup"}
            assert orjson.loads(call["function"]["arguments"])["limit"] == j + 1  # the pieces join to JSON
        record = sim.billing.records[i]
        assert record["tool_calls"] == [{k: c[k] for k in ("index", "id", "type", "function")} for c in calls]
        assert (
            usage_of(events)["completion_tokens"]
            == record["completion_tokens"]
            == sum(1 + math.ceil(len(c["function"]["arguments"]) / 12) for c in calls)
        )
    assert counts == {1, 2}  # parallel calls happen
    assert {c["function"]["name"] for c in tool_calls_of(parse_sse(raw_forced)[0])} == {"lookup"}
    none_events = parse_sse(raw_none)[0]
    assert tool_calls_of(none_events) == [] and content_of(none_events) and finish_of(none_events) == "stop"
    choice = orjson.loads(as_json)["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert choice["message"]["tool_calls"] == tool_calls_of(answers[0])
    assert bad == 400


async def test_n_choices_stream_interleaved_with_their_own_index(session: aiohttp.ClientSession) -> None:
    async with running_simulator(SimulatorConfig(seed=6)) as sim:
        _, _, single = await post(session, sim.base_url, chat())
        _, _, raw = await post(session, sim.base_url, chat(n=3))
        _, _, as_json = await post(session, sim.base_url, chat(n=3, stream=False))
        bad, _, _ = await post(session, sim.base_url, chat(n=0))
    events = parse_sse(raw)[0]
    texts = [content_of(events, i) for i in range(3)]
    assert texts[0] == content_of(parse_sse(single)[0])  # choice 0 is the n=1 answer
    assert len(set(texts)) == 3 and all(finish_of(events, i) == "stop" for i in range(3))
    order = [
        c["index"] for e in events if isinstance(e, dict) for c in e.get("choices", ()) if c["delta"].get("content")
    ]
    assert order[:3] == [0, 1, 2]  # interleaved, not one after the other
    usage = usage_of(events)
    assert usage["completion_tokens"] == sum(tokens_in(t) for t in texts)
    record = sim.billing.records[1]
    assert record["content"] == texts[0] and [c["content"] for c in record["choices"]] == texts
    assert [c["index"] for c in record["choices"]] == [0, 1, 2] and record["completion_tokens"] == usage[
        "completion_tokens"
    ]
    body = orjson.loads(as_json)
    assert [c["message"]["content"] for c in body["choices"]] == texts
    assert bad == 400


@pytest.mark.parametrize("rate", [0.0, 1.0])
async def test_usage_in_the_finish_chunk_or_in_its_own_chunk(session: aiohttp.ClientSession, rate: float) -> None:
    async with running_simulator(SimulatorConfig(seed=1, separate_usage_rate=rate)) as sim:
        for body in (chat(), chat(model=REASONER, tools=TOOLS, n=2)):
            events = parse_sse((await post(session, sim.base_url, body))[2])[0]
            *_, last_chunk, done = events
            assert done == "[DONE]" and isinstance(last_chunk, dict)
            [with_usage] = [e for e in events if isinstance(e, dict) and "usage" in e]
            assert with_usage is last_chunk
            if rate == 1.0:
                assert last_chunk["choices"] == []
                before = events[-3]
                assert isinstance(before, dict) and before["choices"][0]["finish_reason"] and "usage" not in before
            else:
                assert last_chunk["choices"][0]["finish_reason"] and last_chunk["choices"][0]["delta"] == {}
            assert with_usage["usage"]["total_cost_usd"] == sim.billing.records[-1]["total_cost_usd"]


async def test_usage_position_is_seeded_per_request(session: aiohttp.ClientSession) -> None:
    async def positions(seed: int) -> list[bool]:
        async with running_simulator(SimulatorConfig(seed=seed)) as sim:
            out = []
            for i in range(24):
                events = parse_sse((await post(session, sim.base_url, chat(f"q{i}")))[2])[0]
                out.append(any(isinstance(e, dict) and e["choices"] == [] for e in events))
            return out

    first = await positions(1)
    assert set(first) == {True, False}
    assert await positions(1) == first and await positions(2) != first


@pytest.mark.parametrize("rate", [0.0, 1.0])
async def test_openai_sdk_reads_reasoning_tool_calls_and_several_choices(rate: float) -> None:
    async with (
        running_simulator(SimulatorConfig(seed=5, separate_usage_rate=rate)) as sim,
        openai.AsyncOpenAI(base_url=sim.base_url, api_key="gp-test", max_retries=0) as client,
    ):
        messages: Any = [{"role": "user", "content": "Think, then look it up"}]
        stream = await client.chat.completions.create(model=REASONER, messages=messages, stream=True, tools=TOOLS, n=2)
        reasoning: dict[int, str] = collections.defaultdict(str)
        args: dict[tuple[int, int], str] = collections.defaultdict(str)
        names: dict[tuple[int, int], str] = {}
        finish: dict[int, str] = {}
        usages = []
        async for chunk in stream:
            for choice in chunk.choices:
                reasoning[choice.index] += (choice.delta.model_extra or {}).get("reasoning_content") or ""
                for call in choice.delta.tool_calls or ():
                    assert call.function is not None
                    if call.function.name:
                        names[choice.index, call.index] = call.function.name
                    args[choice.index, call.index] += call.function.arguments or ""
                if choice.finish_reason:
                    finish[choice.index] = choice.finish_reason
            if chunk.usage:
                usages.append(chunk.usage)
        completion = await client.chat.completions.create(model=REASONER, messages=messages, tools=TOOLS, n=2)

    streamed, answered = sim.billing.records
    [usage] = usages
    assert usage.completion_tokens == streamed["completion_tokens"]
    assert finish == {0: "tool_calls", 1: "tool_calls"}
    for i, choice in enumerate(streamed["choices"]):
        assert reasoning[i] == choice["reasoning"] and reasoning[i]
        assert [args[i, c["index"]] for c in choice["tool_calls"]] == [
            c["function"]["arguments"] for c in choice["tool_calls"]
        ]
        assert [names[i, c["index"]] for c in choice["tool_calls"]] == [
            c["function"]["name"] for c in choice["tool_calls"]
        ]
    assert [c.index for c in completion.choices] == [0, 1]
    for choice, billed in zip(completion.choices, answered["choices"], strict=True):
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        assert [c.function.arguments for c in choice.message.tool_calls] == [  # type: ignore[union-attr]
            c["function"]["arguments"] for c in billed["tool_calls"]
        ]
        assert (choice.message.model_extra or {})["reasoning_content"] == billed["reasoning"]


# -- faults: one total rate, and faults inside rich answers -----------------------------------------


async def test_fault_rate_is_a_total_split_over_the_five_faults(session: aiohttp.ClientSession) -> None:
    config = SimulatorConfig(seed=77, fault_rate=0.2, stall_s=0.0)
    assert config.fault_rates() == dict.fromkeys(
        ("rate_limited", "server_error", "reset", "stall", "midstream_error"), pytest.approx(0.04)
    )
    total = 1000
    async with running_simulator(config) as sim:
        gate = asyncio.Semaphore(50)

        async def one(i: int) -> None:
            async with gate, session.post(f"{sim.base_url}/chat/completions", json=chat(f"p{i}"), headers=AUTH) as r:
                await read_until_error(r)

        await asyncio.gather(*(one(i) for i in range(total)))
    events = sim.billing.events
    kinds = ("rate_limited", "server_error", "reset", "stall", "midstream_error")
    assert 150 <= sum(events[k] for k in kinds) <= 250  # 20% in all, not 20% each
    for kind in kinds:
        assert 20 <= events[kind] <= 65, (kind, events[kind])
    with pytest.raises(ValueError):
        SimulatorConfig(fault_rate=0.6, reset_rate=0.5)
    with pytest.raises(ValueError):
        SimulatorConfig(fault_rate=1.5)


@pytest.mark.parametrize(
    ("fault", "body"),
    [
        ("reset_rate", chat(model=REASONER)),
        ("midstream_error_rate", chat(tools=TOOLS)),
        ("reset_rate", chat(n=3)),
    ],
)
async def test_faults_in_rich_answers_bill_what_was_sent(
    session: aiohttp.ClientSession, fault: str, body: dict[str, Any]
) -> None:
    async with running_simulator(SimulatorConfig(seed=12, **{fault: 1.0})) as sim:
        for i in range(4):
            body = {**body, "messages": [{"role": "user", "content": f"question {i}"}]}
            async with session.post(f"{sim.base_url}/chat/completions", json=body, headers=AUTH) as resp:
                raw, _ = await read_until_error(resp)
            events, _ = parse_sse(raw)
            assert "[DONE]" not in events and not any(isinstance(e, dict) and "usage" in e for e in events)
            record = sim.billing.records[-1]
            assert record["status"] == "cut" and record["fault"] == fault.removesuffix("_rate")
            sent = sum(
                tokens_in(content_of(events, c)) + tokens_in(reasoning_of(events, c)) for c in range(body.get("n", 1))
            )
            calls = tool_calls_of(events)
            sent += sum(1 + math.ceil(len(c["function"]["arguments"]) / 12) for c in calls)
            assert record["completion_tokens"] == sent >= 1
            assert record["content"] == content_of(events) and (record["reasoning"] or "") == reasoning_of(events)
            assert (record["tool_calls"] or []) == [
                {k: c[k] for k in ("index", "id", "type", "function")} for c in calls
            ]
            full = SimulatorConfig(seed=12).costs(record["model"], record["prompt_tokens"], sent)[2]
            assert record["total_cost_usd"] == full


# -- money-test options: prices that step up, answers that grow --------------------------------------


async def test_price_steps_every_n_billed_requests(session: aiohttp.ClientSession) -> None:
    config = SimulatorConfig(seed=1, price_step_every=3, price_step_factor=2.0)
    async with running_simulator(config) as sim:
        usages = [usage_of(parse_sse((await post(session, sim.base_url, chat(f"q{i}")))[2])[0]) for i in range(8)]
    factors = [r["price_factor"] for r in sim.billing.records]
    assert factors == [1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 4.0, 4.0]
    for usage, record, factor in zip(usages, sim.billing.records, factors, strict=True):
        expected = config.costs(MODEL, usage["prompt_tokens"], usage["completion_tokens"], factor)
        assert (usage["base_cost_usd"], usage["platform_fee_usd"], usage["total_cost_usd"]) == expected
        assert record["total_cost_usd"] == usage["total_cost_usd"]
    assert sim.billing.billed_usd() == math.fsum(u["total_cost_usd"] for u in usages)


async def test_price_in_force_when_a_request_was_accepted_is_what_it_pays(session: aiohttp.ClientSession) -> None:
    config = SimulatorConfig(price_step_every=1, price_step_factor=10.0, token_delay_s=0.01)
    async with running_simulator(config) as sim:
        # Four streams accepted before any is billed: all pay the first price.
        await asyncio.gather(*(post(session, sim.base_url, chat(f"q{i}")) for i in range(4)))
        await post(session, sim.base_url, chat("later"))
    assert [r["price_factor"] for r in sim.billing.records] == [1.0] * 4 + [1e4]


async def test_ignore_max_tokens_answers_past_the_cap(session: aiohttp.ClientSession) -> None:
    async with running_simulator(SimulatorConfig(seed=3, ignore_max_tokens=True)) as sim:
        events = parse_sse((await post(session, sim.base_url, chat(max_tokens=2)))[2])[0]
    assert usage_of(events)["completion_tokens"] >= 8 and finish_of(events) == "stop"
    assert sim.billing.records[0]["completion_tokens"] == tokens_in(content_of(events))


async def test_long_answers_run_to_max_tokens_or_the_default_cap(session: aiohttp.ClientSession) -> None:
    config = SimulatorConfig(seed=3, long_answer_rate=1.0, default_max_tokens=300)
    async with running_simulator(config) as sim:
        uncapped = parse_sse((await post(session, sim.base_url, chat()))[2])[0]
        capped = parse_sse((await post(session, sim.base_url, chat(max_tokens=100)))[2])[0]
    assert usage_of(uncapped)["completion_tokens"] == 300 and finish_of(uncapped) == "length"
    assert usage_of(capped)["completion_tokens"] == 100 and finish_of(capped) == "length"
    assert content_of(uncapped).startswith(content_of(capped))
    async with running_simulator(SimulatorConfig(seed=3, long_answer_rate=0.3)) as some:
        lengths = [
            orjson.loads((await post(session, some.base_url, chat(f"q{i}", stream=False)))[2])["usage"][
                "completion_tokens"
            ]
            for i in range(40)
        ]
    long = [n for n in lengths if n == 4096]  # GonkaGate's default max_tokens
    assert 4 <= len(long) <= 24 and all(n <= 64 for n in lengths if n != 4096)


async def test_answers_grow_every_n_requests(session: aiohttp.ClientSession) -> None:
    config = SimulatorConfig(
        seed=2, growth_every=2, growth_factor=3.0, min_completion_tokens=10, max_completion_tokens=10
    )
    async with running_simulator(config) as sim:
        lengths = [
            usage_of(parse_sse((await post(session, sim.base_url, chat(f"q{i}")))[2])[0])["completion_tokens"]
            for i in range(8)
        ]
        capped = usage_of(parse_sse((await post(session, sim.base_url, chat(max_tokens=50)))[2])[0])
    assert lengths == [10, 10, 30, 30, 90, 90, 270, 270]
    assert capped["completion_tokens"] == 50


def test_cli_simulate_flags_reach_the_server(tmp_path: Path) -> None:
    log = tmp_path / "billing.jsonl"
    cmd = [
        sys.executable, "-m", "batchgate", "simulate", "--billing-log", str(log), "--strict-models",
        "--quota-status", "402", "--balance", "0.00001", "--key-limits", "--key-burst-limit", "3",
        "--separate-usage-rate", "1", "--models-empty",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().split()[-1]

        async def probe() -> list[int]:
            async with aiohttp.ClientSession() as s:
                statuses = [(await post(s, url, chat(model="no/such-model")))[0]]
                _, _, raw = await post(s, url, chat())
                statuses.append(500 if b'"choices":[],"usage"' not in raw else 200)
                statuses += [(await post(s, url, chat()))[0] for _ in range(2)]
                statuses.append((await get(s, f"{url}/models", AUTH))[2]["data"] == [])
                return statuses

        assert asyncio.run(probe()) == [404, 200, 402, 429, True]
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 5) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


def mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Usually a valid value, sometimes any JSON at all."""
    return st.integers(0, 7).flatmap(lambda k: valid if k else _json)


_tool = st.fixed_dictionaries(
    {"type": mostly(st.just("function")), "function": st.fixed_dictionaries({"name": mostly(st.sampled_from("fg"))})}
)
_bodies = st.fixed_dictionaries(
    {
        "model": mostly(st.sampled_from([MODEL, REASONER, "x"])),
        "messages": mostly(
            st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": mostly(st.text())}), min_size=1)
        ),
    },
    optional={
        "stream": mostly(st.booleans()),
        "n": mostly(st.integers(1, 4)),
        "max_tokens": mostly(st.integers(1, 6)),
        "tools": mostly(st.lists(_tool, min_size=1, max_size=3)),
        "tool_choice": mostly(st.sampled_from(["auto", "none", "required"])),
    },
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bodies=st.lists(_bodies, min_size=1, max_size=8))
def test_any_body_gets_an_answer_or_a_400_with_a_string_code(bodies: list[dict[str, Any]]) -> None:
    async def run() -> None:
        async with running_simulator(SimulatorConfig(tokens_per_chunk=2)) as sim, aiohttp.ClientSession() as s:
            # Each body as given and, when it does not say, as a stream too.
            for body in bodies + [{**b, "stream": True} for b in bodies if "stream" not in b]:
                status, headers, raw = await post(s, sim.base_url, body)
                assert headers["x-request-id"].startswith("req_")
                if status == 400:
                    assert orjson.loads(raw)["error"]["code"] == "invalid_request_error"
                    continue
                assert status == 200, raw
                if body.get("stream") is True:
                    events = parse_sse(raw)[0]
                    assert usage_of(events)["completion_tokens"] == sim.billing.records[-1]["completion_tokens"]
                else:
                    answer = orjson.loads(raw)
                    assert len(answer["choices"]) == body.get("n", 1) or body.get("n") is None

    asyncio.run(run())


async def test_rich_answers_keep_their_content_under_delays_keepalives_and_a_stall(
    session: aiohttp.ClientSession,
) -> None:
    body = chat("Plan a trip", model=REASONER, tools=TOOLS, n=2)
    async with running_simulator(SimulatorConfig(seed=8, separate_usage_rate=0.0)) as fast:
        reference = parse_sse((await post(session, fast.base_url, body))[2])[0]
    config = SimulatorConfig(
        seed=8,
        separate_usage_rate=0.0,
        token_delay_s=0.002,
        first_token_delay_s=0.05,
        keepalive_rate=0.5,
        tokens_per_chunk=2,
        stall_rate=1.0,
        stall_s=0.1,
    )
    async with running_simulator(config) as slow:
        started = time.monotonic()
        status, _, raw = await post(session, slow.base_url, body)
        elapsed = time.monotonic() - started
    events, comments = parse_sse(raw)
    assert status == 200 and comments >= 1 and elapsed >= 0.15
    for i in range(2):
        assert content_of(events, i) == content_of(reference, i)
        assert reasoning_of(events, i) == reasoning_of(reference, i)
        assert tool_calls_of(events, i) == tool_calls_of(reference, i)
        assert finish_of(events, i) == finish_of(reference, i)
    assert usage_of(events) == usage_of(reference)
    [record] = slow.billing.records
    assert record["status"] == "completed" and record["fault"] == "stall"
    assert record["choices"] == fast.billing.records[0]["choices"]


def test_run_simulate_meets_the_per_key_limits(tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(f'{{"id": "p{i}", "prompt": "question {i}", "model": "{MODEL}"}}\n' for i in range(56)))
    res = subprocess.run(
        [sys.executable, "-m", "batchgate", "run", str(prompts), "--simulate", "--concurrency", "56",
         "--sim-token-delay", "0.02", "--json", "-q", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    summary = orjson.loads(res.stdout.splitlines()[-1])
    # batchgate knows the key allows 50 streams: it never sends the other six into a 429.
    assert summary["ok"] == 56 and summary["rate_limited"] == 0
    blind = subprocess.run(
        [sys.executable, "-m", "batchgate", "run", str(prompts), "--simulate", "--concurrency", "56",
         "--sim-token-delay", "0.02", "--json", "-q", "--out", str(tmp_path / "blind"), "--no-key-limits"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    summary = orjson.loads(blind.stdout.splitlines()[-1])
    # Told to ignore the key's limits, 56 streams at once: the extra ones are refused, retried, and all finish.
    assert summary["ok"] == 56 and summary["rate_limited"] >= 1
