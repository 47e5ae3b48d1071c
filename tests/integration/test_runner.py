"""The run engine against the simulator over loopback: answers, costs, faults, stops, resume."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from simrun import sim_config

from batchgate.config import RunConfig
from batchgate.ledger import LEDGER_NAME
from batchgate.models import LEDGER_FIELDS
from batchgate.runner import Runner
from batchgate.simulator import SimulatorConfig, running_simulator


def write_prompts(path: Path, n: int, *, start: int = 0, max_tokens: int = 24) -> Path:
    with path.open("w") as f:
        for i in range(start, start + n):
            f.write(orjson.dumps({"id": f"q{i}", "prompt": f"question {i} " + "word " * (i % 17)}).decode())
            f.write("\n")
    return path


def config(out: Path, url: str, **kw: Any) -> RunConfig:
    defaults: dict[str, Any] = dict(concurrency=32, max_attempts=8, idle_timeout_s=1.0, check_models=False)
    return sim_config(out, url, **(defaults | kw))


def ledger_rows(out: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in (out / LEDGER_NAME).read_bytes().splitlines()]


async def test_happy_path_answers_and_costs_match_billing(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", 120)
    async with running_simulator(SimulatorConfig(seed=3)) as sim:
        summary = await Runner([prompts], config(tmp_path / "out", sim.base_url)).run()
        billing = sim.billing
    rows = ledger_rows(tmp_path / "out")
    assert summary.exit_code == 0
    assert (summary.ok, summary.failed, summary.requests) == (120, 0, 120)
    assert [list(r) for r in rows[:1]] == [list(LEDGER_FIELDS)]
    assert sorted(r["id"] for r in rows) == sorted(f"q{i}" for i in range(120))
    by_client = {r["client_request_id"]: r for r in billing.completed()}
    for r in rows:
        billed = by_client[r["id"]]
        assert r["content"] == billed["content"]
        assert r["total_cost_usd"] == billed["total_cost_usd"]  # unchanged, not recomputed
        assert r["prompt_tokens"] == billed["prompt_tokens"]
        assert r["job"] == "p" and r["model"] == "sim-model" and r["attempts"] == 1
        assert r["ttft_s"] is not None and r["latency_s"] >= r["ttft_s"]
    assert math.isclose(summary.total_cost_usd, billing.completed_total_usd(), abs_tol=1e-12)
    assert summary.unconfirmed_cost_usd == 0.0


async def test_every_fault_type_still_gives_one_ok_row_per_id(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", 400)
    sim_cfg = SimulatorConfig(
        seed=11,
        reset_rate=0.05,
        stall_rate=0.03,
        stall_s=3.0,
        rate_limit_rate=0.05,
        retry_after_s=0.01,
        server_error_rate=0.05,
        midstream_error_rate=0.05,
        keepalive_rate=0.05,
    )
    async with running_simulator(sim_cfg) as sim:
        summary = await Runner([prompts], config(tmp_path / "out", sim.base_url, idle_timeout_s=0.3)).run()
        billing = sim.billing
    rows = ledger_rows(tmp_path / "out")
    assert summary.exit_code == 0, summary
    assert Counter(r["id"] for r in rows if r["status"] == "ok") == Counter(f"q{i}" for i in range(400))
    confirmed = math.fsum(r["total_cost_usd"] for r in rows)
    assert abs(confirmed - billing.completed_total_usd()) < 1e-9
    causes = Counter(c for r in rows for c in r["retry_causes"])
    assert {"rate_limited", "server_error", "stream_interrupted", "timeout"} <= set(causes)
    assert summary.rate_limited == causes["rate_limited"]
    # Streams cut after tokens arrived show up as unconfirmed spend, in the same ballpark as billed.
    assert billing.cut(), "the simulator cut no stream"
    unconfirmed = math.fsum(r["unconfirmed_cost_usd"] or 0.0 for r in rows)
    assert unconfirmed > 0
    assert 0.3 < unconfirmed / billing.cut_total_usd() < 3.0
    assert sum(r["unconfirmed_completion_tokens"] for r in rows) > 0


async def test_insufficient_balance_stops_and_resume_finishes_without_rebuying(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", 200)
    out = tmp_path / "out"
    async with running_simulator(SimulatorConfig(seed=5, balance_usd=0.002)) as sim:
        first = await Runner([prompts], config(out, sim.base_url, concurrency=4)).run()
        billed_first = sim.billing.completed_count_by_client_id()
    assert first.exit_code == 3 and first.stop_reason == "balance"
    assert 0 < first.ok < 200
    assert first.requests < 200  # it stopped starting new prompts
    async with running_simulator(SimulatorConfig(seed=5)) as sim:
        second = await Runner([prompts], config(out, sim.base_url, concurrency=4)).run()
        billed_second = sim.billing.completed_count_by_client_id()
    assert second.exit_code == 0
    assert second.skipped == first.ok
    assert not set(billed_first) & set(billed_second), "an answer was bought twice"
    rows = ledger_rows(out)
    assert Counter(r["id"] for r in rows if r["status"] == "ok") == Counter(f"q{i}" for i in range(200))


async def test_rerun_of_finished_job_sends_nothing(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", 30)
    out = tmp_path / "out"
    async with running_simulator(SimulatorConfig()) as sim:
        await Runner([prompts], config(out, sim.base_url)).run()
        again = await Runner([prompts], config(out, sim.base_url)).run()
        assert len(sim.billing.records) == 30
    assert (again.requests, again.skipped, again.exit_code) == (0, 30, 0)
    assert len(ledger_rows(out)) == 30


async def test_wrong_key_stops_the_run_with_exit_2(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", 100)
    async with running_simulator(SimulatorConfig()) as sim:
        summary = await Runner(
            [prompts], config(tmp_path / "out", sim.base_url, api_key="sk-wrong", concurrency=2)
        ).run()
        assert sim.billing.records == []
    assert summary.exit_code == 2 and summary.stop_reason == "auth"
    assert summary.requests <= 2
    rows = ledger_rows(tmp_path / "out")
    assert all(r["error"]["type"] == "auth" and r["error"]["status"] == 401 for r in rows)
    assert "sk-wrong" not in (tmp_path / "out" / LEDGER_NAME).read_text()


async def test_unreachable_base_url_stops_with_exit_2(tmp_path: Path, unused_tcp_port: int) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", 50)
    summary = await Runner(
        [prompts],
        config(tmp_path / "out", f"http://127.0.0.1:{unused_tcp_port}/v1", concurrency=2, max_attempts=2),
    ).run()
    assert summary.exit_code == 2 and summary.stop_reason == "unreachable"
    assert summary.requests <= 2


async def test_failed_prompts_are_retried_on_resume(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", 60)
    out = tmp_path / "out"
    async with running_simulator(SimulatorConfig(seed=2, server_error_rate=0.5)) as sim:
        first = await Runner([prompts], config(out, sim.base_url, max_attempts=1)).run()
    assert first.exit_code == 1 and first.failed > 0
    assert first.failures_by_cause == {"server_error": first.failed}
    async with running_simulator(SimulatorConfig(seed=2)) as sim:
        second = await Runner([prompts], config(out, sim.base_url)).run()
    assert second.exit_code == 0
    assert second.requests == first.failed
    assert second.skipped == first.ok


@pytest.fixture
def unused_tcp_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_budget_stops_before_the_cap_and_resume_continues(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", 300)
    out = tmp_path / "out"
    cap = 0.004
    async with running_simulator(SimulatorConfig(seed=4)) as sim:
        first = await Runner([prompts], config(out, sim.base_url, concurrency=8, max_cost_usd=cap)).run()
        billing = sim.billing
        costliest = max(r["total_cost_usd"] for r in billing.records)
        assert billing.spent_usd <= cap + costliest  # only the first probe of a model is unbounded
    assert first.exit_code == 3 and first.stop_reason == "budget"
    assert 0 < first.ok < 300
    assert first.total_cost_usd <= cap
    async with running_simulator(SimulatorConfig(seed=4)) as sim:
        second = await Runner([prompts], config(out, sim.base_url, concurrency=8)).run()
    assert second.exit_code == 0 and second.skipped == first.ok


async def test_429s_slow_the_whole_run_down_then_it_finishes(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", 200)
    sim_cfg = SimulatorConfig(seed=9, rate_limit_rate=0.3, retry_after_s=0.02)
    async with running_simulator(sim_cfg) as sim:
        runner = Runner([prompts], config(tmp_path / "out", sim.base_url, concurrency=32, max_attempts=20))
        summary = await runner.run()
    assert summary.exit_code == 0 and summary.ok == 200
    assert summary.rate_limited > 0
    assert summary.slowdowns >= 1
    assert summary.min_concurrency < 32


async def test_rpm_caps_the_request_rate(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", 21)
    async with running_simulator(SimulatorConfig()) as sim:
        summary = await Runner([prompts], config(tmp_path / "out", sim.base_url, rpm=1200)).run()
    assert summary.ok == 21
    assert summary.wall_s >= 20 * 60 / 1200 * 0.95  # 21 starts are 20 intervals of 50 ms


async def test_job_defaults_and_system_prompt_reach_the_request(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", 3)
    cfg = config(tmp_path / "out", "", chat_defaults={"max_tokens": 9}, system_prompt="Be brief.")
    async with running_simulator(SimulatorConfig(min_completion_tokens=20, max_completion_tokens=40)) as sim:
        cfg = dataclasses.replace(cfg, base_url=sim.base_url)
        await Runner([prompts], cfg).run()
    rows = ledger_rows(tmp_path / "out")
    assert all(r["completion_tokens"] == 9 and r["finish_reason"] == "length" for r in rows)
    # the system message counts toward the prompt: more prompt tokens than the bare question
    async with running_simulator(SimulatorConfig()) as sim:
        await Runner([prompts], config(tmp_path / "bare", sim.base_url)).run()
    bare = {r["id"]: r["prompt_tokens"] for r in ledger_rows(tmp_path / "bare")}
    assert all(r["prompt_tokens"] > bare[r["id"]] for r in rows)


async def test_cancelled_streams_leave_their_unconfirmed_spend_in_the_ledger(tmp_path: Path) -> None:
    import asyncio

    prompts = write_prompts(tmp_path / "p.jsonl", 40)
    out = tmp_path / "out"
    sim_cfg = SimulatorConfig(token_delay_s=0.05, min_completion_tokens=40, max_completion_tokens=40)
    async with running_simulator(sim_cfg) as sim:
        runner = Runner([prompts], config(out, sim.base_url, concurrency=8, idle_timeout_s=5.0))
        task = asyncio.create_task(runner.run())
        await asyncio.sleep(0.6)
        runner.request_stop("interrupted")
        runner.cancel_in_flight()
        summary = await task
        await asyncio.sleep(0.2)  # let the simulator notice the dropped streams
        cut = sim.billing.cut()
    assert summary.exit_code == 130
    rows = ledger_rows(out)
    interrupted = [r for r in rows if r["error"] and r["error"]["type"] == "interrupted"]
    assert len(interrupted) == 8 == len(cut)
    assert all(r["status"] == "failed" and r["unconfirmed_completion_tokens"] > 0 for r in interrupted)
    # every token the server sent before the cut is accounted as unconfirmed
    received = sum(r["unconfirmed_completion_tokens"] for r in interrupted)
    assert abs(received - sum(c["completion_tokens"] for c in cut)) <= len(cut)


async def test_given_records_run_alone_and_an_empty_list_runs_nothing(tmp_path: Path) -> None:
    from batchgate import jobs

    prompts = write_prompts(tmp_path / "p.jsonl", 20)
    picked = [r for r in jobs.iter_records([prompts], default_model="sim-model") if r.id in {"q3", "q7"}]
    async with running_simulator(SimulatorConfig()) as sim:
        none = await Runner([prompts], config(tmp_path / "a", sim.base_url), records=[]).run()
        two = await Runner([prompts], config(tmp_path / "b", sim.base_url), records=picked).run()
        assert len(sim.billing.records) == 2
    assert (none.requests, none.exit_code) == (0, 0)
    assert sorted(r["id"] for r in ledger_rows(tmp_path / "b")) == ["q3", "q7"] and two.ok == 2


async def test_an_outage_pauses_the_run_instead_of_burning_every_prompt(tmp_path: Path) -> None:
    import asyncio

    prompts = write_prompts(tmp_path / "p.jsonl", 300)
    sim_cfg = SimulatorConfig(token_delay_s=0.005, min_completion_tokens=10, max_completion_tokens=10)
    async with running_simulator(sim_cfg) as sim:
        port = sim.port
        cfg = config(tmp_path / "out", sim.base_url, concurrency=16, max_attempts=6, backoff_base_s=0.01)
        runner = Runner([prompts], cfg)
        task = asyncio.create_task(runner.run())
        await asyncio.sleep(0.5)
    # the server is gone for ~3 s: connections refused
    await asyncio.sleep(3.0)
    async with running_simulator(sim_cfg, port=port):
        summary = await asyncio.wait_for(task, 60)
    rows = ledger_rows(tmp_path / "out")
    causes = Counter(c for r in rows for c in r["retry_causes"])
    assert summary.outage_pauses >= 1
    assert summary.failed <= 2, summary.failures_by_cause  # at most the probes ran out of attempts
    assert Counter(r["id"] for r in rows if r["status"] == "ok") == Counter(
        f"q{i}" for i in range(300) if f"q{i}" not in {r["id"] for r in rows if r["status"] == "failed"}
    )
    # while paused, only a probe at a time tried: far fewer failed attempts than prompts x attempts
    assert causes["connect_failed"] < 60, causes
