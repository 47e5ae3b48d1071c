"""The ``batchgate`` command: parse flags, call the library, print, map errors to exit codes.

The only module that imports click or prints.  Exit codes (the README has the same table):
0 all ok · 1 some prompts failed · 2 bad usage, input, key or base URL · 3 stopped early
(balance or budget) · 4 output directory locked · 130/143 interrupted (SIGINT/SIGTERM).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click
import orjson

from .config import BASE_URL_ENV, DEFAULT_BASE_URL, RunConfig, load_api_key
from .errors import BatchgateError, InputError, OutputLocked
from .models import RunSummary
from .runner import Runner

T = TypeVar("T")

EXIT_USAGE = 2
EXIT_LOCKED = 4
SIMULATOR_KEY = "gp-simulator"


def _fail(message: str, code: int) -> None:
    click.echo(f"batchgate: {message}", err=True)
    sys.exit(code)


def _guard(fn: Callable[..., T]) -> Callable[..., T]:
    """Turn library errors into one clear line and an exit code; never a traceback for a user."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except InputError as exc:
            _fail(str(exc), EXIT_USAGE)
        except OutputLocked as exc:
            _fail(str(exc), EXIT_LOCKED)
        except BatchgateError as exc:
            if os.environ.get("BATCHGATE_RAISE_ERRORS"):
                raise
            _fail(str(exc), 1)
        except (click.exceptions.Exit, click.ClickException, SystemExit, KeyboardInterrupt):
            raise
        except Exception as exc:
            if os.environ.get("BATCHGATE_RAISE_ERRORS"):
                raise
            _fail(
                f"internal error: {type(exc).__name__}: {exc} (set BATCHGATE_RAISE_ERRORS=1 for a traceback)",
                1,
            )
        raise AssertionError("unreachable")

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="batchgate")
def main() -> None:
    """Stream JSONL prompt files to the GonkaGate chat API and account for every cent."""


# -- run --------------------------------------------------------------------------------------------


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Output directory [default: reports/<first input's stem>].",
)
@click.option("--model", "default_model", help="Model for lines that name none.")
@click.option(
    "--base-url",
    envvar=BASE_URL_ENV,
    default=DEFAULT_BASE_URL,
    show_default=True,
    help=f"API base URL (env {BASE_URL_ENV}).",
)
@click.option(
    "--api-key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Read the API key from this file instead of $GONKAGATE_API_KEY.",
)
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(1, 10000),
    default=16,
    show_default=True,
    help="Requests in flight at once.",
)
@click.option(
    "--max-attempts",
    type=click.IntRange(1, 100),
    default=5,
    show_default=True,
    help="Attempts per prompt, first included.",
)
@click.option(
    "--connect-timeout",
    type=click.FloatRange(0.1),
    default=10.0,
    show_default=True,
    help="Seconds to open a connection.",
)
@click.option(
    "--idle-timeout",
    type=click.FloatRange(0.1),
    default=60.0,
    show_default=True,
    help="Seconds of silence between two chunks before a stream counts as stalled.",
)
@click.option(
    "--backoff",
    "backoff_base",
    type=click.FloatRange(0.0),
    default=0.5,
    show_default=True,
    help="Base of the exponential backoff between attempts, seconds.",
)
@click.option("--simulate", is_flag=True, help="Run against the built-in simulator (no key, no network).")
@click.option(
    "--sim-fault-rate",
    type=click.FloatRange(0.0, 0.5),
    default=0.0,
    help="With --simulate: inject each fault type at this rate.",
)
@click.option("--sim-seed", type=int, default=0, help="With --simulate: the simulator's seed.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary as the last line of stdout.")
@click.option("--quiet", "-q", is_flag=True, help="Print errors only (and --json).")
@click.option("--no-report", is_flag=True, help="Do not write reports at the end of the run.")
@_guard
def run(
    inputs: tuple[Path, ...],
    out_dir: Path | None,
    default_model: str | None,
    base_url: str,
    api_key_file: Path | None,
    concurrency: int,
    max_attempts: int,
    connect_timeout: float,
    idle_timeout: float,
    backoff_base: float,
    simulate: bool,
    sim_fault_rate: float,
    sim_seed: int,
    as_json: bool,
    quiet: bool,
    no_report: bool,
) -> None:
    """Stream every prompt in INPUTS (JSONL files) and record each answer and its cost."""
    api_key = SIMULATOR_KEY if simulate else load_api_key(api_key_file)
    config = RunConfig(
        out_dir=out_dir or Path("reports") / inputs[0].stem,
        api_key=api_key,
        base_url=base_url,
        default_model=default_model,
        concurrency=concurrency,
        max_attempts=max_attempts,
        connect_timeout_s=connect_timeout,
        idle_timeout_s=idle_timeout,
        backoff_base_s=backoff_base,
    )
    runner = Runner(inputs, config)

    async def go() -> RunSummary:
        async with _maybe_simulator(simulate, sim_fault_rate, sim_seed) as sim_url:
            if sim_url:
                config.base_url = sim_url
            with _signals(runner):
                progress = asyncio.create_task(_progress(runner, quiet))
                try:
                    return await runner.run()
                finally:
                    progress.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await progress

    summary = asyncio.run(go())
    if not quiet:
        _print_summary(summary, runner)
    if runner.stop_message:
        click.echo(f"batchgate: {runner.stop_message}", err=True)
    if not no_report:
        _write_reports(config.out_dir, quiet)
    if as_json:
        click.echo(orjson.dumps(summary.as_dict()).decode())
    sys.exit(summary.exit_code)


