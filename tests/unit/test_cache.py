"""The answer cache and the request fingerprint it is keyed by."""

from __future__ import annotations

import hashlib
import sqlite3
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchgate import cache as cache_module
from batchgate.cache import CACHE_NAME, AnswerCache, CacheError, cacheable, row_from_cache
from batchgate.fingerprint import request_fingerprint

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 10}


def row(content: str = "hello", cost: float = 0.002, **extra: Any) -> dict[str, Any]:
    return {
        "v": 2, "id": "p1", "job": "j", "run_id": "r", "model": "m", "status": "ok", "content": content,
        "reasoning": None, "tool_calls": None, "choices": None, "finish_reason": "stop", "prompt_tokens": 3,
        "completion_tokens": 5, "total_tokens": 8, "base_cost_usd": cost * 0.9, "platform_fee_usd": cost * 0.1,
        "total_cost_usd": cost, "cost_status": "confirmed", "request_id": "req-1", "started_at": "2026-12-01T00:00:00Z",
        "attempts": 2, "latency_s": 1.5, **extra,
    }  # fmt: skip


# ------------------------------------------------------------------ fingerprint


def test_fingerprint_is_the_contract_formula() -> None:
    want = hashlib.blake2b(orjson.dumps(BODY, option=orjson.OPT_SORT_KEYS), digest_size=16)
    want.update(b"\x00sample=0")
    assert request_fingerprint(BODY) == want.hexdigest()
    assert len(request_fingerprint(BODY)) == 32


def test_fingerprint_ignores_transport_and_key_order_but_not_parameters() -> None:
    fp = request_fingerprint(BODY)
    reordered = dict(reversed(list(BODY.items())))
    assert request_fingerprint({**reordered, "stream": True, "stream_options": {"include_usage": True}}) == fp
    assert request_fingerprint({**BODY, "temperature": 0.5}) != fp
    assert request_fingerprint({**BODY, "model": "other"}) != fp
    assert request_fingerprint(BODY, sample=1) != fp


@given(
    st.dictionaries(st.text(max_size=5), st.integers(-(2**63), 2**63 - 1) | st.text(max_size=5), max_size=5),
    st.integers(0, 9),
)
def test_fingerprint_is_stable_under_key_order(body: dict[str, Any], sample: int) -> None:
    assert request_fingerprint(body, sample) == request_fingerprint(dict(reversed(list(body.items()))), sample)


# ------------------------------------------------------------------ cacheable


@pytest.mark.parametrize(
    ("body", "allow", "ok"),
    [
        ({"temperature": 0}, False, True),
        ({"temperature": 0.0}, False, True),
        ({"temperature": 0.7}, False, False),
        ({}, False, False),  # the server's default temperature is not documented: assume sampling
        ({"temperature": False}, False, False),
        ({"temperature": "0"}, False, False),
        ({"temperature": 1.0}, True, True),
        ({}, True, True),
    ],
)
def test_cacheable(body: dict[str, Any], allow: bool, ok: bool) -> None:
    assert cacheable(body, allow) is ok


# ------------------------------------------------------------------ cache


def test_put_flush_get_round_trip_across_opens(tmp_path: Path) -> None:
    fp = request_fingerprint(BODY)
    with AnswerCache.open(tmp_path) as cache:
        assert cache.get(fp) is None
        cache.put(fp, row())
        assert cache.get(fp) is not None  # a queued answer is served before it is flushed
    with AnswerCache.open(tmp_path) as cache:
        entry = cache.get(fp)
        assert entry is not None
        assert entry["content"] == "hello" and entry["request_id"] == "req-1" and entry["total_cost_usd"] == 0.002
        assert "run_id" not in entry and "attempts" not in entry  # run fields are not the answer's
        assert entry["cached_at"].startswith(time.strftime("%Y-", time.gmtime())) and entry["cached_at"].endswith("Z")
        cache.flush()
        stats = cache.stats()
    assert stats.entries == 1 and stats.hits == 2
    assert stats.saved_usd == pytest.approx(0.004) and stats.original_cost_usd == pytest.approx(0.002)
    assert stats.file_bytes > 0 and stats.answers_bytes > 0
    assert stats.oldest_at is not None and stats.last_used_at is not None


def test_first_answer_wins(tmp_path: Path) -> None:
    with AnswerCache.open(tmp_path) as a, AnswerCache.open(tmp_path) as b:
        a.put("f" * 32, row("first"))
        a.flush()
        b.put("f" * 32, row("second"))
        b.put("f" * 32, row("third"))
        b.flush()
        entry = b.get("f" * 32)
    assert entry is not None and entry["content"] == "first"


def test_only_bought_answers_go_in(tmp_path: Path) -> None:
    with AnswerCache.open(tmp_path) as cache:
        with pytest.raises(ValueError):
            cache.put("a" * 32, row(status="failed"))
        with pytest.raises(ValueError):
            cache.put("a" * 32, row(cached=True))


def test_row_from_cache_costs_nothing_and_keeps_the_original() -> None:
    hit = row_from_cache(row(cost=0.25))
    assert hit["cached"] is True and hit["cached_cost_usd"] == 0.25
    assert hit["total_cost_usd"] == hit["base_cost_usd"] == hit["platform_fee_usd"] == 0.0
    assert hit["request_id"] == "req-1" and hit["content"] == "hello" and hit["attempts"] == 0


def test_memory_stays_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_module, "FLUSH_EVERY", 10)
    with AnswerCache.open(tmp_path) as cache:
        for i in range(95):
            cache.put(f"{i:032x}", row(str(i)))
            assert cache.pending < 10
        for i in range(95):
            assert cache.get(f"{i:032x}") is not None
            assert cache.pending < 10
        cache.flush()
        assert cache.stats().entries == 95


def test_prune_by_age_then_by_size_keeps_the_recently_used(tmp_path: Path) -> None:
    with AnswerCache.open(tmp_path) as cache:
        for i in range(20):
            cache.put(f"{i:032x}", row("x" * 1000))
        cache.flush()
    conn = sqlite3.connect(tmp_path / CACHE_NAME)
    now = time.time()
    with conn:
        for i in range(20):  # answer i last used i days ago
            conn.execute("UPDATE answers SET used_at = ? WHERE fp = ?", (now - i * 86400 - 1, f"{i:032x}"))
    conn.close()
    with AnswerCache.open(tmp_path) as cache:
        res = cache.prune(older_than_days=10)
        assert (res.removed, res.left) == (10, 10)
        per_answer = res.answers_bytes / 10
        res = cache.prune(max_size_mb=3.5 * per_answer / (1024 * 1024))
        assert (res.removed, res.left) == (7, 3)
        assert res.answers_bytes <= 3.5 * per_answer
        assert [cache.get(f"{i:032x}") is not None for i in range(4)] == [True, True, True, False]
        assert cache.prune().removed == 0


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / CACHE_NAME).write_bytes(b"not sqlite" * 100)
    with pytest.raises(CacheError, match=r"answers\.sqlite3"):
        AnswerCache.open(tmp_path)


def test_unwritable_place_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(CacheError, match="cannot open"):
        AnswerCache.open(tmp_path / "file" / "cache")
