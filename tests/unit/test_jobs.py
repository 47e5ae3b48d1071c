"""Prompt files: the three line shapes, every problem as ``path:line``, duplicates, streaming."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import tracemalloc
from array import array
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchgate import jobs
from batchgate.errors import InputError
from batchgate.jobs import InputProblem, ValidationReport, iter_records, parse_line, validate
from batchgate.models import PromptRecord

MODEL = "qwen/qwen3-235b"
MSG = [{"role": "user", "content": "x"}]


def write(path: Path, *lines: Any) -> Path:
    """Write one JSON value (or raw bytes / str, verbatim) per line."""
    out = []
    for line in lines:
        if isinstance(line, bytes):
            out.append(line)
        elif isinstance(line, str):
            out.append(line.encode())
        else:
            out.append(orjson.dumps(line))
    path.write_bytes(b"\n".join(out) + b"\n")
    return path


def one(tmp_path: Path, line: Any, default_model: str | None = MODEL) -> PromptRecord:
    path = write(tmp_path / "p.jsonl", line)
    (record,) = iter_records([path], default_model=default_model)
    return record


def problems(tmp_path: Path, *lines: Any, default_model: str | None = MODEL) -> list[str]:
    path = write(tmp_path / "p.jsonl", *lines)
    report = validate([path], default_model=default_model)
    assert report.problem_count == len(report.problems)
    return [str(p) for p in report.problems]


# --- the three line shapes -------------------------------------------------------------------


def test_prompt_line_becomes_one_user_message_and_passes_parameters(tmp_path: Path) -> None:
    record = one(tmp_path, {"id": "q1", "prompt": "Hello", "max_tokens": 64, "temperature": 0.2})
    assert record == PromptRecord(
        id="q1",
        job="p",
        path=str(tmp_path / "p.jsonl"),
        line=1,
        model=MODEL,
        body={
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 64,
            "temperature": 0.2,
            "model": MODEL,
        },
        prompt_chars=5,
    )


def test_system_key_becomes_a_leading_system_message(tmp_path: Path) -> None:
    record = one(tmp_path, {"id": "q1", "system": "Be brief.", "prompt": "Hi", "model": "m"})
    assert record.body == {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "model": "m",
    }
    assert record.model == "m"
    assert record.prompt_chars == len("Be brief.") + len("Hi")


def test_messages_line_passes_through_and_counts_text_parts_only(tmp_path: Path) -> None:
    messages = [
        {"role": "system", "content": "abc"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "hello"},
                {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}},
            ],
        },
        {"role": "assistant", "content": None, "tool_calls": [{"id": "t1"}]},
    ]
    line = {"id": "m1", "messages": messages, "model": "line-model", "top_p": 0.9, "seed": 1}
    record = one(tmp_path, line)
    assert record.id == "m1"
    assert record.model == "line-model"  # the line's model beats the default
    assert record.body == {"messages": messages, "model": "line-model", "top_p": 0.9, "seed": 1}
    assert record.prompt_chars == 3 + 5


def test_batch_api_line_takes_id_from_custom_id_and_body_from_body(tmp_path: Path) -> None:
    body = {"model": "b-model", "messages": [{"role": "user", "content": "2+2?"}], "max_tokens": 8}
    line = {"custom_id": "r-7", "method": "POST", "url": "/v1/chat/completions", "body": body}
    record = one(tmp_path, line)
    assert (record.id, record.model, record.body, record.prompt_chars) == ("r-7", "b-model", body, 4)


def test_batch_api_line_without_model_gets_the_default(tmp_path: Path) -> None:
    record = one(tmp_path, {"custom_id": "r", "body": {"messages": [{"role": "user", "content": "x"}]}})
    assert record.model == MODEL
    assert record.body["model"] == MODEL


@pytest.mark.parametrize(
    "line",
    [
        {"id": "s", "prompt": "x", "stream": False, "stream_options": {"include_usage": False}},
        {"id": "s", "messages": [{"role": "user", "content": "x"}], "stream": True},
        {"custom_id": "s", "body": {"messages": [{"role": "user", "content": "x"}], "stream": False}},
    ],
)
def test_stream_keys_are_removed_because_the_client_sets_them(tmp_path: Path, line: Any) -> None:
    body = one(tmp_path, line).body
    assert "stream" not in body
    assert "stream_options" not in body


def test_integer_id_becomes_its_string(tmp_path: Path) -> None:
    assert one(tmp_path, {"id": 42, "prompt": "x"}).id == "42"
    assert one(tmp_path, {"custom_id": -3, "body": {"messages": MSG}}).id == "-3"


def test_job_is_the_stem_or_the_callers_and_a_job_key_never_reaches_the_body(tmp_path: Path) -> None:
    a = write(tmp_path / "alpha.prompts.txt", {"id": "1", "prompt": "x", "job": "ignored"})
    b = write(tmp_path / "beta.jsonl", {"id": "2", "prompt": "y"})
    assert [(r.job, r.id) for r in iter_records([a, b], default_model=MODEL)] == [
        ("alpha.prompts", "1"),
        ("beta", "2"),
    ]
    records = list(iter_records([a, b], default_model=MODEL, jobs=["j1", "j2"]))
    assert [r.job for r in records] == ["j1", "j2"]
    assert "job" not in records[0].body


def test_jobs_must_match_paths(tmp_path: Path) -> None:
    a = write(tmp_path / "a.jsonl", {"prompt": "x"})
    with pytest.raises(ValueError, match="1 job names for 2 paths"):
        validate([a, a], default_model=MODEL, jobs=["x"])


# --- derived ids -----------------------------------------------------------------------------


def test_derived_id_is_sha256_of_canonical_json(tmp_path: Path) -> None:
    line = {"prompt": "x", "max_tokens": 5}
    expected = "h-" + hashlib.sha256(orjson.dumps(line, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]
    assert one(tmp_path, line).id == expected


def test_derived_id_is_stable_and_ignores_key_order_and_whitespace(tmp_path: Path) -> None:
    a = write(tmp_path / "a.jsonl", b'{"prompt": "x", "temperature": 0.5, "stop": {"b": 1, "a": 2}}')
    b = write(tmp_path / "b.jsonl", b'{"stop":{"a":2,"b":1},"temperature":0.5,"prompt":"x"}')
    first = [r.id for r in iter_records([a], default_model=MODEL)]
    again = [r.id for r in iter_records([a], default_model=MODEL)]
    other = [r.id for r in iter_records([b], default_model=MODEL)]
    assert first == again == other
    assert first[0].startswith("h-") and len(first[0]) == 18


def test_different_content_gives_different_derived_ids(tmp_path: Path) -> None:
    path = write(tmp_path / "p.jsonl", {"prompt": "x"}, {"prompt": "y"}, {"prompt": "x", "model": "m"})
    ids = [r.id for r in iter_records([path], default_model=MODEL)]
    assert len(set(ids)) == 3


# --- line handling ---------------------------------------------------------------------------


def test_blank_lines_are_skipped_and_later_line_numbers_stay_true(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'\n   \n{"id": "a", "prompt": "x"}\r\n\t\r\n{"id": "b"}\n\n{"id": "c", "prompt": "y"}')
    report = validate([path], default_model=MODEL)
    assert [str(p) for p in report.problems] == [f'{path}:5: needs "prompt" or "messages"']
    assert report.records == 2
    with pytest.raises(InputError, match=r":5: needs"):
        list(iter_records([path], default_model=MODEL))
    records = iter_records([path], default_model=MODEL)
    assert next(records).line == 3  # lazy: the good line comes before the bad one raises


def test_a_utf8_bom_on_the_first_line_is_tolerated(tmp_path: Path) -> None:
    path = write(tmp_path / "p.jsonl", b'\xef\xbb\xbf{"id": "a", "prompt": "x"}')
    assert [r.id for r in iter_records([path], default_model=MODEL)] == ["a"]


def test_parse_line_returns_none_for_blank_and_names_the_place_when_bad() -> None:
    assert parse_line(b"  \r\n", path="f.jsonl", line=3, job="f", default_model=MODEL) is None
    record = parse_line(b'{"id": "x", "prompt": "p"}\n', path="f.jsonl", line=3, job="j", default_model=MODEL)
    assert record is not None and (record.id, record.job, record.line) == ("x", "j", 3)
    with pytest.raises(InputError, match=r'^f\.jsonl:9: "prompt" must be a non-empty string, got ""$'):
        parse_line(b'{"prompt": ""}', path="f.jsonl", line=9, job="f", default_model=MODEL)


def test_iter_records_reads_files_in_order(tmp_path: Path) -> None:
    a = write(tmp_path / "a.jsonl", {"id": "a1", "prompt": "x"}, {"id": "a2", "prompt": "x"})
    b = write(tmp_path / "b.jsonl", {"id": "b1", "prompt": "x"})
    assert [(r.id, r.line) for r in iter_records([a, b], default_model=MODEL)] == [
        ("a1", 1),
        ("a2", 2),
        ("b1", 1),
    ]


# --- problems --------------------------------------------------------------------------------

BAD_LINES: list[tuple[Any, str]] = [
    (b"not json", "invalid JSON: invalid literal, expected 'null' at column 1"),
    (b"{'id': 1}", "invalid JSON: unexpected character, expected a string key at column 2"),
    (b'{"id": "a", "prompt": "x"', "invalid JSON: unexpected end of data"),
    (b'{"id": "a", "prompt": "x"} trailing', "invalid JSON: unexpected content after document"),
    (b'{"id": "a", "prompt": "caf\xe9"}', "not valid UTF-8 (byte 27 of the line)"),
    ([1, 2], "expected a JSON object, got an array"),
    ("null", "expected a JSON object, got null"),
    ('"text"', "expected a JSON object, got a string"),
    ({"id": "", "prompt": "x"}, '"id" must be a non-empty string or an integer, got ""'),
    ({"id": "  ", "prompt": "x"}, '"id" must be a non-empty string or an integer'),
    ({"id": 1.5, "prompt": "x"}, '"id" must be a non-empty string or an integer, got 1.5'),
    ({"id": True, "prompt": "x"}, '"id" must be a non-empty string or an integer, got true'),
    ({"id": None, "prompt": "x"}, '"id" must be a non-empty string or an integer, got null'),
    ({"id": "a"}, 'needs "prompt" or "messages"'),
    ({"id": "a", "prompt": "x", "messages": MSG}, 'give either "prompt" or "messages", not both'),
    ({"id": "a", "prompt": ""}, '"prompt" must be a non-empty string'),
    ({"id": "a", "prompt": ["x"]}, '"prompt" must be a non-empty string, got ["x"]'),
    ({"id": "a", "prompt": "x", "system": 3}, '"system" must be a non-empty string, got 3'),
    ({"id": "a", "messages": MSG, "system": "s"}, '"system" goes with "prompt"'),
    ({"id": "a", "messages": []}, '"messages" must be a non-empty array of messages, got []'),
    ({"id": "a", "messages": "hi"}, '"messages" must be a non-empty array of messages, got "hi"'),
    ({"id": "a", "messages": ["hi"]}, 'messages[0] must be an object, got "hi"'),
    ({"id": "a", "messages": [*MSG, {"content": "x"}]}, 'messages[1]: "role" must be a non-empty string'),
    (
        {"id": "a", "messages": [{"role": 1, "content": "x"}]},
        'messages[0]: "role" must be a non-empty string, got 1',
    ),
    ({"id": "a", "messages": [{"role": "user"}]}, 'messages[0]: "content" must be a string or an array'),
    ({"id": "a", "messages": [{"role": "user", "content": 5}]}, 'messages[0]: "content" must be a'),
    ({"id": "a", "messages": [{"role": "user", "content": None}]}, 'messages[0]: "content" must be'),
    (
        {"id": "a", "messages": [{"role": "user", "content": ["x"]}]},
        "messages[0].content[0] must be an object",
    ),
    ({"id": "a", "prompt": "x", "model": ""}, '"model" must be a non-empty string, got ""'),
    ({"id": "a", "prompt": "x", "model": 7}, '"model" must be a non-empty string, got 7'),
    ({"id": "a", "prompt": "x", "max_tokens": 0}, '"max_tokens" must be a positive integer, got 0'),
    ({"id": "a", "prompt": "x", "max_tokens": -5}, '"max_tokens" must be a positive integer, got -5'),
    ({"id": "a", "prompt": "x", "max_tokens": "64"}, '"max_tokens" must be a positive integer, got "64"'),
    ({"id": "a", "prompt": "x", "max_tokens": True}, '"max_tokens" must be a positive integer, got true'),
    ({"id": "a", "prompt": "x", "max_tokens": 1.5}, '"max_tokens" must be a positive integer, got 1.5'),
    ({"id": "a", "prompt": "x", "max_tokens": None}, '"max_tokens" must be a positive integer, got null'),
    ({"custom_id": "a", "method": "GET", "body": {"messages": MSG}}, '"method" must be "POST", got "GET"'),
    ({"custom_id": "a", "url": "/v1/embeddings", "body": {"messages": MSG}}, '"url" must end with /chat/'),
    ({"custom_id": "a", "url": 1, "body": {"messages": MSG}}, '"url" must end with /chat/completions, got 1'),
    ({"custom_id": "a"}, 'needs "body", an object'),
    ({"custom_id": "a", "body": [1]}, '"body" must be an object'),
    ({"custom_id": "a", "body": {"prompt": "x"}}, '"body" needs "messages"'),
    ({"custom_id": "a", "body": {"messages": {}}}, '"body.messages" must be a non-empty array'),
    ({"custom_id": "a", "body": {"messages": MSG, "model": 1}}, '"body.model" must be a non-empty string'),
    ({"custom_id": "a", "body": {"messages": MSG, "max_tokens": 0}}, '"body.max_tokens" must be a positive'),
    ({"custom_id": "a", "body": {"messages": MSG}, "model": "m"}, 'unexpected key "model" on a Batch API'),
    ({"body": {"messages": MSG}, "id": "a"}, 'unexpected key "id" on a Batch API line'),
    ({"custom_id": 2.5, "body": {"messages": MSG}}, '"custom_id" must be a non-empty string or an integer'),
    ("[" * 300 + "]" * 300, "expected a JSON object, got an array"),
    (
        '{"prompt": "x", "n": ' + "[" * 300 + "]" * 300 + "}",
        'nested too deeply to derive an id; give the line an "id"',
    ),
]


@pytest.mark.parametrize(("line", "expected"), BAD_LINES)
def test_each_problem_is_reported_at_its_line(tmp_path: Path, line: Any, expected: str) -> None:
    good = {"id": "ok", "prompt": "fine"}
    path = write(tmp_path / "p.jsonl", good, b"", line, {"id": "ok2", "prompt": "fine"})
    report = validate([path], default_model=MODEL)
    assert report.problem_count == 1
    assert report.records == 2
    (problem,) = report.problems
    assert (problem.path, problem.line) == (str(path), 3)
    assert str(problem).startswith(f"{path}:3: {expected}")
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}:3: "):
        list(iter_records([path], default_model=MODEL))


def test_no_model_anywhere_is_a_problem(tmp_path: Path) -> None:
    lines = [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "x", "model": "m"}]
    path = tmp_path / "p.jsonl"
    assert problems(tmp_path, *lines, default_model=None) == [
        f'{path}:1: no model: set "model" on the line or pass --model'
    ]


def test_more_than_keep_problems_are_counted_and_summarised(tmp_path: Path) -> None:
    path = write(tmp_path / "p.jsonl", *(["nope"] * 25 + [{"id": "x", "prompt": "y"}]))
    report = validate([path], default_model=MODEL)
    assert (report.problem_count, len(report.problems), report.records) == (25, 20, 1)
    assert not report.ok()
    lines = report.format().splitlines()
    assert len(lines) == 21
    assert lines[0].startswith(f"{path}:1: invalid JSON")
    assert lines[19].startswith(f"{path}:20: ")
    assert lines[20] == "... and 5 more problems"
    assert validate([path], default_model=MODEL, keep=24).format().endswith("... and 1 more problem")


def test_format_of_a_clean_report_is_empty(tmp_path: Path) -> None:
    report = validate([write(tmp_path / "p.jsonl", {"prompt": "x"})], default_model=MODEL)
    assert report.ok()
    assert report.format() == ""
    want = ValidationReport([], 0, 1, 1, models={MODEL: [str(tmp_path / "p.jsonl"), 1, 1]}, ids=report.ids)
    assert report == want and len(report.ids) == 1


def test_input_problem_prints_path_line_message() -> None:
    assert str(InputProblem("a/b.jsonl", 7, "bad")) == "a/b.jsonl:7: bad"


# --- duplicates ------------------------------------------------------------------------------


def test_duplicate_ids_across_files_name_both_places(tmp_path: Path) -> None:
    a = write(tmp_path / "a.jsonl", {"id": "q1", "prompt": "x"}, {"id": "q2", "prompt": "x"})
    b = write(tmp_path / "b.jsonl", {"id": "q3", "prompt": "x"}, "", {"id": "q1", "prompt": "other"})
    report = validate([a, b], default_model=MODEL)
    assert [str(p) for p in report.problems] == [f'{b}:3: duplicate id "q1" (first seen at {a}:1)']
    assert (report.problem_count, report.records, report.prompt_chars) == (1, 3, 3)


def test_int_and_string_ids_collide(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    assert problems(tmp_path, {"id": 7, "prompt": "x"}, {"id": "7", "prompt": "y"}) == [
        f'{path}:2: duplicate id "7" (first seen at {path}:1)'
    ]


def test_identical_lines_without_ids_are_duplicates_with_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    found = problems(tmp_path, {"prompt": "same"}, {"prompt": "other"}, b'{ "prompt" : "same" }')
    (derived,) = [r.id for r in iter_records([write(tmp_path / "q.jsonl", {"prompt": "same"})], default_model=MODEL)]
    assert found == [
        f'{path}:3: duplicate id "{derived}" (first seen at {path}:1): '
        'the same line without an "id" appears twice; give each line an "id"'
    ]


def test_duplicate_and_line_problems_are_listed_in_input_order(tmp_path: Path) -> None:
    a = write(tmp_path / "a.jsonl", {"id": "d", "prompt": "x"}, {"id": "d", "prompt": "x"}, "bad")
    b = write(tmp_path / "b.jsonl", "bad", {"id": "d", "prompt": "x"})
    report = validate([a, b], default_model=MODEL, keep=3)
    assert [(p.path, p.line) for p in report.problems] == [(str(a), 2), (str(a), 3), (str(b), 1)]
    assert report.problem_count == 4
    assert report.format().endswith("... and 1 more problem")


def test_a_hash_collision_is_never_reported_as_a_duplicate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "_id_digest", lambda rid: b"\x00" * 8)  # every id collides
    path = write(tmp_path / "p.jsonl", *({"id": f"q{i}", "prompt": "x"} for i in range(50)))
    report = validate([path], default_model=MODEL)
    assert report.ok()
    assert report.records == 50


def test_invalid_lines_take_no_part_in_duplicate_detection(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    found = problems(tmp_path, {"id": "a", "prompt": "x"}, {"id": "a", "prompt": ""})
    assert found == [f'{path}:2: "prompt" must be a non-empty string, got ""']


# --- files -----------------------------------------------------------------------------------


def test_missing_and_directory_paths_are_input_errors_naming_them(tmp_path: Path) -> None:
    good = write(tmp_path / "a.jsonl", {"prompt": "x"})
    missing = tmp_path / "missing.jsonl"
    expected = f"^{re.escape(str(missing))}: no such file; {re.escape(str(tmp_path))}: is a directory"
    with pytest.raises(InputError, match=expected):
        validate([good, missing, tmp_path], default_model=MODEL)
    with pytest.raises(InputError, match=f"^{re.escape(str(missing))}: no such file$"):
        iter_records([missing], default_model=MODEL)  # eager: before the first next()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads anything")
def test_unreadable_file_is_an_input_error(tmp_path: Path) -> None:
    path = write(tmp_path / "a.jsonl", {"prompt": "x"})
    path.chmod(0)
    with pytest.raises(InputError, match=f"^{re.escape(str(path))}: cannot read: Permission denied"):
        validate([path], default_model=MODEL)


def test_the_same_file_given_twice_is_one_input_error(tmp_path: Path) -> None:
    path = write(tmp_path / "a.jsonl", {"prompt": "x"})
    os.link(path, tmp_path / "b.jsonl")
    with pytest.raises(InputError, match=r"b\.jsonl: same file as .*a\.jsonl, given twice"):
        validate([path, tmp_path / "b.jsonl"], default_model=MODEL)


def test_a_single_path_is_refused_rather_than_read_as_characters(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        validate(str(write(tmp_path / "a.jsonl", {"prompt": "x"})), default_model=MODEL)


# --- streaming -------------------------------------------------------------------------------


def test_validation_memory_grows_by_a_hash_per_line_not_by_the_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = 100_000
    path = tmp_path / "big.jsonl"
    with path.open("wb") as f:
        for i in range(n):
            f.write(b'{"id": "prompt-number-%d", "prompt": "What is %d squared?"}\n' % (i, i))
    seen: list[array[int]] = []
    real = jobs._duplicated_digests

    def spy(hashes: array[int]) -> set[bytes]:
        seen.append(hashes)
        return real(hashes)

    monkeypatch.setattr(jobs, "_duplicated_digests", spy)
    import numpy  # noqa: F401  (its import is not the validation's memory)

    tracemalloc.start()
    try:
        report = validate([path], default_model=MODEL)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.ok() and report.records == n
    (hashes,) = seen
    assert (hashes.typecode, len(hashes)) == ("Q", n)
    # 8 bytes per line plus the array's slack; a set of these ids alone takes ~11 MB.
    assert peak < 4 * 8 * n, peak


# --- properties ------------------------------------------------------------------------------

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
# Each key the validator reads, most often with a plausible value, sometimes with anything:
# generated lines then reach every branch, valid records included.
NEAR_MESSAGES = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "role": st.sampled_from(["user", "system"]) | JSON,
            "content": st.text(max_size=3) | st.lists(st.just({"type": "text", "text": "t"}) | JSON) | JSON,
        },
    )
    | JSON,
    max_size=2,
)
NEAR_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "id": st.sampled_from(["a", "b", "", " "]) | st.integers(0, 2) | JSON,
    "prompt": st.text(max_size=3) | JSON,
    "messages": NEAR_MESSAGES | JSON,
    "system": st.text(max_size=3) | JSON,
    "model": st.sampled_from(["m", ""]) | JSON,
    "max_tokens": st.integers(-1, 3) | JSON,
    "stream": st.booleans(),
}
NEAR_MISS = st.fixed_dictionaries({}, optional=NEAR_FIELDS) | st.fixed_dictionaries(
    {},
    optional={
        "custom_id": NEAR_FIELDS["id"],
        "method": st.just("POST") | JSON,
        "url": st.just("/v1/chat/completions") | JSON,
        "body": st.fixed_dictionaries({}, optional=NEAR_FIELDS) | JSON,
        "id": JSON,
    },
)
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check_accounting(lines: list[bytes]) -> ValidationReport:
    """Validate ``lines``; every non-blank line must end up a problem or a record."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.jsonl"
        path.write_bytes(b"\n".join(lines))
        data = path.read_bytes()
        try:
            report = validate([path], default_model=MODEL)
        except InputError as exc:  # a binary file: one message for the file, never one per line
            assert str(exc).startswith(f"{path}: "), exc
            if data.startswith(MAGIC):
                return ValidationReport()
            assert str(exc).startswith(f"{path}: looks like "), exc
            zip_magic = data[:4] == b"PK\x03\x04"
            assert b"\x00" in data or data[:2] in (b"\xff\xfe", b"\xfe\xff") or zip_magic or not _is_utf8(lines)
            with pytest.raises(InputError, match="looks like"):
                iter_records([path], default_model=MODEL)
            return ValidationReport()
        if data.startswith(MAGIC):  # garbage that starts like a compressed file: a problem, never a crash
            assert all(str(p).startswith(f"{path}:") for p in report.problems)
            return report
        # Blank: ASCII whitespace only, after a UTF-8 BOM on the first line.
        non_blank = sum(
            1 for i, raw in enumerate(lines) if (raw[3:] if i == 0 and raw[:3] == b"\xef\xbb\xbf" else raw).strip()
        )
        if non_blank == 0:  # nothing at all to run is a problem of the whole input
            assert [str(p) for p in report.problems] == [
                f"{path}: no prompts: the input is empty or holds only blank lines"
            ]
            return report
        assert report.problem_count + report.records == non_blank
        assert len(report.problems) == report.problem_count  # at most 8 lines: all kept
        for p in report.problems:
            assert p.path == str(path)
            assert 1 <= p.line <= len(lines)
            assert str(p).startswith(f"{path}:{p.line}: ")
        line_problems = [p for p in report.problems if not p.message.startswith("duplicate id")]
        if line_problems:  # iter_records stops at the first one, with the same message
            with pytest.raises(InputError) as exc:
                list(iter_records([path], default_model=MODEL))
            assert str(exc.value) == str(line_problems[0])
        else:  # iter_records does not look for duplicates: validate did
            yielded = list(iter_records([path], default_model=MODEL))
            assert len(yielded) == report.records + report.problem_count
    return report


