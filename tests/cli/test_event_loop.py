"""`BATCHGATE_EVENT_LOOP=uvloop`: the same run, signals and resume on uvloop; a clear error otherwise."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import orjson
import pytest
from clitools import BATCHGATE, Sim, env, prompts


def run_args(tmp_path: Path, sim: Sim, n: int, *extra: str) -> list[str]:
    src = prompts(tmp_path / "p.jsonl", n)
    return ["run", str(src), "--model", "sim-model", "--base-url", sim.url, "--out", str(tmp_path / "out"), *extra]


def ok_ids(tmp_path: Path) -> list[str]:
    rows = [orjson.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_bytes().splitlines()]
    return [r["id"] for r in rows if r["status"] == "ok"]


@pytest.mark.parametrize("simulator", [["--token-delay", "0.02"]], indirect=True)
def test_a_run_on_uvloop_stops_on_sigterm_and_resumes_buying_each_answer_once(tmp_path: Path, simulator: Sim) -> None:
    pytest.importorskip("uvloop")
    args = run_args(tmp_path, simulator, 60, "-c", "4", "--no-report", "-q")
    loop_env = env(GONKAGATE_API_KEY="gp-test", BATCHGATE_EVENT_LOOP="uvloop")
    proc = subprocess.Popen([BATCHGATE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=loop_env)
    try:
        ledger = tmp_path / "out" / "results.jsonl"
        deadline = time.monotonic() + 30
        while not (ledger.exists() and ledger.read_bytes().count(b"\n") >= 4) and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    first = len(ok_ids(tmp_path))
    assert 4 <= first < 60
    again = subprocess.run([BATCHGATE, *args], capture_output=True, text=True, env=loop_env, timeout=120)
    assert again.returncode == 0, again.stderr
    assert sorted(ok_ids(tmp_path)) == sorted(f"p{i}" for i in range(60))  # each answer once
    simulator.settle()
    billed = [b["client_request_id"] for b in simulator.billing() if b["status"] == "completed"]
    assert sorted(billed) == sorted(f"p{i}" for i in range(60))  # SIGTERM let the streams in flight finish


def test_an_unknown_event_loop_is_a_clear_error(tmp_path: Path) -> None:
    src = prompts(tmp_path / "p.jsonl", 2)
    res = subprocess.run(
        [BATCHGATE, "run", str(src), "--simulate", "--model", "sim-model", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env=env(GONKAGATE_API_KEY="gp-test", BATCHGATE_EVENT_LOOP="trio"),
        timeout=60,
    )
    assert res.returncode == 2 and "BATCHGATE_EVENT_LOOP=trio: choose asyncio or uvloop" in res.stderr
    assert "Traceback" not in res.stderr
