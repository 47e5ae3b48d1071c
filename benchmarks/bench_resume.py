"""Resume start-up over a big ledger (issue 4: a million finished rows must take seconds).

Writes a ``results.jsonl`` of ``--rows`` realistic rows (every ``LEDGER_FIELDS`` key, ~300-char
answers, a few failed-then-retried ids, a torn last line as ``kill -9`` leaves it) in a temp dir,
then, each in its own subprocess so peak RSS is its own:

* ``Ledger(dir).open()``: repair the torn tail, build the resume index;
* the naive baseline: ``json.loads`` every line into a dict of rows by id, then the ok ids;
* optionally (``--pandas``) ``pandas.read_json(lines=True)``;
* the whole resumed start: ``batchgate run`` over a prompt file of the same ids, all already ok,
  with ``--base-url`` on a closed loopback port, so any request would fail the run.  It must
  validate, index, skip everything and exit 0.

    python benchmarks/bench_resume.py [--rows 1000000] [--pandas]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench_cpu import repo_env, run_measured  # noqa: E402  (a sibling script, importable from here)

MODEL = "Qwen/Qwen3-32B-FP8"
_HERE = Path(__file__).resolve()
_PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
_WORDS = ("the", "of", "and", "model", "token", "stream", "answer", "batch", "prompt", "cost", "price", "café", "東京")


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE_KB


# -- data ------------------------------------------------------------------------------------------


def write_ledger(path: Path, rows: int, seed: int = 1) -> tuple[int, int]:
    """``rows`` ledger rows for ids ``p0000000``...; returns (ids ok, bytes). Ends in a torn line."""
    import orjson

    from batchgate.models import LEDGER_FIELDS, LEDGER_VERSION

    rng = random.Random(seed)
    answers = [" ".join(rng.choices(_WORDS, k=60))[:300] for _ in range(512)]
    run_id = "20250101T000000Z-abc123"
    failed = {
        "type": "server_error",
        "status": 500,
        "message": "internal server error",
    }
    ids_ok = 0
    written = 0
    buf: list[bytes] = []
    with path.open("wb") as f:
        i = 0
        while written < rows:
            rid = f"p{i:07d}"
            # One id in 50 failed first and succeeded on a later run: two rows, one id.
            attempts = [False, True] if i % 50 == 7 and written + 1 < rows else [True]
            for ok in attempts:
                pt, ct = 40 + i % 200, 64
                base = pt * 0.4e-6 + ct * 1.6e-6
                row: dict[str, Any] = {
                    "v": LEDGER_VERSION,
                    "id": rid,
                    "job": "bench",
                    "run_id": run_id,
                    "model": MODEL,
                    "status": "ok" if ok else "failed",
                    "content": answers[i % len(answers)] if ok else "",
                    "finish_reason": "stop" if ok else None,
                    "prompt_tokens": pt if ok else None,
                    "completion_tokens": ct if ok else None,
                    "total_tokens": pt + ct if ok else None,
                    "base_cost_usd": base if ok else 0.0,
                    "platform_fee_usd": base * 0.1 if ok else 0.0,
                    "total_cost_usd": base * 1.1 if ok else 0.0,
                    "unconfirmed_completion_tokens": 0,
                    "unconfirmed_cost_usd": 0.0,
                    "attempts": 1 if ok else 5,
                    "retry_causes": [] if ok else ["server_error"] * 4,
                    "started_at": "2025-01-01T00:00:00.000Z",
                    "ttft_s": 0.031 if ok else None,
                    "latency_s": 0.812,
                    "error": None if ok else failed,
                }
                assert tuple(row) == LEDGER_FIELDS[: len(row)]  # a v1-shaped row: the oldest a resume meets
                buf.append(orjson.dumps(row))
                written += 1
                ids_ok += ok
            i += 1
            if len(buf) >= 10_000:
                f.write(b"\n".join(buf) + b"\n")
                buf.clear()
        buf.append(b'{"v":1,"id":"p9999999","job":"bench","status":"o')  # torn by a kill -9
        f.write(b"\n".join(buf))
    return ids_ok, path.stat().st_size


def write_prompts(path: Path, n_ids: int) -> None:
    """The prompt file the ledger came from: one line per id, all already ok in the ledger."""
    line = '{"id": "p%07d", "model": "%s", "prompt": "Question %d: explain how this thing behaves at scale."}\n'
    with path.open("w") as f:
        for start in range(0, n_ids, 10_000):
            f.write("".join(line % (i, MODEL, i) for i in range(start, min(n_ids, start + 10_000))))


# -- measurements (each in its own subprocess) --------------------------------------------------


def _measure(method: str, out_dir: Path) -> dict[str, Any]:
    """Time one way of reading the ledger back; RSS before and peak, in KiB."""
    ledger = out_dir / "results.jsonl"
    if method == "ledger":
        from batchgate.ledger import Ledger

        rss0 = _rss_kb()
        t0 = time.perf_counter()
        lg = Ledger(out_dir)
        index = lg.open()
        seconds = time.perf_counter() - t0
        lg.close()
        result = {"ok_ids": len(index.ok_ids), "rows": index.rows, "torn_bytes": index.torn_bytes}
    elif method == "json":
        rss0 = _rss_kb()
        t0 = time.perf_counter()
        by_id: dict[str, dict[str, Any]] = {}
        rows = 0
        with ledger.open("rb") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the torn line
                rows += 1
                prev = by_id.get(row["id"])
                if prev is None or prev["status"] != "ok":
                    by_id[row["id"]] = row
        ok_ids = {rid for rid, row in by_id.items() if row["status"] == "ok"}
        seconds = time.perf_counter() - t0
        result = {"ok_ids": len(ok_ids), "rows": rows}
    elif method == "pandas":
        import pandas as pd

        rss0 = _rss_kb()
        t0 = time.perf_counter()
        # read_json cannot skip a torn line: read the complete lines only.
        size = ledger.stat().st_size
        with ledger.open("rb") as f:
            f.seek(max(0, size - 4096))
            complete = size - len(f.read().rsplit(b"\n", 1)[1])
        with ledger.open("rb") as f:
            df = pd.read_json(io.BytesIO(f.read(complete)), lines=True, dtype=False)
        ok_ids = set(df.loc[df["status"] == "ok", "id"])
        seconds = time.perf_counter() - t0
        result = {"ok_ids": len(ok_ids), "rows": len(df)}
    else:
        raise ValueError(method)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"method": method, "seconds": seconds, "rss_before_kb": rss0, "peak_kb": peak, **result}


def _run_measure(method: str, out_dir: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(_HERE), "--measure", method, "--dir", str(out_dir)],
        capture_output=True,
        text=True,
        timeout=600,
        env=repo_env(),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{method} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def _closed_port() -> socket.socket:
    """A loopback port bound but not listening: connecting to it is refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


