"""Report files other tools read: fixed Parquet types across runs, v1 and v2 ledgers, CSV without float
noise, a terminal table that fits, the default directory for several runs, no temporary files left behind.

Expected values are computed here from the rows as written (stdlib json, math.fsum), never with the
reports' own code; cross-run queries use DuckDB itself, as a user would.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from batchgate.cli import main
from batchgate.models import LEDGER_VERSION
from batchgate.reports import CACHE_DIR, REQUEST_COLUMNS, build_reports, csv_number, load_ledger

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
V2_COLUMNS = ("request_id", "sample", "fingerprint", "cost_status", "cached", "has_reasoning", "has_tool_calls")


def row(pid: str, **over: Any) -> dict[str, Any]:
    """A v2 ledger row (every new key present); ``over`` replaces fields."""
    ok = over.get("status", "ok") == "ok"
    base: dict[str, Any] = {
        "v": LEDGER_VERSION,
        "id": pid,
        "sample": 0,
        "job": "alpha",
        "run_id": "r1",
        "model": "org/m-small",
        "status": "ok",
        "content": "an answer",
        "finish_reason": "stop" if ok else None,
        "prompt_tokens": 100 if ok else None,
        "completion_tokens": 50 if ok else None,
        "total_tokens": 150 if ok else None,
        "base_cost_usd": 0.00133 if ok else 0.0,
        "platform_fee_usd": 0.00013256 if ok else 0.0,
        "total_cost_usd": 0.00146256 if ok else 0.0,
        "unconfirmed_completion_tokens": 0,
        "unconfirmed_cost_usd": 0.0,
        "attempts": 1,
        "retry_causes": [],
        "started_at": "2025-04-01T10:00:00.000Z",
        "ttft_s": 0.25 if ok else None,
        "latency_s": 1.5,
        "error": None
        if ok
        else {"type": "server_error", "status": 503, "message": "busy", "code": "x", "request_id": "e1"},
        "fingerprint": "0" * 32,
        "request_id": f"req-{pid}" if ok else None,
        "reasoning": None,
        "refusal": None,
        "tool_calls": None,
        "choices": None,
        "usage_raw": None,
        "cost_status": "confirmed",
        "warnings": None,
        "cached": False,
    }
    base.update(over)
    return base


def write(run_dir: Path, rows: list[dict[str, Any]]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "results.jsonl"
    with path.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


# -- Parquet types --------------------------------------------------------------------------------


def test_two_runs_parquet_one_with_failures_query_together_in_duckdb(tmp_path: Path) -> None:
    clean = [row(f"a{i}") for i in range(5)]
    faulty = [row("b0"), row("b1", status="failed", attempts=3, retry_causes=["rate_limited", "server_error"])]
    faulty.append(row("b2", status="failed", error=None))  # a failure without an error object
    write(tmp_path / "runs" / "clean", clean)
    write(tmp_path / "runs" / "faulty", faulty)
    build_reports([tmp_path / "runs" / "clean"], formats=("parquet",))
    build_reports([tmp_path / "runs" / "faulty"], formats=("parquet",))
    files = [tmp_path / "runs" / d / "requests.parquet" for d in ("clean", "faulty")]
    schemas = [pq.read_schema(f) for f in files]
    assert schemas[0].equals(schemas[1], check_metadata=False)  # same types whatever each run held
    assert str(schemas[0].field("error_type").type) == "string"  # all-null in the clean run, still a string
    assert set(V2_COLUMNS) <= set(schemas[0].names)
    con = duckdb.connect()
    listed = "[" + ", ".join(f"'{f}'" for f in files) + "]"
    got = con.execute(
        f"""SELECT count(*), count(error_type), sum(total_cost_usd), count(*) FILTER (WHERE status = 'failed'),
                   max(started_at), count(DISTINCT ledger)
            FROM read_parquet({listed})"""
    ).fetchone()
    assert got is not None
    rows, errors, cost, failed, latest, ledgers = got
    assert (rows, errors, failed, ledgers) == (8, 1, 2, 2)
    assert math.isclose(cost, math.fsum(r["total_cost_usd"] for r in clean + faulty), rel_tol=1e-12)
    assert latest == datetime(2025, 4, 1, 10, tzinfo=UTC)  # a timestamp, not a string


def test_v2_columns_reach_the_parquet_and_samples_are_separate_requests(tmp_path: Path) -> None:
    rows = [
        row("p", sample=0, reasoning="thinking…", request_id="r-0", fingerprint="a" * 32),
        row("p", sample=1, tool_calls=[{"index": 0, "id": "t", "type": "function", "function": {"name": "f"}}]),
        row("p", sample=1, run_id="r2", cost_status="derived", cached=True, cached_cost_usd=0.5, total_cost_usd=0.0),
        row("q", status="failed", cost_status="unconfirmed"),
    ]
    write(tmp_path / "run", rows)
    result = build_reports([tmp_path / "run"], formats=("parquet", "csv"))
    t = result.totals
    assert (t["requests"], t["rows"], t["ok"], t["failed"]) == (3, 4, 2, 1)  # (p, 0), (p, 1), (q, 0)
    table = pq.read_table(tmp_path / "run" / "requests.parquet").to_pylist()
    assert [r["sample"] for r in table] == [0, 1, 1, 0]
    assert [r["has_reasoning"] for r in table] == [True, False, False, False]
    assert [r["has_tool_calls"] for r in table] == [False, True, False, False]
    assert [r["cached"] for r in table] == [False, False, True, False]
    assert [r["cost_status"] for r in table] == ["confirmed", "confirmed", "derived", "unconfirmed"]
    assert table[0]["request_id"] == "r-0" and table[0]["fingerprint"] == "a" * 32
    assert table[3]["request_id"] == "e1"  # a failed row: the error's request id
    assert table[3]["error_code"] == "x"
    frame = load_ledger([tmp_path / "run" / "results.jsonl"])
    assert frame["latest"].tolist() == [True, False, True, True]
    assert "reasoning" not in frame.columns and "content" not in frame.columns  # texts stay in the ledger


def test_a_v1_ledger_still_reports_with_the_v2_columns_null(tmp_path: Path) -> None:
    run = tmp_path / "v1"
    shutil.copytree(FIXTURES / "ledger_v1", run)
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert all(r["v"] == 1 and "sample" not in r and "request_id" not in r for r in rows)  # the fixture is v1
    result = build_reports([run], formats=("csv", "parquet"))
    t = result.totals
    latest = {r["id"]: r for r in rows}
    assert t["rows"] == len(rows) and t["requests"] == len(latest)
    assert t["failed"] == sum(r["status"] == "failed" for r in latest.values())
    assert abs(t["total_cost_usd"] - math.fsum(r["total_cost_usd"] for r in rows)) <= 1e-15
    assert t["unconfirmed_estimated_usd"] > 0  # the v1 cut stream left unpriced is priced by the report
    table = pq.read_table(run / "requests.parquet")
    assert table.schema.names == list(REQUEST_COLUMNS)
    for name in ("request_id", "fingerprint", "cost_status", "cached"):
        assert table[name].null_count == len(rows), name
    assert set(table["sample"].to_pylist()) == {0}


# -- CSV and the terminal table -----------------------------------------------------------------------


def test_csv_costs_carry_no_float_noise_and_read_back_exactly_enough(tmp_path: Path) -> None:
    rows = [row(f"p{i}", total_cost_usd=c) for i, c in enumerate([0.1, 0.2, 0.00133, 0.00013256])]
    write(tmp_path / "run", rows)
    build_reports([tmp_path / "run"], by=("job",), formats=("csv",))
    text = (tmp_path / "run" / "summary.csv").read_text()
    assert "00000000" not in text and "99999999" not in text  # no 17th-digit noise anywhere
    cells = list(csv.DictReader(text.splitlines()))
    exact = math.fsum(r["total_cost_usd"] for r in rows)
    assert repr(math.fsum([0.1, 0.2])) == "0.30000000000000004"  # the test has teeth: repr prints noise
    assert cells[-1]["total_cost_usd"] == f"{exact:.15g}" == "0.30146256"
    assert abs(float(cells[-1]["total_cost_usd"]) - exact) <= 1e-15
    assert csv_number(0.0014625600000000001) == "0.00146256"
    assert csv_number(1e-9) == "1e-09" and csv_number(3.0) == "3.0" and csv_number(math.nan) == ""


@pytest.mark.parametrize("width", [60, 80, 120, 200])
def test_terminal_table_fits_the_width_and_keeps_names_whole_when_they_fit(tmp_path: Path, width: int) -> None:
    model = "Qwen/Qwen3-235B-A22B-Instruct-2507-FP8"
    write(tmp_path / "run", [row("a", model=model, job="nightly-summaries"), row("b", model="org/m")])
    result = build_reports([tmp_path / "run"], formats=("csv",), width=width)
    lines = result.table.splitlines()
    assert max(len(line) for line in lines) <= width
    if width >= 120:
        assert any(model in line for line in lines)  # room enough: the name is whole, org and all
    else:
        assert not any(model in line for line in lines)
    assert lines[-1].startswith("TOTAL")


def test_terminal_table_takes_the_terminal_width(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = "Qwen/Qwen3-235B-A22B-Instruct-2507-FP8"
    write(tmp_path / "run", [row("a", model=model, job="nightly-summaries")])
    monkeypatch.setenv("COLUMNS", "160")
    wide = build_reports([tmp_path / "run"], formats=("csv",)).table
    monkeypatch.setenv("COLUMNS", "80")
    narrow = build_reports([tmp_path / "run"], formats=("csv",)).table
    assert model in wide and max(map(len, narrow.splitlines())) <= 80


# -- several runs, the CLI ----------------------------------------------------------------------------


def test_report_over_a_parent_writes_to_all_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("night-1", "night-2", "night-3"):
        write(tmp_path / "reports" / name, [row(f"{name}-a", run_id=name), row(f"{name}-b", run_id=name)])
    monkeypatch.chdir(tmp_path)
    done = CliRunner().invoke(main, ["report", "reports/", "--format", "csv"])
    assert done.exit_code == 0, done.output
    assert "wrote reports/_all/summary.csv" in done.output
    cells = list(csv.DictReader((tmp_path / "reports" / "_all" / "summary.csv").read_text().splitlines()))
    assert cells[-1]["level"] == "total" and cells[-1]["requests"] == "6"
    again = CliRunner().invoke(main, ["report", "reports/", "--format", "csv"])  # _all/ holds no ledger
    assert again.exit_code == 0 and "requests" in again.output


def test_damaged_lines_are_named_on_stderr_and_the_report_still_written(tmp_path: Path) -> None:
    path = write(tmp_path / "run", [row("a")])
    with path.open("ab") as f:
        f.write(b"garbage\n")
    write(tmp_path / "run", [row("b")])
    done = CliRunner().invoke(main, ["report", str(tmp_path / "run"), "--format", "csv"])
    assert done.exit_code == 0
    assert f"{path}:2: skipped: not JSON" in done.stderr
    assert "1 unreadable ledger lines were skipped" in done.stdout


# -- temporary files ----------------------------------------------------------------------------------


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


def test_temporary_files_of_a_killed_report_are_cleaned_by_the_next(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write(run, [row("a")])
    pid = dead_pid()
    (run / f".summary.csv.{pid}.tmp").write_text("half a file")
    (run / f".report-{pid}.tmp").mkdir()
    (run / f".report-{pid}.tmp" / "requests.parquet").write_bytes(b"PAR1")
    (run / f".summary.csv.{os.getppid()}.tmp").write_text("a live process's file")  # not ours to remove
    build_reports([run], formats=("csv",))
    assert leftovers(run) == [f".summary.csv.{os.getppid()}.tmp"]


def test_sigterm_mid_report_leaves_nothing_behind(tmp_path: Path) -> None:
    run = tmp_path / "run"
    line = json.dumps(row("x")) + "\n"
    with run.mkdir() or (run / "results.jsonl").open("w") as f:
        for i in range(60_000):
            f.write(line.replace('"x"', f'"p{i}"', 1))
    child = subprocess.Popen(
        [sys.executable, "-m", "batchgate", "report", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 30
    scratch = run / f".report-{child.pid}.tmp"
    while not scratch.exists() and child.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=30)
    # 143: stopped mid-report; 0 or -SIGTERM: the report was done before the signal came.
    assert child.returncode in (128 + signal.SIGTERM, 0, -signal.SIGTERM)
    assert leftovers(run) == []
    assert "Traceback" not in err.decode()


# -- the cache beside the ledger ----------------------------------------------------------------------


def fresh_totals(run: Path, tmp_path: Path) -> dict[str, Any]:
    """The same ledger's totals computed from nothing (a copy without the cache)."""
    copy = tmp_path / f"fresh-{time.monotonic_ns()}"
    copy.mkdir()
    shutil.copy(run / "results.jsonl", copy / "results.jsonl")
    totals = dict(build_reports([copy], formats=("csv",)).totals)
    totals.pop("wall_s")
    return totals


