"""Real processes sharing one budget file: together they never pass the cap, even when some are killed -9."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batchgate.budget import budget_status

WORKER = """
import random, sys, time
from pathlib import Path
from batchgate.budget import CapBook, CapSpec

budget, cap, seed, pause = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
rng = random.Random(seed)
book = CapBook.open(CapSpec(daily_cap_usd=cap), None, budget)
print("OPEN", flush=True)
while True:
    worst = rng.uniform(0.001, 0.02)
    r = book.try_reserve(worst)
    if r is None:
        break
    print("R", worst, flush=True)  # sent: from here on the request may be billed
    time.sleep(rng.uniform(0, pause))
    actual = worst * rng.uniform(0.3, 1.0)
    book.settle(r, actual)
    print("S", worst, actual, flush=True)
book.close()
print("DONE", book.refused.message if book.refused else "", flush=True)
"""


def _spawn(tmp_path: Path, budget: Path, cap: float, seed: int, pause: float = 0.002) -> subprocess.Popen[bytes]:
    """A worker whose stdout goes to ``out-SEED.txt`` (a file, so reading it early loses nothing)."""
    script = tmp_path / "worker.py"
    if not script.exists():  # rewriting it while an earlier worker starts up would hand that one half a script
        script.write_text(WORKER)
    with open(tmp_path / f"out-{seed}.txt", "wb") as out:
        return subprocess.Popen(
            [sys.executable, str(script), str(budget), str(cap), str(seed), str(pause)], stdout=out, stderr=out
        )


def _output(tmp_path: Path, seed: int) -> str:
    return (tmp_path / f"out-{seed}.txt").read_text()


def _billed(out: str) -> tuple[float, bool]:
    """What a worker may have been billed: settled actuals plus a request in flight when it died."""
    billed, inflight, done = 0.0, 0.0, False
    for line in out.splitlines():
        parts = line.split()
        if parts[0] == "R":
            inflight = float(parts[1])
        elif parts[0] == "S":
            billed += float(parts[2])
            inflight = 0.0
        elif parts[0] == "DONE":
            done = True
    return billed + inflight, done


def test_eight_processes_share_one_daily_cap(tmp_path: Path) -> None:
    budget = tmp_path / "budget.jsonl"
    procs = [_spawn(tmp_path, budget, 1.0, seed) for seed in range(8)]
    for p in procs:
        p.wait(timeout=120)
    outs = [_output(tmp_path, seed) for seed in range(8)]
    assert all(p.returncode == 0 for p in procs), outs
    billed = [_billed(out) for out in outs]
    assert all(done for _, done in billed), outs
    total = sum(b for b, _ in billed)
    assert total <= 1.0 + 1e-9
    assert total > 0.8  # the cap was shared, not hoarded: leases went back at close
    assert sum(1 for b, _ in billed if b > 0) >= 2  # they really competed
    daily = next(s for s in budget_status(None, budget).scopes if s.scope == "daily")
    assert daily.settled_usd == pytest.approx(total)
    assert "daily cap $1.00 used up" in outs[0]


def test_processes_killed_at_random_never_let_the_cap_pass(tmp_path: Path) -> None:
    budget = tmp_path / "budget.jsonl"
    rng = random.Random(7)
    # The four to be killed are slow, so they are still buying when the kill comes; the four fast
    # ones start once those are buying (on a loaded machine they could use the cap up first).
    slow = [_spawn(tmp_path, budget, 2.0, seed, pause=0.05) for seed in range(4)]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all("\nS " in _output(tmp_path, seed) for seed in range(4)):
        time.sleep(0.005)
    procs = slow + [_spawn(tmp_path, budget, 2.0, seed, pause=0.005) for seed in range(4, 8)]
    for seed, p in enumerate(procs[:4]):
        deadline = time.monotonic() + 60
        wanted = rng.randint(1, 6)
        while _output(tmp_path, seed).count("\nS ") < wanted and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.03))
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
    for p in procs:
        p.wait(timeout=120)
    killed = [p for p in procs[:4] if p.returncode == -signal.SIGKILL]
    assert len(killed) >= 2  # on a loaded machine a slow worker may see the cap used up before its kill
    assert all(p.returncode in (0, -signal.SIGKILL) for p in procs)
    late = _spawn(tmp_path, budget, 2.0, 99)  # one more run after the crashes takes what is left
    assert late.wait(timeout=120) == 0, _output(tmp_path, 99)
    billed = [_billed(_output(tmp_path, seed))[0] for seed in [*range(8), 99]]
    assert sum(billed) <= 2.0 + 1e-9
    daily = next(s for s in budget_status(None, budget).scopes if s.scope == "daily")
    assert daily.used_usd >= sum(billed) - 1e-9  # the file never claims less than may have been billed
    assert daily.possibly_spent_usd > 0  # the killed runs' leases are shown apart
    assert daily.used_usd <= 2.0 + 1e-9
