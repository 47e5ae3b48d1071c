"""Incremental Server-Sent Events decoder.

Pure and allocation-light: it sits on the per-chunk hot path, so it hands back the raw ``data``
payload of each event as ``bytes`` (the caller decodes JSON once) rather than building event
objects. It copes with everything a real server sends: lines split across reads (even between
``\\r`` and ``\\n``), CRLF or bare CR line ends, ``:`` comments (keep-alives), ``event:``/``id:``/
``retry:`` fields, multi-line ``data``, and a stream that ends without a final blank line.

Memory is bounded: a line or an event larger than ``max_event_bytes`` raises :class:`SSEOverflow`.
The pieces of a line that spans many reads are kept in a list and joined once when its end
arrives, so a long line costs linear time, not a re-copy of the buffer on every read.
"""

from __future__ import annotations

__all__ = ["DEFAULT_MAX_EVENT_BYTES", "SSEDecoder", "SSEOverflow"]

DEFAULT_MAX_EVENT_BYTES = 8 << 20


class SSEOverflow(ValueError):
    """One SSE line or event is larger than the decoder's cap."""


class SSEDecoder:
    """Feed bytes as they arrive; get back the ``data`` payload of every completed event."""

    __slots__ = ("_data", "_dlen", "_mark", "_max", "_parts", "_pending_cr", "_plen")

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self._parts: list[bytes] = []  # the pieces of the line whose end has not arrived yet
        self._plen = 0
        self._data: list[bytes] = []  # the data lines of the event being read
        self._dlen = 0
        self._pending_cr = False
        self._mark = 0  # data lines pending when the last read began: took_data() compares
        self._max = max_event_bytes

    def feed(self, chunk: bytes) -> list[bytes]:
        """Decode ``chunk``; return the payloads of events it completed (possibly none)."""
        if not chunk:
            return []  # must not clear a pending "\r": the "\n" after it may come next
        # Fast path: a read holding exactly one whole "data: ..." event, which is what a server
        # that flushes every token sends. Same result as the general path below.
        if (
            not self._parts
            and not self._data
            and chunk[:6] == b"data: "
            and chunk.find(b"\n") == len(chunk) - 2
            and chunk[-1:] == b"\n"
            and b"\r" not in chunk
            and len(chunk) <= self._max
        ):
            self._pending_cr = False
            return [chunk[6:-2]]
        if self._pending_cr:
            # A "\r" ended the previous read; a "\n" starting this one belongs to it.
            self._pending_cr = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if b"\r" in chunk:
            if chunk[-1:] == b"\r":
                self._pending_cr = True
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        parts = self._parts
        self._mark = len(self._data)
        if b"\n" not in chunk:
            if chunk:
                self._plen += len(chunk)
                if self._plen > self._max:
                    raise SSEOverflow(f"an SSE line is longer than {self._max} bytes")
                parts.append(chunk)
            return []
        if parts:
            parts.append(chunk)
            buf = b"".join(parts)
            parts.clear()
        else:
            buf = chunk
        lines = buf.split(b"\n")
        tail = lines.pop()
        self._plen = len(tail)
        if tail:
            parts.append(tail)
        if len(buf) > self._max:
            cap = self._max
            if self._plen > cap or any(len(line) > cap for line in lines):
                raise SSEOverflow(f"an SSE line is longer than {cap} bytes")
        return self._lines(lines)

    def took_data(self) -> bool:
        """Whether the last read, which completed no event, carried ``data`` lines or part of one.

        That is progress; a read of comments (``: keep-alive``) only is not.
        """
        parts = self._parts
        return len(self._data) > self._mark or (bool(parts) and b"data".startswith(parts[0][:4]))

    def flush(self) -> list[bytes]:
        """End of stream: dispatch a last event that had no terminating blank line."""
        lines = [b"".join(self._parts)] if self._parts else []
        self._parts.clear()
        self._plen = 0
        self._pending_cr = False
        lines.append(b"")
        return self._lines(lines)

    def _lines(self, lines: list[bytes]) -> list[bytes]:
        out: list[bytes] = []
        data = self._data
        dlen = self._dlen  # bytes of a multi-line event so far (0 while it has one line)
        for line in lines:
            if not line:
                if data:
                    out.append(data[0] if len(data) == 1 else b"\n".join(data))
                    data.clear()
                    dlen = 0
            elif line[:5] == b"data:":
                piece = line[6:] if line[5:6] == b" " else line[5:]
                if data:  # a second data line: only then can an event outgrow its lines
                    dlen = (dlen or len(data[0])) + len(piece) + 1
                    if dlen > self._max:
                        data.clear()
                        self._dlen = 0
                        raise SSEOverflow(f"an SSE event is larger than {self._max} bytes")
                data.append(piece)
            elif line[:1] == b":":
                continue  # comment / keep-alive
            elif line == b"data":
                if data:
                    dlen = (dlen or len(data[0])) + 1
                    if dlen > self._max:
                        data.clear()
                        self._dlen = 0
                        raise SSEOverflow(f"an SSE event is larger than {self._max} bytes")
                data.append(b"")
            # event:, id:, retry: and unknown fields carry nothing we act on.
        self._dlen = dlen
        return out
