"""A local GonkaGate: a real aiohttp server speaking the streaming wire format, with seeded faults.

It keeps its own account (:class:`Billing`) of what it billed, so tests, ``run --simulate`` and
benchmarks can compare batchgate's cost report with what the server charged, to 1e-9: exact totals
always, per-request records up to ``keep_records`` (every one in the optional billing log), so its
memory stays flat however many requests it serves. It never
imports ``client``, ``retry`` or ``runner``: it is an independent check on them.

It behaves as ``docs/gonkagate-api.md`` describes GonkaGate.  Every response carries a unique
``x-request-id`` (kept on the billed record as ``request_id``); every error body is
``{"error": {"message", "type", "code"}}`` with a *string* code.  A chat request gets, in order of
the checks:

* 401 ``invalid_api_key``: no ``Authorization: Bearer gp-...`` header; 403 ``account_deactivated``
  with ``account_deactivated``.
* 429 ``rate_limit_exceeded`` + ``Retry-After`` from the per-key limits (``key_limits``, off by
  default): more than ``key_concurrency_limit`` requests in flight, or a full request window
  (``key_rpm_limit`` per minute, ``key_burst_limit`` per ``key_burst_window_s``).
* 400 ``invalid_request_error``: body is not JSON, ``model`` / ``messages`` / ``n`` / ``tools`` malformed.
* 404 ``model_not_found``: with ``strict_models``, a model the catalog (the price table) lacks.
* 429 ``insufficient_quota`` (or, with ``quota_status=402``, the older 402): billed spend has reached
  ``balance_usd``.
* one seeded fault draw per request (the rates are disjoint slices of one uniform draw, so each
  rate is the fault's own frequency; ``fault_rate`` is a total split evenly over the five): 429
  with ``Retry-After``, a 5xx (``server_error_statuses``), or, for streams only, a reset
  (connection closed after *k* tokens), a stall (*k* tokens, then ``stall_s`` of silence, then the
  rest) or a mid-stream ``data: {"error": ...}`` after *k* tokens; 1 <= k < completion length.
* otherwise the docs' stream: role chunk, content chunks, a finish chunk, usage with costs (inside
  the finish chunk, or, for a seeded ``separate_usage_rate`` share, as OpenAI's separate
  ``choices: []`` chunk after it), ``data: [DONE]``; or, for ``"stream": false``, one JSON answer.
  A reasoning model streams ``delta.reasoning_content`` first; a request with ``tools`` gets
  ``delta.tool_calls`` pieces and ``finish_reason: "tool_calls"``; ``n > 1`` gives n choices
  streamed interleaved, each with its own index.  Reasoning and tool-call tokens are completion
  tokens, and ``max_tokens`` (GonkaGate's default 4096 when absent) caps them all.

Also served: ``GET /v1/models`` (the price table's ids), ``GET /api/v1/whoami`` (balance as a
string) and ``GET /api/v1/public/pricing``.

The answer text is a pure function of (seed, model, messages, max_tokens, n, tools): retries and
restarts with the same seed get the same words, so tests can check what the client stored.  Two
money-test options bend this on purpose: ``growth_every`` (answers grow with the request count) and
``price_step_every`` (prices multiply every N billed requests; a request pays the price in force
when it was accepted).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import hashlib
import itertools
import math
import random
import secrets
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, BinaryIO

import orjson
from aiohttp import web

__all__ = [
    "BILLING_KEY",
    "CONFIG_KEY",
    "DEFAULT_KEEP_RECORDS",
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_PRICES",
    "REASONING_MODELS",
    "Billing",
    "BillingRecordsDropped",
    "RunningSimulator",
    "SimulatorConfig",
    "create_app",
    "running_simulator",
    "serve",
    "serve_forever",
]

#: USD per 1M (prompt, completion) tokens.  The first entry reproduces the docs' example
#: (10 prompt + 5 completion tokens cost $0.000075 base, $0.0000075 fee).  The older pages' ids come
#: first, then the current catalog's (spelt as the catalog spells them).
DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "Qwen/Qwen3-235B-A22B-Instruct-2507-FP8": (2.5, 10.0),
    "Qwen/Qwen3-32B-FP8": (0.4, 1.6),
    "meta-llama/Llama-3.3-70B-Instruct": (0.9, 2.7),
    "deepseek-ai/DeepSeek-V3": (1.2, 4.8),
    "qwen/qwen3-235b-a22b-instruct-2507-fp8": (2.0, 8.0),
    "moonshotai/Kimi-K2.6": (6.0, 24.0),
    "minimaxai/minimax-m2.7": (3.0, 12.0),
    # The simulator's own cheap test model: in its catalog, so a run's model check passes.
    "sim-model": (1.0, 4.0),
}

#: Models that stream ``delta.reasoning_content`` before their answer.
REASONING_MODELS: frozenset[str] = frozenset({"moonshotai/Kimi-K2.6", "minimaxai/minimax-m2.7"})

#: What GonkaGate caps an answer at when a request gives no ``max_tokens``.
DEFAULT_MAX_TOKENS = 4096

#: How many billing records (and chat answers) a simulator keeps by default: every test's worth,
#: and a flat ~70 MB however long it serves.
DEFAULT_KEEP_RECORDS = 100_000

#: How long a shutting-down server waits for open streams before cancelling them (billed "cut").
_SHUTDOWN_TIMEOUT_S = 0.25
#: How often a stalled stream checks whether its client has gone away.
_STALL_POLL_S = 0.05
#: Chunks gathered into one write when there is no pause between them.
_CHUNKS_PER_WRITE = 64
#: The most choices one request may ask for.
_MAX_N = 16
#: Characters of tool-call arguments per streamed piece (one piece is one token).
_ARG_PIECE_CHARS = 12

# Content vocabulary: one word (plus a trailing space) is one completion token.  A few non-ASCII
# words and a quoted one make clients decode UTF-8 split across reads and JSON escapes.
_WORDS = (
    "the of and to in is that for it as with was on be by this are from or an at which not "
    "have has but all were they their one more can its also when been into than other some "
    "model token stream answer batch prompt cost price ledger server client request retry "
    "cent budget queue window gate signal vector matrix latency cache shard replica kernel "
    "river mountain forest ocean desert valley harbor meadow island canyon glacier prairie "
    "quickly slowly carefully simply clearly rarely often never always sometimes perhaps "
    "bright quiet ancient modern gentle sharp hollow silver golden crimson amber violet "
    "build measure compare explain describe consider imagine remember follow balance "
    "however therefore moreover meanwhile otherwise indeed finally first second third "
    "café naïve Zürich façade jalapeño 東京 日本語 señor crème brûlée "
)
_VOCAB: tuple[str, ...] = (*_WORDS.split(), '"quoted"', "back\\slash", "done.", "well,", "(aside)")
_PIECES: tuple[str, ...] = tuple(word + " " for word in _VOCAB)
_PIECE_JSON: dict[str, bytes] = {piece: orjson.dumps(piece) for piece in _PIECES}

_KEEPALIVE = b": keep-alive\n\n"
_DONE = b"data: [DONE]\n\n"
_MIDSTREAM_ERROR = (
    b"data: "
    + orjson.dumps({"error": {"message": "upstream model error", "type": "server_error", "code": "server_error"}})
    + b"\n\n"
)
_ROLE_DELTA = b'{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
_CONTENT_TAIL = b'},"finish_reason":null}]}\n\n'
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_REQUEST_ID = "X-Request-Id"
#: error.code of each 5xx the simulator can send.
_SERVER_ERROR_CODES = {500: "server_error", 502: "bad_gateway", 503: "service_unavailable", 504: "gateway_timeout"}


@dataclass
class SimulatorConfig:
    """Everything that shapes the simulator's answers, timing, faults, limits and prices.

    Raises ``ValueError`` (from ``__post_init__``) for rates outside [0, 1], request-level fault
    rates adding up to more than 1, a bad completion-length range or a limit below 1.
    """

    seed: int = 0
    token_delay_s: float = 0.0  # pause between content chunks (0 = write as fast as possible)
    first_token_delay_s: float = 0.0  # pause between the role chunk and the first content chunk
    tokens_per_chunk: int = 1  # content pieces ("tokens") per SSE chunk
    min_completion_tokens: int = 8
    max_completion_tokens: int = 64  # cap on the natural length; a request's max_tokens caps it further
    default_max_tokens: int = DEFAULT_MAX_TOKENS  # the cap when a request gives no max_tokens
    # Fault rates, each a probability per request in [0, 1]:
    fault_rate: float = 0.0  # a total, split evenly over the five faults below (added to their own rates)
    reset_rate: float = 0.0  # close the connection after k tokens; no usage chunk
    stall_rate: float = 0.0  # after k tokens send nothing for stall_s, then finish normally
    stall_s: float = 30.0
    rate_limit_rate: float = 0.0  # 429 with Retry-After: retry_after_s and code rate_limit_code
    retry_after_s: float = 0.05
    rate_limit_code: str = "rate_limit_exceeded"  # or e.g. "transfer_agent_capacity_reached"
    server_error_rate: float = 0.0  # a 5xx before any streaming
    server_error_statuses: tuple[int, ...] = (500,)  # which 5xx (seeded pick): 500, 502, 503, 504
    midstream_error_rate: float = 0.0  # after k tokens, a `data: {"error": ...}` event, then EOF
    keepalive_rate: float = 0.0  # per chunk: an extra `: keep-alive` comment before it
    separate_usage_rate: float = 0.5  # per stream: usage in its own `choices: []` chunk, else in the finish chunk
    # The account:
    balance_usd: float | None = None  # None = unlimited; once billed spend reaches it, quota_status
    quota_status: int = 429  # 429 `insufficient_quota` (current docs) or 402 (older pages)
    # Per-key limits (GonkaGate's documented ones), all off unless key_limits:
    key_limits: bool = False
    key_concurrency_limit: int = 50  # requests in flight per key
    key_rpm_limit: int = 600  # requests per minute window per key
    key_burst_limit: int = 200  # requests per burst window per key
    key_burst_window_s: float = 10.0
    limit_retry_after_s: float = 1.0  # Retry-After of a concurrency-limit 429 (a window's says when it ends)
    # The catalog and the account endpoints:
    prices: dict[str, tuple[float, float]] = field(default_factory=lambda: dict(DEFAULT_PRICES))
    default_price: tuple[float, float] = (1.0, 4.0)  # any model not in `prices` (unless strict_models)
    strict_models: bool = False  # a model not in `prices` gets 404 model_not_found
    reasoning_models: frozenset[str] = REASONING_MODELS
    models_unavailable: int = 0  # the first N GET /v1/models answer 503 (-1: every one)
    models_empty: bool = False  # GET /v1/models lists nothing
    account_endpoints: bool = True  # serve /api/v1/whoami and /api/v1/public/pricing (else 404)
    account_deactivated: bool = False  # every authenticated /v1 request gets 403 account_deactivated
    platform_fee_rate: float = 0.10
    # Money-test options:
    price_step_every: int | None = None  # prices multiply by price_step_factor every N billed requests
    price_step_factor: float = 2.0
    ignore_max_tokens: bool = False  # a request's max_tokens does not cut the answer (default_max_tokens does)
    long_answer_rate: float = 0.0  # share of prompts (seeded by the prompt) answered up to the cap
    growth_every: int | None = None  # natural lengths multiply by growth_factor every N accepted requests
    growth_factor: float = 2.0
    billing_log: str | None = None  # append one JSON line per billed request (every one, at any scale)
    # Billing keeps exact totals and counts always, but only the latest keep_records records and
    # responses (None: all), so memory stays flat however many requests it serves:
    keep_records: int | None = DEFAULT_KEEP_RECORDS

    def __post_init__(self) -> None:
        rates = {
            "reset_rate": self.reset_rate,
            "stall_rate": self.stall_rate,
            "rate_limit_rate": self.rate_limit_rate,
            "server_error_rate": self.server_error_rate,
            "midstream_error_rate": self.midstream_error_rate,
        }
        others = {
            "fault_rate": self.fault_rate,
            "keepalive_rate": self.keepalive_rate,
            "separate_usage_rate": self.separate_usage_rate,
            "long_answer_rate": self.long_answer_rate,
        }
        for name, rate in (rates | others).items():
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {rate}")
        if sum(rates.values()) + self.fault_rate > 1.0 + 1e-12:
            raise ValueError("fault, reset, stall, rate-limit, server-error and mid-stream rates add up to more than 1")
        if not 1 <= self.min_completion_tokens <= self.max_completion_tokens:
            raise ValueError("need 1 <= min_completion_tokens <= max_completion_tokens")
        for name in (
            "tokens_per_chunk",
            "default_max_tokens",
            "key_concurrency_limit",
            "key_rpm_limit",
            "key_burst_limit",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("price_step_every", "growth_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (or None)")
        for name in (
            "token_delay_s",
            "first_token_delay_s",
            "stall_s",
            "retry_after_s",
            "platform_fee_rate",
            "limit_retry_after_s",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.key_burst_window_s <= 0:
            raise ValueError("key_burst_window_s must be positive")
        if self.price_step_factor <= 0:
            raise ValueError("price_step_factor must be positive")
        if self.growth_factor < 1:
            raise ValueError("growth_factor must be at least 1")
        if self.quota_status not in (402, 429):
            raise ValueError(f"quota_status must be 402 or 429, got {self.quota_status}")
        if self.keep_records is not None and self.keep_records < 0:
            raise ValueError("keep_records must not be negative (or None)")
        if self.models_unavailable < -1:
            raise ValueError("models_unavailable must be -1 (always) or a count")
        if not self.rate_limit_code:
            raise ValueError("rate_limit_code must not be empty")
        if not self.server_error_statuses or not set(self.server_error_statuses) <= set(_SERVER_ERROR_CODES):
            raise ValueError(f"server_error_statuses must be some of {sorted(_SERVER_ERROR_CODES)}")

    def fault_rates(self) -> dict[str, float]:
        """Each fault's own rate plus its fifth of ``fault_rate``."""
        share = self.fault_rate / 5
        return {
            "rate_limited": self.rate_limit_rate + share,
            "server_error": self.server_error_rate + share,
            "reset": self.reset_rate + share,
            "stall": self.stall_rate + share,
            "midstream_error": self.midstream_error_rate + share,
        }

    def price(self, model: str) -> tuple[float, float]:
        """USD per 1M (prompt, completion) tokens for ``model``; ``default_price`` if unlisted."""
        return self.prices.get(model, self.default_price)

    def costs(
        self, model: str, prompt_tokens: int, completion_tokens: int, price_factor: float = 1.0
    ) -> tuple[float, float, float]:
        """The (base, platform fee, total) USD the simulator sends and bills for a request."""
        in_price, out_price = self.price(model)
        if price_factor != 1.0:
            in_price, out_price = in_price * price_factor, out_price * price_factor
        base = prompt_tokens * in_price / 1e6 + completion_tokens * out_price / 1e6
        fee = base * self.platform_fee_rate
        return base, fee, base + fee


