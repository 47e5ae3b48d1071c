"""End to end: `batchgate run --simulate`, then `batchgate export` to every format and `batchgate status`."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest
from clitools import BATCHGATE, REPO, bg, env, prompts

from batchgate.jobs import iter_records
from batchgate.models import PromptRecord

DEMO = REPO / "jobs" / "demo.jsonl"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "out"
    res = bg("run", str(DEMO), "--simulate", "--out", str(out), "--no-report", "-q", "--sim-token-delay", "0", key=None)
    assert res.returncode == 0, res.stderr
    return out


def demo_prompts() -> list[PromptRecord]:
    return list(iter_records([DEMO], default_model=None))


def test_export_every_format(demo_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from openai.types.chat import ChatCompletion

    lines = demo_prompts()
    ledger = [orjson.loads(x) for x in (demo_run / "results.jsonl").read_bytes().splitlines()]
    answers = {r["id"]: r for r in ledger if r["status"] == "ok"}
    args = ("--inputs", str(DEMO))

    res = bg("export", str(demo_run), "--to", str(tmp_path / "chat.jsonl"), *args, key=None)
    assert res.returncode == 0, res.stderr
    chat = [orjson.loads(x) for x in (tmp_path / "chat.jsonl").read_bytes().splitlines()]
    assert [r["id"] for r in chat] == [x.id for x in lines if x.id in answers]
    sent = {x.id: x.body["messages"] for x in lines}
    assert len({str(m) for m in sent.values()}) > 3  # the demo's prompts differ
    for row in chat:
        assert row["messages"][:-1] == sent[row["id"]]
        assert row["messages"][-1] == {"role": "assistant", "content": answers[row["id"]]["content"]}
        assert row["cost_usd"] == answers[row["id"]]["total_cost_usd"]
    assert f"wrote {len(chat)} rows" in res.stdout

    res = bg("export", str(demo_run), "--format", "parquet", "--to", str(tmp_path / "x.parquet"), *args, key=None)
    assert res.returncode == 0, res.stderr
    table = pq.read_table(tmp_path / "x.parquet").to_pylist()
    assert [r["id"] for r in table] == [r["id"] for r in chat]
    assert [r["messages"][-1]["content"] for r in table] == [r["messages"][-1]["content"] for r in chat]

    res = bg("export", str(demo_run), "--format", "openai-batch", "--to", str(tmp_path / "b.jsonl"), *args, key=None)
    assert res.returncode == 0, res.stderr
    batch = [orjson.loads(x) for x in (tmp_path / "b.jsonl").read_bytes().splitlines()]
    for line in batch:
        completion = ChatCompletion.model_validate(line["response"]["body"])
        assert completion.choices[0].message.content == answers[line["custom_id"]]["content"]
        assert completion.usage is not None
        assert completion.usage.completion_tokens == answers[line["custom_id"]]["completion_tokens"]

    res = bg("export", str(demo_run), "--format", "hf", "--to", str(tmp_path / "ds"), *args, "--json", key=None)
    assert res.returncode == 0, res.stderr
    summary = orjson.loads(res.stdout.splitlines()[-1])
    assert summary["rows"] == len(chat)
    assert summary["total_cost_usd"] == pytest.approx(sum(r["total_cost_usd"] for r in answers.values()))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    datasets = pytest.importorskip("datasets")
    loaded = datasets.load_dataset("parquet", data_dir=str(tmp_path / "ds"), cache_dir=str(tmp_path / "cache"))
    assert loaded["train"]["id"] == [r["id"] for r in chat]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left behind


def test_export_errors_are_one_line_and_exit_2(demo_run: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"  # a ledger without the run file that names its inputs
    bare.mkdir()
    (bare / "results.jsonl").write_bytes((demo_run / "results.jsonl").read_bytes())
    res = bg("export", str(bare), "--to", str(tmp_path / "x.jsonl"), key=None)
    assert res.returncode == 2 and "--inputs" in res.stderr and "Traceback" not in res.stderr
    res = bg("export", str(tmp_path / "nope"), "--to", str(tmp_path / "x.jsonl"), key=None)
    assert res.returncode == 2 and "no such directory" in res.stderr
    assert not (tmp_path / "x.jsonl").exists()


def test_status_of_a_finished_run(demo_run: Path) -> None:
    res = bg("status", str(demo_run), "--json", key=None)
    assert res.returncode == 0, res.stderr
    st = orjson.loads(res.stdout)
    ledger = [orjson.loads(x) for x in (demo_run / "results.jsonl").read_bytes().splitlines()]
    assert st["done"] == sum(r["status"] == "ok" for r in ledger) and not st["running"]
    assert st["spend"]["confirmed_usd"] == pytest.approx(sum(r["total_cost_usd"] for r in ledger))
    text = bg("status", str(demo_run), key=None)
    assert text.returncode == 0 and "not running" in text.stdout


def test_status_of_a_running_run_names_its_pid(tmp_path: Path) -> None:
    src = prompts(tmp_path / "p.jsonl", 400)
    out = tmp_path / "out"
    args = [
        "run",
        str(src),
        "--simulate",
        "--out",
        str(out),
        "-q",
        "--no-report",
        "-c",
        "4",
        "--sim-token-delay",
        "0.02",
        "--model",
        "Qwen/Qwen3-32B-FP8",
    ]
    proc = subprocess.Popen([BATCHGATE, *args], env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        st: dict[str, Any] = {}
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "results.jsonl").exists() and (out / "results.jsonl").stat().st_size:
                res = bg("status", str(out), "--json", key=None)
                assert res.returncode == 0, res.stderr
                st = orjson.loads(res.stdout)
                if st["done"] >= 4:
                    break
            time.sleep(0.1)
        assert st.get("running") and st["pids"] == [proc.pid]
        assert st["rate_per_s"] and st["rate_per_s"] > 0
    finally:
        proc.terminate()
        proc.wait(30)
    assert proc.returncode in (0, 143)
    after = orjson.loads(bg("status", str(out), "--json", key=None).stdout)
    assert not after["running"] and after["done"] >= st["done"]


def test_shard_dirs_export_as_one(demo_run: Path, tmp_path: Path) -> None:
    """A parent of shard-K-of-N/ dirs: two halves of the demo ledger export like the whole."""
    rows = (demo_run / "results.jsonl").read_bytes().splitlines(keepends=True)
    for k in range(2):
        shard = tmp_path / "out" / f"shard-{k}-of-2"
        shard.mkdir(parents=True)
        (shard / "results.jsonl").write_bytes(b"".join(rows[k::2]))
    res = bg("export", str(tmp_path / "out"), "--to", str(tmp_path / "m.jsonl"), "--inputs", str(DEMO), key=None)
    assert res.returncode == 0, res.stderr
    whole = bg("export", str(demo_run), "--to", str(tmp_path / "w.jsonl"), "--inputs", str(DEMO), key=None)
    assert whole.returncode == 0
    assert (tmp_path / "m.jsonl").read_bytes() == (tmp_path / "w.jsonl").read_bytes()
    st = orjson.loads(bg("status", str(tmp_path / "out"), "--json", key=None).stdout)
    assert st["shards"] == 2 and st["rows"] == len(rows)
    assert os.path.exists(tmp_path / "out" / "shard-1-of-2" / "results.jsonl")


MODEL = "Qwen/Qwen3-32B-FP8"


def test_a_csv_with_a_template_and_3_samples_to_every_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dataset walkthrough: table rows + template + samples, exported with nothing but OUT."""
    from openai.types.chat import ChatCompletion

    table = tmp_path / "reviews.csv"
    table.write_text('id,text,stars\nr1,Great pan,5\nr2,"Burns, badly",1\nr3,Fine,3\n')
    out = tmp_path / "out"
    res = bg(
        "run", str(table), "--prompt", "Summarise: {{ text }}", "--id-column", "id", "--samples", "3",
        "--model", MODEL, "--simulate", "--out", str(out), "--no-report", "-q", "--sim-token-delay", "0",
        key=None,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr

    assert bg("export", str(out), "--to", str(tmp_path / "c.jsonl"), key=None).returncode == 0
    chat = [orjson.loads(x) for x in (tmp_path / "c.jsonl").read_bytes().splitlines()]
    assert [(r["id"], r["sample"]) for r in chat] == [(i, s) for i in ("r1", "r2", "r3") for s in range(3)]
    assert chat[3]["messages"][0] == {"role": "user", "content": "Summarise: Burns, badly"}
    assert chat[3]["meta"] == {"stars": "1"}  # the columns the template does not use
    assert len({(r["run_id"], r["id"], r["sample"]) for r in chat}) == 9

    assert (
        bg("export", str(out), "--format", "openai-batch", "--to", str(tmp_path / "b.jsonl"), key=None).returncode == 0
    )
    batch = [orjson.loads(x) for x in (tmp_path / "b.jsonl").read_bytes().splitlines()]
    assert [b["custom_id"] for b in batch][:3] == ["r1", "r1#1", "r1#2"]
    for b in batch:
        ChatCompletion.model_validate(b["response"]["body"])

    assert bg("export", str(out), "--format", "parquet", "--to", str(tmp_path / "x.parquet"), key=None).returncode == 0
    assert pq.read_table(tmp_path / "x.parquet").column("sample").to_pylist() == [0, 1, 2] * 3

    assert bg("export", str(out), "--format", "hf", "--to", str(tmp_path / "ds"), key=None).returncode == 0
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    datasets = pytest.importorskip("datasets")
    train = datasets.load_dataset("parquet", data_dir=str(tmp_path / "ds"), cache_dir=str(tmp_path / "cache"))["train"]
    assert train.num_rows == 9 and train[3]["messages"][0]["content"] == "Summarise: Burns, badly"


def test_three_shards_as_three_processes_export_and_status_as_one(tmp_path: Path) -> None:
    src = prompts(tmp_path / "p.jsonl", 60)
    out = tmp_path / "out"
    procs = [
        subprocess.Popen(
            [
                BATCHGATE,
                "run",
                str(src),
                "--shard",
                f"{k}/3",
                "--model",
                MODEL,
                "--simulate",
                "--out",
                str(out),
                "--no-report",
                "-q",
                "--sim-token-delay",
                "0",
            ],
            env=env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in (1, 2, 3)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["shard-1-of-3", "shard-2-of-3", "shard-3-of-3"]
    res = bg("export", str(out), "--to", str(tmp_path / "all.jsonl"), key=None)
    assert res.returncode == 0, res.stderr
    ids = [orjson.loads(x)["id"] for x in (tmp_path / "all.jsonl").read_bytes().splitlines()]
    assert ids == [f"p{i}" for i in range(60)]  # complete, in input order, each once
    st = orjson.loads(bg("status", str(out), "--json", key=None).stdout)
    assert (st["shards"], st["done"], st["total"], st["failed"]) == (3, 60, 60, 0)
    assert sum(s["done"] for s in st["shard_status"]) == 60 and all(s["done"] for s in st["shard_status"])
