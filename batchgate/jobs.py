"""Read and validate prompt inputs lazily; every problem names ``path:line`` (or ``path:row``).

Three line shapes are accepted in a JSONL prompt file, one JSON object per line:

* ``{"id": "q1", "prompt": "text", "system": "...", "max_tokens": 64}``: the prompt becomes one
  user message (after an optional system message); other keys pass through as chat parameters.
* ``{"id": "q1", "messages": [...], "model": "...", ...}``: chat parameters pass through.
* ``{"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}``: an
  OpenAI Batch API line; the body is the request.

With a ``template``, every input is a table instead (CSV, TSV, Parquet, or JSONL rows of any
columns): ``batchgate.tables`` renders each row into the user message.

A line without an id gets ``"h-"`` plus 16 hex digits of the SHA-256 of its canonical JSON, so a
rerun of the same file finds the same ids.  ``stream`` and ``stream_options`` are dropped: the
client sets them.  Validation streams: memory grows by 8 bytes per line (a 64-bit hash of each
id), never by the lines themselves.

Inputs a shell user has: ``-`` (standard input) and pipes are copied once to a private temporary
file (removed at exit), since validation and the run each read the input; gzip, zstd and bzip2
files are recognised by their first bytes and read streaming; any other binary file is refused
with one message instead of an error per line.
"""

from __future__ import annotations

import atexit
import bz2
import codecs
import difflib
import gzip
import hashlib
import io
import itertools
import os
import shutil
import stat
import tempfile
import zlib
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import IO, Any

import orjson

from batchgate.errors import InputError
from batchgate.models import PromptRecord

__all__ = [
    "CHAT_PARAMETERS",
    "ROLES",
    "InputProblem",
    "ValidationReport",
    "iter_records",
    "parse_line",
    "unknown_parameter",
    "validate",
]

NO_MODEL = 'no model: set "model" on the line or pass --model'

#: The chat parameters GonkaGate documents (../shared/docs/gonkagate-api.md, "Request"), plus
#: ``max_completion_tokens`` and ``n``, OpenAI names batchgate itself reads (budgets, choices).
CHAT_PARAMETERS = frozenset(
    {
        "model",
        "messages",
        "stream",
        "temperature",
        "top_p",
        "max_tokens",
        "stop",
        "frequency_penalty",
        "presence_penalty",
        "response_format",
        "tools",
        "tool_choice",
        "seed",
        "logprobs",
        "top_logprobs",
        "max_completion_tokens",
        "n",
    }
)
#: Message roles the chat format knows; anything else is refused before it costs a 400 per line.
ROLES = ("system", "user", "assistant", "tool", "developer")

_LINE_KEYS = ("id", "prompt", "system", "job", "meta")  # read by batchgate, never sent
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
# Files written by json.dump rather than as JSON Lines: say how to convert them.
_PRETTY_HINTS = {
    b"[": "a JSON array? batchgate reads JSON Lines, one object per line: jq -c '.[]' FILE > FILE.jsonl",
    b"{": "an object spread over several lines? write each on one line: jq -c . FILE > FILE.jsonl",
}
_SNIFF_BYTES = 8192
_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bz2", b"\x28\xb5\x2f\xfd": "zstd"}
_COMPRESSED_SUFFIXES = (".gz", ".gzip", ".bz2", ".zst", ".zstd")
_PARQUET_MAGIC = b"PAR1"
_TABLE_KINDS = {"csv": "a CSV table", "tsv": "a TSV table", "parquet": "a Parquet table"}

# id, resolved model, request body, prompt_chars, id derived from the content, unknown parameters, meta
_Parsed = tuple[str, str, dict[str, Any], int, bool, tuple[str, ...], dict[str, Any] | None]


@dataclass(frozen=True, slots=True)
class InputProblem:
    """One thing wrong with one input line (or row), printed as ``path:line: message``.

    ``line`` 0 is the whole input: printed as ``path: message``.
    """

    path: str
    line: int
    message: str

    def __str__(self) -> str:
        if self.line == 0:
            return f"{self.path}: {self.message}"
        return f"{self.path}:{self.line}: {self.message}"