class BillingRecordsDropped(LookupError):
    """Asked for every billing record (or response) after the simulator dropped the oldest ones.

    A simulator keeps at most ``SimulatorConfig.keep_records`` of each; its totals and counts stay
    exact regardless.  Raise ``keep_records`` (``None`` keeps all) or read the billing log (every
    record, at any scale) instead.
    """


class _ExactSum:
    """A running sum with no rounding error (Shewchuk's partials, as ``math.fsum`` keeps them).

    ``value()`` is the correctly rounded sum of everything added: bit for bit what ``math.fsum``
    over the same numbers gives, in O(1) memory (a few dozen partials at most).
    """

    __slots__ = ("_partials",)

    def __init__(self) -> None:
        self._partials: list[float] = []

    def add(self, x: float) -> None:
        partials = self._partials
        i = 0
        for y in partials:
            if abs(x) < abs(y):
                x, y = y, x
            hi = x + y
            lo = y - (hi - x)
            if lo:
                partials[i] = lo
                i += 1
            x = hi
        partials[i:] = [x]

    def value(self) -> float:
        return math.fsum(self._partials)


class Billing:
    """The simulator's account: exact totals and counts of everything billed, and the latest records.

    A record is ``{"seq", "request_id", "response_id", "client_request_id", "model", "stream",
    "status", "fault", "finish_reason", "prompt_tokens", "completion_tokens", "base_cost_usd",
    "platform_fee_usd", "total_cost_usd", "price_factor", "content", "reasoning", "tool_calls",
    "choices", "at"}``.  ``status`` is ``"completed"`` when the usage chunk (or the JSON answer) was
    written, else ``"cut"``, billed for the prompt plus the tokens actually sent (``content``,
    ``reasoning`` and ``tool_calls`` are choice 0's as sent; ``choices`` lists every choice when
    there were several, else it is ``None``).  ``fault`` is ``None``, ``"reset"``,
    ``"midstream_error"``, ``"stall"`` or ``"disconnect"``.  ``seq`` numbers records from 0 in
    billing order.

    ``responses`` has one ``{"request_id", "client_request_id", "status", "code"}`` per chat request
    answered (billed or not), so a test can match a failed ledger row to the answer it got.

    Memory is flat in the number of requests: the totals (``spent_usd``, ``completed_total_usd``,
    ``cut_total_usd``) are exact running sums and the counts (``billed_count``, ``response_count``,
    ``events``) are integers, kept always; of the records and the responses only the latest
    ``keep_records`` each are kept (``None``: all).  Once some were dropped, every accessor that
    would answer from the records (``records``, ``responses``, ``record_for`` of an id it does not
    hold, ``completed``, ``cut``, ``completed_count_by_client_id``) raises
    :class:`BillingRecordsDropped` rather than answer from part of them; ``kept_records()`` and
    ``kept_responses()`` still give the latest ones.  The billing log keeps every record at any scale.

    ``events`` counts what the server did per request: ``unauthorized``, ``bad_request``,
    ``forbidden``, ``model_not_found``, ``insufficient_balance``, ``key_concurrency_limited``, ``key_rate_limited``,
    ``rate_limited``, ``server_error`` (unbilled answers), ``reset``, ``stall``, ``midstream_error``
    (injected faults), ``completed`` and ``cut`` (billed).
    """

    def __init__(self, log_path: str | None = None, keep_records: int | None = None) -> None:
        if keep_records is not None and keep_records < 0:
            raise ValueError("keep_records must not be negative (or None)")
        self.keep_records = keep_records
        self.events: collections.Counter[str] = collections.Counter()
        self.log_path = log_path
        self._log: BinaryIO | None = open(log_path, "ab") if log_path else None  # noqa: SIM115
        self.billed_count = 0  # records billed, kept or not
        self.response_count = 0  # chat requests answered, kept or not
        self._records: collections.deque[dict[str, Any]] = collections.deque()
        self._responses: collections.deque[dict[str, Any]] = collections.deque(maxlen=keep_records)
        self._by_request_id: dict[str, dict[str, Any]] = {}
        self._spent = 0.0  # running sum for the balance check; reports use the exact sums
        self._total = _ExactSum()
        self._totals = {"completed": _ExactSum(), "cut": _ExactSum()}

    def add(self, record: dict[str, Any]) -> None:
        """Count a record (``seq`` is set here), keep it (dropping the oldest past ``keep_records``)
        and write its billing-log line, flushed at once."""
        record["seq"] = self.billed_count
        self.billed_count += 1
        status = record["status"]
        cost = record["total_cost_usd"]
        self.events[status] += 1
        self._spent += cost
        self._total.add(cost)
        self._totals[status].add(cost)
        keep = self.keep_records
        if keep is None or keep > 0:
            if keep is not None and len(self._records) >= keep:
                old = self._records.popleft()
                if self._by_request_id.get(old["request_id"]) is old:
                    del self._by_request_id[old["request_id"]]
            self._records.append(record)
            self._by_request_id[record["request_id"]] = record
        if self._log is not None:
            # Flushed per record: tests read the log right after killing clients.
            self._log.write(orjson.dumps(record) + b"\n")
            self._log.flush()

    def add_response(self, response: dict[str, Any]) -> None:
        """Count one chat request's answer and keep it (dropping the oldest past ``keep_records``)."""
        self.response_count += 1
        if self.keep_records != 0:
            self._responses.append(response)

    @property
    def records_dropped(self) -> int:
        """How many billed records are no longer kept (0 while every one is)."""
        return self.billed_count - len(self._records)

    @property
    def responses_dropped(self) -> int:
        """How many chat answers are no longer kept in ``responses``."""
        return self.response_count - len(self._responses)

    def _require_all(self, what: str) -> None:
        if self.records_dropped:
            raise BillingRecordsDropped(
                f"{what}: {self.records_dropped:,} of {self.billed_count:,} billing records were dropped "
                f"(keep_records={self.keep_records:,}); the totals and counts stay exact, the billing log has "
                "every record, kept_records() has the latest"
            )

    @property
    def records(self) -> list[dict[str, Any]]:
        """Every billed record in billing order (a copy); raises BillingRecordsDropped once some were dropped."""
        self._require_all("records")
        return list(self._records)

    @property
    def responses(self) -> list[dict[str, Any]]:
        """Every chat answer in order (a copy); raises BillingRecordsDropped once some were dropped."""
        if self.responses_dropped:
            raise BillingRecordsDropped(
                f"responses: {self.responses_dropped:,} of {self.response_count:,} were dropped "
                f"(keep_records={self.keep_records:,}); kept_responses() has the latest"
            )
        return list(self._responses)

    def kept_records(self) -> list[dict[str, Any]]:
        """The records still kept (the latest ``keep_records``, in billing order); never raises."""
        return list(self._records)

    def kept_responses(self) -> list[dict[str, Any]]:
        """The chat answers still kept (the latest ``keep_records``, in order); never raises."""
        return list(self._responses)

    @property
    def spent_usd(self) -> float:
        """Everything billed so far, completed and cut (exact sum, at any scale)."""
        return self._total.value()

    def billed_usd(self) -> float:
        """Everything billed so far (the same exact sum as ``spent_usd``), for ``billed <= cap`` checks."""
        return self.spent_usd

    def record_for(self, request_id: str | None) -> dict[str, Any] | None:
        """The billed record of the request with this ``x-request-id``, or None (never billed).

        Raises BillingRecordsDropped for an id it does not hold once records were dropped: it
        cannot tell "never billed" from "billed and dropped".
        """
        if not request_id:
            return None
        record = self._by_request_id.get(request_id)
        if record is None:
            self._require_all(f"record_for({request_id!r})")
        return record

    def completed_total_usd(self) -> float:
        """Exact sum of ``total_cost_usd`` over completed requests (at any scale)."""
        return self._totals["completed"].value()

    def cut_total_usd(self) -> float:
        """Exact sum of ``total_cost_usd`` over cut requests (spend the client cannot confirm; at any scale)."""
        return self._totals["cut"].value()

    def completed_count_by_client_id(self) -> collections.Counter[str | None]:
        """Completed requests per ``X-Client-Request-Id``; a count above 1 means billed twice.

        Counted from the records: raises BillingRecordsDropped once some were dropped.
        """
        self._require_all("completed_count_by_client_id()")
        return collections.Counter(r["client_request_id"] for r in self._records if r["status"] == "completed")

    def completed(self) -> list[dict[str, Any]]:
        """The completed records; raises BillingRecordsDropped once some were dropped."""
        self._require_all("completed()")
        return [r for r in self._records if r["status"] == "completed"]

    def cut(self) -> list[dict[str, Any]]:
        """The cut records; raises BillingRecordsDropped once some were dropped."""
        self._require_all("cut()")
        return [r for r in self._records if r["status"] == "cut"]

    def close(self) -> None:
        """Close the billing log; records stay readable in memory."""
        if self._log is not None:
            self._log.close()
            self._log = None

    def _over_balance(self, balance_usd: float | None) -> bool:
        return balance_usd is not None and self._spent >= balance_usd


