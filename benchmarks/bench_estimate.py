"""Accuracy of ``batchgate estimate`` (issue 6): estimated vs. actual cost, and 95% interval coverage.

On the in-process simulator, with ``--prompts`` (10,000) varied prompts in two prompt files (jobs
``chat`` and ``summarize``) over two models, prompt lengths log-normal from ~10 to 8,000 chars and
``max_tokens`` drawn from {16, 32, 64, 128, 256, 512, unset} per line:

1. **The actual cost**: one full run of every prompt (``Runner``), its ledger and the simulator's bill.
2. **Estimates over ``--seeds`` (50) seeds**, for ``--sample`` 200 and a 1% sample (100).  The
   simulator is deterministic per request (same prompt, same answer, same cost), so the answer a
   sample would buy is the row the full run already wrote: each seed's estimate is computed from the
   full run's ledger rows of the sampled prompts, with the same functions ``estimate()`` uses
   (``reservoir_sample`` over the records, ``Population`` tallied in that pass,
   ``read_sample_rows``, ``project``).  Only the latencies differ from a real sample run.
3. **End to end**, ``--real-seeds`` (3) seeds of ``estimate()`` for real, each into its own output
   directory against a fresh simulator: the cost figures must equal the offline ones for the same
   seed exactly; then a full ``Runner`` on the first of those directories, to show that the
   simulator bills the sampled prompts once only and that the resumed run costs what step 1 cost.

Reports, per sample size: mean and RMS relative error, the largest one, the share of seeds within
5%, the share whose 95% interval covers the actual total (and the mean interval half-width), and
the RMS error of the plain expansion estimator (N × mean cost of the sample) for comparison.

    python benchmarks/bench_estimate.py [--prompts 10000] [--seeds 50] [--real-seeds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from batchgate import jobs  # noqa: E402
from batchgate.config import RunConfig  # noqa: E402
from batchgate.estimate import Population, estimate, project, read_sample_rows, reservoir_sample  # noqa: E402
from batchgate.ledger import LEDGER_NAME  # noqa: E402
from batchgate.runner import Runner  # noqa: E402
from batchgate.simulator import SimulatorConfig, running_simulator  # noqa: E402

MODELS = ("Qwen/Qwen3-235B-A22B-Instruct-2507-FP8", "meta-llama/Llama-3.3-70B-Instruct")
CAPS = (16, 32, 64, 128, 256, 512, None)
WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "mu")
SIM: dict[str, Any] = dict(seed=1, max_completion_tokens=512, first_token_delay_s=0.05)  # 50 ms of server think time


def write_prompts(folder: Path, n: int, seed: int = 42) -> list[Path]:
    """Two prompt files of varied lengths, models and max_tokens; returns their paths."""
    rng = random.Random(seed)
    paths = [folder / "chat.jsonl", folder / "summarize.jsonl"]
    files = [p.open("w") for p in paths]
    try:
        for i in range(n):
            job = 1 if i % 3 == 0 else 0  # a third are long summaries
            model = MODELS[0] if rng.random() < 0.6 else MODELS[1]
            chars = int(min(8000, max(10, rng.lognormvariate(math.log(1200 if job else 300), 1.0))))
            line: dict[str, Any] = {
                "id": f"{'sc'[job == 0]}{i}",
                "model": model,
                "prompt": " ".join(rng.choices(WORDS, k=chars // 5 + 1))[:chars],
            }
            cap = rng.choice(CAPS)
            if cap is not None:
                line["max_tokens"] = cap
            files[job].write(orjson.dumps(line).decode() + "\n")
    finally:
        for f in files:
            f.close()
    return paths


def config(out: Path, url: str, concurrency: int) -> RunConfig:
    return RunConfig(
        out_dir=out,
        api_key="gp-bench",
        base_url=url,
        concurrency=concurrency,
        check_models=False,
        key_concurrency=None,
        key_rpm=None,
        key_burst_10s=None,
    )


def summarise(errors: list[float], covered: list[bool], halfwidths: list[float], naive: list[float]) -> dict[str, Any]:
    return {
        "seeds": len(errors),
        "mean_error": statistics.fmean(errors),
        "rms_error": math.sqrt(statistics.fmean(e * e for e in errors)),
        "max_abs_error": max(abs(e) for e in errors),
        "within_5pct": sum(abs(e) <= 0.05 for e in errors) / len(errors),
        "coverage": sum(covered) / len(covered),
        "mean_halfwidth": statistics.fmean(halfwidths),
        "naive_rms_error": math.sqrt(statistics.fmean(e * e for e in naive)),
    }


async def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=10_000)
    ap.add_argument("--seeds", type=int, default=50)
    ap.add_argument("--samples", type=int, nargs="+", default=[200, 100])
    ap.add_argument("--real-seeds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--verbose", action="store_true", help="one line per seed")
    args = ap.parse_args(argv)
    report: dict[str, Any] = {"prompts": args.prompts}

    with tempfile.TemporaryDirectory(prefix="bench-estimate-") as tmp:
        folder = Path(tmp)
        inputs = write_prompts(folder, args.prompts)

        # 1. The actual cost.
        full_out = folder / "full"
        async with running_simulator(SimulatorConfig(**SIM)) as sim:
            t0 = time.monotonic()
            full = await Runner(inputs, config(full_out, sim.base_url, args.concurrency)).run()
            wall = time.monotonic() - t0
            billed = sim.billing.completed_total_usd()
        assert full.ok == args.prompts and full.failed == 0, full
        actual = full.total_cost_usd
        assert abs(actual - billed) < 1e-9, (actual, billed)
        print(
            f"full run: {full.ok:,} prompts, ${actual:.6f} (billed ${billed:.6f}), {wall:.1f}s at concurrency "
            f"{args.concurrency}"
        )
        report.update(actual_usd=actual, full_run_wall_s=wall)

        # 2. Estimates over many seeds, from the full run's ledger rows of each sample.
        records = list(jobs.iter_records(inputs, default_model=None))
        population = Population()
        for rec in records:
            population.add_record(rec)
        offline: dict[tuple[int, int], Any] = {}
        report["samples"] = {}
        for k in args.samples:
            errors, covered, halfwidths, naive = [], [], [], []
            t0 = time.monotonic()
            for seed in range(args.seeds):
                drawn = reservoir_sample(records, k, seed)
                rows = read_sample_rows(full_out / LEDGER_NAME, drawn)
                p = project(rows, population, concurrency=args.concurrency, seed=seed)
                assert p.total is not None and p.total.cost_low_usd is not None and p.total.cost_high_usd is not None
                offline[(k, seed)] = p.total
                err = p.total.cost_usd / actual - 1
                errors.append(err)
                covered.append(p.total.cost_low_usd <= actual <= p.total.cost_high_usd)
                halfwidths.append((p.total.cost_high_usd - p.total.cost_low_usd) / 2 / p.total.cost_usd)
                naive.append(args.prompts * math.fsum(r.cost_usd for r in rows) / len(rows) / actual - 1)
                if args.verbose:
                    lo, hi = p.total.cost_low_usd, p.total.cost_high_usd
                    mark = "ok" if covered[-1] else "MISS"
                    print(
                        f"  n={k} seed={seed:2d}: ${p.total.cost_usd:.6f} ({err:+.2%}), 95% [{lo:.6f}, {hi:.6f}] {mark}"
                    )
            s = summarise(errors, covered, halfwidths, naive)
            s["seconds_per_projection"] = (time.monotonic() - t0) / args.seeds
            report["samples"][str(k)] = s
            print(
                f"sample {k} ({k / args.prompts:.1%}) over {s['seeds']} seeds: error mean {s['mean_error']:+.2%}, "
                f"RMS {s['rms_error']:.2%}, max {s['max_abs_error']:.2%}; within 5%: {s['within_5pct']:.0%}; "
                f"95% interval covers the actual total in {s['coverage']:.0%} (mean half-width "
                f"{s['mean_halfwidth']:.2%}); plain N x mean RMS {s['naive_rms_error']:.2%}"
            )

        # 3. End to end through estimate(), then the full run resuming from the first estimate.
        k = args.samples[0]
        real = []
        async with running_simulator(SimulatorConfig(**SIM)) as sim:
            for seed in range(args.real_seeds):
                out = folder / f"estimate-{seed}"
                result = await estimate(inputs, config(out, sim.base_url, args.concurrency), sample=k, seed=seed)
                t = result.projection.total
                assert t is not None and result.exit_code == 0
                same = offline.get((k, seed))
                if same is not None:
                    assert (t.cost_usd, t.cost_low_usd, t.cost_high_usd) == (
                        same.cost_usd,
                        same.cost_low_usd,
                        same.cost_high_usd,
                    ), "estimate() and the offline projection disagree"
                real.append(
                    {
                        "seed": seed,
                        "cost_usd": t.cost_usd,
                        "error": t.cost_usd / actual - 1,
                        "low": t.cost_low_usd,
                        "high": t.cost_high_usd,
                        "remaining_wall_s": result.projection.remaining_wall_s,
                        "bought": result.summary.ok,
                    }
                )
                if seed == 0:
                    print(result.table)
            first_out = folder / "estimate-0"
            sampled_billing = sim.billing.completed_count_by_client_id()
        async with running_simulator(SimulatorConfig(**SIM)) as sim:
            resumed = await Runner(inputs, config(first_out, sim.base_url, args.concurrency)).run()
            after = sim.billing.completed_count_by_client_id()
        first_ids = {r.id for r in reservoir_sample(records, k, 0)}
        assert resumed.skipped == k and not (first_ids & set(after)), "a sampled answer was bought again"
        assert set(after.values()) == {1} and sum(after.values()) == args.prompts - k
        ledger = [orjson.loads(line) for line in (first_out / LEDGER_NAME).read_bytes().splitlines()]
        resumed_total = math.fsum(r["total_cost_usd"] for r in ledger if r["status"] == "ok")
        assert abs(resumed_total - actual) < 1e-9, (resumed_total, actual)
        assert sum(sampled_billing.values()) == k * args.real_seeds
        for r in real:
            print(
                f"estimate() seed {r['seed']}: ${r['cost_usd']:.6f} ({r['error']:+.2%}), 95% [{r['low']:.6f}, "
                f"{r['high']:.6f}], bought {r['bought']}, remaining wall ~{r['remaining_wall_s']:.1f}s "
                f"(the full run took {wall:.1f}s)"
            )
        print(
            f"estimate then run on one --out: {k} sampled answers reused, {sum(after.values()):,} bought, each once; "
            f"ledger total ${resumed_total:.6f} = the full run's"
        )
        report["end_to_end"] = real
    if args.json:
        args.json.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    return report


if __name__ == "__main__":
    asyncio.run(main())
