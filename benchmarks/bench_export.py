"""Export and status over a big synthetic ledger: wall time and peak RSS, each in its own process.

Writes N prompts and a ledger of N realistic v2 rows (~300-char answers, every 50th id failed
first then ok, 2 samples for every 10th id), then runs ``batchgate export`` to each format and
``batchgate status`` as subprocesses and reads each one's peak RSS from the kernel (``wait4``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parents[1]
WORDS = [
    "latency",
    "ocean",
    "ledger",
    "violet",
    "mountain",
    "answer",
    "river",
    "server",
    "glacier",
    "window",
    "crimson",
]


def write_inputs(d: Path, n: int) -> tuple[Path, Path]:
    prompts, out = d / "prompts.jsonl", d / "out"
    out.mkdir()
    run = "20261201T000000Z-bench0"
    with open(prompts, "wb") as p, open(out / "results.jsonl", "wb") as led:
        buf_p, buf_l = [], []
        for i in range(n):
            rid = f"row-{i:08d}"
            buf_p.append(orjson.dumps({"id": rid, "prompt": f"Summarise item {i}: " + WORDS[i % 11] * 8}) + b"\n")
            samples = 2 if i % 10 == 0 else 1
            for s in range(samples):
                if i % 50 == 0 and s == 0:
                    buf_l.append(orjson.dumps(_row(rid, s, run, "failed")) + b"\n")
                buf_l.append(orjson.dumps(_row(rid, s, run, "ok")) + b"\n")
            if len(buf_p) >= 10_000:
                p.write(b"".join(buf_p))
                led.write(b"".join(buf_l))
                buf_p, buf_l = [], []
        p.write(b"".join(buf_p))
        led.write(b"".join(buf_l))
    return prompts, out


def _row(rid: str, sample: int, run: str, status: str) -> dict[str, object]:
    ok = status == "ok"
    return {
        "v": 2,
        "id": rid,
        "sample": sample,
        "job": "bench",
        "run_id": run,
        "model": "Qwen/Qwen3-32B-FP8",
        "status": status,
        "content": " ".join(WORDS[(len(rid) + k) % 11] for k in range(40)) if ok else "",
        "finish_reason": "stop" if ok else None,
        "prompt_tokens": 20,
        "completion_tokens": 60,
        "total_tokens": 80,
        "base_cost_usd": 0.00004,
        "platform_fee_usd": 0.000004,
        "total_cost_usd": 0.000044 if ok else 0.0,
        "unconfirmed_completion_tokens": 0,
        "unconfirmed_cost_usd": 0.0,
        "attempts": 1,
        "retry_causes": [],
        "started_at": "2026-12-01T00:00:00.000Z",
        "ttft_s": 0.1,
        "latency_s": 0.5,
        "error": None if ok else {"type": "server_error", "status": 500, "message": "boom"},
        "request_id": f"req-{rid}-{sample}",
        "cost_status": "confirmed",
        "reasoning": None,
        "tool_calls": None,
        "meta": {"row": rid},
    }


def measure(args: list[str]) -> tuple[float, float, float, int]:
    """(wall s, CPU s, peak RSS MiB, exit code) of one command (CPU is the steadier figure on a busy host)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if proc.stderr:
        err = proc.stderr.read().decode()
        proc.stderr.close()
        if err.strip():
            print(err, file=sys.stderr)
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000, help="prompts (the ledger has ~1.12 rows each)")
    ap.add_argument("--formats", default="chat-jsonl,parquet,openai-batch,hf")
    ap.add_argument("--keep", action="store_true")
    opts = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="bench-export-"))
    try:
        t0 = time.perf_counter()
        prompts, out = write_inputs(d, opts.rows)
        size = (out / "results.jsonl").stat().st_size
        print(f"wrote {opts.rows:,} prompts, a {size / 2**20:.0f} MiB ledger in {time.perf_counter() - t0:.1f}s")
        py = [sys.executable, "-m", "batchgate"]
        floor = measure([sys.executable, "-c", "import batchgate.cli, batchgate.export"])
        print(f"{'command':<28} {'wall s':>8} {'CPU s':>8} {'peak RSS MiB':>13}")
        print(f"{'(imports only)':<28} {floor[0]:>8.1f} {floor[1]:>8.1f} {floor[2]:>13.0f}")
        for fmt in opts.formats.split(","):
            to = d / f"export.{fmt}"
            cmd = [*py, "export", str(out), "--format", fmt, "--to", str(to), "--inputs", str(prompts)]
            wall, cpu, rss, code = measure(cmd)
            assert code == 0, f"export {fmt} exited {code}"
            print(f"{'export --format ' + fmt:<28} {wall:>8.1f} {cpu:>8.1f} {rss:>13.0f}")
        wall, cpu, rss, code = measure([*py, "status", str(out), "--json"])
        assert code == 0
        print(f"{'status':<28} {wall:>8.1f} {cpu:>8.1f} {rss:>13.0f}")
    finally:
        if opts.keep:
            print(f"kept {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