def cached_parts(run: Path) -> list[tuple[int, int]]:
    index = json.loads((run / CACHE_DIR / "index.json").read_text())
    return [(p["start"], p["end"]) for p in index["parts"]]


def test_a_report_after_a_resume_reads_only_the_appended_bytes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    path = write(run, [row(f"p{i}") for i in range(20)] + [row("x", status="failed")])
    first_size = path.stat().st_size
    build_reports([run], formats=("csv",))
    assert cached_parts(run) == [(0, first_size)]
    write(run, [row("x", run_id="r2", started_at="2025-04-02T10:00:00Z"), row("y", run_id="r2")])  # a resume
    with path.open("ab") as f:
        f.write(b"garbage\n")  # line 24
    write(run, [row("z", run_id="r2")])
    result = build_reports([run], formats=("csv", "parquet"))
    assert cached_parts(run) == [(0, first_size), (first_size, path.stat().st_size)]  # one new part
    t = result.totals
    assert (t["requests"], t["ok"], t["failed"], t["rows"]) == (23, 23, 0, 24)  # x's retry won
    assert [(s.line, s.reason) for s in result.data.skipped] == [(24, "not JSON")]  # the ledger's line number
    want = fresh_totals(run, tmp_path)
    assert {k: v for k, v in t.items() if k != "wall_s"} == want
    assert pq.read_table(run / "requests.parquet").num_rows == 24
    schema = pq.read_schema(run / "requests.parquet")  # rewritten from two parts: still the one schema
    assert schema.names == list(REQUEST_COLUMNS) and all(field.nullable for field in schema)
    again = build_reports([run], formats=("csv",))  # nothing appended: nothing parsed
    assert cached_parts(run) == [(0, first_size), (first_size, path.stat().st_size)]
    assert again.totals["total_cost_usd"] == t["total_cost_usd"]