BILLING_KEY = web.AppKey("batchgate_simulator_billing", Billing)
CONFIG_KEY = web.AppKey("batchgate_simulator_config", SimulatorConfig)


class _Fault(enum.Enum):
    NONE = "none"
    RATE_LIMIT = "rate_limited"
    SERVER_ERROR = "server_error"
    RESET = "reset"
    STALL = "stall"
    MIDSTREAM = "midstream_error"


_STREAM_FAULTS = (_Fault.RESET, _Fault.STALL, _Fault.MIDSTREAM)


@dataclass(slots=True)
class _Request:
    """The parts of a chat request that shape the answer."""

    model: str
    messages: list[dict[str, Any]]
    max_tokens: int | None
    stream: bool
    n: int
    tools: list[str]  # function names offered, in order; empty when tools are off (absent or tool_choice "none")
    forced_tool: str | None  # tool_choice naming one function


@dataclass(slots=True)
class _ToolCall:
    id: str
    name: str
    args: list[str]  # argument text in pieces, one token each (the call's header is one more)


@dataclass(slots=True)
class _Choice:
    """One choice as generated: reasoning, then content or tool calls."""

    index: int
    reasoning: list[str]
    content: list[str]
    tool_calls: list[_ToolCall]
    finish_reason: str

    def tokens(self) -> int:
        return len(self.reasoning) + len(self.content) + sum(1 + len(c.args) for c in self.tool_calls)


