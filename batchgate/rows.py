"""One function builds a ledger row, from the prompt, its outcome and its charge.

The schema itself (names, order, defaults of older versions) is ``models.LEDGER_FIELDS``; this is
the only place that fills it in, so the runner, resume, reports and export agree on every key.
"""

from __future__ import annotations

from typing import Any

from .accounting import Charge
from .errors import ApiError
from .models import LEDGER_VERSION, PromptRecord

__all__ = ["make_row"]


def _choices(completion: Any) -> list[dict[str, Any]] | None:
    choices = getattr(completion, "choices", None)
    if not choices or len(choices) < 2:
        return None
    return [
        {
            "index": c.index,
            "content": c.content,
            "reasoning": c.reasoning,
            "tool_calls": c.tool_calls,
            "finish_reason": c.finish_reason,
        }
        for c in choices
    ]


def make_row(
    rec: PromptRecord,
    *,
    run_id: str,
    fingerprint: str,
    completion: Any | None,
    error: ApiError | None,
    charge: Charge,
    attempts: int,
    retry_causes: list[str],
    started_at: str,
    latency_s: float,
    failed: bool = False,
) -> dict[str, Any]:
    """The ledger row of one finished prompt: ok when ``completion`` is given, else failed.

    ``failed`` with a completion: a delivered, paid answer the run refuses (``--on-length fail``);
    its text and cost stay on the row.
    """
    ok = completion is not None
    content = completion.content if completion is not None else ""
    finish_reason = completion.finish_reason if completion is not None else None
    error_record = error.as_record() if error is not None else None  # with its code and request id
    request_id = getattr(completion, "request_id", None) if ok else getattr(error, "request_id", None)
    ttft = getattr(completion, "ttft_s", None) if ok else None
    return {
        "v": LEDGER_VERSION,
        "id": rec.id,
        "job": rec.job,
        "run_id": run_id,
        "model": rec.model,
        "status": "ok" if ok and not failed else "failed",
        "content": content,
        "finish_reason": finish_reason,
        "prompt_tokens": charge.prompt_tokens,
        "completion_tokens": charge.completion_tokens,
        "total_tokens": charge.total_tokens,
        "base_cost_usd": charge.base_cost_usd,
        "platform_fee_usd": charge.platform_fee_usd,
        "total_cost_usd": charge.total_cost_usd,
        "unconfirmed_completion_tokens": charge.unconfirmed_completion_tokens,
        "unconfirmed_cost_usd": charge.unconfirmed_cost_usd,
        "attempts": attempts,
        "retry_causes": retry_causes,
        "started_at": started_at,
        "ttft_s": round(ttft, 6) if ttft is not None else None,
        "latency_s": round(latency_s, 6),
        "error": error_record,
        "sample": rec.sample,
        "fingerprint": fingerprint,
        "request_id": request_id,
        "reasoning": getattr(completion, "reasoning", None) if ok else None,
        "refusal": getattr(completion, "refusal", None) if ok else None,
        "tool_calls": getattr(completion, "tool_calls", None) if ok else None,
        "choices": _choices(completion) if ok else None,
        "usage_raw": charge.usage_raw,
        "cost_status": charge.cost_status,
        "warnings": charge.warnings or None,
        "cached": False,  # a row answered from the cache is built by cache.row_from_cache over this one
        "cached_cost_usd": None,
    }
