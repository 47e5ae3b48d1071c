"""Prompts from tables: CSV, TSV, Parquet and JSONL rows rendered through a sandboxed template."""

from __future__ import annotations

import csv
import hashlib
import io
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchgate.errors import InputError
from batchgate.jobs import iter_records, validate
from batchgate.models import PromptRecord

MODEL = "m"
PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def write_csv(path: Path, header: list[str], *rows: list[str], quoting: int = csv.QUOTE_MINIMAL) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n", quoting=quoting)  # QUOTE_MINIMAL leaves a lone \r bare
    w.writerow(header)
    w.writerows(rows)
    path.write_text(buf.getvalue(), encoding="utf-8")
    return path


def messages(record: PromptRecord) -> list[dict[str, str]]:
    result: list[dict[str, str]] = record.body["messages"]
    return result


# --- rendering --------------------------------------------------------------------------------


def test_csv_rows_render_into_user_messages_with_ids_and_meta(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "qa.csv", ["id", "question", "gold"], ["q1", "2+2?", "4"], ["007", "Capital?", "Paris"])
    records = list(iter_records([path], default_model=MODEL, template="Q: {{ question }}", id_column="id"))
    assert records == [
        PromptRecord(
            id="q1",
            job="qa",
            path=str(path),
            line=1,
            model=MODEL,
            body={"messages": [{"role": "user", "content": "Q: 2+2?"}], "model": MODEL},
            prompt_chars=len("Q: 2+2?"),
            meta={"gold": "4"},
        ),
        PromptRecord(
            id="007",  # CSV cells stay text: "007" is not 7
            job="qa",
            path=str(path),
            line=2,
            model=MODEL,
            body={"messages": [{"role": "user", "content": "Q: Capital?"}], "model": MODEL},
            prompt_chars=len("Q: Capital?"),
            meta={"gold": "Paris"},
        ),
    ]
    report = validate([path], default_model=MODEL, template="Q: {{ question }}", id_column="id")
    assert (report.ok(), report.records, report.prompt_chars) == (True, 2, 18)


def test_system_template_renders_per_row_and_an_empty_one_sends_no_system_message(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", ["persona", "text"], ["a pirate", "hello"], ["", "bye"])
    records = list(
        iter_records(
            [path],
            default_model=MODEL,
            template="{{ text }}",
            system_template="{% if persona %}You are {{ persona }}.{% endif %}",
        )
    )
    assert [messages(r) for r in records] == [
        [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "hello"}],
        [{"role": "user", "content": "bye"}],
    ]
    assert records[0].prompt_chars == len("You are a pirate.") + len("hello")
    assert records[0].meta == {}  # both columns are used by the templates