@dataclass(slots=True)
class _Answer:
    """What the model 'generates' for one request, before any fault."""

    prompt_tokens: int
    choices: list[_Choice]
    plain: bool  # one choice of content only: the fast path streams it

    @property
    def pieces(self) -> list[str]:
        """Choice 0's content, one completion token each (a word plus a trailing space)."""
        return self.choices[0].content

    @property
    def finish_reason(self) -> str:
        return self.choices[0].finish_reason

    def completion_tokens(self) -> int:
        return sum(c.tokens() for c in self.choices)


#: One streamed chunk of a rich answer: (choice index, kind, text, tool-call index, tokens).
#: Kinds: "role", "reasoning", "content", "tool" (a call's header; text = its name), "args", "finish".
_Meta = tuple[int, str, str, int, int]


@dataclass(slots=True)
class _Call:
    """One accepted chat-completions request."""

    request_id: str
    response_id: str
    client_request_id: str | None
    model: str
    stream: bool
    answer: _Answer
    price_factor: float
    separate_usage: bool
    reasoning_model: bool
    meta: list[_Meta] | None = None  # rich answers: what each chunk carries, for billing a cut
    slot: _KeyState | None = None  # the key's in-flight slot, released when the answer is out


class _HttpError(Exception):
    def __init__(self, status: int, type_: str, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.code = code
        self.message = message
        self.headers = headers

    def response(self, request_id: str | None = None, extra: dict[str, Any] | None = None) -> web.Response:
        """The JSON error answer; ``extra`` adds top-level keys (``/api/v1`` bodies carry ``requestId``)."""
        body: dict[str, Any] = {"error": {"message": self.message, "type": self.type, "code": self.code}}
        if extra:
            body.update(extra)
        resp = web.Response(
            status=self.status, body=orjson.dumps(body), content_type="application/json", headers=self.headers
        )
        if request_id is not None:
            resp.headers[_REQUEST_ID] = request_id
        return resp


def _bad(message: str) -> _HttpError:
    return _HttpError(400, "invalid_request_error", "invalid_request_error", message)


class _KeyState:
    """One key's in-flight count and its two fixed request windows (the minute and the burst)."""

    __slots__ = ("burst_count", "burst_start", "in_flight", "minute_count", "minute_start")

    def __init__(self) -> None:
        self.in_flight = 0
        self.minute_start = -math.inf
        self.minute_count = 0
        self.burst_start = -math.inf
        self.burst_count = 0

    def idle(self, config: SimulatorConfig, now: float) -> bool:
        """Nothing in flight and both windows over: the state of a key never seen (so it can be forgotten)."""
        return (
            self.in_flight == 0
            and now - self.minute_start >= 60.0
            and now - self.burst_start >= config.key_burst_window_s
        )

    def admit(self, config: SimulatorConfig, now: float) -> tuple[str, str, float] | None:
        """Take a slot and count the request; or (event, message, Retry-After s) with nothing taken."""
        if self.in_flight >= config.key_concurrency_limit:
            message = f"concurrency limit: {config.key_concurrency_limit} requests in flight for this key"
            return "key_concurrency_limited", message, config.limit_retry_after_s
        # A window opens with the first request after the last one closed (as an expiring counter does).
        if now - self.minute_start >= 60.0:
            self.minute_start, self.minute_count = now, 0
        window = config.key_burst_window_s
        if now - self.burst_start >= window:
            self.burst_start, self.burst_count = now, 0
        wait, message = 0.0, ""
        if self.minute_count >= config.key_rpm_limit:
            wait = self.minute_start + 60.0 - now
            message = f"rate limit: {config.key_rpm_limit} requests per minute for this key"
        if self.burst_count >= config.key_burst_limit:
            wait = max(wait, self.burst_start + window - now)
            message = f"rate limit: {config.key_burst_limit} requests per {window:g} s for this key"
        if wait > 0:
            # Whole seconds, as HTTP's Retry-After has them.
            return "key_rate_limited", message, float(max(1, math.ceil(wait)))
        self.minute_count += 1
        self.burst_count += 1
        self.in_flight += 1
        return None


def _content_chars(content: Any) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):  # OpenAI content parts
        return sum(
            len(part["text"]) if isinstance(part, dict) and isinstance(part.get("text"), str) else 0 for part in content
        )
    return len(orjson.dumps(content))


def _prompt_tokens(messages: list[dict[str, Any]]) -> int:
    return sum(math.ceil(_content_chars(m.get("content")) / 4) + 4 for m in messages)


