"""Plain data shared by every layer: prompt records, the ledger row schema, run summaries. No I/O."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = [
    "BATCHGATE_VERSION",
    "LEDGER_DEFAULTS",
    "LEDGER_FIELDS",
    "LEDGER_VERSION",
    "PromptRecord",
    "RunSummary",
    "StopReason",
]


class StopReason(StrEnum):
    """Why a run stopped starting prompts; each maps to one exit code (the README's table)."""

    FAILED = "failed"  # not a stop: the run ended with prompts failed for good
    AUTH = "auth"  # the key was rejected
    UNREACHABLE = "unreachable"  # the base URL never answered
    UNKNOWN_MODEL = "unknown_model"  # the catalog lacks a model the inputs name
    BALANCE = "balance"  # 402 or 429 insufficient_quota
    BUDGET = "budget"  # --max-cost-usd would be passed
    CAP = "cap"  # a cap across runs (total, daily, monthly) is used up
    LEDGER = "ledger"  # the ledger refused a write (disk full, read-only)
    INTERRUPTED = "interrupted"  # SIGINT
    TERMINATED = "terminated"  # SIGTERM

    @property
    def exit_code(self) -> int:
        return _EXIT_CODES[self]


_EXIT_CODES = {
    StopReason.FAILED: 1,
    StopReason.AUTH: 2,
    StopReason.UNREACHABLE: 2,
    StopReason.UNKNOWN_MODEL: 2,
    StopReason.BALANCE: 3,
    StopReason.BUDGET: 3,
    StopReason.CAP: 3,
    StopReason.LEDGER: 1,
    StopReason.INTERRUPTED: 130,
    StopReason.TERMINATED: 143,
}


def _version() -> str:
    try:
        return importlib.metadata.version("batchgate")
    except importlib.metadata.PackageNotFoundError:
        return "dev"


#: The installed batchgate's version ("dev" from a source tree that is not installed).
BATCHGATE_VERSION = _version()

#: Bumped when fields are added or change meaning; readers accept every version up to this one,
#: and a key a row lacks (an older version wrote it) reads as its default below.
#: v1: the first 22 fields.  v2: sample, fingerprint, request_id, the rest of an answer
#: (reasoning, refusal, tool_calls, choices), usage checks (usage_raw, cost_status, warnings)
#: and the answer cache (cached, cached_cost_usd).
LEDGER_VERSION = 2

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
    "error",  # null or {"type", "status", "message", "code", "request_id"}
    # -- v2 --
    "sample",  # which of --samples N answers to the prompt (0-based); the row key is (id, sample)
    "fingerprint",  # request_fingerprint() of the body sent: an edited prompt no longer matches
    "request_id",  # x-request-id of the attempt the row describes (the billed one when ok)
    "reasoning",  # delta.reasoning_content / delta.reasoning of choice 0, or null
    "refusal",
    "tool_calls",  # [{index, id, type, function: {name, arguments}}] of choice 0, or null
    "choices",  # every choice when the answer had several, else null
    "usage_raw",  # the server's usage block, kept only when it failed validation
    "cost_status",  # "confirmed" | "derived" (total = base + fee) | "unconfirmed" | null (failed)
    "warnings",  # null or a list of short codes ("usage_malformed", "total_mismatch", ...)
    "cached",  # answered from the answer cache (cost 0 here; what it cost first in cached_cost_usd)
    "cached_cost_usd",
)

#: What a key missing from an older row means.
LEDGER_DEFAULTS: dict[str, Any] = {
    "sample": 0,
    "fingerprint": None,
    "request_id": None,
    "reasoning": None,
    "refusal": None,
    "tool_calls": None,
    "choices": None,
    "usage_raw": None,
    "cost_status": None,
    "warnings": None,
    "cached": False,
    "cached_cost_usd": None,
}


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
    sample: int = 0  # which of --samples N answers this request asks for
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
    possibly_billed_attempts: int = 0  # attempts in flight when a run of this directory died (kill -9, crash)
    possibly_billed_usd: float = 0.0  # their worst case: they may have been billed, nothing confirms it
    possibly_billed_unpriced: int = 0  # of those, attempts whose worst case had no known price
    stale: int = 0  # ok rows whose request changed since (prompt edited, model or defaults changed): rerun
    cached: int = 0  # answered from the answer cache, bought by an earlier run
    invalid: int = 0  # structured answers that do not match --json-schema (kept, valid: false)
    reasks: int = 0  # paid re-asks after an invalid (or, with --on-length reask, a cut) answer
    reask_cost_usd: float = 0.0  # what those re-asked answers cost (in total_cost_usd too)
    length_cut: int = 0  # answers cut at max_tokens (finish_reason: length)
    warnings: dict[str, int] = field(default_factory=dict)  # odd server behaviour, by code
    balance_usd: float | None = None  # the key's balance at start, where GonkaGate tells it
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
            "possibly_billed_attempts": self.possibly_billed_attempts,
            "possibly_billed_usd": self.possibly_billed_usd,
            "possibly_billed_unpriced": self.possibly_billed_unpriced,
            "stale": self.stale,
            "cached": self.cached,
            "invalid": self.invalid,
            "reasks": self.reasks,
            "reask_cost_usd": self.reask_cost_usd,
            "length_cut": self.length_cut,
            "warnings": dict(self.warnings),
            "balance_usd": self.balance_usd,
            "wall_s": round(self.wall_s, 3),
            "requests_per_s": round(self.requests / self.wall_s, 2) if self.wall_s > 0 else 0.0,
            "exit_code": self.exit_code,
            "stop_reason": self.stop_reason,
            "failures_by_cause": dict(self.failures_by_cause),
        }
