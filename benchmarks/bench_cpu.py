"""CPU per request: batchgate vs a bare aiohttp + ``json`` loop vs ``openai.AsyncOpenAI``.

The product's bar: less CPU per request than the bare loop doing the same work (stream every
answer, keep its usage, write one row per request to disk), with every guarantee on.

The simulator runs as its own process (``batchgate.simulator.serve`` with a fixed completion
length), and each client variant runs in its own subprocess, timing its own CPU
(``getrusage(RUSAGE_SELF)``, user + sys) around the work only: interpreter start and imports are
excluded.  Variants are interleaved ``--repeat`` times; the table shows medians.  Finally one
batchgate run is profiled (cProfile, and py-spy when it is installed and allowed to trace) and the
top functions by self time are printed.

    python benchmarks/bench_cpu.py [--requests 3000] [--concurrency 200] [--tokens 64] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import json
import os
import pstats
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# The benchmarks measure this work tree's batchgate, whatever the venv's install says.
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODEL = "Qwen/Qwen3-32B-FP8"
API_KEY = "gp-bench"
VARIANTS = ("baseline", "batchgate", "openai")
_HERE = Path(__file__).resolve()


def repo_env() -> dict[str, str]:
    """The environment for child processes: this repo first on the import path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


# -- shared with the other benchmarks ------------------------------------------------------------


