"""The simulator's memory is flat in the requests it serves: exact totals always, records up to a bound.

Real aiohttp servers over loopback, as in ``test_simulator.py``; the flat-memory check counts the
entries of every per-request structure rather than reading RSS, so it is not flaky.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import types
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from batchgate import simulator as simulator_module
from batchgate.simulator import (
    DEFAULT_KEEP_RECORDS,
    Billing,
    BillingRecordsDropped,
    SimulatorConfig,
    running_simulator,
)

MODEL = "sim-model"
AUTH = {"Authorization": "Bearer gp-test"}


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


def chat(content: str, *, stream: bool = True) -> bytes:
    return orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}], "stream": stream})


async def post(
    session: aiohttp.ClientSession, base_url: str, i: int, key: str = "gp-test", *, stream: bool = True
) -> tuple[int, str]:
    """One chat request (client id ``c{i}``), read to its end or its reset; (status, x-request-id)."""
    headers = {"Authorization": f"Bearer {key}", "X-Client-Request-Id": f"c{i}"}
    async with session.post(f"{base_url}/chat/completions", data=chat(f"q{i}", stream=stream), headers=headers) as r:
        with contextlib.suppress(aiohttp.ClientPayloadError):  # a seeded reset: billed cut
            await r.read()
        return r.status, r.headers["x-request-id"]


def the_simulator(app: web.Application) -> Any:
    """The ``_Simulator`` behind an app (its handlers are bound methods of it)."""
    [owner] = {
        handler.__self__ for route in app.router.routes() if isinstance(handler := route.handler, types.MethodType)
    }
    return owner


def test_keep_records_defaults_to_every_tests_worth() -> None:
    assert SimulatorConfig().keep_records == DEFAULT_KEEP_RECORDS == 100_000
    assert Billing().keep_records is None  # built by hand: keeps everything, as before


async def test_totals_exact_and_accessors_honest_past_the_bound(session: aiohttp.ClientSession, tmp_path: Path) -> None:
    total, keep = 60, 10
    log = tmp_path / "billing.jsonl"
    faults: dict[str, Any] = {"reset_rate": 0.3, "rate_limit_rate": 0.15}
    faults |= {"price_step_every": 7, "price_step_factor": 1.5}
    bounded_config = SimulatorConfig(seed=5, keep_records=keep, billing_log=str(log), balance_usd=10.0, **faults)
    unbounded_config = SimulatorConfig(seed=5, keep_records=None, balance_usd=10.0, **faults)
    ids: list[str] = []
    async with running_simulator(bounded_config) as sim, running_simulator(unbounded_config) as full:
        for i in range(total):
            status, request_id = await post(session, sim.base_url, i, stream=i % 5 != 0)
            assert (await post(session, full.base_url, i, stream=i % 5 != 0))[0] == status
            ids.append(request_id)
        root = sim.base_url.removesuffix("/v1")
        async with session.get(f"{root}/api/v1/whoami", headers=AUTH) as resp:
            whoami = orjson.loads(await resp.read())
        async with session.get(f"{sim.base_url}/models", headers=AUTH) as resp:
            models = orjson.loads(await resp.read())
    billing, reference = sim.billing, full.billing
    every = [orjson.loads(line) for line in log.read_bytes().splitlines()]

    # Counts and totals: exact, bit for bit the fsum over every record (the log has them all).
    assert billing.billed_count == len(every) == len(reference.records) > 2 * keep
    assert billing.events == reference.events and billing.events["cut"] > 0 and billing.events["rate_limited"] > 0
    assert billing.response_count == total
    assert billing.spent_usd == billing.billed_usd() == math.fsum(r["total_cost_usd"] for r in every)
    done = [r["total_cost_usd"] for r in every if r["status"] == "completed"]
    assert billing.completed_total_usd() == math.fsum(done) == reference.completed_total_usd()
    cut = [r["total_cost_usd"] for r in every if r["status"] == "cut"]
    assert billing.cut_total_usd() == math.fsum(cut) == reference.cut_total_usd()
    assert billing.spent_usd == reference.spent_usd
    # The endpoints answer from the totals: the balance left, and prices stepped by the billed count.
    assert whoami["data"]["balance"]["usd"] == f"{10.0 - billing._spent:.6f}"
    assert abs(billing._spent - billing.spent_usd) < 1e-12
    factor = 1.5 ** (len(every) // 7)
    assert {m["id"]: m["pricing"]["completion_usd_per_1m"] for m in models["data"]}[MODEL] == 4.0 * factor
    assert [r["price_factor"] for r in every] == [r["price_factor"] for r in reference.records]

    # Only the latest `keep` records and responses are kept; asking for all of them says so.
    assert billing.records_dropped == len(every) - keep and billing.responses_dropped == total - keep
    assert billing.kept_records() == every[-keep:]
    assert [r["seq"] for r in billing.kept_records()] == list(range(len(every) - keep, len(every)))
    assert [r["request_id"] for r in billing.kept_responses()] == ids[-keep:]
    for accessor in (
        lambda: billing.records,
        lambda: billing.responses,
        billing.completed,
        billing.cut,
        billing.completed_count_by_client_id,
    ):
        with pytest.raises(BillingRecordsDropped, match="dropped"):
            accessor()
    for record in every[-keep:]:
        assert billing.record_for(record["request_id"]) == record
    with pytest.raises(BillingRecordsDropped, match="billing log"):
        billing.record_for(every[0]["request_id"])  # billed, then dropped
    with pytest.raises(BillingRecordsDropped):
        billing.record_for("req_never_seen")  # cannot tell "never billed" from "dropped"
    assert billing.record_for(None) is None
    assert len(billing._by_request_id) == keep


async def test_within_the_bound_everything_is_kept(session: aiohttp.ClientSession) -> None:
    async with running_simulator(SimulatorConfig(seed=2, keep_records=8)) as sim:
        assert sim.billing.records == [] and sim.billing.responses == []
        for i in range(8):
            await post(session, sim.base_url, i)
        billing = sim.billing
        assert billing.records_dropped == 0 and len(billing.records) == 8 == len(billing.responses)
        assert len(billing.completed()) == 8 and billing.cut() == []
        assert set(billing.completed_count_by_client_id().values()) == {1}
        assert billing.record_for("req_never_seen") is None  # nothing dropped: truly never billed
        await post(session, sim.base_url, 8)  # the ninth drops the first
        assert billing.records_dropped == 1 and len(billing.kept_records()) == 8
        with pytest.raises(BillingRecordsDropped):
            _ = billing.records


async def test_keep_no_records_still_counts_and_sums(session: aiohttp.ClientSession) -> None:
    async with running_simulator(SimulatorConfig(seed=4, keep_records=0)) as sim:
        costs = []
        for i in range(5):
            async with session.post(
                f"{sim.base_url}/chat/completions", data=chat(f"q{i}", stream=False), headers=AUTH
            ) as resp:
                costs.append(orjson.loads(await resp.read())["usage"]["total_cost_usd"])
    billing = sim.billing
    assert billing.kept_records() == [] and billing.kept_responses() == [] and billing._by_request_id == {}
    assert billing.billed_count == 5 == billing.response_count == billing.events["completed"]
    assert billing.spent_usd == billing.completed_total_usd() == math.fsum(costs) and billing.cut_total_usd() == 0.0
    with pytest.raises(BillingRecordsDropped):
        _ = billing.records


def per_request_sizes(sim: Any) -> dict[str, int]:
    """The entry count of every structure in a simulator that could grow with the requests served."""
    billing, simulator = sim.billing, the_simulator(sim.app)
    return {
        "records": len(billing._records),
        "by_request_id": len(billing._by_request_id),
        "responses": len(billing._responses),
        "events": len(billing.events),
        "partials": max(len(billing._total._partials), *(len(s._partials) for s in billing._totals.values())),
        "keys": len(simulator.keys),
        "instance": len(vars(simulator)),
        "billing_instance": len(vars(billing)),
    }


async def test_memory_is_flat_in_the_requests_served(session: aiohttp.ClientSession) -> None:
    total, keep, workers = 20_000, 16, 32
    config = SimulatorConfig(seed=9, keep_records=keep, min_completion_tokens=1, max_completion_tokens=1)
    async with running_simulator(config) as sim:
        counter = iter(range(total))
        peaks: dict[str, int] = {}

        async def worker() -> None:
            for i in counter:
                assert (await post(session, sim.base_url, i))[0] == 200
                if i % 500 == 0:
                    for name, size in per_request_sizes(sim).items():
                        peaks[name] = max(peaks.get(name, 0), size)

        await asyncio.gather(*(worker() for _ in range(workers)))
        final = per_request_sizes(sim)
    assert sim.billing.billed_count == total == sim.billing.response_count
    assert final["records"] == final["by_request_id"] == final["responses"] == keep
    for name in ("records", "by_request_id", "responses"):
        assert peaks[name] <= keep, (name, peaks)
    assert peaks["events"] <= 16 and peaks["partials"] <= 64 and peaks["keys"] <= 1
    assert final["instance"] == peaks["instance"] and final["billing_instance"] == peaks["billing_instance"]


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """The simulator's monotonic clock, set by the test (only the simulator's own ``time`` is replaced)."""
    now = [1000.0]
    clock = types.SimpleNamespace(monotonic=lambda: now[0], time=time.time)
    monkeypatch.setattr(simulator_module, "time", clock)
    yield now


async def test_idle_keys_are_forgotten(session: aiohttp.ClientSession, fake_clock: list[float]) -> None:
    sweep_at = simulator_module._KEYS_SWEEP_AT
    config = SimulatorConfig(key_limits=True, key_rpm_limit=2, key_burst_limit=2, keep_records=4)
    async with running_simulator(config) as sim:
        simulator = the_simulator(sim.app)
        for i in range(sweep_at):
            assert (await post(session, sim.base_url, i, key=f"gp-k{i}", stream=False))[0] == 200
        # Within their windows every key is remembered: the limits still hold for each.
        assert len(simulator.keys) == sweep_at
        assert (await post(session, sim.base_url, 0, key="gp-k0", stream=False))[0] == 200
        assert (await post(session, sim.base_url, 0, key="gp-k0", stream=False))[0] == 429  # minute window full
        fake_clock[0] += 61.0  # every window over: the keys' states are a new key's again
        for i in range(sweep_at, sweep_at + 3 * sweep_at):
            assert (await post(session, sim.base_url, i, key=f"gp-k{i}", stream=False))[0] == 200
            if i % 97 == 0:
                fake_clock[0] += 61.0
        assert len(simulator.keys) <= 2 * sweep_at
        # A forgotten key starts afresh, exactly as a remembered idle one would.
        fake_clock[0] += 61.0
        assert [(await post(session, sim.base_url, 0, key="gp-k0", stream=False))[0] for _ in range(3)] == [
            200,
            200,
            429,
        ]
