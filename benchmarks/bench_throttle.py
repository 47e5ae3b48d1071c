"""The throttle against servers that throttle (issue 10), at a larger scale than its tests.

Uses the server and the worker pool of ``tests/integration/test_throttle_limits.py`` (the server
in its own process, streams of ``--latency`` seconds; every 429 retried after its Retry-After):

1. **3% random 429s**: 50 workers through ``Throttle(50)`` vs the same run with no 429s, and vs
   the rule before issue 10 (halve the limit on every 429, at most once a second, and pause
   every start for the 429's Retry-After; its code is read from git history).
2. **a 50-stream key**: 200 workers through ``Throttle(200)`` (the key's ceiling, the default) and
   ``Throttle(200, key_concurrency=None)`` (the 429 share must find the limit) vs 50 workers.
3. **the key buckets**, 600/min and 200 per 10 s with time shrunk ``--time-scale`` times: a client
   that knows them vs one that does not, vs the bucket schedule's own minimum.

    python benchmarks/bench_throttle.py [--requests 3000] [--latency 0.05] [--repeat 3] [--time-scale 20]

Figures are medians over ``--repeat`` runs; the 2-CPU VMs these run on are noisy, so ratios are
the figures to read.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from batchgate.throttle import Throttle  # noqa: E402


def load_scenarios() -> ModuleType:
    path = REPO / "tests" / "integration" / "test_throttle_limits.py"
    spec = importlib.util.spec_from_file_location("throttle_scenarios", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


OLD_COMMIT = "4fe52c0"  # main before issue 10


def old_throttle() -> Callable[..., Any] | None:
    """The Throttle before issue 10 (halve on every 429 at most once a second, pause everyone for
    its Retry-After), read from git history; None outside a git checkout."""
    try:
        src = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{OLD_COMMIT}:batchgate/throttle.py"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    namespace: dict[str, Any] = {"__name__": "old_throttle"}
    exec(compile(src, "old_throttle.py", "exec"), namespace)
    cls: Callable[..., Any] = namespace["Throttle"]
    return cls


NO_BUCKETS: dict[str, Any] = {"key_rpm": None, "key_burst_10s": None}


async def measure(
    sc: ModuleType, server_rules: dict[str, Any], latency: float, n: int, workers: int, make: Callable[[], Any]
) -> dict[str, float]:
    async with sc.throttling_server(latency, **server_rules) as srv:
        throttle = make()
        res = await sc.run_pool(srv.url, n, workers, throttle)
    assert res.ok == n
    return {
        "s": res.seconds,
        "429s": res.rate_limited,
        "share": res.share_429,
        "in_flight": res.mean_in_flight,
        "min_limit": throttle.min_limit_seen,
        "slowdowns": throttle.slowdowns,
        "peak": srv.peak,
    }


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def row(name: str, m: dict[str, float], base: float | None) -> str:
    ratio = f"{m['s'] / base:5.2f}x" if base else "   --"
    return (
        f"  {name:<52} {m['s']:6.2f}s {ratio}  429s {m['429s']:5.0f} ({m['share']:6.1%})  "
        f"mean in flight {m['in_flight']:5.1f}  min limit {m['min_limit']:5.1f}  server peak {m['peak']:3.0f}"
    )


async def main(args: argparse.Namespace) -> None:
    sc = load_scenarios()
    n, lat, rep = args.requests, args.latency, args.repeat

    async def med(
        rules: dict[str, Any], workers: int, make: Callable[[], Any], count: int = n, latency: float = lat
    ) -> dict[str, float]:
        return median_of([await measure(sc, rules, latency, count, workers, make) for _ in range(rep)])

    old = old_throttle()
    print(f"{n} requests, {lat * 1000:.0f} ms streams, medians of {rep}")
    print("1. 3% random 429s (Retry-After 50 ms), 50 workers")
    noisy = {"random_429": 0.03}
    clean = await med({}, 50, lambda: Throttle(50, **NO_BUCKETS))
    print(row("clean (no 429s)", clean, None))
    print(row("3% 429s, Throttle(50)", await med(noisy, 50, lambda: Throttle(50, **NO_BUCKETS)), clean["s"]))
    if old is not None:
        print(row("3% 429s, the rule before issue 10", await med(noisy, 50, lambda: old(50)), clean["s"]))

    print("2. a 50-stream key (429 above 50 open streams)")
    key = {"max_active": 50}
    fifty = await med(key, 50, lambda: Throttle(50, **NO_BUCKETS))
    print(row("50 workers, Throttle(50)", fifty, None))
    cases: list[tuple[str, Callable[[], Any]]] = [
        ("200 workers, Throttle(200) (key ceiling 50)", lambda: Throttle(200, **NO_BUCKETS)),
        ("200 workers, Throttle(200, key_concurrency=None)", lambda: Throttle(200, key_concurrency=None, **NO_BUCKETS)),
    ]
    if old is not None:
        cases.append(("200 workers, the rule before issue 10 (no ceiling)", lambda: old(200)))
    for name, make in cases:
        print(row(name, await med(key, 200, make), fifty["s"]))

    k = args.time_scale
    rpm_window, burst_window = 60.0 / k, 10.0 / k
    buckets = [(600, 600 / rpm_window), (200, 200 / burst_window)]
    m = args.bucket_requests
    floor = max(0.0, (m - 600) / (600 / rpm_window), (m - 200) / (200 / burst_window))
    print(
        f"3. the key buckets (600 per {rpm_window:g} s, 200 per {burst_window:g} s), "
        f"{m} requests, 50 workers, 1 ms streams"
    )
    rules = {"buckets": buckets}
    known = await med(rules, 50, lambda: Throttle(50, rate_window_s=rpm_window, burst_window_s=burst_window), m, 0.001)
    blind = await med(rules, 50, lambda: Throttle(50, **NO_BUCKETS), m, 0.001)
    print(f"  the buckets' own minimum: {floor:.2f}s")
    print(row("client knows the buckets (the default)", known, floor or None))
    print(row("client blind to them (key_rpm=None, key_burst_10s=None)", blind, floor or None))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--time-scale", type=float, default=20.0, help="shrink the buckets' windows this many times")
    parser.add_argument("--bucket-requests", type=int, default=1500)
    asyncio.run(main(parser.parse_args()))