def run_measured(cmd: list[str], env: dict[str, str]) -> tuple[int, str, str, float, Any]:
    """Run ``cmd``; its exit code, stdout, stderr, wall seconds and kernel rusage (``wait4``)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read(), err.read(), wall, usage


@contextlib.contextmanager
def simulator_process(tokens: int, seed: int = 1, token_delay_s: float = 0.0) -> Iterator[str]:
    """Run the simulator in its own process with answers of exactly ``tokens`` tokens; yield its base URL."""
    code = (
        "import sys\n"
        "from batchgate.simulator import SimulatorConfig, serve\n"
        f"cfg = SimulatorConfig(seed={seed}, token_delay_s={token_delay_s!r}, "
        f"min_completion_tokens={tokens}, max_completion_tokens={tokens})\n"
        "serve(cfg, '127.0.0.1', 0, lambda url: print(f'listening on {url}', flush=True))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=repo_env())
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().strip()
        if not first.startswith("listening on "):
            raise RuntimeError(f"simulator did not start (said {first!r}, exit {proc.poll()})")
        yield first.removeprefix("listening on ")
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it lingers; always reaped."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def write_prompts(path: Path, n: int) -> Path:
    """``n`` distinct prompts of ~200 characters, one model, ids ``p0000000``..."""
    filler = "Explain, with a worked example and in plain words, how this particular thing behaves at scale. "
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"p{i:07d}", "model": MODEL, "prompt": f"Question {i}: {filler * 2}"}))
            f.write("\n")
    return path


# -- the client variants (each runs in a worker subprocess) --------------------------------------


async def _baseline(url: str, prompts: Path, out: Path, concurrency: int) -> int:
    """What anyone would write first: aiohttp, stdlib json, a semaphore, one results file."""
    import aiohttp

    with prompts.open() as f:
        lines = [json.loads(line) for line in f]
    sem = asyncio.Semaphore(concurrency)
    endpoint = url + "/chat/completions"
    ok = 0
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
                usage = finish = None
                async with sem, session.post(endpoint, json=body) as resp:
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
                            if choice.get("finish_reason"):
                                finish = choice["finish_reason"]
                        if chunk.get("usage"):
                            usage = chunk["usage"]
                row = {"id": p["id"], "content": "".join(parts), "finish_reason": finish, "usage": usage}
                results.write(json.dumps(row) + "\n")
                ok += usage is not None

            await asyncio.gather(*(one(p) for p in lines))
    return ok


async def _batchgate(url: str, prompts: Path, out: Path, concurrency: int) -> int:
    """The real Runner: validation, lock, ledger, tenacity retries, pricing, run.json."""
    import batchgate

    config = batchgate.RunConfig(
        out_dir=out / "bg",
        api_key=API_KEY,
        base_url=url,
        concurrency=concurrency,
        check_models=False,  # the bare loop makes no such call either
        key_concurrency=None,  # the benchmark simulator enforces no per-key limits
        key_rpm=None,
        key_burst_10s=None,
    )
    summary = await batchgate.run([prompts], config)
    return summary.ok


async def _openai(url: str, prompts: Path, out: Path, concurrency: int) -> int:
    """The SDK loop: AsyncOpenAI streaming with include_usage, same semaphore and results file."""
    import openai

    with prompts.open() as f:
        lines = [json.loads(line) for line in f]
    sem = asyncio.Semaphore(concurrency)
    ok = 0
    async with openai.AsyncOpenAI(base_url=url, api_key=API_KEY) as client:
        with (out / "results.jsonl").open("w") as results:

            async def one(p: dict[str, Any]) -> None:
                nonlocal ok
                parts: list[str] = []
                usage = finish = None
                async with sem:
                    stream = await client.chat.completions.create(
                        model=p["model"],
                        messages=[{"role": "user", "content": p["prompt"]}],
                        stream=True,
                        stream_options={"include_usage": True},
                    )
                    async for chunk in stream:
                        for choice in chunk.choices:
                            if choice.delta.content:
                                parts.append(choice.delta.content)
                            if choice.finish_reason:
                                finish = choice.finish_reason
                        if chunk.usage:
                            usage = chunk.usage.model_dump()
                row = {"id": p["id"], "content": "".join(parts), "finish_reason": finish, "usage": usage}
                results.write(json.dumps(row) + "\n")
                ok += usage is not None

            await asyncio.gather(*(one(p) for p in lines))
    return ok


_WORKERS = {"baseline": _baseline, "batchgate": _batchgate, "openai": _openai}


def _worker(args: argparse.Namespace) -> None:
    """Import everything first, then time only the work; print one JSON line."""
    import aiohttp  # noqa: F401

    if args.worker == "batchgate":
        import batchgate  # noqa: F401
    elif args.worker == "openai":
        import openai  # noqa: F401
    work = _WORKERS[args.worker]
    profiler = cProfile.Profile() if args.cprofile else None
    gc_s = [0.0, 0.0]  # total seconds in the cyclic GC, start of the current collection

    def gc_timer(phase: str, _info: dict[str, int]) -> None:
        if phase == "start":
            gc_s[1] = time.perf_counter()
        else:
            gc_s[0] += time.perf_counter() - gc_s[1]

    gc.callbacks.append(gc_timer)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    ok = asyncio.run(work(args.url, Path(args.prompts), Path(args.out), args.concurrency))
    if profiler is not None:
        profiler.disable()
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    if profiler is not None:
        profiler.dump_stats(args.cprofile)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    user = r1.ru_utime - r0.ru_utime
    gc.callbacks.remove(gc_timer)
    print(json.dumps({"variant": args.worker, "ok": ok, "cpu_s": cpu, "user_s": user, "wall_s": wall, "gc_s": gc_s[0]}))


# -- the parent ----------------------------------------------------------------------------------


def _run_worker(
    variant: str,
    url: str,
    prompts: Path,
    workdir: Path,
    concurrency: int,
    *,
    extra: list[str] | None = None,
    wrapper: list[str] | None = None,
) -> dict[str, Any]:
    """One worker subprocess (``wrapper`` runs it, e.g. under py-spy); its JSON report."""
    out = Path(tempfile.mkdtemp(prefix=f"{variant}-", dir=workdir))
    cmd = [sys.executable, str(_HERE), "--worker", variant, "--url", url, "--prompts", str(prompts)]
    cmd += ["--out", str(out), "--concurrency", str(concurrency), *(extra or [])]
    if wrapper:
        cmd = [*wrapper, "--", *cmd]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=repo_env())
        if proc.returncode != 0:
            raise RuntimeError(f"{variant} worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        return json.loads(lines[-1])
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _table(results: dict[str, list[dict[str, Any]]], counts: dict[str, int]) -> str:
    med: dict[str, tuple[float, float, float, float]] = {}
    for variant, runs in results.items():
        n = counts[variant]
        med[variant] = (
            statistics.median(r["cpu_s"] / n * 1e6 for r in runs),
            statistics.median(n / r["wall_s"] for r in runs),
            statistics.median(r["cpu_s"] / r["wall_s"] for r in runs),
            statistics.median(r["gc_s"] / n * 1e6 for r in runs),
        )
    base = med["baseline"][0]
    head = (
        f"{'variant':<10} {'requests':>8} {'CPU µs/req':>11} {'min..max':>13} {'GC µs/req':>10} {'req/s':>8} "
        f"{'CPU/wall':>8} {'vs base':>8}"
    )
    rows = [head, "-" * len(head)]
    for variant in results:
        cpu_us, rps, util, gc_us = med[variant]
        each = [r["cpu_s"] / counts[variant] * 1e6 for r in results[variant]]
        spread = f"{min(each):.0f}..{max(each):.0f}"
        rows.append(
            f"{variant:<10} {counts[variant]:>8} {cpu_us:>11.0f} {spread:>13} {gc_us:>10.0f} {rps:>8.0f} {util:>8.2f} "
            f"{cpu_us / base:>7.2f}x"
        )
    return "\n".join(rows)


def _cprofile_top(path: Path, n_requests: int, top: int = 15) -> str:
    stats = pstats.Stats(str(path))
    entries = []
    for (filename, line, func), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        entries.append((tottime, ncalls, cumtime, _short(filename), line, func))
    entries.sort(reverse=True)
    total = sum(e[0] for e in entries)
    head = f"{'self µs/req':>11} {'share':>6} {'calls/req':>9} {'cum µs/req':>10}  function"
    rows = [head, "-" * len(head)]
    for tottime, ncalls, cumtime, filename, line, func in entries[:top]:
        rows.append(
            f"{tottime / n_requests * 1e6:>11.1f} {tottime / total:>6.1%} {ncalls / n_requests:>9.1f} "
            f"{cumtime / n_requests * 1e6:>10.1f}  {filename}:{line}({func})"
        )
    return "\n".join(rows)


def _short(filename: str) -> str:
    for marker in ("site-packages/", "/work/main/", "python3.11/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


_LINE_NO = re.compile(r":\d+\)$")


def _pyspy_top(raw: Path, top: int = 15) -> str:
    """Self time per leaf frame from py-spy's collapsed stacks (``frame;frame;leaf count``)."""
    own: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if "asyncio/runners.py" not in stack:
            continue  # interpreter start, imports and exit: not part of the timed work
        n = int(count)
        total += n
        leaf = _LINE_NO.sub(")", stack.rsplit(";", 1)[-1])  # one entry per function, not per line
        own[_short(leaf)] += n
    if not total:
        return "(no samples)"
    rows = [f"{'share':>6} {'samples':>7}  leaf frame", "-" * 40]
    rows += [f"{n / total:>6.1%} {n:>7}  {frame}" for frame, n in own.most_common(top)]
    return "\n".join(rows)


