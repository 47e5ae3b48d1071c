"""The account endpoints (catalog, balance, prices): optional, so absent or broken answers are None, never a crash."""

from __future__ import annotations

import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from batchgate.account import (
    Balance,
    PublishedPrice,
    api_root,
    fetch_balance,
    fetch_catalog,
    fetch_pricing,
    nearest_models,
)
from batchgate.client import make_session
from batchgate.errors import AuthError, ConnectFailed

KEY = "gp-Account.Test_key0001"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def serve(aiohttp_server: Any, routes: dict[str, Handler]) -> str:
    """The server's base URL (``.../v1``) with ``routes`` (paths from the host root) mounted."""
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    server = await aiohttp_server(app)
    return str(server.make_url("/v1"))


def replies(*answers: tuple[int, Any]) -> tuple[Handler, list[int]]:
    """A handler giving ``answers`` in turn (the last one for ever); the list counts calls."""
    calls: list[int] = []

    async def handler(request: web.Request) -> web.Response:
        calls.append(1)
        status, body = answers[min(len(calls), len(answers)) - 1]
        if isinstance(body, bytes):
            return web.Response(status=status, body=body)
        return web.json_response(body, status=status)

    return handler, calls


def session() -> Any:
    return make_session(KEY, concurrency=2, connect_timeout_s=1.0)


CATALOG = {
    "object": "list",
    "data": [{"id": "qwen/qwen3-235b-a22b-instruct-2507-fp8", "object": "model"}, {"id": "moonshotai/Kimi-K2.6"}],
}


async def test_catalog_ids_as_spelled(aiohttp_server: Any) -> None:
    handler, _ = replies((200, CATALOG))
    async with session() as s:
        assert await fetch_catalog(s, await serve(aiohttp_server, {"/v1/models": handler})) == [
            "qwen/qwen3-235b-a22b-instruct-2507-fp8",
            "moonshotai/Kimi-K2.6",
        ]


async def test_catalog_503_then_ready_is_retried(aiohttp_server: Any) -> None:
    handler, calls = replies((503, {"error": {"message": "loading"}}), (200, {"data": []}), (200, CATALOG))
    async with session() as s:
        ids = await fetch_catalog(s, await serve(aiohttp_server, {"/v1/models": handler}), retry_delay_s=0.01)
    assert ids is not None and len(ids) == 2 and len(calls) == 3


@pytest.mark.parametrize(
    "answer",
    [
        (503, {"error": {"message": "loading"}}),
        (200, {"data": []}),
        (200, b"<html>oops</html>"),
        (200, {"data": "x"}),
        (200, b""),
    ],
)
async def test_catalog_that_never_answers_properly_is_none(aiohttp_server: Any, answer: tuple[int, Any]) -> None:
    handler, calls = replies(answer)
    async with session() as s:
        assert await fetch_catalog(s, await serve(aiohttp_server, {"/v1/models": handler}), retry_delay_s=0.01) is None
    assert 1 <= len(calls) <= 3


async def test_no_catalog_endpoint_is_none_at_once(aiohttp_server: Any) -> None:
    async with session() as s:
        t0 = time.monotonic()
        url = await serve(aiohttp_server, {})
        assert await fetch_catalog(s, url, retry_delay_s=5.0) is None
        assert time.monotonic() - t0 < 2.0  # a retry would have waited 5 s


async def test_catalog_rejecting_the_key_raises_auth_error_without_the_key(aiohttp_server: Any) -> None:
    async def reject(request: web.Request) -> web.Response:
        message = f"invalid key {request.headers['Authorization']}"
        return web.json_response(
            {"error": {"message": message, "code": "invalid_api_key"}}, status=401, headers={"x-request-id": "r1"}
        )

    async with session() as s:
        with pytest.raises(AuthError) as info:
            await fetch_catalog(s, await serve(aiohttp_server, {"/v1/models": reject}))
    assert info.value.status == 401 and info.value.code == "invalid_api_key" and info.value.request_id == "r1"
    assert KEY not in str(info.value)


async def test_unreachable_base_url_is_a_fast_connect_failure() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    async with session() as s:
        t0 = time.monotonic()
        with pytest.raises(ConnectFailed):
            await fetch_catalog(s, f"http://127.0.0.1:{port}/v1")
        assert time.monotonic() - t0 < 1.0
        assert await fetch_balance(s, f"http://127.0.0.1:{port}/v1") is None  # optional: never raises
        assert await fetch_pricing(s, f"http://127.0.0.1:{port}/v1") is None


