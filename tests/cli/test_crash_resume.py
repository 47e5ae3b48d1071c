"""Resume after ``kill -9``: real `batchgate run` subprocesses killed mid-run against a real simulator process.

The simulator's billing log is the independent account: every request it billed, with the content it
sent.  Checked against it after several SIGKILLs and a final resumed run: every id is ``ok`` exactly
once, no row the killed runs wrote is lost, each answer is the one the simulator sent, and an answer
is bought twice only when the kill caught it in flight (billed, but its row not yet in the ledger).
"""

from __future__ import annotations

import math
import random
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import orjson
import pytest
from clitools import BATCHGATE, Sim, env

CONCURRENCY = 32
PROMPTS = 1500
KILLS = 10
# Stalls are left out on purpose: a stream the client gave up on can still be billed "completed"
# by a stalled server, which would blur the "billed twice only if in flight at a kill" accounting.
FAULTS = [
    "--reset-rate", "0.02", "--midstream-error-rate", "0.02",
    "--rate-limit-rate", "0.02", "--retry-after", "0.01", "--server-error-rate", "0.02",
]  # fmt: skip


def prompt_ids(n: int) -> list[str]:
    # A few ids that need quoting in X-Client-Request-Id, so the billing log is matched through unquote().
    return [f"p{i}" if i % 97 else f"q {i}/ä%?" for i in range(n)]


def write_prompts(path: Path, ids: list[str]) -> Path:
    with path.open("wb") as f:
        for i, rid in enumerate(ids):
            f.write(orjson.dumps({"id": rid, "prompt": f"prompt number {i} " + "pad " * (i % 23)}) + b"\n")
    return path


def run_args(src: Path, sim: Sim, out: Path) -> list[str]:
    return [
        BATCHGATE, "run", str(src), "--model", "sim-model", "--base-url", sim.url, "--out", str(out),
        "--concurrency", str(CONCURRENCY), "--max-attempts", "10", "--backoff", "0.005",
        "--no-report", "--quiet",
    ]  # fmt: skip


def run_to_end(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, capture_output=True, text=True, env=env(GONKAGATE_API_KEY="gp-test"), timeout=timeout, check=False
    )


def count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@dataclass
class Snapshot:
    """The ledger as a killed run left it."""

    data: bytes
    rows: list[dict[str, Any]] = field(default_factory=list)  # complete rows, a kept tail included
    kept: bytes = b""  # what every later ledger must start with
    torn: bytes = b""  # a torn last line, to be set aside by the next run

    @classmethod
    def parse(cls, data: bytes) -> Snapshot:
        snap = cls(data)
        body, _, tail = data.rpartition(b"\n")
        for n, line in enumerate(body.split(b"\n") if body else [], 1):
            row = orjson.loads(line)  # readable: every complete line is a row
            assert isinstance(row, dict) and "id" in row and "status" in row, f"line {n}: {line[:200]!r}"
            snap.rows.append(row)
        snap.kept = body + b"\n" if body else b""
        if tail:
            try:
                row = orjson.loads(tail)
            except orjson.JSONDecodeError:
                row = None
            if isinstance(row, dict) and "id" in row and "status" in row:
                snap.rows.append(row)  # complete but for its newline: must be kept
                snap.kept += tail + b"\n"
            else:
                snap.torn = tail
        return snap

    def ok_ids(self) -> set[str]:
        return {r["id"] for r in self.rows if r["status"] == "ok"}


@dataclass
class Kill:
    snapshot: Snapshot
    billed_upto: int  # billing records after the killed run's streams were all billed
    after_rows: int  # ledger lines when the kill was sent


