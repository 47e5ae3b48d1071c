"""CPU and peak RSS of a whole ``batchgate run --simulate`` with its end-of-run reports, and without.

The run's own process is measured (``wait4``: user + system CPU, peak RSS), from interpreter start to
exit, so imports count: the end-of-run report's DuckDB, pyarrow and pandas are what is compared.
Runs are interleaved ``--repeat`` times; medians shown.  Not part of the test suite.

    python benchmarks/bench_run_reports.py [--prompts 2000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def measure(cmd: list[str], cwd: Path) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) not in (0, 1):
        raise SystemExit(f"{cmd} failed with {status}")
    return {"wall": time.perf_counter() - t0, "cpu": usage.ru_utime + usage.ru_stime, "rss": usage.ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-run-reports-") as tmp:
        root = Path(tmp)
        prompts = root / "prompts.jsonl"
        with prompts.open("w") as f:
            for i in range(args.prompts):
                f.write(json.dumps({"id": f"p{i}", "messages": [{"role": "user", "content": f"question {i}"}]}) + "\n")
        variants = {"reports": [], "--no-report": ["--no-report"]}
        results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
        for n in range(args.repeat):
            for name, extra in variants.items():
                out = root / f"out-{n}-{name.strip('-')}"
                cmd = [sys.executable, "-m", "batchgate", "run", str(prompts), "--simulate", "--model", "sim-model"]
                cmd += ["--no-key-limits", "--no-sim-key-limits"]  # measure the work, not a key's rate limit
                results[name].append(measure([*cmd, "--out", str(out), "--quiet", *extra], root))
                shutil.rmtree(out, ignore_errors=True)
        print(f"batchgate run --simulate, {args.prompts:,} prompts (medians of {args.repeat})")
        print(f"{'variant':<12} {'wall s':>7} {'cpu s':>7} {'peak MB':>8}")
        med = {k: {m: statistics.median(r[m] for r in v) for m in ("wall", "cpu", "rss")} for k, v in results.items()}
        for name, m in med.items():
            print(f"{name:<12} {m['wall']:>7.2f} {m['cpu']:>7.2f} {m['rss']:>8.0f}")
        a, b = med["reports"], med["--no-report"]
        print(
            f"reports / --no-report: cpu {a['cpu'] / b['cpu']:.2f}x, wall {a['wall'] / b['wall']:.2f}x, "
            f"peak RSS {a['rss'] / b['rss']:.2f}x; the reports cost {a['cpu'] - b['cpu']:.2f} s CPU"
        )


if __name__ == "__main__":
    main()
