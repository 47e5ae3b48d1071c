"""The ``batchgate`` command: parse flags, call the library, print, map errors to exit codes.

The only module that imports click or prints.  Exit codes (the README has the same table):
0 all ok · 1 some prompts failed · 2 bad usage, input, key or base URL · 3 stopped early
(balance or budget) · 4 output directory locked · 130/143 interrupted (SIGINT/SIGTERM).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import os
import resource
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
import orjson
from click.core import ParameterSource

from . import jobs
from .cli_display import Log, signals
from .config import BASE_URL_ENV, DEFAULT_BASE_URL, KEY_ENV, RunConfig, load_api_key
from .errors import BatchgateError, InputError, OutputLocked
from .jobfile import load_job
from .ledger import LEDGER_NAME

if TYPE_CHECKING:
    from .runner import Runner

T = TypeVar("T")

EXIT_USAGE = 2
EXIT_LOCKED = 4
SIMULATOR_KEY = "gp-simulator"


def _fail(message: str, code: int) -> None:
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.params.get("log_format") == "json":  # cron logs: JSON lines only
        Log(False, "json").error(message)
    else:
        click.echo(f"batchgate: {message}", err=True)
    sys.exit(code)


def _warn(opts: dict[str, Any], message: str) -> None:
    """A warning before the run starts; a JSON line under --log-format json (cron logs hold nothing else)."""
    if opts.get("log_format") == "json":
        Log(False, "json").emit("warning", message=message)
    else:
        click.echo(f"batchgate: warning: {message}", err=True)


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
        except BrokenPipeError:  # `batchgate ... | head`: the reader left; say nothing more
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)
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
@click.version_option(None, "-V", "--version", package_name="batchgate")
def main() -> None:
    """Stream JSONL prompt files to the GonkaGate chat API and account for every cent."""


# -- run --------------------------------------------------------------------------------------------


def run_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options `run` and `estimate` share (sqlite-utils style option bundle)."""
    options = [
        click.argument("inputs", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path)),
        click.option(
            "--out",
            "out_dir",
            type=click.Path(file_okay=False, path_type=Path),
            help="Output directory [default: reports/<job or first input's stem>].",
        ),
        click.option("--model", "default_model", help="Model for lines that name none."),
        click.option(
            "--template",
            type=click.Path(dir_okay=False, path_type=Path),
            help="Jinja2 template file: INPUTS are tables (CSV, TSV, Parquet, JSONL) rendered row by row.",
        ),
        click.option(
            "--prompt", "prompt_text", metavar="TEXT", help='Inline template instead, e.g. "Summarise: {{ text }}".'
        ),
        click.option("--system-template", metavar="TEXT", help="Jinja2 template of a system message for each row."),
        click.option("--id-column", metavar="NAME", help="Column holding each row's id [default: from its content]."),
        click.option("--strict", is_flag=True, help="Unknown chat parameters are errors, not warnings."),
        click.option(
            "--base-url",
            envvar=BASE_URL_ENV,
            default=DEFAULT_BASE_URL,
            show_default=True,
            help=f"API base URL (env {BASE_URL_ENV}).",
        ),
        click.option(
            "--api-key-file",
            type=click.Path(dir_okay=False, path_type=Path),
            help=f"Read the API key from this file instead of ${KEY_ENV}.",
        ),
        click.option("--concurrency", "-c", type=click.IntRange(1, 10000), default=16, show_default=True),
        click.option("--max-attempts", type=click.IntRange(1, 100), default=5, show_default=True),
        click.option(
            "--max-cost-usd",
            "--max-cost",
            "max_cost",
            type=click.FloatRange(0, min_open=True),
            help="Never spend more USD in this invocation (job file: max_cost_usd).",
        ),
        click.option(
            "--max-total-cost-usd",
            "--max-total-cost",
            "max_total_cost",
            type=click.FloatRange(0),
            help="Cap on the spend of every run of this output directory together (kept in OUT/spend.jsonl).",
        ),
        click.option(
            "--daily-cap-usd",
            "--daily-cap",
            "daily_cap",
            type=click.FloatRange(0),
            help="Cap on spend per UTC day, across runs (and jobs sharing --budget-file).",
        ),
        click.option(
            "--monthly-cap-usd",
            "--monthly-cap",
            "monthly_cap",
            type=click.FloatRange(0),
            help="Cap on spend per UTC month, across runs (and jobs sharing --budget-file).",
        ),
        click.option(
            "--budget-file",
            type=click.Path(dir_okay=False, path_type=Path),
            help="A locked file several jobs or cron entries share their daily/monthly caps in.",
        ),
        click.option(
            "--cache",
            "cache_dir",
            type=click.Path(file_okay=False, path_type=Path),
            help="Answer cache shared across runs and output directories: a request bought once is not bought again.",
        ),
        click.option(
            "--cache-nondeterministic",
            is_flag=True,
            help="Cache answers at temperature > 0 (or none given) too; two samples would then be one.",
        ),
        click.option(
            "--json-schema",
            "json_schema",
            type=click.Path(dir_okay=False, path_type=Path),
            help="Every answer must be JSON matching this JSON Schema file (sent as response_format).",
        ),
        click.option(
            "--json-mode",
            type=click.Choice(["json_schema", "json_object"]),
            default="json_schema",
            show_default=True,
            help="response_format to send with --json-schema (json_object for models without json_schema).",
        ),
        click.option(
            "--reask",
            type=click.IntRange(0, 10),
            default=0,
            show_default=True,
            help="Re-ask (a paid request each) up to N times when an answer does not match --json-schema.",
        ),
        click.option(
            "--on-length",
            type=click.Choice(["keep", "fail", "reask"]),
            default="keep",
            show_default=True,
            help="An answer cut at max_tokens: keep it, count it failed, or re-ask (with --reask N).",
        ),
        click.option(
            "--samples",
            type=click.IntRange(1, 1000),
            default=1,
            show_default=True,
            help="Independent answers per prompt, each its own ledger row (id, sample).",
        ),
        click.option(
            "--shard",
            metavar="K/N",
            help="Run only shard K of N (by id hash; 1-based); output goes to OUT/shard-K-of-N.",
        ),
        click.option(
            "--shards",
            type=click.IntRange(1, 10000),
            help="N shards, K from $JOB_COMPLETION_INDEX (a Kubernetes Indexed Job) + 1.",
        ),
        click.option("--rpm", type=click.FloatRange(0, min_open=True), help="Cap on requests started per minute."),
        click.option(
            "--key-limits/--no-key-limits",
            envvar="BATCHGATE_KEY_LIMITS",
            default=True,
            show_default=True,
            help="Stay within one GonkaGate key's limits (50 concurrent, 600/min, 200 per 10 s).",
        ),
        click.option(
            "--model-check/--no-model-check",
            default=True,
            show_default=True,
            help="Ask the model catalog (GET /models) before the first paid request; a model it lacks stops the run.",
        ),
        click.option(
            "--key-concurrency",
            type=click.IntRange(1),
            default=50,
            show_default=True,
            help="Concurrent requests your key allows (raise it only if GonkaGate raised it for you).",
        ),
        click.option(
            "--key-rpm",
            type=click.FloatRange(0, min_open=True),
            default=600.0,
            show_default=True,
            help="Requests per minute your key allows (the 10-s burst is a third of it).",
        ),
        click.option("--connect-timeout", type=click.FloatRange(0.1), default=10.0, show_default=True),
        click.option(
            "--idle-timeout",
            type=click.FloatRange(0.1),
            default=60.0,
            show_default=True,
            help="Seconds of silence between two chunks before a stream counts as stalled.",
        ),
        click.option(
            "--backoff", type=click.FloatRange(0.0), default=0.5, show_default=True, help="Backoff base, seconds."
        ),
        click.option(
            "--grace",
            type=click.FloatRange(0.0),
            default=30.0,
            show_default=True,
            help="After SIGINT/SIGTERM, seconds in-flight requests get to finish.",
        ),
        click.option("--simulate", is_flag=True, help="Run against the built-in simulator (no key, no network)."),
        click.option(
            "--sim-fault-rate",
            type=click.FloatRange(0.0, 0.2),
            default=0.0,
            help="With --simulate: share of requests that fault, split evenly over the five fault types.",
        ),
        click.option("--sim-seed", type=int, default=0, help="With --simulate: the simulator's seed."),
        click.option(
            "--sim-token-delay",
            type=click.FloatRange(0.0, 1.0),
            default=0.01,
            show_default=True,
            help="With --simulate: seconds between streamed tokens.",
        ),
        click.option(
            "--sim-key-limits/--no-sim-key-limits",
            default=True,
            show_default=True,
            help="With --simulate: the simulator enforces one key's limits, as GonkaGate does.",
        ),
        click.option("--json", "as_json", is_flag=True, help="Print a JSON summary as the last line of stdout."),
        click.option("--quiet", "-q", is_flag=True, help="Errors only (and --json)."),
        click.option(
            "--log-format",
            type=click.Choice(["text", "json"]),
            default="text",
            show_default=True,
            help="Progress lines when stderr is not a terminal.",
        ),
        click.option(
            "--log-every",
            type=click.FloatRange(0.1),
            default=10.0,
            show_default=True,
            help="Seconds between log lines.",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _settings(ctx: click.Context, opts: dict[str, Any]) -> tuple[list[Path], RunConfig, dict[str, Any]]:
    """Merge a TOML job file (if INPUTS is one) under the command line; build the RunConfig."""
    inputs: list[Path] = list(opts["inputs"])
    job_name: str | None = None
    chat: dict[str, Any] = {}
    system: str | None = None
    if any(p.suffix == ".toml" for p in inputs):
        if len(inputs) != 1:
            raise InputError("give either one job file (.toml) or prompt files (.jsonl), not both")
        spec = load_job(inputs[0])
        for name, value in spec.settings.items():
            if name == "system_prompt":
                system = value
            elif ctx.get_parameter_source(name) in (ParameterSource.DEFAULT, None):
                opts[name] = value
        if opts["out_dir"] is None and spec.out is not None:
            opts["out_dir"] = spec.out
        inputs, job_name, chat = spec.inputs, spec.name, spec.chat
        if opts.get("strict") and spec.warnings:
            raise InputError("\n".join(w + " (--strict)" for w in spec.warnings))
        for warning in spec.warnings:
            _warn(opts, warning)
    if opts.get("template") is not None and opts.get("prompt_text") is not None:
        raise InputError("give either --template FILE or --prompt TEXT, not both")
    template = opts.get("template") if opts.get("template") is not None else opts.get("prompt_text")
    first = inputs[0]
    compressed = first.suffix in (".gz", ".bz2", ".zst")
    stem = "stdin" if str(first) in ("-", "/dev/stdin") else (Path(first.stem).stem if compressed else first.stem)
    out_dir: Path = opts["out_dir"] or Path("reports") / (job_name or stem)
    shard = _shard(opts.get("shard"), opts.get("shards"))
    if shard is not None:
        out_dir = out_dir / f"shard-{shard[0]}-of-{shard[1]}"
    if opts.get("fresh") and (out_dir / LEDGER_NAME).exists():
        out_dir = out_dir.with_name(f"{out_dir.name}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}")
    key_warnings: list[str] = []
    api_key = SIMULATOR_KEY if opts["simulate"] else load_api_key(opts["api_key_file"], warn=key_warnings)
    for warning in key_warnings:
        _warn(opts, warning)
    key_limits = opts.get("key_limits", True)
    config = RunConfig(
        out_dir=out_dir,
        api_key=api_key,
        base_url=opts["base_url"],
        default_model=opts["default_model"],
        concurrency=opts["concurrency"],
        max_attempts=opts["max_attempts"],
        connect_timeout_s=opts["connect_timeout"],
        idle_timeout_s=opts["idle_timeout"],
        backoff_base_s=opts["backoff"],
        max_cost_usd=opts["max_cost"],
        rpm=opts["rpm"],
        check_models=opts.get("model_check", True),
        key_concurrency=opts["key_concurrency"] if key_limits else None,
        key_rpm=opts["key_rpm"] if key_limits else None,
        key_burst_10s=opts["key_rpm"] / 3 if key_limits else None,
        grace_s=opts["grace"],
        jobs=[job_name] * len(inputs) if job_name else None,
        chat_defaults=chat,
        system_prompt=system,
        samples=opts.get("samples") or 1,
        shard=shard,
        max_total_cost_usd=opts.get("max_total_cost"),
        daily_cap_usd=opts.get("daily_cap"),
        monthly_cap_usd=opts.get("monthly_cap"),
        budget_file=opts.get("budget_file"),
        cache_dir=opts.get("cache_dir"),
        cache_nondeterministic=bool(opts.get("cache_nondeterministic")),
        template=template,
        system_template=opts.get("system_template"),
        id_column=opts.get("id_column"),
        strict=bool(opts.get("strict")),
        json_schema=_read_schema(opts.get("json_schema")),
        json_mode=opts.get("json_mode") or "json_schema",
        reask=opts.get("reask") or 0,
        on_length=opts.get("on_length") or "keep",
    )
    if config.key_concurrency is not None and config.concurrency > config.key_concurrency:
        _warn(
            opts,
            f"GonkaGate allows {config.key_concurrency} concurrent requests per key; running at "
            f"{config.key_concurrency} (--key-concurrency N if your key allows more)",
        )
    return inputs, config, opts


def _read_schema(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        schema = orjson.loads(path.read_bytes())
    except OSError as exc:
        raise InputError(f"{path}: cannot read the JSON Schema ({exc.strerror or exc})") from None
    except orjson.JSONDecodeError as exc:
        raise InputError(f"{path}: not JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise InputError(f"{path}: a JSON Schema must be an object")
    from .structured import AnswerSchema

    AnswerSchema(schema, source=str(path))  # a bad schema is exit 2 before anything is sent
    return schema


def _shard(spec: str | None, shards: int | None) -> tuple[int, int] | None:
    """``--shard K/N``, or ``--shards N`` with K from $JOB_COMPLETION_INDEX (0-based there)."""
    if spec is not None and shards is not None:
        raise InputError("give --shard K/N or --shards N, not both")
    if shards is not None:
        index = os.environ.get("JOB_COMPLETION_INDEX")
        if index is None or not index.isdigit():
            raise InputError(
                "--shards N takes its shard from $JOB_COMPLETION_INDEX, which is not set (use --shard K/N)"
            )
        spec = f"{int(index) + 1}/{shards}"
    if spec is None:
        return None
    k_text, _, n_text = spec.partition("/")
    if not (k_text.isdigit() and n_text.isdigit()) or not 1 <= int(k_text) <= int(n_text):
        raise InputError(f"--shard {spec}: expected K/N with 1 <= K <= N, e.g. --shard 2/3")
    return int(k_text), int(n_text)


@main.command()
@run_options
@click.option("--fresh", is_flag=True, help="Start over in a new output directory (the old ledger is kept).")
@click.option("--no-report", is_flag=True, help="Do not write reports at the end of the run.")
@click.pass_context
@_guard
def run(ctx: click.Context, **opts: Any) -> None:
    """Stream every prompt in INPUTS and record each answer and its cost.

    INPUTS are JSONL prompt files, or one TOML job file (options given here override it).
    Rerunning the same command resumes: prompts already answered are skipped, failed ones retried.
    """
    inputs, config, opts = _settings(ctx, opts)
    log = Log(opts["quiet"], opts["log_format"])
    config = _ensure_file_descriptors(config, log)
    _tune_gc()
    from .runner import Runner  # aiohttp and the engine: only for the commands that send

    runner = Runner(inputs, config)
    summary = _run_loop(_drive(runner, opts, log, runner.run()))
    for notice in runner.notices:
        log.notice(notice)
    log.summary(summary, runner.stop_message)
    if not opts["no_report"]:
        _write_reports(config.out_dir, opts["quiet"] or log.json)  # json: the end event says it all
    if opts["as_json"]:
        click.echo(orjson.dumps(summary.as_dict()).decode())
    sys.exit(summary.exit_code)


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--model", "default_model", help="Model for lines that name none.")
@click.option(
    "--template",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Jinja2 template file: INPUTS are tables (CSV, TSV, Parquet, JSONL) rendered row by row.",
)
@click.option("--prompt", "prompt_text", metavar="TEXT", help='Inline template instead, e.g. "Summarise: {{ text }}".')
@click.option("--system-template", metavar="TEXT", help="Jinja2 template of a system message for each row.")
@click.option("--id-column", metavar="NAME", help="Column holding each row's id [default: an id from its content].")
@click.option("--strict", is_flag=True, help="Unknown chat parameters are errors, not warnings.")
@_guard
def validate(
    inputs: tuple[Path, ...],
    default_model: str | None,
    template: Path | None,
    prompt_text: str | None,
    system_template: str | None,
    id_column: str | None,
    strict: bool,
) -> None:
    """Check prompt files, tables (or a job file's) without sending anything, as `run` does first.

    Use - for standard input; .gz, .zst and .bz2 files are read as they are.
    """
    if template is not None and prompt_text is not None:
        raise InputError("give either --template FILE or --prompt TEXT, not both")
    paths = list(inputs)
    user_template: str | Path | None = template if template is not None else prompt_text
    system: str | Path | None = system_template
    if len(paths) == 1 and paths[0].suffix == ".toml":
        spec = load_job(paths[0])
        paths = spec.inputs
        default_model = default_model or spec.settings.get("default_model")
        if user_template is None:
            user_template = spec.settings.get("template")
        system = system if system is not None else spec.settings.get("system_template")
        id_column = id_column or spec.settings.get("id_column")
        if strict and spec.warnings:
            raise InputError("\n".join(w + " (--strict)" for w in spec.warnings))
        for warning in spec.warnings:
            click.echo(f"batchgate: warning: {warning}", err=True)
    report = jobs.validate(
        paths,
        default_model=default_model,
        template=user_template,
        system_template=system,
        id_column=id_column,
        strict=strict,
    )
    if report.warnings:
        click.echo("\n".join(f"batchgate: warning: {w}" for w in report.warnings), err=True)
    if not report.ok():
        raise InputError(report.format())
    click.echo(f"{report.records:,} prompts, {report.prompt_chars:,} prompt characters: ready to run")


@main.command("estimate")
@run_options
@click.option("--sample", type=int, default=200, show_default=True, help="Prompts to run for real.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random sample.")
@click.pass_context
@_guard
def estimate_command(ctx: click.Context, **opts: Any) -> None:
    """Run a random sample of INPUTS for real and project the cost of all of them.

    The sampled answers go into the output directory's ledger: a later `batchgate run` with the
    same --out reuses them instead of buying them again. --max-cost caps the sample's spend.
    """
    from . import estimate as estimating

    inputs, config, opts = _settings(ctx, opts)
    log = Log(opts["quiet"], opts["log_format"])
    config = _ensure_file_descriptors(config, log)
    plan = estimating.draw_sample(inputs, config, sample=opts["sample"], seed=opts["seed"])
    from .runner import Runner

    runner = Runner(inputs, config, records=plan.drawn)
    summary = _run_loop(_drive(runner, opts, log, runner.run()))
    result = estimating.project_sample(plan, config, runner, summary)
    files = estimating.write_estimate(result, config.out_dir)
    if result.stop_message:
        log.error(result.stop_message)
    if not opts["quiet"]:
        click.echo(result.table)
        click.echo(f"wrote {', '.join(str(f) for f in files)}")
    if opts["as_json"]:
        click.echo(orjson.dumps(result.as_dict()).decode())
    sys.exit(result.exit_code)


def _raise_open_files(want: int) -> int:
    """Lift the soft open-files limit (often 1024) toward ``want``, up to the hard limit; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return want
    target = want if hard == resource.RLIM_INFINITY else min(hard, want)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def _ensure_file_descriptors(config: RunConfig, log: Log) -> RunConfig:
    """One socket per stream: without enough descriptors, --concurrency 3000 fails connects with EMFILE.

    When the hard limit is too low, run at the concurrency it allows and say so rather than fail prompts.
    """
    allowed = _raise_open_files(config.concurrency + 64)
    if allowed >= config.concurrency + 64:
        return config
    config = dataclasses.replace(config, concurrency=max(1, allowed - 64))
    log.error(f"the open-files limit ({allowed}) is too low; running with --concurrency {config.concurrency}")
    return config


EVENT_LOOPS = ("asyncio", "uvloop")


def _run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on the event loop ``BATCHGATE_EVENT_LOOP`` names: asyncio's (the default) or
    uvloop's, an optional extra (``pip install 'batchgate[uvloop]'``) measured at ~10% less CPU
    per request with many streams (benchmarks/bench_slow_streams.py)."""
    name = os.environ.get("BATCHGATE_EVENT_LOOP", "asyncio").strip().lower() or "asyncio"
    if name not in EVENT_LOOPS:
        main.close()
        raise InputError(f"BATCHGATE_EVENT_LOOP={name}: choose asyncio or uvloop")
    factory = None
    if name == "uvloop":
        try:
            import uvloop
        except ImportError:
            main.close()
            raise InputError(
                "BATCHGATE_EVENT_LOOP=uvloop but uvloop is not installed: pip install 'batchgate[uvloop]'"
            ) from None
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def _tune_gc() -> None:
    """Fewer, cheaper collections for a long streaming run.

    Everything imported so far lives for the whole process, so freeze it out of the
    collector's scans; a higher first threshold lets the short-lived per-chunk garbage die by
    reference counting before a generation-0 pass looks at it (bench_cpu: GC time per
    request ~200 -> ~1 us with paced tokens).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 50, 100)


async def _drive(runner: Runner, opts: dict[str, Any], log: Log, work: Awaitable[T]) -> T:
    """Run ``work`` with the simulator (if asked), signal handling and progress output around it."""
    async with _maybe_simulator(opts) as sim_url:
        if sim_url:
            runner.config = dataclasses.replace(runner.config, base_url=sim_url)
        log.start(runner, runner.inputs)
        with signals(runner, log):
            progress = asyncio.create_task(log.progress(runner, opts["log_every"]))
            try:
                return await work
            finally:
                progress.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await progress


@contextlib.asynccontextmanager
async def _maybe_simulator(opts: dict[str, Any]) -> Any:
    if not opts["simulate"]:
        yield None
        return
    from .simulator import SimulatorConfig, running_simulator

    # A rehearsal meets what the real API does: the per-key limits are on unless a caller turns them off.
    cfg = SimulatorConfig(
        seed=opts["sim_seed"],
        token_delay_s=opts["sim_token_delay"],
        fault_rate=opts["sim_fault_rate"],
        stall_s=2.0,
        key_limits=opts.get("sim_key_limits", True),
    )
    async with running_simulator(cfg) as sim:
        yield sim.base_url


def _write_reports(out_dir: Path, quiet: bool) -> None:
    """End-of-run reports: a failure here is reported but never changes the run's exit code."""
    from . import reports

    if not (out_dir / LEDGER_NAME).exists():
        return
    try:
        result = reports.build_reports([out_dir])
    except BatchgateError as exc:
        click.echo(f"batchgate: report not written: {exc}", err=True)
        return
    if not quiet:
        click.echo(result.table)
        click.echo(f"reports in {out_dir}/: {', '.join(f.name for f in result.files)}")


@main.command()
@click.argument("paths", nargs=-1, required=True)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where to write the reports [default: the run directory; _all/ under the parent for several runs].",
)
@click.option("--by", default="job,model", show_default=True, help="Group by any of job,model,day,status.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "parquet", "html", "all"]),
    multiple=True,
    default=["all"],
    show_default=True,
)
@click.option(
    "--partition-by-day",
    is_flag=True,
    help="Write the requests as requests/day=YYYY-MM-DD/*.parquet (a hive dataset) instead of requests.parquet.",
)
@_guard
def report(paths: tuple[str, ...], out_dir: Path | None, by: str, fmt: tuple[str, ...], partition_by_day: bool) -> None:
    """Cost reports over run directories (or globs, or a parent holding many runs)."""
    formats = ("csv", "parquet", "html") if "all" in fmt else fmt
    with _terminate_as_exit():  # before the imports: a thread they start must inherit the blocked signals
        from . import reports

        result = reports.build_reports(
            list(paths), out_dir, by=by.split(","), formats=formats, partition_by_day=partition_by_day
        )
    click.echo(result.table)
    for skipped in result.data.skipped:
        click.echo(f"{skipped.ledger}:{skipped.line}: skipped: {skipped.reason}", err=True)
    for f in result.files:
        click.echo(f"wrote {f}")


# -- export / status -------------------------------------------------------------------------------


@main.command("export")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["chat-jsonl", "parquet", "openai-batch", "hf"]),
    default="chat-jsonl",
    show_default=True,
    help="chat-jsonl/parquet: messages + answer per row; openai-batch: Batch API output lines; hf: a dataset folder.",
)
@click.option("--to", "to", required=True, type=click.Path(path_type=Path), help="File (or folder, for hf) to write.")
@click.option("--only-valid", is_flag=True, help="Only answers that passed --json-schema validation.")
@click.option("--include-failed", is_flag=True, help="Also rows whose prompt failed (no answer).")
@click.option(
    "--inputs",
    "inputs",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The prompt files the run read, when its run file does not name them (repeat for several).",
)
@click.option("--model", "default_model", help="Model for lines that name none (default: the run's).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary of the export.")
@_guard
def export_command(
    out_dir: Path,
    fmt: str,
    to: Path,
    only_valid: bool,
    include_failed: bool,
    inputs: tuple[Path, ...],
    default_model: str | None,
    as_json: bool,
) -> None:
    """Write the answers in OUT_DIR (or its shard-K-of-N/ dirs) as a dataset: one row per answer.

    Each row joins the latest answer of an (id, sample) to the messages sent, re-read from the
    run's inputs. Written to a temporary name and renamed, so PATH is never half written.
    """
    from .export import export
    from .status import is_shard_dir

    result = export(
        out_dir,
        to,
        fmt=fmt,
        only_valid=only_valid,
        include_failed=include_failed,
        inputs=list(inputs) or None,
        default_model=default_model,
    )
    if as_json:
        click.echo(orjson.dumps(result.as_dict()).decode())
        return
    left_out = []
    if result.failed_skipped:
        left_out.append(f"{result.failed_skipped:,} failed (--include-failed to keep)")
    if result.invalid_skipped:
        left_out.append(f"{result.invalid_skipped:,} not valid")
    if result.unmatched_rows:
        left_out.append(f"{result.unmatched_rows:,} answers whose prompt is not in the inputs")
    click.echo(f"wrote {result.rows:,} rows ({fmt}, ${result.total_cost_usd:.6f}) to {result.path}")
    if left_out:
        click.echo("left out: " + "; ".join(left_out))
    if result.prompts_without_rows and not is_shard_dir(out_dir):  # a shard has only its share
        click.echo(f"{result.prompts_without_rows:,} prompts of the inputs have no row in this directory")


