"""--json-schema: answers parsed and validated, invalid ones kept and re-asked within their budget."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from batchgate.config import RunConfig
from batchgate.errors import InputError
from batchgate.ledger import LEDGER_NAME
from batchgate.runner import Runner
from batchgate.structured import AnswerSchema

SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "integer"}},
    "required": ["answer"],
    "additionalProperties": False,
}


def test_answers_are_checked_against_the_schema() -> None:
    schema = AnswerSchema(SCHEMA)
    assert schema.check('{"answer": 4}').valid
    assert schema.check('```json\n{"answer": 4}\n```').parsed == {"answer": 4}
    bad = schema.check('{"answer": "four"}')
    assert not bad.valid and bad.parsed == {"answer": "four"} and "answer" in (bad.error or "")
    assert schema.check("four").error is not None and schema.check("four").parsed is None
    assert schema.response_format()["json_schema"]["schema"] == SCHEMA
    assert AnswerSchema(SCHEMA, mode="json_object").response_format() == {"type": "json_object"}
    with pytest.raises(InputError, match="not a valid JSON Schema"):
        AnswerSchema({"type": 12})


def _sse(content: str, cost: float, finish: str = "stop") -> bytes:
    chunk = {"choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}]}
    usage = {
        "choices": [],
        "usage": {
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "total_tokens": 15,
            "base_cost_usd": cost / 1.1,
            "platform_fee_usd": cost - cost / 1.1,
            "total_cost_usd": cost,
        },
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\ndata: " + orjson.dumps(usage) + b"\n\ndata: [DONE]\n\n"


@pytest.fixture
async def scripted(aiohttp_server: Any) -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A server answering each prompt from a script: wrong first, right after a re-ask (for 'fixable')."""
    seen: list[dict[str, Any]] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append(body)
        first = body["messages"][0]["content"]
        reasked = len(body["messages"]) > 1
        if first == "fixable":
            content = '{"answer": 42}' if reasked else '{"answer": "forty-two"}'
        elif first == "hopeless":
            content = "no JSON here"
        else:
            content = '{"answer": 1}'
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(_sse(content, 0.001))
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    server = await aiohttp_server(app)
    yield str(server.make_url("/v1")), seen


async def test_invalid_answers_are_kept_and_reasked_with_their_cost_in_the_row(
    tmp_path: Path, scripted: tuple[str, list[dict[str, Any]]]
) -> None:
    url, seen = scripted
    src = tmp_path / "p.jsonl"
    src.write_text(
        "".join(orjson.dumps({"id": t, "prompt": t}).decode() + "\n" for t in ("fine", "fixable", "hopeless"))
    )
    cfg = RunConfig(
        out_dir=tmp_path / "out", api_key="gp-t", base_url=url, default_model="m", json_schema=SCHEMA, reask=2
    )
    summary = await Runner([src], cfg).run()
    rows = {r["id"]: r for r in map(orjson.loads, (tmp_path / "out" / LEDGER_NAME).read_bytes().splitlines())}
    assert rows["fine"]["valid"] is True and rows["fine"]["parsed"] == {"answer": 1} and "reasks" not in rows["fine"]
    assert rows["fixable"]["valid"] is True and rows["fixable"]["parsed"] == {"answer": 42}
    assert rows["fixable"]["reasks"] == 1 and rows["fixable"]["total_cost_usd"] == pytest.approx(0.002)
    assert rows["fixable"]["reask_cost_usd"] == pytest.approx(0.001)
    assert rows["hopeless"]["status"] == "ok" and rows["hopeless"]["valid"] is False
    assert rows["hopeless"]["reasks"] == 2 and rows["hopeless"]["total_cost_usd"] == pytest.approx(0.003)
    assert len(seen) == 1 + 2 + 3  # every request the server saw is in some row's cost
    assert all(b["response_format"]["type"] == "json_schema" for b in seen)
    assert summary.total_cost_usd == pytest.approx(0.006)
    assert (summary.reasks, summary.invalid, summary.ok) == (3, 1, 3)
    again = await Runner([src], cfg).run()  # an invalid answer was paid for: never silently re-bought
    assert again.requests == 0 and len(seen) == 6