@dataclass
class ValidationReport:
    """The outcome of the validation pass: kept problems, their total, what is valid, and warnings."""

    problems: list[InputProblem] = field(default_factory=list)  # the first `keep`, in input order
    problem_count: int = 0
    records: int = 0  # valid lines, a duplicate id counting once
    prompt_chars: int = 0  # over those records, for cost estimates
    # Things sent as written that are probably mistakes (an unknown chat parameter): one per kind,
    # at its first place, "(and N more lines)" after it.  ``strict=True`` makes them problems.
    warnings: list[InputProblem] = field(default_factory=list)
    # model -> [path, line, count]: where each model is first named, and on how many records
    models: dict[str, list[Any]] = field(default_factory=dict)
    # The 64-bit digest of every valid record's id, sorted (a later run's ``known_ids``, when
    # lines are appended: see ``batchgate.resume``).
    ids: array[int] = field(default_factory=lambda: array("Q"))

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

    def format_warnings(self) -> str:
        """The warnings to print, one per line (empty when there are none)."""
        return "\n".join(f"{w.path}{'' if w.line == 0 else f':{w.line}'}: warning: {w.message}" for w in self.warnings)


class _LineProblem(Exception):
    """What is wrong with a line; the caller adds ``path:line``."""


@dataclass(frozen=True, slots=True)
class _Source:
    """One input, resolved: where to read it from, how it is compressed, what it holds."""

    path: str  # as given: what messages name ("-" for standard input)
    job: str
    read_path: str  # the file to open: the path itself, or the spool of a pipe
    compression: str | None  # "gzip" | "bz2" | "zstd" | None
    kind: str  # "prompts" (JSONL prompt lines) | "jsonl" (a JSONL table) | "csv" | "tsv" | "parquet"


@dataclass(frozen=True, slots=True)
class _Context:
    default_model: str | None
    strict: bool = False
    templates: Any = None  # batchgate.tables.Templates when the inputs are tables
    tables: Any = None  # the batchgate.tables module then (imported only for tables)
    id_column: str | None = None


Template = str | PathLike[str]


def parse_line(raw: bytes, *, path: str, line: int, job: str, default_model: str | None) -> PromptRecord | None:
    """Turn one raw JSONL prompt line into a ready-to-send record.

    Returns None for a blank line.  Raises ``InputError("path:line: ...")`` for a bad one.
    """
    try:
        parsed = _parse(raw, line == 1, _Context(default_model))
    except _LineProblem as exc:
        raise InputError(str(InputProblem(path, line, str(exc)))) from None
    if parsed is None:
        return None
    return _record(parsed, path, line, job)


def _record(parsed: _Parsed, path: str, line: int, job: str) -> PromptRecord:
    rid, model, body, chars, _derived, _unknown, meta = parsed
    return PromptRecord(id=rid, job=job, path=path, line=line, model=model, body=body, prompt_chars=chars, meta=meta)


def iter_records(
    paths: Sequence[str | Path],
    *,
    default_model: str | None,
    jobs: Sequence[str] | None = None,
    template: Template | None = None,
    system_template: Template | None = None,
    id_column: str | None = None,
    strict: bool = False,
    start: tuple[int, int] | None = None,
) -> Iterator[PromptRecord]:
    """Yield records lazily in file order, for a run whose input already passed ``validate``.

    Takes the same arguments as ``validate``; ``start`` = (input index, line) skips everything
    before it (a resume that knows all of that is done), without parsing the JSONL lines it skips.
    Raises ``InputError`` now for a missing or unreadable path (or a bad template), and during
    iteration on the first bad line or row.
    """
    ctx = _context(default_model, template, system_template, id_column, strict)
    return _iter_records(_inputs(paths, jobs, ctx), ctx, start or (0, 0))


def _iter_records(inputs: list[_Source], ctx: _Context, start: tuple[int, int] = (0, 0)) -> Iterator[PromptRecord]:
    first, line = start
    for i, src in enumerate(inputs):
        if i < first:
            continue
        for n, res in _rows(src, ctx, line if i == first else 0):
            if res is None:
                continue
            if isinstance(res, _LineProblem):
                raise InputError(str(InputProblem(src.path, n, str(res))))
            yield _record(res, src.path, n, src.job)


