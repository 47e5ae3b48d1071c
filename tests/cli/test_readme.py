"""Every command in the README, run as written against the simulator, does what the text says.

Each fenced ``bash`` line (and the command in the ``cron`` line) is run by ``bash`` in a fresh
directory holding a copy of ``jobs/`` and a ``.venv/bin`` that points at the batchgate under test.
What a reader must bring is made up here: their ``prompts.jsonl`` and ``big.jsonl``; a real key
and GonkaGate are stood in for by a ``batchgate simulate`` process named by GONKAGATE_BASE_URL
(the README's own ``export GONKAGATE_API_KEY=gp-...`` line is run as written: the simulator takes
any ``gp-`` key).  Only the installs are skipped: this interpreter already has batchgate installed.

A README command without a case here fails :func:`test_every_readme_command_is_tested`: add one.
Known frictions (issue 13) are strict xfails; once fixed they XPASS, and the xfail is removed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from clitools import BATCHGATE, REPO, Sim, env, simulator_fixture

README = (REPO / "README.md").read_text()
BIN = Path(BATCHGATE).parent
REAL_MODEL = "Qwen/Qwen3-235B-A22B-Instruct-2507-FP8"


def fenced(lang: str) -> list[str]:
    """The command lines of every ```lang block, in order (comments and blank lines dropped)."""
    blocks = re.findall(rf"^```{lang}\n(.*?)^```", README, flags=re.S | re.M)
    return [ln.strip() for block in blocks for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]


def cron_commands() -> list[str]:
    """The command of each crontab line: what follows the five time fields."""
    return [ln.split(None, 5)[5] for ln in fenced("cron")]


def readme(prefix: str) -> str:
    """The one README command line starting with ``prefix``, exactly as written."""
    found = [c for c in fenced("bash") + cron_commands() if c.startswith(prefix)]
    assert len(found) == 1, f"the README has {len(found)} commands starting {prefix!r}: {found}"
    return found[0]


INSTALL = ("python3 -m venv ", ".venv/bin/pip install ")


def without_install(command: str) -> str:
    """Drop the `python3 -m venv ... && pip install ...` steps: batchgate is installed already."""
    steps = [s for s in command.split(" && ") if not s.startswith(INSTALL)]
    return " && ".join(steps)


# -- the place a reader runs commands in --------------------------------------------------------------


class Shell:
    def __init__(self, root: Path, sim: Sim) -> None:
        self.root, self.sim = root, sim
        self.cwd = root / "work"
        self.home = root / "home"
        self.cwd.mkdir()
        self.home.mkdir()
        shutil.copytree(REPO / "jobs", self.cwd / "jobs")
        venv_bin = self.cwd / ".venv" / "bin"
        venv_bin.mkdir(parents=True)
        (venv_bin / "batchgate").symlink_to(BATCHGATE)
        # A script, not a symlink: a symlinked interpreter outside its venv would lose the venv's packages.
        (venv_bin / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        (venv_bin / "python").chmod(0o755)

    def env(self, **extra: str) -> dict[str, str]:
        return env(
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            HOME=str(self.home),
            GONKAGATE_BASE_URL=self.sim.url,
            **extra,
        )

    def run(self, script: str, timeout: float = 60, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", script],
            cwd=self.cwd,
            env=self.env(**extra),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def billed(self) -> int:
        return len(self.sim.billing()) if self.sim.billing_log.stat().st_size else 0


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Sim]:
    yield from simulator_fixture(tmp_path_factory.mktemp("sim"), request)


@pytest.fixture
def sh(tmp_path: Path, sim: Sim) -> Shell:
    return Shell(tmp_path, sim)


def write_prompts(path: Path, n: int, *, model: bool = False) -> None:
    """A reader's own prompt file: lines with no model (``--model`` names it) unless asked."""
    with path.open("w") as f:
        for i in range(n):
            line: dict[str, object] = {"id": f"q{i}", "prompt": f"question {i} " + "word " * (i % 17)}
            line["max_tokens"] = 16 + i % 40
            if model:
                line["model"] = REAL_MODEL
            f.write(orjson.dumps(line).decode() + "\n")


def rows(ledger: Path) -> list[dict[str, object]]:
    return [orjson.loads(x) for x in ledger.read_bytes().splitlines()]


# -- the inventory --------------------------------------------------------------------------------


#: Every README command line (by its start) and the test that runs it.
CASES = {
    "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/batchgate run jobs/demo.jsonl": "try_it",
    "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest": "skipped",
    "export GONKAGATE_API_KEY=": "use_it_for_real",
    "batchgate run prompts.jsonl": "use_it_for_real",
    "batchgate validate prompts.jsonl": "use_it_for_real",
    "batchgate run jobs/nightly.toml": "cron",
    "batchgate report reports/ ": "report_over_parent",
    "batchgate estimate big.jsonl --sample 200  #": "use_it_for_real",
    "batchgate estimate big.jsonl --sample 200 --model qwen/qwen3-235b-a22b-instruct-2507-fp8 [--max-cost 1.00]": (
        "estimate_section"
    ),
    "cd /srv/datasets && ": "cron",
    "batchgate status reports/prompts": "use_it_for_real",
    "batchgate run questions.csv": "dataset_walkthrough",
    "batchgate export reports/questions": "dataset_walkthrough",
    '.venv/bin/python -c "import datasets;': "dataset_walkthrough",
    '.venv/bin/python -c "import duckdb; duckdb.sql(\\"SELECT model': "report_over_parent",
    "batchgate report reports/ --partition-by-day": "report_over_parent",
    '.venv/bin/python -c "import duckdb; duckdb.sql(\\"SELECT day': "report_over_parent",
    "_BATCHGATE_COMPLETE=bash_source": "completion",
    "_BATCHGATE_COMPLETE=zsh_source": "completion",
    "mkdir -p ~/.config/fish/completions": "completion",
    "batchgate -V": "completion",
}


def test_every_readme_command_is_tested() -> None:
    commands = fenced("bash") + cron_commands()
    assert len(commands) >= 10, commands  # the extraction itself works
    untested = [c for c in commands if not any(c.startswith(p) for p in CASES)]
    assert not untested, f"README commands with no case in {__name__}.CASES: {untested}"


def test_run_the_tests_line_is_the_suite_itself() -> None:
    """Skipped on purpose: it builds a venv and runs this very suite (`.ci/run` runs it); check its shape only."""
    line = readme("python3 -m venv .venv && .venv/bin/pip install -e '.[test]'")
    assert without_install(line) == ".venv/bin/python -m pytest"
    assert "test" in (REPO / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1]


# -- Try it ---------------------------------------------------------------------------------------


def test_try_it_runs_the_demo_prints_the_cost_report_and_reruns_for_free(sh: Shell) -> None:
    line = without_install(readme("python3 -m venv .venv && .venv/bin/pip install -e . &&"))
    assert line == ".venv/bin/batchgate run jobs/demo.jsonl --simulate"
    res = sh.run(line)
    assert res.returncode == 0, res.stderr
    assert "requests  50 (50 ok, 0 failed" in res.stdout
    assert re.search(r"^TOTAL\s+50\s", res.stdout, flags=re.M)  # "then prints its cost report"
    assert (sh.cwd / "reports/demo/report.html").exists()  # "open reports/demo/report.html"
    again = sh.run(line)  # "Rerun the same command: nothing is bought twice (`50 already done`)"
    assert again.returncode == 0, again.stderr
    assert "50 already done" in again.stdout and "requests  0 (" in again.stdout
    assert len(rows(sh.cwd / "reports/demo/results.jsonl")) == 50


def test_try_it_with_faults_shows_it_riding_them_out(sh: Shell) -> None:
    line = without_install(readme("python3 -m venv .venv && .venv/bin/pip install -e . &&"))
    assert sh.run(line).returncode == 0
    assert "`--fresh --sim-fault-rate 0.05`" in " ".join(README.split())
    res = sh.run(line + " --fresh --sim-fault-rate 0.05 --json")  # "Add --fresh --sim-fault-rate 0.05 ..."
    assert res.returncode == 0, res.stderr
    summary = orjson.loads(res.stdout.splitlines()[-1])
    assert summary["ok"] == 50 and summary["retries"] > 0


# -- Use it for real --------------------------------------------------------------------------------


def test_use_it_for_real(sh: Shell) -> None:
    export = readme("export GONKAGATE_API_KEY=")
    write_prompts(sh.cwd / "prompts.jsonl", 20)
    write_prompts(sh.cwd / "big.jsonl", 400, model=True)

    before = sh.billed()
    res = sh.run(f"{export}\n{readme('batchgate validate prompts.jsonl')}")
    assert res.returncode == 0, res.stderr
    assert "20 prompts" in res.stdout and "ready to run" in res.stdout
    assert sh.billed() == before  # "check the input without sending anything"

    res = sh.run(f"{export}\n{readme('batchgate run prompts.jsonl')}")
    assert res.returncode == 0, res.stderr
    status = sh.run(readme("batchgate status reports/prompts"))  # "how far a run got and what it spent"
    assert status.returncode == 0, status.stderr
    assert "20" in status.stdout and "$" in status.stdout
    out = sh.cwd / "reports/prompts"  # "Answers land in reports/<input stem>/results.jsonl"
    ledger = rows(out / "results.jsonl")
    assert len(ledger) == 20 and {r["model"] for r in ledger} == {REAL_MODEL}
    assert sh.billed() == before + 20
    assert "requests  20 (20 ok" in res.stdout  # "prints a summary"
    for name in ("report.html", "summary.csv", "summary.parquet", "requests.parquet"):  # "... beside the ledger"
        assert (out / name).exists(), name

    res = sh.run(f"{export}\n{readme('batchgate estimate big.jsonl --sample 200  #')}")
    assert res.returncode == 0, res.stderr
    assert "Estimate of 400 prompts from 200 sampled" in res.stdout
    assert re.search(r"95% interval", res.stdout)  # "(with a 95% interval)"
    assert (sh.cwd / "reports/big/estimate.json").exists()


def test_report_over_the_parent_of_every_run(sh: Shell) -> None:
    export = readme("export GONKAGATE_API_KEY=")
    write_prompts(sh.cwd / "prompts.jsonl", 10)
    assert sh.run(f"{export}\nbatchgate run prompts.jsonl --model sim-model -q --no-report").returncode == 0
    assert sh.run(".venv/bin/batchgate run jobs/demo.jsonl --simulate -q --no-report").returncode == 0
    res = sh.run(readme("batchgate report reports/  "))
    assert res.returncode == 0, res.stderr
    # "cost reports across every run below reports/": one table over both runs
    assert re.search(r"^TOTAL\s+60\s", res.stdout, flags=re.M), res.stdout
    written = [Path(m) for m in re.findall(r"^wrote (\S+)", res.stdout, flags=re.M)]
    assert any(p.name == "report.html" for p in written)
    assert all((sh.cwd / p).exists() for p in written)
    # "Every run's requests can be queried in place" (the DuckDB line)
    query = sh.run(readme('.venv/bin/python -c "import duckdb; duckdb.sql(\\"SELECT model'))
    assert query.returncode == 0, query.stderr
    assert "sim-model" in query.stdout and "usd" in query.stdout
    # "--partition-by-day writes the requests as a hive-style dataset", read back by day
    res = sh.run(readme("batchgate report reports/ --partition-by-day"))
    assert res.returncode == 0 and (sh.cwd / "reports/_all/requests").is_dir(), res.stderr
    assert not (sh.cwd / "reports/_all/requests.parquet").exists()
    by_day = sh.run(readme('.venv/bin/python -c "import duckdb; duckdb.sql(\\"SELECT day'))
    assert by_day.returncode == 0, by_day.stderr
    assert re.search(r"\d{4}-\d{2}-\d{2}", by_day.stdout) and "usd" in by_day.stdout, by_day.stdout


# -- Generate a dataset --------------------------------------------------------------------------


def test_dataset_walkthrough_from_a_csv_to_a_loaded_dataset(sh: Shell) -> None:
    (sh.cwd / "questions.csv").write_text(
        "id,question\nq1,Why is the sky blue?\nq2,What is a prime number?\nq3,Who wrote Hamlet?\n"
    )
    run = sh.run(readme("batchgate run questions.csv"), GONKAGATE_API_KEY="gp-test")
    assert run.returncode == 0, run.stderr
    ledger = rows(sh.cwd / "reports/questions/results.jsonl")
    assert sorted((r["id"], r["sample"]) for r in ledger) == [(q, s) for q in ("q1", "q2", "q3") for s in range(3)]
    export = sh.run(readme("batchgate export reports/questions"))
    assert export.returncode == 0, export.stderr
    assert (sh.cwd / "questions-hf/README.md").exists()
    pytest.importorskip("datasets")
    loaded = sh.run(
        readme('.venv/bin/python -c "import datasets;'),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(sh.root / "hf"),
    )
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split()[-1] == "9"  # three questions, three answers each


# -- Estimating a big job first ------------------------------------------------------------------------


def test_estimate_section_synopsis_with_and_without_the_optional_cap(sh: Shell) -> None:
    synopsis = readme("batchgate estimate big.jsonl --sample 200 --model qwen/qwen3-235b-a22b-instruct-2507-fp8 [")
    write_prompts(sh.cwd / "big.jsonl", 300)  # no model on the lines: `--model` names it
    bare = re.sub(r"\s*\[[^]]*\]", "", synopsis)  # the [optional] part left out ...
    capped = synopsis.replace("[", "").replace("]", "")  # ... and given
    assert bare == "batchgate estimate big.jsonl --sample 200 --model qwen/qwen3-235b-a22b-instruct-2507-fp8"
    for command in (bare, capped):
        res = sh.run(command, GONKAGATE_API_KEY="gp-test")
        assert res.returncode == 0, (command, res.stderr)
        assert "Estimate of 300 prompts from 200 sampled" in res.stdout
        est = orjson.loads((sh.cwd / "reports/big/estimate.json").read_bytes())
        assert est, command
    # "The sampled answers land in the ledger, so a following run ... reuses them"
    assert len(rows(sh.cwd / "reports/big/results.jsonl")) == 200


# -- Running from cron ----------------------------------------------------------------------------


def cron_line(sh: Shell) -> str:
    """The crontab command with the reader's paths: this directory for /srv/datasets, a key file for theirs."""
    secret = sh.root / "gonkagate.key"
    secret.write_text("gp-test\n")
    line = readme("cd /srv/datasets && ")
    assert "/srv/secrets/gonkagate" in line
    return line.replace("/srv/datasets", str(sh.cwd)).replace("/srv/secrets/gonkagate", str(secret))


def test_cron_line_logs_json_lines_only_then_a_rerun_resumes(sh: Shell) -> None:
    (sh.cwd / "logs").mkdir()
    # the job file as shipped; fewer prompts than the shipped 100 (its rpm = 600 would make this a 10 s test)
    write_prompts(sh.cwd / "jobs/nightly-prompts.jsonl", 20)
    res = sh.run(cron_line(sh), timeout=90)
    assert res.returncode == 0, res.stderr
    assert res.stdout == res.stderr == ""  # everything went to the log
    events = [orjson.loads(x) for x in (sh.cwd / "logs/nightly.log").read_bytes().splitlines()]  # JSON, every line
    assert events[0]["event"] == "start" and events[0]["out"] == "reports/nightly"
    assert events[-1]["event"] == "end" and events[-1]["ok"] == 20
    assert "gp-test" not in (sh.cwd / "logs/nightly.log").read_text()
    # "resume or start the nightly job": the job file's own command resumes, buying nothing
    before = sh.billed()
    again = sh.run(readme("batchgate run jobs/nightly.toml"), GONKAGATE_API_KEY="gp-test")
    assert again.returncode == 0, again.stderr
    assert "20 already done" in again.stdout and sh.billed() == before


def test_cron_line_works_in_a_fresh_checkout(sh: Shell) -> None:
    write_prompts(sh.cwd / "jobs/nightly-prompts.jsonl", 5)  # short: this is about the log, not the run
    res = sh.run(cron_line(sh))
    assert res.returncode == 0, res.stderr
    assert (sh.cwd / "logs/nightly.log").exists()


# -- the library snippet ----------------------------------------------------------------------------


def test_library_snippet_uses_the_same_environment_as_the_cli(sh: Shell) -> None:
    (snippet,) = re.findall(r"^```python\n(.*?)^```", README, flags=re.S | re.M)
    write_prompts(sh.cwd / "prompts.jsonl", 5)
    before = sh.billed()
    res = subprocess.run(
        [sys.executable, "-c", snippet],
        cwd=sh.cwd,
        env=sh.env(GONKAGATE_API_KEY="gp-test"),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    ok, cost = res.stdout.split()
    assert int(ok) == 5 and float(cost) > 0
    assert sh.billed() == before + 5  # it went where GONKAGATE_BASE_URL points


# -- shell completion and version --------------------------------------------------------------------


def test_completion_lines_install_working_completion(sh: Shell) -> None:
    for prefix in ("_BATCHGATE_COMPLETE=bash_source", "_BATCHGATE_COMPLETE=zsh_source", "mkdir -p ~/.config/fish"):
        res = sh.run(readme(prefix))
        assert res.returncode == 0 and res.stderr == "", (prefix, res.stderr)
    assert "compdef _batchgate_completion batchgate" in (sh.home / ".batchgate-complete.zsh").read_text()
    assert (
        "complete --no-files --command batchgate" in (sh.home / ".config/fish/completions/batchgate.fish").read_text()
    )
    assert ". ~/.batchgate-complete.bash" in (sh.home / ".bashrc").read_text()
    # what bash does on <TAB>: source ~/.bashrc, then ask the completion function
    probe = (
        'source ~/.bashrc; COMP_WORDS=(batchgate "$WORD"); COMP_CWORD=1; _batchgate_completion batchgate; '
        'echo "${COMPREPLY[*]}"'
    )
    assert sh.run(probe, WORD="r").stdout.split() == ["report", "run"]
    probe_opt = (
        "source ~/.bashrc; COMP_WORDS=(batchgate run --sim-fault); COMP_CWORD=2; _batchgate_completion batchgate; "
        'echo "${COMPREPLY[*]}"'
    )
    assert sh.run(probe_opt).stdout.split() == ["--sim-fault-rate"]


def test_dash_v_prints_the_version(sh: Shell) -> None:
    res = sh.run(readme("batchgate -V"))
    assert res.returncode == 0
    assert re.fullmatch(r"batchgate, version \d+\.\d+\.\d+\S*\n", res.stdout)
