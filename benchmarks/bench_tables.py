"""Prompts from tables in flat memory: peak RSS of validating a Parquet table of 100k vs N rows.

Writes Parquet tables (``id``, ``question``, ``category``, ``score``; 100k-row row groups) with
pyarrow's writer a row group at a time, then validates each in its own subprocess, as
``batchgate validate TABLE --prompt ... --id-column id`` does (Jinja2 render per row, id hashes,
duplicate check), and reads its peak RSS from the kernel (``wait4`` rusage ``ru_maxrss``).  What
grows with the input is 8 bytes per row (the id hashes the duplicate check needs): the ratio of
the two peaks should stay near 1 while the rows grow 100 times.

    python benchmarks/bench_tables.py [--sizes 100000,10000000] [--budget-s 120]

The largest size is cut to what fits the time budget at the speed measured on the first size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench_cpu import repo_env, run_measured

ROW_GROUP = 100_000
TEMPLATE = "Category: {{ category }}\nQuestion {{ id }}: {{ question }}\nAnswer in one sentence."

VALIDATE = """
import json, sys, time
import jinja2.sandbox, pyarrow.parquet  # imported before the clock: the figure is per row
from batchgate import jobs, tables
t0 = time.perf_counter()
report = jobs.validate([sys.argv[1]], default_model="m", template=sys.argv[2], id_column="id")
wall = time.perf_counter() - t0
assert report.ok(), report.format()
print(json.dumps({"records": report.records, "prompt_chars": report.prompt_chars, "validate_s": wall}))
"""


def write_table(path: Path, rows: int) -> None:
    """A Parquet table of ``rows`` rows, written a row group at a time (the writer's memory stays flat too)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    categories = pa.array(["geography", "arithmetic", "history", "science"])
    schema = pa.schema(
        [("id", pa.int64()), ("question", pa.string()), ("category", pa.string()), ("score", pa.float64())]
    )
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, ROW_GROUP):
            n = min(ROW_GROUP, rows - start)
            ids = pa.array(range(start, start + n), pa.int64())
            question = pa.array([f"What is {i} squared, and is it even?" for i in range(start, start + n)])
            category = categories.take(pa.array([i % 4 for i in range(n)]))
            score = pa.array([i / 7 for i in range(n)], pa.float64())
            writer.write_table(pa.table([ids, question, category, score], schema=schema), row_group_size=ROW_GROUP)


def measure(path: Path) -> dict[str, float]:
    cmd = [sys.executable, "-c", VALIDATE, str(path), TEMPLATE]
    returncode, stdout, stderr, wall, usage = run_measured(cmd, repo_env())
    if returncode != 0:
        raise RuntimeError(f"validation exited {returncode}:\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    return result | {"wall_s": wall, "peak_mb": usage.ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,10000000", help="row counts; the first is the baseline")
    parser.add_argument("--budget-s", type=float, default=150.0, help="seconds the largest validation may take")
    parser.add_argument("--keep", action="store_true", help="keep the tables (prints where)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench-tables-"))
    try:
        results: dict[int, dict[str, float]] = {}
        for i, n in enumerate(sizes):
            if i > 0:  # what fits the budget at the baseline's speed (plus the writing, ~3x faster)
                per_row = results[sizes[0]]["validate_s"] / sizes[0]
                fits = int(args.budget_s / per_row) // ROW_GROUP * ROW_GROUP
                if fits < n:
                    print(f"{n:,} rows would take ~{n * per_row:,.0f} s; measuring {fits:,} rows instead")
                    n = max(fits, sizes[0])
            path = tmp / f"table-{n}.parquet"
            t0 = time.perf_counter()
            write_table(path, n)
            written = time.perf_counter() - t0
            r = results[n] = measure(path)
            if r["records"] != n:
                raise RuntimeError(f"{r['records']} records for {n} rows")
            print(
                f"{n:>12,} rows  {path.stat().st_size / 1e6:8.1f} MB parquet (written in {written:5.1f} s)  "
                f"validate {r['validate_s']:7.1f} s  {r['validate_s'] / n * 1e6:5.1f} µs/row  "
                f"peak RSS {r['peak_mb']:7.1f} MB"
            )
            if i > 0:
                sizes[i] = n
        small, big = results[sizes[0]], results[sizes[-1]]
        print(
            f"peak RSS ratio {sizes[-1]:,} / {sizes[0]:,} rows: {big['peak_mb'] / small['peak_mb']:.2f} "
            f"(+{big['peak_mb'] - small['peak_mb']:.1f} MB for {sizes[-1] / sizes[0]:.0f}x the rows; "
            f"the id hashes alone are {8 * sizes[-1] / 2**20:.1f} MB)"
        )
        if args.keep:
            print(f"tables kept in {tmp}")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