def validate(
    paths: Sequence[str | Path],
    *,
    default_model: str | None,
    jobs: Sequence[str] | None = None,
    template: Template | None = None,
    system_template: Template | None = None,
    id_column: str | None = None,
    strict: bool = False,
    keep: int = 20,
    start: Sequence[int | None] | None = None,
    known_ids: Callable[[array[int]], bool] | None = None,
) -> ValidationReport:
    """Check every line of every input before any request is made, in constant memory per line.

    ``template`` (a str is the Jinja2 text, a path-like its file) makes every input a table whose
    rows render into the user message, after ``system_template`` when given; ``id_column`` names
    the column holding each row's id.  ``strict`` turns warnings (unknown chat parameters) into
    problems.  Duplicate ids across all inputs are problems too, and so are inputs holding no
    prompt at all.  Returns the report (the first ``keep`` problems in input order); raises
    ``InputError`` only for paths that cannot be read or used (binary, a table without a template)
    and for a template that does not compile.

    ``start`` (per input: the first line to check, None to pass the input over) and ``known_ids``
    (whether any of some id digests is among those of the lines checked before) check only lines
    appended since a run checked the rest: a known id is a problem, without its first place
    (check everything again to name it).  Line numbers count physical lines, so an input that is not
    plain JSONL is checked from its first line.
    """
    ctx = _context(default_model, template, system_template, id_column, strict)
    inputs = _inputs(paths, jobs, ctx)
    problems: list[InputProblem] = []
    problem_count = records = prompt_chars = 0
    unknown: dict[str, list[Any]] = {}  # parameter -> [path, line, count]
    models: dict[str, list[Any]] = {}
    empty: list[str] = []
    hashes = array("Q")  # 8 bytes per valid line: the only thing that grows with the input
    add_hash = hashes.frombytes
    for i, src in enumerate(inputs):
        first = 1 if start is None else start[i]
        if first is None:
            continue  # checked by an earlier run, unchanged
        if src.compression is not None or src.kind not in ("prompts", "jsonl"):
            first = 1
        before = records
        for n, res in _rows(src, ctx, first):
            if res is None:
                continue
            if isinstance(res, _LineProblem):
                problem_count += 1
                if len(problems) < keep:
                    problems.append(InputProblem(src.path, n, str(res)))
                continue
            records += 1
            prompt_chars += res[3]
            add_hash(_id_digest(res[0]))
            used = models.get(res[1])
            if used is None:
                models[res[1]] = [src.path, n, 1]
            else:
                used[2] += 1
            for key in res[5]:
                seen = unknown.get(key)
                if seen is None:
                    unknown[key] = [src.path, n, 1]
                else:
                    seen[2] += 1
        if records == before:
            empty.append(src.path)

    if known_ids is not None and len(hashes) and known_ids(hashes):
        problem_count += 1
        where = next(src.path for i, src in enumerate(inputs) if start is None or start[i] is not None)
        problems.append(InputProblem(where, 0, "an id on the new lines repeats one of the lines checked before"))
    duplicated = _duplicated_digests(hashes)  # sorts them in place
    if duplicated:
        dup_problems, dup_count, dup_chars = _name_duplicates(inputs, ctx, duplicated, keep)
        problem_count += dup_count
        records -= dup_count  # the first occurrence stays a record, each repeat is a problem
        prompt_chars -= dup_chars
        order = {src.path: i for i, src in enumerate(inputs)}
        problems = sorted(problems + dup_problems, key=lambda p: (order[p.path], p.line))[:keep]
    warnings = [
        InputProblem(path, line, unknown_parameter(key) + _more_lines(count))
        for key, (path, line, count) in unknown.items()
    ]
    kinds = {src.path: src.kind for src in inputs}
    if records == 0 and problem_count == 0:
        for path in empty:
            problems.append(InputProblem(path, 0, _no_prompts(kinds[path])))
            problem_count += 1
        problems = problems[:keep]
    else:
        warnings += [InputProblem(path, 0, _no_prompts(kinds[path])) for path in empty if path not in _paths(problems)]
    return ValidationReport(problems, problem_count, records, prompt_chars, warnings, models, hashes)


