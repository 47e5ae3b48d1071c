"""The done-prefix watermark and the identity of inputs (what a resumed start may skip)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchgate.resume import Watermark, inputs_key


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_the_prefix_never_skips_a_request_that_is_not_ok(data: st.DataObject) -> None:
    samples = data.draw(st.integers(1, 3))
    records = data.draw(st.integers(1, 30))
    n = records * samples
    outcome = data.draw(st.lists(st.sampled_from(["ok", "failed", "open"]), min_size=n, max_size=n))
    order = data.draw(st.permutations(range(n)))
    mark = Watermark(0, samples)
    for seq in range(n):
        mark.seen(seq, (0, seq // samples + 1), seq % samples)
    for seq in order:
        if outcome[seq] == "ok":
            mark.complete(seq, f"k{seq}", None)
        elif outcome[seq] == "failed":
            mark.fail(seq)
    leading_ok = next((i for i, o in enumerate(outcome) if o != "ok"), n)
    assert mark.mark == leading_ok
    if leading_ok == n:
        return
    found = mark.at_mark()
    assert found is not None
    (inp, line, requests), beyond = found
    assert requests == leading_ok - leading_ok % samples  # the record's first sample
    assert line == requests // samples + 1 and inp == 0
    assert sorted(k for k, _ in beyond) == sorted(f"k{i}" for i in range(requests, n) if outcome[i] == "ok")


def test_tracking_gives_up_instead_of_growing_without_bound() -> None:
    mark = Watermark(0, 1, cap=10)
    mark.seen(0, (0, 1), 0)
    mark.fail(0)
    for seq in range(1, 50):
        mark.seen(seq, (0, seq + 1), 0)
        mark.complete(seq, f"k{seq}", None)
    assert mark.given_up and mark.at_mark() is None


def test_inputs_key_changes_with_the_file_or_the_settings_and_pipes_have_none(tmp_path: Path) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n')
    key = inputs_key([f], {"model": "m"})
    assert key is not None and key == inputs_key([f], {"model": "m"})
    assert inputs_key([f], {"model": "other"}) != key
    f.write_text('{"prompt": "b"}\n')
    os.utime(f, ns=(1, 1))
    assert inputs_key([f], {"model": "m"}) != key
    assert inputs_key([Path("-")], {}) is None
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert inputs_key([fifo], {}) is None
    assert inputs_key([f, f], {}) is None


def test_what_the_mark_passed_is_forgotten_and_what_is_tracked_stays_near_the_concurrency() -> None:
    mark = Watermark()
    window = 500  # requests in flight, finishing nearly in order (any of the oldest 50 next)
    rng = random.Random(3)
    pending: list[int] = []
    largest = 0
    for seq in range(20_000):
        mark.seen(seq, (0, seq + 1), 0)
        pending.append(seq)
        if len(pending) >= window:
            done = pending.pop(rng.randrange(50))
            mark.complete(done, f"k{done}", None)
        largest = max(largest, len(mark._pos))
    for done in pending:
        mark.complete(done, f"k{done}", None)
    assert mark.mark == 20_000 and not mark.given_up
    assert largest <= 3 * window, largest  # the order forgets from its front as the mark advances
    assert len(mark._pos) == len(mark._order) <= 1 and len(mark._keys) <= 1


@pytest.mark.parametrize("small", [True, False])
def test_known_ids_answer_membership_and_merge_in_order_from_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small: bool
) -> None:
    from array import array

    from batchgate import resume
    from batchgate.ledger import write_atomic

    if not small:  # the memory-mapped search and a merge over many chunks
        monkeypatch.setattr(resume, "_IDS_SMALL", 10)
        monkeypatch.setattr(resume, "_IDS_CHUNK", 8 * 7)
    rng = random.Random(5)
    old = sorted({rng.getrandbits(64) for _ in range(500)})
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "x"}\n')
    states = resume.file_states([f])
    resume.save_validation(tmp_path, "k", 500, "", {}, write_atomic, states, [array("Q", old).tobytes()])
    doc = resume.load_validation(tmp_path, "k")
    assert doc is not None
    known = resume.load_known_ids(tmp_path, doc)
    assert known is not None and known.n == 500
    assert known.any_of(array("Q", [old[123], 7]))
    assert not known.any_of(array("Q", [v + 1 for v in old if v + 1 not in set(old)][:50]))
    new = sorted({rng.getrandbits(64) for _ in range(40)} | {0, 2**64 - 1})
    merged = b"".join(known.merged(array("Q", new)))
    got = array("Q")
    got.frombytes(merged)
    assert list(got) == sorted(old + new)
    (tmp_path / resume.IDS_NAME).write_bytes(b"\0" * 8 * 500)  # damaged: not trusted
    assert resume.load_known_ids(tmp_path, doc) is None
