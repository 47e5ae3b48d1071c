"""Cost reports over synthetic ledgers: every summary column against an independent computation.

The expected values here are computed in plain Python (``math.fsum``, sorted lists) from the rows
the test wrote, never with ``batchgate.reports``.  Percentiles use the same definition the reports
document: linear interpolation between order statistics (numpy's default, Hyndman-Fan type 7).
"""

from __future__ import annotations

import html
import json
import math
import os
import random
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from batchgate import reports
from batchgate.errors import InputError, LedgerError
from batchgate.models import LEDGER_FIELDS, LEDGER_VERSION
from batchgate.reports import ALL, SUMMARY_METRICS, build_reports, find_ledgers, load_ledger

# USD per prompt token and per completion token; the fee is 10% on top, as GonkaGate bills it.
PRICES = {"m-small": (1.0e-7, 3.0e-7), "m-large": (4.0e-7, 1.2e-6), "m-odd$": (2.0e-7, 5.0e-7)}
FEE = 0.1
#: requests.parquet's Arrow types: fixed, whatever the run held.
ARROW_TYPES = {
    "ledger": "string",
    "v": "int64",
    "id": "string",
    "sample": "int64",
    "job": "string",
    "run_id": "string",
    "model": "string",
    "status": "string",
    "finish_reason": "string",
    "prompt_tokens": "int64",
    "completion_tokens": "int64",
    "total_tokens": "int64",
    "base_cost_usd": "double",
    "platform_fee_usd": "double",
    "total_cost_usd": "double",
    "unconfirmed_completion_tokens": "int64",
    "unconfirmed_cost_usd": "double",
    "attempts": "int64",
    "retries": "int64",
    "retry_causes": "list<element: string>",
    "started_at": "timestamp[us, tz=UTC]",
    "finished_at": "timestamp[us, tz=UTC]",
    "day": "date32[day]",
    "ttft_s": "double",
    "latency_s": "double",
    "error_type": "string",
    "error_status": "int64",
    "error_message": "string",
    "error_code": "string",
    "request_id": "string",
    "fingerprint": "string",
    "cost_status": "string",
    "cached": "bool",
    "cached_cost_usd": "double",
    "has_reasoning": "bool",
    "has_tool_calls": "bool",
}
INT_METRICS = {
    "requests",
    "ok",
    "failed",
    "rows",
    "attempts",
    "retries",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "unconfirmed_completion_tokens",
    "unconfirmed_unpriced_tokens",
}


# -- building ledgers ------------------------------------------------------------------------------


def make_row(
    pid: str,
    *,
    job: str = "alpha",
    model: str = "m-small",
    run_id: str = "r1",
    status: str = "ok",
    prompt: int = 100,
    completion: int = 50,
    started: str = "2025-03-01T10:00:00.000Z",
    latency: float | None = 1.0,
    ttft: float | None = 0.2,
    attempts: int | None = 1,
    causes: Sequence[str] = (),
    cut: int = 0,
    cut_cost: float | None = 0.0,
    null_costs: bool = False,
) -> dict[str, Any]:
    """A full ledger row; failed rows carry no tokens and no confirmed cost, as the runner writes them."""
    ok = status == "ok"
    a, b = PRICES.get(model, (1e-7, 1e-7))
    base = (prompt * a + completion * b) if ok else 0.0
    row: dict[str, Any] = {
        "v": LEDGER_VERSION,
        "id": pid,
        "job": job,
        "run_id": run_id,
        "model": model,
        "status": status,
        "content": f"answer to {pid}" if ok else "",
        "finish_reason": "stop" if ok else None,
        "prompt_tokens": prompt if ok else None,
        "completion_tokens": completion if ok else None,
        "total_tokens": prompt + completion if ok else None,
        "base_cost_usd": None if null_costs else base,
        "platform_fee_usd": None if null_costs else base * FEE,
        "total_cost_usd": None if null_costs else base * (1 + FEE),
        "unconfirmed_completion_tokens": cut,
        "unconfirmed_cost_usd": cut_cost,
        "attempts": attempts,
        "retry_causes": list(causes),
        "started_at": started,
        "ttft_s": ttft if ok else None,
        "latency_s": latency,
        "error": None if ok else {"type": (list(causes) or ["server_error"])[-1], "status": 503, "message": "x"},
    }
    assert tuple(row) == LEDGER_FIELDS[: len(row)]  # the helper follows the (v1) schema, in order
    return row