MAGIC = (b"\x1f\x8b", b"BZh", b"\x28\xb5\x2f\xfd", b"\xfd7zXZ\x00", b"PAR1")


def _is_utf8(lines: list[bytes]) -> bool:
    try:
        b"\n".join(lines).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@PROPERTY
@given(st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=8))
def test_arbitrary_bytes_never_crash_validation(lines: list[bytes]) -> None:
    _check_accounting(lines)


TEXT = st.text(min_size=1, max_size=20)
TEXT_PART = st.fixed_dictionaries({"type": st.just("text"), "text": TEXT})
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "user", "assistant"]),
        "content": TEXT | st.lists(TEXT_PART, max_size=2),
    }
)
PARAMS = st.fixed_dictionaries(
    {},
    optional={
        "model": TEXT,
        "max_tokens": st.integers(1, 100_000),
        "temperature": st.floats(0, 2),
        "stop": st.lists(TEXT, max_size=2),
    },
)


def _chars(messages: list[dict[str, Any]]) -> int:
    return sum(
        len(m["content"]) if isinstance(m["content"], str) else sum(len(p["text"]) for p in m["content"])
        for m in messages
    )


@st.composite
def valid_line(draw: st.DrawFn, rid: str) -> tuple[dict[str, Any], dict[str, Any], int]:
    """A valid line with its id, the body it must give, and its prompt_chars."""
    params = draw(PARAMS)
    shape = draw(st.sampled_from(["prompt", "messages", "batch"]))
    if shape == "prompt":
        prompt, system = draw(TEXT), draw(st.none() | TEXT)
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        line = {"id": rid, "prompt": prompt, **({"system": system} if system else {}), **params}
    else:
        messages = draw(st.lists(MESSAGE, min_size=1, max_size=3))
        if shape == "messages":
            line = {"id": rid, "messages": messages, **params}
        else:
            body = {"messages": messages, **params}
            line = {"custom_id": rid, "method": "POST", "url": "/v1/chat/completions", "body": body}
    body = {"messages": messages, **params}
    body.setdefault("model", MODEL)
    return line, body, _chars(messages)