def kill_mid_run(args: list[str], ledger: Path, target_rows: int, jitter_s: float, err_path: Path) -> int:
    """Start a run, SIGKILL it ``jitter_s`` after the ledger reaches ``target_rows`` lines; return those lines."""
    with err_path.open("wb") as err:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err, env=env(GONKAGATE_API_KEY="gp-test"))
        try:
            deadline = time.monotonic() + 60
            while count_lines(ledger) < target_rows:
                assert proc.poll() is None, (
                    f"run ended (exit {proc.returncode}) before the kill: {err_path.read_text()}"
                )
                assert time.monotonic() < deadline, "run made no progress"
                time.sleep(0.005)
            time.sleep(jitter_s)
            assert proc.poll() is None, f"run ended (exit {proc.returncode}) before the kill"
            lines = count_lines(ledger)
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(10) == -signal.SIGKILL
            return lines
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("simulator", [["--seed", "11", "--token-delay", "0.002", *FAULTS]], indirect=True)
def test_sigkill_at_random_moments_then_resume(tmp_path: Path, simulator: Sim) -> None:
    rng = random.Random(20240604)
    ids = prompt_ids(PROMPTS)
    src = write_prompts(tmp_path / "prompts.jsonl", ids)
    out = tmp_path / "out"
    ledger = out / "results.jsonl"
    args = run_args(src, simulator, out)

    # Kill points: random ledger sizes spread over the first 80%, each plus a random delay, so a kill
    # lands anywhere between two flushes whatever the machine's speed.
    targets = sorted(rng.sample(range(20, int(PROMPTS * 0.8)), KILLS))
    kills: list[Kill] = []
    for k, target in enumerate(targets):
        after = kill_mid_run(args, ledger, target, rng.uniform(0.0, 0.15), tmp_path / f"run{k}.err")
        billed = simulator.settle()
        kills.append(Kill(Snapshot.parse(ledger.read_bytes()), billed, after))

    res = run_to_end([*args, "--json"])
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    simulator.settle()
    final_summary = orjson.loads(res.stdout.strip().splitlines()[-1])

    final = ledger.read_bytes()
    final_snap = Snapshot.parse(final)
    assert final.endswith(b"\n") and not final_snap.torn
    rows = final_snap.rows
    ok_rows = {r["id"]: r for r in rows if r["status"] == "ok"}
    assert Counter(r["id"] for r in rows if r["status"] == "ok") == Counter(ids)  # every id ok exactly once

    # No row lost: each killed run's ledger (a complete tail kept) is a prefix of every later one; a
    # torn tail was set aside, not dropped.
    torn_file = out / "results.torn.jsonl"
    torn_kept = torn_file.read_bytes() if torn_file.exists() else b""
    for k, kill in enumerate(kills):
        assert final.startswith(kill.snapshot.kept), f"kill {k}: rows written before the kill are gone"
        if kill.snapshot.torn:
            assert kill.snapshot.torn + b"\n" in torn_kept, f"kill {k}: torn tail not set aside"
        for row in kill.snapshot.rows:
            if row["status"] == "ok":
                assert ok_rows[row["id"]] == row

    # Content and cost identical to what the simulator sent and billed.
    billing = simulator.billing()
    for b in billing:
        b["id"] = unquote(b["client_request_id"])
    completed = [b for b in billing if b["status"] == "completed"]
    sent: dict[str, set[str]] = {}
    cost: dict[str, set[float]] = {}
    for b in completed:
        sent.setdefault(b["id"], set()).add(b["content"])
        cost.setdefault(b["id"], set()).add(b["total_cost_usd"])
    assert set(sent) == set(ids)
    for rid, row in ok_rows.items():
        assert sent[rid] == {row["content"]}, rid
        assert cost[rid] == {row["total_cost_usd"]}, rid

    # Bought twice only when in flight at a kill: billed "completed" while the killed run was alive,
    # but its row not in the ledger the kill left.  Never an answer the ledger already had.
    bounds = [0, *(kill.billed_upto for kill in kills), len(billing)]
    lost: list[set[str]] = []
    seen_ok: set[str] = set()
    for k in range(len(bounds) - 1):
        segment = [b for b in billing[bounds[k] : bounds[k + 1]] if b["status"] == "completed"]
        bought = Counter(b["id"] for b in segment)
        rebought = set(bought) & seen_ok
        assert not rebought, f"run {k} bought answers the ledger already had: {sorted(rebought)[:10]}"
        assert max(bought.values(), default=0) <= 1, f"run {k} bought an answer twice: {bought.most_common(3)}"
        seen_ok = kills[k].snapshot.ok_ids() if k < len(kills) else set(ok_rows)
        lost.append(set(bought) - seen_ok)
    assert not lost[-1], f"the final run lost rows: {sorted(lost[-1])[:10]}"
    per_kill = [len(s) for s in lost[:-1]]
    times_lost = Counter(rid for s in lost for rid in s)
    billed_count = Counter(b["id"] for b in completed)
    assert billed_count == Counter({rid: 1 + times_lost[rid] for rid in ids})
    twice = sum(n - 1 for n in billed_count.values())
    in_flight_caps = [min(CONCURRENCY, PROMPTS - len(kill.snapshot.ok_ids())) for kill in kills]
    for k, (n, cap) in enumerate(zip(per_kill, in_flight_caps, strict=True)):
        assert n <= cap, f"kill {k}: {n} answers billed but not in the ledger, more than {cap} in flight ({per_kill})"
    assert twice <= sum(in_flight_caps), f"billed twice: {twice} (per kill {per_kill}), in-flight cap {in_flight_caps}"

    # Spend: the ledger has every confirmed cost except the answers lost in flight, which were paid for.
    ledger_total = math.fsum(r["total_cost_usd"] for r in rows)
    billed_total = math.fsum(b["total_cost_usd"] for b in completed)
    lost_total = math.fsum(b["total_cost_usd"] for b in completed if b["id"] in times_lost) - math.fsum(
        ok_rows[rid]["total_cost_usd"] for rid in times_lost
    )
    assert ledger_total <= billed_total + 1e-9
    assert abs(billed_total - ledger_total - lost_total) < 1e-9, (billed_total, ledger_total, lost_total)
    # The crashes are never silent about money: the attempts they left in flight are counted as possibly
    # billed, at their worst case, and that figure bounds what was really bought twice.
    assert final_summary["possibly_billed_attempts"] >= twice, (final_summary, twice)
    assert final_summary["possibly_billed_attempts"] <= KILLS * CONCURRENCY
    if not final_summary["possibly_billed_unpriced"]:
        assert final_summary["possibly_billed_usd"] >= lost_total - 1e-12, (final_summary, lost_total)
    print(
        f"possibly billed {final_summary['possibly_billed_attempts']} attempts "
        f"(${final_summary['possibly_billed_usd']:.6f}, {final_summary['possibly_billed_unpriced']} unpriced); "
        f"kills after {[k.after_rows for k in kills]} rows; billed twice per kill {per_kill} (total {twice}); "
        f"torn tails {sum(1 for k in kills if k.snapshot.torn)}; lost spend ${lost_total:.6f}"
    )


