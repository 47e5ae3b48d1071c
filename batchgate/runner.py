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
import dataclasses
import hashlib
import itertools
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from . import account, jobs, resume
from .account import Balance
from .accounting import Accounts, Charge, combine_charges
from .budget import SPEND_NAME, CapBook, CapSpec, Reservation
from .cache import AnswerCache, cacheable, row_from_cache
from .client import (
    AttemptLimits,
    Completion,
    ConnectFailed,
    StallWatch,
    make_session,
    request_headers,
    stream_completion,
)
from .config import RunConfig, input_options, public_settings
from .errors import (
    ApiError,
    AuthError,
    BatchgateError,
    InputError,
    InsufficientBalance,
    Interrupted,
    LedgerError,
    LengthCut,
    RateLimited,
    RetryableError,
)
from .fingerprint import request_fingerprint
from .ledger import DonePrefix, IntentLog, Ledger, PossiblyBilled, ledger_spend, lock_output_dir, row_key, write_atomic
from .models import PromptRecord, RunSummary, StopReason
from .pricing import Budget, PriceBook
from .retry import Outcome, RetryPolicy
from .rows import make_row
from .structured import AnswerSchema, Verdict
from .throttle import Throttle

__all__ = ["EXIT_CODES", "Runner", "in_shard", "run"]

#: Exit code per stop reason (``StopReason.exit_code``); the README documents the same table.
EXIT_CODES: dict[str | None, int] = {None: 0, **{r.value: r.exit_code for r in StopReason}}