@PROPERTY
@given(st.data(), st.lists(st.text(min_size=1).filter(str.strip), unique=True, min_size=1, max_size=6))
def test_valid_records_round_trip(data: st.DataObject, ids: list[str]) -> None:
    cases = [data.draw(valid_line(rid)) for rid in ids]
    with tempfile.TemporaryDirectory() as tmp:
        path = write(Path(tmp) / "p.jsonl", *(line for line, _, _ in cases))
        report = validate([path], default_model=MODEL)
        assert report.ok(), report.format()
        assert (report.records, report.prompt_chars) == (len(ids), sum(c for _, _, c in cases))
        records = list(iter_records([path], default_model=MODEL))
    assert [r.id for r in records] == ids
    assert [r.body for r in records] == [body for _, body, _ in cases]
    assert [r.model for r in records] == [body["model"] for _, body, _ in cases]
    assert [r.line for r in records] == list(range(1, len(ids) + 1))


# Valid lines with ids from a small set, so duplicates turn up too.
VALID_LINE = st.sampled_from(["a", "b", "c"]).flatmap(valid_line).map(lambda case: case[0])


@PROPERTY
@given(st.lists(JSON | NEAR_MISS | VALID_LINE, max_size=8))
def test_arbitrary_json_values_never_crash_validation(values: list[Any]) -> None:
    _check_accounting([orjson.dumps(v) for v in values])


def test_meta_is_the_users_own_and_never_sent(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"id": "a", "prompt": "hi", "meta": {"category": "geo", "source": 7}}\n')
    (record,) = list(iter_records([path], default_model="m"))
    assert "meta" not in record.body and record.body["messages"] == [{"role": "user", "content": "hi"}]


@given(st.lists(st.integers(0, 50), max_size=200))
def test_duplicate_digests_are_the_same_by_set_and_by_numpy(values: list[int]) -> None:
    """Small inputs find duplicates in a Python set (no numpy import), big ones by sorting: one answer."""
    hashes = array("Q", values)
    by_set = jobs._duplicated_digests(array("Q", hashes))
    small, jobs._SMALL = jobs._SMALL, 0
    try:
        by_numpy = jobs._duplicated_digests(array("Q", hashes))
    finally:
        jobs._SMALL = small
    want = {array("Q", [v]).tobytes() for v in set(values) if values.count(v) > 1}
    assert by_set == by_numpy == want
