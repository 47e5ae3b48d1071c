"""TOML job files: paths relative to the file, settings checked, typos refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from batchgate.errors import JobFileError
from batchgate.jobfile import load_job

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "jobs").mkdir(exist_ok=True)
    path = tmp_path / "jobs" / "night.toml"
    path.write_text(text)
    return path


def test_full_job(tmp_path: Path) -> None:
    spec = load_job(
        write(
            tmp_path,
            'name = "n"\ninputs = ["a.jsonl", "sub/b.jsonl"]\nout = "reports/n"\nmodel = "m"\nconcurrency = 8\n'
            'rpm = 120\nmax_cost_usd = 2.5\nsystem = "Be brief."\n[chat]\ntemperature = 0.2\nmax_tokens = 99\n',
        )
    )
    assert spec.name == "n"
    assert spec.inputs == [tmp_path / "jobs" / "a.jsonl", tmp_path / "jobs" / "sub" / "b.jsonl"]
    assert spec.out == Path("reports/n")
    assert spec.chat == {"temperature": 0.2, "max_tokens": 99}
    assert spec.settings == {
        "default_model": "m",
        "concurrency": 8,
        "rpm": 120,
        "max_cost": 2.5,
        "system_prompt": "Be brief.",
    }


def test_name_defaults_to_stem_and_single_input_string(tmp_path: Path) -> None:
    spec = load_job(write(tmp_path, 'inputs = "p.jsonl"\n'))
    assert spec.name == "night" and spec.inputs == [tmp_path / "jobs" / "p.jsonl"] and spec.settings == {}


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('inputs = ["a.jsonl"]\nmax_cost = 3\n', "max_cost: unknown key: did you mean max_cost_usd?"),
        ("inputs = []\n", "inputs: must be a list"),
        ('inputs = ["a.jsonl"]\nconcurrency = "8"\n', "concurrency: must be int, not str"),
        ('inputs = ["a.jsonl"]\nconcurrency = true\n', "concurrency: must be int, not bool"),
        ('inputs = ["a.jsonl"]\nmax_cost_usd = -1\n', "max_cost_usd: must be positive"),
        ('inputs = ["a.jsonl"]\n[chat]\nstream = false\n', "chat: sets chat parameters"),
        ('inputs = ["a.jsonl"]\n[chat]\nmax_tokens = 0\n', "chat.max_tokens: must be a positive integer"),
        ("inputs = [\n", "not valid TOML"),
    ],
)
def test_mistakes_name_file_and_key(tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(JobFileError) as info:
        load_job(path)
    assert str(info.value).startswith(f"{path}: ")
    assert needle in str(info.value)


def test_missing_job_file(tmp_path: Path) -> None:
    with pytest.raises(JobFileError, match="cannot read job file"):
        load_job(tmp_path / "nope.toml")


@pytest.mark.parametrize("name", ["demo.toml", "nightly.toml"])
def test_shipped_jobs_load_and_their_prompts_exist(name: str) -> None:
    spec = load_job(REPO / "jobs" / name)
    assert all(p.exists() for p in spec.inputs)


def test_template_keys_text_or_file_relative_to_the_job(tmp_path: Path) -> None:
    spec = load_job(
        write(
            tmp_path,
            'inputs = ["rows.csv"]\nmodel = "m"\ntemplate = "Q: {{ q }}"\nsystem_template_file = "sys.j2"\n'
            'id_column = "id"\n',
        )
    )
    assert spec.settings == {
        "default_model": "m",
        "template": "Q: {{ q }}",
        "system_template": tmp_path / "jobs" / "sys.j2",
        "id_column": "id",
    }
    spec = load_job(write(tmp_path, 'inputs = ["rows.csv"]\ntemplate_file = "t/p.j2"\n'))
    assert spec.settings == {"template": tmp_path / "jobs" / "t" / "p.j2"}


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('template = "a"\ntemplate_file = "b.j2"\n', "template_file: give either template (the text) or template_file"),
        ('id_column = "id"\n', "id_column: goes with template or template_file"),
        ('system_template = "s"\n', "system_template: goes with template"),
        ('template = "  "\n', "template: must not be empty"),
        ("template_file = 3\n", "template_file: must be a template file path"),
        ("template = 3\n", "template: must be str, not int"),
    ],
)
def test_template_key_mistakes(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(JobFileError, match=re.escape(needle)):
        load_job(write(tmp_path, 'inputs = ["a.csv"]\n' + text))


def test_unknown_chat_parameters_are_warnings_with_the_nearest_name(tmp_path: Path) -> None:
    path = write(tmp_path, 'inputs = ["a.jsonl"]\n[chat]\ntemprature = 0.2\ntop_p = 0.9\n')
    spec = load_job(path)
    assert spec.chat == {"temprature": 0.2, "top_p": 0.9}
    assert spec.warnings == [f"{path}: chat.temprature: unknown chat parameter temprature: did you mean temperature?"]
