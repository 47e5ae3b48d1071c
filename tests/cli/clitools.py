"""Run the real `batchgate` command and a real simulator process, as a user would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

# The command installed beside the interpreter running the tests (a venv need not be on PATH).
_beside = Path(sys.executable).with_name("batchgate")
BATCHGATE = str(_beside) if _beside.exists() else (shutil.which("batchgate") or "batchgate")
REPO = Path(__file__).resolve().parents[2]


def env(**extra: str) -> dict[str, str]:
    """The environment of a test's command: none of the developer's settings, and no key limits.

    The test simulator enforces no per-key limits (unless a test asks it to), so runs go at full
    speed; a test of the limits passes BATCHGATE_KEY_LIMITS=on.
    """
    e = {k: v for k, v in os.environ.items() if not k.startswith(("GONKAGATE_", "BATCHGATE_"))}
    e["BATCHGATE_KEY_LIMITS"] = "off"
    e.update(extra)
    return e


def bg(*args: str, key: str | None = "gp-test", timeout: float = 240) -> subprocess.CompletedProcess[str]:
    extra = {"GONKAGATE_API_KEY": key} if key else {}
    return subprocess.run(
        [BATCHGATE, *args], capture_output=True, text=True, env=env(**extra), timeout=timeout, check=False
    )


class Sim:
    def __init__(self, proc: subprocess.Popen[str], url: str, billing_log: Path) -> None:
        self.proc, self.url, self.billing_log = proc, url, billing_log

    def billing(self) -> list[dict[str, Any]]:
        return [orjson.loads(x) for x in self.billing_log.read_bytes().splitlines()]

    def settle(self, quiet_s: float = 0.2, limit_s: float = 10.0) -> int:
        """Wait until the billing log stops growing (streams of a killed client billed); return its records."""
        deadline = time.monotonic() + limit_s
        size, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            now = self.billing_log.stat().st_size if self.billing_log.exists() else 0
            if now != size:
                size, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet_s:
                break
            time.sleep(0.02)
        else:
            pytest.fail("the simulator's billing log kept growing with no client running")
        return len(self.billing())


def simulator_fixture(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Sim]:
    args = getattr(request, "param", [])
    log = tmp_path / "billing.jsonl"
    log.touch()
    proc = subprocess.Popen(
        [BATCHGATE, "simulate", "--port", "0", "--billing-log", str(log), *args],
        stdout=subprocess.PIPE,
        text=True,
        env=env(),
    )
    assert proc.stdout is not None
    try:
        first = proc.stdout.readline().strip()
        assert first.startswith("listening on http://127.0.0.1:"), first
        yield Sim(proc, first.removeprefix("listening on "), log)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()


def prompts(path: Path, n: int) -> Path:
    with path.open("w") as f:
        for i in range(n):
            line = {"id": f"p{i}", "prompt": f"prompt number {i} " + "pad " * (i % 23), "max_tokens": 30}
            f.write(orjson.dumps(line).decode() + "\n")
    return path
