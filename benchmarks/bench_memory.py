"""Flat memory whatever the input size: peak RSS of ``batchgate run`` over 10k vs 100k prompts.

The simulator runs as its own process (short answers, no delay); each ``batchgate run`` is a
subprocess of the real CLI (``--quiet --no-report``), and its peak RSS comes from the kernel
(``wait4`` rusage ``ru_maxrss``).  A small run gives the floor (interpreter, imports, buffers);
what grows with the input shows as the difference.  The ratio of the two big runs should be near 1.

    python benchmarks/bench_memory.py [--sizes 1000,10000,100000] [--concurrency 256] [--tokens 8]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_cpu import repo_env, run_measured, simulator_process, write_prompts


def run_batchgate(url: str, prompts: Path, out_dir: Path, concurrency: int) -> dict[str, Any]:
    """One ``batchgate run`` subprocess; its summary, wall seconds, CPU seconds and peak RSS."""
    env = repo_env() | {"GONKAGATE_API_KEY": "gp-bench"}
    cmd = [sys.executable, "-m", "batchgate", "run", str(prompts), "--out", str(out_dir), "--base-url", url]
    cmd += ["-c", str(concurrency), "--quiet", "--no-report", "--json", "--no-key-limits"]  # the simulator has none
    returncode, stdout, stderr, wall, usage = run_measured(cmd, env)
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if returncode != 0 or not lines:
        raise RuntimeError(f"batchgate run exited {returncode}:\n{stderr[-3000:]}")
    return {
        "summary": json.loads(lines[-1]),
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_mb": usage.ru_maxrss / 1024,
        "ledger_mb": (out_dir / "results.jsonl").stat().st_size / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000", help="prompt counts; the first is the floor")
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=8, help="completion tokens per answer")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    try:
        with simulator_process(args.tokens) as url:
            print(f"simulator {url}  ·  {args.tokens} tokens/answer  ·  concurrency {args.concurrency}")
            results = {}
            for n in sizes:
                prompts = write_prompts(tmp / f"prompts-{n}.jsonl", n)
                results[n] = r = run_batchgate(url, prompts, tmp / f"out-{n}", args.concurrency)
                if r["summary"]["ok"] != n:
                    raise SystemExit(f"{n} prompts: only {r['summary']['ok']} ok")
                shutil.rmtree(tmp / f"out-{n}")
                prompts.unlink()
                print(f"  {n:>7,} prompts done in {r['wall_s']:.1f} s", flush=True)
        floor = results[sizes[0]]["peak_mb"]
        head = f"{'prompts':>8} {'peak RSS':>9} {'above floor':>11} {'ledger':>8} {'req/s':>7} {'CPU µs/req*':>11}"
        print("\n" + head + "\n" + "-" * len(head))
        for n, r in results.items():
            print(
                f"{n:>8,} {r['peak_mb']:>6.0f} MB {r['peak_mb'] - floor:>8.1f} MB {r['ledger_mb']:>5.0f} MB "
                f"{n / r['wall_s']:>7.0f} {r['cpu_s'] / n * 1e6:>11.0f}"
            )
        print("* whole process, interpreter start and imports included")
        big, small = sizes[-1], sizes[-2] if len(sizes) > 1 else sizes[-1]
        ratio = results[big]["peak_mb"] / results[small]["peak_mb"]
        print(f"peak RSS {big:,} / {small:,} prompts: {ratio:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n(benchmark took {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
