"""What a resumed start may skip, so a rerun over millions of finished prompts starts at once.

Two shortcuts, both keyed by the identity of the inputs (path, device, inode, size and
modification time of every input and template file) and of everything that shapes the requests
(model, chat defaults, system prompt, schema, samples, shard, batchgate's version):

* **validation**: inputs unchanged since a run validated them are not validated again
  (``inputs.json``);
* **the done prefix**: every request before input position (input, line) was answered ``ok``
  when the last run ended, so the next one starts reading there; answers that finished beyond
  that point are kept apart (a few, since workers finish nearly in order) in the resume index.

A pipe or standard input has no identity: nothing is skipped for it.  Edit an input, or change
a setting that changes the requests, and both shortcuts are off for that run.

**Appended inputs** keep the done prefix: ``inputs.json`` also holds each input's size, time and
a digest of its bytes, so an input that only grew (same file, its old bytes intact and ending a
line) is known for the old file plus new lines.  The prefix saved under the old key then still
holds, as long as it stops at or before the first input that grew (new lines are read, never
skipped).  Only the new lines are validated: ``inputs.ids`` keeps the sorted id digests of the
lines validated before, so a new id is checked against them without reading the old lines.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import os
import stat
import sys
from array import array
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from .models import BATCHGATE_VERSION

__all__ = [
    "IDS_NAME",
    "VALIDATED_NAME",
    "Appended",
    "KnownIds",
    "Watermark",
    "appended_inputs",
    "file_states",
    "inputs_key",
    "load_known_ids",
    "load_validation",
    "save_validation",
]

VALIDATED_NAME = "inputs.json"
IDS_NAME = "inputs.ids"  # the validated inputs' id digests, sorted uint64 (8 bytes a prompt)


def _identity(path: str | os.PathLike[str]) -> list[Any] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None  # a pipe, a FIFO, a terminal: read once, never the same twice
    return [os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


def inputs_key(paths: list[Path], settings: dict[str, Any]) -> str | None:
    """A digest of the inputs' identity and the request-shaping settings; None when one cannot be had."""
    if len({str(p) for p in paths}) != len(paths):
        return None
    ids: list[Any] = []
    for p in paths:
        ident = None if str(p) == "-" else _identity(p)
        if ident is None:
            return None
        ids.append(ident)
    return _key_of(ids, settings)


def _key_of(ids: list[Any], settings: dict[str, Any]) -> str | None:
    shaped = dict(settings)
    for name in ("template", "system_template"):
        value = shaped.get(name)
        if isinstance(value, Path):
            ident = _identity(value)
            if ident is None:
                return None
            shaped[name] = ident
    doc = {"inputs": ids, "settings": shaped, "version": BATCHGATE_VERSION}
    return hashlib.blake2b(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS, default=str), digest_size=16).hexdigest()


_READ = 1 << 20


def _digest(path: Path, size: int, start: int = 0, h: Any = None) -> tuple[Any, bool, int]:
    """(blake2b state over bytes ``start``..``size`` (continuing ``h``), whether they are all there
    and end a line, how many lines they hold)."""
    h = h if h is not None else hashlib.blake2b(digest_size=16)
    done, last, lines = start, b"\n", 0
    with open(path, "rb") as f:
        f.seek(start)
        while done < size:
            piece = f.read(min(_READ, size - done))
            if not piece:
                break
            h.update(piece)
            lines += piece.count(b"\n")
            last = piece[-1:]
            done += len(piece)
    return h, done == size and last == b"\n", lines


def file_states(paths: list[Path]) -> list[dict[str, Any]] | None:
    """Each input's identity, size, time and digest (read once, for a first run or a changed input)."""
    states = []
    for p in paths:
        ident = None if str(p) == "-" else _identity(p)
        if ident is None:
            return None
        try:
            h, _, _ = _digest(p, ident[3])
        except OSError:
            return None
        states.append({"ident": ident, "digest": h.hexdigest()})
    return states


@dataclass(frozen=True, slots=True)
class Appended:
    """The inputs grew since the last run: its prefix (saved under ``old_key``) holds up to ``first_grown``."""

    old_key: str
    first_grown: int  # index of the first input with new lines
    states: list[dict[str, Any]]  # what the inputs are now, for this run's inputs.json
    starts: list[int | None]  # per input: its first new line (None: unchanged)
    validated: dict[str, Any]  # what the last run's validation found (inputs.json)


