"""The SSE decoder gives the same events whatever byte boundaries the stream arrives in."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchgate.sse import SSEDecoder, SSEOverflow

GONKAGATE_STREAM = (
    b'data: {"id":"chatcmpl-abc123","object":"chat.completion.chunk","choices":[{"index":0,'
    b'"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
    b": keep-alive\n\n"
    b'data: {"id":"chatcmpl-abc123","choices":[{"index":0,"delta":{"content":"Hello"},"finish_reason":null}]}\n\n'
    b"event: message\r\n"
    b'data: {"id":"chatcmpl-abc123","choices":[{"index":0,"delta":{"content":"!"},"finish_reason":null}]}\r\n\r\n'
    b'data: {"id":"chatcmpl-abc123","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15,"base_cost_usd":0.000075,'
    b'"platform_fee_usd":0.0000075,"total_cost_usd":0.0000825}}\r\r'
    b"data: [DONE]\n\n"
)


def decode(chunks: list[bytes]) -> list[bytes]:
    dec = SSEDecoder()
    out: list[bytes] = []
    for c in chunks:
        out.extend(dec.feed(c))
    out.extend(dec.flush())
    return out


def test_whole_stream_events() -> None:
    events = decode([GONKAGATE_STREAM])
    assert len(events) == 5
    assert events[1].endswith(b'"finish_reason":null}]}')
    assert b'"total_cost_usd":0.0000825' in events[3]
    assert events[-1] == b"[DONE]"


def test_every_split_point_gives_same_events() -> None:
    expected = decode([GONKAGATE_STREAM])
    for i in range(len(GONKAGATE_STREAM) + 1):
        assert decode([GONKAGATE_STREAM[:i], GONKAGATE_STREAM[i:]]) == expected, i


def test_byte_by_byte() -> None:
    data = GONKAGATE_STREAM
    assert decode([data[i : i + 1] for i in range(len(data))]) == decode([data])


def test_cr_split_from_lf_is_one_line_end() -> None:
    # "\r" at the end of one read and "\n" at the start of the next must not make an empty line
    # (which would dispatch the event early and split a multi-line data field).
    assert decode([b"data: a\r", b"\ndata: b\n\n"]) == [b"a\nb"]


def test_multiline_data_and_fields() -> None:
    stream = b"id: 7\nevent: error\ndata: first\ndata:second\ndata\nretry: 10\n\n"
    assert decode([stream]) == [b"first\nsecond\n"]


def test_comments_only_dispatch_nothing() -> None:
    assert decode([b": keep-alive\n\n: ping\n\n"]) == []


def test_stream_without_final_blank_line_is_flushed() -> None:
    dec = SSEDecoder()
    assert dec.feed(b'data: {"a":1}\ndata: [DONE]') == []
    assert dec.flush() == [b'{"a":1}\n[DONE]']


def test_truncated_stream_flushes_partial_line_once() -> None:
    dec = SSEDecoder()
    assert dec.feed(b'data: {"a":1}\n\ndata: {"b"') == [b'{"a":1}']
    assert dec.flush() == [b'{"b"']
    assert dec.flush() == []


line_end = st.sampled_from([b"\n", b"\r\n", b"\r"])
field = st.one_of(
    st.binary(max_size=20).map(lambda b: b"data: " + b.replace(b"\n", b"").replace(b"\r", b"")),
    st.just(b": keep-alive"),
    st.just(b"event: error"),
    st.just(b"id: 1"),
    st.just(b"data"),
)


@st.composite
def streams_and_splits(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    events = draw(st.lists(st.lists(field, min_size=1, max_size=4), max_size=8))
    parts: list[bytes] = []
    for ev in events:
        for f in ev:
            parts.append(f + draw(line_end))
        parts.append(draw(line_end))
    stream = b"".join(parts)
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    return stream, cuts


@given(streams_and_splits())
def test_any_split_gives_same_events(case: tuple[bytes, list[int]]) -> None:
    stream, cuts = case
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert decode(chunks) == decode([stream])


@given(st.lists(st.binary(max_size=64), max_size=10))
def test_arbitrary_bytes_never_crash(chunks: list[bytes]) -> None:
    events = decode(chunks)
    assert all(isinstance(e, bytes) for e in events)
    assert decode([b"".join(chunks)]) == events


@given(st.lists(st.sampled_from([b"data: a\n\n", b"data: b\r", b"\n", b"data: c\n", b"\r\n", b": k\n\n"]), max_size=12))
def test_one_event_per_read_fast_path_agrees_with_general_path(chunks: list[bytes]) -> None:
    assert decode(chunks) == decode([b"".join(chunks)])


def test_empty_read_between_cr_and_lf() -> None:
    assert decode([b"data: a\r", b"", b"\ndata: b\n\n"]) == [b"a\nb"]


# -- progress and bounded memory -----------------------------------------------------------------


def test_comment_reads_are_not_progress_but_data_reads_are() -> None:
    dec = SSEDecoder()
    assert dec.feed(b": keep-alive\n\n") == [] and not dec.took_data()
    assert dec.feed(b": keep-alive\n\n: ping\n") == [] and not dec.took_data()
    assert dec.feed(b'data: {"a"') == [] and dec.took_data()  # part of a data line
    assert dec.feed(b":1}") == [] and dec.took_data()  # more of the same line
    assert dec.feed(b"\n") == [] and dec.took_data()  # the line ends; the event still open
    assert dec.feed(b": keep-alive\n") == [] and not dec.took_data()
    assert dec.feed(b"\n") == [b'{"a":1}']


def test_a_line_over_the_cap_raises_whatever_the_read_sizes() -> None:
    dec = SSEDecoder(max_event_bytes=1000)
    dec.feed(b"data: ")
    with pytest.raises(SSEOverflow, match="longer than 1000"):
        for _ in range(100):
            dec.feed(b"x" * 64)
    with pytest.raises(SSEOverflow):
        SSEDecoder(max_event_bytes=1000).feed(b"data: " + b"y" * 2000 + b"\n\n")


def test_an_event_of_many_small_lines_over_the_cap_raises() -> None:
    dec = SSEDecoder(max_event_bytes=1000)
    with pytest.raises(SSEOverflow, match="event is larger"):
        for _ in range(1000):
            dec.feed(b"data: 0123456789\n")
    with pytest.raises(SSEOverflow):
        SSEDecoder(max_event_bytes=100).feed(b"data\n" * 200)


def test_events_under_the_cap_pass() -> None:
    dec = SSEDecoder(max_event_bytes=1000)
    assert dec.feed(b"data: " + b"z" * 900 + b"\n\n") == [b"z" * 900]


def test_a_long_line_in_many_reads_is_linear_not_quadratic() -> None:
    # 8 MB in 4 KiB reads: re-copying the buffer on every read would move ~8 GB.
    dec = SSEDecoder(max_event_bytes=16 << 20)
    piece = b"a" * 4096
    t0 = time.process_time()
    assert dec.feed(b"data: ") == []
    for _ in range(2048):
        assert dec.feed(piece) == []
    assert dec.feed(b"\n\n") == [piece * 2048]
    assert time.process_time() - t0 < 1.0


def test_memory_stays_bounded_by_the_cap() -> None:
    import tracemalloc

    dec = SSEDecoder(max_event_bytes=1 << 20)
    piece = b"b" * 65536
    tracemalloc.start()
    try:
        dec.feed(b"data: ")
        with pytest.raises(SSEOverflow):
            for _ in range(10_000):  # 640 MB if nothing stopped it
                dec.feed(piece)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 << 20
