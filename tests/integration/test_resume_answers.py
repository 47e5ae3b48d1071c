"""Resume keyed by (id, sample) and the request fingerprint; shards; intents and possibly-billed spend."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson
import pytest
from simrun import sim_config

from batchgate.config import RunConfig
from batchgate.errors import InputError, LedgerError
from batchgate.ledger import INTENTS_DIR, LEDGER_NAME, POSSIBLY_BILLED_NAME, SPILL_NAME, Ledger
from batchgate.runner import Runner, in_shard
from batchgate.simulator import SimulatorConfig, running_simulator


def write_prompts(path: Path, prompts: dict[str, str]) -> Path:
    path.write_text("".join(orjson.dumps({"id": k, "prompt": v}).decode() + "\n" for k, v in prompts.items()))
    return path


def config(out: Path, url: str, **kw: Any) -> RunConfig:
    defaults: dict[str, Any] = dict(concurrency=8, max_attempts=4, idle_timeout_s=2.0, check_models=False)
    return sim_config(out, url, **(defaults | kw))


def rows(out: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in (out / LEDGER_NAME).read_bytes().splitlines()]


PROMPTS = {f"q{i}": f"question number {i}" for i in range(12)}


async def test_an_edited_prompt_is_asked_again_and_supersedes_its_old_answer(tmp_path: Path) -> None:
    src = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    out = tmp_path / "out"
    async with running_simulator(SimulatorConfig(seed=1)) as sim:
        first = await Runner([src], config(out, sim.base_url)).run()
        write_prompts(src, {**PROMPTS, "q3": "a different question now"})
        second = await Runner([src], config(out, sim.base_url)).run()
        billed = len(sim.billing.completed())
    assert first.ok == 12 and first.stale == 0
    assert (second.requests, second.stale, second.skipped) == (1, 1, 11)
    assert billed == 13  # the unchanged answers were not bought twice
    q3 = [r for r in rows(out) if r["id"] == "q3"]
    assert len(q3) == 2 and q3[0]["fingerprint"] != q3[1]["fingerprint"]
    assert all(len(r["fingerprint"]) == 32 for r in rows(out))


async def test_a_changed_default_model_reruns_every_prompt(tmp_path: Path) -> None:
    src = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    out = tmp_path / "out"
    async with running_simulator(SimulatorConfig(seed=1)) as sim:
        await Runner([src], config(out, sim.base_url)).run()
        again = await Runner([src], config(out, sim.base_url, default_model="other-model")).run()
        same = await Runner([src], config(out, sim.base_url, default_model="other-model")).run()
    assert (again.stale, again.requests) == (12, 12)
    assert (same.requests, same.skipped, same.stale) == (0, 12, 0)


async def test_v1_rows_without_a_fingerprint_are_trusted_on_resume(tmp_path: Path) -> None:
    src = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    out = tmp_path / "out"
    out.mkdir()
    v1 = {"v": 1, "id": "q0", "status": "ok", "content": "old", "total_cost_usd": 0.001}
    (out / LEDGER_NAME).write_bytes(orjson.dumps(v1) + b"\n")
    async with running_simulator(SimulatorConfig(seed=1)) as sim:
        summary = await Runner([src], config(out, sim.base_url)).run()
    assert (summary.skipped, summary.requests, summary.stale) == (1, 11, 0)


async def test_samples_are_rows_of_their_own_and_resume_per_sample(tmp_path: Path) -> None:
    src = write_prompts(tmp_path / "p.jsonl", dict(list(PROMPTS.items())[:4]))
    out = tmp_path / "out"
    async with running_simulator(SimulatorConfig(seed=2)) as sim:
        first = await Runner([src], config(out, sim.base_url, samples=3)).run()
        again = await Runner([src], config(out, sim.base_url, samples=3)).run()
        more = await Runner([src], config(out, sim.base_url, samples=4)).run()
    assert (first.ok, first.requests) == (12, 12)
    assert (again.requests, again.skipped) == (0, 12)
    assert (more.requests, more.skipped) == (4, 12)
    keys = sorted((r["id"], r["sample"]) for r in rows(out))
    assert keys == sorted((f"q{i}", s) for i in range(4) for s in range(4))
    assert len({r["fingerprint"] for r in rows(out)}) == 16  # the sample index is part of the question


async def test_shards_split_the_ids_disjointly_and_completely(tmp_path: Path) -> None:
    many = {f"p{i}": f"prompt {i}" for i in range(60)}
    src = write_prompts(tmp_path / "p.jsonl", many)
    seen: list[str] = []
    async with running_simulator(SimulatorConfig(seed=4)) as sim:
        for k in (1, 2, 3):
            runner = Runner([src], config(tmp_path / f"s{k}", sim.base_url, shard=(k, 3)))
            summary = await runner.run()
            assert summary.ok == runner.total
            seen += [r["id"] for r in rows(tmp_path / f"s{k}")]
    assert sorted(seen) == sorted(many)
    assert all(in_shard(pid, (1, 1)) for pid in many)


def _crashed_intents(out: Path, run_id: str, lines: list[dict[str, Any]]) -> None:
    (out / INTENTS_DIR).mkdir(parents=True, exist_ok=True)
    data = b"".join(orjson.dumps(x) + b"\n" for x in lines) + b'{"k": "torn'
    (out / INTENTS_DIR / f"{run_id}.jsonl").write_bytes(data)


async def test_attempts_a_crashed_run_left_in_flight_are_counted_as_possibly_billed_for_good(tmp_path: Path) -> None:
    src = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    out = tmp_path / "out"
    _crashed_intents(
        out,
        "20261201T000000Z-dead00",
        [
            {"k": "q1", "a": 1, "fp": None, "w": 0.01},
            {"k": "q1", "a": 2, "fp": None, "w": 0.01},  # a retry in flight too: both may be billed
            {"k": "q2", "a": 1, "fp": None, "w": 0.5},
            {"k": "q2", "done": True},  # its row was written: not possibly billed
            {"k": "q3", "a": 1, "fp": None, "w": None},  # no price known then
        ],
    )
    async with running_simulator(SimulatorConfig(seed=1)) as sim:
        first = await Runner([src], config(out, sim.base_url)).run()
        later = await Runner([src], config(out, sim.base_url)).run()
    for s in (first, later):  # a later clean run still shows what earlier crashes may have cost
        assert (s.possibly_billed_attempts, s.possibly_billed_unpriced) == (3, 1)
        assert s.possibly_billed_usd == pytest.approx(0.02)
    assert list((out / INTENTS_DIR).iterdir()) == []  # resolved, and clean runs leave none behind
    recorded = [orjson.loads(x) for x in (out / POSSIBLY_BILLED_NAME).read_bytes().splitlines()]
    assert [r["run_id"] for r in recorded] == ["20261201T000000Z-dead00"]
    run_file = orjson.loads((out / "runs" / f"{later_run_id(out)}.json").read_bytes())
    assert run_file["summary"]["possibly_billed_attempts"] == 3 and "api_key" not in run_file["config"]
    from batchgate.reports import build_reports

    report = build_reports([out], formats=("csv", "html"))
    assert report.totals["possibly_billed_attempts"] == 3
    assert report.totals["possibly_billed_usd"] == pytest.approx(0.02)
    assert "possibly billed: up to $0.020000 for 3 attempts" in report.table
    assert "Possibly billed" in (out / "report.html").read_text()


def later_run_id(out: Path) -> str:
    return sorted(p.stem for p in (out / "runs").glob("*.json"))[-1]


async def test_a_symlinked_ledger_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    src = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    out = tmp_path / "out"
    out.mkdir()
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    (out / LEDGER_NAME).symlink_to(target)
    with pytest.raises(LedgerError, match="symbolic link"):
        await Runner([src], config(out, "http://127.0.0.1:9/v1")).run()
    assert target.read_text() == "keep me\n"


async def test_damaged_middle_lines_are_named_and_skipped(tmp_path: Path) -> None:
    src = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    out = tmp_path / "out"
    async with running_simulator(SimulatorConfig(seed=1)) as sim:
        await Runner([src], config(out, sim.base_url)).run()
        lines = (out / LEDGER_NAME).read_bytes().splitlines()
        lines[4] = b"\x00\x00garbage"
        lines[6] = orjson.dumps({**orjson.loads(lines[6]), "id": 17})
        (out / LEDGER_NAME).write_bytes(b"\n".join(lines) + b"\n")
        runner = Runner([src], config(out, sim.base_url))
        summary = await runner.run()
    assert summary.requests == 2 and summary.skipped == 10
    assert any("2 damaged line(s)" in n and "line 5, 7" in n for n in runner.notices)


def test_rows_a_full_disk_refused_are_spilled_and_folded_back_in(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    ledger.open()
    ledger.append({"id": "a", "status": "ok"})
    ledger.flush()
    good = ledger._fd
    assert good is not None
    ledger._fd = os.open("/dev/full", os.O_WRONLY)  # every write: ENOSPC
    ledger.append({"id": "b", "status": "ok"})
    with pytest.raises(LedgerError, match="saved to"):
        ledger.close()
    os.close(good)
    assert (tmp_path / SPILL_NAME).exists()
    index = Ledger(tmp_path).open()
    assert index.spilled_rows == 1 and "b" in index.answers and "a" in index.answers
    assert not (tmp_path / SPILL_NAME).exists()


def test_the_resume_index_covers_the_ledger_and_a_hand_edit_makes_it_rebuild(tmp_path: Path) -> None:
    from batchgate.ledger import INDEX_NAME

    def row(rid: str, status: str = "ok", fingerprint: str | None = None) -> dict[str, Any]:
        return {"v": 2, "id": rid, "status": status, "fingerprint": fingerprint}

    def fp(i: int) -> str:
        return f"{i + 1:016x}" * 2

    led = Ledger(tmp_path)
    led.open()
    for i in range(50):
        led.append(row(f"r{i}", "ok" if i % 5 else "failed", fp(i)))
    led.close()
    # The index covers what a run read at open (the rows it appends are read by the next one).
    again = Ledger(tmp_path)
    again.open()
    again.close()
    assert (tmp_path / INDEX_NAME).exists()
    with (tmp_path / LEDGER_NAME).open("ab") as f:  # rows appended after the index (a killed run's)
        f.write(orjson.dumps(row("late")) + b"\n")
    index = Ledger(tmp_path).open()
    assert index.from_cache and index.rows == 51 and index.failed_rows == 10
    assert "late" in index.answers and "r1" in index.answers and "r0" not in index.answers
    done, stale = index.answers.lookup(["r1", "r2"], [fp(1), fp(99)])
    assert done.tolist() == [True, False] and stale.tolist() == [False, True]
    # Rewritten by hand (same size even): the index no longer matches the bytes it covered.
    data = (tmp_path / LEDGER_NAME).read_bytes().replace(b'"r1"', b'"x1"')
    (tmp_path / LEDGER_NAME).write_bytes(data)
    index = Ledger(tmp_path).open()
    assert not index.from_cache and "x1" in index.answers and "r1" not in index.answers
    (tmp_path / INDEX_NAME).write_bytes(b"garbage")
    index = Ledger(tmp_path).open()
    assert not index.from_cache and index.rows == 51


async def test_a_table_with_a_template_runs_and_an_edited_cell_is_asked_again(tmp_path: Path) -> None:
    table = tmp_path / "rows.csv"
    table.write_text("key,text\na,water cycle\nb,photosynthesis\n")
    out = tmp_path / "out"
    async with running_simulator(SimulatorConfig(seed=1)) as sim:
        cfg = config(out, sim.base_url, template="Explain {{ text }} briefly.", id_column="key")
        first = await Runner([table], cfg).run()
        table.write_text("key,text\na,water cycle\nb,plate tectonics\n")
        second = await Runner([table], cfg).run()
    assert (first.ok, second.requests, second.stale, second.skipped) == (2, 1, 1, 1)
    assert sorted(r["id"] for r in rows(out)) == ["a", "b", "b"]


async def test_a_resumed_start_begins_after_the_done_prefix_and_never_rebuys(tmp_path: Path) -> None:
    from batchgate.ledger import INDEX_NAME
    from batchgate.resume import VALIDATED_NAME

    many = {f"p{i}": f"prompt {i}" for i in range(200)}
    src = write_prompts(tmp_path / "p.jsonl", many)
    out = tmp_path / "out"
    async with running_simulator(SimulatorConfig(seed=5)) as sim:
        # Stopped early by its budget: the prefix ends where the first unanswered request is.
        first = await Runner([src], config(out, sim.base_url, max_cost_usd=0.001, default_max_tokens=64)).run()
        assert first.stop_reason == "budget" and 0 < first.ok < 200
        assert (out / VALIDATED_NAME).exists() and (out / INDEX_NAME).exists()
        second_runner = Runner([src], config(out, sim.base_url))
        second = await second_runner.run()
        assert second_runner._prefix is not None and second_runner._prefix[2] > 0  # started past the prefix
        assert second.ok + first.ok == 200 and second.skipped == first.ok
        third_runner = Runner([src], config(out, sim.base_url))
        third = await third_runner.run()
        # Past every input (nothing read again), remembering where lines appended later begin.
        assert third_runner._prefix == (1, 0, 200) and (third.requests, third.skipped) == (0, 200)
        assert third_runner._prefix_tail == (0, 201)
        billed = [b["client_request_id"] for b in sim.billing.completed()]
    assert sorted(billed) == sorted(many)  # every answer bought exactly once
    ok = [r["id"] for r in rows(out) if r["status"] == "ok"]
    assert sorted(ok) == sorted(many)
    # An edited input is a new identity: no shortcut, and the edit is found.
    write_prompts(src, {**many, "p7": "changed"})
    async with running_simulator(SimulatorConfig(seed=5)) as sim:
        fourth_runner = Runner([src], config(out, sim.base_url))
        fourth = await fourth_runner.run()
    assert fourth_runner._prefix is None and (fourth.stale, fourth.requests) == (1, 1)


def append_prompts(path: Path, prompts: dict[str, str]) -> None:
    with path.open("ab") as f:  # the same file (inode), longer: what `>>` and a generator do
        f.write(b"".join(orjson.dumps({"id": k, "prompt": v}) + b"\n" for k, v in prompts.items()))


async def test_lines_appended_to_a_finished_input_keep_the_prefix_and_only_they_are_bought(tmp_path: Path) -> None:
    src = write_prompts(tmp_path / "p.jsonl", {f"p{i}": f"prompt {i}" for i in range(50)})
    out = tmp_path / "out"
    async with running_simulator(SimulatorConfig(seed=3)) as sim:
        first = await Runner([src], config(out, sim.base_url)).run()
        assert first.ok == 50
        for round_ in range(2):  # twice: the second append starts from the prefix the first left
            new = {f"n{round_}-{i}": f"new prompt {round_} {i}" for i in range(7)}
            append_prompts(src, new)
            runner = Runner([src], config(out, sim.base_url))
            summary = await runner.run()
            assert runner._prefix == (0, 51 + 7 * round_, 50 + 7 * round_)  # no line before it re-read
            assert (summary.requests, summary.ok, summary.skipped) == (7, 7, 50 + 7 * round_)
            assert runner.total == 57 + 7 * round_  # validated again, new lines included
        billed = sorted(b["client_request_id"] for b in sim.billing.completed())
    assert billed == sorted([f"p{i}" for i in range(50)] + [f"n{r}-{i}" for r in range(2) for i in range(7)])


async def test_an_append_with_an_edit_before_it_or_without_a_final_newline_reads_everything(tmp_path: Path) -> None:
    prompts = {f"p{i}": f"prompt {i}" for i in range(20)}
    src = write_prompts(tmp_path / "p.jsonl", prompts)
    out = tmp_path / "out"
    async with running_simulator(SimulatorConfig(seed=4)) as sim:
        assert (await Runner([src], config(out, sim.base_url)).run()).ok == 20
        with src.open("r+b") as f:  # edited in place, same inode: p3's prompt changes
            data = f.read()
            f.seek(0)
            f.write(data.replace(b'"prompt 3"', b'"prompt X"'))
        append_prompts(src, {"extra": "one more"})
        edited = Runner([src], config(out, sim.base_url))
        summary = await edited.run()
        assert edited._prefix is None and (summary.stale, summary.requests) == (1, 2)  # the edit is found
        # An input whose old bytes did not end a line: its last line may have grown.
        src.write_bytes(src.read_bytes().rstrip(b"\n"))
        assert (await Runner([src], config(out, sim.base_url)).run()).requests == 0
        with src.open("ab") as f:
            f.write(b"\n" + orjson.dumps({"id": "tail", "prompt": "after"}) + b"\n")
        tail = Runner([src], config(out, sim.base_url))
        summary = await tail.run()
        assert tail._prefix is None and summary.requests == 1


async def test_an_earlier_input_that_grew_is_read_again_past_the_prefix(tmp_path: Path) -> None:
    a = write_prompts(tmp_path / "a.jsonl", {f"a{i}": f"a {i}" for i in range(5)})
    b = write_prompts(tmp_path / "b.jsonl", {f"b{i}": f"b {i}" for i in range(5)})
    out = tmp_path / "out"
    async with running_simulator(SimulatorConfig(seed=6)) as sim:
        assert (await Runner([a, b], config(out, sim.base_url)).run()).ok == 10
        append_prompts(a, {"a-new": "grown"})  # the prefix stands in b: a's new line is before it
        runner = Runner([a, b], config(out, sim.base_url))
        summary = await runner.run()
        assert runner._prefix is None and (summary.requests, summary.skipped) == (1, 10)
        append_prompts(a, {"bad": ""})  # a new line is validated like any other
        with pytest.raises(InputError, match=r"a\.jsonl:7"):
            await Runner([a, b], config(out, sim.base_url)).run()


async def test_a_validation_file_of_an_older_batchgate_gains_the_file_states(tmp_path: Path) -> None:
    from batchgate.resume import VALIDATED_NAME

    src = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    out = tmp_path / "out"
    async with running_simulator(SimulatorConfig(seed=7)) as sim:
        await Runner([src], config(out, sim.base_url)).run()
        doc = orjson.loads((out / VALIDATED_NAME).read_bytes())
        assert len(doc.pop("files")) == 1
        (out / VALIDATED_NAME).write_bytes(orjson.dumps(doc))  # as an older batchgate wrote it
        again = Runner([src], config(out, sim.base_url))
        assert (await again.run()).requests == 0 and again._prefix is not None
        assert "files" in orjson.loads((out / VALIDATED_NAME).read_bytes())
        append_prompts(src, {"late": "later"})
        late = Runner([src], config(out, sim.base_url))
        assert (await late.run()).requests == 1 and late._prefix is not None


async def test_a_model_the_catalog_lacks_stops_the_run_before_any_request(tmp_path: Path) -> None:
    src = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    async with running_simulator(SimulatorConfig(seed=1)) as sim:
        runner = Runner(
            [src], config(tmp_path / "out", sim.base_url, default_model="Qwen/qwen3-32b-fp8", check_models=True)
        )
        summary = await runner.run()
        chat_requests = len(sim.billing.completed())
    assert summary.exit_code == 2 and summary.stop_reason == "unknown_model" and summary.requests == 0
    assert chat_requests == 0
    assert runner.stop_message is not None and "did you mean Qwen/Qwen3-32B-FP8" in runner.stop_message
    assert "p.jsonl:1:" in runner.stop_message and "12 prompt(s)" in runner.stop_message


async def test_published_prices_bound_the_budget_from_the_first_request(tmp_path: Path) -> None:
    src = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    async with running_simulator(SimulatorConfig(seed=1)) as sim:
        runner = Runner(
            [src],
            config(tmp_path / "out", sim.base_url, default_model="sim-model", check_models=True, max_cost_usd=1.0),
        )
        summary = await runner.run()
    assert summary.ok == 12 and runner.balance is not None and runner.balance.usd > 0
    assert runner.prices.worst_per_token("sim-model") is not None
    assert not runner._probes  # no one-at-a-time probe was needed: the price was published


async def test_a_rerun_with_nothing_left_to_send_needs_no_network(tmp_path: Path) -> None:
    src = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    out = tmp_path / "out"
    async with running_simulator(SimulatorConfig(seed=1)) as sim:
        await Runner([src], config(out, sim.base_url, check_models=True, default_model="sim-model")).run()
    offline = await Runner(
        [src], config(out, "http://127.0.0.1:9/v1", check_models=True, default_model="sim-model")
    ).run()
    assert (offline.exit_code, offline.requests, offline.skipped) == (0, 0, 12)


@pytest.mark.parametrize("planted", ["intents", "possibly_billed.jsonl", "runs"])
async def test_links_planted_in_the_output_directory_write_nothing_outside_it(tmp_path: Path, planted: str) -> None:
    src = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    out = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir()
    (out / INTENTS_DIR).mkdir()
    _crashed_intents(out, "20261201T000000Z-dead00", [{"k": "q1", "a": 1, "fp": None, "w": 0.01}])
    if planted == "intents":
        (out / INTENTS_DIR / "20261201T000000Z-dead00.jsonl").rename(elsewhere / "x.jsonl")
        (out / INTENTS_DIR).rmdir()
    target = elsewhere / planted
    (out / planted).symlink_to(target)
    async with running_simulator(SimulatorConfig(seed=1)) as sim:
        runner = Runner([src], config(out, sim.base_url))
        try:
            summary = await runner.run()
        except LedgerError as exc:
            assert "symbolic link" in str(exc)
        else:
            assert summary.ok == 12  # runs/ is a convenience: skipped, the run goes on
    assert not target.exists()  # nothing written through the link
    assert sorted(p.name for p in elsewhere.iterdir()) == (["x.jsonl"] if planted == "intents" else [])


async def test_after_an_append_only_new_lines_are_validated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from batchgate import jobs
    from batchgate.resume import IDS_NAME

    calls: list[Any] = []
    real = jobs.validate

    def spy(*args: Any, **kw: Any) -> Any:
        calls.append(kw.get("start"))
        return real(*args, **kw)

    monkeypatch.setattr(jobs, "validate", spy)
    src = write_prompts(tmp_path / "p.jsonl", {f"p{i}": f"prompt {i}" for i in range(30)})
    out = tmp_path / "out"
    async with running_simulator(SimulatorConfig(seed=8)) as sim:
        assert (await Runner([src], config(out, sim.base_url)).run()).ok == 30
        assert calls == [None] and (out / IDS_NAME).stat().st_size == 8 * 30  # one digest a prompt
        append_prompts(src, {f"n{i}": f"new {i}" for i in range(5)})
        runner = Runner([src], config(out, sim.base_url))
        summary = await runner.run()
        assert calls[-1] == [31] and runner.total == 35 and runner._models["sim-model"][2] == 35
        assert (summary.requests, summary.skipped) == (5, 30) and (out / IDS_NAME).stat().st_size == 8 * 35
        # A new line repeating an old id: the full pass runs and names both places.
        append_prompts(src, {"p4": "a second p4"})
        with pytest.raises(InputError, match=r'p\.jsonl:36: duplicate id "p4" \(first seen at .*p\.jsonl:5\)'):
            await Runner([src], config(out, sim.base_url)).run()
        assert calls[-2:] == [[36], None]
        # A damaged digest file is not trusted: everything is validated again.
        src.write_bytes(b"".join(src.read_bytes().splitlines(keepends=True)[:-1]))  # the repeat taken out
        (out / IDS_NAME).write_bytes(b"\0" * 8 * 35)
        append_prompts(src, {"late": "later"})
        calls.clear()
        assert (await Runner([src], config(out, sim.base_url)).run()).requests == 1
        assert None in calls
