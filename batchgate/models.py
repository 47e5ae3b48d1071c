"""Plain data shared by every layer: prompt records, the ledger row schema, run summaries. No I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "LEDGER_FIELDS",
    "LEDGER_VERSION",
    "PromptRecord",
    "RunSummary",
]

#: Bumped when a field changes meaning; readers accept every version up to this one.
LEDGER_VERSION = 1

#: One JSON object per finished request in ``results.jsonl``, in this order.  Costs are the
#: server's numbers unchanged; ``unconfirmed_*`` hold what cut attempts received before the usage
#: chunk could prove what they were billed (``unconfirmed_cost_usd`` is ``null`` when no price for
#: the model had been learnt yet: reports price it later from the ledger).
LEDGER_FIELDS: tuple[str, ...] = (
    "v",  # ledger version
    "id",  # prompt id (from the line, or derived from its content)
    "job",  # job name: the job file's or the prompt file's stem
    "run_id",  # one per `batchgate run` invocation
    "model",
    "status",  # "ok" | "failed"
    "content",  # the answer text ("" when failed)
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "base_cost_usd",
    "platform_fee_usd",
    "total_cost_usd",  # confirmed: from the final usage chunk; 0.0 when none arrived
    "unconfirmed_completion_tokens",  # tokens received by attempts cut before their usage chunk
    "unconfirmed_cost_usd",  # estimated cost of those cut attempts (null: price unknown yet)
    "attempts",
    "retry_causes",  # list of error kinds, one per failed attempt, e.g. ["rate_limited"]
    "started_at",  # UTC ISO-8601 of the first attempt
    "ttft_s",  # time to first token of the final attempt
    "latency_s",  # first attempt start to row written, including retries and backoff
    "error",  # null or {"type", "status", "message"}
)


@dataclass(frozen=True, slots=True)
class PromptRecord:
    """One validated prompt line, ready to send.

    ``body`` is the chat-completions request without ``stream``; ``model`` is already resolved
    (the line's own or the run's default).
    """

    id: str
    job: str
    path: str
    line: int
    model: str
    body: dict[str, Any]
    prompt_chars: int
    meta: dict[str, Any] | None = None  # the line's "meta", or a table row's other columns: never sent


@dataclass(slots=True)
class RunSummary:
    """What a run did, for the terminal summary and the ``--json`` line."""

    run_id: str
    out: str
    requests: int = 0  # rows written this run
    ok: int = 0
    failed: int = 0
    skipped: int = 0  # already ok in the ledger (resume)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_cost_usd: float = 0.0
    unconfirmed_cost_usd: float = 0.0
    unconfirmed_unpriced_tokens: int = 0
    retries: int = 0
    rate_limited: int = 0  # 429 answers
    slowdowns: int = 0  # times the run halved its concurrency after a 429
    min_concurrency: int = 0  # the lowest concurrency limit it went down to
    outage_pauses: int = 0  # times failures in a row paused every start (server down, network gone)
    wall_s: float = 0.0
    exit_code: int = 0
    stop_reason: str | None = None
    failures_by_cause: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "out": self.out,
            "requests": self.requests,
            "ok": self.ok,
            "failed": self.failed,
            "skipped": self.skipped,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_cost_usd": self.total_cost_usd,
            "unconfirmed_cost_usd": self.unconfirmed_cost_usd,
            "unconfirmed_unpriced_tokens": self.unconfirmed_unpriced_tokens,
            "retries": self.retries,
            "rate_limited": self.rate_limited,
            "slowdowns": self.slowdowns,
            "min_concurrency": self.min_concurrency,
            "outage_pauses": self.outage_pauses,
            "wall_s": round(self.wall_s, 3),
            "requests_per_s": round(self.requests / self.wall_s, 2) if self.wall_s > 0 else 0.0,
            "exit_code": self.exit_code,
            "stop_reason": self.stop_reason,
            "failures_by_cause": dict(self.failures_by_cause),
        }