def appended_inputs(out_dir: Path, paths: list[Path], settings: dict[str, Any]) -> Appended | None:
    """Whether every input is the one the last run validated, some with lines appended, nothing else changed.

    Costs one read of each input that grew (its old bytes are hashed to check them, then the new
    ones to store the new digest); None at once when anything else changed.
    """
    doc = load_validation(out_dir, None, any_key=True)
    if doc is None or not isinstance(doc.get("files"), list) or len(doc["files"]) != len(paths):
        return None
    old_ids: list[Any] = []
    states: list[dict[str, Any]] = []
    starts: list[int | None] = [None] * len(paths)
    first_grown: int | None = None
    try:
        for i, (p, old) in enumerate(zip(paths, doc["files"], strict=True)):
            ident = None if str(p) == "-" else _identity(p)
            before = old.get("ident") if isinstance(old, dict) else None
            if ident is None or not isinstance(before, list) or len(before) != 5 or ident[:3] != before[:3]:
                return None
            old_ids.append(before)
            if ident[3:] == before[3:]:
                states.append(old)
                continue
            if ident[3] <= before[3]:
                return None  # same size or shorter, another time: rewritten
            h, whole, lines = _digest(p, int(before[3]))
            if not whole or h.hexdigest() != old.get("digest"):
                return None  # the old bytes changed, or did not end a line
            h, _, _ = _digest(p, ident[3], int(before[3]), h)
            states.append({"ident": ident, "digest": h.hexdigest()})
            starts[i] = lines + 1  # the old bytes end a line: the new ones begin the next
            first_grown = i if first_grown is None else first_grown
    except (OSError, ValueError, TypeError):
        return None
    if first_grown is None or _key_of(old_ids, settings) != doc.get("key"):
        return None  # nothing grew (another change), or the settings changed
    return Appended(str(doc["key"]), first_grown, states, starts, doc)


def load_validation(out_dir: Path, key: str | None, *, any_key: bool = False) -> dict[str, Any] | None:
    """The validation result a run stored for these very inputs (``any_key``: whatever they were), or None."""
    if key is None and not any_key:
        return None
    path = out_dir / VALIDATED_NAME
    try:
        if path.is_symlink():
            return None
        doc = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("records"), int):
        return None
    return doc if any_key or doc.get("key") == key else None


