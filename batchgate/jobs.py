"""Read and validate JSONL prompt files lazily; every problem names ``path:line``.

Three line shapes are accepted, one JSON object per line:

* ``{"id": "q1", "prompt": "text", "system": "...", "max_tokens": 64}``: the prompt becomes one
  user message (after an optional system message); other keys pass through as chat parameters.
* ``{"id": "q1", "messages": [...], "model": "...", ...}``: chat parameters pass through.
* ``{"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}``: an
  OpenAI Batch API line; the body is the request.

A line without an id gets ``"h-"`` plus 16 hex digits of the SHA-256 of its canonical JSON, so a
rerun of the same file finds the same ids.  ``stream`` and ``stream_options`` are dropped: the
client sets them.  Validation streams: memory grows by 8 bytes per line (a 64-bit hash of each
id), never by the lines themselves.
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from batchgate.errors import InputError
from batchgate.models import PromptRecord

__all__ = [
    "InputProblem",
    "ValidationReport",
    "iter_records",
    "parse_line",
    "validate",
]

NO_MODEL = 'no model: set "model" on the line or pass --model'

_BOM = b"\xef\xbb\xbf"
_BATCH_KEYS = ("custom_id", "method", "url", "body")
_MISSING: Any = object()
_JSON_TYPES = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}

# id, resolved model, request body, prompt_chars, whether the id was derived from the content
_Parsed = tuple[str, str, dict[str, Any], int, bool]
_Input = tuple[str, str]  # path as given, job name


@dataclass(frozen=True, slots=True)
class InputProblem:
    """One thing wrong with one input line, printed as ``path:line: message``."""

    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


@dataclass
class ValidationReport:
    """The outcome of the validation pass: kept problems, their total, and what is valid."""

    problems: list[InputProblem] = field(default_factory=list)  # the first `keep`, in input order
    problem_count: int = 0
    records: int = 0  # valid lines, a duplicate id counting once
    prompt_chars: int = 0  # over those records, for cost estimates

    def ok(self) -> bool:
        """True when the run may start: no problem at all."""
        return self.problem_count == 0

    def format(self) -> str:
        """The problems to print, one per line, ending with ``... and N more problems``."""
        lines = [str(p) for p in self.problems]
        more = self.problem_count - len(self.problems)
        if more > 0:
            lines.append(f"... and {more} more problem{'' if more == 1 else 's'}")
        return "\n".join(lines)


class _LineProblem(Exception):
    """What is wrong with a line; the caller adds ``path:line``."""


def parse_line(raw: bytes, *, path: str, line: int, job: str, default_model: str | None) -> PromptRecord | None:
    """Turn one raw line into a ready-to-send record.

    Returns None for a blank line.  Raises ``InputError("path:line: ...")`` for a bad one.
    """
    try:
        parsed = _parse(raw, line == 1, default_model)
    except _LineProblem as exc:
        raise InputError(str(InputProblem(path, line, str(exc)))) from None
    if parsed is None:
        return None
    rid, model, body, chars, _derived = parsed
    return PromptRecord(id=rid, job=job, path=path, line=line, model=model, body=body, prompt_chars=chars)


def iter_records(
    paths: Sequence[str | Path], *, default_model: str | None, jobs: Sequence[str] | None = None
) -> Iterator[PromptRecord]:
    """Yield records lazily in file order, for a run whose input already passed ``validate``.

    ``jobs`` names each path's job (default: the file's stem).  Raises ``InputError`` now for a
    missing or unreadable path, and during iteration on the first bad line.
    """
    return _iter_records(_inputs(paths, jobs), default_model)


def _iter_records(inputs: list[_Input], default_model: str | None) -> Iterator[PromptRecord]:
    for path, job in inputs:
        for lineno, raw in _read_lines(path):
            record = parse_line(raw, path=path, line=lineno, job=job, default_model=default_model)
            if record is not None:
                yield record


def validate(
    paths: Sequence[str | Path],
    *,
    default_model: str | None,
    jobs: Sequence[str] | None = None,
    keep: int = 20,
) -> ValidationReport:
    """Check every line of every input before any request is made, in constant memory per line.

    Duplicate ids across all inputs are problems too.  Returns the report (the first ``keep``
    problems in input order); raises ``InputError`` only for paths that cannot be read.
    """
    inputs = _inputs(paths, jobs)
    problems: list[InputProblem] = []
    problem_count = records = prompt_chars = 0
    hashes = array("Q")  # 8 bytes per valid line: the only thing that grows with the input
    add_hash = hashes.frombytes
    for path, _job in inputs:
        for lineno, raw in _read_lines(path):
            try:
                parsed = _parse(raw, lineno == 1, default_model)
            except _LineProblem as exc:
                problem_count += 1
                if len(problems) < keep:
                    problems.append(InputProblem(path, lineno, str(exc)))
                continue
            if parsed is not None:
                records += 1
                prompt_chars += parsed[3]
                add_hash(_id_digest(parsed[0]))

    duplicated = _duplicated_digests(hashes)
    del hashes
    if duplicated:
        dup_problems, dup_count, dup_chars = _name_duplicates(inputs, duplicated, default_model, keep)
        problem_count += dup_count
        records -= dup_count  # the first occurrence stays a record, each repeat is a problem
        prompt_chars -= dup_chars
        order = {path: i for i, (path, _job) in enumerate(inputs)}
        problems = sorted(problems + dup_problems, key=lambda p: (order[p.path], p.line))[:keep]
    return ValidationReport(problems, problem_count, records, prompt_chars)


def _id_digest(rid: str) -> bytes:
    """64 bits of an id, enough to find candidate duplicates among billions of lines."""
    return hashlib.blake2b(rid.encode("utf-8", "surrogatepass"), digest_size=8).digest()


def _duplicated_digests(hashes: array[int]) -> set[bytes]:
    """The digests that occur more than once (sort, then compare neighbours)."""
    if len(hashes) < 2:
        return set()
    values = np.frombuffer(hashes, dtype=np.uint64)
    values.sort()  # in place: no second copy of the hashes
    repeated = np.unique(values[1:][values[1:] == values[:-1]]).tobytes()
    return {repeated[i : i + 8] for i in range(0, len(repeated), 8)}


def _name_duplicates(
    inputs: list[_Input], duplicated: set[bytes], default_model: str | None, keep: int
) -> tuple[list[InputProblem], int, int]:
    """Second pass over the inputs: compare real ids whose hashes collided, name both places.

    Returns the first ``keep`` problems, their count, and the prompt chars of the repeated lines.
    """
    first_seen: dict[str, tuple[str, int, bool]] = {}
    problems: list[InputProblem] = []
    count = chars = 0
    for path, _job in inputs:
        for lineno, raw in _read_lines(path):
            try:
                parsed = _parse(raw, lineno == 1, default_model)
            except _LineProblem:
                continue
            if parsed is None or _id_digest(parsed[0]) not in duplicated:
                continue
            rid, derived = parsed[0], parsed[4]
            seen = first_seen.get(rid)
            if seen is None:
                first_seen[rid] = (path, lineno, derived)
                continue
            count += 1
            chars += parsed[3]
            if len(problems) < keep:
                message = f'duplicate id "{rid}" (first seen at {seen[0]}:{seen[1]})'
                if derived and seen[2]:
                    message += ': the same line without an "id" appears twice; give each line an "id"'
                problems.append(InputProblem(path, lineno, message))
    return problems, count, chars


def _inputs(paths: Sequence[str | Path], jobs: Sequence[str] | None) -> list[_Input]:
    """Pair each path with its job, failing early on paths that cannot be read."""
    if isinstance(paths, str | Path):
        raise TypeError("paths must be a sequence of paths, not one path")
    if jobs is not None and len(jobs) != len(paths):
        raise ValueError(f"{len(jobs)} job names for {len(paths)} paths")
    inputs: list[_Input] = []
    errors: list[str] = []
    seen: dict[tuple[int, int], str] = {}
    for i, p in enumerate(paths):
        path = os.fspath(p)
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
        except OSError as exc:
            errors.append(_os_message(path, exc))
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen:
            # Every line would be a duplicate of itself: say so once instead.
            errors.append(f"{path}: same file as {seen[key]}, given twice")
            continue
        seen[key] = path
        inputs.append((path, jobs[i] if jobs is not None else Path(path).stem))
    if errors:
        raise InputError("; ".join(errors))
    return inputs


def _os_message(path: str, exc: OSError) -> str:
    if isinstance(exc, IsADirectoryError):
        return f"{path}: is a directory, not a prompt file"
    if isinstance(exc, FileNotFoundError):
        return f"{path}: no such file"
    return f"{path}: cannot read: {exc.strerror or exc}"


def _read_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """Numbered raw lines (from 1); read errors become ``InputError`` naming the path."""
    try:
        with open(path, "rb") as f:
            yield from enumerate(f, 1)
    except OSError as exc:
        raise InputError(_os_message(path, exc)) from None


def _parse(raw: bytes, first: bool, default_model: str | None) -> _Parsed | None:
    """Validate one line; None when blank.  The hot path of validation: no regexes, no copies."""
    if first and raw.startswith(_BOM):  # editors on Windows write one
        raw = raw[3:]
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if not raw.strip():  # checked only on failure: blank lines are rare
            return None
        raise _LineProblem(_json_message(raw, exc)) from None
    if type(obj) is not dict:
        raise _LineProblem(f"expected a JSON object, got {_JSON_TYPES.get(type(obj), 'a value')}")
    if "custom_id" in obj or "body" in obj:
        return _parse_batch(obj, default_model)
    return _parse_chat(obj, default_model)


def _json_message(raw: bytes, exc: orjson.JSONDecodeError) -> str:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return f"not valid UTF-8 (byte {err.start + 1} of the line)"
    return f"invalid JSON: {exc.msg} at column {exc.colno}"


def _parse_chat(obj: dict[str, Any], default_model: str | None) -> _Parsed:
    """Shapes 1 and 2: the line itself is the body, less the keys that only batchgate reads."""
    derived = "id" not in obj
    rid = _derive_id(obj) if derived else _check_id(obj.pop("id"), "id")
    obj.pop("job", None)
    obj.pop("meta", None)  # the user's own bookkeeping (category, source, ...): never sent
    prompt = obj.pop("prompt", _MISSING)
    system = obj.pop("system", _MISSING)
    if prompt is not _MISSING:
        if "messages" in obj:
            raise _LineProblem('give either "prompt" or "messages", not both')
        if type(prompt) is not str or not prompt:
            raise _LineProblem(f'"prompt" must be a non-empty string, got {_show(prompt)}')
        messages = [{"role": "user", "content": prompt}]
        chars = len(prompt)
        if system is not _MISSING:
            if type(system) is not str or not system:
                raise _LineProblem(f'"system" must be a non-empty string, got {_show(system)}')
            messages.insert(0, {"role": "system", "content": system})
            chars += len(system)
        obj["messages"] = messages
    elif "messages" not in obj:
        raise _LineProblem('needs "prompt" or "messages"')
    elif system is not _MISSING:
        raise _LineProblem('"system" goes with "prompt"; with "messages", add a {"role": "system"} message')
    else:
        chars = _check_messages(obj["messages"], "messages")
    return rid, _finish_body(obj, default_model, ""), obj, chars, derived


def _parse_batch(obj: dict[str, Any], default_model: str | None) -> _Parsed:
    """Shape 3, an OpenAI Batch API line: only its four keys, and a chat-completions body."""
    for key in obj:
        if key not in _BATCH_KEYS:
            raise _LineProblem(f'unexpected key "{key}" on a Batch API line (custom_id, method, url, body)')
    derived = "custom_id" not in obj
    rid = _derive_id(obj) if derived else _check_id(obj["custom_id"], "custom_id")
    method = obj.get("method", "POST")
    if method != "POST":
        raise _LineProblem(f'"method" must be "POST", got {_show(method)}')
    url = obj.get("url", _MISSING)
    if url is not _MISSING and (type(url) is not str or not url.endswith("/chat/completions")):
        raise _LineProblem(f'"url" must end with /chat/completions, got {_show(url)}')
    body = obj.get("body", _MISSING)
    if type(body) is not dict:
        raise _LineProblem('needs "body", an object' if body is _MISSING else '"body" must be an object')
    if "messages" not in body:
        raise _LineProblem('"body" needs "messages"')
    chars = _check_messages(body["messages"], "body.messages")
    return rid, _finish_body(body, default_model, "body."), body, chars, derived


def _check_id(value: Any, key: str) -> str:
    if type(value) is str:
        if value.strip():
            return value
    elif type(value) is int:  # not bool: type() is exact
        return str(value)
    raise _LineProblem(f'"{key}" must be a non-empty string or an integer, got {_show(value)}')


def _derive_id(obj: dict[str, Any]) -> str:
    """A stable id from the line's content, independent of key order and whitespace."""
    try:
        canonical = orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:  # nested deeper than orjson writes (it reads deeper)
        raise _LineProblem('nested too deeply to derive an id; give the line an "id"') from None
    return "h-" + hashlib.sha256(canonical).hexdigest()[:16]


