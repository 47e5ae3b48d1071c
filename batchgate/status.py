"""Where is my run? Progress, spend and health of an output directory, from its files alone.

No network and no lock taken: ``batchgate status`` is safe to run while a run writes, from cron or
a shell on another host over a shared disk.  It streams the ledger (8 bytes per ok row, 16 per
failed row: the only state that grows), reads the newest run file for the total, and sums the
``shard-K-of-N/`` subdirectories of a parent directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from .errors import InputError
from .ledger import (
    INTENTS_DIR,
    LEDGER_NAME,
    LOCK_NAME,
    SPILL_NAME,
    complete_end,
    open_attempts,
    read_possibly_billed,
)

__all__ = [
    "RunFile",
    "Status",
    "find_output_dirs",
    "format_status",
    "is_shard_dir",
    "lock_holder",
    "read_run_file",
    "status",
]

_SHARD_DIR = re.compile(r"^shard-(\d+)-of-(\d+)$")


# -- where the outputs are -----------------------------------------------------------------------


def find_output_dirs(out: str | Path) -> list[Path]:
    """``out`` itself when it is a run's output directory, else its ``shard-K-of-N/`` subdirectories.

    Raises ``InputError`` when ``out`` is missing or holds neither.
    """
    path = Path(out)
    if not path.is_dir():
        raise InputError(f"{out}: no such directory")
    if (path / LEDGER_NAME).exists():
        return [path]
    shards = sorted(
        (p for p in path.iterdir() if p.is_dir() and _SHARD_DIR.match(p.name)),
        key=lambda p: tuple(int(x) for x in _SHARD_DIR.match(p.name).groups()),  # type: ignore[union-attr]
    )
    if shards:
        return shards
    if _is_output_dir(path):
        return [path]  # a run that has not written its first row yet
    raise InputError(f"{out}: not a batchgate output directory (no {LEDGER_NAME}, run file or shard-K-of-N/)")


def is_shard_dir(path: str | Path) -> bool:
    """Whether ``path`` is one ``shard-K-of-N/`` directory of a sharded run."""
    return bool(_SHARD_DIR.match(Path(path).name))


def _is_output_dir(path: Path) -> bool:
    return any((path / name).exists() for name in (LEDGER_NAME, "run.json", "runs", LOCK_NAME, INTENTS_DIR))


# -- the run file -----------------------------------------------------------------------------------


@dataclass(slots=True)
class RunFile:
    """What the newest run file says: inputs and the settings that shaped the requests sent.

    Read from ``<out>/runs/<run_id>.json`` (newest name first: run ids start with a UTC
    timestamp) or ``<out>/run.json``; ``{"config": {...}, "inputs": [...], "total": N, ...}``.
    Every field is optional: an older run file holds only the summary.
    """

    path: Path | None = None
    inputs: list[str] = field(default_factory=list)
    default_model: str | None = None
    chat_defaults: dict[str, Any] = field(default_factory=dict)
    system_prompt: str | None = None
    jobs: list[str] | None = None
    template: str | Path | None = None  # a Path when the run's template was a file
    system_template: str | Path | None = None
    id_column: str | None = None
    strict: bool = False
    total: int | None = None  # rows the run set out to write (prompts x samples), when known
    run_id: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)


def read_run_file(out_dir: str | Path) -> RunFile:
    """The newest readable run file of one output directory; an empty RunFile when there is none."""
    out = Path(out_dir)
    candidates = sorted((out / "runs").glob("*.json"), reverse=True) if (out / "runs").is_dir() else []
    candidates.append(out / "run.json")
    for path in candidates:
        try:
            data = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            continue
        if isinstance(data, dict):
            return _run_file(path, data)
    return RunFile()


def _run_file(path: Path, data: dict[str, Any]) -> RunFile:
    config: dict[str, Any] = _obj(data.get("config"))
    summary: dict[str, Any] = _obj(data.get("summary")) or data

    def pick(key: str) -> Any:
        return config.get(key, data.get(key))

    inputs = pick("inputs") or []
    base = path.parent.parent if path.parent.name == "runs" else path.parent
    resolved = [str(base / p) if not Path(p).exists() and (base / p).exists() else str(p) for p in inputs]
    total = pick("total")
    if total is None:
        total = summary.get("total")
    return RunFile(
        path=path,
        inputs=resolved,
        default_model=pick("default_model"),
        chat_defaults=dict(pick("chat_defaults") or {}),
        system_prompt=pick("system_prompt"),
        jobs=pick("jobs"),
        template=_template(pick("template"), base),
        system_template=_template(pick("system_template"), base),
        id_column=pick("id_column"),
        strict=bool(pick("strict")),
        total=total if isinstance(total, int) and not isinstance(total, bool) else None,
        run_id=data.get("run_id") or summary.get("run_id"),
        summary=summary,
    )


def _template(value: Any, base: Path) -> str | Path | None:
    """A template as the run file keeps it: a string that names an existing file is that file."""
    if not isinstance(value, str | dict) or not value:
        return None
    if isinstance(value, dict):  # {"path": ...} or {"text": ...}, should the run file say which
        path, text = value.get("path"), value.get("text")
        return Path(path) if isinstance(path, str) else text if isinstance(text, str) else None
    if "{{" not in value and "{%" not in value and "\n" not in value:
        for candidate in (Path(value), base / value):
            if candidate.is_file():
                return candidate
    return value


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


# -- the lock ---------------------------------------------------------------------------------------


def lock_holder(out_dir: str | Path) -> tuple[bool, int | None]:
    """(held, pid): whether a run holds the directory's lock now, and the pid it wrote.

    Asks the kernel's lock table (``/proc/locks``) first, which takes nothing; elsewhere tries a
    non-blocking shared ``flock`` released at once (a run starting in that microsecond would see
    the directory locked and exit 4, so the table is preferred).
    """
    path = Path(out_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False, None
    try:
        pid = _pid_in(fd)
        held = _held_per_proc_locks(fd)
        if held is None:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                held = True
            else:
                fcntl.flock(fd, fcntl.LOCK_UN)
                held = False
        return held, pid if held else None
    finally:
        os.close(fd)


def _pid_in(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
    except (OSError, ValueError):
        return None


def _held_per_proc_locks(fd: int) -> bool | None:
    """True/False from /proc/locks for the file's inode; None when the table cannot be read."""
    st = os.fstat(fd)
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            table = f.read()
    except OSError:
        return None
    for line in table.splitlines():
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF" (blocked waiters have a "->" field)
        if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK":
            continue
        if parts[5] == want or parts[5].lower() == want:
            return True
    return False