def test_template_file_is_read_and_named_in_syntax_errors(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", ["text"], ["hi"])
    good = tmp_path / "p.j2"
    good.write_text("Say: {{ text }}\n")  # the trailing newline of a file is not part of the prompt
    (record,) = iter_records([path], default_model=MODEL, template=good)
    assert messages(record) == [{"role": "user", "content": "Say: hi"}]
    bad = tmp_path / "bad.j2"
    bad.write_text("line one\n{{ text }\n")
    with pytest.raises(InputError, match=rf"^{bad}:2: template syntax error: unexpected '}}'$"):
        validate([path], default_model=MODEL, template=bad)
    with pytest.raises(InputError, match=r"^--prompt:1: template syntax error"):
        validate([path], default_model=MODEL, template="{% if %}")
    with pytest.raises(InputError, match="cannot read template"):
        validate([path], default_model=MODEL, template=tmp_path / "missing.j2")


def test_derived_ids_are_stable_content_hashes_and_duplicate_rows_are_named(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", ["text", "n"], ["a", "1"], ["b", "1"], ["a", "1"])
    report = validate([path], default_model=MODEL, template="{{ text }}")
    canonical = orjson.dumps({"text": "a", "n": "1"}, option=orjson.OPT_SORT_KEYS)
    rid = "h-" + hashlib.sha256(canonical).hexdigest()[:16]
    assert [str(p) for p in report.problems] == [
        f'{path}:3: duplicate id "{rid}" (first seen at {path}:1): the same row appears twice; '
        "name an id column (--id-column)"
    ]
    first = [r.id for r in iter_records([path], default_model=MODEL, template="{{ text }}")]
    again = [r.id for r in iter_records([path], default_model=MODEL, template="Other: {{ text }}")]
    assert first == again and first[0] == rid  # the id is the row's, not the template's


TEMPLATE_PROBLEMS: list[tuple[str, str]] = [
    ("{{ questio }}", 'the template needs column "questio", which this row lacks: did you mean question? (columns:'),
    (
        "{{ nothing_like_it }}",
        'the template needs column "nothing_like_it", which this row lacks: (columns: blank, id, q',
    ),
    ("{% if blank %}{{ blank }}{% endif %}", "the template renders an empty prompt for this row"),
    ("   {{ blank }}  ", "the template renders an empty prompt for this row"),
    ("{{ question / 2 }}", "the template failed on this row: TypeError: unsupported operand"),
    ("{{ question.__class__ }}", "the template failed on this row: SecurityError: access to attribute '__class__'"),
    ("{{ question.nope }}", "the template failed on this row: 'str object' has no attribute 'nope'"),
]


@pytest.mark.parametrize(("template", "expected"), TEMPLATE_PROBLEMS)
def test_each_row_problem_is_reported_at_its_data_row(tmp_path: Path, template: str, expected: str) -> None:
    path = write_csv(tmp_path / "t.csv", ["id", "question", "blank"], ["1", "x", ""], ["2", "y", ""])
    report = validate([path], default_model=MODEL, template=template, id_column="id")
    assert report.problem_count == 2 and report.records == 0
    assert str(report.problems[1]).startswith(f"{path}:2: data row 2: {expected}"), report.problems[1]
    with pytest.raises(InputError, match=rf"^{path}:1: data row 1: "):
        list(iter_records([path], default_model=MODEL, template=template, id_column="id"))


def test_id_column_problems(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", ["key", "text"], ["a", "x"], [" ", "y"], ["a", "z"])
    report = validate([path], default_model=MODEL, template="{{ text }}", id_column="key")
    assert [str(p) for p in report.problems] == [
        f'{path}:2: data row 2: id column "key" must hold a non-empty string or an integer, got " "',
        f'{path}:3: duplicate id "a" (first seen at {path}:1)',
    ]
    report = validate([path], default_model=MODEL, template="{{ text }}", id_column="ky")
    assert [str(p) for p in report.problems] == [
        f'{path}: no id column "ky" in the header: did you mean key? (columns: key, text)'
    ]
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "t.parquet")
    report = validate([tmp_path / "t.parquet"], default_model=MODEL, template="{{ text }}", id_column="id")
    assert report.format() == f'{tmp_path / "t.parquet"}: no id column "id" in the file (columns: text)'
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"key": 1, "text": "x"}\n{"text": "y"}\n')
    report = validate([rows], default_model=MODEL, template="{{ text }}", id_column="key")
    assert report.format() == f'{rows}:2: no id column "key" on this row (columns: text)'


def test_ragged_rows_bad_utf8_and_quoted_newlines_keep_true_row_numbers(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_bytes(b'text,n\n"multi\nline",1\nshort\nok,2\n"caf\xe9",3\nx,4,extra\nlast,5\n')
    report = validate([path], default_model=MODEL, template="{{ text }}")
    assert [str(p) for p in report.problems] == [
        f"{path}:2: data row 2: expected 2 cells (the header's), got 1",
        f'{path}:4: data row 4: column "text" is not valid UTF-8 (byte 4 of the cell)',
        f"{path}:5: data row 5: expected 2 cells (the header's), got 3",
    ]
    assert report.records == 3  # rows 1, 3 and 6
    records = iter_records([path], default_model=MODEL, template="{{ text }}")
    first = next(records)
    assert (first.line, messages(first)[0]["content"]) == (1, "multi\nline")
    with pytest.raises(InputError, match=r":2: data row 2: expected 2 cells"):
        next(records)


def test_header_problems_are_one_problem_for_the_file(tmp_path: Path) -> None:
    dup = write_csv(tmp_path / "dup.csv", ["a", "a"], ["1", "2"])
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    header_only = write_csv(tmp_path / "h.csv", ["a"])
    report = validate([dup], default_model=MODEL, template="{{ a }}")
    assert [str(p) for p in report.problems] == [f'{dup}: the header names column "a" twice']
    report = validate([empty], default_model=MODEL, template="{{ a }}")
    assert [str(p) for p in report.problems] == [
        f"{empty}: empty file: a CSV table needs a header line naming its columns"
    ]
    report = validate([header_only], default_model=MODEL, template="{{ a }}")
    assert [str(p) for p in report.problems] == [f"{header_only}: no prompts: the table has no rows"]


def test_tsv_and_utf8_bom(tmp_path: Path) -> None:
    path = tmp_path / "t.tsv"
    path.write_bytes(b"\xef\xbb\xbftext\tn\nhello, world\t1\n")
    (record,) = iter_records([path], default_model=MODEL, template="{{ text }}")
    assert messages(record)[0]["content"] == "hello, world" and record.meta == {"n": "1"}


def test_parquet_rows_keep_their_types_in_meta_and_nulls_are_problems_when_printed(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    table = pa.table(
        {
            "id": pa.array([1, 2, 3], pa.int64()),
            "text": ["a", None, "c"],
            "score": [0.5, 1.0, None],
            "tags": [["x"], [], None],
        }
    )
    pq.write_table(table, path, row_group_size=2)
    report = validate([path], default_model=MODEL, template="{{ text }}", id_column="id")
    assert [str(p) for p in report.problems] == [
        f"{path}:2: data row 2: the template prints a null (an empty cell or JSON null) for this row"
    ]
    records = list(iter_records([path], default_model=MODEL, template="{{ text or 'none' }}", id_column="id"))
    assert [(r.id, messages(r)[0]["content"], r.meta) for r in records] == [
        ("1", "a", {"score": 0.5, "tags": ["x"]}),
        ("2", "none", {"score": 1.0, "tags": []}),
        ("3", "c", {"score": None, "tags": None}),
    ]
    orjson.dumps([r.meta for r in records])  # meta goes to the ledger: JSON as it is


def test_parquet_values_json_lacks_become_text(tmp_path: Path) -> None:
    from datetime import date, timedelta
    from decimal import Decimal

    path = tmp_path / "t.parquet"
    table = pa.table(
        {
            "text": ["a"],
            "price": pa.array([Decimal("1.25")], pa.decimal128(5, 2)),
            "blob": [b"\xff\x00"],
            "day": [date(2026, 1, 2)],
            "wait": pa.array([timedelta(seconds=3)], pa.duration("s")),
        }
    )
    pq.write_table(table, path)
    (record,) = iter_records([path], default_model=MODEL, template="{{ text }} {{ price }}")
    assert messages(record)[0]["content"] == "a 1.25"
    assert record.meta == {"blob": "ff00", "day": "2026-01-02", "wait": "0:00:03"}
    assert record.id.startswith("h-")


def test_jsonl_tables_take_any_columns_and_report_lines(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"q": "one", "n": {"deep": [1]}}\n\n{"n": 2}\nnot json\n[1]\n{"q": "two"}\n')
    report = validate([path], default_model=MODEL, template="{{ q }}")
    assert [str(p) for p in report.problems] == [
        f'{path}:3: the template needs column "q", which this row lacks: (columns: n)',
        f"{path}:4: invalid JSON: invalid literal, expected 'null' at column 1",
        f"{path}:5: expected a JSON object, got an array",
    ]
    report = validate([path], default_model=MODEL, template="{{ q | default('none') }}")
    assert report.problem_count == 2
    first = next(iter_records([path], default_model=MODEL, template="{{ q }}", id_column=None))
    assert first.meta == {"n": {"deep": [1]}}


def test_format_follows_the_extension_or_the_content(tmp_path: Path) -> None:
    csv_text = tmp_path / "table.txt"
    csv_text.write_text("text\nhello\n")
    jsonl_text = tmp_path / "rows.txt"
    jsonl_text.write_text('{"text": "hi"}\n')
    records = list(iter_records([csv_text, jsonl_text], default_model=MODEL, template="{{ text }}"))
    assert [messages(r)[0]["content"] for r in records] == ["hello", "hi"]
    fake = tmp_path / "fake.parquet"
    fake.write_text("text\nx\n")
    report = validate([fake], default_model=MODEL, template="{{ text }}")
    assert str(report.problems[0]).startswith(f"{fake}: not a readable Parquet file")


def test_tables_need_a_template_and_templates_need_a_model(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", ["text"], ["x"])
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(InputError, match=r"t\.csv: is a CSV table: pass --template FILE or --prompt TEXT"):
        validate([path], default_model=MODEL)
    with pytest.raises(InputError, match=r"t\.parquet: is a Parquet table: pass --template"):
        validate([tmp_path / "t.parquet"], default_model=MODEL)
    with pytest.raises(InputError, match=r"no model: pass --model \(rows of a table carry no model\)"):
        validate([path], default_model=None, template="{{ text }}")
    with pytest.raises(InputError, match="--id-column id goes with a template"):
        validate([path], default_model=MODEL, id_column="id")
    with pytest.raises(InputError, match="a system template goes with a template"):
        validate([path], default_model=MODEL, system_template="x")


def test_jsonl_prompt_runs_never_import_jinja2_or_pyarrow(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "x"}\n')
    code = (
        "import sys; from batchgate import jobs; "
        f"r = jobs.validate([{str(path)!r}], default_model='m'); assert r.ok(); list(jobs.iter_records("
        f"[{str(path)!r}], default_model='m')); "
        "print(sorted(m for m in ('jinja2', 'pyarrow', 'batchgate.tables') if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"


# --- properties -------------------------------------------------------------------------------

CELL = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=6)
COLUMNS = ["a", "b", "id", "c d"]
TEMPLATES = st.sampled_from(
    [
        "{{ a }}",
        "{{ a }} {{ b }}",
        "{% if b is defined %}{{ b }}{% else %}none{% endif %}",
        "x{{ a | length }}",
        "{{ a ~ b }}",
        "{{ a / 2 }}",
        "{% for k in a %}{{ k }}{% endfor %}",
    ]
)
ID_COLUMN = st.sampled_from([None, "id"])


def _check(paths: list[Path], rows: int, template: str, id_column: str | None) -> None:
    """Every row is a record or a problem naming its row; iter_records agrees; never a crash."""
    report = validate(paths, default_model=MODEL, template=template, id_column=id_column, keep=10_000)
    file_level = [p for p in report.problems if p.line == 0]
    if file_level:
        assert report.records == 0 or len(paths) > 1
        return
    assert report.records + report.problem_count == rows, report.format()
    for p in report.problems:
        assert 1 <= p.line <= rows
    line_problems = [p for p in report.problems if not p.message.startswith("duplicate id")]
    if line_problems:
        with pytest.raises(InputError) as exc:
            list(iter_records(paths, default_model=MODEL, template=template, id_column=id_column))
        assert str(exc.value) == str(line_problems[0])
    else:
        records = list(iter_records(paths, default_model=MODEL, template=template, id_column=id_column))
        assert len(records) == report.records + report.problem_count
        assert all(messages(r)[-1]["content"].strip() for r in records)
        orjson.dumps([r.meta for r in records])


@PROPERTY
@given(
    st.lists(st.sampled_from(COLUMNS), min_size=1, max_size=4),
    st.lists(st.lists(CELL, max_size=5), max_size=6),
    TEMPLATES,
    ID_COLUMN,
)
def test_csv_rows_of_any_shape_never_crash(
    header: list[str], rows: list[list[str]], template: str, id_column: str | None
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = write_csv(Path(tmp) / "t.csv", header, *rows, quoting=csv.QUOTE_ALL)
        # pyarrow skips lines that are empty; a row of one empty cell is written as `""`, not empty.
        n = sum(1 for r in rows if r != [])
        _check([path], n, template, id_column)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | CELL,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(COLUMNS), inner, max_size=3),
    max_leaves=8,
)


@PROPERTY
@given(st.lists(JSON, min_size=1, max_size=6), TEMPLATES, ID_COLUMN)
def test_jsonl_table_lines_of_any_shape_never_crash(values: list[Any], template: str, id_column: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.jsonl"
        path.write_bytes(b"".join(orjson.dumps(v) + b"\n" for v in values))
        _check([path], len(values), template, id_column)


COLUMN_TYPES = {
    "int": st.none() | st.integers(-(2**63), 2**63 - 1),
    "str": st.none() | CELL,
    "float": st.none() | st.floats(allow_nan=True),
    "bool": st.none() | st.booleans(),
    "list": st.none() | st.lists(CELL, max_size=2),
}


@st.composite
def parquet_table(draw: st.DrawFn) -> tuple[pa.Table, int]:
    n = draw(st.integers(1, 6))
    names = draw(st.lists(st.sampled_from(COLUMNS), min_size=1, max_size=4, unique=True))
    columns = {}
    for name in names:
        kind = draw(st.sampled_from(sorted(COLUMN_TYPES)))
        columns[name] = draw(st.lists(COLUMN_TYPES[kind], min_size=n, max_size=n))
    return pa.table(columns), n


@PROPERTY
@given(parquet_table(), TEMPLATES, ID_COLUMN)
def test_parquet_rows_of_any_shape_never_crash(
    table: tuple[pa.Table, int], template: str, id_column: str | None
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.parquet"
        pq.write_table(table[0], path, row_group_size=2)
        _check([path], table[1], template, id_column)


def test_parquet_validation_memory_does_not_grow_with_the_rows(tmp_path: Path) -> None:
    """Python-side peak while validating 10x the rows grows by the 8-byte id hashes, not by the rows."""
    import tracemalloc

    peaks = {}
    for n in (5_000, 50_000):
        path = tmp_path / f"t{n}.parquet"
        table = pa.table({"id": pa.array(range(n), pa.int64()), "text": pa.array([f"question {i}" for i in range(n)])})
        pq.write_table(table, path, row_group_size=5_000)
        del table
        tracemalloc.start()
        try:
            report = validate([path], default_model=MODEL, template="Q: {{ text }}", id_column="id")
            peaks[n] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert report.ok() and report.records == n
    # 45k more rows: their hashes take 360 kB; rows kept in memory would take tens of MB.
    assert peaks[50_000] - peaks[5_000] < 3 * 8 * 45_000, peaks
