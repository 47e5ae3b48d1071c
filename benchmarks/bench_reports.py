"""``batchgate report`` over big ledgers against a bare DuckDB group-by over the same file, same run.

Writes synthetic v2 ledgers (default 100,000 and 1,000,000 rows, ~650 bytes a row: ~200-character
answers, three jobs and models, failures, retries, cut streams some unpriced, a resume run on the next
day), then runs, each as its own process (peak RSS from ``wait4``, so it is that process's own):

- ``report``: ``batchgate report RUN_DIR`` writing every format (or ``--format csv`` with ``--csv``),
  cold (no cached parts beside the ledger: every byte parsed);
- ``warm``: the same with the ledger's parts cached by the previous report (nothing appended);
- ``append``: after 2,000 more rows were appended (what an end-of-run report of a small resume costs);
- ``duckdb``: a bare DuckDB ``read_json`` group-by over job and model with count, sum of cost and
  latency p50/p95/p99 (``quantile_cont``), far less work than the reports; the yardstick.

Prints wall seconds, CPU seconds and peak RSS of each, and the ratios the targets are stated in:
report wall at the largest size / DuckDB wall there (target <= 1.5), report peak RSS at the largest
size / at the smallest (target <= 1.25) and the peak in MB (target < 300).  Not part of the test suite.

    python benchmarks/bench_reports.py [--rows 100000,1000000] [--repeat 3] [--keep DIR] [--csv]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from batchgate.models import LEDGER_VERSION  # noqa: E402
from batchgate.reports import CACHE_DIR  # noqa: E402

# (USD per prompt token, per completion token); the platform fee is 10% on top.
MODELS = {
    "Qwen/Qwen3-235B-A22B-Instruct-2507-FP8": (2.0e-7, 6.0e-7),
    "Qwen/Qwen3-32B-FP8": (1.0e-7, 3.0e-7),
    "meta-llama/Llama-3.3-70B-Instruct": (1.5e-7, 4.0e-7),
}
JOBS = ("nightly-summaries", "support-triage", "translate-fr")
CAUSES = ("rate_limited", "server_error", "stream_interrupted", "timeout")
DUCKDB_BASELINE = """
import sys, duckdb
con = duckdb.connect()
con.execute("SET enable_progress_bar = false")
rows = con.execute(
    "SELECT job, model, count(*), sum(total_cost_usd), quantile_cont(latency_s, [0.5, 0.95, 0.99]) "
    "FROM read_json(?, format = 'newline_delimited') GROUP BY ALL", [sys.argv[1]]
).fetchall()
assert rows
"""


def repo_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def write_ledger(path: Path, rows: int, seed: int = 7) -> None:
    """A ledger of ``rows`` rows: run A over ``rows - resumed`` prompts, then run B retrying A's failures."""
    rnd = random.Random(seed)
    words = ("the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "with", "was", "on", "be", "by")
    answers = [" ".join(rnd.choice(words) for _ in range(45))[:200] for _ in range(500)]
    models = list(MODELS)
    start = datetime(2025, 3, 1, 21, 30, tzinfo=UTC)
    failed_ids: list[tuple[str, str, str]] = []
    written = 0
    clock = 0.0
    with path.open("wb") as f:

        def emit(pid: str, job: str, model: str, run_id: str, when: datetime, fail_rate: float) -> bool:
            """Write one row; True if it failed."""
            nonlocal written
            attempts = 1
            causes: list[str] = []
            while rnd.random() < 0.06 and attempts < 4:
                causes.append(rnd.choices(CAUSES, weights=(5, 2, 2, 1))[0])
                attempts += 1
            failed = rnd.random() < fail_rate
            cut = rnd.randint(5, 300) if "stream_interrupted" in causes else 0
            prompt_price, completion_price = MODELS[model]
            if failed:
                causes.append(rnd.choice(CAUSES))
                row_tokens: dict[str, Any] = {"prompt_tokens": None, "completion_tokens": None, "total_tokens": None}
                base = 0.0
                error: dict[str, Any] | None = {"type": causes[-1], "status": 503, "message": "upstream unavailable"}
                ttft = None
            else:
                p, c = rnd.randint(20, 1200), rnd.randint(1, 900)
                row_tokens = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
                base = p * prompt_price + c * completion_price
                error = None
                ttft = round(rnd.lognormvariate(-1.2, 0.5), 6)
            fee = base * 0.1
            row = {
                "v": LEDGER_VERSION,
                "id": pid,
                "sample": 0,
                "job": job,
                "run_id": run_id,
                "model": model,
                "status": "failed" if failed else "ok",
                "content": "" if failed else rnd.choice(answers),
                "finish_reason": None if failed else "stop",
                **row_tokens,
                "base_cost_usd": base,
                "platform_fee_usd": fee,
                "total_cost_usd": base + fee,
                "unconfirmed_completion_tokens": cut,
                "unconfirmed_cost_usd": (None if rnd.random() < 0.3 else cut * completion_price * 1.1) if cut else 0.0,
                "attempts": attempts,
                "retry_causes": causes,
                "started_at": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "ttft_s": ttft,
                "latency_s": round(rnd.lognormvariate(0.6, 0.6) + 2.0 * (attempts - 1), 6),
                "error": error,
                "fingerprint": f"{rnd.getrandbits(128):032x}",
                "request_id": None if failed else f"req-{written:09d}",
                "reasoning": None,
                "tool_calls": None,
                "cost_status": "confirmed" if not cut else "unconfirmed",
                "warnings": None,
                "cached": False,
            }
            f.write(orjson.dumps(row) + b"\n")
            written += 1
            return failed

        resumed = rows // 40
        for i in range(rows - resumed):
            clock += rnd.expovariate(60.0)  # ~60 requests per second
            pid = f"p{i:08d}"
            job, model = rnd.choice(JOBS), rnd.choice(models)
            if emit(pid, job, model, "run-A", start + timedelta(seconds=clock), 0.04) and len(failed_ids) < resumed:
                failed_ids.append((pid, job, model))
        later = start + timedelta(days=1)
        for n in range(rows - written):
            pid, job, model = failed_ids[n % len(failed_ids)] if failed_ids else (f"q{n:08d}", JOBS[0], models[0])
            emit(pid, job, model, "run-B", later + timedelta(seconds=n / 50), 0.01)


def measure(cmd: list[str], before: Any = None) -> dict[str, float]:
    """Wall seconds, CPU seconds (user + system) and peak RSS (MB) of one child process."""
    if before is not None:
        before()
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, env=repo_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - t0
    err = child.stderr.read().decode() if child.stderr else ""
    if child.stderr:
        child.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd} failed:\n{err}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss": usage.ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="100000,1000000", help="ledger sizes, comma-separated")
    parser.add_argument("--repeat", type=int, default=3, help="runs per variant and size (medians shown)")
    parser.add_argument("--keep", type=Path, help="keep the ledgers here (ledgers there are reused)")
    parser.add_argument("--csv", action="store_true", help="report --format csv (no Parquet, no page)")
    args = parser.parse_args()
    sizes = [int(n) for n in args.rows.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-reports-") as tmp:
        root = args.keep or Path(tmp)
        results: dict[tuple[str, int], list[dict[str, float]]] = {}
        for n in sizes:
            run_dir = root / f"run-{n}"
            run_dir.mkdir(parents=True, exist_ok=True)
            ledger = run_dir / "results.jsonl"
            t0 = time.perf_counter()
            if not ledger.exists():
                write_ledger(ledger, n)
            ready = time.perf_counter() - t0
            print(f"ledger {n:>10,} rows: {ledger.stat().st_size / 1e6:,.0f} MB (ready in {ready:.1f} s)")
            report = [sys.executable, "-m", "batchgate", "report", str(run_dir)]
            if args.csv:
                report += ["--format", "csv"]
            cache = run_dir / CACHE_DIR
            variants = {
                "report": (report, lambda cache=cache: shutil.rmtree(cache, ignore_errors=True)),
                "warm": (report, None),
                "duckdb": ([sys.executable, "-c", DUCKDB_BASELINE, str(ledger)], None),
            }
            for _ in range(args.repeat):
                for name, (cmd, before) in variants.items():  # interleaved, so a busy machine slows all alike
                    results.setdefault((name, n), []).append(measure(cmd, before))
            size = ledger.stat().st_size
            extra = run_dir.parent / f"extra-{n}" / "results.jsonl"
            extra.parent.mkdir(exist_ok=True)
            write_ledger(extra, 2000, seed=n)
            with ledger.open("ab") as f:
                f.write(extra.read_bytes())
            try:
                results[("append", n)] = [measure(report)]
            finally:
                with ledger.open("r+b") as f:
                    f.truncate(size)
                shutil.rmtree(cache, ignore_errors=True)
        print(f"{'variant':<8} {'rows':>10} {'wall s':>8} {'cpu s':>7} {'peak MB':>8}")
        med: dict[tuple[str, int], dict[str, float]] = {}
        for (name, n), runs in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            med[(name, n)] = {k: statistics.median(r[k] for r in runs) for k in ("wall", "cpu", "rss")}
            m = med[(name, n)]
            print(f"{name:<8} {n:>10,} {m['wall']:>8.2f} {m['cpu']:>7.2f} {m['rss']:>8.0f}")
        big, small = max(sizes), min(sizes)
        d = med[("duckdb", big)]
        for name in ("report", "warm", "append"):
            m = med[(name, big)]
            print(
                f"{name} / duckdb at {big:,} rows: wall {m['wall'] / d['wall']:.2f}x (target <= 1.5), "
                f"cpu {m['cpu'] / d['cpu']:.2f}x, peak RSS {m['rss'] / d['rss']:.2f}x"
            )
        if big != small:
            for name in ("report", "warm", "append"):
                grow = med[(name, big)]["rss"] / med[(name, small)]["rss"]
                print(
                    f"{name} peak RSS {big:,} / {small:,} rows: {grow:.2f}x (target <= 1.25); "
                    f"{med[(name, big)]['rss']:.0f} MB at {big:,} (target < 300)"
                )


if __name__ == "__main__":
    main()