def _pyspy_usable() -> str | None:
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        return None
    probe = subprocess.run(
        [exe, "record", "-o", os.devnull, "-f", "raw", "--", sys.executable, "-c", "import time; time.sleep(0.3)"],
        capture_output=True,
        text=True,
        env=repo_env(),
    )
    return exe if probe.returncode == 0 else None


def _profile(which: str, url: str, prompts: Path, n: int, workdir: Path, concurrency: int) -> None:
    """Profile one batchgate run: cProfile, then py-spy when it can trace here."""
    if which in ("auto", "cprofile"):
        prof = workdir / "batchgate.prof"
        _run_worker("batchgate", url, prompts, workdir, concurrency, extra=["--cprofile", str(prof)])
        print(f"\nbatchgate under cProfile, {n} requests: top 15 by self time (cProfile inflates small calls)")
        print(_cprofile_top(prof, n))
    spy = _pyspy_usable() if which in ("auto", "py-spy") else None
    if spy:
        raw = workdir / "batchgate.pyspy.txt"
        wrapper = [spy, "record", "-r", "500", "-f", "raw", "-o", str(raw)]
        _run_worker("batchgate", url, prompts, workdir, concurrency, wrapper=wrapper)
        print(f"\nbatchgate under py-spy (500 Hz), {n} requests: top 15 leaf frames inside asyncio.run")
        print(_pyspy_top(raw))
    elif which == "py-spy":
        print("\npy-spy is not installed or may not trace here (pip install py-spy; it needs ptrace)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000, help="requests per baseline/batchgate run")
    parser.add_argument("--openai-requests", type=int, default=1000, help="requests per openai run (it is slow)")
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=64, help="completion tokens per answer")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--token-delay", type=float, default=0.0, help="simulator's seconds between chunks")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    parser.add_argument("--profile", choices=("auto", "cprofile", "py-spy", "none"), default="auto")
    # Worker mode (internal).
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--prompts", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--cprofile", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return

    variants = [v for v in args.variants.split(",") if v]
    if "baseline" not in variants:
        variants.insert(0, "baseline")
    counts = {v: args.openai_requests if v == "openai" else args.requests for v in variants}
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="bench-cpu-") as tmp,
        simulator_process(args.tokens, token_delay_s=args.token_delay) as url,
    ):
        workdir = Path(tmp)
        warm = min(200, *counts.values())
        files = {n: write_prompts(workdir / f"prompts-{n}.jsonl", n) for n in {warm, *counts.values()}}
        print(
            f"simulator {url}  ·  {args.tokens} tokens/answer, token delay {args.token_delay:g} s  ·  "
            f"concurrency {args.concurrency}  ·  "
            f"{args.repeat} interleaved repeats  ·  {os.cpu_count()} CPUs, Python {sys.version.split()[0]}"
        )
        # One untimed warm-up per variant: page cache, simulator's first requests.
        for v in variants:
            _run_worker(v, url, files[warm], workdir, args.concurrency)
        results: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        for rep in range(args.repeat):
            for v in variants:
                r = _run_worker(v, url, files[counts[v]], workdir, args.concurrency)
                if r["ok"] != counts[v]:
                    raise SystemExit(f"{v}: only {r['ok']} of {counts[v]} requests succeeded")
                results[v].append(r)
                print(
                    f"  run {rep + 1}/{args.repeat} {v:<9} {r['cpu_s'] / counts[v] * 1e6:7.0f} µs/req CPU  "
                    f"{counts[v] / r['wall_s']:6.0f} req/s",
                    flush=True,
                )
        print()
        print(_table(results, counts))
        base = statistics.median(r["cpu_s"] / counts["baseline"] for r in results["baseline"])
        for v in variants:
            if v != "baseline":
                mine = statistics.median(r["cpu_s"] / counts[v] for r in results[v])
                print(f"{v}/baseline CPU per request: {mine / base:.2f}")
        if "batchgate" in variants and args.profile != "none":
            _profile(args.profile, url, files[args.requests], args.requests, workdir, args.concurrency)
    print(f"\n(benchmark took {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
