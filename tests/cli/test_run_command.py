"""The `batchgate` command as a user runs it: real subprocesses, a real simulator process."""

from __future__ import annotations

import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import orjson
import pytest
from clitools import BATCHGATE, REPO, Sim, bg, env, prompts

FAULTS = [
    "--seed", "7",
    "--reset-rate", "0.03", "--stall-rate", "0.02", "--stall-s", "2",
    "--rate-limit-rate", "0.03", "--retry-after", "0.01",
    "--server-error-rate", "0.03", "--midstream-error-rate", "0.03",
]  # fmt: skip


@pytest.mark.parametrize("simulator", [FAULTS], indirect=True)
def test_thousand_prompts_with_every_fault(tmp_path: Path, simulator: Sim) -> None:
    src = prompts(tmp_path / "big.jsonl", 1000)
    out = tmp_path / "out"
    res = bg(
        "run", str(src), "--model", "sim-model", "--base-url", simulator.url, "--out", str(out),
        "--json", "--concurrency", "64", "--idle-timeout", "0.5", "--backoff", "0.005", "--max-attempts", "10",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    summary = orjson.loads(res.stdout.strip().splitlines()[-1])
    for key in ("run_id", "out", "requests", "ok", "failed", "prompt_tokens", "completion_tokens",
                "total_cost_usd", "unconfirmed_cost_usd", "wall_s", "exit_code"):  # fmt: skip
        assert key in summary
    assert summary["ok"] == 1000 and summary["exit_code"] == 0
    rows = [orjson.loads(x) for x in (out / "results.jsonl").read_bytes().splitlines()]
    assert Counter(r["id"] for r in rows if r["status"] == "ok") == Counter(f"p{i}" for i in range(1000))
    billed = [b for b in simulator.billing() if b["status"] == "completed"]
    ledger_total = math.fsum(r["total_cost_usd"] for r in rows)
    billed_total = math.fsum(b["total_cost_usd"] for b in billed)  # type: ignore[misc]
    assert abs(ledger_total - billed_total) < 1e-9
    assert abs(summary["total_cost_usd"] - billed_total) < 1e-9
    assert sum(len(r["retry_causes"]) for r in rows) > 0
    assert "Traceback" not in res.stderr


def test_bad_input_lists_problems_sends_nothing_exits_2(tmp_path: Path) -> None:
    src = tmp_path / "bad.jsonl"
    src.write_text('{"id": "a", "prompt": "fine"}\n{not json\n\n{"id": "a", "prompt": "dup"}\n{"id": "b"}\n')
    res = bg(
        "run", str(src), "--model", "sim-model", "--base-url", "http://127.0.0.1:9/v1", "--out", str(tmp_path / "o")
    )
    assert res.returncode == 2
    assert f"{src}:2:" in res.stderr
    assert f"{src}:4:" in res.stderr and "duplicate" in res.stderr
    assert f"{src}:5:" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "o" / "results.jsonl").exists()


def test_missing_key_is_one_clear_line(tmp_path: Path) -> None:
    res = bg("run", str(prompts(tmp_path / "p.jsonl", 3)), "--model", "sim-model", key=None)
    assert res.returncode == 2
    assert "GONKAGATE_API_KEY" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_wrong_key_exits_2_and_never_echoes_it(tmp_path: Path, simulator: Sim) -> None:
    src = prompts(tmp_path / "p.jsonl", 20)
    secret = "sk-this-is-secret-123"
    res = bg(
        "run", str(src), "--model", "sim-model", "--base-url", simulator.url, "--out", str(tmp_path / "o"), key=secret
    )
    assert res.returncode == 2
    assert "rejected the API key" in res.stderr
    written = b"".join(p.read_bytes() for p in (tmp_path / "o").iterdir() if p.is_file())
    assert secret.encode() not in (res.stdout + res.stderr).encode() + written


def test_key_file_is_used_and_kept_secret(tmp_path: Path, simulator: Sim) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("gp-from-a-file-42\n")
    src = prompts(tmp_path / "p.jsonl", 5)
    out = tmp_path / "o"
    res = bg("run", str(src), "--model", "sim-model", "--base-url", simulator.url, "--api-key-file", str(key_file),
             "--out", str(out), key=None)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "gp-from-a-file-42" not in res.stdout + res.stderr + (out / "results.jsonl").read_text()


def test_unreachable_base_url_is_one_clear_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = prompts(tmp_path / "p.jsonl", 10)
    res = bg("run", str(src), "--model", "sim-model", "--base-url", f"http://127.0.0.1:{port}/v1", "--out",
             str(tmp_path / "o"), "--max-attempts", "2", "--backoff", "0.01", "--quiet")  # fmt: skip
    assert res.returncode == 2
    assert "cannot connect" in res.stderr and "Traceback" not in res.stderr


def test_no_such_input_file(tmp_path: Path) -> None:
    res = bg("run", str(tmp_path / "nope.jsonl"), "--model", "sim-model")
    assert res.returncode == 2
    assert "nope.jsonl" in res.stderr and "Traceback" not in res.stderr


def test_demo_on_the_builtin_simulator(tmp_path: Path) -> None:
    res = subprocess.run(
        [BATCHGATE, "run", str(REPO / "jobs" / "demo.jsonl"), "--simulate", "--out", str(tmp_path / "demo")],
        capture_output=True, text=True, env=env(), timeout=120, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "50 ok" in res.stdout
    assert "confirmed" in res.stdout


def test_module_entry_point_shows_help() -> None:
    res = subprocess.run([sys.executable, "-m", "batchgate", "--help"], capture_output=True, text=True, check=False)
    assert res.returncode == 0 and "run" in res.stdout and "simulate" in res.stdout


def test_validate_checks_without_sending(tmp_path: Path) -> None:
    good = bg("validate", str(REPO / "jobs" / "nightly.toml"), key=None)
    assert good.returncode == 0 and "100 prompts" in good.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "ok"}\n{"id": "b", "prompt": 3}\n')
    res = bg("validate", str(bad), "--model", "sim-model", key=None)
    assert res.returncode == 2 and f"{bad}:2:" in res.stderr


@pytest.mark.parametrize("simulator", [["--keep-records", "0"]], indirect=True)
def test_a_simulator_keeping_no_records_still_bills_every_request_to_its_log(tmp_path: Path, simulator: Sim) -> None:
    src = prompts(tmp_path / "p.jsonl", 20)
    res = bg("run", str(src), "--model", "sim-model", "--base-url", simulator.url, "--out", str(tmp_path / "o"), "-q")
    assert res.returncode == 0, res.stderr
    assert simulator.settle() == 20 and {b["status"] for b in simulator.billing()} == {"completed"}


def test_the_simulate_flag_default_is_the_simulators() -> None:
    from batchgate.cli import simulate
    from batchgate.simulator import DEFAULT_KEEP_RECORDS

    (keep,) = [p for p in simulate.params if p.name == "keep_records"]
    assert keep.default == DEFAULT_KEEP_RECORDS
