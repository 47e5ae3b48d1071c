"""Many slow streams: 2,000 concurrent answers at 200 ms a chunk, batchgate vs a bare aiohttp loop.

The simulators (``--sim-processes`` of them on one port, ``SO_REUSEPORT``, see ``sim_farm.py``;
a fresh farm for each run) answer every prompt with exactly ``--tokens`` tokens, one SSE chunk
per token and ``--token-delay`` seconds between chunks, so an answer takes
``(tokens - 1) x delay`` (3.8 s with the defaults) however fast the client is.  Each client runs
in its own subprocess at ``--concurrency`` streams:

* **baseline**: aiohttp + stdlib ``json``, a semaphore, ``async for line in resp.content``, one
  results file (the loop of ``bench_cpu.py``);
* **batchgate**: the real CLI, ``batchgate run --quiet --no-report --json --no-key-limits``,
  called in-process (``batchgate.cli.main``) after its imports.

Each worker times its own work (wall and ``getrusage`` user + sys from just before the first
request to the end, imports and interpreter start left out); the parent also reads the whole
process's CPU and peak RSS from ``wait4``.

**Pace efficiency** (the target is >= 0.95) is wave-based: ideal wall = ceil(prompts /
concurrency) x answer duration, efficiency = ideal / measured wall, where measured wall is the
worker's timed wall (for batchgate that includes reading and validating the input, opening the
ledger and writing run.json).  The median per-stream duration (batchgate's ledger ``latency_s``;
the baseline's own clock) against the answer duration is shown too.  "CPU/core" is CPU seconds
over wall seconds: the share of one core the client used.

With ``--uvloop auto`` (the default) both clients run again under
``asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())`` when ``--uvloop-python`` (default:
this interpreter) can import uvloop; otherwise the benchmark says it is absent.

    python benchmarks/bench_slow_streams.py [--prompts 6000] [--concurrency 2000] [--tokens 20]
        [--token-delay 0.2] [--sim-processes 2] [--repeat 2] [--uvloop {auto,on,off}]
        [--uvloop-python PYTHON] [--profile PATH_TO_PY_SPY]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_cpu import API_KEY, MODEL, _pyspy_top, repo_env, run_measured
from sim_farm import simulator_farm

_HERE = Path(__file__).resolve()
TARGET = 0.95


def write_prompts(path: Path, n: int) -> None:
    model = json.dumps(MODEL)
    with path.open("w") as f:
        for i in range(n):
            f.write(f'{{"id":"s{i:07d}","model":{model},"prompt":"Tell me slowly about {i}."}}\n')


# -- the workers ---------------------------------------------------------------------------------


async def _baseline(url: str, prompts: Path, out: Path, concurrency: int) -> tuple[int, list[float], list[float]]:
    """aiohttp, stdlib json, a semaphore, one results file; each stream's own duration."""
    import aiohttp

    with prompts.open() as f:
        lines = [json.loads(line) for line in f]
    sem = asyncio.Semaphore(concurrency)
    endpoint = url + "/chat/completions"
    ok = 0
    durations: list[float] = []
    ttfts: list[float] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with (out / "results.jsonl").open("w") as results:
        async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

            async def one(p: dict[str, Any]) -> None:
                nonlocal ok
                body = {
                    "model": p["model"],
                    "messages": [{"role": "user", "content": p["prompt"]}],
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                parts: list[str] = []
                usage = finish = first = None
                async with sem:
                    t0 = time.monotonic()
                    async with session.post(endpoint, json=body) as resp:
                        resp.raise_for_status()
                        async for line in resp.content:
                            if not line.startswith(b"data: "):
                                continue
                            payload = line[6:].strip()
                            if payload == b"[DONE]":
                                break
                            chunk = json.loads(payload)
                            for choice in chunk.get("choices") or ():
                                text = choice["delta"].get("content")
                                if text:
                                    parts.append(text)
                                    if first is None:
                                        first = time.monotonic() - t0
                                if choice.get("finish_reason"):
                                    finish = choice["finish_reason"]
                            if chunk.get("usage"):
                                usage = chunk["usage"]
                    durations.append(time.monotonic() - t0)
                    ttfts.append(first if first is not None else math.nan)
                row = {"id": p["id"], "content": "".join(parts), "finish_reason": finish, "usage": usage}
                results.write(json.dumps(row) + "\n")
                ok += usage is not None

            await asyncio.gather(*(one(p) for p in lines))
    return ok, durations, ttfts


def _batchgate(url: str, prompts: Path, out: Path, concurrency: int) -> tuple[int, list[float], list[float]]:
    """The real CLI in this process; ok count from its JSON summary, stream durations from its ledger."""
    import contextlib
    import io

    from batchgate.cli import main as cli

    argv = ["run", str(prompts), "--out", str(out / "bg"), "--base-url", url, "-c", str(concurrency)]
    argv += ["--quiet", "--no-report", "--json", "--no-key-limits"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            cli.main(argv, prog_name="batchgate", standalone_mode=True)
        except SystemExit as exc:
            if exc.code not in (0, None):
                raise RuntimeError(f"batchgate run exited {exc.code}") from None
    summary = json.loads([line for line in buf.getvalue().splitlines() if line.startswith("{")][-1])
    return summary["ok"], [], []


def _ledger_durations(out: Path) -> tuple[list[float], list[float]]:
    """Each row's latency_s and ttft_s."""
    with (out / "bg" / "results.jsonl").open("rb") as f:
        rows = [json.loads(line) for line in f]
    return [r["latency_s"] for r in rows], [r["ttft_s"] for r in rows]


def _worker(args: argparse.Namespace) -> None:
    """Import everything, then time only the work; print one JSON line."""
    import aiohttp  # noqa: F401

    if args.loop == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if args.worker == "batchgate":
        import batchgate.cli  # noqa: F401
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.concurrency * 2 + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))
    url, prompts, out = args.url, Path(args.prompts_file), Path(args.out)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    if args.worker == "baseline":
        ok, durations, ttfts = asyncio.run(_baseline(url, prompts, out, args.concurrency))
    else:
        ok, durations, ttfts = _batchgate(url, prompts, out, args.concurrency)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    if args.worker == "batchgate":
        durations, ttfts = _ledger_durations(out)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    durations.sort()
    report = {"ok": ok, "cpu_s": cpu, "wall_s": wall, "stream_median_s": statistics.median(durations)}
    report |= {"stream_p99_s": durations[int(len(durations) * 0.99)], "stream_max_s": durations[-1]}
    ttfts.sort()
    report |= {"ttft_median_s": statistics.median(ttfts), "ttft_p99_s": ttfts[int(len(ttfts) * 0.99)]}
    print(json.dumps(report))