def _more_lines(count: int) -> str:
    if count <= 1:
        return ""
    return f" (and on {count - 1:,} more line{'s' if count > 2 else ''})"


def _paths(problems: list[InputProblem]) -> set[str]:
    return {p.path for p in problems}


def _no_prompts(kind: str) -> str:
    if kind == "prompts":
        return "no prompts: the input is empty or holds only blank lines"
    return "no prompts: the table has no rows"


def unknown_parameter(key: str) -> str:
    """The message for a chat parameter GonkaGate does not document, with the nearest known name."""
    close = difflib.get_close_matches(key.rpartition(".")[2], sorted(CHAT_PARAMETERS | set(_LINE_KEYS)), n=1)
    if close:
        return f"unknown chat parameter {key}: did you mean {close[0]}?"
    return f"unknown chat parameter {key} (not among GonkaGate's documented parameters; sent as written)"


def _context(
    default_model: str | None,
    template: Template | None,
    system_template: Template | None,
    id_column: str | None,
    strict: bool,
) -> _Context:
    if template is None:
        if system_template is not None:
            raise InputError("a system template goes with a template (--template FILE or --prompt TEXT)")
        if id_column is not None:
            raise InputError(f"--id-column {id_column} goes with a template (--template FILE or --prompt TEXT)")
        return _Context(default_model, strict)
    if not default_model:
        raise InputError("no model: pass --model (rows of a table carry no model)")
    if id_column is not None and not id_column:
        raise InputError("--id-column needs a column name")
    from . import tables  # Jinja2 and pyarrow only when a table is read

    templates = tables.compile_templates(template, system_template)
    return _Context(default_model, strict, templates=templates, tables=tables, id_column=id_column)


def _id_digest(rid: str) -> bytes:
    """64 bits of an id, enough to find candidate duplicates among billions of lines."""
    return hashlib.blake2b(rid.encode("utf-8", "surrogatepass"), digest_size=8).digest()


_SMALL = 10_000  # inputs up to this many lines find their duplicate ids in a Python set (~1 MB)


def _duplicated_digests(hashes: array[int]) -> set[bytes]:
    """The digests that occur more than once; ``hashes`` is left sorted (compare neighbours)."""
    if len(hashes) < 2:
        return set()
    if len(hashes) <= _SMALL:  # sorted in Python: no numpy import (~0.07 s) for an everyday input
        hashes[:] = array("Q", sorted(hashes))
        twice = {a for a, b in itertools.pairwise(hashes) if a == b}
        return {array("Q", [h]).tobytes() for h in twice}
    import numpy as np

    values = np.frombuffer(hashes, dtype=np.uint64)
    values.sort()  # in place: no second copy of the hashes
    repeated = np.unique(values[1:][values[1:] == values[:-1]]).tobytes()
    return {repeated[i : i + 8] for i in range(0, len(repeated), 8)}


def _name_duplicates(
    inputs: list[_Source], ctx: _Context, duplicated: set[bytes], keep: int
) -> tuple[list[InputProblem], int, int]:
    """Second pass over the inputs: compare real ids whose hashes collided, name both places.

    Returns the first ``keep`` problems, their count, and the prompt chars of the repeated lines.
    """
    first_seen: dict[str, tuple[str, int, bool]] = {}
    problems: list[InputProblem] = []
    count = chars = 0
    for src in inputs:
        for n, parsed in _rows(src, ctx):
            if parsed is None or isinstance(parsed, _LineProblem) or _id_digest(parsed[0]) not in duplicated:
                continue
            rid, derived = parsed[0], parsed[4]
            seen = first_seen.get(rid)
            if seen is None:
                first_seen[rid] = (src.path, n, derived)
                continue
            count += 1
            chars += parsed[3]
            if len(problems) < keep:
                message = f'duplicate id "{rid}" (first seen at {seen[0]}:{seen[1]})'
                if derived and seen[2]:
                    if src.kind == "prompts":
                        message += ': the same line without an "id" appears twice; give each line an "id"'
                    else:
                        message += ": the same row appears twice; name an id column (--id-column)"
                problems.append(InputProblem(src.path, n, message))
    return problems, count, chars


