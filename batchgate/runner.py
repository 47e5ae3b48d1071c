"""The asyncio scheduler: prompts in, ledger rows out.

A fixed pool of worker coroutines pulls validated prompts from one lazy iterator (so memory stays
flat whatever the input size), runs each through the retry policy, and appends one row per prompt
to the ledger.  A failed prompt never stops the batch; a run-wide condition does (HTTP 402, a
rejected key, an unreachable server, a budget, a signal): no new prompt starts, those in flight
finish, and everything is written.  Never prints: the CLI reads :attr:`Runner.summary` for
progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from . import jobs
from .client import Completion, ConnectFailed, StallWatch, make_session, request_headers, stream_completion
from .config import RunConfig
from .errors import (
    ApiError,
    AuthError,
    InputError,
    InsufficientBalance,
    Interrupted,
    LedgerError,
    RateLimited,
    RetryableError,
)
from .ledger import Ledger, lock_output_dir, write_atomic
from .models import LEDGER_VERSION, PromptRecord, RunSummary
from .pricing import Budget, PriceBook, RunningSum
from .retry import Outcome, RetryPolicy
from .throttle import Throttle

__all__ = ["EXIT_CODES", "Runner", "run"]

#: Exit code per stop reason; the README documents the same table.
EXIT_CODES = {
    None: 0,
    "failed": 1,
    "auth": 2,
    "unreachable": 2,
    "balance": 3,
    "budget": 3,
    "ledger": 1,
    "interrupted": 130,
    "terminated": 143,
}

_STREAM_OPTIONS = {"include_usage": True}


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Runner:
    """One run over some prompt files into one output directory."""

    def __init__(
        self, inputs: Sequence[str | Path], config: RunConfig, *, records: Sequence[PromptRecord] | None = None
    ) -> None:
        """``records``: run exactly these, already validated, instead of every prompt in ``inputs``.

        ``batchgate estimate`` runs the sample it drew that way, without two more passes over
        the inputs while its requests are in flight.
        """
        self.inputs = [Path(p) for p in inputs]
        self.config = config
        self.records = records
        self.run_id = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
        self.summary = RunSummary(run_id=self.run_id, out=str(config.out_dir))
        self.total = 0  # prompts in the inputs
        self.in_flight = 0
        self.prices = PriceBook()
        self.stop_message: str | None = None
        self._stop_reason: str | None = None
        self._ledger = Ledger(config.out_dir)
        self._flush_scheduled = False
        self._unpriced: list[tuple[str, int, int]] = []  # (model, prompt_chars, cut tokens)
        self._unconfirmed = RunningSum()
        self._confirmed = RunningSum()
        self._tasks: list[asyncio.Task[None]] = []
        # Key limits off until RunConfig carries key_concurrency / key_rpm / key_burst_10s (lead).
        self.throttle = Throttle(config.concurrency, config.rpm, key_concurrency=None, key_rpm=None, key_burst_10s=None)
        self.budget = Budget(config.max_cost_usd, self.prices) if config.max_cost_usd is not None else None
        self._probes: dict[str, asyncio.Event] = {}
        self._longest_completion: dict[str, int] = {}
        self._started = time.monotonic()
        self._any_response = False
        self._ledger_error: LedgerError | None = None

    # -- control ---------------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stop_reason is not None

    def request_stop(self, reason: str, message: str | None = None) -> None:
        """Start no new prompt; those in flight finish. The first reason given wins."""
        if self._stop_reason is None:
            self._stop_reason = reason
            self.stop_message = message

    def cancel_in_flight(self) -> None:
        """Abandon requests in flight now (a second signal); rows already written stay."""
        for task in self._tasks:
            task.cancel()

    # -- the run -----------------------------------------------------------------------------------

    async def run(self) -> RunSummary:
        """Validate, lock, resume, stream everything, write the ledger; return the summary.

        Raises InputError before any request when the inputs are invalid, OutputLocked when
        another runner owns the output directory.
        """
        cfg = self.config
        if self.records is None:
            report = jobs.validate(self.inputs, default_model=cfg.default_model, jobs=cfg.jobs)
            if not report.ok():
                raise InputError(report.format())
            self.total = report.records
        else:
            self.total = len(self.records)
        lock = lock_output_dir(cfg.out_dir)
        results: list[Any] = []
        try:
            index = self._ledger.open()
            self._done_ids = index.ok_ids
            records = self._pending_records()
            session = make_session(
                cfg.api_key,
                concurrency=cfg.concurrency,
                connect_timeout_s=cfg.connect_timeout_s,
                base_url=cfg.base_url,
            )
            self._watch = StallWatch(cfg.idle_timeout_s)
            policy = RetryPolicy(cfg.max_attempts, cfg.backoff_base_s, cfg.backoff_max_s, self._on_failed_attempt)
            url = cfg.base_url.rstrip("/") + "/chat/completions"
            try:
                async with session:
                    self._tasks = [
                        asyncio.create_task(self._worker(records, session, policy, url))
                        for _ in range(max(1, cfg.concurrency))
                    ]
                    results = await asyncio.gather(*self._tasks, return_exceptions=True)
            finally:
                await self._watch.close()
                try:
                    self._ledger.close()
                except LedgerError as exc:
                    self._ledger_error = exc
                self._finish()
                with contextlib.suppress(OSError):  # run.json is a convenience; the ledger is the record
                    write_atomic(
                        cfg.out_dir / "run.json", orjson.dumps(self.summary.as_dict(), option=orjson.OPT_INDENT_2)
                    )
        finally:
            lock.release()
        for res in results:
            if isinstance(res, Exception):
                raise res  # a bug: never hidden
        if self._ledger_error is not None:
            raise self._ledger_error
        return self.summary

    def _pending_records(self) -> Iterator[PromptRecord]:
        done = self._done_ids
        cfg = self.config
        source: Iterable[PromptRecord] = (
            self.records
            if self.records is not None  # an empty sample runs nothing, not everything
            else jobs.iter_records(self.inputs, default_model=cfg.default_model, jobs=cfg.jobs)
        )
        if not len(done):
            yield from source
            return
        # Resume: look ids up a batch at a time (one vectorised search) rather than one by one.
        records = iter(source)
        for batch in iter(lambda: list(itertools.islice(records, 512)), []):
            finished = done.contains([r.id for r in batch]).tolist()
            self.summary.skipped += sum(finished)
            yield from (r for r, skip in zip(batch, finished, strict=True) if not skip)

    async def _worker(self, records: Iterator[PromptRecord], session: Any, policy: RetryPolicy, url: str) -> None:
        throttle = self.throttle
        watch = self._watch
        for rec in records:
            if self._stop_reason is not None:
                return
            reserved = await self._admit(rec) if self.budget is not None else 0.0
            if reserved is None:
                return
            body = orjson.dumps(self._request_body(rec))
            headers = request_headers(rec.id)

            async def attempt(body: bytes = body, headers: dict[str, str] = headers) -> Completion:
                await throttle.acquire()
                try:
                    return await stream_completion(session, url, body, headers, watch)
                finally:
                    throttle.release()

            started_at = _utc_now()
            t0 = time.monotonic()
            self.in_flight += 1
            try:
                outcome = await policy.run(attempt)
            except asyncio.CancelledError as exc:
                self._record_interrupted(rec, getattr(exc, "received_tokens", 0), started_at, time.monotonic() - t0)
                raise
            finally:
                self.in_flight -= 1
                if self.budget is not None:
                    self._release_probe(rec.model)
            if outcome.completion is not None:
                throttle.on_success()
            spent = self._record(rec, outcome, started_at, time.monotonic() - t0)
            if self.budget is not None:
                self.budget.settle(reserved, spent)
            if self._stop_reason is not None:
                return

    def _record_interrupted(self, rec: PromptRecord, tokens: int, started_at: str, latency: float) -> None:
        """A stream abandoned after tokens arrived may have been billed: record it as unconfirmed."""
        if not tokens:
            return
        err = Interrupted("abandoned mid-stream by a second signal; the prompt is retried on resume")
        self._record(rec, Outcome(error=err, attempts=1, cut_tokens=tokens), started_at, latency)
        with contextlib.suppress(LedgerError):
            self._ledger.flush()

    def _request_body(self, rec: PromptRecord) -> dict[str, Any]:
        body = {**self.config.chat_defaults, **rec.body} if self.config.chat_defaults else dict(rec.body)
        system = self.config.system_prompt
        if system:
            messages = body.get("messages") or []
            if not messages or messages[0].get("role") != "system":
                body["messages"] = [{"role": "system", "content": system}, *messages]
        body["model"] = rec.model
        body["stream"] = True
        body["stream_options"] = _STREAM_OPTIONS
        return body

    async def _admit(self, rec: PromptRecord) -> float | None:
        """Reserve the prompt's worst case under --max-cost; None when the budget stops the run.

        Before a model's price is known nothing bounds a request, so one probe per model runs
        at a time and the others wait for the price it teaches.
        """
        budget = self.budget
        assert budget is not None
        while True:
            if self._stop_reason is not None:
                return None
            max_tokens = rec.body.get("max_tokens") or rec.body.get("max_completion_tokens")
            if not isinstance(max_tokens, int):
                max_tokens = max(256, 2 * self._longest_completion.get(rec.model, 0))
            worst = budget.worst_case(rec.model, rec.prompt_chars, max_tokens)
            if worst is None:
                probe = self._probes.get(rec.model)
                if probe is not None:
                    await probe.wait()
                    continue
                if budget.spent >= budget.cap_usd:
                    worst = float("inf")  # fall through to the stop below
                else:
                    self._probes[rec.model] = asyncio.Event()
                    return 0.0
            if budget.try_reserve(worst):
                return worst
            s = self.summary
            self.request_stop(
                "budget",
                f"--max-cost ${budget.cap_usd:.4f} reached: ${budget.spent:.6f} spent "
                f"(${s.total_cost_usd:.6f} confirmed, ~${s.unconfirmed_cost_usd:.6f} unconfirmed), "
                f"${budget.left_usd:.6f} left, not enough for the next prompt's worst case "
                f"(${worst:.6f}). Rerun with a higher --max-cost to resume.",
            )
            return None

    def _release_probe(self, model: str) -> None:
        # While a model's probe runs no other request of that model does, so it is the probe.
        probe = self._probes.pop(model, None)
        if probe is not None:
            probe.set()

    # -- bookkeeping -----------------------------------------------------------------------------

    def _on_failed_attempt(self, exc: ApiError) -> None:
        if isinstance(exc, RateLimited):
            self.summary.rate_limited += 1
            self.throttle.on_rate_limited(exc.retry_after)
        elif isinstance(exc, RetryableError):
            self.throttle.on_failure()
        if not isinstance(exc, ConnectFailed):
            self._any_response = True

    def _record(self, rec: PromptRecord, outcome: Outcome, started_at: str, latency: float) -> float:
        """Append the prompt's row; return what it spent (confirmed plus estimated unconfirmed)."""
        s = self.summary
        comp: Completion | None = outcome.completion
        usage = (comp.usage if comp else None) or {}
        cut_tokens = outcome.cut_tokens
        if comp is not None and not usage and comp.received_tokens:
            cut_tokens += comp.received_tokens  # [DONE] without a usage chunk: nothing confirms the cost
        total_cost = usage.get("total_cost_usd") or 0.0
        prompt_tokens = usage.get("prompt_tokens")
        completion_tokens = usage.get("completion_tokens")
        if usage and prompt_tokens is not None and completion_tokens is not None:
            self.prices.learn(rec.model, prompt_tokens, completion_tokens, total_cost, rec.prompt_chars)
            if completion_tokens > self._longest_completion.get(rec.model, 0):
                self._longest_completion[rec.model] = completion_tokens
        unconfirmed: float | None = 0.0
        if cut_tokens:
            unconfirmed = self.prices.estimate(rec.model, rec.prompt_chars, cut_tokens)
            if unconfirmed is None:
                self._unpriced.append((rec.model, rec.prompt_chars, cut_tokens))
            else:
                self._unconfirmed.add(unconfirmed)
        err = outcome.error
        status = "ok" if comp is not None else "failed"
        row = {
            "v": LEDGER_VERSION,
            "id": rec.id,
            "job": rec.job,
            "run_id": self.run_id,
            "model": rec.model,
            "status": status,
            "content": comp.content if comp else "",
            "finish_reason": comp.finish_reason if comp else None,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": usage.get("total_tokens"),
            "base_cost_usd": usage.get("base_cost_usd") or 0.0,
            "platform_fee_usd": usage.get("platform_fee_usd") or 0.0,
            "total_cost_usd": total_cost,
            "unconfirmed_completion_tokens": cut_tokens,
            "unconfirmed_cost_usd": unconfirmed,
            "attempts": outcome.attempts,
            "retry_causes": outcome.causes,
            "started_at": started_at,
            "ttft_s": round(comp.ttft_s, 6) if comp and comp.ttft_s is not None else None,
            "latency_s": round(latency, 6),
            "error": err.as_record() if err else None,
        }
        self._ledger.append(row)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

        s.requests += 1
        s.retries += outcome.attempts - 1
        if comp is not None:
            s.ok += 1
            self._any_response = True
            if total_cost:
                self._confirmed.add(total_cost)
                s.total_cost_usd += total_cost
            s.prompt_tokens += prompt_tokens or 0
            s.completion_tokens += completion_tokens or 0
        else:
            s.failed += 1
            kind = err.kind if err else "unknown"
            s.failures_by_cause[kind] = s.failures_by_cause.get(kind, 0) + 1
            self._on_final_error(err)
        if unconfirmed:
            s.unconfirmed_cost_usd += unconfirmed
        return total_cost + (unconfirmed or 0.0)

    def _on_final_error(self, err: ApiError | None) -> None:
        if isinstance(err, InsufficientBalance):
            self.request_stop(
                "balance",
                f"GonkaGate says the balance is spent (HTTP 402: {err.message}). Top up, then rerun the "
                "same command to resume: finished answers are kept and not bought again.",
            )
        elif isinstance(err, AuthError):
            self.request_stop("auth", f"GonkaGate rejected the API key (HTTP {err.status}: {err.message}).")
        elif isinstance(err, ConnectFailed) and not self._any_response:
            self.request_stop("unreachable", f"{err.message}; check --base-url and the network.")

    def _flush(self) -> None:
        self._flush_scheduled = False
        try:
            self._ledger.flush()
        except LedgerError as exc:
            # A full disk: rows stay queued for the next flush, and no new prompt starts, since
            # an answer that cannot be recorded would be bought again by the next run.
            self._ledger_error = exc
            self.request_stop("ledger", f"{exc}; stopped starting requests. Free space, then rerun to resume.")

    def _finish(self) -> None:
        s = self.summary
        s.wall_s = time.monotonic() - self._started
        s.slowdowns = self.throttle.slowdowns
        s.min_concurrency = int(self.throttle.min_limit_seen)
        s.outage_pauses = self.throttle.outage_pauses
        s.total_cost_usd = self._confirmed.value
        # Cut attempts seen before any price was known get priced with what the run learnt since.
        still_unpriced = 0
        for model, chars, tokens in self._unpriced:
            est = self.prices.estimate(model, chars, tokens)
            if est is None:
                still_unpriced += tokens
            else:
                self._unconfirmed.add(est)
        s.unconfirmed_cost_usd = self._unconfirmed.value
        s.unconfirmed_unpriced_tokens = still_unpriced
        reason = self._stop_reason
        if reason is None and s.failed:
            reason = "failed"
        s.stop_reason = self._stop_reason
        s.exit_code = EXIT_CODES.get(reason, 1)


async def run(inputs: Sequence[str | Path], config: RunConfig) -> RunSummary:
    """Library entry point: ``asyncio.run(batchgate.run([...], RunConfig(...)))``."""
    return await Runner(inputs, config).run()
