"""Export: synthetic ledgers (v1 and v2 rows) joined back to their prompts, in every format."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ledger_rows import read_jsonl, v1_row, v2_row, write_ledger, write_prompts

from batchgate.errors import InputError
from batchgate.export import PARQUET_SCHEMA, export


def test_chat_jsonl_joins_messages_sent_and_keeps_the_latest_answer(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", ["a", "b", "c"])
    out = write_ledger(
        tmp_path / "out",
        [
            v1_row("b", "failed"),
            v1_row("a", content="old a"),  # v1: no sample, no request id
            v1_row("b", content="b at last"),
            v1_row("c", "failed"),
        ],
    )
    result = export(out, tmp_path / "x.jsonl", inputs=[prompts])
    rows = read_jsonl(tmp_path / "x.jsonl")
    assert [r["id"] for r in rows] == ["a", "b"]  # input order; c only failed
    assert rows[1]["messages"] == [
        {"role": "user", "content": "question b"},
        {"role": "assistant", "content": "b at last"},
    ]
    assert rows[0]["sample"] == 0 and rows[0]["request_id"] is None and rows[0]["cost_usd"] == 0.0011
    assert result.rows == 2 and result.failed_skipped == 1 and result.unmatched_rows == 0
    assert result.total_cost_usd == pytest.approx(0.0022)


def test_an_answer_paid_for_is_not_hidden_by_a_later_failure(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", ["a"])
    out = write_ledger(tmp_path / "out", [v2_row("a"), v2_row("a", status="failed")])
    export(out, tmp_path / "x.jsonl", inputs=[prompts])
    assert [r["status"] for r in read_jsonl(tmp_path / "x.jsonl")] == ["ok"]


def test_samples_v2_fields_and_meta(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", ["a", "b"])
    calls = [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]
    out = write_ledger(
        tmp_path / "out",
        [v2_row("a", 2), v2_row("b", 0), v2_row("a", 0, tool_calls=calls), v2_row("a", 1)],
    )
    export(out, tmp_path / "x.jsonl", inputs=[prompts])
    rows = read_jsonl(tmp_path / "x.jsonl")
    assert [(r["id"], r["sample"]) for r in rows] == [("a", 0), ("a", 1), ("a", 2), ("b", 0)]
    first = rows[0]
    assert first["reasoning"] == "thinking about a" and first["parsed"] == {"n": 0}
    assert first["request_id"] == "req-a-0" and first["meta"] == {"category": "cat-a"}
    assert first["tool_calls"] == calls
    assert first["messages"][-1]["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    ]


def test_only_valid_and_include_failed(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", ["a", "b", "c", "d"])
    out = write_ledger(
        tmp_path / "out",
        [v2_row("a"), v2_row("b", valid=False), v2_row("c", status="failed"), v1_row("d")],
    )
    only = export(out, tmp_path / "v.jsonl", inputs=[prompts], only_valid=True)
    assert [r["id"] for r in read_jsonl(tmp_path / "v.jsonl")] == ["a"]
    assert only.invalid_skipped == 2 and only.failed_skipped == 1  # d was never validated
    every = export(out, tmp_path / "all.jsonl", inputs=[prompts], include_failed=True)
    rows = read_jsonl(tmp_path / "all.jsonl")
    assert [r["id"] for r in rows] == ["a", "b", "c", "d"] and every.failed_skipped == 0
    failed = rows[2]
    assert failed["status"] == "failed" and failed["messages"] == [{"role": "user", "content": "question c"}]
    assert failed["error"]["type"] == "server_error"


def test_run_settings_shape_the_messages(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", ["a"])
    out = write_ledger(tmp_path / "out", [v2_row("a")])
    (out / "runs").mkdir()
    config = {"default_model": "m/small", "system_prompt": "Be brief.", "chat_defaults": {"temperature": 0}}
    (out / "runs" / "20261201T000000Z-aaaaaa.json").write_bytes(
        orjson.dumps({"config": config, "inputs": [str(prompts)], "total": 1})
    )
    export(out, tmp_path / "x.jsonl")  # the inputs come from the run file
    (row,) = read_jsonl(tmp_path / "x.jsonl")
    assert row["messages"][0] == {"role": "system", "content": "Be brief."}


def test_without_inputs_it_says_how_to_give_them(tmp_path: Path) -> None:
    out = write_ledger(tmp_path / "out", [v2_row("a")])
    with pytest.raises(InputError, match="--inputs"):
        export(out, tmp_path / "x.jsonl")
    with pytest.raises(InputError, match="unknown export format"):
        export(out, tmp_path / "x.jsonl", fmt="csv")
    with pytest.raises(InputError, match="not a batchgate output directory"):
        export(tmp_path, tmp_path / "x.jsonl")


def test_answers_whose_prompt_is_gone_are_counted(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", ["a", "new"])
    out = write_ledger(tmp_path / "out", [v2_row("a"), v2_row("gone"), v2_row("gone", 1)])
    result = export(out, tmp_path / "x.jsonl", inputs=[prompts])
    assert result.rows == 1 and result.unmatched_rows == 2 and result.prompts_without_rows == 1


def test_torn_last_line_and_garbage_lines_are_skipped(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", ["a", "b"])
    out = write_ledger(tmp_path / "out", [v2_row("a")], tail=b"not json\n" + orjson.dumps(v2_row("b"))[:40])
    result = export(out, tmp_path / "x.jsonl", inputs=[prompts])
    assert result.rows == 1 and result.prompts_without_rows == 1


def test_shard_directories_are_merged(tmp_path: Path) -> None:
    ids = [f"p{i}" for i in range(9)]
    prompts = write_prompts(tmp_path / "p.jsonl", ids)
    for k in range(3):
        write_ledger(tmp_path / "out" / f"shard-{k}-of-3", [v2_row(i) for i in ids[k::3]])
    result = export(tmp_path / "out", tmp_path / "x.jsonl", inputs=[prompts])
    assert [r["id"] for r in read_jsonl(tmp_path / "x.jsonl")] == ids
    assert result.rows == 9 and result.unmatched_rows == 0


def test_parquet_has_the_documented_schema(tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(
        orjson.dumps({"id": "a", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}) + b"\n"
    )
    out = write_ledger(tmp_path / "out", [v2_row("a"), v1_row("a")])
    export(out, tmp_path / "x.parquet", fmt="parquet", inputs=[prompts], default_model="m/small")
    table = pq.read_table(tmp_path / "x.parquet")
    assert table.schema.equals(PARQUET_SCHEMA)
    (row,) = table.to_pylist()
    assert row["messages"][0]["content"] == '[{"type":"text","text":"hi"}]'
    assert row["messages"][1] == {
        "role": "assistant",
        "content": "answer",  # the later v1 row is the latest ok one
        "name": None,
        "tool_call_id": None,
        "tool_calls": None,
    }


def test_openai_batch_lines_parse_with_the_sdk_types(tmp_path: Path) -> None:
    from openai.types.chat import ChatCompletion

    prompts = write_prompts(tmp_path / "p.jsonl", ["a", "b", "c"])
    calls = [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    out = write_ledger(
        tmp_path / "out",
        [
            v2_row("a", 0, finish_reason=None),
            v2_row("a", 1, tool_calls=calls, finish_reason="tool_calls"),
            v1_row("b"),
            v2_row("c", status="failed", error={"type": "rate_limited", "status": 429, "message": "slow"}),
        ],
    )
    export(out, tmp_path / "b.jsonl", fmt="openai-batch", inputs=[prompts], include_failed=True)
    lines = read_jsonl(tmp_path / "b.jsonl")
    assert [x["custom_id"] for x in lines] == ["a", "a#1", "b", "c"]
    assert len({x["id"] for x in lines}) == 4
    for line in lines[:3]:
        assert line["error"] is None and line["response"]["status_code"] == 200
        completion = ChatCompletion.model_validate(line["response"]["body"])
        assert completion.object == "chat.completion" and completion.usage is not None
    a1 = ChatCompletion.model_validate(lines[1]["response"]["body"])
    assert a1.choices[0].message.tool_calls is not None
    assert a1.choices[0].message.tool_calls[0].id == "call_1"
    assert lines[0]["response"]["request_id"] == "req-a-0"
    assert lines[3]["response"]["status_code"] == 429
    assert lines[3]["response"]["body"]["error"]["message"] == "slow"


def test_hf_folder_has_shards_and_a_card(tmp_path: Path) -> None:
    ids = [f"p{i}" for i in range(7)]
    prompts = write_prompts(tmp_path / "p.jsonl", ids)
    out = write_ledger(tmp_path / "out", [v2_row(i) for i in ids])
    result = export(out, tmp_path / "ds", fmt="hf", inputs=[prompts], shard_rows=3)
    shards = sorted((tmp_path / "ds" / "data").iterdir())
    assert [s.name for s in shards] == [f"train-0000{i}-of-00003.parquet" for i in range(3)]
    assert sum(pq.read_metadata(s).num_rows for s in shards) == 7
    card = (tmp_path / "ds" / "README.md").read_text()
    assert card.startswith("---\n") and "num_examples: 7" in card and '- "m/small"' in card
    assert f"total_cost_usd: {result.total_cost_usd:.9f}" in card
    # A second export replaces the first whole.
    export(out, tmp_path / "ds", fmt="hf", inputs=[prompts])
    assert [s.name for s in (tmp_path / "ds" / "data").iterdir()] == ["train-00000-of-00001.parquet"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_hf_refuses_to_replace_a_folder_that_is_not_an_export(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", ["a"])
    out = write_ledger(tmp_path / "out", [v2_row("a")])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(InputError, match="not a batchgate export"):
        export(out, tmp_path / "mine", fmt="hf", inputs=[prompts])
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_hf_folder_loads_with_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    datasets = pytest.importorskip("datasets")
    ids = [f"p{i}" for i in range(5)]
    prompts = write_prompts(tmp_path / "p.jsonl", ids)
    out = write_ledger(tmp_path / "out", [v2_row(i, s) for i in ids for s in range(2)])
    export(out, tmp_path / "ds", fmt="hf", inputs=[prompts], shard_rows=4)
    loaded = datasets.load_dataset("parquet", data_dir=str(tmp_path / "ds"), cache_dir=str(tmp_path / "cache"))
    train = loaded["train"]
    assert train.num_rows == 10 and train[0]["messages"][-1]["content"] == "p0 answer 0"
    # The card's features are exactly what datasets derives from the files.
    from datasets import Features

    derived = Features.from_arrow_schema(PARQUET_SCHEMA)
    by_card = datasets.load_dataset(str(tmp_path / "ds"), cache_dir=str(tmp_path / "cache2"))["train"]
    assert by_card.features == derived and by_card.num_rows == 10


def test_a_failed_export_leaves_the_old_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import batchgate.export as ex

    prompts = write_prompts(tmp_path / "p.jsonl", ["a", "b"])
    out = write_ledger(tmp_path / "out", [v2_row("a"), v2_row("b")])
    target = tmp_path / "x.parquet"
    target.write_bytes(b"the previous export")

    def broken(*args: Any, **kw: Any) -> dict[str, Any]:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ex, "_table_row", broken)
    with pytest.raises(OSError):
        export(out, target, fmt="parquet", inputs=[prompts])
    assert target.read_bytes() == b"the previous export"
    assert sorted(os.listdir(tmp_path)) == ["out", "p.jsonl", "x.parquet"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    events=st.lists(
        st.tuples(st.integers(0, 5), st.integers(0, 2), st.booleans()),  # (prompt, sample, ok)
        max_size=40,
    ),
    n_prompts=st.integers(1, 6),
)
def test_export_is_the_latest_ok_row_of_each_key(tmp_path_factory: Any, events: Any, n_prompts: int) -> None:
    tmp = tmp_path_factory.mktemp("prop")
    ids = [f"id-{i}" for i in range(n_prompts)]
    prompts = write_prompts(tmp / "p.jsonl", ids)
    rows = [
        v2_row(f"id-{p}", s, "ok" if ok else "failed", content=f"row {n}", request_id=f"r{n}")
        for n, (p, s, ok) in enumerate(events)
    ]
    out = write_ledger(tmp / "out", rows)
    result = export(out, tmp / "x.jsonl", inputs=[prompts])
    want: dict[tuple[str, int], str] = {}
    for n, (p, s, ok) in enumerate(events):
        if ok and p < n_prompts:
            want[(f"id-{p}", s)] = f"r{n}"
    got = read_jsonl(tmp / "x.jsonl")
    assert [(r["id"], r["sample"]) for r in got] == sorted(want, key=lambda k: (ids.index(k[0]), k[1]))
    assert {(r["id"], r["sample"]): r["request_id"] for r in got} == want
    assert result.unmatched_rows == len({(p, s) for p, s, _ in events if p >= n_prompts})


def test_inputs_the_run_file_names_but_that_are_gone(tmp_path: Path) -> None:
    out = write_ledger(tmp_path / "out", [v2_row("a")])
    (out / "runs").mkdir()
    (out / "runs" / "r1.json").write_bytes(orjson.dumps({"inputs": ["prompts/moved.jsonl"], "config": {}}))
    with pytest.raises(InputError, match=r"moved.jsonl: no such file .*--inputs"):
        export(out, tmp_path / "x.jsonl")
    (out / "runs" / "r1.json").write_bytes(orjson.dumps({"inputs": ["-"], "config": {}}))
    with pytest.raises(InputError, match="stdin"):
        export(out, tmp_path / "x.jsonl")
    assert not (tmp_path / "x.jsonl").exists()


def test_a_table_with_a_template_file_named_by_the_run_file(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_text("id,text,topic\nq1,hello,greeting\n")
    template = tmp_path / "prompt.j2"
    template.write_text("Reply to: {{ text }}")
    out = write_ledger(tmp_path / "out", [v2_row("q1", meta=None)])
    (out / "runs").mkdir()
    config = {"template": str(template), "id_column": "id", "default_model": "m/small"}
    (out / "runs" / "r1.json").write_bytes(orjson.dumps({"inputs": [str(table)], "config": config}))
    export(out, tmp_path / "x.jsonl")
    (row,) = read_jsonl(tmp_path / "x.jsonl")
    assert row["messages"][0] == {"role": "user", "content": "Reply to: hello"}
    assert row["meta"] == {"topic": "greeting"}


def test_rows_a_full_disk_spilled_are_exported(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", ["a", "b"])
    out = write_ledger(tmp_path / "out", [v2_row("a"), v2_row("b", status="failed")])
    (out / "results.spill.jsonl").write_bytes(orjson.dumps(v2_row("b")) + b"\n")
    result = export(out, tmp_path / "x.jsonl", inputs=[prompts])
    assert [r["status"] for r in read_jsonl(tmp_path / "x.jsonl")] == ["ok", "ok"] and result.rows == 2


def test_the_target_folder_is_made_and_a_file_in_the_way_is_an_error(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", ["a"])
    out = write_ledger(tmp_path / "out", [v2_row("a")])
    export(out, tmp_path / "new" / "deep" / "x.jsonl", inputs=[prompts])
    assert len(read_jsonl(tmp_path / "new" / "deep" / "x.jsonl")) == 1
    (tmp_path / "blocker").write_text("")
    for fmt in ("chat-jsonl", "hf"):
        with pytest.raises(InputError, match="not a directory"):
            export(out, tmp_path / "blocker" / "x", inputs=[prompts], fmt=fmt)
    with pytest.raises(InputError, match="is a directory"):
        export(out, tmp_path / "new", inputs=[prompts])


def test_records_given_per_sample_export_each_answer_once(tmp_path: Path) -> None:
    import dataclasses

    from batchgate.jobs import iter_records

    prompts = write_prompts(tmp_path / "p.jsonl", ["a", "b"])
    out = write_ledger(tmp_path / "out", [v2_row(i, s) for i in ("a", "b") for s in range(3)])
    expanded = [dataclasses.replace(r, sample=s) for r in iter_records([prompts], default_model=None) for s in range(3)]
    result = export(out, tmp_path / "x.jsonl", records=expanded)
    assert [(r["id"], r["sample"]) for r in read_jsonl(tmp_path / "x.jsonl")] == [
        (i, s) for i in ("a", "b") for s in range(3)
    ]
    assert result.rows == 6
