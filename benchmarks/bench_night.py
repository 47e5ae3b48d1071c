"""A 10-million-prompt night, measured: rate, CPU per request, flat memory, resume and report at size.

For each size (``--sizes``, capped by ``--budget-s``) the benchmark writes that many short prompts
and runs the real CLI, ``batchgate run --no-report --quiet --no-key-limits -c 256``, as a
subprocess against ``--sim-processes`` simulators sharing one port (``SO_REUSEPORT``, see
``sim_farm.py``) that answer every prompt with one token.  ``wait4`` gives each process's CPU
(user + sys) and peak RSS; the run's RSS is also sampled from ``/proc`` every 0.5 s, so growth
shows over time and not only as a peak.  Then, over the ledger that run left:

* **report**: ``batchgate report OUT`` (every format): wall, CPU, peak RSS;
* **resume, all done**: the same command again; it must exit 0 having sent no POST (the
  simulators record the first POST they get): wall, CPU, peak RSS;
* **resume, new work**: ``--new`` prompts appended to the input (so the input's identity changes
  and the resume shortcuts are off, as after a real edit), the same command again: the time from
  process start to the first new POST the simulators see, and the whole wall.

A size that would not fit in what is left of ``--budget-s`` (at the rate measured so far) is cut
to what fits.  10M prompts are then extrapolated linearly from the largest size run, and the table
says so.  Targets: peak RSS of the run under 150 MB and of its report under 300 MB at any size,
run RSS flat (within 10%) between the first size and the largest.

The client and the simulators share this machine's CPUs, so the rate is the whole machine's
(``nproc`` and the load average are printed); CPU per request is the client's own.

    python benchmarks/bench_night.py [--sizes 100000,1000000] [--budget-s 180] [--concurrency 256]
                                     [--sim-processes 2] [--new 1000] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench_cpu import MODEL, repo_env
from sim_farm import Farm, simulator_farm

NIGHT = 10_000_000
RUN_RSS_TARGET_MB = 150
REPORT_RSS_TARGET_MB = 300
_RSS_AT = (0.1, 0.25, 0.5, 0.75, 1.0)
_FIRST_RATE_GUESS = 4000.0  # req/s assumed for the budget before anything was measured


def write_prompts(path: Path, start: int, n: int, mode: str = "w") -> None:
    """Prompts ``start`` .. ``start + n - 1``: short, distinct, one model (~90 bytes a line)."""
    model = json.dumps(MODEL)
    with path.open(mode, buffering=1 << 20) as f:
        for i in range(start, start + n):
            f.write(f'{{"id":"n{i:08d}","model":{model},"prompt":"Answer in one word: what is {i}?"}}\n')


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "batchgate", *args]


def run_cmd(prompts: Path, out: Path, url: str, concurrency: int) -> list[str]:
    return _cli(
        [
            "run",
            str(prompts),
            "--out",
            str(out),
            "--base-url",
            url,
            "-c",
            str(concurrency),
            "--quiet",
            "--no-report",
            "--json",
            "--no-key-limits",  # the benchmark's simulators enforce none either
        ]
    )


def measured(cmd: list[str], what: str, *, ok_codes: tuple[int, ...] = (0,)) -> dict[str, Any]:
    """Run ``cmd`` with the benchmark's key; wall, CPU, peak RSS, RSS sampled over time, its JSON summary."""
    env = repo_env() | {"GONKAGATE_API_KEY": "gp-bench"}
    samples: list[tuple[float, float]] = []  # (seconds since start, RSS MB) every 0.5 s
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        stop = threading.Event()

        def sample() -> None:
            status = Path(f"/proc/{proc.pid}/status")
            while not stop.wait(0.5):
                with contextlib.suppress(OSError, ValueError, IndexError):
                    line = next(x for x in status.read_text().splitlines() if x.startswith("VmRSS:"))
                    samples.append((time.monotonic() - t0, int(line.split()[1]) / 1024))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - t0
        stop.set()
        sampler.join()
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if code not in ok_codes:
        raise RuntimeError(f"{what} exited {code}:\n{stderr[-3000:]}")
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    return {
        "t0": t0,
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_mb": usage.ru_maxrss / 1024,
        "rss_samples": samples,
        "summary": json.loads(lines[-1]) if lines else None,
    }


def _rss_at(samples: list[tuple[float, float]], wall: float, share: float) -> float:
    """The last RSS sample taken before ``share`` of the wall (nan when there is none)."""
    before = [mb for t, mb in samples if t <= share * wall]
    return before[-1] if before else math.nan