# -- the status ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class Status:
    """One output directory's state, or the sum over shards (``shards`` > 0)."""

    out: str
    done: int = 0  # (id, sample) keys with an ok row
    failed: int = 0  # keys whose rows are all failed
    total: int | None = None  # from the run file(s); None when unknown
    rows: int = 0  # ledger rows (a key retried on resume has several)
    unreadable_lines: int = 0
    failures_by_cause: dict[str, int] = field(default_factory=dict)  # of the failed keys, latest cause
    confirmed_usd: float = 0.0
    unconfirmed_usd: float = 0.0
    possibly_billed_usd: float = 0.0  # worst case of attempts started (intents) with no row yet
    possibly_billed_attempts: int = 0
    possibly_billed_unpriced: int = 0  # of those, attempts whose worst case had no price yet
    in_flight: int = 0  # attempts of the live run sent and not finished yet
    cached: int = 0
    rate_per_s: float | None = None  # rows per second of the newest run
    eta_s: float | None = None  # only while a run holds the lock and the total is known
    running: bool = False
    pids: list[int] = field(default_factory=list)
    last_run_id: str | None = None
    last_row_at: str | None = None
    last_error: dict[str, Any] | None = None  # {id, sample, type, status, message, at}
    shards: int = 0
    shard_status: list[Status] = field(default_factory=list)

    @property
    def left(self) -> int | None:
        return None if self.total is None else max(0, self.total - self.done)

    def as_dict(self) -> dict[str, Any]:
        out = {
            "out": self.out,
            "done": self.done,
            "total": self.total,
            "left": self.left,
            "failed": self.failed,
            "rows": self.rows,
            "unreadable_lines": self.unreadable_lines,
            "failures_by_cause": dict(self.failures_by_cause),
            "spend": {
                "confirmed_usd": round(self.confirmed_usd, 9),
                "unconfirmed_usd": round(self.unconfirmed_usd, 9),
                "possibly_billed_usd": round(self.possibly_billed_usd, 9),
                "possibly_billed_attempts": self.possibly_billed_attempts,
                "possibly_billed_unpriced": self.possibly_billed_unpriced,
            },
            "in_flight": self.in_flight,
            "cached": self.cached,
            "rate_per_s": None if self.rate_per_s is None else round(self.rate_per_s, 3),
            "eta_s": None if self.eta_s is None else round(self.eta_s),
            "running": self.running,
            "pids": list(self.pids),
            "last_run_id": self.last_run_id,
            "last_row_at": self.last_row_at,
            "last_error": self.last_error,
            "shards": self.shards,
        }
        if self.shard_status:
            out["shard_status"] = [s.as_dict() for s in self.shard_status]
        return out