def write_ledger(run_dir: Path, rows: Iterable[dict[str, Any]], tail: bytes = b"") -> Path:
    """Append rows as JSON lines (stdlib json, not the reports' reader), then ``tail`` bytes verbatim."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "results.jsonl"
    with path.open("ab") as f:
        for row in rows:
            f.write(json.dumps(row).encode() + b"\n")
        f.write(tail)
    return path


def random_rows(
    rnd: random.Random, n: int, *, prefix: str, run_id: str, day: str, jobs: Sequence[str]
) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        failed = rnd.random() < 0.1
        retries = rnd.choice([0, 0, 0, 1, 2])
        causes = [rnd.choice(["rate_limited", "server_error", "timeout"]) for _ in range(retries + failed)]
        rows.append(
            make_row(
                f"{prefix}{i}",
                job=rnd.choice(jobs),
                model=rnd.choice(["m-small", "m-large"]),
                run_id=run_id,
                status="failed" if failed else "ok",
                prompt=rnd.randint(5, 900),
                completion=rnd.randint(1, 700),
                started=f"{day}T{rnd.randint(0, 23):02d}:{rnd.randint(0, 59):02d}:{i % 60:02d}.{i % 1000:03d}Z",
                latency=round(rnd.lognormvariate(0.3, 0.7), 6),
                ttft=round(rnd.lognormvariate(-1.5, 0.4), 6),
                attempts=1 + retries + failed,
                causes=causes,
            )
        )
    return rows


@pytest.fixture
def fleet(tmp_path: Path) -> dict[Path, list[dict[str, Any]]]:
    """Two run directories over two days: resume duplicates, failures, nulls, cut streams, a torn line."""
    rnd = random.Random(20250301)
    root = tmp_path / "runs"
    first, second = root / "2025-03-01", root / "nested" / "2025-03-02"
    run1 = random_rows(rnd, 120, prefix="a", run_id="r1", day="2025-03-01", jobs=["alpha", "beta"])
    run1 += [
        make_row("x1", status="failed", causes=["server_error", "server_error"], attempts=2, latency=3.5),
        make_row("x2", status="failed", causes=["rate_limited"], attempts=1, latency=None),
        # A cut stream the runner could not price yet: the report prices it from m-small's rows.
        make_row("x3", cut=40, cut_cost=None, attempts=2, causes=["stream_interrupted"]),
        make_row("x4", cut=10, cut_cost=0.00001, attempts=2, causes=["stream_interrupted"]),
        make_row("x5", ttft=None),  # [DONE] without a first token time
        make_row("x6", started="2025-03-02T00:30:00+02:00"),  # an offset: still 2025-03-01 in UTC
        make_row("x7", attempts=None),  # unknown attempts: no retries
    ]
    # Resume on the next day in the same directory: x1 now succeeds, x2 fails again.
    run2 = [
        make_row("x1", run_id="r2", started="2025-03-02T08:00:00.000+00:00", latency=0.8, attempts=1),
        make_row("x2", run_id="r2", status="failed", started="2025-03-02T08:00:01Z", causes=["timeout"]),
    ]
    run3 = random_rows(rnd, 80, prefix="b", run_id="r3", day="2025-03-02", jobs=["beta"])
    # Failed rows whose costs were written as null; x1 also exists here: a different directory, a different request.
    run3 += [make_row("x1", job="beta", run_id="r3", status="failed", started="2025-03-02T09:00:00Z", null_costs=True)]
    write_ledger(first, run1)
    write_ledger(first, run2, tail=b'{"v": 1, "id": "torn", "job": "alpha", "total_cost_usd": 99')
    write_ledger(second, run3)
    return {first: run1 + run2, second: run3}


# -- the independent computation -------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy 'linear', Hyndman-Fan type 7)."""
    xs = sorted(values)
    if not xs:
        return math.nan
    h = (len(xs) - 1) * q / 100
    lo = math.floor(h)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (h - lo) * (xs[hi] - xs[lo])


def utc_day(row: dict[str, Any]) -> str:
    return datetime.fromisoformat(row["started_at"]).astimezone(UTC).date().isoformat()


def completion_price(model: str) -> float:
    return PRICES[model][1] * (1 + FEE)