def _resumed_run(prompts: Path, out_dir: Path) -> dict[str, Any]:
    """``batchgate run`` over all-done prompts against a closed port; wall seconds and peak RSS."""
    with _closed_port() as sock:
        port = sock.getsockname()[1]
        env = repo_env() | {"GONKAGATE_API_KEY": "gp-bench"}
        cmd = [sys.executable, "-m", "batchgate", "run", str(prompts), "--out", str(out_dir)]
        cmd += ["--base-url", f"http://127.0.0.1:{port}/v1", "--quiet", "--no-report", "--json", "-c", "50"]
        returncode, stdout, stderr, wall, usage = run_measured(cmd, env)
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    summary = json.loads(lines[-1]) if lines else {}
    return {
        "exit": returncode,
        "wall_s": wall,
        "peak_kb": usage.ru_maxrss,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "summary": summary,
        "stderr": stderr.strip(),
    }


def _import_floor() -> float:
    """Seconds for ``python -m batchgate --version``: interpreter start and imports alone."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "batchgate", "--version"], capture_output=True, env=repo_env(), check=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--pandas", action="store_true", help="also time pandas.read_json(lines=True) (slow, GBs)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir and print its path")
    parser.add_argument("--measure", choices=("ledger", "json", "pandas"), help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(_measure(args.measure, Path(args.dir))))
        return

    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    try:
        out_dir = tmp / "out"
        out_dir.mkdir()
        t0 = time.perf_counter()
        ids_ok, size = write_ledger(out_dir / "results.jsonl", args.rows)
        prompts = tmp / "prompts.jsonl"
        write_prompts(prompts, ids_ok)
        print(
            f"ledger: {args.rows:,} rows ({ids_ok:,} ids ok, {args.rows - ids_ok:,} failed rows retried later), "
            f"{size / 1e6:,.0f} MB + a torn last line; prompts: {ids_ok:,} lines "
            f"({prompts.stat().st_size / 1e6:,.0f} MB); written in {time.perf_counter() - t0:.1f} s"
        )
        with (out_dir / "results.jsonl").open("rb") as f:  # same warm page cache for everyone
            while f.read(1 << 24):
                pass

        methods = ["ledger", "json"] + (["pandas"] if args.pandas else [])
        labels = {
            "ledger": "Ledger.open() (repair + index)",
            "json": "naive: json.loads → dict by id",
            "pandas": "naive: pandas.read_json(lines)",
        }
        results = {}
        for m in methods:
            results[m] = r = _run_measure(m, out_dir)
            if r["ok_ids"] != ids_ok:
                raise SystemExit(f"{m}: found {r['ok_ids']} ok ids, expected {ids_ok}")
        ours = results["ledger"]["seconds"]
        head = f"{'method':<32} {'seconds':>8} {'rows/s':>11} {'peak RSS Δ':>11} {'vs Ledger':>9}"
        print("\n" + head + "\n" + "-" * len(head))
        for m in methods:
            r = results[m]
            delta_mb = (r["peak_kb"] - r["rss_before_kb"]) / 1024
            print(
                f"{labels[m]:<32} {r['seconds']:>8.2f} {r['rows'] / r['seconds']:>11,.0f} {delta_mb:>8,.0f} MB "
                f"{r['seconds'] / ours:>8.2f}x"
            )
        torn = results["ledger"]["torn_bytes"]
        print(f"(the torn last line, {torn} bytes, was set aside into results.torn.jsonl by Ledger.open)")

        floor = _import_floor()
        # The first resumed start reads the whole ledger and leaves results.index behind; the
        # second reads that index and only the ledger's bytes after it.
        for label in ("no resume index yet (reads the whole ledger)", "with the resume index"):
            run = _resumed_run(prompts, out_dir)
            s = run["summary"]
            print(f"\nresumed start, {label}: `batchgate run` of {ids_ok:,} prompts, all ok, closed port")
            print(f"  exit code     {run['exit']} (requests {s.get('requests')}, skipped {s.get('skipped')})")
            print(
                f"  wall          {run['wall_s']:.2f} s total ({s.get('wall_s', float('nan')):.2f} s inside Runner; "
                f"interpreter + imports alone {floor:.2f} s)"
            )
            print(f"  CPU           {run['cpu_s']:.2f} s;  peak RSS {run['peak_kb'] / 1024:,.0f} MB")
            if run["exit"] != 0 or s.get("requests") != 0 or s.get("skipped") != ids_ok:
                print(f"  UNEXPECTED: stderr: {run['stderr'][-2000:]}")
                raise SystemExit(1)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n(benchmark took {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