def status(out: str | Path) -> Status:
    """The status of one output directory, or of a parent holding ``shard-K-of-N/`` directories."""
    dirs = find_output_dirs(out)
    if len(dirs) == 1 and dirs[0] == Path(out):
        return _dir_status(dirs[0])
    parts = [_dir_status(d) for d in dirs]
    total = Status(out=str(out), shards=len(parts), shard_status=parts)
    totals_known = all(p.total is not None for p in parts)
    for p in parts:
        total.done += p.done
        total.failed += p.failed
        total.rows += p.rows
        total.unreadable_lines += p.unreadable_lines
        for cause, n in p.failures_by_cause.items():
            total.failures_by_cause[cause] = total.failures_by_cause.get(cause, 0) + n
        total.confirmed_usd += p.confirmed_usd
        total.unconfirmed_usd += p.unconfirmed_usd
        total.possibly_billed_usd += p.possibly_billed_usd
        total.possibly_billed_attempts += p.possibly_billed_attempts
        total.possibly_billed_unpriced += p.possibly_billed_unpriced
        total.in_flight += p.in_flight
        total.cached += p.cached
        total.running = total.running or p.running
        total.pids += p.pids
        if p.last_row_at and (total.last_row_at is None or p.last_row_at > total.last_row_at):
            total.last_row_at = p.last_row_at
            total.last_run_id = p.last_run_id
        if p.last_error and (
            total.last_error is None or (p.last_error.get("at") or "") > (total.last_error.get("at") or "")
        ):
            total.last_error = p.last_error
    total.total = sum(p.total or 0 for p in parts) if totals_known else None
    running = [p for p in parts if p.running and p.rate_per_s]
    total.rate_per_s = sum(p.rate_per_s or 0.0 for p in running) if running else None
    etas = [p.eta_s for p in parts if p.eta_s is not None]
    total.eta_s = max(etas) if etas else None  # the shards run side by side: the slowest decides
    return total


def _dir_status(out_dir: Path) -> Status:
    run = read_run_file(out_dir)
    st = Status(out=str(out_dir), total=run.total)
    st.running, pid = lock_holder(out_dir)
    if pid is not None:
        st.pids.append(pid)
    scan = _Scan()
    for ledger in (out_dir / LEDGER_NAME, out_dir / SPILL_NAME):  # spilled rows: a full disk refused them
        if ledger.exists():
            _scan_ledger(ledger, scan)
    st.rows, st.unreadable_lines, st.cached = scan.rows, scan.unreadable, scan.cached
    st.confirmed_usd, st.unconfirmed_usd = scan.confirmed, scan.unconfirmed
    st.last_error, st.last_row_at = scan.last_error, scan.last_row_at
    st.last_run_id = scan.last_run_id or run.run_id
    st.done, st.failed, st.failures_by_cause = scan.counts()
    _add_possibly_billed(st, out_dir)
    span = scan.runs.get(st.last_run_id or "")
    if span is not None and span[2] > span[0] and span[1] >= 2:
        st.rate_per_s = span[1] / (span[2] - span[0])
    if st.running and st.rate_per_s and st.left is not None:
        st.eta_s = st.left / st.rate_per_s
    return st