# -- the parent ----------------------------------------------------------------------------------


def _run(
    variant: str,
    loop: str,
    python: str,
    prompts: Path,
    workdir: Path,
    args: argparse.Namespace,
    wrapper: list[str] | None = None,
) -> dict[str, Any]:
    """One worker subprocess (``wrapper`` runs it, e.g. py-spy) against a fresh farm; its report and wait4 figures."""
    out = Path(tempfile.mkdtemp(prefix=f"{variant}-{loop}-", dir=workdir))
    cmd = [python, str(_HERE), "--worker", variant, "--loop", loop, "--prompts-file", str(prompts)]
    cmd += ["--out", str(out), "--concurrency", str(args.concurrency)]
    try:
        with simulator_farm(args.sim_processes, args.tokens, token_delay_s=args.token_delay) as farm:
            env = repo_env() | {"GONKAGATE_API_KEY": API_KEY}
            code, stdout, stderr, wall, usage = run_measured([*(wrapper or []), *cmd, "--url", farm.url], env)
        if code != 0:
            raise RuntimeError(f"{variant}/{loop} worker failed ({code}):\n{stderr[-3000:]}")
        res = json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])
        if res["ok"] != args.prompts:
            raise RuntimeError(f"{variant}/{loop}: only {res['ok']} of {args.prompts} ok")
        res["proc_wall_s"] = wall
        res["proc_cpu_s"] = usage.ru_utime + usage.ru_stime
        res["peak_mb"] = usage.ru_maxrss / 1024
        res["sim_cores"] = sum(farm.serve_cpu_s) / wall
        res["sim_max_core"] = max(farm.serve_cpu_s) / wall
        return res
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _uvloop_python(args: argparse.Namespace) -> str | None:
    """The interpreter to run the uvloop rows with, or None (saying why)."""
    if args.uvloop == "off":
        return None
    code = "import uvloop, aiohttp, batchgate; print(uvloop.__version__)"
    probe = subprocess.run([args.uvloop_python, "-c", code], capture_output=True, text=True, env=repo_env())
    if probe.returncode == 0:
        print(f"uvloop {probe.stdout.strip()} (under {args.uvloop_python})")
        return args.uvloop_python
    msg = f"uvloop is not importable by {args.uvloop_python} (--uvloop-python: an interpreter that has it)"
    if args.uvloop == "on":
        raise SystemExit(msg)
    print(msg + ": uvloop rows skipped")
    return None