# -- inputs: paths, pipes, compression, formats ---------------------------------------------------

_spooled: dict[tuple[int, int], str] = {}  # (st_dev, st_ino) of a pipe -> the file it was copied to
_spool_dir: list[str] = []


def _inputs(paths: Sequence[str | Path], jobs: Sequence[str] | None, ctx: _Context) -> list[_Source]:
    """Resolve each path (spooling pipes, sniffing compression and format), failing early on unusable ones."""
    if isinstance(paths, str | Path):
        raise TypeError("paths must be a sequence of paths, not one path")
    if jobs is not None and len(jobs) != len(paths):
        raise ValueError(f"{len(jobs)} job names for {len(paths)} paths")
    inputs: list[_Source] = []
    errors: list[str] = []
    seen: dict[tuple[int, int], str] = {}
    for i, p in enumerate(paths):
        path = os.fspath(p)
        try:
            key, read_path = _resolve(path)
        except OSError as exc:
            errors.append(_os_message(path, exc))
            continue
        if key in seen:
            # Every line would be a duplicate of itself: say so once instead.
            errors.append(f"{path}: same file as {seen[key]}, given twice")
            continue
        seen[key] = path
        try:
            compression, kind = _sniff(path, read_path, ctx.templates is not None)
        except InputError as exc:
            errors.append(str(exc))
            continue
        except OSError as exc:
            errors.append(_os_message(path, exc))
            continue
        job = jobs[i] if jobs is not None else ("stdin" if path == "-" else _stem(path))
        inputs.append(_Source(path, job, read_path, compression, kind))
    if errors:
        raise InputError("; ".join(errors))
    return inputs


def _uncompressed_name(path: str) -> Path:
    """The file name less a compression suffix: ``p.csv.gz`` is a CSV, job ``p``."""
    name = Path(path).name
    for suffix in _COMPRESSED_SUFFIXES:
        if name.lower().endswith(suffix):
            return Path(name[: -len(suffix)])
    return Path(name)


def _stem(path: str) -> str:
    return _uncompressed_name(path).stem


def _resolve(path: str) -> tuple[tuple[int, int], str]:
    """The input's identity and the file to read: a pipe or ``-`` is copied once to a private file."""
    if path == "-":
        try:
            st = os.fstat(0)
        except OSError:
            raise InputError("-: standard input is closed") from None
        key = (st.st_dev, st.st_ino)
        return key, _spooled.get(key) or _spool(key, os.dup(0))
    st = os.stat(path)  # before open(): opening a named FIFO twice would wait for a second writer
    key = (st.st_dev, st.st_ino)
    if key in _spooled:
        return key, _spooled[key]
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(path)
    with open(path, "rb") as f:  # proves it readable (and blocks for a FIFO's writer, as cat would)
        if stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return key, path
        return key, _spool(key, os.dup(f.fileno()))


def _spool(key: tuple[int, int], fd: int) -> str:
    """Copy a stream to a file in a private temporary directory removed at exit."""
    if not _spool_dir:
        directory = tempfile.mkdtemp(prefix="batchgate-")  # mode 0700: prompts are private
        atexit.register(shutil.rmtree, directory, True)
        _spool_dir.append(directory)
    target = os.path.join(_spool_dir[0], f"input-{len(_spooled)}")
    with os.fdopen(fd, "rb") as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    _spooled[key] = target
    return target


