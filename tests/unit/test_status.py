"""Status: counts, spend, intents, lock holder and shard sums, from synthetic output directories."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ledger_rows import v1_row, v2_row, write_ledger

from batchgate.errors import InputError
from batchgate.ledger import lock_output_dir
from batchgate.status import format_status, lock_holder, status


def at(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(1_800_000_000 + seconds)) + ".000Z"


def test_counts_use_the_latest_state_of_each_key(tmp_path: Path) -> None:
    out = write_ledger(
        tmp_path / "out",
        [
            v1_row("a", "failed"),  # retried and answered: not a failure any more
            v1_row("a"),
            v1_row("b", "failed"),
            v2_row("b", status="failed", error={"type": "timeout", "status": None, "message": "slow"}),
            v2_row("c", 0),
            v2_row("c", 1),
            v2_row("d", status="failed"),
        ],
        tail=b"garbage\n",
    )
    (out / "runs").mkdir()
    (out / "runs" / "r1.json").write_bytes(orjson.dumps({"config": {}, "inputs": [], "total": 6}))
    st = status(out)
    assert (st.done, st.failed, st.total, st.left, st.rows) == (3, 2, 6, 3, 7)
    assert st.failures_by_cause == {"server_error": 1, "timeout": 1}
    assert st.unreadable_lines == 1
    assert st.confirmed_usd == pytest.approx(3 * 0.0011)
    assert st.last_error is not None and st.last_error["id"] == "d"
    assert not st.running and st.eta_s is None
    text = format_status(st)
    assert "3 / 6 done" in text and "timeout 1" in text and "not running" in text


def test_spend_splits_confirmed_and_unconfirmed(tmp_path: Path) -> None:
    out = write_ledger(
        tmp_path / "out",
        [
            v2_row("a", total_cost_usd=0.5),
            v2_row("b", total_cost_usd=0.25, cost_status="unconfirmed"),
            v2_row("c", status="failed", unconfirmed_cost_usd=0.125),
            v2_row("d", total_cost_usd=0.0, cached=True),
        ],
    )
    st = status(out)
    assert st.confirmed_usd == pytest.approx(0.5)
    assert st.unconfirmed_usd == pytest.approx(0.375)
    assert st.cached == 1


def intents_log(out: Path, run_id: str, lines: list[dict[str, Any]], tail: bytes = b"") -> None:
    (out / "intents").mkdir(exist_ok=True)
    (out / "intents" / f"{run_id}.jsonl").write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in lines) + tail)


def test_possibly_billed_recorded_and_left_by_a_crash(tmp_path: Path) -> None:
    out = write_ledger(tmp_path / "out", [v2_row("a")])
    recorded = {"v": 1, "run_id": "r0", "attempts": 2, "usd": 0.5, "unpriced": 1}
    (out / "possibly_billed.jsonl").write_bytes(orjson.dumps(recorded) + b"\n")
    intents_log(
        out,
        "r1",  # a run that died: nobody has resolved its log yet
        [
            {"k": "a\x000", "a": 1, "fp": "f", "w": 0.01},
            {"k": "a\x000", "done": True},
            {"k": "b\x000", "a": 1, "fp": "f", "w": 0.02},
            {"k": "b\x000", "a": 2, "fp": "f", "w": 0.02},
            {"k": "c\x000", "a": 1, "fp": "f", "w": None},
        ],
        tail=b'{"k": "torn',
    )
    st = status(out)
    assert st.possibly_billed_attempts == 2 + 3
    assert st.possibly_billed_usd == pytest.approx(0.5 + 0.04)
    assert st.possibly_billed_unpriced == 1 + 1
    assert st.in_flight == 0
    assert "possibly billed" in format_status(st)


def test_the_live_runs_open_attempts_are_in_flight(tmp_path: Path) -> None:
    out = write_ledger(tmp_path / "out", [v2_row("a")])
    intents_log(out, "20261201T000000Z-old", [{"k": "x\x000", "a": 1, "w": 0.25}])
    intents_log(out, "20261201T010000Z-new", [{"k": "y\x000", "a": 1, "w": 0.5}, {"k": "z\x000", "a": 1, "w": 0.5}])
    lock = lock_output_dir(out)
    try:
        st = status(out)
    finally:
        lock.release()
    assert st.running and st.in_flight == 2
    assert st.possibly_billed_attempts == 1 and st.possibly_billed_usd == pytest.approx(0.25)
    assert "in flight" in format_status(st)


def test_rate_of_the_newest_run(tmp_path: Path) -> None:
    rows = [v2_row(f"old{i}", run_id="r0", started_at=at(i), latency_s=0.0) for i in range(3)]
    rows += [v2_row(f"p{i}", run_id="r1", started_at=at(1000 + i / 4), latency_s=0.0) for i in range(9)]
    out = write_ledger(tmp_path / "out", rows)
    st = status(out)
    assert st.last_run_id == "r1"
    assert st.rate_per_s == pytest.approx(4.5)  # 9 rows in 2 s


def test_the_lock_holder_is_seen_and_the_lock_is_not_taken(tmp_path: Path) -> None:
    out = write_ledger(tmp_path / "out", [v2_row("a")])
    (out / "run.json").write_bytes(orjson.dumps({"total": 10}))
    lock = lock_output_dir(out)
    try:
        held, pid = lock_holder(out)
        assert held and pid == os.getpid()
        st = status(out)
        assert st.running and st.pids == [os.getpid()]
    finally:
        lock.release()
    assert lock_holder(out) == (False, None)
    # status never keeps the lock: a run can take it right after
    status(out)
    lock_output_dir(out).release()


def test_a_lock_held_by_another_process(tmp_path: Path) -> None:
    out = write_ledger(tmp_path / "out", [v2_row("a")])
    code = (
        "import sys, time; from pathlib import Path; from batchgate.ledger import lock_output_dir;"
        "lock_output_dir(Path(sys.argv[1])); print('locked', flush=True); time.sleep(30)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        assert lock_holder(out) == (True, proc.pid)
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout:
            proc.stdout.close()
    assert lock_holder(out) == (False, None)  # the kernel dropped it with the process


def test_shards_are_summed(tmp_path: Path) -> None:
    for k in range(3):
        d = write_ledger(tmp_path / "out" / f"shard-{k}-of-3", [v2_row(f"p{k}-{i}") for i in range(k + 1)])
        (d / "run.json").write_bytes(orjson.dumps({"total": 4}))
    with (tmp_path / "out" / "shard-1-of-3" / "results.jsonl").open("ab") as f:
        f.write(orjson.dumps(v2_row("x", status="failed")) + b"\n")
    st = status(tmp_path / "out")
    assert (st.shards, st.done, st.failed, st.total) == (3, 6, 1, 12)
    assert [s.done for s in st.shard_status] == [1, 2, 3]
    data: dict[str, Any] = st.as_dict()
    assert data["shard_status"][1]["failed"] == 1 and data["spend"]["confirmed_usd"] == pytest.approx(6 * 0.0011)


def test_not_an_output_directory(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such directory"):
        status(tmp_path / "missing")
    with pytest.raises(InputError, match="not a batchgate output directory"):
        status(tmp_path)


def test_an_output_directory_before_its_first_row(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "run.json").write_bytes(orjson.dumps({"total": 5}))
    st = status(tmp_path / "out")
    assert (st.done, st.total, st.rows) == (0, 5, 0)


@settings(max_examples=40, deadline=None)
@given(
    events=st.lists(
        st.tuples(st.integers(0, 6), st.integers(0, 1), st.sampled_from(["ok", "timeout", "server_error"])),
        max_size=40,
    ),
    shards=st.integers(1, 3),
)
def test_counts_match_a_naive_replay(tmp_path_factory: Any, events: Any, shards: int) -> None:
    """Whatever the order of failures and answers, and however the keys fall into shards."""
    tmp = tmp_path_factory.mktemp("prop")
    rows: dict[int, list[dict[str, Any]]] = {k: [] for k in range(shards)}
    latest: dict[tuple[str, int], str] = {}
    for n, (p, s, outcome) in enumerate(events):
        rid = f"id-{p}"
        ok = outcome == "ok"
        err = None if ok else {"type": outcome, "status": None, "message": f"m{n}"}
        rows[p % shards].append(v2_row(rid, s, "ok" if ok else "failed", error=err))
        if ok or latest.get((rid, s)) != "ok":
            latest[(rid, s)] = outcome
    if shards == 1:
        out = write_ledger(tmp / "out", rows[0])
    else:
        out = tmp / "out"
        for k in range(shards):
            write_ledger(out / f"shard-{k}-of-{shards}", rows[k])
    st_ = status(out)
    causes: dict[str, int] = {}
    for outcome in latest.values():
        if outcome != "ok":
            causes[outcome] = causes.get(outcome, 0) + 1
    assert st_.done == sum(v == "ok" for v in latest.values())
    assert st_.failed == sum(causes.values()) and st_.failures_by_cause == causes
    assert st_.rows == len(events)


def test_a_parent_with_its_own_run_file_still_sums_its_shards(tmp_path: Path) -> None:
    from batchgate.status import find_output_dirs, is_shard_dir

    out = tmp_path / "out"
    for k in range(2):
        write_ledger(out / f"shard-{k}-of-2", [v2_row(f"p{k}")])
    (out / "run.json").write_bytes(b"{}")
    dirs = find_output_dirs(out)
    assert [d.name for d in dirs] == ["shard-0-of-2", "shard-1-of-2"] and all(map(is_shard_dir, dirs))
    assert status(out).done == 2
    assert find_output_dirs(dirs[0]) == [dirs[0]]


def test_eta_while_a_run_holds_the_lock(tmp_path: Path) -> None:
    rows = [v2_row(f"p{i}", run_id="r1", started_at=at(i / 2), latency_s=0.0) for i in range(11)]
    out = write_ledger(tmp_path / "out", rows)
    (out / "runs").mkdir()
    (out / "runs" / "r1.json").write_bytes(orjson.dumps({"run_id": "r1", "config": {}, "total": 31}))
    lock = lock_output_dir(out)
    try:
        st = status(out)
    finally:
        lock.release()
    assert st.running and st.rate_per_s == pytest.approx(2.2)  # 11 rows in 5 s
    assert st.eta_s == pytest.approx(20 / 2.2)
    assert "ETA 9s" in format_status(st)
    assert status(out).eta_s is None  # finished (or stopped): no ETA


def test_rows_a_full_disk_spilled_are_counted(tmp_path: Path) -> None:
    out = write_ledger(tmp_path / "out", [v2_row("a")])
    (out / "results.spill.jsonl").write_bytes(orjson.dumps(v2_row("b")) + b"\n")
    assert status(out).done == 2