@main.command("status")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON object.")
@_guard
def status_command(out_dir: Path, as_json: bool) -> None:
    """Where a run stands, from its files alone: done/total, failures, spend, rate, ETA, lock holder.

    No network and no lock taken; a parent of shard-K-of-N/ directories shows their sum.
    """
    from .status import format_status, status

    st = status(out_dir)
    click.echo(orjson.dumps(st.as_dict()).decode() if as_json else format_status(st))


# -- cache and budget (helper money) --------------------------------------------------------------


@main.group("cache")
def cache_group() -> None:
    """Inspect and prune an answer cache made by `run --cache DIR`."""


def _open_cache(directory: Path) -> Any:
    from .cache import CACHE_NAME, AnswerCache

    if not (directory / CACHE_NAME).is_file():
        raise InputError(f"{directory}: no answer cache here (no {CACHE_NAME})")
    return AnswerCache.open(directory)


def _stamp(when: Any) -> str:
    return "-" if when is None else f"{when:%Y-%m-%dT%H:%MZ}"


def _mb(n: int) -> str:
    return f"{n / 1048576:.2f} MB"


@cache_group.command("stats")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@_guard
def cache_stats(directory: Path, as_json: bool) -> None:
    """How many answers the cache holds, its size, and what its hits saved."""
    from .budget import format_usd

    with _open_cache(directory) as cache:
        st = cache.stats()
    if as_json:
        doc = {
            "path": str(st.path), "entries": st.entries, "answers_bytes": st.answers_bytes, "file_bytes": st.file_bytes,
            "hits": st.hits, "original_cost_usd": st.original_cost_usd, "saved_usd": st.saved_usd,
            "oldest_at": _stamp(st.oldest_at), "last_used_at": _stamp(st.last_used_at),
        }  # fmt: skip
        click.echo(orjson.dumps(doc).decode())
        return
    click.echo(f"cache     {st.path}")
    click.echo(f"answers   {st.entries} ({_mb(st.answers_bytes)} stored, {_mb(st.file_bytes)} on disk)")
    bought = format_usd(st.original_cost_usd)
    click.echo(f"hits      {st.hits}, saved {format_usd(st.saved_usd)} (the answers cost {bought} when bought)")
    click.echo(f"oldest    {_stamp(st.oldest_at)}, last used {_stamp(st.last_used_at)}")