def _parse_body(raw: bytes) -> _Request:
    """The answer-shaping parts of a request body; raises a 400 ``_HttpError``."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _bad(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' must be a non-empty string")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list")
    if not all(isinstance(m, dict) for m in messages):
        raise _bad("every message must be an object")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if max_tokens is not None and (type(max_tokens) is not int or max_tokens < 1):
        raise _bad("'max_tokens' must be a positive integer")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean")
    n = body.get("n", 1)
    if n is None:
        n = 1
    if type(n) is not int or not 1 <= n <= _MAX_N:
        raise _bad(f"'n' must be an integer from 1 to {_MAX_N}")
    tools, forced = _parse_tools(body.get("tools"), body.get("tool_choice"))
    return _Request(model, messages, max_tokens, stream, n, tools, forced)


def _parse_tools(tools: Any, choice: Any) -> tuple[list[str], str | None]:
    """(function names, the one tool_choice forces or None); no names when tools are off."""
    if tools is None:
        return [], None
    if not isinstance(tools, list) or not tools:
        raise _bad("'tools' must be a non-empty list")
    names: list[str] = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(name, str) or not name:
            raise _bad("every tool must be {'type': 'function', 'function': {'name': ...}}")
        names.append(name)
    if choice is None or choice in ("auto", "required"):
        return names, None
    if choice == "none":
        return [], None
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or name not in names:
        raise _bad("'tool_choice' must be 'none', 'auto', 'required' or name one of the tools")
    return names, name


def _answer(config: SimulatorConfig, req: _Request, growth_steps: int = 0) -> _Answer:
    """The deterministic answer: words and length hang on (seed, model, messages), max_tokens cuts it."""
    canonical = orjson.dumps(req.messages, option=orjson.OPT_SORT_KEYS)
    prompt_tokens = _prompt_tokens(req.messages)
    limit = config.default_max_tokens
    if req.max_tokens is not None and not config.ignore_max_tokens:
        limit = req.max_tokens
    reasoning = req.model in config.reasoning_models
    choices = [
        _choice(config, req, canonical, index, prompt_tokens, limit, reasoning, growth_steps) for index in range(req.n)
    ]
    plain = req.n == 1 and not reasoning and not req.tools
    return _Answer(prompt_tokens, choices, plain)


def _choice(
    config: SimulatorConfig,
    req: _Request,
    canonical: bytes,
    index: int,
    prompt_tokens: int,
    limit: int,
    reasoning: bool,
    growth_steps: int,
) -> _Choice:
    key = b"%d\0%s\0%s" % (config.seed, req.model.encode(), canonical)
    if index:
        key += b"\0%d" % index
    seed = int.from_bytes(hashlib.blake2b(key, digest_size=16).digest(), "big")
    rng = random.Random(seed)
    lo, hi = config.min_completion_tokens, config.max_completion_tokens
    # Longer prompts get longer answers (plus noise), so estimating cost from prompt size works.
    natural = min(hi, max(lo, lo + prompt_tokens // 2 + rng.randint(0, (hi - lo) // 8)))
    pieces = rng.choices(_PIECES, k=natural)
    # Reasoning, tool calls and long answers draw from a second generator, so neither a cap nor these
    # options change the words: a capped answer is a prefix of the uncapped one.
    extra = random.Random(seed ^ 0x5EED) if reasoning or req.tools or config.long_answer_rate > 0 else rng
    want = natural
    if config.long_answer_rate > 0 and extra.random() < config.long_answer_rate:
        want = max(want, limit + 1)  # it would go on: cut at the cap, "length"
    elif growth_steps:
        want = max(want, round(natural * config.growth_factor**growth_steps))
    budget = limit
    thoughts: list[str] = []
    if reasoning:
        thoughts = extra.choices(_PIECES, k=natural // 2 + 1 + extra.randint(0, natural // 4))[:budget]
        budget -= len(thoughts)
    if req.tools:
        calls: list[_ToolCall] = []
        count = 1 + (len(req.tools) > 1 and extra.random() < 0.5)
        cut = False
        for j in range(count):
            name = req.forced_tool or req.tools[(index + j) % len(req.tools)]
            words = "".join(extra.choices(_PIECES, k=max(2, want // 3))).strip()
            text = orjson.dumps({"query": words, "limit": j + 1}).decode()
            args = [text[i : i + _ARG_PIECE_CHARS] for i in range(0, len(text), _ARG_PIECE_CHARS)]
            call_id = f"call_{extra.getrandbits(64):016x}"
            if budget < 1:
                cut = True
                break
            if 1 + len(args) > budget:
                args, cut = args[: budget - 1], True
            calls.append(_ToolCall(call_id, name, args))
            budget -= 1 + len(args)
        return _Choice(index, thoughts, [], calls, "length" if cut else "tool_calls")
    if want > natural:
        # Answers that outgrow their natural length: more words, drawn after the first ones.
        pieces += rng.choices(_PIECES, k=max(0, min(want, budget + 1) - natural))
    if budget < want:
        return _Choice(index, thoughts, pieces[: max(0, budget)], [], "length")
    return _Choice(index, thoughts, pieces, [], "stop")


def _usage(
    config: SimulatorConfig, model: str, prompt_tokens: int, completion_tokens: int, price_factor: float = 1.0
) -> dict[str, Any]:
    base, fee, total = config.costs(model, prompt_tokens, completion_tokens, price_factor)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "base_cost_usd": base,
        "platform_fee_usd": fee,
        "total_cost_usd": total,
    }


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _rich_meta(answer: _Answer, per_chunk: int) -> list[_Meta]:
    """The chunks of a rich answer in stream order: each choice's in turn, interleaved round-robin."""
    lists: list[list[_Meta]] = []
    for choice in answer.choices:
        i = choice.index
        items: list[_Meta] = [(i, "role", "", 0, 0)]
        for kind, pieces in (("reasoning", choice.reasoning), ("content", choice.content)):
            for k in range(0, len(pieces), per_chunk):
                part = pieces[k : k + per_chunk]
                items.append((i, kind, "".join(part), 0, len(part)))
        for j, call in enumerate(choice.tool_calls):
            items.append((i, "tool", call.name, j, 1))
            for k in range(0, len(call.args), per_chunk):
                part = call.args[k : k + per_chunk]
                items.append((i, "args", "".join(part), j, len(part)))
        items.append((i, "finish", choice.finish_reason, 0, 0))
        lists.append(items)
    if len(lists) == 1:
        return lists[0]
    return [m for group in itertools.zip_longest(*lists) for m in group if m is not None]


def _rich_choice(answer: _Answer, meta: _Meta) -> dict[str, Any]:
    """The ``choices[]`` element of one rich chunk."""
    i, kind, text, j, _ = meta
    delta: dict[str, Any]
    if kind == "finish":
        return {"index": i, "delta": {}, "finish_reason": text}
    if kind == "role":
        delta = {"role": "assistant", "content": None if answer.choices[i].tool_calls else ""}
    elif kind == "reasoning":
        delta = {"content": None, "reasoning_content": text}
    elif kind == "content":
        delta = {"content": text}
    elif kind == "tool":
        call = answer.choices[i].tool_calls[j]
        function = {"name": call.name, "arguments": ""}
        delta = {"tool_calls": [{"index": j, "id": call.id, "type": "function", "function": function}]}
    else:
        delta = {"tool_calls": [{"index": j, "function": {"arguments": text}}]}
    return {"index": i, "delta": delta, "finish_reason": None}


def _sent_choices(answer: _Answer, meta: list[_Meta]) -> tuple[int, list[dict[str, Any]]]:
    """(completion tokens, each choice as the client got it) for the chunks in ``meta``."""
    parts: list[dict[str, Any]] = [
        {"content": [], "reasoning": [], "tool_calls": {}, "finish_reason": None} for _ in answer.choices
    ]
    tokens = 0
    for i, kind, text, j, count in meta:
        tokens += count
        part = parts[i]
        if kind in ("content", "reasoning"):
            part[kind].append(text)
        elif kind == "tool":
            call = answer.choices[i].tool_calls[j]
            function = {"name": call.name, "arguments": ""}
            part["tool_calls"][j] = {"index": j, "id": call.id, "type": "function", "function": function}
        elif kind == "args":
            part["tool_calls"][j]["function"]["arguments"] += text
        elif kind == "finish":
            part["finish_reason"] = text
    choices = [
        {
            "index": i,
            "content": "".join(part["content"]),
            "reasoning": "".join(part["reasoning"]) or None,
            "tool_calls": list(part["tool_calls"].values()) or None,
            "finish_reason": part["finish_reason"],
        }
        for i, part in enumerate(parts)
    ]
    return tokens, choices


class _SSEResponse(web.StreamResponse):
    # Hold the headers back so they leave with the first chunk: one send() for a whole fast stream.
    _send_headers_immediately = False


class _Out:
    """Buffered chunk writer for one stream; ``sent`` counts units (tokens, or a rich answer's chunks) sent."""

    __slots__ = ("billed", "buf", "pending", "resp", "sent", "usage_written")

    def __init__(self, resp: web.StreamResponse) -> None:
        self.resp = resp
        self.buf: list[bytes] = []
        self.pending = 0
        self.sent = 0
        self.usage_written = False
        self.billed = False  # the fault's own cut billed it: nothing more to bill at the end

    async def flush(self, *, last: bool = False) -> None:
        """Write the buffer; ``last`` also ends the chunked body (the buffer holds the usage chunk)."""
        data = b"".join(self.buf)
        units = self.pending
        self.buf.clear()
        self.pending = 0
        try:
            if last:
                await self.resp.write_eof(data)
            elif data:
                await self.resp.write(data)
        except asyncio.CancelledError:
            # aiohttp hands the bytes to the transport before it can block in drain().
            self.sent += units
            self.usage_written = last
            raise
        self.sent += units
        self.usage_written = last


#: How many keys' limit states a simulator holds before it forgets the idle ones.
_KEYS_SWEEP_AT = 4096

#: What whoami reports as the balance when ``balance_usd`` is None (unlimited).
_UNLIMITED_BALANCE_USD = 1_000_000.0