def _sniff(path: str, read_path: str, tables: bool) -> tuple[str | None, str]:
    """Compression (from the first bytes) and kind of an input; raises InputError for unusable ones."""
    with open(read_path, "rb") as f:
        magic = f.read(6)
    compression = next((name for sig, name in _MAGIC.items() if magic.startswith(sig)), None)
    if compression is None and magic.startswith(b"\xfd7zXZ\x00"):
        raise InputError(f"{path}: is xz-compressed: decompress it (xz -d) or use gzip, zstd or bzip2")
    if compression == "zstd" and not _have_zstd():
        raise InputError(
            f"{path}: is zstd-compressed, and the zstandard package is not installed: "
            "pip install 'batchgate[zstd]', or decompress it first (zstd -d)"
        )
    name = _uncompressed_name(path).suffix.lower()
    if magic.startswith(_PARQUET_MAGIC) or name in (".parquet", ".pq"):
        if compression is not None:
            raise InputError(f"{path}: a Parquet file inside {compression}: decompress it first")
        if not tables:
            raise InputError(_needs_template(path, "parquet"))
        return None, "parquet"
    try:
        with _open(read_path, compression) as f:
            head = f.read(_SNIFF_BYTES)
    except _stream_errors():
        if compression is None:
            raise
        head = b""  # corrupt or cut short: reading says so at the line where it breaks
    reason = _binary_reason(head)
    if reason:
        raise InputError(f"{path}: {reason}")
    if name in (".csv", ".tsv"):
        kind = name[1:]
        if not tables:
            raise InputError(_needs_template(path, kind))
        return compression, kind
    if not tables:
        return compression, "prompts"
    if name in (".jsonl", ".ndjson", ".json"):
        return compression, "jsonl"
    first = head.removeprefix(_BOM).lstrip()[:1]  # "-", a pipe, an odd name: JSONL rows or a CSV?
    return compression, "jsonl" if first in (b"{", b"") else "csv"


def _needs_template(path: str, kind: str) -> str:
    return (
        f"{path}: is {_TABLE_KINDS[kind]}: pass --template FILE or --prompt TEXT "
        "to render each row into a prompt (Jinja2, the row's columns as variables)"
    )


def _binary_reason(head: bytes) -> str | None:
    """Why the first bytes are not text (None when they are), so a binary file gets one message."""
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "looks like UTF-16 text: save it as UTF-8"
    if head.startswith(b"PK\x03\x04"):
        return "looks like a binary file (a zip archive, or an .xlsx workbook: save it as CSV)"
    what = "JSONL or CSV text (optionally .gz, .zst or .bz2) or Parquet"
    if b"\x00" in head:
        return f"looks like a binary file (NUL bytes in its first bytes), not {what}"
    decoded = codecs.getincrementaldecoder("utf-8")("replace").decode(head, final=False)
    bad = decoded.count("\ufffd") - head.count(b"\xef\xbf\xbd")
    if bad * 10 > len(head):  # a stray Latin-1 byte is a line's problem; a tenth of them is not text
        return f"looks like a binary file (its first bytes are not UTF-8), not {what}"
    return None


def _have_zstd() -> bool:
    try:
        import zstandard  # noqa: F401
    except ImportError:
        return False
    return True


