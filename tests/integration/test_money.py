"""Money that survives anything: caps that hold under price rises and across runs, answers bought once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from simrun import sim_config

from batchgate.config import RunConfig
from batchgate.ledger import LEDGER_NAME
from batchgate.runner import Runner
from batchgate.simulator import SimulatorConfig, running_simulator


def write_prompts(path: Path, ids: list[str], **extra: Any) -> Path:
    path.write_bytes(b"".join(orjson.dumps({"id": i, "prompt": f"tell me about {i}", **extra}) + b"\n" for i in ids))
    return path


def config(out: Path, url: str, **kw: Any) -> RunConfig:
    defaults: dict[str, Any] = dict(concurrency=16, max_attempts=4, idle_timeout_s=5.0)
    return sim_config(out, url, **(defaults | kw))


def rows(out: Path) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in (out / LEDGER_NAME).read_bytes().splitlines()]


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_a_cap_holds_with_256_streams_rising_prices_and_growing_answers(tmp_path: Path, seed: int) -> None:
    cap = 0.05
    src = write_prompts(tmp_path / "p.jsonl", [f"p{i}" for i in range(3000)])  # no max_tokens: up to 4096
    sim_cfg = SimulatorConfig(
        seed=seed, price_step_every=150, price_step_factor=2.0, growth_every=100, growth_factor=2.0,
        long_answer_rate=0.05, token_delay_s=0.0005, tokens_per_chunk=16,
    )  # fmt: skip
    async with running_simulator(sim_cfg) as sim:
        summary = await Runner([src], config(tmp_path / "out", sim.base_url, concurrency=256, max_cost_usd=cap)).run()
        billed = sim.billing.billed_usd()
    assert summary.stop_reason == "budget" and summary.exit_code == 3
    assert billed <= cap, (billed, cap)  # the server's own account: never past the cap
    assert summary.total_cost_usd <= billed + 1e-12
    assert summary.ok > 0
    print(f"seed {seed}: ok {summary.ok}, billed {billed:.6f} of {cap}")


async def test_thirty_cron_runs_share_one_daily_cap_and_the_next_exits_at_once(tmp_path: Path) -> None:
    cap = 0.004
    budget = tmp_path / "budget.jsonl"
    async with running_simulator(SimulatorConfig(seed=7)) as sim:
        summaries = []
        for hour in range(31):
            src = write_prompts(tmp_path / f"h{hour}.jsonl", [f"h{hour}-{i}" for i in range(6)], max_tokens=24)
            cfg = config(tmp_path / f"out{hour}", sim.base_url, daily_cap_usd=cap, budget_file=budget)
            before = len(sim.billing.records)
            summaries.append((await Runner([src], cfg).run(), len(sim.billing.records) - before))
        billed = sim.billing.billed_usd()
    assert billed <= cap, (billed, cap)  # reservations make overshoot impossible
    stopped = [s for s, _ in summaries if s.stop_reason == "cap"]
    assert stopped and all(s.exit_code == 3 for s in stopped)
    last, sent = summaries[-1]
    assert last.stop_reason == "cap" and last.requests == 0 and sent == 0  # the 31st: at once, nothing sent
    assert sum(s.ok for s, _ in summaries) >= 6  # the cap was used, not refused from the start


async def test_the_same_input_under_two_out_directories_is_billed_once_with_a_cache(tmp_path: Path) -> None:
    src = write_prompts(tmp_path / "p.jsonl", [f"q{i}" for i in range(20)], temperature=0)
    cache = tmp_path / "cache"
    async with running_simulator(SimulatorConfig(seed=9)) as sim:
        first = await Runner([src], config(tmp_path / "a", sim.base_url, cache_dir=cache)).run()
        second = await Runner([src], config(tmp_path / "b", sim.base_url, cache_dir=cache)).run()
        billed = len(sim.billing.completed())
    assert (first.ok, first.cached, second.ok, second.cached) == (20, 0, 20, 20)
    assert billed == 20  # each answer bought once in total
    a = {r["id"]: r for r in rows(tmp_path / "a")}
    b = {r["id"]: r for r in rows(tmp_path / "b")}
    for rid, row in b.items():
        assert row["cached"] is True and row["total_cost_usd"] == 0.0
        assert row["content"] == a[rid]["content"] and row["request_id"] == a[rid]["request_id"]
        assert row["cached_cost_usd"] == a[rid]["total_cost_usd"]
    assert second.total_cost_usd == 0.0


async def test_sampling_requests_are_not_cached_unless_asked(tmp_path: Path) -> None:
    src = write_prompts(tmp_path / "p.jsonl", [f"q{i}" for i in range(5)])  # no temperature: sampling
    cache = tmp_path / "cache"
    async with running_simulator(SimulatorConfig(seed=9)) as sim:
        await Runner([src], config(tmp_path / "a", sim.base_url, cache_dir=cache)).run()
        second = await Runner([src], config(tmp_path / "b", sim.base_url, cache_dir=cache)).run()
        third = await Runner(
            [src], config(tmp_path / "c", sim.base_url, cache_dir=cache, cache_nondeterministic=True)
        ).run()
    assert second.cached == 0 and third.cached == 0  # nothing was stored for them either


async def test_every_row_carries_the_request_id_the_simulator_logged_for_it(tmp_path: Path) -> None:
    src = write_prompts(tmp_path / "p.jsonl", [f"r{i}" for i in range(40)])
    sim_cfg = SimulatorConfig(seed=4, reset_rate=0.1, server_error_rate=0.1)
    async with running_simulator(sim_cfg) as sim:
        await Runner([src], config(tmp_path / "out", sim.base_url, max_attempts=8)).run()
        billing = sim.billing
    for row in rows(tmp_path / "out"):
        assert row["status"] == "ok" and row["request_id"]
        billed = billing.record_for(row["request_id"])  # the billed attempt is the one the row names
        assert billed is not None and billed["status"] == "completed"
        assert billed["total_cost_usd"] == row["total_cost_usd"] and billed["content"] == row["content"]
