"""Run settings and where the API key comes from. No click: the CLI fills these in."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError

__all__ = ["DEFAULT_BASE_URL", "KEY_ENV", "RunConfig", "input_options", "load_api_key", "public_settings"]

DEFAULT_BASE_URL = "https://api.gonkagate.com/v1"
KEY_ENV = "GONKAGATE_API_KEY"
BASE_URL_ENV = "GONKAGATE_BASE_URL"


@dataclass(frozen=True, slots=True)
class RunConfig:
    """Everything a run needs besides its inputs: built once, frozen (``dataclasses.replace`` to vary it).

    Each field is named as the job file's key (``max_cost_usd``, ``idle_timeout_s``, ...); the CLI's
    flags spell the same names with dashes (the unit suffix optional: ``--max-cost``).
    """

    out_dir: Path
    api_key: str = field(repr=False)
    base_url: str = field(default_factory=lambda: os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL)
    default_model: str | None = None
    concurrency: int = 16
    max_attempts: int = 5
    connect_timeout_s: float = 10.0
    idle_timeout_s: float = 60.0  # longest silence between two chunks before a stream counts as stalled
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    max_cost_usd: float | None = None
    rpm: float | None = None
    max_total_cost_usd: float | None = None  # over every run of out_dir, resumed or not (state in out_dir)
    daily_cap_usd: float | None = None  # per UTC day, in out_dir or in budget_file shared by several jobs
    monthly_cap_usd: float | None = None
    budget_file: Path | None = None  # a locked file several jobs or cron entries share their calendar caps in
    cache_dir: Path | None = None  # content-addressed answers shared across runs and directories (opt-in)
    cache_nondeterministic: bool = False  # also cache answers at temperature > 0 (or none given)
    # What one GonkaGate key allows (the docs' rate-limit table); None lifts a limit.
    key_concurrency: int | None = 50
    key_rpm: float | None = 600.0
    key_burst_10s: float | None = 200.0
    grace_s: float = 30.0
    jobs: list[str] | None = None  # job name per input (default: each file's stem)
    chat_defaults: dict[str, Any] = field(default_factory=dict)  # merged under every line's own parameters
    system_prompt: str | None = None  # prepended to messages that have no system message
    template: str | Path | None = None  # Jinja2 text (str) or file (Path): INPUTS are tables rendered per row
    system_template: str | Path | None = None
    id_column: str | None = None  # the table column holding each row's id (else one from its content)
    strict: bool = False  # unknown chat parameters are errors, not warnings
    samples: int = 1  # independent answers per prompt, each its own row keyed by (id, sample)
    shard: tuple[int, int] | None = None  # (k, n): run only the ids whose hash falls in shard k of n (1-based k)
    default_max_tokens: int = 4096  # what the API assumes when a request names none (GonkaGate's default)
    json_schema: dict[str, Any] | None = None  # every answer must be JSON matching this schema
    json_mode: str = "json_schema"  # response_format sent: json_schema, or json_object where unsupported
    reask: int = 0  # re-asks (each a paid request) after an answer that does not match the schema
    on_length: str = "keep"  # an answer cut at max_tokens: keep | fail | reask
    attempt_deadline_s: float | None = None  # longest one attempt may take; default from max_tokens
    min_tokens_per_s: float = 8.0  # the slowest sane pace: the default deadline is 60 s + max_tokens at it
    check_models: bool = True  # GET /models before the first paid request; unknown models stop the run


def load_api_key(key_file: str | Path | None = None, *, warn: list[str] | None = None) -> str:
    """The key from ``--api-key-file`` or ``$GONKAGATE_API_KEY``; never from argv.

    A key file may end in whitespace or start with a BOM (editors add both); a file with more
    than one non-empty line is refused (it is not a key file).  ``warn`` collects a warning when
    the file is readable by other users.  Raises InputError, never echoing the key.
    """
    if key_file is not None:
        path = Path(key_file)
        try:
            text = path.read_bytes().decode("utf-8-sig", "replace")
            mode = path.stat().st_mode
        except OSError as exc:
            raise InputError(f"{key_file}: cannot read API key file ({exc.strerror or exc})") from None
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise InputError(f"{key_file}: API key file is empty")
        if len(lines) > 1:
            raise InputError(f"{key_file}: API key file has {len(lines)} non-empty lines; it must hold only the key")
        if warn is not None and mode & 0o044:
            warn.append(f"{key_file} is readable by other users; chmod 600 it")
        return lines[0]
    key = os.environ.get(KEY_ENV, "").strip().lstrip("\ufeff")
    if not key:
        raise InputError(
            f"no API key: set {KEY_ENV} or pass --api-key-file PATH (or use --simulate to try without one)"
        )
    return key


def public_settings(config: RunConfig) -> dict[str, Any]:
    """The effective settings of a run, for its run file and start log line: everything but the key."""
    out: dict[str, Any] = {}
    for name in config.__dataclass_fields__:
        if name == "api_key":
            continue
        value = getattr(config, name)
        if name in ("template", "system_template") and value is not None:
            # A template is its text or its file: say which (export re-reads the inputs with it).
            out[name] = {"path": str(Path(value).resolve())} if isinstance(value, Path) else {"text": value}
        else:
            out[name] = str(value) if isinstance(value, Path) else value
    return out


def input_options(config: RunConfig) -> dict[str, Any]:
    """The keyword arguments of ``jobs.validate`` / ``jobs.iter_records`` a run's config implies."""
    return {
        "default_model": config.default_model,
        "jobs": config.jobs,
        "template": config.template,
        "system_template": config.system_template,
        "id_column": config.id_column,
        "strict": config.strict,
    }
