"""Inputs a shell user has (stdin, pipes, compressed files, binary files) and validation that catches typos."""

from __future__ import annotations

import bz2
import gzip
import os
import subprocess
import sys
import threading
from pathlib import Path

import orjson
import pytest
import zstandard

from batchgate import jobs
from batchgate.errors import InputError
from batchgate.jobs import iter_records, validate

MODEL = "m"
LINES = b'{"id": "a", "prompt": "one"}\n{"id": "b", "prompt": "two"}\n'


# --- standard input and pipes ----------------------------------------------------------------

SPOOL_CHECK = """
import os, sys
from batchgate import jobs
report = jobs.validate([{path!r}], default_model="m")
ids = [(r.id, r.job, r.path, r.line) for r in jobs.iter_records([{path!r}], default_model="m")]
again = [r.id for r in jobs.iter_records([{path!r}], default_model="m")]
spool = jobs._spool_dir[0]
assert oct(os.stat(spool).st_mode & 0o777) == "0o700"
print(report.records, ids, again, spool)
"""


@pytest.mark.parametrize("path", ["-", "/dev/stdin"])
def test_stdin_pipe_is_spooled_once_for_validation_and_the_run(path: str) -> None:
    res = subprocess.run(
        [sys.executable, "-c", SPOOL_CHECK.format(path=path)], input=LINES, capture_output=True, check=False
    )
    assert res.returncode == 0, res.stderr.decode()
    records, rest = res.stdout.decode().split(" ", 1)
    assert records == "2"
    assert f"[('a', 'stdin', '{path}', 1), ('b', 'stdin', '{path}', 2)] ['a', 'b']" in rest
    spool = rest.rsplit(" ", 1)[1].strip()
    assert not os.path.exists(spool)  # removed at exit


def test_compressed_stdin_and_a_table_on_stdin() -> None:
    code = (
        "from batchgate import jobs; "
        "print([r.body['messages'][0]['content'] for r in "
        "jobs.iter_records(['-'], default_model='m', template='Q: {{ q }}')])"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], input=gzip.compress(b"q,n\nfirst,1\nsecond,2\n"), capture_output=True, check=False
    )
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout.decode().strip() == "['Q: first', 'Q: second']"


def test_a_named_fifo_is_read_once(tmp_path: Path) -> None:
    fifo = tmp_path / "prompts.fifo"
    os.mkfifo(fifo)

    def writer() -> None:
        with open(fifo, "wb") as f:
            f.write(LINES)

    thread = threading.Thread(target=writer)
    thread.start()
    report = validate([fifo], default_model=MODEL)
    thread.join(5)
    assert report.ok() and report.records == 2
    # A second open of the FIFO would wait for a writer that never comes: the spool is read instead.
    assert [r.id for r in iter_records([fifo], default_model=MODEL)] == ["a", "b"]


def test_the_same_pipe_given_twice_is_one_error() -> None:
    code = "from batchgate import jobs; jobs.validate(['-', '/dev/stdin'], default_model='m')"
    res = subprocess.run([sys.executable, "-c", code], input=LINES, capture_output=True, check=False)
    assert b"/dev/stdin: same file as -, given twice" in res.stderr