@cache_group.command("prune")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--older-than", "older_than", type=click.FloatRange(min=0), help="Drop answers unused for DAYS days.")
@click.option("--max-size", "max_size", type=click.FloatRange(min=0), help="Then drop least recently used to fit MB.")
@_guard
def cache_prune(directory: Path, older_than: float | None, max_size: float | None) -> None:
    """Drop old or least recently used answers from a cache (safe while runs use it)."""
    if older_than is None and max_size is None:
        raise InputError("cache prune: give --older-than DAYS, --max-size MB, or both")
    with _open_cache(directory) as cache:
        res = cache.prune(older_than_days=older_than, max_size_mb=max_size)
    click.echo(f"removed {res.removed} answers; {res.left} left ({_mb(res.answers_bytes)})")


@main.group("budget")
def budget_group() -> None:
    """Show what the persistent caps (--max-total-cost, --daily-cap, --monthly-cap) have used."""


@budget_group.command("status")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), help="A run's output directory.")
@click.option("--budget-file", type=click.Path(dir_okay=False, path_type=Path), help="A shared budget file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@_guard
def budget_status_command(out_dir: Path | None, budget_file: Path | None, as_json: bool) -> None:
    """Spend recorded for the total, today and this month (UTC), and what running or killed runs hold."""
    from .budget import budget_status, format_usd

    if out_dir is None and budget_file is None:
        raise InputError("budget status: give --out DIR, --budget-file PATH, or both")
    status = budget_status(out_dir, budget_file)
    if as_json:
        scopes = [
            {
                "path": str(s.path), "scope": s.scope, "window": s.key, "used_usd": s.used_usd,
                "settled_usd": s.settled_usd, "running_usd": s.running_usd,
                "possibly_spent_usd": s.possibly_spent_usd, "resets_at": _stamp(s.resets_at) if s.resets_at else None,
            }
            for s in status.scopes
        ]  # fmt: skip
        click.echo(orjson.dumps({"scopes": scopes, "unreadable_lines": status.unreadable_lines}).decode())
        return
    if not status.scopes:
        click.echo("no spend recorded yet")
    names = {"total": "total", "daily": "today", "monthly": "this month"}
    shown: Path | None = None
    for s in status.scopes:
        if s.path != shown:
            click.echo(str(s.path))
            shown = s.path
        label = f"{names[s.scope]} {s.key}".strip()
        line = f"  {label:<22} {format_usd(s.used_usd):>10} used"
        if s.running_usd > 0:
            line += f", {format_usd(s.running_usd)} held by running runs"
        if s.possibly_spent_usd > 0:
            line += f", {format_usd(s.possibly_spent_usd)} possibly spent by killed runs"
        if s.resets_at is not None:
            line += f"; resets {_stamp(s.resets_at)}"
        click.echo(line)
    if status.unreadable_lines:
        click.echo(f"batchgate: {status.unreadable_lines} unreadable line(s) skipped", err=True)


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """SIGTERM / SIGINT during a report end it with 143 / 130 once its files are written, never half way.

    The handler only takes note: raising from it while DuckDB runs (a Python exception inside its
    C++ code) can abort the process (SIGABRT) with its scratch files left behind, and a mask would
    not do, since threads started at import (numpy's BLAS pool) do not inherit it.  Every file is
    written then renamed, so finishing first leaves nothing half written.
    """
    got: list[int] = []

    def note(signum: int, frame: object) -> None:
        got.append(signum)

    try:
        previous = {sig: signal.signal(sig, note) for sig in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    except Exception:
        if got:  # DuckDB may still turn a signal into "Query interrupted": it is the signal
            raise SystemExit(128 + got[0]) from None
        raise
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    if got:
        raise SystemExit(128 + got[0])


# -- balance --------------------------------------------------------------------------------------


@main.command()
@click.option(
    "--base-url",
    envvar=BASE_URL_ENV,
    default=DEFAULT_BASE_URL,
    show_default=True,
    help=f"API base URL (env {BASE_URL_ENV}).",
)
@click.option("--api-key-file", type=click.Path(dir_okay=False, path_type=Path), help=f"Instead of ${KEY_ENV}.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@_guard
def balance(base_url: str, api_key_file: Path | None, as_json: bool) -> None:
    """The key's balance and GonkaGate's published prices (GET /api/v1/whoami and /api/v1/public/pricing)."""
    from .account import fetch_account

    account = asyncio.run(fetch_account(load_api_key(api_key_file), base_url))
    if as_json:
        doc = {
            "balance_usd": account.balance.usd if account.balance else None,
            "balance_status": account.balance.status if account.balance else None,
            "prices_usd_per_1m_tokens": {
                m: round(p.usd_per_token_total * 1e6, 9) for m, p in sorted((account.prices or {}).items())
            },
        }
        click.echo(orjson.dumps(doc).decode())
        return
    if account.balance is None:
        click.echo("balance   not published here (GET /api/v1/whoami did not answer)")
    else:
        state = f" ({account.balance.status})" if account.balance.status else ""
        click.echo(f"balance   ${account.balance.usd:,.6f}{state}")
    if not account.prices:
        click.echo("prices    not published here (GET /api/v1/public/pricing did not answer)")
        return
    click.echo("prices    USD per 1M tokens (network + platform fee)")
    width = max(len(m) for m in account.prices)
    for model, price in sorted(account.prices.items()):
        click.echo(f"  {model:<{width}}  {price.usd_per_token_total * 1e6:>10.4f}")


# -- simulate ---------------------------------------------------------------------------------------


def _statuses(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise InputError(f"--server-error-statuses: not a comma-separated list of statuses: {text!r}") from None


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=0, show_default=True, help="0 picks a free port.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--token-delay", type=float, default=0.0, show_default=True, help="Seconds between chunks.")
@click.option(
    "--fault-rate", type=float, default=0.0, help="Share of requests that fault, split evenly over the five types."
)
@click.option("--reset-rate", type=float, default=0.0, help="Share of streams cut mid-way.")
@click.option("--stall-rate", type=float, default=0.0, help="Share of streams that stall.")
@click.option("--stall-s", type=float, default=30.0, show_default=True)
@click.option("--rate-limit-rate", type=float, default=0.0, help="Share of requests answered 429.")
@click.option("--retry-after", type=float, default=0.05, show_default=True)
@click.option("--server-error-rate", type=float, default=0.0, help="Share of requests answered 5xx.")
@click.option(
    "--server-error-statuses",
    default="500",
    show_default=True,
    help="Comma-separated 5xx statuses the server errors pick from (500, 502, 503, 504).",
)
@click.option("--midstream-error-rate", type=float, default=0.0, help="Share of streams with an error chunk.")
@click.option("--min-completion-tokens", type=int, default=8, show_default=True)
@click.option("--max-completion-tokens", type=int, default=64, show_default=True)
@click.option("--keepalive-rate", type=float, default=0.0, help="Share of chunks preceded by a keep-alive comment.")
@click.option(
    "--rate-limit-code",
    default="rate_limit_exceeded",
    show_default=True,
    help="error.code of injected 429s (e.g. transfer_agent_capacity_reached).",
)
@click.option(
    "--separate-usage-rate",
    type=float,
    default=0.5,
    show_default=True,
    help="Share of streams with usage in its own `choices: []` chunk (else in the finish chunk).",
)
@click.option("--balance", type=float, default=None, help="USD to bill before answering insufficient_quota.")
@click.option(
    "--quota-status",
    type=click.Choice(["429", "402"]),
    default="429",
    show_default=True,
    help="How a spent balance is answered: 429 insufficient_quota (current docs) or 402 (older pages).",
)
@click.option(
    "--key-limits/--no-key-limits",
    default=False,
    show_default=True,
    help="Enforce GonkaGate's per-key limits (429 rate_limit_exceeded with Retry-After).",
)
@click.option("--key-concurrency-limit", type=int, default=50, show_default=True, help="Requests in flight per key.")
@click.option("--key-rpm-limit", type=int, default=600, show_default=True, help="Requests per minute per key.")
@click.option("--key-burst-limit", type=int, default=200, show_default=True, help="Requests per burst window per key.")
@click.option("--key-burst-window", type=float, default=10.0, show_default=True, help="Burst window, seconds.")
@click.option("--strict-models", is_flag=True, help="Answer 404 model_not_found for a model not in the catalog.")
@click.option("--account-deactivated", is_flag=True, help="Answer 403 account_deactivated to every /v1 request.")
@click.option(
    "--models-unavailable",
    type=int,
    default=0,
    show_default=True,
    help="The first N GET /v1/models answer 503 (-1: all of them).",
)
@click.option("--models-empty", is_flag=True, help="GET /v1/models lists no models.")
@click.option("--no-account-endpoints", is_flag=True, help="Answer 404 to /api/v1/whoami and /api/v1/public/pricing.")
@click.option("--price-step-every", type=int, default=None, help="Multiply prices every N billed requests.")
@click.option("--price-step-factor", type=float, default=2.0, show_default=True)
@click.option("--ignore-max-tokens", is_flag=True, help="Answers are not cut at a request's max_tokens.")
@click.option(
    "--long-answer-rate",
    type=float,
    default=0.0,
    help="Share of prompts answered up to max_tokens (or --default-max-tokens when absent).",
)
@click.option("--growth-every", type=int, default=None, help="Answers grow by --growth-factor every N requests.")
@click.option("--growth-factor", type=float, default=2.0, show_default=True)
@click.option(
    "--default-max-tokens", type=int, default=4096, show_default=True, help="Cap when a request has no max_tokens."
)
@click.option("--billing-log", type=click.Path(dir_okay=False), default=None, help="Append what was billed as JSONL.")
@click.option(
    "--keep-records",
    type=click.IntRange(min=0),
    default=100_000,
    show_default=True,
    help="Billing records held in memory (totals stay exact; --billing-log keeps every one).",
)
@_guard
def simulate(**opts: Any) -> None:
    """Serve a GonkaGate-compatible API with fault injection on loopback (for tests and demos)."""
    from .simulator import SimulatorConfig, serve

    host, port = opts.pop("host"), opts.pop("port")
    try:
        cfg = SimulatorConfig(
            seed=opts["seed"],
            token_delay_s=opts["token_delay"],
            fault_rate=opts["fault_rate"],
            reset_rate=opts["reset_rate"],
            stall_rate=opts["stall_rate"],
            stall_s=opts["stall_s"],
            rate_limit_rate=opts["rate_limit_rate"],
            retry_after_s=opts["retry_after"],
            server_error_rate=opts["server_error_rate"],
            server_error_statuses=_statuses(opts["server_error_statuses"]),
            midstream_error_rate=opts["midstream_error_rate"],
            min_completion_tokens=opts["min_completion_tokens"],
            max_completion_tokens=opts["max_completion_tokens"],
            keepalive_rate=opts["keepalive_rate"],
            rate_limit_code=opts["rate_limit_code"],
            separate_usage_rate=opts["separate_usage_rate"],
            balance_usd=opts["balance"],
            quota_status=int(opts["quota_status"]),
            key_limits=opts["key_limits"],
            key_concurrency_limit=opts["key_concurrency_limit"],
            key_rpm_limit=opts["key_rpm_limit"],
            key_burst_limit=opts["key_burst_limit"],
            key_burst_window_s=opts["key_burst_window"],
            strict_models=opts["strict_models"],
            account_deactivated=opts["account_deactivated"],
            models_unavailable=opts["models_unavailable"],
            models_empty=opts["models_empty"],
            account_endpoints=not opts["no_account_endpoints"],
            price_step_every=opts["price_step_every"],
            price_step_factor=opts["price_step_factor"],
            ignore_max_tokens=opts["ignore_max_tokens"],
            long_answer_rate=opts["long_answer_rate"],
            growth_every=opts["growth_every"],
            growth_factor=opts["growth_factor"],
            default_max_tokens=opts["default_max_tokens"],
            billing_log=opts["billing_log"],
            keep_records=opts["keep_records"],
        )
    except ValueError as exc:
        raise InputError(f"simulator: {exc}") from None

    _raise_open_files(65536)

    def ready(url: str) -> None:
        click.echo(f"listening on {url}")
        sys.stdout.flush()

    serve(cfg, host, port, ready)