@contextlib.asynccontextmanager
async def _maybe_simulator(enabled: bool, fault_rate: float, seed: int) -> Any:
    if not enabled:
        yield None
        return
    from .simulator import SimulatorConfig, running_simulator

    cfg = SimulatorConfig(seed=seed, **_fault_rates(fault_rate))
    async with running_simulator(cfg) as sim:
        yield sim.base_url


def _fault_rates(rate: float) -> dict[str, float]:
    if not rate:
        return {}
    return {
        "reset_rate": rate,
        "stall_rate": rate,
        "stall_s": 2.0,
        "rate_limit_rate": rate,
        "server_error_rate": rate,
        "midstream_error_rate": rate,
    }


@contextlib.contextmanager
def _signals(runner: Runner) -> Iterator[None]:
    """First SIGINT/SIGTERM: finish what is in flight; a second one: cancel it now."""
    loop = asyncio.get_running_loop()
    names = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}

    def handle(sig: signal.Signals) -> None:
        if runner.stopping:
            runner.cancel_in_flight()
            return
        runner.request_stop(names[sig], "stopped by a signal; rerun the same command to resume where this run stopped.")
        loop.call_later(runner.config.grace_s, runner.cancel_in_flight)

    for sig in names:
        loop.add_signal_handler(sig, handle, sig)
    try:
        yield
    finally:
        for sig in names:
            loop.remove_signal_handler(sig)


async def _progress(runner: Runner, quiet: bool) -> None:
    if quiet:
        return
    if sys.stderr.isatty():
        await _progress_bar(runner)
    else:
        await _progress_log(runner)


async def _progress_log(runner: Runner, every_s: float = 10.0) -> None:
    started = time.monotonic()
    while True:
        await asyncio.sleep(every_s)
        click.echo(_progress_line(runner, time.monotonic() - started), err=True)


def _progress_line(runner: Runner, elapsed: float) -> str:
    s = runner.summary
    done = s.ok + s.failed + s.skipped
    return (
        f"progress {done}/{runner.total} ok={s.ok} failed={s.failed} skipped={s.skipped} "
        f"in_flight={runner.in_flight} tokens={s.completion_tokens} "
        f"usd={s.total_cost_usd:.6f} elapsed={elapsed:.0f}s"
    )


async def _progress_bar(runner: Runner) -> None:
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    started = time.monotonic()
    with Progress(
        TextColumn("[bold]batchgate"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[stats]}"),
        TimeRemainingColumn(),
        transient=True,
    ) as bar:
        task = bar.add_task("run", total=None, stats="")
        while True:
            s = runner.summary
            elapsed = max(time.monotonic() - started, 1e-9)
            bar.update(
                task,
                total=runner.total or None,
                completed=s.ok + s.failed + s.skipped,
                stats=(
                    f"ok {s.ok} failed {s.failed} · {s.completion_tokens / elapsed:,.0f} tok/s"
                    f" · ${s.total_cost_usd:.4f}"
                ),
            )
            await asyncio.sleep(0.2)


