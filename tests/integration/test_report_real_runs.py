"""Reports over ledgers made by real runs against the simulator, checked against values computed here.

Nothing below calls the report code to compute an expectation: sums, latest-row counts and
percentiles (linear interpolation between closest ranks, numpy's default) are plain Python.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson
import pandas as pd

from batchgate.config import RunConfig
from batchgate.reports import build_reports
from batchgate.runner import Runner
from batchgate.simulator import SimulatorConfig, running_simulator

MODELS = ("Qwen/Qwen3-32B-FP8", "deepseek-ai/DeepSeek-V3")


def percentile(values: list[float], q: float) -> float:
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def write_prompts(path: Path, n: int, tag: str) -> Path:
    with path.open("w") as f:
        for i in range(n):
            line = {"id": f"{tag}{i}", "prompt": f"{tag} question {i} " + "pad " * (i % 13), "model": MODELS[i % 2]}
            f.write(orjson.dumps(line).decode() + "\n")
    return path


async def make_run(tmp_path: Path, tag: str, n: int, seed: int, **faults: Any) -> tuple[Path, float]:
    src = write_prompts(tmp_path / f"{tag}.jsonl", n, tag)
    out = tmp_path / "runs" / tag
    sim_cfg = SimulatorConfig(seed=seed, stall_s=2.0, retry_after_s=0.01, **faults)
    async with running_simulator(sim_cfg) as sim:
        cfg = RunConfig(
            out_dir=out,
            api_key="gp-test",
            base_url=sim.base_url,
            concurrency=16,
            max_attempts=3,
            backoff_base_s=0.001,
            backoff_max_s=0.01,
            idle_timeout_s=0.3,
            check_models=False,
            key_concurrency=None,
            key_rpm=None,
            key_burst_10s=None,
        )
        await Runner([src], cfg).run()
        return out, sim.billing.completed_total_usd()


def rows_of(*outs: Path) -> list[dict[str, Any]]:
    rows = []
    for out in outs:
        for line in (out / "results.jsonl").read_bytes().splitlines():
            row = orjson.loads(line)
            row["_dir"] = str(out)
            rows.append(row)
    return rows


def expected(rows: list[dict[str, Any]]) -> dict[str, Any]:
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        latest[(r["_dir"], r["id"])] = r
    ok_rows = [r for r in rows if r["status"] == "ok"]
    total_cost = math.fsum(r["total_cost_usd"] for r in rows)
    total_tokens = sum(r["total_tokens"] or 0 for r in rows)
    lat = [r["latency_s"] for r in rows]
    ttft = [r["ttft_s"] for r in rows if r["ttft_s"] is not None]
    tps_rows = [r for r in ok_rows if r["latency_s"] > 0 and r["completion_tokens"] is not None]
    return {
        "requests": len(latest),
        "ok": sum(r["status"] == "ok" for r in latest.values()),
        "failed": sum(r["status"] == "failed" for r in latest.values()),
        "rows": len(rows),
        "attempts": sum(r["attempts"] for r in rows),
        "retries": sum(r["attempts"] - 1 for r in rows),
        "prompt_tokens": sum(r["prompt_tokens"] or 0 for r in rows),
        "completion_tokens": sum(r["completion_tokens"] or 0 for r in rows),
        "total_tokens": total_tokens,
        "base_cost_usd": math.fsum(r["base_cost_usd"] for r in rows),
        "platform_fee_usd": math.fsum(r["platform_fee_usd"] for r in rows),
        "total_cost_usd": total_cost,
        "unconfirmed_completion_tokens": sum(r["unconfirmed_completion_tokens"] for r in rows),
        "cost_per_1k_requests_usd": total_cost / len(latest) * 1000,
        "cost_per_1m_tokens_usd": total_cost / total_tokens * 1e6,
        "latency_p50_s": percentile(lat, 50),
        "latency_p95_s": percentile(lat, 95),
        "latency_p99_s": percentile(lat, 99),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p95_s": percentile(ttft, 95),
        "ttft_p99_s": percentile(ttft, 99),
        "tokens_per_s": sum(r["completion_tokens"] for r in tps_rows) / math.fsum(r["latency_s"] for r in tps_rows),
    }


def assert_row_matches(row: pd.Series, want: dict[str, Any], label: str) -> None:
    for col, value in want.items():
        got = row[col]
        if isinstance(value, float):
            assert math.isclose(got, value, rel_tol=1e-9, abs_tol=1e-12), f"{label} {col}: {got} != {value}"
        else:
            assert got == value, f"{label} {col}: {got} != {value}"


async def test_summary_of_a_faulty_real_run_matches_independent_sums(tmp_path: Path) -> None:
    out, billed = await make_run(
        tmp_path,
        "a",
        300,
        seed=21,
        reset_rate=0.05,
        stall_rate=0.02,
        rate_limit_rate=0.05,
        server_error_rate=0.1,
        midstream_error_rate=0.05,
    )
    rows = rows_of(out)
    assert any(r["status"] == "failed" for r in rows), "want some failures to count"
    assert any(r["unconfirmed_completion_tokens"] for r in rows), "want some cut streams"
    result = build_reports([out], by=["job", "model"])
    summary = pd.read_parquet(out / "summary.parquet")
    total_row = summary[summary["level"] == "total"].iloc[0]
    assert_row_matches(total_row, expected(rows), "total")
    assert abs(total_row["total_cost_usd"] - billed) < 1e-9  # the report's money is what was billed
    unconfirmed = math.fsum(r["unconfirmed_cost_usd"] or 0.0 for r in rows)
    assert math.isclose(total_row["unconfirmed_cost_usd"], unconfirmed, rel_tol=1e-9, abs_tol=1e-12)
    assert unconfirmed > 0 and total_row["total_cost_usd"] == result.totals["total_cost_usd"]
    for model in MODELS:
        group = summary[(summary["level"] == "group") & (summary["model"] == model)].iloc[0]
        assert_row_matches(group, expected([r for r in rows if r["model"] == model]), model)
    csv = pd.read_csv(out / "summary.csv")
    assert math.isclose(csv[csv["level"] == "total"]["total_cost_usd"].iloc[0], billed, rel_tol=1e-12)


async def test_report_across_runs_days_jobs_models_adds_up(tmp_path: Path) -> None:
    a, billed_a = await make_run(tmp_path, "alpha", 80, seed=1)
    b, billed_b = await make_run(tmp_path, "beta", 60, seed=2, server_error_rate=0.2)
    # Move run b to the previous day, as a nightly run of yesterday would be.
    path = b / "results.jsonl"
    shifted = []
    for line in path.read_bytes().splitlines():
        row = orjson.loads(line)
        stamp = pd.Timestamp(row["started_at"]) - pd.Timedelta(days=1)
        row["started_at"] = stamp.isoformat().replace("+00:00", "Z")
        shifted.append(orjson.dumps(row))
    path.write_bytes(b"\n".join(shifted) + b"\n")

    report_dir = tmp_path / "month"
    result = build_reports([tmp_path / "runs"], report_dir, by=["job", "model"])
    summary = pd.read_parquet(report_dir / "summary.parquet")
    total = summary[summary["level"] == "total"].iloc[0]
    rows = rows_of(a, b)
    assert_row_matches(total, expected(rows), "total")
    assert abs(total["total_cost_usd"] - (billed_a + billed_b)) < 1e-9
    groups = summary[summary["level"] == "group"]
    assert set(groups["job"]) == {"alpha", "beta"} and set(groups["model"]) == set(MODELS)
    days = summary[summary["level"] == "day"]
    assert len(days) == 2
    for col in ("requests", "ok", "failed", "attempts", "total_tokens"):
        assert groups[col].sum() == total[col] == days[col].sum(), col
    assert math.isclose(math.fsum(groups["total_cost_usd"]), total["total_cost_usd"], rel_tol=1e-12)
    assert math.isclose(math.fsum(days["total_cost_usd"]), total["total_cost_usd"], rel_tol=1e-12)
    by_day: dict[str, float] = defaultdict(float)
    for r in rows:
        by_day[r["started_at"][:10]] += r["total_cost_usd"]
    for _, day_row in days.iterrows():
        assert math.isclose(day_row["total_cost_usd"], by_day[str(day_row["day"])], rel_tol=1e-9)
    assert (report_dir / "report.html").exists() and result.totals["ledgers"] == 2
