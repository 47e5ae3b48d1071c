"""Synthetic ledger rows (v1 and v2 shapes, per the ledger contract) and prompt files for tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson


def v1_row(rid: str, status: str = "ok", content: str = "answer", **kw: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "v": 1,
        "id": rid,
        "job": "j",
        "run_id": "20261201T000000Z-aaaaaa",
        "model": "m/small",
        "status": status,
        "content": content if status == "ok" else "",
        "finish_reason": "stop" if status == "ok" else None,
        "prompt_tokens": 10 if status == "ok" else None,
        "completion_tokens": 5 if status == "ok" else None,
        "total_tokens": 15 if status == "ok" else None,
        "base_cost_usd": 0.001 if status == "ok" else 0.0,
        "platform_fee_usd": 0.0001 if status == "ok" else 0.0,
        "total_cost_usd": 0.0011 if status == "ok" else 0.0,
        "unconfirmed_completion_tokens": 0,
        "unconfirmed_cost_usd": 0.0,
        "attempts": 1,
        "retry_causes": [],
        "started_at": "2026-12-01T00:00:00.000Z",
        "ttft_s": 0.1,
        "latency_s": 0.5,
        "error": None if status == "ok" else {"type": "server_error", "status": 500, "message": "boom"},
    }
    row.update(kw)
    return row


def v2_row(rid: str, sample: int = 0, status: str = "ok", **kw: Any) -> dict[str, Any]:
    row = v1_row(rid, status, content=f"{rid} answer {sample}")
    row.update(
        {
            "v": 2,
            "sample": sample,
            "request_id": f"req-{rid}-{sample}",
            "reasoning": f"thinking about {rid}",
            "refusal": None,
            "tool_calls": None,
            "cost_status": "confirmed",
            "parsed": {"n": sample},
            "valid": True,
            "meta": {"category": "cat-" + rid},
        }
    )
    row.update(kw)
    return row


def write_ledger(out: Path, rows: list[dict[str, Any]], tail: bytes = b"") -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows) + tail)
    return out


def write_prompts(path: Path, ids: list[str], **extra: Any) -> Path:
    path.write_bytes(
        b"".join(orjson.dumps({"id": i, "prompt": f"question {i}", "model": "m/small", **extra}) + b"\n" for i in ids)
    )
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]