@pytest.mark.parametrize("cut", ["mid-row", "newline-only"])
@pytest.mark.parametrize("simulator", [["--seed", "5"]], indirect=True)
def test_torn_last_line_after_a_finished_run(tmp_path: Path, simulator: Sim, cut: str) -> None:
    ids = prompt_ids(30)
    src = write_prompts(tmp_path / "prompts.jsonl", ids)
    out = tmp_path / "out"
    ledger = out / "results.jsonl"
    args = run_args(src, simulator, out)
    res = run_to_end(args)
    assert res.returncode == 0, res.stderr
    whole = ledger.read_bytes()
    head, last = whole[:-1].rsplit(b"\n", 1)
    head += b"\n"
    last_id = orjson.loads(last)["id"]
    if cut == "mid-row":
        torn = last[: len(last) // 2]
        ledger.write_bytes(head + torn)  # a power cut in the middle of the last write
    else:
        ledger.write_bytes(whole[:-1])  # the row made it, its newline did not
    billed_before = simulator.settle()

    res = run_to_end(args)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    billing = simulator.billing()
    new = [b for b in billing[billed_before:] if b["status"] == "completed"]
    final = ledger.read_bytes()
    rows = [orjson.loads(x) for x in final.splitlines()]
    assert Counter(r["id"] for r in rows if r["status"] == "ok") == Counter(ids)
    torn_file = out / "results.torn.jsonl"
    if cut == "mid-row":
        assert torn_file.read_bytes() == torn + b"\n"  # set aside, not silently dropped
        assert [unquote(b["client_request_id"]) for b in new] == [last_id]  # that id bought again, nothing else
        assert final.startswith(head) and final.count(b"\n") == len(ids)
        assert rows[-1]["id"] == last_id and rows[-1]["content"] == new[0]["content"]
    else:
        assert not torn_file.exists() or torn_file.read_bytes() == b""
        assert new == []  # the complete row was kept: nothing bought again
        assert final == whole

    # A further rerun has nothing left to do.
    billed_before = simulator.settle()
    res = run_to_end(args)
    assert res.returncode == 0, res.stderr
    assert simulator.settle() == billed_before
    assert ledger.read_bytes() == final