class _Scan:
    """Running state of one pass over a ledger."""

    def __init__(self) -> None:
        self.rows = self.unreadable = self.cached = 0
        self.confirmed = self.unconfirmed = 0.0
        self.ok_keys = array("Q")
        self.failed_keys = array("Q")
        self.failed_causes = array("H")
        self.cause_names: dict[str, int] = {}
        self.runs: dict[str, list[float]] = {}  # run_id -> [first start, rows, last finish] (epoch s)
        self.last_run_id: str | None = None
        self.last_row_at: str | None = None
        self.last_error: dict[str, Any] | None = None

    def counts(self) -> tuple[int, int, dict[str, int]]:
        """(done keys, failed keys, latest cause per failed key)."""
        ok = np.unique(np.frombuffer(self.ok_keys, dtype=np.uint64))
        if not len(self.failed_keys):
            return len(ok), 0, {}
        keys = np.frombuffer(self.failed_keys, dtype=np.uint64)
        causes = np.frombuffer(self.failed_causes, dtype=np.uint16)
        # The latest row of each key: sort by key keeping row order, take each group's last.
        order = np.argsort(keys, kind="stable")
        keys, causes = keys[order], causes[order]
        last = np.append(keys[1:] != keys[:-1], True)
        keys, causes = keys[last], causes[last]
        if len(ok):
            at = np.minimum(np.searchsorted(ok, keys), len(ok) - 1)
            still_failed = ok[at] != keys
            keys, causes = keys[still_failed], causes[still_failed]
        names = {i: name for name, i in self.cause_names.items()}
        values, counts = np.unique(causes, return_counts=True)
        by_cause = {names[int(v)]: int(c) for v, c in zip(values, counts, strict=True)}
        return len(ok), len(keys), dict(sorted(by_cause.items(), key=lambda kv: (-kv[1], kv[0])))


def _scan_ledger(path: Path, scan: _Scan) -> None:
    loads = orjson.loads
    for line in _complete_lines(path):
        try:
            row = loads(line)
            rid = row["id"]
            ok = row["status"] == "ok"
        except (orjson.JSONDecodeError, KeyError, TypeError):
            if line.strip():
                scan.unreadable += 1
            continue
        scan.rows += 1
        sample = row.get("sample") or 0
        key = _key64(rid, sample)
        run_id = row.get("run_id") or ""
        if ok:
            scan.ok_keys.append(key)
        else:
            err = row.get("error") or {}
            cause = (err.get("type") if isinstance(err, dict) else None) or "unknown"
            scan.failed_keys.append(key)
            scan.failed_causes.append(scan.cause_names.setdefault(cause, len(scan.cause_names)))
            scan.last_error = {
                "id": rid,
                "sample": sample,
                "type": cause,
                "status": err.get("status") if isinstance(err, dict) else None,
                "message": err.get("message") if isinstance(err, dict) else None,
                "at": row.get("started_at"),
                "run_id": run_id or None,
            }
        cost = row.get("total_cost_usd") or 0.0
        if row.get("cost_status") == "unconfirmed":
            scan.unconfirmed += cost
        else:
            scan.confirmed += cost
        scan.unconfirmed += row.get("unconfirmed_cost_usd") or 0.0
        if row.get("cached"):
            scan.cached += 1
        _time_row(scan, row, run_id)