async def test_balance_as_a_string(aiohttp_server: Any) -> None:
    whoami = {"success": True, "data": {"apiKey": {"status": "active"}, "balance": {"usd": "12.34", "status": "low"}}}
    handler, _ = replies((200, whoami))
    async with session() as s:
        balance = await fetch_balance(s, await serve(aiohttp_server, {"/api/v1/whoami": handler}))
    assert balance == Balance(12.34, "low", "active")


@pytest.mark.parametrize(
    "answer",
    [
        (404, {}),
        (503, {}),
        (200, b"garbage"),
        (200, {"data": {"balance": {"usd": "lots"}}}),
        (200, {"data": {}}),
        (200, [1]),
    ],
)
async def test_balance_absent_or_broken_is_none(aiohttp_server: Any, answer: tuple[int, Any]) -> None:
    handler, _ = replies(answer)
    async with session() as s:
        assert await fetch_balance(s, await serve(aiohttp_server, {"/api/v1/whoami": handler})) is None


async def test_published_prices_per_token(aiohttp_server: Any) -> None:
    pricing = {
        "success": True,
        "data": {
            "fees": {"platformFeeRate": 0.1},
            "models": [
                {"id": "a/full", "usdPer1MTokens": {"network": 1.0, "platformFee": 0.1, "total": 1.1}},
                {"id": "b/strings", "usdPer1MTokens": {"network": "2", "platformFee": "0.2", "total": "2.2"}},
                {"id": "c/network-only", "usdPer1MTokens": {"network": 3.0}},
                {"id": "d/broken", "usdPer1MTokens": {"network": "x"}},
                {"id": 5, "usdPer1MTokens": {"network": 1}},
                "junk",
            ],
        },
    }
    handler, _ = replies((200, pricing))
    async with session() as s:
        prices = await fetch_pricing(s, await serve(aiohttp_server, {"/api/v1/public/pricing": handler}))
    assert prices is not None and set(prices) == {"a/full", "b/strings", "c/network-only"}
    assert prices["a/full"] == PublishedPrice(pytest.approx(1e-6), pytest.approx(1e-7), pytest.approx(1.1e-6))  # type: ignore[arg-type]
    assert prices["b/strings"].usd_per_token_total == pytest.approx(2.2e-6)
    assert prices["c/network-only"].usd_per_token_fee == pytest.approx(3e-7)  # from the published fee rate
    assert prices["c/network-only"].usd_per_token_total == pytest.approx(3.3e-6)


@pytest.mark.parametrize(
    "answer", [(404, {}), (500, b""), (200, {"data": {"models": []}}), (200, {"data": {"models": "x"}})]
)
async def test_pricing_absent_or_broken_is_none(aiohttp_server: Any, answer: tuple[int, Any]) -> None:
    handler, _ = replies(answer)
    async with session() as s:
        assert await fetch_pricing(s, await serve(aiohttp_server, {"/api/v1/public/pricing": handler})) is None


def test_api_root() -> None:
    assert api_root("https://api.gonkagate.com/v1") == "https://api.gonkagate.com"
    assert api_root("https://api.gonkagate.com/v1/") == "https://api.gonkagate.com"
    assert api_root("http://127.0.0.1:8080") == "http://127.0.0.1:8080"


def test_nearest_models() -> None:
    catalog = ["qwen/qwen3-235b-a22b-instruct-2507-fp8", "moonshotai/Kimi-K2.6", "minimaxai/minimax-m2.7"]
    assert nearest_models("Qwen/Qwen3-235B-A22B-Instruct-2507-FP8", catalog) == [
        "qwen/qwen3-235b-a22b-instruct-2507-fp8"
    ]
    assert nearest_models("moonshotai/kimi-k2.5", catalog)[0] == "moonshotai/Kimi-K2.6"
    assert nearest_models("Kimi-K2.6", catalog)[0] == "moonshotai/Kimi-K2.6"
    assert nearest_models("other/minimax-m2.7", catalog)[0] == "minimaxai/minimax-m2.7"
    assert nearest_models("zzzz", catalog) == []
