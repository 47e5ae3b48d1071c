"""`batchgate estimate` as a user runs it, then the full run that reuses the sample."""

from __future__ import annotations

import math
import signal
import subprocess
import time
from pathlib import Path

import orjson
import pytest
from clitools import BATCHGATE, Sim, bg, env


def varied_prompts(path: Path, n: int) -> Path:
    with path.open("w") as f:
        for i in range(n):
            line = {"id": f"e{i}", "prompt": f"topic {i} " + "detail " * (i % 60), "max_tokens": [16, 48, 200][i % 3]}
            f.write(orjson.dumps(line).decode() + "\n")
    return path


def test_estimate_then_run_reuses_the_sample(tmp_path: Path, simulator: Sim) -> None:
    src = varied_prompts(tmp_path / "big.jsonl", 1500)
    out = tmp_path / "out"
    common = ["--model", "sim-model", "--base-url", simulator.url, "--out", str(out), "--no-report"]
    est = bg("estimate", str(src), *common[:-1], "--sample", "150", "--seed", "3", "--json")
    assert est.returncode == 0, est.stderr
    assert "95% interval" in est.stdout
    result = orjson.loads(est.stdout.strip().splitlines()[-1])
    assert result["status"] == "estimated" and result["sample"]["bought"] == 150
    assert (out / "estimate.json").exists() and (out / "estimate.csv").exists()
    low, high = result["total"]["cost_low_usd"], result["total"]["cost_high_usd"]

    run = bg("run", str(src), *common, "--json")
    assert run.returncode == 0, run.stderr
    summary = orjson.loads(run.stdout.strip().splitlines()[-1])
    assert summary["skipped"] == 150 and summary["ok"] == 1350
    billed = [b for b in simulator.billing() if b["status"] == "completed"]
    assert len(billed) == 1500  # each prompt bought exactly once across estimate + run
    actual = math.fsum(b["total_cost_usd"] for b in billed)  # type: ignore[misc]
    # Coverage of the interval is a rate (94% over 50 seeds in benchmarks/bench_estimate.py); one
    # deterministic seed is checked for the point estimate and a sane interval around it.
    assert low < result["total"]["cost_usd"] < high
    assert abs(result["total"]["cost_usd"] - actual) / actual < 0.05


def test_sample_of_zero_is_refused(tmp_path: Path) -> None:
    src = varied_prompts(tmp_path / "p.jsonl", 10)
    res = bg("estimate", str(src), "--model", "sim-model", "--sample", "0", "--simulate")
    assert res.returncode == 2 and "--sample 0" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("simulator", [["--token-delay", "0.02"]], indirect=True)
def test_sigint_stops_the_sample_run_like_a_run(tmp_path: Path, simulator: Sim) -> None:
    src = varied_prompts(tmp_path / "p.jsonl", 400)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [BATCHGATE, "estimate", str(src), "--model", "sim-model", "--base-url", simulator.url, "--out", str(out),
         "--sample", "200", "-c", "4"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(GONKAGATE_API_KEY="gp-test"),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (out / "results.jsonl").exists() or not (out / "results.jsonl").read_bytes().count(b"\n"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "resume" in err
