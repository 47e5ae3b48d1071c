"""Whole runs against hostile servers: a quota 429 exits 3, an echoed key reaches no file, odd answers are kept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from batchgate.config import RunConfig
from batchgate.ledger import LEDGER_NAME
from batchgate.runner import Runner

KEY = "gp-RunLevel.Secret_key42"


def prompts(path: Path, n: int) -> Path:
    path.write_text("".join(orjson.dumps({"id": f"p{i}", "prompt": f"q {i}"}).decode() + "\n" for i in range(n)))
    return path


async def base_url(aiohttp_server: Any, handler: Any) -> str:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    server = await aiohttp_server(app)
    return str(server.make_url("/v1"))


def config(out: Path, url: str) -> RunConfig:
    return RunConfig(
        out_dir=out,
        api_key=KEY,
        base_url=url,
        default_model="m",
        concurrency=4,
        max_attempts=3,
        backoff_base_s=0.001,
        backoff_max_s=0.01,
        idle_timeout_s=1.0,
    )


def rows(out: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in (out / LEDGER_NAME).read_bytes().splitlines() if line.strip()]


async def test_quota_429_stops_the_run_with_exit_3_after_at_most_a_concurrencys_worth(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    calls: list[int] = []

    async def quota(request: web.Request) -> web.Response:
        calls.append(1)
        body = {"error": {"message": "Insufficient balance", "code": "insufficient_quota"}}
        return web.json_response(body, status=429, headers={"x-request-id": f"req-{len(calls)}"})

    out = tmp_path / "out"
    summary = await Runner(
        [prompts(tmp_path / "p.jsonl", 40)], config(out, await base_url(aiohttp_server, quota))
    ).run()
    assert summary.exit_code == 3 and summary.stop_reason == "balance"
    assert len(calls) <= 4 + 1  # no retries, no new starts after the first answer
    failed = rows(out)
    assert failed and all(r["status"] == "failed" and r["error"]["code"] == "insufficient_quota" for r in failed)
    assert all(r["error"]["request_id"].startswith("req-") for r in failed)


async def test_a_server_echoing_the_key_leaves_it_in_no_file(aiohttp_server: Any, tmp_path: Path) -> None:
    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": f"bad request, you sent {dict(request.headers)}"}}, status=400)

    out = tmp_path / "out"
    summary = await Runner([prompts(tmp_path / "p.jsonl", 3)], config(out, await base_url(aiohttp_server, echo))).run()
    assert summary.failed == 3
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files
    for path in files:
        data = path.read_bytes()
        assert KEY.encode() not in data and KEY[3:].encode() not in data, path
    assert "[REDACTED]" in rows(out)[0]["error"]["message"]


async def test_a_tool_call_answer_is_ok_and_costed(aiohttp_server: Any, tmp_path: Path) -> None:
    events = [
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "tool_calls": [
                            {"index": 0, "id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                        ]
                    },
                }
            ]
        },
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        {
            "choices": [],
            "usage": {
                "prompt_tokens": "3",
                "completion_tokens": "2",
                "total_tokens": "5",
                "base_cost_usd": "0.001",
                "platform_fee_usd": "0.0001",
                "total_cost_usd": "0.0011",
            },
        },
    ]

    async def tools(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    out = tmp_path / "out"
    summary = await Runner([prompts(tmp_path / "p.jsonl", 2)], config(out, await base_url(aiohttp_server, tools))).run()
    assert summary.ok == 2 and summary.exit_code == 0
    assert abs(summary.total_cost_usd - 0.0022) < 1e-12  # costs sent as strings are booked, not a crash
    assert all(r["status"] == "ok" and r["finish_reason"] == "tool_calls" for r in rows(out))
