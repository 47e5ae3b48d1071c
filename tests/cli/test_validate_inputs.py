"""`batchgate validate` on the inputs a user has: tables with templates, stdin pipes, compressed files, typos."""

from __future__ import annotations

import gzip
import subprocess
from pathlib import Path

import orjson
from clitools import BATCHGATE, bg, env

PROMPTS = b'{"id": "a", "prompt": "one"}\n{"id": "b", "prompt": "two"}\n'


def bg_stdin(*args: str, stdin: bytes) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([BATCHGATE, *args], input=stdin, capture_output=True, env=env(), timeout=60, check=False)
    return subprocess.CompletedProcess(res.args, res.returncode, res.stdout.decode(), res.stderr.decode())


def test_csv_with_an_inline_template_and_a_template_file(tmp_path: Path) -> None:
    table = tmp_path / "questions.csv"
    table.write_text("id,question,gold\nq1,What is 2+2?,4\nq2,Capital of France?,Paris\nq3,Largest planet?,Jupiter\n")
    res = bg("validate", str(table), "--prompt", "Answer briefly: {{ question }}", "--model", "m", "--id-column", "id")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "3 prompts, 93 prompt characters: ready to run"
    template = tmp_path / "p.j2"
    template.write_text("{{ question }} (hint: {{ hint }})\n")
    res = bg("validate", str(table), "--template", str(template), "--model", "m", key=None)
    assert res.returncode == 2
    assert res.stderr.splitlines()[0] == (
        f'batchgate: {table}:1: data row 1: the template needs column "hint", which this row lacks: '
        "(columns: gold, id, question)"
    )
    assert len(res.stderr.splitlines()) == 3 and res.stdout == ""


def test_a_table_without_a_template_and_both_template_flags_are_usage_errors(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_text("text\nx\n")
    res = bg("validate", str(table), "--model", "m", key=None)
    assert res.returncode == 2 and "is a CSV table: pass --template FILE or --prompt TEXT" in res.stderr
    res = bg("validate", str(table), "--model", "m", "--prompt", "x", "--template", str(table), key=None)
    assert res.returncode == 2 and "give either --template FILE or --prompt TEXT, not both" in res.stderr


def test_stdin_pipe_is_validated_without_being_used_up() -> None:
    res = bg_stdin("validate", "-", "--model", "m", stdin=PROMPTS)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "2 prompts, 6 prompt characters: ready to run"
    res = bg_stdin("validate", "/dev/stdin", "--model", "m", stdin=gzip.compress(PROMPTS))
    assert res.returncode == 0, res.stderr
    res = bg_stdin("validate", "-", "--model", "m", "--prompt", "{{ q }}", stdin=b"q\nfirst\nsecond\nthird\n")
    assert res.returncode == 0 and res.stdout.startswith("3 prompts"), res.stderr


def test_gz_file(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl.gz"
    path.write_bytes(gzip.compress(PROMPTS))
    res = bg("validate", str(path), "--model", "m", key=None)
    assert res.returncode == 0 and res.stdout.startswith("2 prompts"), res.stderr
    path.write_bytes(gzip.compress(PROMPTS)[:-12])
    res = bg("validate", str(path), "--model", "m", key=None)
    assert res.returncode == 2 and "the gzip data is corrupt or cut short" in res.stderr


def test_a_binary_file_is_one_line_and_an_empty_input_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "photo.jsonl"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + b"\n" * 100)
    res = bg("validate", str(path), "--model", "m", key=None)
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1 and "looks like a binary file" in res.stderr
    res = bg_stdin("validate", "-", "--model", "m", stdin=b"")
    assert res.returncode == 2
    assert res.stderr.strip() == "batchgate: -: no prompts: the input is empty or holds only blank lines"


def test_typos_warn_and_strict_refuses_them(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "x", "temprature": 0.3}\n{"messages": [{"role": "user", "content": "y"}]}\n')
    res = bg("validate", str(path), "--model", "m", key=None)
    assert res.returncode == 0
    assert res.stderr.strip() == (
        f"batchgate: warning: {path}:1: unknown chat parameter temprature: did you mean temperature?"
    )
    res = bg("validate", str(path), "--model", "m", "--strict", key=None)
    assert res.returncode == 2
    assert f"{path}:1: unknown chat parameter temprature: did you mean temperature? (--strict)" in res.stderr
    path.write_text('{"messages": [{"role": "wizard", "content": "y"}]}\n')
    res = bg("validate", str(path), "--model", "m", key=None)
    assert res.returncode == 2 and 'messages[0]: unknown role "wizard"' in res.stderr


def test_a_job_file_with_a_template(tmp_path: Path) -> None:
    (tmp_path / "rows.csv").write_text("id,text\n1,hello\n2,world\n")
    (tmp_path / "prompt.j2").write_text("Translate: {{ text }}\n")
    job = tmp_path / "job.toml"
    job.write_text(
        'inputs = ["rows.csv"]\nmodel = "m"\ntemplate_file = "prompt.j2"\nid_column = "id"\n[chat]\nmax_token = 5\n'
    )
    res = bg("validate", str(job), key=None)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("2 prompts")
    assert "chat.max_token: unknown chat parameter max_token: did you mean max_tokens?" in res.stderr
    res = bg("validate", str(job), "--strict", key=None)
    assert res.returncode == 2 and "did you mean max_tokens? (--strict)" in res.stderr


def test_run_over_a_gzipped_stdin_pipe_sends_every_prompt(tmp_path: Path) -> None:
    """`cat prompts | batchgate run -` used to validate the stream, then find it used up and send nothing."""
    res = bg_stdin(
        "run",
        "-",
        "--simulate",
        "--model",
        "qwen/qwen3-235b-a22b-instruct-2507-fp8",
        "--out",
        str(tmp_path / "out"),
        "--no-report",
        "--quiet",
        "--json",
        stdin=gzip.compress(PROMPTS),
    )
    assert res.returncode == 0, res.stderr
    summary = orjson.loads(res.stdout.strip().splitlines()[-1])
    assert (summary["requests"], summary["ok"]) == (2, 2)
    rows = [orjson.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_bytes().splitlines()]
    assert sorted(r["id"] for r in rows) == ["a", "b"] and {r["job"] for r in rows} == {"stdin"}
