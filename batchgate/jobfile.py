"""TOML job files: a named, repeatable run (prompt files, model, chat defaults, limits, output).

Prompt paths are relative to the job file, so a job and its prompts move together; ``out`` is
relative to the directory batchgate runs in, like ``--out``.  Unknown keys are errors: a typo in
``max_cost_usd`` must not silently run without a budget.  Unknown ``[chat]`` parameters are
warnings (``JobSpec.warnings``, with the nearest known name): GonkaGate may accept more than it
documents.

Prompts from tables: ``template`` (the Jinja2 text) or ``template_file`` (a path relative to the
job file), the same pair for the system message (``system_template`` / ``system_template_file``),
and ``id_column``.  In ``settings`` a template is a ``str`` (its text) or a ``Path`` (its file),
the form ``batchgate.jobs.validate`` takes.
"""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import JobFileError
from .jobs import CHAT_PARAMETERS, unknown_parameter

__all__ = ["JobSpec", "load_job"]

# key -> (accepted types, RunConfig/CLI name)
_SCALARS: dict[str, tuple[tuple[type, ...], str]] = {
    "model": ((str,), "default_model"),
    "base_url": ((str,), "base_url"),
    "concurrency": ((int,), "concurrency"),
    "rpm": ((int, float), "rpm"),
    "max_attempts": ((int,), "max_attempts"),
    "max_cost_usd": ((int, float), "max_cost"),
    "connect_timeout_s": ((int, float), "connect_timeout"),
    "idle_timeout_s": ((int, float), "idle_timeout"),
    "grace_s": ((int, float), "grace"),
    "system": ((str,), "system_prompt"),
    "template": ((str,), "template"),
    "system_template": ((str,), "system_template"),
    "id_column": ((str,), "id_column"),
}
_TEMPLATE_FILES = {"template_file": "template", "system_template_file": "system_template"}
_KNOWN = {"name", "inputs", "out", "chat", *_SCALARS, *_TEMPLATE_FILES}


@dataclass
class JobSpec:
    """A parsed job file. ``settings`` maps CLI option names to values the file sets."""

    path: Path
    name: str
    inputs: list[Path]
    out: Path | None = None
    chat: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # "path: chat.key: ..." for unknown chat parameters


def load_job(path: str | Path) -> JobSpec:
    """Read and check a job file; raises JobFileError naming the file and the key."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise JobFileError(f"{path}: cannot read job file ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise JobFileError(f"{path}: not valid TOML: {exc}") from None

    def bad(key: str, what: str) -> JobFileError:
        return JobFileError(f"{path}: {key}: {what}")

    unknown = sorted(set(data) - _KNOWN)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(_KNOWN), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise bad(unknown[0], f"unknown key: {hint}(known: {', '.join(sorted(_KNOWN))})")
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not name:
        raise bad("name", "must be a non-empty string")
    inputs = data.get("inputs")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs or not all(isinstance(p, str) and p for p in inputs):
        raise bad("inputs", "must be a list of prompt file paths (relative to the job file)")
    out = data.get("out")
    if out is not None and (not isinstance(out, str) or not out):
        raise bad("out", "must be a directory path")
    chat = data.get("chat", {})
    if not isinstance(chat, dict):
        raise bad("chat", "must be a table of chat parameters, e.g. [chat] temperature = 0.7")
    if "stream" in chat or "messages" in chat or "model" in chat:
        raise bad("chat", "sets chat parameters such as temperature or max_tokens; not stream, messages or model")
    if "max_tokens" in chat and (not isinstance(chat["max_tokens"], int) or chat["max_tokens"] < 1):
        raise bad("chat.max_tokens", "must be a positive integer")
    warnings = [f"{path}: chat.{key}: {unknown_parameter(key)}" for key in chat if key not in CHAT_PARAMETERS]
    settings: dict[str, Any] = {}
    for key, (types, option) in _SCALARS.items():
        if key not in data:
            continue
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise bad(key, f"must be {' or '.join(t.__name__ for t in types)}, not {type(value).__name__}")
        if isinstance(value, int | float) and value <= 0:
            raise bad(key, "must be positive")
        if isinstance(value, str) and not value.strip() and key in ("template", "system_template", "id_column"):
            raise bad(key, "must not be empty")
        settings[option] = value
    for key, option in _TEMPLATE_FILES.items():
        if key not in data:
            continue
        if option in settings:
            raise bad(key, f"give either {option} (the text) or {key} (its file), not both")
        value = data[key]
        if not isinstance(value, str) or not value:
            raise bad(key, "must be a template file path (relative to the job file)")
        settings[option] = path.parent / value
    if "template" not in settings:
        for key in ("system_template", "id_column"):
            if key in settings:
                raise bad(key, "goes with template or template_file (prompts from tables)")
    return JobSpec(
        path=path,
        name=name,
        inputs=[path.parent / p for p in inputs],
        out=Path(out) if out else None,
        chat=dict(chat),
        settings=settings,
        warnings=warnings,
    )