def test_requests_of_several_parts_are_their_row_groups_joined_not_rewritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After appends, requests.parquet is the parts' row groups joined byte for byte: DuckDB, pyarrow and
    pandas read the same rows in ledger order with the one nullable schema, and nothing re-encodes them."""
    from batchgate.reports import summary

    run = tmp_path / "run"
    path = write(run, [row(f"p{i}", retry_causes=["rate_limited"] * (i % 3)) for i in range(30)])
    build_reports([run], formats=("csv",))
    for n in range(3):  # three resumes: four parts
        write(run, [row(f"p{i}", run_id=f"r{n}", started_at=f"2025-04-0{n + 2}T10:00:00Z") for i in range(n, 9, 2)])
        build_reports([run], formats=("csv",))

    def no_rewrite(*args: Any) -> None:
        raise AssertionError("requests.parquet re-encoded")

    monkeypatch.setattr(summary, "write_requests", no_rewrite)
    monkeypatch.setattr("batchgate.reports.build.write_requests", no_rewrite)
    build_reports([run], formats=("parquet",))
    parts = sorted((run / CACHE_DIR).glob("part-*.parquet"))
    assert len(parts) == 4
    joined = run / "requests.parquet"
    files = [str(p) for p in parts]
    con = duckdb.connect()
    got = con.execute("SELECT * FROM read_parquet(?)", [str(joined)]).fetchall()
    assert got == con.execute("SELECT * FROM read_parquet(?)", [files]).fetchall()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r[list(REQUEST_COLUMNS).index("id")] for r in got] == [r["id"] for r in lines]  # ledger order
    table = pq.read_table(joined)
    assert table.num_rows == len(lines) and pq.ParquetFile(joined).metadata.num_row_groups == 4
    assert table.schema.names == list(REQUEST_COLUMNS) and all(field.nullable for field in table.schema)
    assert table.to_pandas()["retry_causes"].map(len).tolist() == [len(r["retry_causes"]) for r in lines]


@pytest.mark.parametrize("damage", ["garbage", "a row short"])
def test_a_joined_file_that_does_not_read_back_is_written_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    from batchgate.reports import build, load

    run = tmp_path / "run"
    write(run, [row(f"p{i}") for i in range(10)])
    build_reports([run], formats=("csv",))
    write(run, [row("p1", run_id="r2"), row("q", run_id="r2")])

    def broken(parts: list[Path], out: Path) -> bool:
        if damage == "garbage":
            out.write_bytes(b"PAR1 not a footer PAR1")
        else:
            load.join_parts(parts[:1], out)  # a well-formed file that lacks the last part's rows
        return True

    monkeypatch.setattr(build, "join_parts", broken)
    build_reports([run], formats=("parquet",))
    got = duckdb.connect().execute(f"SELECT id FROM '{run / 'requests.parquet'}'").fetchall()
    assert [g[0] for g in got] == [f"p{i}" for i in range(10)] + ["p1", "q"]  # DuckDB wrote it instead


def test_a_ledger_rewritten_in_place_is_read_again_from_the_start(tmp_path: Path) -> None:
    run = tmp_path / "run"
    path = write(run, [row(f"p{i}") for i in range(5)])
    build_reports([run], formats=("csv",))
    text = path.read_text().replace('"total_cost_usd": 0.00146256', '"total_cost_usd": 0.00246256')
    with path.open("r+") as f:  # same file, same size, other bytes: the cached part no longer describes it
        f.write(text)
    result = build_reports([run], formats=("csv",))
    assert result.totals["total_cost_usd"] == pytest.approx(5 * 0.00246256, rel=1e-12)
    assert cached_parts(run) == [(0, path.stat().st_size)]


def test_a_torn_tail_is_read_once_its_line_is_whole(tmp_path: Path) -> None:
    run = tmp_path / "run"
    path = write(run, [row("a")])
    whole = json.dumps(row("b")) + "\n"
    with path.open("a") as f:
        f.write(whole[:30])
    first = build_reports([run], formats=("csv",))
    assert first.totals["rows"] == 1 and [s.line for s in first.data.skipped] == [2]
    with path.open("a") as f:
        f.write(whole[30:])
    second = build_reports([run], formats=("csv",))
    assert second.totals["rows"] == 2 and second.data.skipped == []
    assert len(cached_parts(run)) == 2


# -- the requests as a hive dataset partitioned by day ----------------------------------------------


def three_days(tmp_path: Path) -> tuple[Path, list[dict[str, Any]]]:
    """A ledger over three UTC days, a job named like a number, a row with an unreadable start."""
    rows = [
        row("d1", started_at="2025-04-01T23:59:59.000Z", job="2025"),
        row("d2", started_at="2025-04-02T00:00:01.000Z", reasoning="thought", total_cost_usd=0.5),
        row("d3", started_at="2025-04-03T12:00:00.000Z", status="failed", job="x/y z"),
        row("d4", started_at="not a time"),
    ]
    write(tmp_path / "run", rows)
    return tmp_path / "run", rows


def test_partitioned_by_day_reads_back_in_duckdb_pandas_and_pyarrow_with_the_fixed_types(tmp_path: Path) -> None:
    import pandas as pd
    import pyarrow.dataset as ds

    run, rows = three_days(tmp_path)
    result = build_reports([run], partition_by_day=True)
    dataset = run / "requests"
    assert dataset in result.files and not (run / "requests.parquet").exists()
    days = sorted(p.name for p in dataset.iterdir())
    assert days == ["day=2025-04-01", "day=2025-04-02", "day=2025-04-03", "day=unknown"]

    con = duckdb.connect()
    got = con.execute(
        f"""SELECT id, job, day, started_at, total_cost_usd, has_reasoning
            FROM read_parquet('{dataset}/**/*.parquet', hive_partitioning = true) ORDER BY id"""
    ).fetchall()
    assert [g[0] for g in got] == ["d1", "d2", "d3", "d4"]
    assert got[0][1] == "2025" and got[2][1] == "x/y z"  # a job like a number stays a string
    assert str(got[0][2]) == "2025-04-01" and got[3][2] == "unknown"
    assert got[1][3] == datetime(2025, 4, 2, 0, 0, 1, tzinfo=UTC) and got[3][3] is None  # any session zone
    assert got[1][4] == 0.5 and got[1][5] is True

    frame = pd.read_parquet(dataset)  # pandas reads the directory as it is
    assert len(frame) == 4 and set(frame["day"].astype(str)) == {"2025-04-01", "2025-04-02", "2025-04-03", "unknown"}
    assert frame["job"].tolist().count("2025") == 1 and str(frame["started_at"].dtype) == "datetime64[us, UTC]"
    assert math.isclose(frame["total_cost_usd"].sum(), math.fsum(r["total_cost_usd"] for r in rows), rel_tol=1e-12)
    schemas = {str(pq.read_schema(p)) for p in dataset.rglob("*.parquet")}
    assert len(schemas) == 1  # every file the same types, whatever its rows held
    table = ds.dataset(dataset, partitioning="hive").to_table(filter=ds.field("day") == "2025-04-02")
    assert table.column("id").to_pylist() == ["d2"]  # partition pruning by day


def test_each_layout_replaces_the_other_and_a_foreign_directory_stays(tmp_path: Path) -> None:
    run, _ = three_days(tmp_path)
    build_reports([run], formats=("parquet",))
    assert (run / "requests.parquet").is_file()
    build_reports([run], formats=("parquet",), partition_by_day=True)
    assert not (run / "requests.parquet").exists() and (run / "requests" / "day=unknown").is_dir()
    build_reports([run], formats=("parquet",), partition_by_day=True)  # again: the old dataset is replaced
    assert len(list((run / "requests").rglob("*.parquet"))) == 4 and not leftovers(run)
    build_reports([run], formats=("parquet",))
    assert (run / "requests.parquet").is_file() and not (run / "requests").exists()
    (run / "requests").mkdir()
    (run / "requests" / "mine.txt").write_text("not a report")
    build_reports([run], formats=("parquet",))
    assert (run / "requests" / "mine.txt").read_text() == "not a report"


def test_report_command_partition_flag(tmp_path: Path) -> None:
    run, _ = three_days(tmp_path)
    res = CliRunner().invoke(main, ["report", str(run), "--partition-by-day", "--format", "parquet"])
    assert res.exit_code == 0, res.output
    assert f"wrote {run / 'requests'}" in res.output and (run / "requests" / "day=2025-04-03").is_dir()


def test_a_report_imports_neither_pandas_nor_matplotlib(tmp_path: Path) -> None:
    """They cost ~0.5 s of start-up that every end-of-run report would pay for a few aggregates."""
    write(tmp_path / "run", [row("a"), row("a", total_cost_usd=0.2), row("b", status="failed")])  # a superseded row
    script = (
        "import sys\n"
        "from batchgate.reports import build_reports\n"
        f"build_reports([{str(tmp_path / 'run')!r}])\n"
        "print(sorted(m for m in ('pandas', 'matplotlib') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    assert pq.read_schema(tmp_path / "run" / "summary.parquet").field("requests").nullable


def test_a_first_run_and_its_report_never_import_numpy(tmp_path: Path) -> None:
    """numpy (~0.07 s) is for big resume indexes and ledgers; a first run over a small file needs none."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"q {i}"}) + "\n" for i in range(20)))
    args = ["run", str(prompts), "--simulate", "--model", "sim-model", "-q", "--out", str(tmp_path / "o")]
    script = (
        "import sys\n"
        "from batchgate.cli import main\n"
        "try:\n"
        f"    main({args!r})\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "print(sorted(m for m in ('numpy', 'pandas', 'matplotlib') if m in sys.modules))\n"
    )
    env = dict(os.environ, GONKAGATE_API_KEY="gp-test", BATCHGATE_KEY_LIMITS="off")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr
    assert (tmp_path / "o" / "report.html").exists() and (tmp_path / "o" / "results.index").exists()
    ledger = (tmp_path / "o" / "results.jsonl").read_text().splitlines()
    assert len(ledger) == 20


