"""Shards as separate processes over one input, and several samples per prompt, from the command line."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path
from urllib.parse import unquote

import orjson
import pytest
from clitools import BATCHGATE, Sim, bg, env


def write_prompts(path: Path, n: int) -> Path:
    path.write_bytes(b"".join(orjson.dumps({"id": f"p{i}", "prompt": f"prompt {i}"}) + b"\n" for i in range(n)))
    return path


@pytest.mark.parametrize("simulator", [["--seed", "3"]], indirect=True)
def test_three_shards_in_three_processes_split_one_input_exactly(tmp_path: Path, simulator: Sim) -> None:
    src = write_prompts(tmp_path / "prompts.jsonl", 90)
    out = tmp_path / "out"
    procs = [
        subprocess.Popen(
            [
                BATCHGATE,
                "run",
                str(src),
                "--model",
                "sim-model",
                "--base-url",
                simulator.url,
                "--out",
                str(out),
                "--shard",
                f"{k}/3",
                "--no-report",
                "--quiet",
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env(GONKAGATE_API_KEY="gp-test"),
        )
        for k in (1, 2, 3)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    ids: list[str] = []
    ledger_total = []
    for k in (1, 2, 3):
        rows = [orjson.loads(x) for x in (out / f"shard-{k}-of-3" / "results.jsonl").read_bytes().splitlines()]
        ids += [r["id"] for r in rows]
        ledger_total += [r["total_cost_usd"] for r in rows]
    assert sorted(ids) == sorted(f"p{i}" for i in range(90))  # disjoint and complete
    simulator.settle()
    billed = [b for b in simulator.billing() if b["status"] == "completed"]
    assert sorted(unquote(b["client_request_id"]) for b in billed) == sorted(ids)
    assert abs(math.fsum(ledger_total) - math.fsum(b["total_cost_usd"] for b in billed)) < 1e-9


def test_bad_shard_specs_are_one_clear_line(tmp_path: Path) -> None:
    src = write_prompts(tmp_path / "prompts.jsonl", 3)
    for spec in ("0/3", "4/3", "x", "2"):
        res = bg("run", str(src), "--simulate", "--model", "sim-model", "--shard", spec)
        assert res.returncode == 2 and "--shard" in res.stderr and "Traceback" not in res.stderr
    res = bg("run", str(src), "--simulate", "--model", "sim-model", "--shards", "3")
    assert res.returncode == 2 and "JOB_COMPLETION_INDEX" in res.stderr


def test_samples_give_rows_of_their_own(tmp_path: Path) -> None:
    src = write_prompts(tmp_path / "prompts.jsonl", 5)
    args = ["run", str(src), "--simulate", "--sim-token-delay", "0", "--model", "sim-model", "--out", "o",
            "--samples", "3", "--no-report", "--json"]  # fmt: skip
    res = bg(*args)
    assert res.returncode == 0, res.stderr
    assert orjson.loads(res.stdout.splitlines()[-1])["ok"] == 15
    again = orjson.loads(bg(*args).stdout.splitlines()[-1])
    assert (again["requests"], again["skipped"]) == (0, 15)
    rows = [orjson.loads(x) for x in Path("o/results.jsonl").read_bytes().splitlines()]
    assert sorted((r["id"], r["sample"]) for r in rows) == sorted((f"p{i}", s) for i in range(5) for s in range(3))


def test_a_model_the_catalog_lacks_is_exit_2_unless_the_check_is_off(tmp_path: Path) -> None:
    src = write_prompts(tmp_path / "prompts.jsonl", 3)
    common = ["run", str(src), "--simulate", "--sim-token-delay", "0", "--model", "not-listed", "--no-report"]
    res = bg(*common, "--out", "a")
    assert res.returncode == 2 and "not-listed" in res.stderr and "not in the catalog" in res.stderr
    assert not Path("a/results.jsonl").exists() or Path("a/results.jsonl").read_bytes() == b""
    res = bg(*common, "--out", "b", "--no-model-check")  # the simulator serves unlisted models
    assert res.returncode == 0, res.stderr
