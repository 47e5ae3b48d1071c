"""Incremental Server-Sent Events decoder.

Pure and allocation-light: it sits on the per-chunk hot path, so it hands back the raw ``data``
payload of each event as ``bytes`` (the caller decodes JSON once) rather than building event
objects. It copes with everything a real server sends: lines split across reads (even between
``\\r`` and ``\\n``), CRLF or bare CR line ends, ``:`` comments (keep-alives), ``event:``/``id:``/
``retry:`` fields, multi-line ``data``, and a stream that ends without a final blank line.
"""

from __future__ import annotations

__all__ = ["SSEDecoder"]


class SSEDecoder:
    """Feed bytes as they arrive; get back the ``data`` payload of every completed event."""

    __slots__ = ("_buf", "_data", "_pending_cr")

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[bytes] = []
        self._pending_cr = False

    def feed(self, chunk: bytes) -> list[bytes]:
        """Decode ``chunk``; return the payloads of events it completed (possibly none)."""
        if not chunk:
            return []  # must not clear a pending "\r": the "\n" after it may come next
        # Fast path: a read holding exactly one whole "data: ..." event, which is what a server
        # that flushes every token sends. Same result as the general path below.
        if (
            not self._buf
            and not self._data
            and chunk[:6] == b"data: "
            and chunk.find(b"\n") == len(chunk) - 2
            and chunk[-1:] == b"\n"
            and b"\r" not in chunk
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
        buf = self._buf + chunk if self._buf else chunk
        if b"\n" not in buf:
            self._buf = buf
            return []
        lines = buf.split(b"\n")
        self._buf = lines.pop()
        return self._lines(lines)

    def flush(self) -> list[bytes]:
        """End of stream: dispatch a last event that had no terminating blank line."""
        lines = [self._buf] if self._buf else []
        self._buf = b""
        self._pending_cr = False
        lines.append(b"")
        return self._lines(lines)

    def _lines(self, lines: list[bytes]) -> list[bytes]:
        out: list[bytes] = []
        data = self._data
        for line in lines:
            if not line:
                if data:
                    out.append(data[0] if len(data) == 1 else b"\n".join(data))
                    data.clear()
            elif line[:5] == b"data:":
                data.append(line[6:] if line[5:6] == b" " else line[5:])
            elif line[:1] == b":":
                continue  # comment / keep-alive
            elif line == b"data":
                data.append(b"")
            # event:, id:, retry: and unknown fields carry nothing we act on.
        return out