def _check_messages(messages: Any, where: str) -> int:
    """Check the chat messages; returns their total text length (``prompt_chars``)."""
    if type(messages) is not list or not messages:
        raise _LineProblem(f'"{where}" must be a non-empty array of messages, got {_show(messages)}')
    chars = 0
    for i, message in enumerate(messages):
        if type(message) is not dict:
            raise _LineProblem(f"{where}[{i}] must be an object, got {_show(message)}")
        role = message.get("role")
        if type(role) is not str or not role:
            raise _LineProblem(f'{where}[{i}]: "role" must be a non-empty string, got {_show(role)}')
        content = message.get("content", _MISSING)
        if type(content) is str:
            chars += len(content)
        elif type(content) is list:
            for j, part in enumerate(content):
                if type(part) is not dict:
                    raise _LineProblem(f"{where}[{i}].content[{j}] must be an object, got {_show(part)}")
                text = part.get("text")
                if type(text) is str:
                    chars += len(text)
        elif not (content is None and "tool_calls" in message):  # an assistant turn calling tools
            raise _LineProblem(f'{where}[{i}]: "content" must be a string or an array of parts, got {_show(content)}')
    return chars


def _finish_body(body: dict[str, Any], default_model: str | None, where: str) -> str:
    """Drop what the client sets, resolve the model into the body; returns the model."""
    body.pop("stream", None)
    body.pop("stream_options", None)
    model = body.get("model", _MISSING)
    if model is _MISSING:
        if not default_model:
            raise _LineProblem(NO_MODEL)
        model = body["model"] = default_model
    elif type(model) is not str or not model:
        raise _LineProblem(f'"{where}model" must be a non-empty string, got {_show(model)}')
    for key in ("max_tokens", "max_completion_tokens"):
        # Budgets read this as the worst case, so it must be a usable number when present.
        limit = body.get(key, 1)
        if type(limit) is not int or limit < 1:
            raise _LineProblem(f'"{where}{key}" must be a positive integer, got {_show(limit)}')
    return model


def _show(value: Any) -> str:
    """A value as JSON, cut short: enough to recognise it in a message."""
    if value is _MISSING:
        return "nothing"
    try:
        text = orjson.dumps(value).decode()
    except orjson.JSONEncodeError:  # nested deeper than orjson writes
        return "a deeply nested value"
    return text if len(text) <= 40 else text[:37] + "..."
