"""What a run shows while it works: a live panel on a terminal, plain or JSON lines otherwise.

Part of the CLI (it prints); kept apart from cli.py so the flags and the screen change separately.
Everything shown is read from the runner a few times a second (at most 5 Hz), never per request,
so a run at thousands of streams pays nothing for being watched.  Runner attributes that not
every version has (``retrying``, ``last_error``, ``throttle.statistics()``) are read with getattr.

Under ``--log-format json`` stderr carries JSON lines only: ``start``, ``progress``, ``stopping``,
``error`` and one ``end`` event, so a log shipper (or ``jq``) can read a cron log line by line.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import click
import orjson

from .config import public_settings
from .models import RunSummary

__all__ = ["REFRESH_S", "Log", "format_duration", "now", "signals"]

#: Seconds between two repaints of the terminal panel (4 Hz: live enough, costs nothing).
REFRESH_S = 0.25
#: Seconds of history the request and token rates (and so the ETA) are measured over.
RATE_WINDOW_S = 30.0


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def format_duration(seconds: float | None) -> str:
    """``3m12s``-style; ``?`` when unknown."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _count(value: Any) -> int | None:
    """``runner.retrying`` may be a count or a collection of prompts."""
    if value is None:
        return None
    if isinstance(value, int):
        return value
    with contextlib.suppress(TypeError):
        return len(value)
    return None


def _throttle(runner: Any) -> dict[str, Any]:
    """Current concurrency limit, the one asked for, and why they differ."""
    throttle = getattr(runner, "throttle", None)
    asked = getattr(getattr(runner, "config", None), "concurrency", None)
    stats = getattr(throttle, "statistics", None)
    if callable(stats):
        snap = stats()

        def get(name: str, default: Any = None) -> Any:
            return snap.get(name, default) if isinstance(snap, dict) else getattr(snap, name, default)

        limit, top, reason = get("limit"), get("max", asked), get("reason", "ok")
        streaming = get("in_flight")
    else:
        streaming = getattr(throttle, "in_flight", None)
        limit = getattr(throttle, "limit", asked)
        top = getattr(throttle, "max_concurrency", asked)
        reason = "ok"
        if limit is not None and top is not None and limit < top:
            if getattr(throttle, "outage_pauses", 0) and int(limit) <= 1:
                reason = "outage pause"
            elif getattr(throttle, "slowdowns", 0):
                reason = "429 slow-down"
        elif getattr(getattr(runner, "config", None), "rpm", None):
            reason = "rpm"
    return {
        "concurrency": int(limit) if limit is not None else None,
        "concurrency_max": int(top) if top is not None else None,
        "concurrency_asked": asked,
        "throttle_reason": reason or "ok",
        "streaming": streaming,
        "slowdowns": getattr(throttle, "slowdowns", None),
        "outage_pauses": getattr(throttle, "outage_pauses", None),
    }


class _Rates:
    """Requests/s and tokens/s over the last RATE_WINDOW_S seconds, from a few samples per second."""

    def __init__(self) -> None:
        self.samples: deque[tuple[float, int, int]] = deque()

    def update(self, t: float, requests: int, tokens: int) -> tuple[float, float]:
        self.samples.append((t, requests, tokens))
        while len(self.samples) > 2 and t - self.samples[1][0] >= RATE_WINDOW_S:
            self.samples.popleft()
        t0, r0, k0 = self.samples[0]
        dt = t - t0
        if dt <= 0:
            return 0.0, 0.0
        return (requests - r0) / dt, (tokens - k0) / dt