def test_closed_stdin_is_an_input_error() -> None:
    code = (
        "import os; os.close(0)\nfrom batchgate import jobs, errors\n"
        "try:\n    jobs.validate(['-'], default_model='m')\n"
        "except errors.InputError as e:\n    print(e)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, check=False)
    assert res.stdout.decode().strip() == "-: standard input is closed"


# --- compression -----------------------------------------------------------------------------

COMPRESSORS = {
    "gz": gzip.compress,
    "bz2": bz2.compress,
    "zst": lambda data: zstandard.ZstdCompressor().compress(data[:20]) + zstandard.ZstdCompressor().compress(data[20:]),
}


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
@pytest.mark.parametrize("named", [True, False])
def test_compressed_files_are_read_by_extension_or_magic_bytes(tmp_path: Path, kind: str, named: bool) -> None:
    path = tmp_path / (f"p.jsonl.{kind}" if named else "p.jsonl")
    path.write_bytes(COMPRESSORS[kind](LINES))
    report = validate([path], default_model=MODEL)
    assert report.ok() and report.records == 2
    records = list(iter_records([path], default_model=MODEL))
    assert [(r.id, r.line, r.job) for r in records] == [("a", 1, "p"), ("b", 2, "p")]


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_a_cut_short_compressed_file_is_a_problem_at_the_line_it_breaks(tmp_path: Path, kind: str) -> None:
    many = b"".join(b'{"id": "%d", "prompt": "text number %d"}\n' % (i, i) for i in range(3000))
    data = COMPRESSORS[kind](many)
    path = tmp_path / f"p.jsonl.{kind}"
    path.write_bytes(data[: len(data) * 2 // 3])
    report = validate([path], default_model=MODEL)
    (problem,) = report.problems
    assert problem.line == report.records + 1
    assert f"the {'gzip' if kind == 'gz' else 'zstd' if kind == 'zst' else kind} data is corrupt or cut short" in str(
        problem
    )
    with pytest.raises(InputError, match="corrupt or cut short"):
        list(iter_records([path], default_model=MODEL))


def test_compressed_csv_table(tmp_path: Path) -> None:
    path = tmp_path / "t.csv.gz"
    path.write_bytes(gzip.compress(b"text\nhello\n"))
    (record,) = iter_records([path], default_model=MODEL, template="{{ text }}")
    assert record.body["messages"][0]["content"] == "hello" and record.job == "t"


def test_zstd_without_the_zstandard_package_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "p.jsonl.zst"
    path.write_bytes(COMPRESSORS["zst"](LINES))
    monkeypatch.setattr(jobs, "_have_zstd", lambda: False)
    with pytest.raises(
        InputError, match=r"is zstd-compressed, and the zstandard package is not installed: pip install"
    ):
        validate([path], default_model=MODEL)


# --- binary files ----------------------------------------------------------------------------

BINARY = [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "looks like a binary file (NUL bytes in its first bytes)"),
    (bytes(range(128, 256)) * 4, "looks like a binary file (its first bytes are not UTF-8)"),
    ('{"prompt": "x"}\n'.encode("utf-16"), "looks like UTF-16 text: save it as UTF-8"),
    (b"PK\x03\x04\x14\x00\x06\x00", "looks like a binary file (a zip archive, or an .xlsx workbook: save it as CSV)"),
    (b"\xfd7zXZ\x00\x00\x04", "is xz-compressed: decompress it (xz -d)"),
]


@pytest.mark.parametrize(("data", "message"), BINARY)
def test_a_binary_file_is_one_clear_message(tmp_path: Path, data: bytes, message: str) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes(data + b"\n" * 50)
    with pytest.raises(InputError) as info:
        validate([path], default_model=MODEL)
    assert str(info.value).startswith(f"{path}: {message}")
    assert "\n" not in str(info.value)


def test_a_stray_latin1_byte_stays_a_problem_of_its_line(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes(LINES + b'{"id": "c", "prompt": "caf\xe9"}\n')
    report = validate([path], default_model=MODEL)
    assert [str(p) for p in report.problems] == [f"{path}:3: not valid UTF-8 (byte 27 of the line)"]


# --- typos -----------------------------------------------------------------------------------


def write(path: Path, *lines: object) -> Path:
    path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    return path


def test_unknown_chat_parameters_warn_once_with_the_nearest_name(tmp_path: Path) -> None:
    path = write(
        tmp_path / "p.jsonl",
        {"prompt": "a", "temprature": 0.2},
        {"prompt": "b", "temprature": 0.2, "max_token": 5},
        {"prompt": "c", "temprature": 0.2, "meta": {"temprature": "fine under meta"}},
        {"custom_id": "d", "body": {"messages": [{"role": "user", "content": "x"}], "top_k": 3}},
        {"prompt": "e", "temperature": 1, "top_p": 1, "seed": 1, "n": 2, "logprobs": True, "top_logprobs": 2},
    )
    report = validate([path], default_model=MODEL)
    assert report.ok() and report.records == 5
    assert [str(w) for w in report.warnings] == [
        f"{path}:1: unknown chat parameter temprature: did you mean temperature? (and on 2 more lines)",
        f"{path}:2: unknown chat parameter max_token: did you mean max_tokens?",
        f"{path}:4: unknown chat parameter body.top_k: did you mean top_p?",
    ]
    assert report.format_warnings().splitlines()[0] == (
        f"{path}:1: warning: unknown chat parameter temprature: did you mean temperature? (and on 2 more lines)"
    )
    strict = validate([path], default_model=MODEL, strict=True)
    assert [str(p) for p in strict.problems] == [
        f"{path}:1: unknown chat parameter temprature: did you mean temperature? (--strict)",
        f"{path}:2: unknown chat parameter temprature: did you mean temperature? (--strict)",
        f"{path}:3: unknown chat parameter temprature: did you mean temperature? (--strict)",
        f"{path}:4: unknown chat parameter body.top_k: did you mean top_p? (--strict)",
    ]
    assert strict.warnings == []


def test_a_parameter_like_nothing_known_warns_without_a_guess() -> None:
    assert jobs.unknown_parameter("zzzz_qqq") == (
        "unknown chat parameter zzzz_qqq (not among GonkaGate's documented parameters; sent as written)"
    )


@pytest.mark.parametrize(
    ("role", "expected"),
    [
        ("wizard", 'messages[1]: unknown role "wizard" (roles: system, user, assistant, tool, developer)'),
        ("usr", 'messages[1]: unknown role "usr": did you mean user?'),
        ("System", 'messages[1]: unknown role "System": did you mean system?'),
    ],
)
def test_unknown_roles_are_errors(tmp_path: Path, role: str, expected: str) -> None:
    path = write(
        tmp_path / "p.jsonl", {"messages": [{"role": "system", "content": "s"}, {"role": role, "content": "x"}]}
    )
    report = validate([path], default_model=MODEL)
    assert str(report.problems[0]).startswith(f"{path}:1: {expected}")


def test_every_known_role_is_accepted(tmp_path: Path) -> None:
    roles = ["system", "developer", "user", "assistant", "tool"]
    path = write(tmp_path / "p.jsonl", {"messages": [{"role": r, "content": "x"} for r in roles]})
    assert validate([path], default_model=MODEL).ok()


def test_an_empty_input_is_an_error_and_an_empty_one_among_others_a_warning(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"\n  \n")
    report = validate([empty], default_model=MODEL)
    assert not report.ok()
    assert report.format() == f"{empty}: no prompts: the input is empty or holds only blank lines"
    full = write(tmp_path / "full.jsonl", {"prompt": "x"})
    report = validate([empty, full], default_model=MODEL)
    assert report.ok() and [str(w) for w in report.warnings] == [
        f"{empty}: no prompts: the input is empty or holds only blank lines"
    ]


def test_meta_travels_with_the_record_and_must_be_an_object(tmp_path: Path) -> None:
    path = write(
        tmp_path / "p.jsonl", {"id": "a", "prompt": "x", "meta": {"k": [1]}}, {"id": "b", "prompt": "y", "meta": 3}
    )
    report = validate([path], default_model=MODEL)
    assert [str(p) for p in report.problems] == [
        f'{path}:2: "meta" must be an object (your own keys, never sent), got 3'
    ]
    first = next(iter_records([path], default_model=MODEL))
    assert first.meta == {"k": [1]} and "meta" not in first.body


def test_a_misspelt_prompt_key_is_named(tmp_path: Path) -> None:
    path = write(tmp_path / "p.jsonl", {"promt": "x"}, {"mesages": []}, {"other": 1})
    assert [p.message for p in validate([path], default_model=MODEL).problems] == [
        'needs "prompt" or "messages" (is "promt" a typo?)',
        'needs "prompt" or "messages" (is "mesages" a typo?)',
        'needs "prompt" or "messages"',
    ]


def test_json_written_by_json_dump_gets_a_hint_to_convert_it(tmp_path: Path) -> None:
    pretty = tmp_path / "pretty.json"
    pretty.write_text('[\n  {\n    "prompt": "x"\n  }\n]\n')
    problems = validate([pretty], default_model=MODEL).problems
    assert problems[0].message == (
        "invalid JSON: unexpected end of data at column 1 (a JSON array? batchgate reads JSON Lines, "
        "one object per line: jq -c '.[]' FILE > FILE.jsonl)"
    )
    assert problems[1].message.endswith(
        "(an object spread over several lines? write each on one line: jq -c . FILE > FILE.jsonl)"
    )
    one_line = tmp_path / "array.json"
    one_line.write_text('[{"prompt": "x"}, {"prompt": "y"}]\n')
    assert (
        validate([one_line], default_model=MODEL)
        .problems[0]
        .message.startswith("expected a JSON object, got an array (a JSON array? batchgate reads JSON Lines")
    )