def save_validation(
    out_dir: Path,
    key: str | None,
    records: int,
    warnings: str,
    models: dict[str, Any],
    write: Any,
    files: list[dict[str, Any]] | None = None,
    ids: Iterable[bytes | memoryview] | None = None,
) -> None:
    """Remember that these inputs validated (``write`` is ``ledger.write_atomic``); ``files``: their
    states (:func:`file_states`), so that the next run can tell lines appended from an edit;
    ``ids``: the bytes of their sorted id digests (``inputs.ids``), so that it validates only the
    new lines."""
    if key is None:
        return
    doc: dict[str, Any] = {"key": key, "records": records, "warnings": warnings, "models": models}
    if files is not None:
        doc["files"] = files
    if files is not None and ids is not None:
        h = hashlib.blake2b(digest_size=16)
        size = 0

        def counted() -> Iterator[bytes | memoryview]:
            nonlocal size
            for piece in ids:
                h.update(piece)
                size += len(piece)
                yield piece

        with contextlib.suppress(OSError):
            write(out_dir / IDS_NAME, counted())
            doc["ids"] = {"n": size // 8, "digest": h.hexdigest(), "order": sys.byteorder}
    with contextlib.suppress(OSError):  # a convenience: the next run validates again
        write(out_dir / VALIDATED_NAME, orjson.dumps(doc))


_IDS_SMALL = 100_000  # up to this many known ids, a membership test reads them into a set
_IDS_CHUNK = 8 << 20  # bytes of known ids merged with the new ones at a time


@dataclass(frozen=True, slots=True)
class KnownIds:
    """The sorted id digests in ``inputs.ids``, read from the file as needed, never all held:
    at ten million prompts the file is 80 MB, and a resumed start stays in flat memory."""

    path: Path
    n: int

    def any_of(self, hashes: array[int]) -> bool:
        """Whether any of ``hashes`` is among them (a binary search of the file per digest)."""
        if not self.n or not len(hashes):
            return False
        if self.n <= _IDS_SMALL:
            known = array("Q")
            known.frombytes(self.path.read_bytes())
            return not set(known).isdisjoint(hashes)
        import numpy as np

        k = np.memmap(self.path, dtype=np.uint64, mode="r", shape=(self.n,))
        h = np.sort(np.frombuffer(hashes, dtype=np.uint64))
        at = np.minimum(np.searchsorted(k, h), self.n - 1)
        return bool((k[at] == h).any())

    def merged(self, new: array[int]) -> Iterator[bytes]:
        """Their bytes with the sorted ``new`` merged in, a chunk at a time."""
        import numpy as np

        fresh = np.frombuffer(new, dtype=np.uint64)
        with open(self.path, "rb") as f:
            while chunk := f.read(_IDS_CHUNK):
                old = np.frombuffer(chunk, dtype=np.uint64)
                cut = int(np.searchsorted(fresh, old[-1], side="right"))
                yield np.sort(np.concatenate([old, fresh[:cut]]), kind="stable").tobytes()
                fresh = fresh[cut:]
        yield fresh.tobytes()


def load_known_ids(out_dir: Path, validated: dict[str, Any]) -> KnownIds | None:
    """The id digests ``validated`` (an ``inputs.json``) vouches for, or None (none kept, damaged)."""
    meta = validated.get("ids")
    if not isinstance(meta, dict) or meta.get("order") != sys.byteorder or not isinstance(meta.get("n"), int):
        return None
    path = out_dir / IDS_NAME
    h = hashlib.blake2b(digest_size=16)
    size = 0
    try:
        if path.is_symlink():
            return None
        with open(path, "rb") as f:
            while piece := f.read(_READ):
                h.update(piece)
                size += len(piece)
    except OSError:
        return None
    if size != 8 * meta["n"] or h.hexdigest() != meta.get("digest"):
        return None
    return KnownIds(path, meta["n"])


class Watermark:
    """Tracks the first request (in input order) not yet answered ok, as rows are written out of order.

    ``complete`` and ``fail`` take the sequence number each request got in input order.  Memory
    is what finished beyond the mark: about the concurrency, unless a failed request holds the
    mark back; past ``cap`` entries the tracking gives up (the next start reads everything).
    """

    def __init__(self, first_seq: int = 0, samples: int = 1, cap: int = 200_000) -> None:
        self.mark = first_seq  # every seq below it is ok
        self.samples = samples
        self.cap = cap
        self.blocked = False  # a failed request sits at the mark
        self.given_up = False
        self._ahead: list[int] = []  # heap of ok seqs beyond the mark
        self._keys: dict[int, tuple[str, str | None]] = {}  # ok seqs >= the mark's record: their key, fp
        self._pos: dict[int, tuple[int, int, int]] = {}  # seq -> (input, line, sample) from the mark on
        self._order: deque[int] = deque()  # the seqs of _pos, ascending (seen in input order)

    def seen(self, seq: int, position: tuple[int, int], sample: int) -> None:
        if not self.given_up:
            self._pos[seq] = (position[0], position[1], sample)
            self._order.append(seq)
            if len(self._pos) > self.cap:
                self._give_up()

    def complete(self, seq: int, key: str, fingerprint: str | None) -> None:
        if self.given_up:
            return
        self._keys[seq] = (key, fingerprint)
        if seq == self.mark and not self.blocked:
            self._advance()
        else:
            heapq.heappush(self._ahead, seq)
            if len(self._ahead) > self.cap:
                self._give_up()

    def fail(self, seq: int) -> None:
        if seq == self.mark:
            self.blocked = True

    def _advance(self) -> None:
        ahead = self._ahead
        self.mark += 1
        while ahead and ahead[0] == self.mark:
            heapq.heappop(ahead)
            self.mark += 1
        self._forget_before(self.mark - self.samples)

    def _forget_before(self, seq: int) -> None:
        """Drop what lies before ``seq``: from the front of the order, so an advance costs what it drops
        (a scan of every position tracked cost the concurrency per advance)."""
        order = self._order
        while order and order[0] < seq:
            old = order.popleft()
            self._pos.pop(old, None)
            self._keys.pop(old, None)

    def _give_up(self) -> None:
        self.given_up = True
        self._ahead.clear()
        self._keys.clear()
        self._pos.clear()
        self._order.clear()

    def at_mark(self) -> tuple[tuple[int, int, int], list[tuple[str, str | None]]] | None:
        """((input, line, requests before it), answers ok beyond it) for the record at the mark.

        The prefix stops at the record's first sample, so every request it skips is ok.  None
        when the tracking gave up or the mark's position was never seen.
        """
        where = None if self.given_up else self._pos.get(self.mark)
        if where is None:
            return None
        start = self.mark - where[2]
        beyond = [kf for seq, kf in self._keys.items() if seq >= start]
        return (where[0], where[1], start), beyond