class _Simulator:
    """Request handlers bound to one config, one account and one fault RNG."""

    def __init__(self, config: SimulatorConfig, billing: Billing) -> None:
        self.config = config
        self.billing = billing
        self.rng = random.Random(config.seed)
        self.requests = 0
        self.model_listings = 0
        self.keys: dict[str, _KeyState] = {}
        self._keys_sweep_at = _KEYS_SWEEP_AT  # forget idle keys when there are this many
        # Unique across restarts (a resumed run meets a new server), cheap per request.
        self._id_prefix = f"req_{secrets.token_hex(5)}"
        self._ids = itertools.count(1)
        # Disjoint slices of [0, 1): each fault's probability is exactly its rate.
        self.fault_edges: list[tuple[float, _Fault]] = []
        edge = 0.0
        rates = config.fault_rates()
        for fault in (_Fault.RATE_LIMIT, _Fault.SERVER_ERROR, _Fault.RESET, _Fault.STALL, _Fault.MIDSTREAM):
            rate = rates[fault.value]
            if rate > 0:
                edge += rate
                self.fault_edges.append((edge, fault))

    def next_request_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids):010x}"

    def price_factor(self) -> float:
        """What prices are multiplied by now (``price_step_factor`` per ``price_step_every`` billed requests)."""
        every = self.config.price_step_every
        if every is None:
            return 1.0
        return float(self.config.price_step_factor ** (self.billing.billed_count // every))

    def _check_auth(self, request: web.Request, *, account: bool = True) -> str:
        """The key; 401 without one, 403 when the account is deactivated (unless ``account`` is False)."""
        auth = request.headers.get("Authorization", "")
        scheme, _, key = auth.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key.startswith("gp-"):
            self.billing.events["unauthorized"] += 1
            message = "missing API key" if not auth else "invalid API key (GonkaGate keys start with 'gp-')"
            raise _HttpError(401, "authentication_error", "invalid_api_key", message)
        if account and self.config.account_deactivated:
            self.billing.events["forbidden"] += 1
            raise _HttpError(403, "permission_error", "account_deactivated", "this account is deactivated")
        return key

    def _admit(self, key: str) -> _KeyState:
        now = time.monotonic()
        state = self.keys.get(key)
        if state is None:
            if len(self.keys) >= self._keys_sweep_at:
                self._forget_idle_keys(now)
            state = self.keys[key] = _KeyState()
        refused = state.admit(self.config, now)
        if refused is not None:
            event, message, retry_after = refused
            self.billing.events[event] += 1
            raise _HttpError(
                429, "rate_limit_error", "rate_limit_exceeded", message, {"Retry-After": f"{retry_after:g}"}
            )
        return state

    def _forget_idle_keys(self, now: float) -> None:
        """Drop the keys whose state is that of a new key, so many keys' states do not pile up.

        The next sweep waits until the dict has doubled from what is left (amortised O(1) per key).
        """
        config = self.config
        self.keys = {key: state for key, state in self.keys.items() if not state.idle(config, now)}
        self._keys_sweep_at = max(_KEYS_SWEEP_AT, 2 * len(self.keys))

    @staticmethod
    def _release(call: _Call) -> None:
        """Give the key's slot back (before the last write, so a client that saw [DONE] finds it free)."""
        if call.slot is not None:
            call.slot.in_flight -= 1
            call.slot = None

    # -- the catalog and the account -------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        config = self.config
        try:
            self._check_auth(request)
            self.model_listings += 1
            if config.models_unavailable == -1 or self.model_listings <= config.models_unavailable:
                raise _HttpError(
                    503,
                    "service_unavailable",
                    "service_unavailable",
                    "the model catalog is loading, retry shortly",
                    {"Retry-After": "1"},
                )
        except _HttpError as exc:
            return exc.response()
        factor = self.price_factor()
        data = [
            {
                "id": model,
                "object": "model",
                "created": 0,
                "owned_by": "batchgate-simulator",
                "pricing": {"prompt_usd_per_1m": prices[0] * factor, "completion_usd_per_1m": prices[1] * factor},
            }
            for model, prices in ([] if config.models_empty else config.prices.items())
        ]
        return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type="application/json")

    async def whoami(self, request: web.Request) -> web.Response:
        config = self.config
        try:
            if not config.account_endpoints:
                raise _HttpError(404, "invalid_request_error", "not_found", "no such endpoint")
            self._check_auth(request, account=False)
        except _HttpError as exc:
            request_id = self.next_request_id()
            return exc.response(request_id, {"success": False, "requestId": request_id})
        balance = _UNLIMITED_BALANCE_USD if config.balance_usd is None else config.balance_usd
        remaining = max(0.0, balance - self.billing._spent)
        status = "suspended" if remaining <= 0 else "low" if remaining < 0.1 * balance else "active"
        if config.account_deactivated:
            status = "suspended"
        body = {
            "success": True,
            "data": {
                "apiKey": {"status": "active", "name": "batchgate-simulator"},
                "balance": {"usd": f"{remaining:.6f}", "status": status},
            },
        }
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def pricing(self, request: web.Request) -> web.Response:
        config = self.config
        if not config.account_endpoints:
            request_id = self.next_request_id()
            error = _HttpError(404, "invalid_request_error", "not_found", "no such endpoint")
            return error.response(request_id, {"success": False, "requestId": request_id})
        factor, rate = self.price_factor(), config.platform_fee_rate
        models = []
        for model, (in_price, out_price) in config.prices.items():
            # One published price per model: the completion price, the upper bound of what a token costs.
            network = out_price * factor
            models.append(
                {
                    "id": model,
                    "usdPer1MTokens": {
                        "network": network,
                        "platformFee": network * rate,
                        "total": network * (1 + rate),
                    },
                    "simulator": {"prompt_usd_per_1m": in_price * factor, "completion_usd_per_1m": network},
                }
            )
        body = {"success": True, "data": {"fees": {"platformFeeRate": rate}, "models": models}}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def not_found(self, request: web.Request) -> web.Response:
        known = {"/v1/chat/completions", "/v1/models", "/api/v1/whoami", "/api/v1/public/pricing"}
        if request.path in known:
            error = _HttpError(405, "invalid_request_error", "method_not_allowed", f"{request.method} not allowed here")
        else:
            error = _HttpError(404, "invalid_request_error", "not_found", f"no such endpoint: {request.path}")
        return error.response()

    # -- chat completions ------------------------------------------------------------------------

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        config = self.config
        billing = self.billing
        request_id = self.next_request_id()
        client_request_id = request.headers.get("X-Client-Request-Id")
        slot: _KeyState | None = None
        call: _Call | None = None
        try:
            try:
                key = self._check_auth(request)
                if config.key_limits:
                    slot = self._admit(key)
                try:
                    req = _parse_body(await request.read())
                except _HttpError:
                    billing.events["bad_request"] += 1
                    raise
                if config.strict_models and req.model not in config.prices:
                    billing.events["model_not_found"] += 1
                    raise _HttpError(
                        404,
                        "invalid_request_error",
                        "model_not_found",
                        f"model {req.model!r} does not exist; GET /v1/models lists the ids",
                    )
                if billing._over_balance(config.balance_usd):
                    billing.events["insufficient_balance"] += 1
                    spent = f"${billing._spent:.6f} of ${config.balance_usd}"
                    message = f"insufficient balance: {spent} spent; top up to continue"
                    if config.quota_status == 402:
                        raise _HttpError(402, "insufficient_balance", "insufficient_balance", message)
                    raise _HttpError(429, "insufficient_quota", "insufficient_quota", message)
                # Always three draws per request, so one seed gives one fault sequence.
                fault_u, position_u, stream_seed = (
                    self.rng.random(),
                    self.rng.random(),
                    self.rng.getrandbits(32),
                )
                fault = next((f for edge, f in self.fault_edges if fault_u < edge), _Fault.NONE)
                if fault is _Fault.RATE_LIMIT:
                    billing.events["rate_limited"] += 1
                    raise _HttpError(
                        429,
                        "rate_limit_error",
                        config.rate_limit_code,
                        "rate limit exceeded, retry later",
                        {"Retry-After": f"{config.retry_after_s:g}"},
                    )
                if fault is _Fault.SERVER_ERROR:
                    billing.events["server_error"] += 1
                    statuses = config.server_error_statuses
                    status = statuses[int(position_u * len(statuses))]
                    code = _SERVER_ERROR_CODES[status]
                    raise _HttpError(status, "server_error", code, f"upstream error ({code})")
            except _HttpError as exc:
                billing.add_response(
                    {
                        "request_id": request_id,
                        "client_request_id": client_request_id,
                        "status": exc.status,
                        "code": exc.code,
                    }
                )
                return exc.response(request_id)

            self.requests += 1
            growth = (self.requests - 1) // config.growth_every if config.growth_every else 0
            answer = _answer(config, req, growth)
            call = _Call(
                request_id=request_id,
                response_id=f"chatcmpl-sim{config.seed:x}x{self.requests:08d}",
                client_request_id=client_request_id,
                model=req.model,
                stream=req.stream,
                answer=answer,
                price_factor=self.price_factor(),
                # The low bits of the stream seed: no extra draw, so fault sequences stay as they were.
                separate_usage=(stream_seed & 0xFFFF) < config.separate_usage_rate * 0x10000,
                reasoning_model=req.model in config.reasoning_models,
                slot=slot,
            )
            slot = None  # the call owns it now
            billing.add_response(
                {"request_id": request_id, "client_request_id": client_request_id, "status": 200, "code": None}
            )
            if not req.stream:
                return self._json_answer(call)
            if fault not in _STREAM_FAULTS:
                fault = _Fault.NONE
            else:
                billing.events[fault.value] += 1
            if answer.plain:
                return await self._stream(request, call, fault, position_u, stream_seed)
            return await self._stream_rich(request, call, fault, position_u, stream_seed)
        finally:
            if slot is not None:
                slot.in_flight -= 1
            if call is not None:
                self._release(call)

    def _bill(self, call: _Call, units: int | None, status: str, fault: str | None) -> dict[str, Any]:
        """Record one billed request; ``units`` sent (None = all of it).  Returns the usage object to send.

        A plain answer's units are tokens; a rich answer's are its chunks (``call.meta``).
        """
        answer = call.answer
        reasoning: str | None = None
        tool_calls: list[dict[str, Any]] | None = None
        choices: list[dict[str, Any]] | None = None
        if answer.plain:
            pieces = answer.pieces
            tokens = len(pieces) if units is None else units
            content = "".join(pieces[:tokens])
        else:
            meta = call.meta if call.meta is not None else _rich_meta(answer, 1)
            tokens, sent = _sent_choices(answer, meta if units is None else meta[:units])
            first = sent[0]
            content, reasoning, tool_calls = first["content"], first["reasoning"], first["tool_calls"]
            if len(sent) > 1:
                choices = sent
        usage = _usage(self.config, call.model, answer.prompt_tokens, tokens, call.price_factor)
        self.billing.add(
            {
                "seq": 0,
                "request_id": call.request_id,
                "response_id": call.response_id,
                "client_request_id": call.client_request_id,
                "model": call.model,
                "stream": call.stream,
                "status": status,
                "fault": fault,
                "finish_reason": answer.finish_reason if status == "completed" else None,
                "prompt_tokens": answer.prompt_tokens,
                "completion_tokens": tokens,
                "base_cost_usd": usage["base_cost_usd"],
                "platform_fee_usd": usage["platform_fee_usd"],
                "total_cost_usd": usage["total_cost_usd"],
                "price_factor": call.price_factor,
                "content": content,
                "reasoning": reasoning,
                "tool_calls": tool_calls,
                "choices": choices,
                "at": _now_iso(),
            }
        )
        return usage

    def _json_answer(self, call: _Call) -> web.Response:
        answer = call.answer
        usage = self._bill(call, None, "completed", None)
        if answer.plain:
            message: dict[str, Any] = {"role": "assistant", "content": "".join(answer.pieces)}
            choices = [{"index": 0, "message": message, "finish_reason": answer.finish_reason}]
        else:
            choices = []
            for sent in _sent_choices(answer, _rich_meta(answer, 1))[1]:
                message = {"role": "assistant", "content": None if sent["tool_calls"] else sent["content"]}
                if call.reasoning_model:
                    message["reasoning_content"] = sent["reasoning"] or ""
                if sent["tool_calls"]:
                    message["tool_calls"] = sent["tool_calls"]
                choices.append({"index": sent["index"], "message": message, "finish_reason": sent["finish_reason"]})
        body = {
            "id": call.response_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": call.model,
            "choices": choices,
            "usage": usage,
        }
        self._release(call)
        return web.Response(
            body=orjson.dumps(body), content_type="application/json", headers={_REQUEST_ID: call.request_id}
        )

    def _head(self, call: _Call, created: int) -> bytes:
        return b'data: {"id":"%s","object":"chat.completion.chunk","created":%d,"model":%s,"choices":[' % (
            call.response_id.encode(),
            created,
            orjson.dumps(call.model),
        )

    def _final(self, call: _Call, head: bytes, finish: bytes, usage: dict[str, Any]) -> bytes:
        """The finish chunk (``finish`` is its choice object) with usage inside it or after it, and [DONE]."""
        if call.separate_usage:
            return head + finish + b"]}\n\n" + head + b'],"usage":' + orjson.dumps(usage) + b"}\n\n" + _DONE
        return head + finish + b'],"usage":' + orjson.dumps(usage) + b"}\n\n" + _DONE

    async def _prepare(self, request: web.Request, call: _Call) -> tuple[_SSEResponse, _Out]:
        resp = _SSEResponse(headers=_SSE_HEADERS)
        resp.headers[_REQUEST_ID] = call.request_id
        await resp.prepare(request)
        return resp, _Out(resp)

    async def _at_fault(
        self, request: web.Request, call: _Call, resp: web.StreamResponse, out: _Out, fault: _Fault
    ) -> bool:
        """At the fault's position: stall, then go on (False), or cut the stream there, billed (True)."""
        await out.flush()
        if fault is _Fault.STALL:
            await self._stall(request)
            return False
        if fault is _Fault.MIDSTREAM:
            out.buf.append(_MIDSTREAM_ERROR)
            await out.flush()
        out.billed = True
        self._end_cut(request, call, out.sent, fault)
        if fault is _Fault.MIDSTREAM:
            with contextlib.suppress(ConnectionResetError):
                await resp.write_eof()
        return True

    def _bill_at_end(self, call: _Call, out: _Out, fault: _Fault) -> None:
        """However the stream ended, unless its fault billed the cut: completed once its usage went out,
        else cut where it stood (a stall, or the client leaving)."""
        if out.billed:
            return
        if out.usage_written:
            self._bill(call, None, "completed", "stall" if fault is _Fault.STALL else None)
        else:
            self._bill(call, out.sent, "cut", "stall" if fault is _Fault.STALL else "disconnect")

    def _end_cut(self, request: web.Request, call: _Call, units: int, fault: _Fault) -> None:
        self._release(call)
        self._bill(call, units, "cut", fault.value)
        if fault is _Fault.RESET and request.transport is not None:
            # close() still delivers what was written, then FIN: the client sees a chunked body
            # that never ends (ClientPayloadError) after exactly k tokens.
            request.transport.close()

    async def _stream(
        self, request: web.Request, call: _Call, fault: _Fault, position_u: float, keepalive_seed: int
    ) -> web.StreamResponse:
        """Write a plain SSE answer, injecting ``fault`` before token ``fault_at``; bill it either way."""
        config = self.config
        created = int(time.time())
        head = self._head(call, created)
        content_head = head + b'{"index":0,"delta":{"content":'
        pieces = call.answer.pieces
        n = len(pieces)
        # 1 <= k < n; a one-token answer can only fail before its token.
        fault_at = -1 if fault is _Fault.NONE else 1 + int(position_u * (n - 1)) if n > 1 else 0
        per_chunk = config.tokens_per_chunk
        delay = config.token_delay_s
        keepalive_rate = config.keepalive_rate
        keepalive_rng = random.Random(keepalive_seed) if keepalive_rate > 0 else None
        batch_limit = _CHUNKS_PER_WRITE if delay == 0 else 1

        resp, out = await self._prepare(request, call)
        out.buf.append(head + _ROLE_DELTA)
        # Set to None once billed; otherwise the finally clause bills the stream.
        try:
            if fault_at < 0 and keepalive_rng is None and delay == 0 and config.first_token_delay_s == 0:
                # Fast path: the whole answer in one write.
                if per_chunk == 1:
                    out.buf += [content_head + _PIECE_JSON[piece] + _CONTENT_TAIL for piece in pieces]
                else:
                    out.buf += [
                        content_head + orjson.dumps("".join(pieces[i : i + per_chunk])) + _CONTENT_TAIL
                        for i in range(0, n, per_chunk)
                    ]
                out.pending = n
            else:
                if config.first_token_delay_s > 0:
                    await out.flush()
                    await asyncio.sleep(config.first_token_delay_s)
                start = 0
                while start < n:
                    if start == fault_at and await self._at_fault(request, call, resp, out, fault):
                        return resp
                    # A chunk never straddles the fault position.
                    end = min(n, start + per_chunk, fault_at if start < fault_at else n)
                    if delay > 0 and start > 0:
                        await out.flush()
                        await asyncio.sleep(delay)
                    if keepalive_rng is not None and keepalive_rng.random() < keepalive_rate:
                        out.buf.append(_KEEPALIVE)
                    piece = pieces[start] if end - start == 1 else "".join(pieces[start:end])
                    out.buf.append(content_head + (_PIECE_JSON.get(piece) or orjson.dumps(piece)) + _CONTENT_TAIL)
                    out.pending += end - start
                    if len(out.buf) >= batch_limit:
                        await out.flush()
                    start = end
            finish = b'{"index":0,"delta":{},"finish_reason":"%s"}' % call.answer.finish_reason.encode()
            usage = _usage(config, call.model, call.answer.prompt_tokens, n, call.price_factor)
            out.buf.append(self._final(call, head, finish, usage))
            self._release(call)
            await out.flush(last=True)
        except ConnectionResetError:
            # The client went away; aiohttp's own write_eof() after we return fails quietly.
            return resp
        finally:
            self._bill_at_end(call, out, fault)
        return resp

    async def _stream_rich(
        self, request: web.Request, call: _Call, fault: _Fault, position_u: float, keepalive_seed: int
    ) -> web.StreamResponse:
        """Write reasoning, tool calls and several choices; ``out`` counts chunks here, not tokens."""
        config = self.config
        answer = call.answer
        created = int(time.time())
        head = self._head(call, created)
        meta = call.meta = _rich_meta(answer, config.tokens_per_chunk)
        chunks = [head + orjson.dumps(_rich_choice(answer, m)) + b"]}\n\n" for m in meta[:-1]]
        with_tokens = [k for k, m in enumerate(meta) if m[4] > 0]
        fault_at = -1
        if fault is not _Fault.NONE and with_tokens:
            # Before a chunk with tokens, after at least one (unless there is only one).
            fault_at = with_tokens[1 + int(position_u * (len(with_tokens) - 1))] if len(with_tokens) > 1 else 0
        first_token = with_tokens[0] if with_tokens else -1
        delay = config.token_delay_s
        keepalive_rate = config.keepalive_rate
        keepalive_rng = random.Random(keepalive_seed) if keepalive_rate > 0 else None
        batch_limit = _CHUNKS_PER_WRITE if delay == 0 else 1

        resp, out = await self._prepare(request, call)
        try:
            for k, chunk in enumerate(chunks):
                if k == fault_at and await self._at_fault(request, call, resp, out, fault):
                    return resp
                if k == first_token and config.first_token_delay_s > 0:
                    await out.flush()
                    await asyncio.sleep(config.first_token_delay_s)
                elif delay > 0 and k > first_token >= 0 and meta[k][4] > 0:
                    await out.flush()
                    await asyncio.sleep(delay)
                if keepalive_rng is not None and keepalive_rng.random() < keepalive_rate:
                    out.buf.append(_KEEPALIVE)
                out.buf.append(chunk)
                out.pending += 1
                if len(out.buf) >= batch_limit:
                    await out.flush()
            usage = _usage(config, call.model, answer.prompt_tokens, answer.completion_tokens(), call.price_factor)
            out.buf.append(self._final(call, head, orjson.dumps(_rich_choice(answer, meta[-1])), usage))
            out.pending += 1
            self._release(call)
            await out.flush(last=True)
        except ConnectionResetError:
            return resp
        finally:
            self._bill_at_end(call, out, fault)
        return resp

    async def _stall(self, request: web.Request) -> None:
        """Send nothing for ``stall_s``; end early (as a disconnect) if the client leaves."""
        deadline = time.monotonic() + self.config.stall_s
        while True:
            transport = request.transport
            if transport is None or transport.is_closing():
                raise ConnectionResetError("client left during a stall")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            await asyncio.sleep(min(remaining, _STALL_POLL_S))


def create_app(config: SimulatorConfig) -> web.Application:
    """The simulator as an aiohttp app; ``app[BILLING_KEY]`` is its account.

    Run it with ``handler_cancellation=True`` and ``access_log=None`` (as :func:`running_simulator`
    does) so that a client leaving mid-stream is billed ``cut`` at once and nothing is logged per
    request.  The billing log is closed on app cleanup.
    """
    billing = Billing(config.billing_log, config.keep_records)
    simulator = _Simulator(config, billing)
    app = web.Application(client_max_size=64 * 1024**2)
    app[BILLING_KEY] = billing
    app[CONFIG_KEY] = config
    app.router.add_post("/v1/chat/completions", simulator.chat_completions)
    app.router.add_get("/v1/models", simulator.models)
    app.router.add_get("/api/v1/whoami", simulator.whoami)
    app.router.add_get("/api/v1/public/pricing", simulator.pricing)
    app.router.add_route("*", "/{tail:.*}", simulator.not_found)

    async def tag(_request: web.Request, response: web.StreamResponse) -> None:
        # Every response carries an x-request-id, as GonkaGate's do; chat answers set their own.
        if _REQUEST_ID not in response.headers:
            response.headers[_REQUEST_ID] = simulator.next_request_id()

    async def close_log(_app: web.Application) -> None:
        billing.close()

    app.on_response_prepare.append(tag)
    app.on_cleanup.append(close_log)
    return app


@dataclass(frozen=True)
class RunningSimulator:
    """A listening simulator: point a client at ``base_url``; read its account in ``billing``."""

    base_url: str
    billing: Billing
    config: SimulatorConfig
    host: str
    port: int
    app: web.Application


@contextlib.asynccontextmanager
async def running_simulator(
    config: SimulatorConfig, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[RunningSimulator]:
    """Serve the simulator on the current event loop for the ``async with`` body (port 0 = any free).

    On exit, open streams get a moment (up to ~0.5 s) to finish and are then cancelled and billed ``cut``.
    """
    app = create_app(config)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=_SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=4096)
        await site.start()
        bound_port = int(runner.addresses[0][1])
        url_host = f"[{host}]" if ":" in host else host
        yield RunningSimulator(
            base_url=f"http://{url_host}:{bound_port}/v1",
            billing=app[BILLING_KEY],
            config=config,
            host=host,
            port=bound_port,
            app=app,
        )
    finally:
        await runner.cleanup()


async def serve_forever(
    config: SimulatorConfig, host: str = "127.0.0.1", port: int = 0, on_ready: Callable[[str], None] = print
) -> None:
    """Serve until cancelled, calling ``on_ready(base_url)`` once listening (the CLI prints it)."""
    async with running_simulator(config, host, port) as sim:
        on_ready(sim.base_url)
        await asyncio.Event().wait()


def serve(
    config: SimulatorConfig, host: str = "127.0.0.1", port: int = 0, on_ready: Callable[[str], None] = print
) -> None:
    """Blocking entry for ``batchgate simulate``: serve until SIGINT or SIGTERM, then shut down cleanly.

    Shutting down bills open streams as ``cut`` and closes the billing log.
    """

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await serve_forever(config, host, port, on_ready)

    asyncio.run(main())
