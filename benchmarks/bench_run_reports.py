"""The whole ``batchgate run`` a user types, against a bare aiohttp + json loop doing the same requests.

Issue 12, goal 1: whole-process CPU of ``batchgate run`` with its end-of-run reports <= 0.8x the bare
loop over 2,000 x 64-chunk prompts at concurrency 64, wall <= 1.1x, and a one-prompt run under
0.5 s CPU.  Every variant is one process measured from interpreter start to exit with ``wait4``
(user + system CPU, peak RSS), so imports count; the simulator runs in its own process.  The bare
loop is ``bench_cpu.py``'s baseline client (aiohttp, stdlib json, a semaphore, one results file),
run as a whole process too.  Variants are interleaved ``--repeat`` times; medians shown.

    python benchmarks/bench_run_reports.py [--prompts 2000] [--tokens 64] [--concurrency 64] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cpu import API_KEY, repo_env, run_measured, simulator_process, write_prompts

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=2000)
    parser.add_argument("--tokens", type=int, default=64, help="chunks per answer (one token each)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    env = dict(repo_env(), GONKAGATE_API_KEY=API_KEY)
    with tempfile.TemporaryDirectory(prefix="bench-run-reports-") as tmp, simulator_process(args.tokens) as url:
        root = Path(tmp)
        many = write_prompts(root / "prompts.jsonl", args.prompts)
        one = write_prompts(root / "one.jsonl", 1)
        c = str(args.concurrency)

        def bare(prompts: Path, out: Path) -> list[str]:
            worker = [sys.executable, str(HERE / "bench_cpu.py"), "--worker", "baseline", "--url", url]
            return [*worker, "--prompts", str(prompts), "--out", str(out), "--concurrency", c]

        def run(prompts: Path, out: Path, *extra: str) -> list[str]:
            cmd = [sys.executable, "-m", "batchgate", "run", str(prompts), "--base-url", url, "-c", c]
            return [*cmd, "--no-key-limits", "--quiet", "--out", str(out), *extra]  # the work, not a key's limit

        variants = {
            "bare loop": lambda out: bare(many, out),
            "run": lambda out: run(many, out),
            "run --no-report": lambda out: run(many, out, "--no-report"),
            "run, 1 prompt": lambda out: run(one, out),
            "1 prompt --no-report": lambda out: run(one, out, "--no-report"),
        }
        results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
        for n in range(args.repeat):
            for name, cmd in variants.items():
                out = root / f"out-{n}-{len(results[name])}-{name.replace(' ', '_').replace(',', '')}"
                out.mkdir()
                code, _, err, wall, usage = run_measured(cmd(out), env)
                if code != 0:
                    raise SystemExit(f"{name} failed ({code}):\n{err[-2000:]}")
                results[name].append(
                    {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss": usage.ru_maxrss / 1024}
                )
                shutil.rmtree(out, ignore_errors=True)
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("wall", "cpu", "rss")} for k, v in results.items()}
    print(
        f"whole processes, {args.prompts:,} prompts x {args.tokens} chunks, concurrency {args.concurrency} "
        f"(medians of {args.repeat}; load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)"
    )
    print(f"{'variant':<22} {'wall s':>7} {'cpu s':>7} {'peak MB':>8} {'cpu vs bare':>12} {'wall vs bare':>13}")
    base = med["bare loop"]
    for name, m in med.items():
        ratios = "" if "1 prompt" in name else f"{m['cpu'] / base['cpu']:>11.2f}x {m['wall'] / base['wall']:>12.2f}x"
        print(f"{name:<22} {m['wall']:>7.2f} {m['cpu']:>7.2f} {m['rss']:>8.0f} {ratios}")
    a, b = med["run"], med["run --no-report"]
    print(f"the end-of-run reports cost {a['cpu'] - b['cpu']:.2f} s CPU and {a['rss'] - b['rss']:.0f} MB peak RSS")
    print(
        f"goal: run cpu <= 0.8x bare: {a['cpu'] / base['cpu']:.2f}x; wall <= 1.1x: {a['wall'] / base['wall']:.2f}x; "
        f"one-prompt run < 0.5 s CPU: {med['run, 1 prompt']['cpu']:.2f} s"
    )


if __name__ == "__main__":
    main()
