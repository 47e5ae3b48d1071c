"""Report building over a big ledger: ``build_reports`` vs a naive ``pandas.read_json(lines=True)``.

Writes a realistic ledger (default one million rows, ~200-character answers, three jobs and
models, failures, retries, cut streams some of them unpriced, a resume run on the next day), then
times, each in its own subprocess so peak RSS is its own:

- ``batchgate``: ``build_reports`` writing every format (requests.parquet, summary.csv/.parquet,
  report.html);
- ``naive``: ``pandas.read_json(lines=True)`` and a groupby over job and model (sums, counts and
  latency percentiles), far less work than the reports.

Wall seconds around the work only (imports excluded), and peak RSS (``ru_maxrss``) of each child.

    python benchmarks/bench_reports.py [--rows 1000000] [--repeat 1] [--keep DIR] [--skip-naive]

Pin it to one core with ``taskset -c 0 python benchmarks/bench_reports.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
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

_HERE = Path(__file__).resolve()
# (USD per prompt token, per completion token); the platform fee is 10% on top.
MODELS = {
    "Qwen/Qwen3-235B-A22B-Instruct-2507-FP8": (2.0e-7, 6.0e-7),
    "Qwen/Qwen3-32B-FP8": (1.0e-7, 3.0e-7),
    "meta-llama/Llama-3.3-70B-Instruct": (1.5e-7, 4.0e-7),
}
JOBS = ("nightly-summaries", "support-triage", "translate-fr")
CAUSES = ("rate_limited", "server_error", "stream_interrupted", "timeout")


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
                "v": 1,
                "id": pid,
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


def child(mode: str, ledger: Path, out: Path) -> None:
    """Run one variant and print its seconds and peak RSS as one JSON line."""
    import pandas as pd

    from batchgate.reports import build_reports

    t0 = time.perf_counter()
    if mode == "batchgate":
        result = build_reports([ledger.parent], out, by=("job", "model"), formats=("csv", "parquet", "html"))
        extra: dict[str, Any] = {
            "total_cost_usd": result.totals["total_cost_usd"],
            "html_bytes": (out / "report.html").stat().st_size,
            "requests_parquet_bytes": (out / "requests.parquet").stat().st_size,
        }
    else:
        df = pd.read_json(ledger, lines=True)
        grouped = df.groupby(["job", "model"]).agg(
            requests=("id", "nunique"),
            rows=("id", "size"),
            total_cost_usd=("total_cost_usd", "sum"),
            prompt_tokens=("prompt_tokens", "sum"),
            completion_tokens=("completion_tokens", "sum"),
            latency_p50=("latency_s", lambda s: s.quantile(0.5)),
            latency_p95=("latency_s", lambda s: s.quantile(0.95)),
        )
        extra = {"total_cost_usd": float(grouped["total_cost_usd"].sum())}
    seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": mode, "seconds": seconds, "peak_rss_mb": peak_mb, **extra}))


def run_child(mode: str, ledger: Path, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(_HERE), "--child", mode, "--ledger", str(ledger), "--out", str(out)]
    done = subprocess.run(cmd, env=repo_env(), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=1, help="runs per variant (medians shown)")
    parser.add_argument("--keep", type=Path, help="keep the ledger and reports here (a ledger there is reused)")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--child", choices=("batchgate", "naive"), help=argparse.SUPPRESS)
    parser.add_argument("--ledger", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.ledger, args.out)
        return

    with tempfile.TemporaryDirectory(prefix="bench-reports-") as tmp:
        root = args.keep or Path(tmp)
        run_dir = root / "run"
        run_dir.mkdir(parents=True, exist_ok=True)
        ledger = run_dir / "results.jsonl"
        t0 = time.perf_counter()
        if args.keep and ledger.exists():
            print(f"ledger: reusing {ledger}")
        else:
            write_ledger(ledger, args.rows)
        rows = sum(1 for _ in ledger.open("rb"))
        size_mb = ledger.stat().st_size / 1e6
        print(f"ledger: {rows:,} rows, {size_mb:,.0f} MB, ready in {time.perf_counter() - t0:.1f} s")
        modes = ["batchgate"] if args.skip_naive else ["batchgate", "naive"]
        results: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
        for _ in range(args.repeat):
            for mode in modes:  # interleaved, so a busy machine slows both alike
                results[mode].append(run_child(mode, ledger, root / "reports"))
        print(f"{'variant':<10} {'median s':>9} {'best s':>7} {'peak RSS MB':>12}  notes")
        for mode in modes:
            seconds = statistics.median(r["seconds"] for r in results[mode])
            best = min(r["seconds"] for r in results[mode])
            peak = max(r["peak_rss_mb"] for r in results[mode])
            last = results[mode][-1]
            notes = f"total ${last['total_cost_usd']:,.6f}"
            if mode == "batchgate":
                notes += f", report.html {last['html_bytes'] / 1e3:,.0f} kB"
                notes += f", requests.parquet {last['requests_parquet_bytes'] / 1e6:,.1f} MB"
            print(f"{mode:<10} {seconds:>9.2f} {best:>7.2f} {peak:>12,.0f}  {notes}")
        if "naive" in results:
            ratio = statistics.median(r["seconds"] for r in results["naive"]) / statistics.median(
                r["seconds"] for r in results["batchgate"]
            )
            print(f"naive / batchgate (medians): {ratio:.1f}x")


if __name__ == "__main__":
    main()