def test_a_report_with_nothing_new_leaves_requests_parquet_as_it_is(tmp_path: Path) -> None:
    """A cron rerun with nothing to do must not copy and fsync a multi-GB requests.parquet again."""
    run = tmp_path / "run"
    write(run, [row(f"p{i}") for i in range(10)])
    build_reports([run], formats=("parquet",))
    target = run / "requests.parquet"
    first = target.stat()
    again = build_reports([run], formats=("parquet",))
    assert target in again.files
    second = target.stat()
    assert (second.st_ino, second.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # not written again
    os.utime(target, ns=(first.st_atime_ns, first.st_mtime_ns + 1_000_000_000))  # touched by someone
    build_reports([run], formats=("parquet",))
    assert target.stat().st_ino != first.st_ino  # written again
    touched = target.stat()
    write(run, [row("q", run_id="r2")])  # a resume appended a row: a new part
    build_reports([run], formats=("parquet",))
    assert target.stat().st_ino != touched.st_ino and pq.read_table(target).num_rows == 11
    assert (run / "summary.parquet").exists()


def test_the_day_partitioned_layout_still_writes_the_summary_parquet(tmp_path: Path) -> None:
    run, _ = three_days(tmp_path)
    result = build_reports([run], formats=("parquet",), partition_by_day=True)
    assert run / "summary.parquet" in result.files and (run / "summary.parquet").exists()


def test_a_full_disk_under_the_day_partitions_is_a_clear_error_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import pyarrow.dataset as ds

    run, _ = three_days(tmp_path)

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ds, "write_dataset", full)
    res = CliRunner().invoke(main, ["report", str(run), "--partition-by-day", "--format", "parquet"])
    assert res.exit_code == 2 and f"{run / 'requests'}: cannot write the report: No space left" in res.output
    assert not (run / "requests").exists() and not leftovers(run)