def expected(ledgers: dict[Path, list[dict[str, Any]]], by: Sequence[str]) -> dict[tuple[str, ...], dict[str, Any]]:
    """Every summary metric per group, from the rows as written."""
    latest: dict[tuple[Path, str], int] = {}
    flat = [(d, r) for d, rows in ledgers.items() for r in rows]
    for n, (d, r) in enumerate(flat):
        latest[(d, r["id"])] = n
    latest_rows = set(latest.values())

    def key(row: dict[str, Any]) -> tuple[str, ...]:
        return tuple(utc_day(row) if k == "day" else str(row[k]) for k in by)

    groups: dict[tuple[str, ...], list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for n, (_, r) in enumerate(flat):
        groups[key(r)].append((n, r))

    out = {}
    for k, members in groups.items():
        rows = [r for _, r in members]
        last = [r for n, r in members if n in latest_rows]
        known = [r["unconfirmed_cost_usd"] or 0.0 for r in rows]
        estimates = [
            completion_price(r["model"]) * r["unconfirmed_completion_tokens"]
            for r in rows
            if r["unconfirmed_cost_usd"] is None and r["unconfirmed_completion_tokens"]
        ]
        total_cost = math.fsum(r["total_cost_usd"] or 0.0 for r in rows)
        total_tokens = sum(r["total_tokens"] or 0 for r in rows)
        requests = len(last)
        lat = [r["latency_s"] for r in rows if r["latency_s"] is not None]
        ttft = [r["ttft_s"] for r in rows if r["ttft_s"] is not None]
        tps = [
            r for r in rows if r["status"] == "ok" and r["completion_tokens"] is not None and (r["latency_s"] or 0) > 0
        ]
        tps_seconds = math.fsum(r["latency_s"] for r in tps)
        m = {
            "requests": requests,
            "ok": sum(r["status"] == "ok" for r in last),
            "failed": sum(r["status"] == "failed" for r in last),
            "rows": len(rows),
            "attempts": sum(r["attempts"] or 0 for r in rows),
            "retries": sum(max((r["attempts"] or 0) - 1, 0) for r in rows),
            "prompt_tokens": sum(r["prompt_tokens"] or 0 for r in rows),
            "completion_tokens": sum(r["completion_tokens"] or 0 for r in rows),
            "total_tokens": total_tokens,
            "base_cost_usd": math.fsum(r["base_cost_usd"] or 0.0 for r in rows),
            "platform_fee_usd": math.fsum(r["platform_fee_usd"] or 0.0 for r in rows),
            "total_cost_usd": total_cost,
            "unconfirmed_cost_usd": math.fsum(known + estimates),
            "unconfirmed_estimated_usd": math.fsum(estimates),
            "unconfirmed_completion_tokens": sum(r["unconfirmed_completion_tokens"] for r in rows),
            "unconfirmed_unpriced_tokens": 0,
            "cost_per_1k_requests_usd": total_cost / requests * 1000 if requests else math.nan,
            "cost_per_1m_tokens_usd": total_cost / total_tokens * 1e6 if total_tokens else math.nan,
            "tokens_per_s": sum(r["completion_tokens"] for r in tps) / tps_seconds if tps_seconds else math.nan,
        }
        for q in (50, 95, 99):
            m[f"latency_p{q}_s"] = percentile(lat, q)
            m[f"ttft_p{q}_s"] = percentile(ttft, q)
        out[k] = m
    return out


def assert_rows_match(summary: pd.DataFrame, level: str, keys: Sequence[str], want: dict[tuple[str, ...], Any]) -> None:
    rows = summary[summary["level"] == level]
    got = {tuple(str(r[k]) for k in keys): r for _, r in rows.iterrows()}
    assert set(got) == set(want)
    for k, metrics in want.items():
        for name in SUMMARY_METRICS:
            value, target = got[k][name], metrics[name]
            if name in INT_METRICS:
                assert value == target, (level, k, name)
            else:
                assert value == pytest.approx(target, rel=1e-9, abs=1e-15, nan_ok=True), (level, k, name)


def read_summary(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False, na_values=[""])


# -- summary contents ------------------------------------------------------------------------------


@pytest.mark.parametrize("by", [("job", "model"), ("model",), ("day",), ("status",), ("job", "model", "day", "status")])
def test_every_summary_column_matches_an_independent_computation(
    fleet: dict[Path, list[dict[str, Any]]], tmp_path: Path, by: tuple[str, ...]
) -> None:
    out = tmp_path / "out"
    result = build_reports([tmp_path / "runs"], out, by=by, formats=("csv", "parquet"))
    summary = read_summary(out / "summary.csv")
    assert list(summary.columns[summary.columns.get_loc("requests") :]) == list(SUMMARY_METRICS)
    assert_rows_match(summary, "group", by, expected(fleet, by))
    assert_rows_match(summary, "total", [], expected(fleet, []))
    if "day" not in by:  # the data spans two UTC days: per-day rows
        assert_rows_match(summary, "day", ["day"], expected(fleet, ["day"]))
        assert set(summary.loc[summary["level"] == "day", "day"]) == {"2025-03-01", "2025-03-02"}
    else:
        assert not (summary["level"] == "day").any()
    # The Parquet summary holds the same numbers as the CSV.
    parquet = pd.read_parquet(out / "summary.parquet")
    pd.testing.assert_frame_equal(parquet.reset_index(drop=True), summary, check_dtype=False, atol=0, rtol=1e-14)
    total = expected(fleet, [])[()]
    assert result.totals["total_cost_usd"] == pytest.approx(total["total_cost_usd"], abs=1e-12)
    assert result.totals["requests"] == total["requests"]


def test_group_and_day_rows_add_up_to_the_totals(fleet: dict[Path, list[dict[str, Any]]], tmp_path: Path) -> None:
    build_reports([tmp_path / "runs"], tmp_path / "out", by=("model",), formats=("csv",))
    summary = read_summary(tmp_path / "out" / "summary.csv")
    total = summary[summary["level"] == "total"].iloc[0]
    for level in ("group", "day"):
        part = summary[summary["level"] == level]
        assert len(part) == 2
        for name in ("requests", "ok", "failed", "rows", "attempts", "retries", "total_tokens"):
            assert part[name].sum() == total[name], (level, name)
        for name in ("base_cost_usd", "platform_fee_usd", "total_cost_usd", "unconfirmed_cost_usd"):
            assert math.fsum(part[name]) == pytest.approx(total[name], abs=1e-12), (level, name)
    assert (summary.loc[summary["level"] == "total", ["model", "day"]] == ALL).all(axis=None)


def test_resume_counts_the_latest_row_but_every_rows_spend(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_ledger(
        run,
        [
            make_row("p1", status="failed", attempts=3, causes=["rate_limited"] * 3),
            make_row("p1", run_id="r2", prompt=10, completion=10, attempts=2, causes=["timeout"]),
            make_row("p2", prompt=1000, completion=1000),
            make_row("p2", run_id="r2", status="failed"),  # a later failure wins the count
        ],
    )
    result = build_reports([run], formats=("csv",))
    t = result.totals
    assert (t["requests"], t["ok"], t["failed"], t["rows"]) == (2, 1, 1, 4)
    assert (t["attempts"], t["retries"]) == (7, 3)
    a, b = PRICES["m-small"]
    spent = [(10 * a + 10 * b) * (1 + FEE), (1000 * a + 1000 * b) * (1 + FEE)]  # failed rows cost 0
    assert t["total_cost_usd"] == pytest.approx(math.fsum(spent), rel=1e-12)
    frame = load_ledger([run / "results.jsonl"])
    assert frame["latest"].tolist() == [False, True, False, True]
    assert t["runs"] == 2


def test_total_cost_is_exact_over_many_tiny_floats(tmp_path: Path) -> None:
    # One big bill then 40,000 tiny ones: a left-to-right float sum loses every tiny one.
    costs = [1_000_000.0] + [1.23e-11 + i * 1e-16 for i in range(40_000)]
    rows = (
        {"v": 1, "id": f"p{i}", "job": "j", "model": f"m{i % 3}", "status": "ok", "total_cost_usd": c, "attempts": 1}
        for i, c in enumerate(costs)
    )
    write_ledger(tmp_path / "run", rows)
    naive = 0.0
    for c in costs:
        naive += c
    exact = math.fsum(costs)
    assert abs(naive - exact) > 1e-7  # the test has teeth
    result = build_reports([tmp_path / "run"], formats=("csv",))
    assert abs(result.totals["total_cost_usd"] - exact) <= 1e-9
    summary = read_summary(tmp_path / "run" / "summary.csv")
    groups = summary[summary["level"] == "group"]
    assert abs(math.fsum(groups["total_cost_usd"]) - exact) <= 1e-9


# -- unconfirmed cost ------------------------------------------------------------------------------


def test_unpriced_cut_stream_is_priced_by_regression_and_flagged(
    fleet: dict[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    result = build_reports([tmp_path / "runs"], tmp_path / "out", formats=("csv",))
    estimate = completion_price("m-small") * 40  # x3: 40 cut tokens on m-small
    assert result.totals["unconfirmed_estimated_usd"] == pytest.approx(estimate, rel=1e-9)
    assert result.totals["unconfirmed_cost_usd"] == pytest.approx(estimate + 0.00001, rel=1e-9)
    assert result.totals["unconfirmed_unpriced_tokens"] == 0
    # Unconfirmed never leaks into confirmed cost.
    confirmed = math.fsum(r["total_cost_usd"] or 0.0 for rows in fleet.values() for r in rows)
    assert result.totals["total_cost_usd"] == pytest.approx(confirmed, abs=1e-12)
    assert "estimated" in result.table
    frame = load_ledger(find_ledgers([tmp_path / "runs"]))
    row = frame[frame["id"] == "x3"].iloc[0]
    assert pd.isna(row["unconfirmed_cost_usd"])  # the ledger's value is kept as written
    assert row["unconfirmed_estimate_usd"] == pytest.approx(estimate, rel=1e-9)


def test_collinear_rows_fall_back_to_the_ratio_of_sums(tmp_path: Path) -> None:
    # Every answer is exactly twice its prompt: prompt and completion prices cannot be told apart.
    rows = [make_row(f"p{i}", prompt=10 * i, completion=20 * i) for i in range(1, 6)]
    rows.append(make_row("cut", status="failed", cut=100, cut_cost=None))
    write_ledger(tmp_path / "run", rows)
    ratio = math.fsum(r["total_cost_usd"] for r in rows[:5]) / sum(r["completion_tokens"] for r in rows[:5])
    result = build_reports([tmp_path / "run"], formats=("csv",))
    assert result.totals["unconfirmed_estimated_usd"] == pytest.approx(ratio * 100, rel=1e-12)


def test_model_without_confirmed_rows_stays_unpriced(tmp_path: Path) -> None:
    write_ledger(
        tmp_path / "run",
        [make_row("a"), make_row("b", model="m-new", status="failed", cut=77, cut_cost=None)],
    )
    result = build_reports([tmp_path / "run"], formats=("csv", "html"))
    assert result.totals["unconfirmed_unpriced_tokens"] == 77
    assert result.totals["unconfirmed_cost_usd"] == 0.0
    assert "77 unconfirmed tokens have no learnt price" in result.table
    assert "77 unconfirmed tokens belong to models with no confirmed" in (tmp_path / "run" / "report.html").read_text()


# -- reading ledgers -------------------------------------------------------------------------------


def test_torn_last_line_is_skipped_and_named_but_a_complete_unterminated_row_counts(tmp_path: Path) -> None:
    torn = write_ledger(tmp_path / "torn", [make_row("a"), make_row("b")], tail=b'{"v": 1, "id": "c", "sta')
    whole = write_ledger(tmp_path / "whole", [make_row("a")], tail=json.dumps(make_row("b")).encode())
    assert load_ledger([torn])["id"].tolist() == ["a", "b"]
    assert load_ledger([whole])["id"].tolist() == ["a", "b"]
    result = build_reports([tmp_path / "torn"], formats=("csv",))
    assert result.totals["rows"] == 2
    assert result.totals["skipped_lines"] == 1
    assert [(s.ledger, s.line) for s in result.data.skipped] == [(torn, 3)]
    assert "torn last line" in result.data.skipped[0].reason
    assert f"{torn}:3" in result.table
    assert build_reports([tmp_path / "whole"], formats=("csv",)).totals["skipped_lines"] == 0


def test_damaged_lines_are_skipped_counted_and_named_by_line(tmp_path: Path) -> None:
    path = write_ledger(tmp_path / "run", [make_row("a")])
    with path.open("ab") as f:
        f.write(b'{"v": 1, "id": "torn-then-resumed"\n[1, 2]\n\n')  # lines 2, 3 and a blank line 4
        f.write(b"\x00\x00\x00\x00\n")  # 5: NUL bytes (a crash on some file systems)
        f.write(json.dumps(make_row("x") | {"id": 17}).encode() + b"\n")  # 6: an id that is not a string
        f.write(json.dumps(make_row("y") | {"attempts": "three"}).encode() + b"\n")  # 7: a wrongly typed field
        f.write(b'{"id": "nul\x00inside"}\n')  # 8: a NUL byte inside a string
    write_ledger(tmp_path / "run", [make_row("b")])
    result = build_reports([tmp_path / "run"], formats=("csv",))
    assert result.totals["rows"] == 2
    assert result.totals["skipped_lines"] == 6
    assert [s.line for s in result.data.skipped] == [2, 3, 5, 6, 7, 8]
    assert "id is not a string" in result.data.skipped[3].reason
    assert "6 unreadable ledger lines were skipped" in result.table
    assert load_ledger([path])["id"].tolist() == ["a", "b"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.lists(st.binary(max_size=40).filter(lambda b: b"\n" not in b), min_size=1, max_size=4))
def test_any_garbage_between_rows_is_skipped_never_a_crash(tmp_path: Path, junk: list[bytes]) -> None:
    run = Path(tempfile.mkdtemp(dir=tmp_path))  # hypothesis reuses tmp_path across examples
    path = write_ledger(run, [make_row("a")])
    with path.open("ab") as f:
        for j in junk:
            f.write(j + b"\n")
    write_ledger(run, [make_row("b")])
    frame = load_ledger([path])
    assert {"a", "b"} <= set(frame["id"])
    result = build_reports([run], formats=("csv",))
    assert result.totals["skipped_lines"] + result.totals["rows"] >= 2
    assert result.totals["skipped_lines"] <= len(junk)


def test_a_row_longer_than_a_read_block_is_read(tmp_path: Path) -> None:
    big = make_row("big")
    big["content"] = "x" * (5 << 20)
    path = write_ledger(tmp_path / "run", [make_row("a"), big, make_row("c")])
    frame = load_ledger([path])
    assert frame["id"].tolist() == ["a", "big", "c"]
    assert "content" not in frame.columns  # answers are dropped on read


def test_ledger_from_a_newer_batchgate_is_refused(tmp_path: Path) -> None:
    row = make_row("a")
    row["v"] = LEDGER_VERSION + 1
    path = write_ledger(tmp_path / "run", [row])
    with pytest.raises(LedgerError, match="newer batchgate"):
        load_ledger([path])


def test_a_file_that_is_not_a_ledger_raises_ledger_error(tmp_path: Path) -> None:
    path = write_ledger(tmp_path / "run", [{"v": 1, "id": "a", "attempts": "three"}])
    with pytest.raises(LedgerError, match=r"results\.jsonl:1: not a batchgate ledger"):
        load_ledger([path])


def test_requests_table_is_typed(fleet: dict[Path, list[dict[str, Any]]], tmp_path: Path) -> None:
    build_reports([tmp_path / "runs"], tmp_path / "out", formats=("parquet",))
    schema = pq.read_schema(tmp_path / "out" / "requests.parquet")
    assert {name: str(schema.field(name).type) for name in schema.names} == ARROW_TYPES
    frame = pd.read_parquet(tmp_path / "out" / "requests.parquet")
    assert len(frame) == sum(len(rows) for rows in fleet.values())
    x6 = frame[frame["id"] == "x6"].iloc[0]
    assert str(x6["day"]) == "2025-03-01"  # 00:30 at +02:00 is the evening before in UTC
    assert x6["started_at"] == pd.Timestamp("2025-03-01T22:30:00Z")
    x1 = frame[(frame["id"] == "x1") & (frame["run_id"] == "r1")].iloc[0]
    assert list(x1["retry_causes"]) == ["server_error", "server_error"]
    assert x1["error_type"] == "server_error"
    assert x1["finished_at"] - x1["started_at"] == pd.Timedelta(seconds=3.5)
    assert x1["sample"] == 0 and pd.isna(x1["request_id"]) and pd.isna(x1["cost_status"])  # v1: v2 columns null
    assert not (tmp_path / "out" / "summary.csv").exists()  # only the formats asked for


# -- finding ledgers -------------------------------------------------------------------------------


def test_find_ledgers_takes_dirs_files_globs_and_parents(
    fleet: dict[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    first, second = (d / "results.jsonl" for d in fleet)
    assert find_ledgers([tmp_path / "runs"]) == [first, second]  # recursive, sorted
    assert find_ledgers([first.parent]) == [first]
    assert find_ledgers([str(second)]) == [second]
    assert find_ledgers([str(tmp_path / "runs" / "**" / "2025-03-0*")]) == [first, second]
    assert find_ledgers([first.parent, tmp_path / "runs", first]) == [first, second]  # no duplicates


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: [root / "missing"], "no such file or directory"),
        (lambda root: [str(root / "nothing-*")], "matches nothing"),
        (lambda root: [root], "no results.jsonl found"),
        (lambda root: [], "no results.jsonl found"),
    ],
)
def test_find_ledgers_says_what_it_could_not_find(tmp_path: Path, make: Any, message: str) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=message):
        find_ledgers(make(tmp_path / "empty"))


def test_a_file_that_is_not_results_jsonl_is_refused(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a"}\n')
    with pytest.raises(InputError, match="not a run ledger"):
        find_ledgers([prompts])


# -- build_reports options and writes ---------------------------------------------------------------


def test_several_ledgers_default_to_all_under_their_parent(
    fleet: dict[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    result = build_reports([tmp_path / "runs"], formats=("csv",))
    assert result.files == [tmp_path / "runs" / "_all" / "summary.csv"]
    first, second = fleet
    again = build_reports([first, second], formats=("csv",))  # two directories: their common parent
    assert again.files == [tmp_path / "runs" / "_all" / "summary.csv"]
    assert find_ledgers([tmp_path / "runs"]) == [d / "results.jsonl" for d in fleet]  # _all is no run


def test_unknown_keys_and_formats_are_input_errors(tmp_path: Path) -> None:
    write_ledger(tmp_path / "run", [make_row("a")])
    with pytest.raises(InputError, match="cannot group by week"):
        build_reports([tmp_path / "run"], by=("job", "week"))
    with pytest.raises(InputError, match="unknown report format xlsx"):
        build_reports([tmp_path / "run"], formats=("xlsx",))


def test_default_out_dir_and_all_formats(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_ledger(run, [make_row("a"), make_row("b", model="m-large")])
    result = build_reports([run], by=["job,model"], formats=["all"])
    names = sorted(p.name for p in result.files)
    assert names == ["report.html", "requests.parquet", "summary.csv", "summary.parquet"]
    assert all(p.parent == run and p.is_file() for p in result.files)
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp"))


def test_empty_ledger_gives_an_empty_report(tmp_path: Path) -> None:
    write_ledger(tmp_path / "run", [])
    result = build_reports([tmp_path / "run"])
    assert result.totals["requests"] == 0
    assert result.totals["total_cost_usd"] == 0.0
    assert "TOTAL" in result.table
    assert "no spend recorded" in (tmp_path / "run" / "report.html").read_text()


def test_a_failed_rewrite_leaves_the_old_report_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    write_ledger(run, [make_row("a")])
    build_reports([run])
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.name != "results.jsonl" and p.is_file()}
    write_ledger(run, [make_row("b", prompt=5000)])

    def disk_full(fd: int) -> None:  # the data reached the temporary file, the sync fails
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(InputError, match="No space left"):
        build_reports([run], formats=("html",))
    monkeypatch.undo()

    def crash(*args: object) -> str:
        raise RuntimeError("renderer crashed")

    monkeypatch.setattr(reports.page, "render_html", crash)
    with pytest.raises(RuntimeError):
        build_reports([run], formats=("html",))
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.name != "results.jsonl" and p.is_file()}
    assert after == before  # same files, same bytes: no temporary file left behind


def test_terminal_table_stays_narrow_and_names_the_totals(tmp_path: Path) -> None:
    long_job = "a-job-with-a-really-long-descriptive-name-2025"
    write_ledger(
        tmp_path / "run",
        [
            make_row("a", job=long_job, model="m-odd$"),
            make_row("b", job="short", model="org/a-model-name-that-goes-on-and-on-for-ever-FP8"),
        ],
    )
    result = build_reports([tmp_path / "run"], formats=("csv",))
    lines = result.table.splitlines()
    assert max(len(line) for line in lines) <= 100
    assert lines[0].split()[:2] == ["job", "model"]
    assert lines[-1].startswith("TOTAL")
    assert f"{result.totals['total_cost_usd']:,.6f}" in lines[-1]
    assert any("…" in line for line in lines)  # long names are shortened, not allowed to widen the table


def test_names_from_the_ledger_cannot_inject_markup_or_mathtext(tmp_path: Path) -> None:
    hostile = "<script>alert(1)</script>"
    write_ledger(
        tmp_path / "run",
        # Dollars, backslashes and markup must come out literally, in the table and in the charts.
        [make_row("a", job=hostile, model=r"m$\nope$"), make_row("b", model=r"m$\nope$", cut=5, cut_cost=None)],
    )
    build_reports([tmp_path / "run"], formats=("html",))
    page = (tmp_path / "run" / "report.html").read_text()
    assert "<script" not in page
    assert html.escape(hostile) in page
    assert r"m$\nope$" in page  # shown literally in the table and the estimate note
    chart = page[page.index('id="chart-cost-by-model"') :].split("</figure>")[0]
    assert r"<title>m$\nope$: " in chart  # and in the chart's tooltip


def test_superseded_rows_are_the_same_by_window_and_by_hashes(
    fleet: dict[Path, list[dict[str, Any]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small ledgers find superseded rows with a DuckDB window, big ones with numpy: one answer."""
    from batchgate.reports import summary

    run = tmp_path / "resumed"
    rows = [make_row(f"p{i % 7}", run_id=f"r{i // 7}", prompt=i + 1, completion=i + 2) for i in range(30)]
    write_ledger(run, rows)
    got = {}
    for limit in (summary.SMALL_LEDGER_ROWS, 0):
        monkeypatch.setattr(summary, "SMALL_LEDGER_ROWS", limit)
        latest = load_ledger([run / "results.jsonl"])["latest"].tolist()
        build_reports([tmp_path / "runs", run], tmp_path / f"out-{limit}", formats=("csv",))
        got[limit] = (latest, (tmp_path / f"out-{limit}" / "summary.csv").read_bytes())
    (small_latest, small_csv), (big_latest, big_csv) = got.values()
    assert small_latest == big_latest and sum(small_latest) == 7  # the last row of each of p0..p6
    assert small_latest == [i >= 30 - 7 for i in range(30)]
    assert small_csv == big_csv


@pytest.mark.parametrize("slice_rows", [500_000, 7])
def test_keys_seen_twice_and_more_are_superseded_alike_by_window_and_by_hashes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slice_rows: int
) -> None:
    """Keys seen twice (their first row is superseded) beside keys seen 1, 3 and 5 times, over one or many slices."""
    from batchgate.reports import summary

    run = tmp_path / "resumed"
    seen = {"once": 1, "twice-a": 2, "twice-b": 2, "thrice": 3, "five": 5}
    order = [k for n in range(5) for k, times in seen.items() if n < times]
    rows = [make_row(k, run_id=f"r{n}", prompt=n + 1, completion=n + 2) for n, k in enumerate(order)]
    write_ledger(run, rows)
    monkeypatch.setattr(summary, "_SLICE_ROWS", slice_rows)
    got = []
    for limit in (summary.SMALL_LEDGER_ROWS, 0):
        monkeypatch.setattr(summary, "SMALL_LEDGER_ROWS", limit)
        got.append(load_ledger([run / "results.jsonl"])["latest"].tolist())
    last = {k: i for i, k in enumerate(order)}
    assert got[0] == got[1] == [last[k] == i for i, k in enumerate(order)]


@given(
    st.lists(st.tuples(st.integers(1, 10_000), st.integers(1, 10_000)), min_size=3, max_size=30),
    st.floats(1e-7, 1e-5),
    st.floats(1e-7, 1e-4),
)
def test_price_fit_matches_numpy_least_squares(tokens: list[tuple[int, int]], a: float, b: float) -> None:
    """The 2x2 normal equations solved by hand give numpy's least squares, and refuse collinear counts."""
    import numpy as np

    from batchgate.reports.summary import _fit

    p = np.array([t[0] for t in tokens], dtype=float)
    c = np.array([t[1] for t in tokens], dtype=float)
    y = a * p + b * c
    got = _fit(len(tokens), p @ p, p @ c, c @ c, p @ y, c @ y)
    design = np.stack([p, c], axis=1)
    singular = np.linalg.svd(design, compute_uv=False)
    assume(singular[-1] == 0 or not 1e5 < singular[0] / singular[-1] < 1e7)  # no rounding at the threshold
    if singular[-1] == 0 or singular[0] / singular[-1] >= 1e6:
        assert got is None  # collinear counts cannot separate the prices
    else:
        (_, want), *_ = np.linalg.lstsq(design, y, rcond=None)
        assert got == pytest.approx(want, rel=1e-6)