class _ZstdReader(io.RawIOBase):
    """A zstd stream across frames that raises EOFError when the data is cut short mid-frame."""

    def __init__(self, path: str) -> None:
        import zstandard

        self._file = open(path, "rb")  # noqa: SIM115 (closed in close())
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = self._dctx.decompressobj()
        self._pending = b""
        self._in_frame = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        while not self._pending:
            chunk = self._file.read(1 << 16)
            if not chunk:
                if self._in_frame:
                    raise EOFError("zstd data ended before the end of a frame")
                return 0
            while chunk:
                self._in_frame = True
                self._pending += self._obj.decompress(chunk)
                if not self._obj.eof:
                    break
                chunk = self._obj.unused_data
                self._obj = self._dctx.decompressobj()
                self._in_frame = False
        n = min(len(view), len(self._pending))
        view[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


def _open(read_path: str, compression: str | None) -> IO[bytes]:
    """The input's bytes, decompressed as they are read."""
    if compression is None:
        return open(read_path, "rb")
    if compression == "gzip":
        return gzip.GzipFile(read_path, "rb")  # type: ignore[return-value]  # a BufferedIOBase of bytes
    if compression == "bz2":
        return bz2.BZ2File(read_path, "rb")
    return io.BufferedReader(_ZstdReader(read_path), 1 << 16)


def _stream_errors() -> tuple[type[BaseException], ...]:
    """What a corrupt or cut-short compressed stream raises."""
    errors: list[type[BaseException]] = [OSError, EOFError, zlib.error]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


def _os_message(path: str, exc: OSError) -> str:
    if isinstance(exc, IsADirectoryError):
        return f"{path}: is a directory, not a prompt file"
    if isinstance(exc, FileNotFoundError):
        return f"{path}: no such file"
    return f"{path}: cannot read: {exc.strerror or exc}"


class _Broken(Exception):
    """The input stopped being readable after some lines (corrupt compressed data, a read error)."""


def _read_lines(src: _Source) -> Iterator[tuple[int, bytes]]:
    """Numbered raw lines (from 1); a failure mid-way raises ``_Broken`` with what to say."""
    n = 0
    try:
        with _open(src.read_path, src.compression) as f:
            for n, raw in enumerate(f, 1):
                yield n, raw
    except _stream_errors() as exc:
        if isinstance(exc, OSError) and src.compression is None:
            raise _Broken(f"cannot read further: {exc.strerror or exc}") from None
        raise _Broken(f"the {src.compression} data is corrupt or cut short after line {n} ({exc})") from None


def _rows(src: _Source, ctx: _Context, skip_before: int = 0) -> Iterator[tuple[int, _Parsed | _LineProblem | None]]:
    """Every line or row of one input, parsed or with its problem; 0 is a problem with the whole input.

    Lines numbered below ``skip_before`` are passed over unparsed (rows of tables are read, not yielded).
    """
    if src.kind in ("csv", "tsv", "parquet"):
        for n, res in _table_rows(src, ctx):
            if n >= skip_before or n == 0:
                yield n, res
        return
    n = 0
    try:
        if src.kind == "prompts":
            for n, raw in _read_lines(src):
                if n < skip_before:
                    continue
                try:
                    yield n, _parse(raw, n == 1, ctx)
                except _LineProblem as exc:
                    yield n, exc
        else:
            for n, raw in _read_lines(src):
                if n < skip_before:
                    continue
                try:
                    yield n, _parse_row_line(raw, n == 1, ctx)
                except _LineProblem as exc:
                    yield n, exc
    except _Broken as exc:
        yield n + 1, _LineProblem(str(exc))


def _table_rows(src: _Source, ctx: _Context) -> Iterator[tuple[int, _Parsed | _LineProblem | None]]:
    from . import tables

    if src.kind == "parquet":
        rows = tables.parquet_rows(src.read_path, id_column=ctx.id_column)
    else:
        delimiter = "\t" if src.kind == "tsv" else ","
        rows = tables.csv_rows(
            lambda: _open(src.read_path, src.compression), delimiter=delimiter, id_column=ctx.id_column
        )
    try:
        for n, row in rows:
            if isinstance(row, tables.RowProblem):
                yield n, _LineProblem(f"data row {n}: {row}")
                continue
            try:
                yield n, _table_parsed(row, ctx)
            except tables.RowProblem as exc:
                yield n, _LineProblem(f"data row {n}: {exc}")
    except tables.RowProblem as exc:
        yield 0, _LineProblem(str(exc))


def _parse_row_line(raw: bytes, first: bool, ctx: _Context) -> _Parsed | None:
    """One line of a JSONL table: an object whose keys are the row's columns."""
    obj = _load_object(raw, first)
    if obj is None:
        return None
    try:
        return _table_parsed(obj, ctx)
    except ctx.tables.RowProblem as exc:
        raise _LineProblem(str(exc)) from None


def _table_parsed(row: dict[str, Any], ctx: _Context) -> _Parsed:
    prompt = ctx.tables.row_prompt(row, ctx.templates, ctx.id_column)
    model = ctx.default_model or ""
    body: dict[str, Any] = {"messages": prompt.messages, "model": model}
    return prompt.id, model, body, prompt.chars, prompt.derived, (), prompt.meta


def _load_object(raw: bytes, first: bool) -> dict[str, Any] | None:
    """One JSON object from a line; None when blank.  The hot path of validation: no regexes, no copies."""
    if first and raw.startswith(_BOM):  # editors on Windows write one
        raw = raw[3:]
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if not raw.strip():  # checked only on failure: blank lines are rare
            return None
        raise _LineProblem(_json_message(raw, exc)) from None
    if type(obj) is not dict:
        hint = f" ({_PRETTY_HINTS[b'[']})" if type(obj) is list and obj and type(obj[0]) is dict else ""
        raise _LineProblem(f"expected a JSON object, got {_JSON_TYPES.get(type(obj), 'a value')}{hint}")
    return obj


def _parse(raw: bytes, first: bool, ctx: _Context) -> _Parsed | None:
    """Validate one JSONL prompt line; None when blank."""
    obj = _load_object(raw, first)
    if obj is None:
        return None
    if "custom_id" in obj or "body" in obj:
        return _parse_batch(obj, ctx)
    return _parse_chat(obj, ctx)


def _json_message(raw: bytes, exc: orjson.JSONDecodeError) -> str:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return f"not valid UTF-8 (byte {err.start + 1} of the line)"
    hint = _PRETTY_HINTS.get(raw.strip()[:1]) if raw.strip() in (b"[", b"{") else None
    return f"invalid JSON: {exc.msg} at column {exc.colno}" + (f" ({hint})" if hint else "")


def _parse_chat(obj: dict[str, Any], ctx: _Context) -> _Parsed:
    """Shapes 1 and 2: the line itself is the body, less the keys that only batchgate reads."""
    derived = "id" not in obj
    rid = _derive_id(obj) if derived else _check_id(obj.pop("id"), "id")
    obj.pop("job", None)
    meta = obj.pop("meta", None)  # the user's own bookkeeping (category, source, ...): never sent
    if meta is not None and type(meta) is not dict:
        raise _LineProblem(f'"meta" must be an object (your own keys, never sent), got {_show(meta)}')
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
        close = [k for k in obj if difflib.get_close_matches(k, ("prompt", "messages"), n=1)]
        raise _LineProblem('needs "prompt" or "messages"' + (f' (is "{close[0]}" a typo?)' if close else ""))
    elif system is not _MISSING:
        raise _LineProblem('"system" goes with "prompt"; with "messages", add a {"role": "system"} message')
    else:
        chars = _check_messages(obj["messages"], "messages")
    model, unknown = _finish_body(obj, ctx, "")
    return rid, model, obj, chars, derived, unknown, meta


def _parse_batch(obj: dict[str, Any], ctx: _Context) -> _Parsed:
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
    model, unknown = _finish_body(body, ctx, "body.")
    return rid, model, body, chars, derived, unknown, None


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
        if role not in ROLES:
            close = difflib.get_close_matches(role.lower(), ROLES, n=1)
            hint = f": did you mean {close[0]}?" if close else ""
            raise _LineProblem(f"{where}[{i}]: unknown role {_show(role)}{hint} (roles: {', '.join(ROLES)})")
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


def _finish_body(body: dict[str, Any], ctx: _Context, where: str) -> tuple[str, tuple[str, ...]]:
    """Drop what the client sets, resolve the model into the body; returns the model and unknown keys."""
    body.pop("stream", None)
    body.pop("stream_options", None)
    model = body.get("model", _MISSING)
    if model is _MISSING:
        if not ctx.default_model:
            raise _LineProblem(NO_MODEL)
        model = body["model"] = ctx.default_model
    elif type(model) is not str or not model:
        raise _LineProblem(f'"{where}model" must be a non-empty string, got {_show(model)}')
    for key in ("max_tokens", "max_completion_tokens"):
        # Budgets read this as the worst case, so it must be a usable number when present.
        limit = body.get(key, 1)
        if type(limit) is not int or limit < 1:
            raise _LineProblem(f'"{where}{key}" must be a positive integer, got {_show(limit)}')
    unknown: tuple[str, ...] = ()
    for key in body:
        if key not in CHAT_PARAMETERS:
            if ctx.strict:
                raise _LineProblem(unknown_parameter(where + key) + " (--strict)")
            unknown += (where + key,)
    return model, unknown


def _show(value: Any) -> str:
    """A value as JSON, cut short: enough to recognise it in a message."""
    if value is _MISSING:
        return "nothing"
    try:
        text = orjson.dumps(value).decode()
    except orjson.JSONEncodeError:  # nested deeper than orjson writes
        return "a deeply nested value"
    return text if len(text) <= 40 else text[:37] + "..."
