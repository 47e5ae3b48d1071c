"""Unattended behaviour of the real command: signals, the output lock, --fresh, job files, logs."""

from __future__ import annotations

import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest
from clitools import BATCHGATE, Sim, bg, env, prompts

SLOW = ["--token-delay", "0.02"]  # ~0.5 s per answer: runs last long enough to interrupt


def ledger(out: Path) -> list[dict[str, object]]:
    return [orjson.loads(x) for x in (out / "results.jsonl").read_bytes().splitlines()]


def start_run(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [BATCHGATE, "run", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(GONKAGATE_API_KEY="gp-test"),
    )


def wait_for_rows(out: Path, n: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = out / "results.jsonl"
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} rows after {timeout}s")


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.mark.parametrize("simulator", [SLOW], indirect=True)
def test_sigterm_lets_in_flight_finish_then_resume_completes(tmp_path: Path, simulator: Sim) -> None:
    src = prompts(tmp_path / "p.jsonl", 200)
    out = tmp_path / "out"
    args = [str(src), "--model", "sim-model", "--base-url", simulator.url, "--out", str(out), "-c", "8", "--no-report"]
    proc = start_run(*args, "--grace", "30")
    try:
        wait_for_rows(out, 8)
        proc.send_signal(signal.SIGTERM)
        code, _, err = finish(proc)
    finally:
        proc.kill() if proc.poll() is None else None
    assert code == 143, err
    assert "resume" in err
    rows = ledger(out)
    # in-flight requests were allowed to finish: nothing was cut, every row is an answer
    assert rows and all(r["status"] == "ok" for r in rows)
    billed = [b for b in simulator.billing() if b["status"] == "completed"]
    assert len(billed) == len(rows)
    res = bg(*["run", *args, "-c", "64"])
    assert res.returncode == 0, res.stderr
    assert Counter(r["id"] for r in ledger(out) if r["status"] == "ok") == Counter(f"p{i}" for i in range(200))


@pytest.mark.parametrize("simulator", [SLOW], indirect=True)
def test_second_signal_cancels_at_once_and_ledger_stays_consistent(tmp_path: Path, simulator: Sim) -> None:
    src = prompts(tmp_path / "p.jsonl", 100)
    out = tmp_path / "out"
    proc = start_run(str(src), "--model", "sim-model", "--base-url", simulator.url, "--out", str(out), "-c", "8",
                     "--no-report", "--grace", "60")  # fmt: skip
    try:
        wait_for_rows(out, 4)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        code, _, err = finish(proc)
        assert time.monotonic() - t0 < 10
    finally:
        proc.kill() if proc.poll() is None else None
    assert code == 130, err
    rows = ledger(out)
    ids = [r["id"] for r in rows if r["status"] == "ok"]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("simulator", [SLOW], indirect=True)
def test_second_runner_on_same_out_exits_4_naming_the_pid(tmp_path: Path, simulator: Sim) -> None:
    src = prompts(tmp_path / "p.jsonl", 100)
    out = tmp_path / "out"
    args = [str(src), "--model", "sim-model", "--base-url", simulator.url, "--out", str(out), "-c", "4", "--no-report"]
    first = start_run(*args)
    try:
        wait_for_rows(out, 1)
        second = bg("run", *args)
        assert second.returncode == 4
        assert f"pid {first.pid}" in second.stderr
    finally:
        first.kill()
        finish(first)
    # the killed runner's lock is gone with it
    res = bg("run", *args[:-3], "-c", "64", "--no-report")
    assert res.returncode == 0, res.stderr


def test_fresh_starts_a_new_directory_and_keeps_the_old_ledger(tmp_path: Path, simulator: Sim) -> None:
    src = prompts(tmp_path / "p.jsonl", 10)
    out = tmp_path / "out"
    base = [
        "run",
        str(src),
        "--model",
        "sim-model",
        "--base-url",
        simulator.url,
        "--out",
        str(out),
        "--no-report",
        "--json",
    ]
    assert bg(*base).returncode == 0
    before = (out / "results.jsonl").read_bytes()
    res = bg(*base, "--fresh")
    assert res.returncode == 0
    summary = orjson.loads(res.stdout.strip().splitlines()[-1])
    assert summary["out"] != str(out) and summary["ok"] == 10
    assert (out / "results.jsonl").read_bytes() == before
    assert len(ledger(Path(summary["out"]))) == 10


def test_job_file_with_command_line_overrides(tmp_path: Path, simulator: Sim) -> None:
    (tmp_path / "p.jsonl").write_text("".join(f'{{"id": "n{i}", "prompt": "question {i}"}}\n' for i in range(12)))
    job = tmp_path / "night.toml"
    job.write_text(
        'name = "night"\ninputs = ["p.jsonl"]\nout = "from-job"\nmodel = "Qwen/Qwen3-32B-FP8"\nconcurrency = 3\n'
        'system = "Be brief."\n[chat]\nmax_tokens = 5\n'
    )
    res = bg("run", str(job), "--base-url", simulator.url, "--model", "sim-model", "--no-report", "--json")
    assert res.returncode == 0, res.stderr
    summary = orjson.loads(res.stdout.strip().splitlines()[-1])
    assert Path(summary["out"]).name == "from-job"
    rows = ledger(Path(summary["out"]))
    assert {r["model"] for r in rows} == {"sim-model"}  # the command line wins
    assert {r["job"] for r in rows} == {"night"}
    assert all(r["completion_tokens"] <= 5 for r in rows)  # the job's chat defaults apply


def test_json_log_lines_for_log_shippers(tmp_path: Path, simulator: Sim) -> None:
    src = prompts(tmp_path / "p.jsonl", 5)
    res = bg("run", str(src), "--model", "sim-model", "--base-url", simulator.url, "--out", str(tmp_path / "o"),
             "--no-report", "--log-format", "json")  # fmt: skip
    assert res.returncode == 0
    events = [orjson.loads(line) for line in res.stderr.splitlines()]
    assert events[0]["event"] == "start" and events[-1]["event"] == "end" and events[-1]["ok"] == 5


def test_quiet_prints_nothing_on_success(tmp_path: Path, simulator: Sim) -> None:
    src = prompts(tmp_path / "p.jsonl", 5)
    res = bg("run", str(src), "--model", "sim-model", "--base-url", simulator.url, "--out", str(tmp_path / "o"), "-q")
    assert res.returncode == 0 and res.stdout == "" and res.stderr == ""


def test_budget_stop_exits_3_with_a_message(tmp_path: Path, simulator: Sim) -> None:
    src = prompts(tmp_path / "p.jsonl", 200)
    res = bg("run", str(src), "--model", "sim-model", "--base-url", simulator.url, "--out", str(tmp_path / "o"),
             "--max-cost", "0.002", "--no-report", "--json")  # fmt: skip
    assert res.returncode == 3, res.stderr
    assert "--max-cost" in res.stderr and "left" in res.stderr
    assert orjson.loads(res.stdout.strip().splitlines()[-1])["stop_reason"] == "budget"


def test_no_traceback_for_a_bad_job_file(tmp_path: Path) -> None:
    job = tmp_path / "bad.toml"
    job.write_text('inputs = ["p.jsonl"]\nmax_cost = 1\n')
    res = bg("run", str(job))
    assert res.returncode == 2 and "max_cost: unknown key" in res.stderr and "Traceback" not in res.stderr


def test_full_disk_stops_cleanly_and_resume_finishes(tmp_path: Path, simulator: Sim) -> None:
    """A ledger that cannot grow (RLIMIT_FSIZE stands in for a full disk) stops the run, exit 1."""
    import resource

    src = prompts(tmp_path / "p.jsonl", 300)
    out = tmp_path / "out"
    args = ["run", str(src), "--model", "sim-model", "--base-url", simulator.url, "--out", str(out), "--no-report"]

    def small_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of dying
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    res = subprocess.run(
        [BATCHGATE, *args],
        capture_output=True,
        text=True,
        env=env(GONKAGATE_API_KEY="gp-test", PYTHONDONTWRITEBYTECODE="1"),
        preexec_fn=small_disk,
        timeout=120,
        check=False,
    )
    assert res.returncode == 1, res.stderr
    assert "cannot append" in res.stderr and "Traceback" not in res.stderr
    written = ledger(out)  # still readable, whole rows only
    assert 0 < len(written) < 300
    again = bg(*args)
    assert again.returncode == 0, again.stderr
    assert Counter(r["id"] for r in ledger(out) if r["status"] == "ok") == Counter(f"p{i}" for i in range(300))


@pytest.mark.parametrize(("soft", "hard", "lowered"), [(256, 4096, False), (200, 200, True)])
def test_high_concurrency_needs_no_ulimit_tweaks(
    tmp_path: Path, simulator: Sim, soft: int, hard: int, lowered: bool
) -> None:
    import resource

    src = prompts(tmp_path / "p.jsonl", 900)
    res = subprocess.run(
        [BATCHGATE, "run", str(src), "--model", "sim-model", "--base-url", simulator.url, "--out", str(tmp_path / "o"),
         "-c", "600", "--no-report", "--json"],
        capture_output=True,
        text=True,
        env=env(GONKAGATE_API_KEY="gp-test"),
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)),
        timeout=120,
        check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    summary = orjson.loads(res.stdout.strip().splitlines()[-1])
    assert summary["ok"] == 900 and summary["retries"] == 0
    assert ("open-files limit" in res.stderr) is lowered
