"""Several simulator processes on one port (``SO_REUSEPORT``), so the simulator is not the bottleneck.

Each process builds the app with ``batchgate.simulator.create_app`` and serves it with
``web.TCPSite(..., reuse_port=True)``, run as ``batchgate.simulator.running_simulator`` runs it
(``access_log=None``, ``handler_cancellation=True``).  The first process binds a free port; the
others bind the same one, and the kernel spreads new connections over them.  Per-key limits are
off (``SimulatorConfig.key_limits`` is false by default).  Nobody reads a farm process's billing,
so it keeps no per-request records (``keep_records=0``; its totals are still kept): its memory stays
flat however many requests it serves.  On exit every process gets SIGTERM and
is reaped with ``wait4``, so the farm reports the CPU its processes used (``cpu_s``, start-up
included) and what each said it used while serving (``serve_cpu_s``).

With ``record_first_post`` each process prints the ``time.monotonic()`` of the first POST it
receives (CLOCK_MONOTONIC is system-wide, so a parent can compare it with its own clock).

Used by ``bench_night.py`` and ``bench_slow_streams.py``; run directly, it serves until Ctrl-C::

    python benchmarks/sim_farm.py --processes 2 --tokens 1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench_cpu import repo_env  # noqa: E402

_HERE = Path(__file__).resolve()


@dataclass
class Farm:
    """A running farm: its base URL; after exit, the CPU seconds of each process and first POST times."""

    url: str
    port: int
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    peak_mb: list[float] = field(default_factory=list)
    first_posts: list[float] = field(default_factory=list)
    serve_cpu_s: list[float] = field(default_factory=list)  # CPU after start-up (imports, bind) only

    def first_post(self) -> float | None:
        """The earliest first-POST time any process has reported so far (reads what they printed)."""
        for proc in self.procs:
            assert proc.stdout is not None
            while select.select([proc.stdout], [], [], 0)[0]:
                line = proc.stdout.readline()
                if not line:
                    break
                if line.startswith("first-post "):
                    self.first_posts.append(float(line.split()[1]))
        return min(self.first_posts) if self.first_posts else None


def _start(args: list[str], python: str) -> tuple[subprocess.Popen[str], int]:
    cmd = [python, str(_HERE), "--serve", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=repo_env(), bufsize=1)
    assert proc.stdout is not None
    first = proc.stdout.readline().strip()
    if not first.startswith("listening on "):
        _stop(proc)
        raise RuntimeError(f"simulator did not start (said {first!r}, exit {proc.poll()})")
    return proc, int(first.removeprefix("listening on "))


def _stop(proc: subprocess.Popen[str], timeout: float = 10.0) -> tuple[float, float]:
    """SIGTERM (SIGKILL after ``timeout``), reap with wait4; its CPU seconds and peak RSS in MB."""
    if proc.returncode is not None:
        return 0.0, 0.0
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            _, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


@contextlib.contextmanager
def simulator_farm(
    processes: int,
    tokens: int,
    *,
    token_delay_s: float = 0.0,
    seed: int = 1,
    record_first_post: bool = False,
    keep_records: int = 0,
    python: str = sys.executable,
) -> Iterator[Farm]:
    """``processes`` simulators on one loopback port, answers of exactly ``tokens`` tokens; yield the farm."""
    args = ["--tokens", str(tokens), "--token-delay", repr(token_delay_s), "--seed", str(seed)]
    args += ["--keep-records", str(keep_records)]
    if record_first_post:
        args.append("--record-first-post")
    procs: list[subprocess.Popen[str]] = []
    farm: Farm | None = None
    try:
        proc, port = _start([*args, "--port", "0"], python)
        procs.append(proc)
        for _ in range(processes - 1):
            procs.append(_start([*args, "--port", str(port)], python)[0])
        farm = Farm(url=f"http://127.0.0.1:{port}/v1", port=port, procs=procs)
        yield farm
    finally:
        if farm is not None:
            farm.first_post()  # collect what was printed before the pipes close
        for proc in procs:
            cpu, peak = _stop(proc)
            rest = proc.stdout.read() if proc.stdout is not None else ""
            if farm is not None:
                farm.cpu_s.append(cpu)
                farm.peak_mb.append(peak)
                for line in rest.splitlines():
                    if line.startswith("serve-cpu "):
                        farm.serve_cpu_s.append(float(line.split()[1]))
                    elif line.startswith("first-post "):
                        farm.first_posts.append(float(line.split()[1]))
            if proc.stdout is not None:
                proc.stdout.close()


# -- one simulator process -----------------------------------------------------------------------


async def _serve(args: argparse.Namespace) -> None:
    from aiohttp import web

    from batchgate.simulator import SimulatorConfig, create_app

    config = SimulatorConfig(
        seed=args.seed,
        token_delay_s=args.token_delay,
        min_completion_tokens=args.tokens,
        max_completion_tokens=args.tokens,
        keep_records=args.keep_records,
    )
    app = create_app(config)
    if args.record_first_post:
        seen: list[float] = []

        @web.middleware
        async def record(request: web.Request, handler):  # type: ignore[no-untyped-def]
            if not seen and request.method == "POST":
                seen.append(time.monotonic())
                print(f"first-post {seen[0]!r}", flush=True)
            return await handler(request)

        app.middlewares.append(record)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.25)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(runner, "127.0.0.1", args.port, backlog=4096, reuse_port=True)
        await site.start()
        print(f"listening on {runner.addresses[0][1]}", flush=True)
        ready = resource.getrusage(resource.RUSAGE_SELF)
        await stop.wait()
        done = resource.getrusage(resource.RUSAGE_SELF)
        serving = done.ru_utime - ready.ru_utime + done.ru_stime - ready.ru_stime
        print(f"serve-cpu {serving!r}", flush=True)
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1, help="completion tokens per answer")
    parser.add_argument("--token-delay", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep-records", type=int, default=0, help="billing records each process keeps")
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--record-first-post", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve(args))
        return
    with simulator_farm(args.processes, args.tokens, token_delay_s=args.token_delay, seed=args.seed) as farm:
        print(f"{args.processes} simulators on {farm.url} (Ctrl-C stops)")
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    main()