_STREAM_OPTIONS = {"include_usage": True}
_SYNC_EVERY_S = 1.0


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def in_shard(prompt_id: str, shard: tuple[int, int] | None) -> bool:
    """Whether ``prompt_id`` belongs to shard ``k`` of ``n`` (1-based): a stable hash, no coordination."""
    if shard is None:
        return True
    k, n = shard
    h = int.from_bytes(hashlib.blake2b(prompt_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")
    return h % n == k - 1


_Pending = tuple[PromptRecord, dict[str, Any], str, int]  # record, body to send, its fingerprint, its seq


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
        self.total = 0  # requests the inputs ask for (prompts x samples, in this shard)
        self.in_flight = 0
        self.retrying = 0  # prompts waiting to retry after a failed attempt
        self.last_error: str | None = None
        self.notices: list[str] = []  # things the user should know that are not errors (the CLI prints them)
        self.accounts = Accounts()
        self.prices: PriceBook = self.accounts.prices
        self.stop_message: str | None = None
        self._stop_reason: StopReason | None = None
        self._ledger = Ledger(config.out_dir)
        self._intents = IntentLog(config.out_dir, self.run_id)
        self._flush_scheduled = False
        self._tasks: list[asyncio.Task[None]] = []
        self.throttle = Throttle(
            config.concurrency,
            config.rpm,
            key_concurrency=config.key_concurrency,
            key_rpm=config.key_rpm,
            key_burst_10s=config.key_burst_10s,
        )
        self.budget = Budget(config.max_cost_usd, self.prices) if config.max_cost_usd is not None else None
        self._probes: dict[str, asyncio.Event] = {}
        self._started = time.monotonic()
        self._any_response = False
        self._ledger_error: LedgerError | None = None
        self._possibly_billed = PossiblyBilled()
        self._preflight_started = False
        self._preflight_done = asyncio.Event()
        self._settled = asyncio.Event()  # set (and replaced) each time a request settles its reservation
        self._reservations_out = 0
        self.caps: CapBook | None = None  # caps across runs (--max-total-cost, --daily-cap, --monthly-cap)
        self.cache: AnswerCache | None = None
        self._inputs_key: str | None = None
        self._models: dict[str, list[Any]] = {}  # model -> [path, line, records] of the inputs
        self.balance: Balance | None = None  # the key's balance at start, where the API tells it
        self._prefix: tuple[int, int, int] | None = None
        self._prefix_tail: tuple[int, int] | None = None
        self._watermark: resume.Watermark | None = None
        self._seq = 0  # requests seen in input order (done ones included)
        self._last_pos: tuple[int, int, int] | None = None
        self._exhausted = False
        self.schema: AnswerSchema | None = (
            AnswerSchema(config.json_schema, mode=config.json_mode, source="--json-schema")
            if config.json_schema is not None
            else None
        )

    # -- control ---------------------------------------------------------------------------------

    @property
    def _admitting(self) -> bool:
        """Whether each request must reserve its worst case first (a budget or a cap is set)."""
        return self.budget is not None or self.caps is not None

    @property
    def stopping(self) -> bool:
        return self._stop_reason is not None

    def request_stop(self, reason: str | StopReason, message: str | None = None) -> None:
        """Start no new prompt; those in flight finish. The first reason given wins."""
        if self._stop_reason is None:
            self._stop_reason = StopReason(reason)
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
        key = self._inputs_key = resume.inputs_key(self.inputs, self._shaping()) if self.records is None else None
        validated = resume.load_validation(cfg.out_dir, key)
        appended = (
            None
            if validated is not None or key is None
            else resume.appended_inputs(cfg.out_dir, self.inputs, self._shaping())
        )
        # The bytes of the inputs' sorted id digests, when they were (partly) validated now.
        ids: Iterable[bytes | memoryview] | None = None
        if self.records is not None:
            self.total = len(self.records) * cfg.samples
            for r in self.records:
                used = self._models.setdefault(r.model, [r.path, r.line, 0])
                used[2] += 1
        elif validated is not None:  # unchanged since a run validated them: no second look
            self.total = validated["records"]
            self._models = dict(validated.get("models") or {})
            if validated.get("warnings"):
                self.notices.append(validated["warnings"])
        elif (ids := self._validate_appended(appended)) is None:
            report = jobs.validate(self.inputs, **input_options(cfg))
            if not report.ok():
                raise InputError(report.format())
            if report.warnings:
                self.notices.append(report.format_warnings())
            self._models = report.models
            ids = [memoryview(report.ids).cast("B")]
            valid = report.records
            del report  # its id digests (8 bytes a prompt) must not live as long as the run
            if cfg.shard is None:
                self.total = valid * cfg.samples
            else:
                self.total = cfg.samples * sum(
                    1 for r in jobs.iter_records(self.inputs, **input_options(cfg)) if in_shard(r.id, cfg.shard)
                )
        lock = lock_output_dir(cfg.out_dir)
        results: list[Any] = []
        clean = False
        try:
            if validated is None or "files" not in validated:  # (an older batchgate stored none)
                notes = "\n".join(self.notices)
                files = appended.states if appended is not None else resume.file_states(self.inputs)
                resume.save_validation(cfg.out_dir, key, self.total, notes, self._models, write_atomic, files, ids)
            del ids  # flat memory: the id digests (8 bytes a prompt) do not outlive validation
            grown = None if appended is None else (appended.old_key, appended.first_grown)
            index = self._ledger.open(prefix_key=key, appended=grown)
            self._prefix = index.prefix
            self._prefix_tail = index.prefix_tail
            if index.unreadable_lines:
                lines = ", ".join(map(str, index.damaged_lines))
                more = "" if index.unreadable_lines <= len(index.damaged_lines) else ", ..."
                self.notices.append(
                    f"{self._ledger.path}: {index.unreadable_lines} damaged line(s) skipped (line {lines}{more}); "
                    "any answer they held is asked again"
                )
            if index.torn_bytes:
                self.notices.append(f"{self._ledger.path}: a torn last line was set aside into results.torn.jsonl")
            if index.spilled_rows:
                self.notices.append(f"{index.spilled_rows} row(s) an earlier run could not write were folded back in")
            self._answers = index.answers
            self._possibly_billed = self._intents.open()
            self._open_caps_and_cache()
            records = self._pending_records()
            self._write_run_file(finished=False)
            session = make_session(
                cfg.api_key,
                concurrency=cfg.concurrency,
                connect_timeout_s=cfg.connect_timeout_s,
                base_url=cfg.base_url,
            )
            self._watch = StallWatch(cfg.idle_timeout_s)
            policy = RetryPolicy(cfg.max_attempts, cfg.backoff_base_s, cfg.backoff_max_s, self._on_failed_attempt)
            url = cfg.base_url.rstrip("/") + "/chat/completions"
            syncer = asyncio.create_task(self._sync_periodically())
            try:
                async with session:
                    self._tasks = [
                        asyncio.create_task(self._worker(records, session, policy, url))
                        for _ in range(max(1, cfg.concurrency))
                    ]
                    results = await asyncio.gather(*self._tasks, return_exceptions=True)
            finally:
                syncer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await syncer
                await self._watch.close()
                self._ledger.set_prefix(self._done_prefix())
                try:
                    self._ledger.close()
                except LedgerError as exc:
                    self._ledger_error = exc
                clean = self._ledger_error is None and not any(isinstance(r, BaseException) for r in results)
                self._intents.flush()
                self._possibly_billed.add(self._intents.close(clean=clean))
                self._close_caps_and_cache()
                self._finish()
                self._write_run_file(finished=True)
        finally:
            lock.release()
        for res in results:
            if isinstance(res, Exception):
                raise res  # a bug: never hidden
        if self._ledger_error is not None:
            raise self._ledger_error
        return self.summary

    def _open_caps_and_cache(self) -> None:
        """Caps shared across runs (a stop now when one is used up) and the answer cache, if asked for."""
        cfg = self.config
        spec = CapSpec(cfg.max_total_cost_usd, cfg.daily_cap_usd, cfg.monthly_cap_usd)
        if spec.max_total_cost_usd is not None or spec.daily_cap_usd is not None or spec.monthly_cap_usd is not None:
            prior = 0.0
            if not (cfg.out_dir / SPEND_NAME).exists():  # an older directory: its ledger's spend carries over once
                prior = ledger_spend(self._ledger.path) + self._possibly_billed.usd
            self.caps = CapBook.open(spec, cfg.out_dir, cfg.budget_file, prior_spend_usd=prior)
            stop = self.caps.exhausted()
            if stop is not None:
                self.request_stop(StopReason.CAP, f"{stop.message}. Rerun after it resets, or raise the cap.")
        if cfg.cache_dir is not None:
            self.cache = AnswerCache.open(cfg.cache_dir)

    def _close_caps_and_cache(self) -> None:
        for thing in (self.caps, self.cache):
            if thing is not None:
                with contextlib.suppress(BatchgateError, OSError):  # the ledger already holds the truth
                    thing.flush()
                thing.close()

    def _write_run_file(self, *, finished: bool) -> None:
        """``runs/<run_id>.json`` (and ``run.json``, the latest): inputs, effective config, summary."""
        doc = {
            "run_id": self.run_id,
            "finished": finished,
            "inputs": [str(p) if str(p) == "-" else str(p.resolve()) for p in self.inputs],
            "total": self.total,
            "config": public_settings(self.config),
            "summary": self.summary.as_dict(),
        }
        data = orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS, default=str)
        with contextlib.suppress(OSError):  # run files are a convenience; the ledger is the record
            runs = self.config.out_dir / "runs"
            if runs.is_symlink():  # never write outside --out through a planted link
                return
            runs.mkdir(exist_ok=True)
            write_atomic(runs / f"{self.run_id}.json", data)
            if finished:
                write_atomic(
                    self.config.out_dir / "run.json", orjson.dumps(self.summary.as_dict(), option=orjson.OPT_INDENT_2)
                )

    async def _preflight_once(self, session: Any) -> None:
        """Run the preflight once, when the first request is about to go; the other workers wait for it.

        A rerun with nothing left to send never touches the network (and works offline).
        """
        if self._preflight_started:
            await self._preflight_done.wait()
            return
        self._preflight_started = True
        try:
            await self._preflight(session)
        finally:
            self._preflight_done.set()

    async def _preflight(self, session: Any) -> None:
        """Before the first paid request: the catalog has every model, and what the account says.

        ``GET /models`` stops the run (exit 2) on a model the catalog lacks, a rejected key or an
        unreachable base URL, before anything is spent.  Balance and published prices are
        optional: absent, the run learns prices from its answers as before.
        """
        cfg = self.config
        if not cfg.check_models:
            return
        try:
            catalog = await account.fetch_catalog(session, cfg.base_url)
        except AuthError as exc:
            self.request_stop(StopReason.AUTH, f"GonkaGate rejected the API key ({exc}).")
            return
        except ConnectFailed as exc:
            self.request_stop(StopReason.UNREACHABLE, f"{exc.message}; check --base-url and the network.")
            return
        if catalog is None:
            self.notices.append("the model catalog (GET /models) did not answer; models not checked")
        else:
            known = set(catalog)
            missing = [(m, where) for m, where in self._models.items() if m not in known]
            if missing:
                lines = []
                for model, (path, line, count) in missing:
                    near = account.nearest_models(model, catalog)
                    hint = f"; did you mean {' or '.join(near)}?" if near else ""
                    lines.append(f"{path}:{line}: model {model!r} is not in the catalog ({count} prompt(s)){hint}")
                self.request_stop(StopReason.UNKNOWN_MODEL, "\n".join(lines))
                return
        self.balance = await account.fetch_balance(session, cfg.base_url)
        if self.balance is not None:
            self.summary.balance_usd = self.balance.usd
        prices = await account.fetch_pricing(session, cfg.base_url)
        for model, price in (prices or {}).items():
            self.prices.publish(model, price.usd_per_token_total)
        if self.balance is not None:
            if cfg.max_cost_usd is not None and cfg.max_cost_usd > self.balance.usd:
                self.notices.append(
                    f"--max-cost ${cfg.max_cost_usd:.4f} is more than the balance ${self.balance.usd:.4f}: "
                    "the balance will run out first"
                )
            if self.balance.status in ("low", "suspended"):
                self.notices.append(f"GonkaGate says the balance is {self.balance.status} (${self.balance.usd:.4f})")

    async def _sync_periodically(self) -> None:
        """The once-a-second fsync promise, kept by time and off the event loop."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(_SYNC_EVERY_S)
            try:
                await loop.run_in_executor(None, self._ledger.sync)
            except LedgerError as exc:
                self._ledger_error = exc
                self.request_stop(StopReason.LEDGER, f"{exc}; stopped starting requests. Free space, then rerun.")

    def _shaping(self) -> dict[str, Any]:
        """Every setting that shapes the requests: a change makes the resume shortcuts start over."""
        cfg = self.config
        return {
            **input_options(cfg),
            "chat_defaults": cfg.chat_defaults,
            "system_prompt": cfg.system_prompt,
            "samples": cfg.samples,
            "shard": cfg.shard,
            "json_schema": cfg.json_schema,
            "json_mode": cfg.json_mode,
        }

    def _validate_appended(self, appended: resume.Appended | None) -> Iterable[bytes] | None:
        """Validate only the lines appended since the last run validated the rest; the bytes of the
        inputs' sorted id digests, or None when everything must be validated again (no ids kept, a shard,
        a problem or a warning on the new lines: the full pass names them exactly)."""
        cfg = self.config
        if appended is None or cfg.shard is not None:
            return None
        known = resume.load_known_ids(cfg.out_dir, appended.validated)
        if known is None:
            return None
        report = jobs.validate(self.inputs, **input_options(cfg), start=appended.starts, known_ids=known.any_of)
        if not report.ok() or report.warnings:
            return None
        before = appended.validated
        self.total = int(before["records"]) + report.records * cfg.samples
        self._models = {m: list(v) for m, v in (before.get("models") or {}).items()}
        for model, (path, line, count) in report.models.items():
            self._models.setdefault(model, [path, line, 0])[2] += count
        if before.get("warnings"):
            self.notices.append(before["warnings"])
        return known.merged(report.ids)

    def _done_prefix(self) -> DonePrefix | None:
        """Where the next run may start reading: before it, every request was answered ok."""
        mark, key = self._watermark, self._inputs_key
        if mark is None or key is None or mark.given_up:
            return None
        if mark.mark >= self._seq:  # every request read so far was answered ok
            if self._last_pos is None:  # nothing read: where this run started, when it read it all
                if not self._exhausted:
                    return None
                at = self._prefix[:2] if self._prefix is not None else (len(self.inputs), 0)
                return DonePrefix(key, at[0], at[1], mark.mark, tail=self._prefix_tail)
            i, line, sample = self._last_pos
            if self._exhausted:  # past every input; should they grow, on just past the last record
                return DonePrefix(key, len(self.inputs), 0, mark.mark, tail=(i, line + 1))
            if sample != self.config.samples - 1:
                return None
            return DonePrefix(key, i, line + 1, mark.mark)
        found = mark.at_mark()
        if found is None:
            return None
        (i, line, requests), beyond = found
        return DonePrefix(key, i, line, requests, beyond)

    def _pending_records(self) -> Iterator[_Pending]:
        """Every request still to buy: not answered yet, or answered for a request that changed since."""
        answers = self._answers
        cfg = self.config
        start = self._prefix
        if start is not None:
            self.summary.skipped += start[2]
            self._seq = start[2]
        self._watermark = resume.Watermark(self._seq, cfg.samples) if self._inputs_key is not None else None
        positions = {str(p): i for i, p in enumerate(self.inputs)}
        source: Iterable[PromptRecord] = (
            self.records
            if self.records is not None  # an empty sample runs nothing, not everything
            else jobs.iter_records(self.inputs, **input_options(cfg), start=(start[0], start[1]) if start else None)
        )
        if cfg.shard is not None:
            source = (r for r in source if in_shard(r.id, cfg.shard))
        if cfg.samples > 1:
            source = (dataclasses.replace(r, sample=i) for r in source for i in range(cfg.samples))
        items = ((r, body, request_fingerprint(body, r.sample)) for r in source for body in (self._request_body(r),))
        s = self.summary
        watermark = self._watermark
        # Look keys up a batch at a time (one vectorised search) rather than one by one.
        for batch in iter(lambda: list(itertools.islice(items, 512)), []):
            if len(answers):
                done, stale = answers.lookup([row_key(r.id, r.sample) for r, _, _ in batch], [fp for _, _, fp in batch])
                skip = done.tolist()
                s.skipped += int(done.sum())
                s.stale += int(stale.sum())
            else:
                skip = [False] * len(batch)
            for (rec, body, fp), done_already in zip(batch, skip, strict=True):
                seq = self._seq
                self._seq += 1
                if watermark is not None:
                    where = positions.get(rec.path)
                    if where is None:
                        watermark.given_up = True
                    else:
                        self._last_pos = (where, rec.line, rec.sample)
                        watermark.seen(seq, (where, rec.line), rec.sample)
                if done_already:
                    if watermark is not None:
                        watermark.complete(seq, row_key(rec.id, rec.sample), fp)
                    continue
                yield rec, body, fp, seq
        self._exhausted = True

    async def _worker(self, records: Iterator[_Pending], session: Any, policy: RetryPolicy, url: str) -> None:
        for rec, body_obj, fingerprint, seq in records:
            if self._stop_reason is not None:
                return
            if not self._preflight_done.is_set():  # the first request to send: ask the catalog first
                await self._preflight_once(session)
                if self._stop_reason is not None:
                    return
            if self.cache is not None and self._from_cache(rec, body_obj, fingerprint, seq):
                continue
            if self._admitting:
                admitted = await self._admit(rec, body_obj)
                if admitted is None:
                    return
                worst, reserved, ticket = admitted
            else:
                worst, reserved, ticket = self._worst_case(rec, body_obj), 0.0, None
            await self._serve(rec, body_obj, fingerprint, seq, worst, reserved, ticket, session, policy, url)
            if self._stop_reason is not None:
                return

    async def _serve(
        self,
        rec: PromptRecord,
        body_obj: dict[str, Any],
        fingerprint: str,
        seq: int,
        worst: float | None,
        reserved: float,
        ticket: Reservation | None,
        session: Any,
        policy: RetryPolicy,
        url: str,
    ) -> None:
        """Buy one answer (with its retries, and its re-asks when it does not fit the schema); write its row."""
        throttle = self.throttle
        watch = self._watch
        intents = self._intents
        headers = request_headers(rec.id)
        key = row_key(rec.id, rec.sample)
        limits = self._limits(body_obj)
        tries = 0

        def attempt_with(body: bytes, worst: float | None) -> Callable[[], Awaitable[Completion]]:
            async def attempt() -> Completion:
                nonlocal tries
                await throttle.acquire()
                try:
                    if tries:
                        self.retrying = max(0, self.retrying - 1)
                    tries += 1
                    intents.started(key, tries, fingerprint, worst)
                    return await stream_completion(session, url, body, headers, watch, limits=limits)
                except RetryableError:
                    self.retrying += 1
                    raise
                finally:
                    throttle.release()

            return attempt

        started_at = _utc_now()
        t0 = time.monotonic()
        prior: list[Outcome] = []  # paid answers a re-ask replaced
        verdict: Verdict | None = None
        tickets: list[tuple[float, Reservation | None]] = [(reserved, ticket)]
        self.in_flight += 1
        try:
            outcome = await policy.run(attempt_with(orjson.dumps(body_obj), worst))
            verdict, follow_up = self._follow_up(outcome, body_obj, len(prior))
            while follow_up is not None:
                again = self._worst_case(rec, follow_up)
                if self._admitting and not self._reserve_more(again, tickets):
                    break  # no budget for a re-ask: keep the answer we have
                prior.append(outcome)
                body_obj = follow_up
                outcome = await policy.run(attempt_with(orjson.dumps(follow_up), again))
                verdict, follow_up = self._follow_up(outcome, body_obj, len(prior))
        except asyncio.CancelledError as exc:
            self._record_interrupted(
                rec, fingerprint, getattr(exc, "received_tokens", 0), started_at, time.monotonic() - t0
            )
            raise
        finally:
            self.in_flight -= 1
            if self._admitting:
                self._release_probe(rec.model)
        if isinstance(outcome.error, RetryableError):
            self.retrying = max(0, self.retrying - 1)  # its last failure was final, not a retry
        if outcome.completion is not None:
            throttle.on_success()
        row, spent = self._record(rec, fingerprint, outcome, started_at, time.monotonic() - t0, prior, verdict)
        ok = row["status"] == "ok"
        if self._watermark is not None:
            if ok:
                self._watermark.complete(seq, row_key(rec.id, rec.sample), fingerprint)
            else:
                self._watermark.fail(seq)
        self._settle(tickets, spent)
        if self.cache is not None and ok and not prior and cacheable(body_obj, self.config.cache_nondeterministic):
            self.cache.put(fingerprint, row)

    def _settle(self, tickets: list[tuple[float, Reservation | None]], spent: float) -> None:
        """What the prompt cost replaces its reservations (all of it on the first; the rest give back)."""
        if not self._admitting:
            return
        for i, (reserved, ticket) in enumerate(tickets):
            actual = spent if i == 0 else 0.0
            if self.budget is not None:
                self.budget.settle(reserved, actual)
            if ticket is not None and self.caps is not None:
                self.caps.settle(ticket, actual)
        self._reservations_out = max(0, self._reservations_out - 1)
        self._settled.set()  # wake every admission waiting for room, then arm a fresh event
        self._settled = asyncio.Event()

    def _reserve_more(self, worst: float | None, tickets: list[tuple[float, Reservation | None]]) -> bool:
        """Reserve a re-ask's worst case under every cap; False when one is too tight (no waiting)."""
        if worst is None:
            return False
        refused, ticket = self._reserve(worst)
        if refused is not None:
            return False
        tickets.append((worst, ticket))
        return True

    def _from_cache(self, rec: PromptRecord, body: dict[str, Any], fingerprint: str, seq: int) -> bool:
        """Answer from the cache when an earlier run (of any directory) bought this very request."""
        assert self.cache is not None
        if not cacheable(body, self.config.cache_nondeterministic):
            return False
        entry = self.cache.get(fingerprint)
        if entry is None:
            return False
        row = make_row(
            rec,
            run_id=self.run_id,
            fingerprint=fingerprint,
            completion=None,
            error=None,
            charge=Charge(),
            attempts=0,
            retry_causes=[],
            started_at=_utc_now(),
            latency_s=0.0,
        )
        row.update(row_from_cache(entry))
        row["model"] = rec.model
        self._ledger.append(row)
        self._schedule_flush()
        s = self.summary
        s.requests += 1
        s.ok += 1
        s.cached += 1
        if self._watermark is not None:
            self._watermark.complete(seq, row_key(rec.id, rec.sample), fingerprint)
        return True

    def _follow_up(
        self, outcome: Outcome, body: dict[str, Any], reasks: int
    ) -> tuple[Verdict | None, dict[str, Any] | None]:
        """The verdict on a structured answer, and the re-ask to send next (None: this answer stands)."""
        comp = outcome.completion
        schema = self.schema
        if comp is None or (schema is None and self.config.on_length != "reask"):
            return None, None
        verdict = schema.check(comp.content) if schema is not None else None
        if reasks >= self.config.reask or self._stop_reason is not None:
            return verdict, None
        if comp.finish_reason == "length" and self.config.on_length == "reask":
            return verdict, AnswerSchema.reask_after_length(body, comp.content)
        if verdict is not None and not verdict.valid:
            return verdict, AnswerSchema.reask(body, comp.content, verdict.error or "invalid")
        return verdict, None

    def _record_interrupted(
        self, rec: PromptRecord, fingerprint: str, tokens: int, started_at: str, latency: float
    ) -> None:
        """A stream abandoned after tokens arrived may have been billed: record it as unconfirmed."""
        if not tokens:
            return  # its intent stays open: counted as possibly billed when the run closes
        err = Interrupted("abandoned mid-stream by a second signal; the prompt is retried on resume")
        self._record(rec, fingerprint, Outcome(error=err, attempts=1, cut_tokens=tokens), started_at, latency)
        with contextlib.suppress(LedgerError):
            self._ledger.flush()
            self._intents.flush()

    def _request_body(self, rec: PromptRecord) -> dict[str, Any]:
        body = {**self.config.chat_defaults, **rec.body} if self.config.chat_defaults else dict(rec.body)
        system = self.config.system_prompt
        if system:
            messages = body.get("messages") or []
            if not messages or messages[0].get("role") != "system":
                body["messages"] = [{"role": "system", "content": system}, *messages]
        body["model"] = rec.model
        if self.schema is not None and "response_format" not in body:
            body["response_format"] = self.schema.response_format()
        body["stream"] = True
        body["stream_options"] = _STREAM_OPTIONS
        return body

    def _max_tokens(self, body: dict[str, Any]) -> int:
        """The completion tokens the server may send: the request's max_tokens, else the API's default, x n."""
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens <= 0:
            max_tokens = self.config.default_max_tokens
        n = body.get("n")
        if isinstance(n, int) and not isinstance(n, bool) and n > 1:
            max_tokens *= n
        return int(max_tokens)

    def _limits(self, body: dict[str, Any]) -> AttemptLimits:
        """Every attempt ends: a deadline at a slow but sane pace, and a cap on what an answer may hold."""
        tokens = self._max_tokens(body)
        cfg = self.config
        deadline = cfg.attempt_deadline_s or (60.0 + tokens / cfg.min_tokens_per_s)
        return AttemptLimits(deadline_s=deadline, max_answer_chars=tokens * 4 * 16)  # 4x max_tokens, 16 chars each

    def _worst_case(self, rec: PromptRecord, body: dict[str, Any]) -> float | None:
        """What the server could bill for this request at most: its max_tokens, else the API's default."""
        return Budget.worst_case_of(self.prices, rec.model, rec.prompt_chars, self._max_tokens(body))

    async def _admit(
        self, rec: PromptRecord, body: dict[str, Any]
    ) -> tuple[float | None, float, Reservation | None] | None:
        """Reserve the request's worst case under --max-cost and the caps across runs.

        Returns (worst case, reserved, cap ticket), or None when the run stops.  A reservation
        that does not fit waits for requests in flight to give back what they did not spend.
        Before a model's price is known nothing bounds a request, so one probe per model runs
        at a time (worst case None, nothing reserved) and the others wait for the price it teaches.
        """
        budget = self.budget
        while True:
            if self._stop_reason is not None:
                return None
            worst = self._worst_case(rec, body)
            if worst is None:
                probe = self._probes.get(rec.model)
                if probe is not None:
                    await probe.wait()
                    continue
                if budget is None or budget.spent < budget.cap_usd:
                    ticket = self.caps.try_reserve(0.0) if self.caps is not None else None
                    if self.caps is not None and ticket is None:
                        self._stop_for(StopReason.CAP, 0.0)
                        return None
                    self._probes[rec.model] = asyncio.Event()
                    self._reservations_out += 1
                    return None, 0.0, ticket
                worst = math.inf  # nothing left under --max-cost: stop below
            refused, ticket = self._reserve(worst)
            if refused is None:
                self._reservations_out += 1
                return worst, worst, ticket
            if self._reservations_out:  # requests in flight will give back what they did not spend
                await self._next_settle()
                continue
            self._stop_for(refused, worst)
            return None

    def _reserve(self, worst: float) -> tuple[StopReason | None, Reservation | None]:
        """Reserve ``worst`` under --max-cost and every cap: (None, cap ticket), or (what refused, None)."""
        if self.budget is not None and not self.budget.try_reserve(worst):
            return StopReason.BUDGET, None
        ticket = None
        if self.caps is not None:
            ticket = self.caps.try_reserve(worst)
            if ticket is None:
                if self.budget is not None:
                    self.budget.settle(worst, 0.0)  # give the --max-cost reservation back
                return StopReason.CAP, None
        return None, ticket

    def _stop_for(self, refused: StopReason, worst: float) -> None:
        """Stop the run because --max-cost (BUDGET) or a cap across runs (CAP) leaves no room."""
        budget = self.budget
        if refused is StopReason.BUDGET and budget is not None:
            s = self.summary
            self.request_stop(
                StopReason.BUDGET,
                f"--max-cost ${budget.cap_usd:.4f} reached: ${budget.spent + budget.reserved:.6f} spent or in "
                f"flight (${s.total_cost_usd:.6f} confirmed, ~${s.unconfirmed_cost_usd:.6f} unconfirmed), "
                f"${budget.left_usd:.6f} left, not enough for the next prompt's worst case "
                f"(${worst:.6f}). Rerun with a higher --max-cost to resume.",
            )
            return
        stop = self.caps.refused if self.caps is not None else None
        message = stop.message if stop is not None else "a spending cap is used up"
        self.request_stop(StopReason.CAP, f"{message}. Rerun after it resets, or raise the cap, to resume.")

    async def _next_settle(self) -> None:
        """Wait until some request in flight settles its reservation (or the run stops)."""
        event = self._settled
        await event.wait()

    def _release_probe(self, model: str) -> None:
        # While a model's probe runs no other request of that model does, so it is the probe.
        probe = self._probes.pop(model, None)
        if probe is not None:
            probe.set()

    # -- bookkeeping -----------------------------------------------------------------------------

    def _on_failed_attempt(self, exc: ApiError) -> None:
        self.last_error = f"{exc.kind}: {exc}"
        if isinstance(exc, RateLimited):
            self.summary.rate_limited += 1
            self.throttle.on_rate_limited(exc.retry_after)
        elif isinstance(exc, RetryableError):
            self.throttle.on_failure()
        if not isinstance(exc, ConnectFailed):
            self._any_response = True

    def _record(
        self,
        rec: PromptRecord,
        fingerprint: str,
        outcome: Outcome,
        started_at: str,
        latency: float,
        prior: Sequence[Outcome] = (),
        verdict: Verdict | None = None,
    ) -> tuple[dict[str, Any], float]:
        """Append the prompt's row; return it and what it spent (confirmed plus estimated unconfirmed).

        ``prior``: paid answers that re-asks replaced; their cost is in this row's totals (and
        apart, as ``reask_cost_usd``), so the ledger's sum stays what the server billed.
        """
        s = self.summary
        comp: Completion | None = outcome.completion
        charge = self.accounts.charge(rec, comp, outcome.cut_chars, outcome.cut_tokens)
        attempts, causes = outcome.attempts, outcome.causes
        reask_cost = 0.0
        if prior:
            earlier = [self.accounts.charge(rec, o.completion, o.cut_chars, o.cut_tokens) for o in prior]
            reask_cost = math.fsum(c.spent for c in earlier)
            charge = combine_charges([*earlier, charge])
            attempts += sum(o.attempts for o in prior)
            causes = [c for o in prior for c in o.causes] + ["reask"] * len(prior) + causes
            s.reask_cost_usd += reask_cost
            s.reasks += len(prior)
        err = outcome.error
        if comp is not None and comp.finish_reason == "length":
            s.length_cut += 1
            if self.config.on_length == "fail":
                err = LengthCut("the answer was cut at max_tokens (finish_reason: length); --on-length fail")
        row = make_row(
            rec,
            run_id=self.run_id,
            fingerprint=fingerprint,
            completion=comp,
            error=err,
            charge=charge,
            attempts=attempts,
            retry_causes=causes,
            started_at=started_at,
            latency_s=latency,
            failed=err is not None,
        )
        if verdict is not None:
            row.update(verdict.as_row())
            if not verdict.valid:
                s.invalid += 1
        if prior:
            row["reasks"] = len(prior)
            row["reask_cost_usd"] = reask_cost
        self._ledger.append(row)
        self._intents.finished(row_key(rec.id, rec.sample))
        self._schedule_flush()

        s.requests += 1
        s.retries += outcome.attempts - 1
        s.total_cost_usd += charge.total_cost_usd
        if comp is not None and err is None:
            s.ok += 1
            self._any_response = True
            s.prompt_tokens += charge.prompt_tokens or 0
            s.completion_tokens += charge.completion_tokens or 0
        else:
            s.failed += 1
            kind = err.kind if err else "unknown"
            s.failures_by_cause[kind] = s.failures_by_cause.get(kind, 0) + 1
            self._on_final_error(err)
        if charge.unconfirmed_cost_usd:
            s.unconfirmed_cost_usd += charge.unconfirmed_cost_usd
        for w in charge.warnings:
            s.warnings[w] = s.warnings.get(w, 0) + 1
        return row, charge.spent

    def _on_final_error(self, err: ApiError | None) -> None:
        if isinstance(err, InsufficientBalance):
            self.request_stop(
                StopReason.BALANCE,
                f"GonkaGate says the balance is spent (HTTP {err.status}: {err.message}). Top up, then rerun the "
                "same command to resume: finished answers are kept and not bought again.",
            )
        elif isinstance(err, AuthError):
            self.request_stop(StopReason.AUTH, f"GonkaGate rejected the API key (HTTP {err.status}: {err.message}).")
        elif isinstance(err, ConnectFailed) and not self._any_response:
            self.request_stop(StopReason.UNREACHABLE, f"{err.message}; check --base-url and the network.")

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        try:
            self._ledger.flush()
        except LedgerError as exc:
            # A full disk: rows stay queued for the next flush, and no new prompt starts, since
            # an answer that cannot be recorded would be bought again by the next run.
            self._ledger_error = exc
            self.request_stop(StopReason.LEDGER, f"{exc}; stopped starting requests. Free space, then rerun to resume.")
            return
        self._intents.flush()
        if self.caps is not None:
            self.caps.flush()
        if self.cache is not None:
            self.cache.flush()

    def _finish(self) -> None:
        s = self.summary
        s.wall_s = time.monotonic() - self._started
        s.slowdowns = self.throttle.slowdowns
        s.min_concurrency = int(self.throttle.min_limit_seen)
        s.outage_pauses = self.throttle.outage_pauses
        s.total_cost_usd = self.accounts.confirmed.value
        # Cut attempts seen before any price was known get priced with what the run learnt since.
        s.unconfirmed_unpriced_tokens = self.accounts.settle_unpriced()
        s.unconfirmed_cost_usd = self.accounts.unconfirmed.value
        s.possibly_billed_attempts = self._possibly_billed.attempts
        s.possibly_billed_usd = self._possibly_billed.usd
        s.possibly_billed_unpriced = self._possibly_billed.unpriced
        reason = self._stop_reason
        s.stop_reason = reason.value if reason is not None else None
        if reason is None:
            s.exit_code = StopReason.FAILED.exit_code if s.failed else 0
        else:
            s.exit_code = reason.exit_code


async def run(inputs: Sequence[str | Path], config: RunConfig) -> RunSummary:
    """Library entry point: ``asyncio.run(batchgate.run([...], RunConfig(...)))``."""
    return await Runner(inputs, config).run()