class Log:
    """Progress, the stop notice and the final summary of one `run` (or `estimate`)."""

    def __init__(self, quiet: bool, fmt: str, *, tty: bool | None = None) -> None:
        self.quiet = quiet
        self.json = fmt == "json"
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.started = time.monotonic()
        self._rates = _Rates()
        self._console: Any = None  # the rich console while the live panel is up
        self._grace_ends: float | None = None  # monotonic time the first signal's grace runs out
        self._again = "Ctrl-C again"
        self._told_stop = False

    # -- events ------------------------------------------------------------------------------------

    def emit(self, event: str, **fields: Any) -> None:
        """One JSON line on stderr (json format only)."""
        line = orjson.dumps({"ts": now(), "event": event, **fields}, default=str).decode()
        click.echo(line, err=True)

    def say(self, text: str) -> None:
        """One plain line on stderr, above the live panel when there is one."""
        if self._console is not None:
            self._console.print(text, markup=False, highlight=False)
        else:
            click.echo(text, err=True)

    def start(self, runner: Any, inputs: Sequence[Path | str]) -> None:
        """Name the run and its output directory first: a cron log shows them before anything can go wrong."""
        if self.quiet:
            return
        run_id, out = getattr(runner, "run_id", None), str(runner.config.out_dir)
        if self.json:
            names = [str(p) for p in inputs]
            self.emit("start", run_id=run_id, out=out, inputs=names, config=public_settings(runner.config))
        else:
            self.say(f"{now()} start run {run_id} → {out} ({len(inputs)} input{'s' * (len(inputs) != 1)})")

    def stopping(self, runner: Any, sig: signal.Signals) -> None:
        """Say at once that the first signal was heard, so nobody presses Ctrl-C again by accident."""
        n, grace = runner.in_flight, runner.config.grace_s
        again = self._again = "Ctrl-C again" if sig == signal.SIGINT else "a second signal"
        self._grace_ends = time.monotonic() + grace
        if self.json:
            self.emit("stopping", signal=sig.name, in_flight=n, grace_s=grace)
        else:
            if n:
                self.say(f"stopping: {n} in flight, finishing them (up to {grace:g}s); {again} to abandon them")
            else:
                self.say("stopping: nothing in flight")

    def abandoning(self, runner: Any) -> None:
        if self.json:
            self.emit("abandoning", in_flight=runner.in_flight)
        else:
            self.say(f"abandoning {runner.in_flight} in flight; their prompts are retried on resume")

    def notice(self, message: str) -> None:
        """Something to know that is not an error (a torn line set aside, typo warnings): a `warning` event."""
        if self.json:
            self.emit("warning", message=message)
        else:
            self.say(f"batchgate: {message}")

    def error(self, message: str) -> None:
        if self.json:
            self.emit("error", message=message)
        else:
            self.say(f"batchgate: {message}")

    # -- progress ----------------------------------------------------------------------------------

    async def progress(self, runner: Any, every_s: float) -> None:
        if self.quiet:
            return
        if self.tty and not self.json:
            await self._panel(runner)
            return
        while True:
            await asyncio.sleep(every_s)
            self._line(runner)

    def fields(self, runner: Any) -> dict[str, Any]:
        """A snapshot of the run for one progress line or one repaint."""
        s = runner.summary
        t = time.monotonic()
        elapsed = t - self.started
        finished = s.ok + s.failed
        done = finished + s.skipped
        req_rate, tok_rate = self._rates.update(t, finished, s.completion_tokens)
        left = max(0, runner.total - done)
        return {
            "done": done,
            "total": runner.total,
            "ok": s.ok,
            "failed": s.failed,
            "skipped": s.skipped,
            "retrying": _count(getattr(runner, "retrying", None)),
            "in_flight": runner.in_flight,
            "rate_limited": s.rate_limited,
            **_throttle(runner),
            "requests_per_s": round(req_rate, 2),
            "tokens_per_s": round(tok_rate, 1),
            "completion_tokens": s.completion_tokens,
            "total_cost_usd": round(s.total_cost_usd, 6),
            "unconfirmed_cost_usd": round(s.unconfirmed_cost_usd, 6),
            "elapsed_s": round(elapsed, 1),
            "eta_s": max(1, round(left / req_rate)) if req_rate > 0 and left else (0 if not left else None),
            "last_error": getattr(runner, "last_error", None),
            "stopping": bool(getattr(runner, "stopping", False)),
        }

    def _line(self, runner: Any) -> None:
        f = self.fields(runner)
        if f["stopping"] and self._grace_ends is None and not self._told_stop:
            self._told_stop = True  # a stop from inside (balance, budget, key): say so now, not after in-flight end
            message = getattr(runner, "stop_message", None)
            if self.json:
                self.emit("stopping", in_flight=f["in_flight"], message=message)
            else:
                self.say(f"stopping: {f['in_flight']} in flight, finishing them; {message or ''}".rstrip("; "))
        if self.json:
            self.emit("progress", **f)
            return
        retrying = f" retrying={f['retrying']}" if f["retrying"] is not None else ""
        why = f" ({f['throttle_reason']})" if f["throttle_reason"] != "ok" else ""
        line = (
            f"{now()} progress {f['done']}/{f['total']} ok={f['ok']} failed={f['failed']}{retrying} "
            f"in_flight={f['in_flight']} streaming={f['streaming']} "
            f"concurrency={f['concurrency']}/{f['concurrency_asked']}{why} 429s={f['rate_limited']} "
            f"outage_pauses={f['outage_pauses']} "
            f"req/s={f['requests_per_s']:.1f} tok/s={f['tokens_per_s']:.0f} usd={f['total_cost_usd']:.6f} "
            f"unconfirmed_usd={f['unconfirmed_cost_usd']:.6f} eta={format_duration(f['eta_s'])}"
        )
        if f["last_error"]:
            line += f" last_error={f['last_error']!r}"
        self.say(line)

    def panel_lines(self, f: dict[str, Any], width: int = 80) -> list[str]:
        """The panel below the bar as plain lines (the terminal test reads these off the screen)."""
        counts = f"ok {f['ok']:,} · failed {f['failed']:,}"
        if f["retrying"] is not None:
            counts += f" · retrying {f['retrying']:,}"
        counts += f" · in flight {f['in_flight']:,}"
        if f["streaming"] is not None and f["streaming"] != f["in_flight"]:
            counts += f" ({f['streaming']:,} streaming, {f['in_flight'] - f['streaming']:,} waiting)"
        if f["skipped"]:
            counts += f" · {f['skipped']:,} already done"
        conc = f"concurrency {f['concurrency']}/{f['concurrency_asked']} asked"
        if f["throttle_reason"] != "ok":
            conc += f" ({f['throttle_reason']})"
        if f["rate_limited"]:
            conc += f" · 429s {f['rate_limited']:,}"
        if f["outage_pauses"]:
            conc += f" · outage pauses {f['outage_pauses']:,}"
        conc += f" · {f['requests_per_s']:,.1f} req/s · {f['tokens_per_s']:,.0f} tok/s"
        cost = f"cost ${f['total_cost_usd']:.6f} confirmed"
        if f["unconfirmed_cost_usd"]:
            cost += f" · ~${f['unconfirmed_cost_usd']:.6f} unconfirmed"
        else:
            cost += " · $0 unconfirmed"
        lines = [counts, conc, cost]
        if f["last_error"]:
            lines.append(_clip(f"last error: {f['last_error']}", width))
        return lines

    def stop_line(self, runner: Any, f: dict[str, Any]) -> str:
        """While stopping: what is left and how to stop harder."""
        if self._grace_ends is not None:
            left = max(0.0, self._grace_ends - time.monotonic())
            return (
                f"stopping: {f['in_flight']} in flight, finishing them ({format_duration(left)} left);"
                f" {self._again} to abandon them"
            )
        return f"stopping: {f['in_flight']} in flight, finishing them · {getattr(runner, 'stop_message', None) or ''}"

    async def _panel(self, runner: Any) -> None:
        from rich.console import Console, Group
        from rich.live import Live
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
        from rich.text import Text

        console = Console(stderr=True)
        bar = Progress(
            TextColumn("[bold]batchgate"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[count]}"),
            TextColumn("{task.fields[eta]}"),
            console=console,
        )
        task = bar.add_task("run", total=None, count="", eta="")
        # One repaint per tick from this task (no refresh thread): the panel costs ~REFRESH_S^-1 renders/s.
        with Live(console=console, auto_refresh=False, transient=True, redirect_stdout=False) as live:
            self._console = console
            try:
                while True:
                    f = self.fields(runner)
                    if not f["total"] and not f["done"] and not f["in_flight"]:
                        live.update(Text("batchgate: validating inputs…"), refresh=True)
                        await asyncio.sleep(REFRESH_S)
                        continue
                    bar.update(
                        task,
                        total=f["total"] or None,
                        completed=f["done"],
                        count=f"{f['done']:,}/{f['total']:,}",
                        eta="stopping" if f["stopping"] else f"ETA {format_duration(f['eta_s'])}",
                    )
                    lines = [
                        Text(line, no_wrap=True, overflow="ellipsis") for line in self.panel_lines(f, console.width)
                    ]
                    if f["stopping"]:
                        stop = Text(self.stop_line(runner, f), style="yellow", no_wrap=True, overflow="ellipsis")
                        lines.append(stop)
                    live.update(Group(bar.get_renderable(), *lines), refresh=True)
                    await asyncio.sleep(REFRESH_S)
            finally:
                self._console = None

    # -- the end -----------------------------------------------------------------------------------

    def summary(self, s: RunSummary, stop_message: str | None) -> None:
        if stop_message:
            self.error(stop_message)
        if self.quiet:
            return
        if self.json:
            self.emit("end", **s.as_dict())
            return
        rate = s.requests / s.wall_s if s.wall_s > 0 else 0.0
        lines = [
            f"run {s.run_id} → {s.out}",
            f"  requests  {s.requests} ({s.ok} ok, {s.failed} failed, {s.skipped} already done)"
            + (f", {s.retries} retries" if s.retries else ""),
            f"  tokens    {s.prompt_tokens:,} prompt + {s.completion_tokens:,} completion",
            f"  cost      ${s.total_cost_usd:.6f} confirmed",
        ]
        if s.balance_usd is not None:
            lines.append(f"  balance   ${s.balance_usd:,.6f} at start (GonkaGate)")
        if s.unconfirmed_cost_usd or s.unconfirmed_unpriced_tokens:
            extra = f"  unconfirmed ~${s.unconfirmed_cost_usd:.6f} (streams cut before their usage chunk"
            if s.unconfirmed_unpriced_tokens:
                extra += f"; {s.unconfirmed_unpriced_tokens} tokens not priced"
            lines.append(extra + ")")
        if s.possibly_billed_attempts:
            unpriced = f", {s.possibly_billed_unpriced} not priced" if s.possibly_billed_unpriced else ""
            lines.append(
                f"  possibly billed  up to ${s.possibly_billed_usd:.6f} for {s.possibly_billed_attempts} attempt(s)"
                f" in flight when a run of this directory died{unpriced}"
            )
        if s.stale:
            lines.append(
                f"  changed   {s.stale} answered prompt(s) changed since (prompt, model or defaults): asked again"
            )
        if s.warnings:
            odd = ", ".join(f"{k} {v}" for k, v in sorted(s.warnings.items()))
            lines.append(f"  warnings  {odd} (answers kept; see the ledger's warnings column)")
        if s.invalid or s.reasks or s.length_cut:
            lines.append(
                f"  answers   {s.invalid} not matching the schema (kept, valid: false), {s.reasks} re-asks "
                f"(${s.reask_cost_usd:.6f}, in the cost above), {s.length_cut} cut at max_tokens"
            )
        if s.failures_by_cause:
            causes = ", ".join(f"{k} {v}" for k, v in sorted(s.failures_by_cause.items(), key=lambda kv: -kv[1]))
            lines.append(f"  failures  {causes}")
        if s.rate_limited:
            lines.append(
                f"  429s      {s.rate_limited}, slowed down {s.slowdowns}x"
                f" (concurrency went down to {s.min_concurrency})"
            )
        if s.outage_pauses:
            lines.append(f"  outages   paused {s.outage_pauses}x after failures in a row (server or network down)")
        lines.append(f"  time      {s.wall_s:.1f}s, {rate:.1f} requests/s")
        click.echo("\n".join(lines))


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


@contextlib.contextmanager
def signals(runner: Any, log: Log | None = None) -> Iterator[None]:
    """First SIGINT/SIGTERM: say so, finish what is in flight; a second one (or the grace ending): cancel it."""
    loop = asyncio.get_running_loop()
    names = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}

    def abandon() -> None:
        if log is not None and runner.in_flight:
            log.abandoning(runner)
        runner.cancel_in_flight()

    heard: list[signal.Signals] = []

    def handle(sig: signal.Signals) -> None:
        if heard:
            abandon()
            return
        heard.append(sig)
        if log is not None:
            log.stopping(runner, sig)
        runner.request_stop(names[sig], "stopped by a signal; rerun the same command to resume where this run stopped.")
        loop.call_later(runner.config.grace_s, abandon)

    for sig in names:
        loop.add_signal_handler(sig, handle, sig)
    try:
        yield
    finally:
        for sig in names:
            loop.remove_signal_handler(sig)
