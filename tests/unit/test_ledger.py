"""The ledger survives torn writes and is readable for resume; the output lock is exclusive."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from batchgate.errors import OutputLocked
from batchgate.ledger import LEDGER_NAME, TORN_NAME, IdSet, Ledger, ResumeIndex, lock_output_dir, write_atomic


def ids(index: ResumeIndex, universe: tuple[str, ...] = ("a", "b", "c", "d")) -> set[str]:
    """The ok ids among ``universe``, checked against the index's size so none hides elsewhere."""
    found = {rid for rid in universe if rid in index.ok_ids}
    assert len(index.ok_ids) == len(found)
    return found


def row(rid: str, status: str = "ok") -> dict[str, object]:
    return {"v": 1, "id": rid, "status": status, "content": f"answer {rid}", "total_cost_usd": 0.001}


def test_append_flush_and_index(tmp_path: Path) -> None:
    led = Ledger(tmp_path)
    assert led.open().rows == 0
    led.append(row("a"))
    led.append(row("b", "failed"))
    assert led.pending == 2
    led.flush()
    led.append(row("b"))
    led.append(row("c", "failed"))
    led.close()
    lines = (tmp_path / LEDGER_NAME).read_bytes().splitlines()
    assert [orjson.loads(x)["id"] for x in lines] == ["a", "b", "b", "c"]
    index = Ledger(tmp_path).open()
    assert ids(index) == {"a", "b"}
    assert "c" not in index.ok_ids
    assert (index.rows, index.failed_rows) == (4, 2)


def test_torn_last_line_is_set_aside_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_NAME
    path.write_bytes(orjson.dumps(row("a")) + b"\n" + b'{"v":1,"id":"b","status":"o')
    led = Ledger(tmp_path)
    index = led.open()
    led.close()
    assert ids(index) == {"a"}
    assert index.torn_bytes > 0
    assert path.read_bytes().endswith(b"\n")
    assert (tmp_path / TORN_NAME).read_bytes() == b'{"v":1,"id":"b","status":"o\n'
    # and the next append starts on a clean line
    led = Ledger(tmp_path)
    led.open()
    led.append(row("c"))
    led.close()
    assert ids(Ledger(tmp_path).open()) == {"a", "c"}


def test_complete_last_row_without_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_NAME
    path.write_bytes(orjson.dumps(row("a")) + b"\n" + orjson.dumps(row("b")))
    index = Ledger(tmp_path).open()
    assert ids(index) == {"a", "b"}
    assert not (tmp_path / TORN_NAME).exists()
    assert path.read_bytes().endswith(b"}\n")


def test_garbage_line_in_the_middle_is_counted_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_NAME
    path.write_bytes(orjson.dumps(row("a")) + b"\n\x00\x00garbage\n" + orjson.dumps(row("b")) + b"\n")
    index = Ledger(tmp_path).open()
    assert ids(index) == {"a", "b"}
    assert index.unreadable_lines == 1


def test_write_atomic_leaves_no_temp_and_keeps_old_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "summary.csv"
    write_atomic(target, b"old")

    def boom() -> object:
        yield b"half"
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_atomic(target, boom())  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.csv"]


def test_lock_is_exclusive_and_names_holder(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys,time; from pathlib import Path; from batchgate.ledger import lock_output_dir;"
            "lock_output_dir(Path(sys.argv[1])); print('locked', flush=True); time.sleep(60)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputLocked) as info:
            lock_output_dir(tmp_path)
        assert info.value.pid == holder.pid
        assert str(holder.pid) in str(info.value)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    # A holder killed with SIGKILL leaves no stale lock behind.
    lock = lock_output_dir(tmp_path)
    lock.release()


def test_id_set_membership_matches_a_python_set() -> None:
    import random

    rng = random.Random(5)
    members = {f"id-{rng.randrange(10**9)}" for _ in range(5000)} | {"", "ä/%?", "\x00", "x" * 500}
    others = {f"id-{rng.randrange(10**9)}" for _ in range(5000)} - members
    idset = IdSet(members)
    idset.add("late")
    members.add("late")
    assert len(idset) == len(members)
    probe = sorted(members) + sorted(others)
    assert idset.contains(probe).tolist() == [p in members for p in probe]
    assert "late" in idset and "nope" not in idset and 7 not in idset
    assert IdSet().contains(["a"]).tolist() == [False]