def _print_summary(s: RunSummary, runner: Runner) -> None:
    rate = s.requests / s.wall_s if s.wall_s > 0 else 0.0
    lines = [
        f"run {s.run_id} → {s.out}",
        f"  requests  {s.requests} ({s.ok} ok, {s.failed} failed, {s.skipped} already done)"
        + (f", {s.retries} retries" if s.retries else ""),
        f"  tokens    {s.prompt_tokens:,} prompt + {s.completion_tokens:,} completion",
        f"  cost      ${s.total_cost_usd:.6f} confirmed",
    ]
    if s.unconfirmed_cost_usd or s.unconfirmed_unpriced_tokens:
        extra = f"  unconfirmed ~${s.unconfirmed_cost_usd:.6f} (streams cut before their usage chunk"
        if s.unconfirmed_unpriced_tokens:
            extra += f"; {s.unconfirmed_unpriced_tokens} tokens not priced"
        lines.append(extra + ")")
    if s.failures_by_cause:
        causes = ", ".join(f"{k} {v}" for k, v in sorted(s.failures_by_cause.items(), key=lambda kv: -kv[1]))
        lines.append(f"  failures  {causes}")
    if s.rate_limited:
        lines.append(
            f"  429s      {s.rate_limited}, slowed down {s.slowdowns}x (concurrency went down to {s.min_concurrency})"
        )
    lines.append(f"  time      {s.wall_s:.1f}s, {rate:.1f} requests/s")
    click.echo("\n".join(lines))


def _write_reports(out_dir: Path, quiet: bool) -> None:
    try:
        from . import reports
    except ImportError:  # pragma: no cover - reports land with their own issue
        return
    try:
        result = reports.build_reports([out_dir])
    except BatchgateError as exc:
        click.echo(f"batchgate: report not written: {exc}", err=True)
        return
    if not quiet:
        click.echo(result.table)
        click.echo(f"reports in {out_dir}/ (report.html, summary.csv, summary.parquet, requests.parquet)")


# -- simulate ---------------------------------------------------------------------------------------


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=0, show_default=True, help="0 picks a free port.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--token-delay", type=float, default=0.0, show_default=True, help="Seconds between chunks.")
@click.option("--reset-rate", type=float, default=0.0, help="Share of streams cut mid-way.")
@click.option("--stall-rate", type=float, default=0.0, help="Share of streams that stall.")
@click.option("--stall-s", type=float, default=30.0, show_default=True)
@click.option("--rate-limit-rate", type=float, default=0.0, help="Share of requests answered 429.")
@click.option("--retry-after", type=float, default=0.05, show_default=True)
@click.option("--server-error-rate", type=float, default=0.0, help="Share of requests answered 500.")
@click.option("--midstream-error-rate", type=float, default=0.0, help="Share of streams with an error chunk.")
@click.option("--balance", type=float, default=None, help="USD to bill before answering 402.")
@click.option("--billing-log", type=click.Path(dir_okay=False), default=None, help="Append what was billed as JSONL.")
@_guard
def simulate(**opts: Any) -> None:
    """Serve a GonkaGate-compatible API with fault injection on loopback (for tests and demos)."""
    from .simulator import SimulatorConfig, serve

    host, port = opts.pop("host"), opts.pop("port")
    cfg = SimulatorConfig(
        seed=opts["seed"],
        token_delay_s=opts["token_delay"],
        reset_rate=opts["reset_rate"],
        stall_rate=opts["stall_rate"],
        stall_s=opts["stall_s"],
        rate_limit_rate=opts["rate_limit_rate"],
        retry_after_s=opts["retry_after"],
        server_error_rate=opts["server_error_rate"],
        midstream_error_rate=opts["midstream_error_rate"],
        balance_usd=opts["balance"],
        billing_log=opts["billing_log"],
    )

    def ready(url: str) -> None:
        click.echo(f"listening on {url}")
        sys.stdout.flush()

    serve(cfg, host, port, ready)
