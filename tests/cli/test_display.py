"""What a run shows: the live panel read off a real pseudo-terminal, and JSON-only logs under cron."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from clitools import BATCHGATE, Sim, bg, env, prompts

from batchgate.cli_display import Log, format_duration
from batchgate.models import RunSummary

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>]")
CURSOR = re.compile(r"\x1b\[\d*[AK]")  # a repaint moves up and erases: each line ends there
SLOW = ["--token-delay", "0.05"]
FAULTY = ["--token-delay", "0.02", "--rate-limit-rate", "0.15", "--retry-after", "0.05", "--reset-rate", "0.1"]


class Terminal:
    """`batchgate` under a real pseudo-terminal (its controlling tty: Ctrl-C is a real SIGINT)."""

    def __init__(self, args: list[str], cols: int = 100, rows: int = 30, **extra_env: str) -> None:
        child_env = env(TERM="xterm-256color", GONKAGATE_API_KEY="gp-test", **extra_env)
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: exec at once, nothing else (never back into pytest)
            try:
                os.execve(BATCHGATE, [BATCHGATE, *args], child_env)
            finally:
                os._exit(127)
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.raw = b""
        self.code: int | None = None

    @property
    def text(self) -> str:
        """What was written, escape sequences removed (each repaint's lines stay whole)."""
        text = CURSOR.sub("\n", self.raw.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n"))
        return ANSI.sub("", text)

    def read_until(self, done: Callable[[str], bool], timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if done(self.text):
                return self.text
            r, _, _ = select.select([self.fd], [], [], 0.05)
            if r:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:  # the child closed the terminal
                    chunk = b""
                if not chunk:
                    break
                self.raw += chunk
        if done(self.text):
            return self.text
        raise AssertionError(f"screen never showed what was expected; it shows:\n{self.text[-3000:]}")

    def wait(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while self.code is None and time.monotonic() < deadline:
            r, _, _ = select.select([self.fd], [], [], 0.05)
            if r:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:
                    chunk = b""
                self.raw += chunk
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.code = os.waitstatus_to_exitcode(status)
        if self.code is None:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            raise AssertionError("batchgate did not exit")
        return self.code

    def close(self) -> None:
        if self.code is None:
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
        os.close(self.fd)


def run_args(tmp_path: Path, sim: Sim, n: int, *extra: str) -> list[str]:
    src = prompts(tmp_path / "p.jsonl", n)
    return ["run", str(src), "--model", "sim-model", "--base-url", sim.url, "--out", str(tmp_path / "out"), *extra]


# -- on a terminal ---------------------------------------------------------------------------------


@pytest.mark.parametrize("simulator", [FAULTY], indirect=True)
def test_terminal_panel_explains_itself(tmp_path: Path, simulator: Sim) -> None:
    term = Terminal(run_args(tmp_path, simulator, 40, "-c", "16", "--backoff", "0.05", "--no-report"), cols=100)
    try:
        term.read_until(lambda t: "start run " in t and re.search(r"ok [1-9]", t) is not None)
        code = term.wait()
    finally:
        term.close()
    screen = term.text
    assert code in (0, 1), screen
    assert re.search(r"start run \d{8}T\d{6}Z-\w+ → .*out", screen)
    assert re.search(r"\d+/40", screen)  # done/total
    assert re.search(r"ETA (\d+s|\d+m\d\ds|\?)", screen)  # a labelled ETA
    assert re.search(r"ok \d+ · failed \d+ · retrying \d+ · in flight \d+", screen)
    assert re.search(r"last error: (rate_limited|reset|\w+): ", screen)  # the latest distinct failure, named
    assert re.search(r"concurrency \d+/16 asked", screen)
    assert re.search(r"429s \d+", screen)
    assert re.search(r"[\d.]+ req/s · [\d,]+ tok/s", screen)
    assert re.search(r"cost \$\d+\.\d{6} confirmed · (~\$\d+\.\d{6}|\$0) unconfirmed", screen)
    # the final summary follows the (transient) panel
    assert "requests  40 (" in screen


@pytest.mark.parametrize("simulator", [["--token-delay", "0.1"]], indirect=True)
def test_first_ctrl_c_is_acknowledged_at_once_and_in_flight_finish(tmp_path: Path, simulator: Sim) -> None:
    term = Terminal(run_args(tmp_path, simulator, 200, "-c", "8", "--no-report", "--grace", "30"))
    try:
        term.read_until(lambda t: re.search(r"in flight [1-9]", t) is not None)
        os.write(term.fd, b"\x03")  # a real Ctrl-C: the tty sends SIGINT to the foreground process group
        sent = time.monotonic()
        screen = term.read_until(lambda t: "Ctrl-C again to abandon them" in t, timeout=5)
        acknowledged_s = time.monotonic() - sent
        code = term.wait()
    finally:
        term.close()
    assert acknowledged_s < 1.0
    m = re.search(r"stopping: (\d+) in flight, finishing them \(up to 30s\); Ctrl-C again to abandon them", screen)
    assert m and 1 <= int(m.group(1)) <= 8, screen
    assert code == 130
    rows = [orjson.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_bytes().splitlines()]
    assert rows and all(r["status"] == "ok" for r in rows)  # in flight were allowed to finish


@pytest.mark.parametrize("simulator", [["--token-delay", "0.2"]], indirect=True)
def test_second_ctrl_c_abandons_what_is_in_flight(tmp_path: Path, simulator: Sim) -> None:
    term = Terminal(run_args(tmp_path, simulator, 100, "-c", "8", "--no-report", "--grace", "60"))
    try:
        term.read_until(lambda t: re.search(r"in flight [1-9]", t) is not None)
        os.write(term.fd, b"\x03")
        term.read_until(lambda t: "Ctrl-C again" in t, timeout=5)
        t0 = time.monotonic()
        os.write(term.fd, b"\x03")
        code = term.wait(timeout=20)
    finally:
        term.close()
    assert time.monotonic() - t0 < 10  # not the 60 s grace
    assert code == 130
    assert re.search(r"abandoning \d+ in flight", term.text)


@pytest.mark.parametrize("simulator", [SLOW], indirect=True)
def test_narrow_terminal_lines_never_wrap(tmp_path: Path, simulator: Sim) -> None:
    term = Terminal(run_args(tmp_path, simulator, 12, "-c", "8", "--no-report"), cols=40)
    try:
        term.read_until(lambda t: "concurrency" in t)
        term.wait()
    finally:
        term.close()
    panel = [ln for ln in term.text.split("\n") if ln.startswith(("ok ", "concurrency ", "cost ", "batchgate "))]
    assert panel and all(len(ln) <= 40 for ln in panel), max(panel, key=len)
    assert any(ln.endswith("…") for ln in panel)  # clipped, not wrapped onto a second line


# -- without a terminal ----------------------------------------------------------------------------


def _lines(text: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in text.splitlines()]


@pytest.mark.parametrize("simulator", [FAULTY], indirect=True)
def test_cron_json_log_is_json_lines_only(tmp_path: Path, simulator: Sim) -> None:
    args = run_args(
        tmp_path, simulator, 40, "-c", "8", "--backoff", "0.05", "--log-format", "json", "--log-every", "0.2"
    )
    res = bg(*args, "--json")  # with the reports (not --no-report): their table must not leak in
    assert res.returncode in (0, 1), res.stderr
    events = _lines(res.stderr)  # raises on any line that is not JSON
    assert events[0]["event"] == "start"
    start = events[0]
    assert re.fullmatch(r"\d{8}T\d{6}Z-\w+", start["run_id"]) and start["out"] == str(tmp_path / "out")
    assert start["inputs"] == [str(tmp_path / "p.jsonl")]
    assert start["config"]["concurrency"] == 8 and "api_key" not in start["config"]
    assert "gp-test" not in res.stderr + res.stdout
    progress = [e for e in events if e["event"] == "progress"]
    assert progress, "no progress events"
    for key in ("done", "total", "ok", "failed", "in_flight", "concurrency", "concurrency_asked", "throttle_reason",
                "requests_per_s", "tokens_per_s", "total_cost_usd", "unconfirmed_cost_usd", "eta_s"):  # fmt: skip
        assert key in progress[-1], key
    ends = [e for e in events if e["event"] == "end"]
    assert len(ends) == 1 and events[-1] is ends[0] and ends[0]["ok"] + ends[0]["failed"] == 40
    assert {e["event"] for e in events} <= {"start", "progress", "end", "error", "warning", "stopping", "abandoning"}
    # stdout: only --json's final line (no summary table, no report table)
    out = res.stdout.splitlines()
    assert len(out) == 1 and orjson.loads(out[0])["run_id"] == start["run_id"]
    assert (tmp_path / "out" / "report.html").exists()


@pytest.mark.parametrize("simulator", [SLOW], indirect=True)
def test_cron_json_stop_is_an_error_event(tmp_path: Path, simulator: Sim) -> None:
    args = run_args(tmp_path, simulator, 100, "--log-format", "json", "--log-every", "0.2", "--max-cost", "0.001")
    res = bg(*args, "--no-report")
    assert res.returncode == 3
    events = _lines(res.stderr)
    stopping = [i for i, e in enumerate(events) if e["event"] == "stopping"]
    assert len(stopping) == 1 and "--max-cost" in events[stopping[0]]["message"]  # said when it happened
    errors = [e for e in events if e["event"] == "error"]
    assert errors and "--max-cost" in errors[0]["message"]
    assert events[-1]["event"] == "end" and events[-1]["stop_reason"] == "budget"
    assert res.stdout == ""


def test_cron_json_bad_input_is_a_json_error_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "fine"}\n{not json\n')
    res = bg("run", str(bad), "--model", "sim-model", "--out", str(tmp_path / "o"), "--log-format", "json")
    assert res.returncode == 2
    events = _lines(res.stderr)
    assert events[0]["event"] == "start"
    assert events[-1]["event"] == "error" and "bad.jsonl:2" in events[-1]["message"]
    assert res.stdout == ""


@pytest.mark.parametrize("simulator", [SLOW], indirect=True)
def test_cron_json_sigterm_says_stopping(tmp_path: Path, simulator: Sim) -> None:
    args = run_args(tmp_path, simulator, 200, "-c", "8", "--log-format", "json", "--no-report")
    proc = subprocess.Popen([BATCHGATE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env(GONKAGATE_API_KEY="gp-test"))  # fmt: skip
    try:
        ledger = tmp_path / "out" / "results.jsonl"
        deadline = time.monotonic() + 20
        while not (ledger.exists() and ledger.read_bytes().count(b"\n") >= 4) and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143
    events = _lines(err)
    stopping = [e for e in events if e["event"] == "stopping"]
    assert len(stopping) == 1 and stopping[0]["signal"] == "SIGTERM" and stopping[0]["grace_s"] == 30
    assert events[-1]["event"] == "end" and out == ""


@pytest.mark.parametrize("simulator", [SLOW], indirect=True)
def test_cron_text_log_names_run_and_out_first(tmp_path: Path, simulator: Sim) -> None:
    res = bg(*run_args(tmp_path, simulator, 12, "-c", "4", "--log-every", "0.2", "--no-report"))
    assert res.returncode == 0, res.stderr
    lines = res.stderr.splitlines()
    assert re.fullmatch(
        rf"\S+Z start run (\d{{8}}T\d{{6}}Z-\w+) → {re.escape(str(tmp_path / 'out'))} \(1 input\)", lines[0]
    )
    run_id = lines[0].split()[3]
    progress = [ln for ln in lines if " progress " in ln]
    assert progress and all(
        re.search(r"progress \d+/12 ok=\d+ failed=\d+ .*concurrency=\d+/4.* eta=", p) for p in progress
    )
    assert f"run {run_id} → " in res.stdout and "requests  12 (12 ok" in res.stdout


def test_dash_v_is_version() -> None:
    short, long = bg("-V"), bg("--version")
    assert short.returncode == 0 and short.stdout == long.stdout and re.search(r"\d+\.\d+", short.stdout)


# -- the panel's words, for runner states hard to reach on purpose -----------------------------------


def fake_runner(**over: Any) -> Any:
    """A runner-shaped object (the display only reads attributes) with newer runners' extras."""
    stats = over.pop("stats", {"limit": 12, "max": 64, "in_flight": 12, "reason": "key limit"})
    throttle = SimpleNamespace(statistics=lambda: stats, slowdowns=0, outage_pauses=0)
    summary = RunSummary(run_id="r", out="o", ok=90, failed=3, skipped=7, completion_tokens=1000,
                         total_cost_usd=0.25, unconfirmed_cost_usd=0.0125, rate_limited=4)  # fmt: skip
    base = dict(summary=summary, total=1000, in_flight=20, retrying=5, throttle=throttle,
                config=SimpleNamespace(concurrency=64, grace_s=30.0, rpm=None), stopping=False,
                last_error="HTTP 503 from the server:   upstream\ntimeout", stop_message=None)  # fmt: skip
    base.update(over)
    return SimpleNamespace(**base)


def test_panel_says_retrying_concurrency_reason_unconfirmed_and_last_error() -> None:
    log = Log(False, "text", tty=True)
    lines = log.panel_lines(log.fields(fake_runner()), width=60)
    assert lines[0] == "ok 90 · failed 3 · retrying 5 · in flight 20 (12 streaming, 8 waiting) · 7 already done"
    assert lines[1].startswith("concurrency 12/64 asked (key limit) · 429s 4 · ")
    assert lines[2] == "cost $0.250000 confirmed · ~$0.012500 unconfirmed"
    assert lines[3] == "last error: HTTP 503 from the server: upstream timeout"


def test_panel_reason_without_statistics_falls_back_to_the_throttle_counters() -> None:
    throttle = SimpleNamespace(limit=1.0, max_concurrency=64, in_flight=1, slowdowns=2, outage_pauses=1)
    f = Log(False, "text").fields(fake_runner(throttle=throttle, retrying=None, last_error=None))
    assert (f["concurrency"], f["concurrency_max"], f["throttle_reason"]) == (1, 64, "outage pause")
    assert f["retrying"] is None
    throttle.limit = 8.0
    assert Log(False, "text").fields(fake_runner(throttle=throttle))["throttle_reason"] == "429 slow-down"


def test_long_last_error_is_clipped_to_the_width() -> None:
    log = Log(False, "text")
    lines = log.panel_lines(log.fields(fake_runner(last_error="x" * 500)), width=80)
    assert len(lines[-1]) == 80 and lines[-1].endswith("…")


def test_eta_comes_from_the_recent_rate() -> None:
    log = Log(False, "text")
    runner = fake_runner()
    log.fields(runner)
    time.sleep(0.2)
    runner.summary.ok += 20  # 20 in 0.2 s = ~100/s; 1000 - 120 left
    f = log.fields(runner)
    assert 50 <= f["requests_per_s"] <= 110
    assert 8 <= f["eta_s"] <= 18


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(None, "?"), (0, "0s"), (59.4, "59s"), (192, "3m12s"), (3600, "1h00m"), (7322, "2h02m"), (float("inf"), "?")],
)
def test_format_duration(seconds: float | None, shown: str) -> None:
    assert format_duration(seconds) == shown


@pytest.mark.parametrize("simulator", [[]], indirect=True)
def test_cron_json_input_warnings_are_warning_events(tmp_path: Path, simulator: Sim) -> None:
    src = tmp_path / "p.jsonl"
    src.write_text('{"id": "a", "prompt": "hi", "temprature": 0.5}\n{"id": "b", "prompt": "there"}\n')
    res = bg("run", str(src), "--model", "sim-model", "--base-url", simulator.url, "--out", str(tmp_path / "o"),
             "--no-report", "--log-format", "json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    events = _lines(res.stderr)
    warnings = [e for e in events if e["event"] == "warning"]
    assert warnings and "temprature" in warnings[0]["message"] and "temperature" in warnings[0]["message"]
    assert events[0]["event"] == "start" and events[-1]["event"] == "end"