def _time_row(scan: _Scan, row: dict[str, Any], run_id: str) -> None:
    started = row.get("started_at")
    if not isinstance(started, str):
        return
    try:
        t0 = datetime.fromisoformat(started).timestamp()
    except ValueError:
        return
    t1 = t0 + (row.get("latency_s") or 0.0)
    span = scan.runs.get(run_id)
    if span is None:
        scan.runs[run_id] = [t0, 1, t1]
    else:
        span[0] = min(span[0], t0)
        span[1] += 1
        span[2] = max(span[2], t1)
    scan.last_run_id = run_id or scan.last_run_id
    finished = datetime.fromtimestamp(t1, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    if scan.last_row_at is None or finished > scan.last_row_at:
        scan.last_row_at = finished


def _add_possibly_billed(st: Status, out_dir: Path) -> None:
    """Attempts sent that never ended in a row: recorded ones, crashed runs' leftovers, and those in flight.

    ``possibly_billed.jsonl`` holds what earlier runs resolved; an ``intents/<run_id>.jsonl`` is
    the log of a run still going (its open attempts are in flight now) or of one that died and
    that no run has resolved yet (its open attempts count as possibly billed).
    """
    recorded = read_possibly_billed(out_dir)
    st.possibly_billed_attempts += recorded.attempts
    st.possibly_billed_usd += recorded.usd
    st.possibly_billed_unpriced += recorded.unpriced
    logs = sorted((out_dir / INTENTS_DIR).glob("*.jsonl")) if (out_dir / INTENTS_DIR).is_dir() else []
    for n, log in enumerate(logs):
        left = open_attempts(_complete_lines(log))  # a live run may be appending: whole lines only
        if st.running and n == len(logs) - 1:  # the live run's own log (run ids sort by start time)
            st.in_flight += left.attempts
        else:
            st.possibly_billed_attempts += left.attempts
            st.possibly_billed_usd += left.usd
            st.possibly_billed_unpriced += left.unpriced


def _complete_lines(path: Path) -> Iterator[bytes]:
    """The lines of a JSONL file a writer may be appending to, up to the last complete one."""
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
        end = complete_end(f, f.seek(0, os.SEEK_END))
        f.seek(0)
        pos = 0
        for line in f:
            pos += len(line)
            if pos > end:
                return
            yield line


def _key64(rid: Any, sample: Any) -> int:
    text = f"{rid}\x00{sample}"
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def format_status(st: Status) -> str:
    """The human-readable block ``batchgate status`` prints."""
    total = f"{st.total:,}" if st.total is not None else "?"
    pct = f" ({100 * st.done / st.total:.1f}%)" if st.total else ""
    state = f"running (pid {', '.join(map(str, st.pids))})" if st.running else "not running"
    lines = [
        f"{st.out}: {state}" + (f", {st.shards} shards" if st.shards else ""),
        f"  prompts   {st.done:,} / {total} done{pct}, {st.failed:,} failed"
        + (f", {st.cached:,} from cache" if st.cached else ""),
    ]
    if st.failures_by_cause:
        lines.append("  failures  " + ", ".join(f"{k} {v}" for k, v in st.failures_by_cause.items()))
    spend = f"  spend     ${st.confirmed_usd:.6f} confirmed"
    if st.unconfirmed_usd:
        spend += f", ~${st.unconfirmed_usd:.6f} unconfirmed"
    if st.possibly_billed_attempts:
        spend += (
            f", up to ${st.possibly_billed_usd:.6f} possibly billed"
            f" ({st.possibly_billed_attempts} attempts with no row)"
        )
    lines.append(spend)
    if st.in_flight:
        lines.append(f"  in flight {st.in_flight} attempts sent, not finished yet")
    if st.rate_per_s:
        eta = f", ETA {_duration(st.eta_s)}" if st.eta_s is not None else ""
        lines.append(f"  rate      {st.rate_per_s:.2f} prompts/s (run {st.last_run_id}){eta}")
    if st.last_row_at:
        lines.append(f"  last row  {st.last_row_at}")
    if st.last_error:
        e = st.last_error
        lines.append(f"  last error {e.get('type')} on {e.get('id')}: {e.get('message')}")
    if st.unreadable_lines:
        lines.append(f"  warning   {st.unreadable_lines} unreadable ledger lines")
    return "\n".join(lines)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