def _table(results: dict[tuple[str, str], list[dict[str, Any]]], args: argparse.Namespace) -> str:
    answer_s = (args.tokens - 1) * args.token_delay
    ideal = math.ceil(args.prompts / args.concurrency) * answer_s
    n = args.prompts

    def med(key: tuple[str, str], f: Any) -> float:
        return statistics.median(f(r) for r in results[key])

    base_cpu = med(("baseline", "asyncio"), lambda r: r["cpu_s"])
    head = (
        f"{'client':<10} {'loop':<8} {'wall s':>7} {'pace eff':>8} {'stream s':>8} {'stream eff':>10} "
        f"{'CPU s':>6} {'CPU/core':>8} {'CPU µs/req':>10} {'vs base':>7} {'proc CPU s':>10} {'peak RSS':>8} "
        f"{'sim cores':>9}"
    )
    rows = [
        f"ideal wall {ideal:.2f} s = ceil({n} / {args.concurrency}) x {answer_s:.2f} s "
        f"({args.tokens} chunks, {args.token_delay} s apart)",
        head,
        "-" * len(head),
    ]
    for key in results:
        wall = med(key, lambda r: r["wall_s"])
        stream = med(key, lambda r: r["stream_median_s"])
        cpu = med(key, lambda r: r["cpu_s"])
        rows.append(
            f"{key[0]:<10} {key[1]:<8} {wall:>7.2f} {ideal / wall:>8.3f} {stream:>8.3f} {answer_s / stream:>10.3f} "
            f"{cpu:>6.2f} {med(key, lambda r: r['cpu_s'] / r['wall_s']):>8.2f} {cpu / n * 1e6:>10.0f} "
            f"{cpu / base_cpu:>6.2f}x {med(key, lambda r: r['proc_cpu_s']):>10.2f} "
            f"{med(key, lambda r: r['peak_mb']):>5.0f} MB {med(key, lambda r: r['sim_cores']):>9.2f}"
        )
    rows.append(
        "wall, CPU s: the worker's timed work (imports and interpreter start left out); proc CPU s, peak RSS: "
        "the whole process (wait4);"
    )
    rows.append(
        f"pace eff = ideal / wall (target >= {TARGET}); stream eff = {answer_s:.2f} s / median stream duration; "
        "sim cores = the simulators' CPU while serving / process wall"
    )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=6000)
    parser.add_argument("--concurrency", type=int, default=2000)
    parser.add_argument("--tokens", type=int, default=20, help="completion tokens (= chunks) per answer")
    parser.add_argument("--token-delay", type=float, default=0.2, help="simulator's seconds between chunks")
    parser.add_argument("--sim-processes", type=int, default=2, help="simulators sharing the port")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--uvloop", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--uvloop-python", default=sys.executable, help="an interpreter that can import uvloop")
    parser.add_argument("--profile", metavar="PY_SPY", help="then py-spy one more batchgate run (path to py-spy)")
    parser.add_argument("--worker", choices=("baseline", "batchgate"), help=argparse.SUPPRESS)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio", help=argparse.SUPPRESS)
    parser.add_argument("--prompts-file", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return

    started = time.monotonic()
    load = os.getloadavg()
    print(
        f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}  ·  {args.prompts} prompts  ·  "
        f"concurrency {args.concurrency}  ·  {args.sim_processes} simulators on one port"
    )
    uv_python = _uvloop_python(args)
    runs = [("baseline", "asyncio", sys.executable), ("batchgate", "asyncio", sys.executable)]
    if uv_python:
        runs += [("baseline", "uvloop", uv_python), ("batchgate", "uvloop", uv_python)]
    tmp = Path(tempfile.mkdtemp(prefix="bench-slow-"))
    results: dict[tuple[str, str], list[dict[str, Any]]] = {(v, loop): [] for v, loop, _ in runs}
    try:
        prompts = tmp / "prompts.jsonl"
        write_prompts(prompts, args.prompts)
        for i in range(args.repeat):
            for variant, loop, python in runs:
                r = _run(variant, loop, python, prompts, tmp, args)
                results[(variant, loop)].append(r)
                print(
                    f"  round {i + 1}: {variant:<9} {loop:<7} wall {r['wall_s']:.2f} s, CPU {r['cpu_s']:.2f} s, "
                    f"streams median {r['stream_median_s']:.2f} p99 {r['stream_p99_s']:.2f} "
                    f"max {r['stream_max_s']:.2f} s, "
                    f"TTFT median {r['ttft_median_s']:.3f} p99 {r['ttft_p99_s']:.3f} s, "
                    f"sim {r['sim_cores']:.2f} cores",
                    flush=True,
                )
        print("\n" + _table(results, args))
        answer_s = (args.tokens - 1) * args.token_delay
        ideal = math.ceil(args.prompts / args.concurrency) * answer_s
        eff = ideal / statistics.median(r["wall_s"] for r in results[("batchgate", "asyncio")])
        print(f"\nbatchgate pace efficiency {eff:.3f}: target >= {TARGET} {'met' if eff >= TARGET else 'MISSED'}")
        if args.profile:
            raw = tmp / "pyspy.txt"
            wrapper = [args.profile, "record", "-r", "250", "-f", "raw", "-o", str(raw), "--"]
            _run("batchgate", "asyncio", sys.executable, prompts, tmp, args, wrapper)
            print(f"\nbatchgate under py-spy (250 Hz), {args.prompts} streams: top 15 leaf frames inside asyncio.run")
            print(_pyspy_top(raw))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load = os.getloadavg()
    print(f"\n(benchmark took {time.monotonic() - started:.0f} s; load average now {load[0]:.2f} {load[1]:.2f})")


if __name__ == "__main__":
    main()
