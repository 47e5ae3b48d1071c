"""``estimate`` against the simulator: real sampled answers, reuse by the following run, edge cases."""

from __future__ import annotations

import csv
import math
import random
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchgate.config import RunConfig
from batchgate.errors import InputError
from batchgate.estimate import estimate, write_estimate
from batchgate.ledger import LEDGER_NAME
from batchgate.runner import Runner
from batchgate.simulator import SimulatorConfig, running_simulator

MODELS = ("Qwen/Qwen3-235B-A22B-Instruct-2507-FP8", "meta-llama/Llama-3.3-70B-Instruct")


def write_prompts(path: Path, n: int, *, seed: int = 0, prefix: str = "q") -> Path:
    """Prompts of varied length and max_tokens over two models."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            line: dict[str, Any] = {
                "id": f"{prefix}{i}",
                "model": MODELS[i % 3 == 0],
                "prompt": "word " * int(rng.lognormvariate(4.0, 0.8)),
            }
            cap = rng.choice([8, 32, 128, None])
            if cap:
                line["max_tokens"] = cap
            f.write(orjson.dumps(line).decode() + "\n")
    return path


def config(out: Path, url: str, **kw: Any) -> RunConfig:
    base: dict[str, Any] = dict(
        out_dir=out,
        api_key="gp-test",
        base_url=url,
        concurrency=16,
        max_attempts=4,
        backoff_base_s=0.001,
        backoff_max_s=0.01,
        idle_timeout_s=1.0,
        check_models=False,  # made-up model ids: the simulator serves them, its catalog lacks them
        key_concurrency=None,  # the simulator here enforces no per-key limits
        key_rpm=None,
        key_burst_10s=None,
    )
    base.update(kw)
    return RunConfig(**base)


def sim_config(**faults: Any) -> SimulatorConfig:
    """Deterministic answers up to 256 tokens, plus the faults asked for."""
    return SimulatorConfig(seed=4, max_completion_tokens=256, **faults)


async def test_sampled_answers_are_bought_once_and_the_estimate_is_close(tmp_path: Path) -> None:
    inputs = [
        write_prompts(tmp_path / "chat.jsonl", 300),
        write_prompts(tmp_path / "sum.jsonl", 150, seed=1, prefix="s"),
    ]
    out = tmp_path / "out"
    async with running_simulator(sim_config()) as sim:
        result = await estimate(inputs, config(out, sim.base_url), sample=60, seed=3)
        assert len(sim.billing.completed()) == 60
        sampled = set(sim.billing.completed_count_by_client_id())
        full = await Runner(inputs, config(out, sim.base_url)).run()
        billed = sim.billing.completed_count_by_client_id()
        actual = sim.billing.completed_total_usd()
    assert result.status == "estimated" and result.exit_code == 0
    assert (result.summary.ok, result.summary.skipped, result.sample_drawn) == (60, 0, 60)
    assert full.skipped == 60 and full.requests == 390
    assert sum(billed.values()) == 450 and set(billed.values()) == {1}, "a sampled answer was bought again"
    assert sampled <= set(billed)
    total = result.projection.total
    assert total is not None and total.cost_low_usd is not None and total.cost_high_usd is not None
    assert total.cost_low_usd <= actual <= total.cost_high_usd
    assert abs(total.cost_usd / actual - 1) < 0.1
    assert total.sample_cost_usd == pytest.approx(math.fsum(r.cost_usd for r in result.rows), abs=1e-12)
    assert {f.job for f in result.projection.by_job} == {"chat", "sum"}
    assert {f.model for f in result.projection.by_model} == set(MODELS)
    assert "Still to buy" in result.table and "job sum" in result.table


async def test_repeating_the_estimate_buys_nothing_and_gives_the_same_figures(tmp_path: Path) -> None:
    inputs = [write_prompts(tmp_path / "p.jsonl", 200)]
    out = tmp_path / "out"
    async with running_simulator(sim_config()) as sim:
        first = await estimate(inputs, config(out, sim.base_url), sample=40, seed=9)
        again = await estimate(inputs, config(out, sim.base_url), sample=40, seed=9)
        assert len(sim.billing.records) == 40
    assert (again.summary.ok, again.summary.skipped) == (0, 40)
    assert again.projection.total == first.projection.total  # costs come from the ledger, unchanged
    assert again.exit_code == 0


async def test_inputs_smaller_than_the_sample_are_exact(tmp_path: Path) -> None:
    inputs = [write_prompts(tmp_path / "p.jsonl", 25)]
    async with running_simulator(sim_config()) as sim:
        result = await estimate(inputs, config(tmp_path / "out", sim.base_url), sample=200)
        billed = sim.billing.completed_total_usd()
    total = result.projection.total
    assert result.status == "exact" and total is not None
    assert result.sample_drawn == 25
    assert math.isclose(total.cost_usd, billed, abs_tol=1e-12)
    assert total.cost_low_usd == total.cost_high_usd == total.cost_usd
    assert result.message is not None and "25 prompts, no more than --sample 200" in result.message
    assert "zero width" in result.message and "zero width" in result.table


async def test_sample_of_zero_and_empty_or_bad_inputs_are_refused_before_any_request(tmp_path: Path) -> None:
    good = write_prompts(tmp_path / "p.jsonl", 10)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "x", "model": "m"}\nnot json\n')
    async with running_simulator(sim_config()) as sim:
        cfg = config(tmp_path / "out", sim.base_url)
        with pytest.raises(
            InputError, match=r"--sample 0: an estimate needs at least one sampled prompt.*try --sample 200"
        ):
            await estimate([good], cfg, sample=0)
        with pytest.raises(InputError, match="no prompts"):
            await estimate([empty], cfg, sample=5)
        with pytest.raises(InputError, match=r"bad.jsonl:2: invalid JSON"):
            await estimate([bad], cfg, sample=5)
        assert sim.billing.records == []
    assert not (tmp_path / "out").exists()


async def test_all_failing_sample_says_the_estimate_is_unavailable(tmp_path: Path) -> None:
    inputs = [write_prompts(tmp_path / "p.jsonl", 100)]
    out = tmp_path / "out"
    async with running_simulator(sim_config(server_error_rate=1.0)) as sim:
        result = await estimate(inputs, config(out, sim.base_url, max_attempts=1), sample=20)
    assert result.status == "unavailable" and result.projection.total is None
    assert result.exit_code == 1
    assert result.message == (
        "Estimate unavailable: none of the 20 sampled prompts got an answer, so there is no cost to project "
        "from (failures: server_error: 20)."
    )
    paths = write_estimate(result, out)
    data = orjson.loads(paths[0].read_bytes())
    assert data["status"] == "unavailable" and data["total"] is None and data["sample"]["failed"] == 20
    assert "Estimate unavailable" in result.table


async def test_cut_streams_show_as_unconfirmed_in_the_upper_bound(tmp_path: Path) -> None:
    inputs = [write_prompts(tmp_path / "p.jsonl", 300)]
    async with running_simulator(sim_config(reset_rate=0.3)) as sim:
        result = await estimate(inputs, config(tmp_path / "out", sim.base_url, max_attempts=6), sample=80, seed=1)
        assert sim.billing.cut(), "the simulator cut no stream"
    total = result.projection.total
    assert total is not None and total.cost_high_usd is not None and total.cost_low_usd is not None
    assert total.unconfirmed_cost_usd > 0
    spread = total.cost_high_usd - total.cost_usd
    assert spread > total.cost_usd - total.cost_low_usd  # the upper side carries the unconfirmed spend
    assert "Unconfirmed spend" in result.table


async def test_max_cost_caps_the_sample_run(tmp_path: Path) -> None:
    inputs = [write_prompts(tmp_path / "p.jsonl", 300)]
    async with running_simulator(sim_config()) as sim:
        result = await estimate(
            inputs, config(tmp_path / "out", sim.base_url, max_cost_usd=0.002, concurrency=2), sample=100
        )
        spent = sim.billing.spent_usd
    assert spent <= 0.002 + 1e-12
    assert result.summary.stop_reason == "budget" and result.exit_code == 3
    assert 0 < result.summary.ok < 100
    assert result.status == "estimated"
    assert any("never ran" in w for w in result.projection.warnings)
    assert result.budget_verdict == "exceeds"
    assert "would exceed --max-cost" in result.table


async def test_write_estimate_writes_json_and_csv_atomically(tmp_path: Path) -> None:
    inputs = [write_prompts(tmp_path / "a.jsonl", 120), write_prompts(tmp_path / "b.jsonl", 60, prefix="b")]
    out = tmp_path / "out"
    async with running_simulator(sim_config()) as sim:
        result = await estimate(inputs, config(out, sim.base_url), sample=50, seed=2)
    paths = write_estimate(result, out)
    assert [p.name for p in paths] == ["estimate.json", "estimate.csv"]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    data = orjson.loads(paths[0].read_bytes())
    assert data == orjson.loads(orjson.dumps(result.as_dict()))
    assert data["inputs"]["prompts"] == 180 and data["sample"]["answered"] == 50
    assert data["remaining"]["prompts"] == 130
    with paths[1].open() as f:
        rows = list(csv.DictReader(f))
    assert Counter(r["scope"] for r in rows) == Counter({"total": 1, "model": 2, "job": 2, "cell": 4})
    assert float(rows[0]["cost_usd"]) == pytest.approx(data["total"]["cost_usd"])
    ledger_ids = {orjson.loads(line)["id"] for line in (out / LEDGER_NAME).read_bytes().splitlines()}
    assert len(ledger_ids) == 50