def one_size(n: int, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run, report and both resumes over ``n`` prompts; the figures."""
    prompts, out = tmp / f"prompts-{n}.jsonl", tmp / f"out-{n}"
    t = time.monotonic()
    write_prompts(prompts, 0, n)
    print(f"  {n:>9,} prompts written ({prompts.stat().st_size / 1e6:.0f} MB) in {time.monotonic() - t:.1f} s")
    res: dict[str, Any] = {"n": n}
    with simulator_farm(args.sim_processes, 1, record_first_post=True) as farm:
        r = res["run"] = measured(run_cmd(prompts, out, farm.url, args.concurrency), "batchgate run")
        if r["summary"]["ok"] != n:
            raise SystemExit(f"{n} prompts: only {r['summary']['ok']} ok")
    res["sim_cpu_s"] = sum(farm.serve_cpu_s)
    res["sim_peak_mb"] = max(farm.peak_mb)
    res["ledger_mb"] = (out / "results.jsonl").stat().st_size / 1e6
    print(f"  {n:>9,} run: {r['wall_s']:.1f} s, {n / r['wall_s']:,.0f} req/s, {r['peak_mb']:.0f} MB", flush=True)

    res["report"] = measured(_cli(["report", str(out)]), "batchgate report")
    print(f"  {n:>9,} report: {res['report']['wall_s']:.1f} s, {res['report']['peak_mb']:.0f} MB", flush=True)

    with simulator_farm(1, 1, record_first_post=True) as farm:
        done = res["resume_done"] = measured(run_cmd(prompts, out, farm.url, args.concurrency), "resumed run")
        done["posts"] = farm.first_post() is not None
    if done["summary"]["requests"] != 0 or done["posts"]:
        raise SystemExit(f"resume over {n} done prompts sent requests: {done['summary']}")

    write_prompts(prompts, n, args.new, mode="a")
    with simulator_farm(1, 1, record_first_post=True) as farm:
        new = res["resume_new"] = measured(run_cmd(prompts, out, farm.url, args.concurrency), "resumed run (+new)")
        first = _wait_first_post(farm)
    if first is None:
        raise SystemExit(f"resume with {args.new} new prompts: the simulator saw no POST")
    new["first_post_s"] = first - new["t0"]
    if new["summary"]["ok"] != args.new or new["summary"]["skipped"] != n:
        raise SystemExit(f"resume with {args.new} new prompts: {new['summary']}")
    print(
        f"  {n:>9,} resume: done {done['wall_s']:.2f} s; +{args.new}: first POST at "
        f"{new['first_post_s']:.2f} s, all done {new['wall_s']:.2f} s",
        flush=True,
    )
    if not args.keep:
        shutil.rmtree(out)
        prompts.unlink()
    return res


def _wait_first_post(farm: Farm) -> float | None:
    deadline = time.monotonic() + 2
    while (first := farm.first_post()) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return first


def _table(results: list[dict[str, Any]], new: int) -> str:
    head = (
        f"{'prompts':>11} {'wall s':>8} {'req/s':>7} {'CPU µs/req':>10} {'CPU/wall':>8} {'sim CPU/wall':>12} "
        f"{'peak RSS':>9} {'ledger':>8} | {'report s':>8} {'rep CPU':>7} {'rep RSS':>8} | "
        f"{'resume done':>11} {'RSS':>6} | {'1st new POST':>12} {'+' + str(new) + ' all':>9}"
    )
    rows = [head, "-" * len(head)]
    for r in results:
        n, run, rep, done, new_r = r["n"], r["run"], r["report"], r["resume_done"], r["resume_new"]
        rows.append(
            f"{n:>11,} {run['wall_s']:>8.1f} {n / run['wall_s']:>7,.0f} {run['cpu_s'] / n * 1e6:>10.0f} "
            f"{run['cpu_s'] / run['wall_s']:>8.2f} {r['sim_cpu_s'] / run['wall_s']:>12.2f} "
            f"{run['peak_mb']:>6.0f} MB {r['ledger_mb']:>5.0f} MB | {rep['wall_s']:>8.1f} {rep['cpu_s']:>7.1f} "
            f"{rep['peak_mb']:>5.0f} MB | {done['wall_s']:>9.2f} s {done['peak_mb']:>3.0f} MB | "
            f"{new_r['first_post_s']:>10.2f} s {new_r['wall_s']:>7.2f} s"
        )
    big = results[-1]
    n, run = big["n"], big["run"]
    if n == NIGHT:
        rows.append(f"{'10,000,000':>11} measured above")
    else:
        if len(results) > 1:
            rest = (
                f"report ~{_at_night(results, 'report', 'wall_s'):.0f} s, resume done "
                f"~{_at_night(results, 'resume_done', 'wall_s'):.1f} s, first new POST "
                f"~{_at_night(results, 'resume_new', 'first_post_s'):.0f} s (linear through the two largest sizes)"
            )
        else:
            rest = "report and resume: run two sizes to extrapolate them"
        rows.append(
            f"{'10,000,000':>11} {run['wall_s'] * NIGHT / n:>8.0f} {n / run['wall_s']:>7,.0f} "
            f"{run['cpu_s'] / n * 1e6:>10.0f}  EXTRAPOLATED from {n:,} at the rate measured there (RSS, measured "
            f"flat, not scaled); {rest}"
        )
    rows.append("CPU and RSS are the client's whole process (wait4), interpreter start and imports included;")
    rows.append("sim CPU/wall is all simulator processes together, in cores.")
    return "\n".join(rows)


def _at_night(results: list[dict[str, Any]], what: str, key: str) -> float:
    """``results[*][what][key]`` at 10M prompts: the line through the two largest sizes."""
    big, small = results[-1], results[-2]
    slope = (big[what][key] - small[what][key]) / (big["n"] - small["n"])
    return big[what][key] + max(slope, 0.0) * (NIGHT - big["n"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000", help="prompt counts; the first is the RSS floor")
    parser.add_argument("--budget-s", type=float, default=180.0, help="seconds for the runs; later sizes shrink to fit")
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--sim-processes", type=int, default=2, help="simulators sharing the port")
    parser.add_argument("--new", type=int, default=1000, help="prompts appended for the resume-with-new-work run")
    parser.add_argument("--keep", action="store_true", help="keep the inputs and run directories (prints where)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    started = time.monotonic()
    load = os.getloadavg()
    print(
        f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}  ·  "
        f"{args.sim_processes} simulators on one port  ·  1 token/answer  ·  concurrency {args.concurrency}"
    )
    tmp = Path(tempfile.mkdtemp(prefix="bench-night-"))
    results: list[dict[str, Any]] = []
    run_s = 0.0
    try:
        for n in sizes:
            rate = _FIRST_RATE_GUESS
            if results:
                last = results[-1]
                rate = last["n"] / last["run"]["wall_s"]
            left = args.budget_s - run_s
            if n / rate > left:
                n_rate = max(10_000, int(rate * left * 0.9) // 10_000 * 10_000)
                if results and n_rate <= results[-1]["n"]:
                    print(f"  {n:,} prompts would take ~{n / rate:.0f} s, {left:.0f} s of budget left: skipped")
                    continue
                print(f"  {n:,} prompts would take ~{n / rate:.0f} s, {left:.0f} s of budget left: {n_rate:,} instead")
                n = n_rate
            res = one_size(n, tmp, args)
            run_s += res["run"]["wall_s"]
            results.append(res)
        print("\n" + _table(results, args.new))
        first, big = results[0], results[-1]
        rss_ratio = big["run"]["peak_mb"] / first["run"]["peak_mb"]
        cpu_ratio = (big["run"]["cpu_s"] / big["n"]) / (first["run"]["cpu_s"] / first["n"])
        print(f"\npeak RSS of run, {big['n']:,} / {first['n']:,} prompts: {rss_ratio:.2f}x (target <= 1.10)")
        print(f"CPU per request, {big['n']:,} / {first['n']:,} prompts: {cpu_ratio:.2f}x")
        for r in results:
            run = r["run"]
            trace = ", ".join(f"{_rss_at(run['rss_samples'], run['wall_s'], q):.0f}" for q in _RSS_AT)
            peak = run["peak_mb"]
            print(f"run RSS at 10/25/50/75/100% of its wall, {r['n']:,} prompts: {trace} MB (peak {peak:.0f})")
        sim_mb = ", ".join(f"{r['sim_peak_mb']:.0f} MB at {r['n']:,}" for r in results)
        print(f"simulator peak RSS, largest process: {sim_mb} (the farm keeps no billing records)")
        rep_ratio = big["report"]["peak_mb"] / first["report"]["peak_mb"]
        print(f"peak RSS of report, {big['n']:,} / {first['n']:,} prompts: {rep_ratio:.2f}x")
        run_max = max(r["run"]["peak_mb"] for r in results)
        rep_max = max(r["report"]["peak_mb"] for r in results)
        verdict = {True: "met", False: "MISSED"}
        print(f"run peak RSS {run_max:.0f} MB (target < {RUN_RSS_TARGET_MB}): {verdict[run_max < RUN_RSS_TARGET_MB]}")
        print(
            f"report peak RSS {rep_max:.0f} MB (target < {REPORT_RSS_TARGET_MB}): "
            f"{verdict[rep_max < REPORT_RSS_TARGET_MB]}"
        )
        print(f"flat run RSS (within 10%): {verdict[rss_ratio <= 1.10]}")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    load = os.getloadavg()
    print(f"\n(benchmark took {time.monotonic() - started:.0f} s; load average now {load[0]:.2f} {load[1]:.2f})")


if __name__ == "__main__":
    main()
