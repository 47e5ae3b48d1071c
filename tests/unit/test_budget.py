"""Persistent caps: calendar arithmetic, lease sizing, and the cap holding across books sharing one file."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchgate.budget import (
    SPEND_NAME,
    CapBook,
    CapSpec,
    CapStop,
    Tally,
    budget_status,
    format_usd,
    lease_size,
    window_at,
)
from batchgate.errors import InputError


class Clock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


# ------------------------------------------------------------------ calendar


@pytest.mark.parametrize(
    ("moment", "day", "month", "day_resets", "month_resets"),
    [
        (datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC), "2026-12-31", "2026-12", "2027-01-01", "2027-01-01"),
        (datetime(2028, 2, 28, 10, tzinfo=UTC), "2028-02-28", "2028-02", "2028-02-29", "2028-03-01"),
        (datetime(2026, 1, 1, 0, 0, tzinfo=UTC), "2026-01-01", "2026-01", "2026-01-02", "2026-02-01"),
        # 01:30 in UTC+3 is still the previous UTC day
        (
            datetime(2026, 3, 1, 1, 30, tzinfo=timezone(timedelta(hours=3))),
            "2026-02-28",
            "2026-02",
            "2026-03-01",
            "2026-03-01",
        ),
    ],
)
def test_window_is_the_utc_calendar(moment: datetime, day: str, month: str, day_resets: str, month_resets: str) -> None:
    w = window_at(moment)
    assert (w.day, w.month) == (day, month)
    assert w.day_resets == datetime.fromisoformat(day_resets).replace(tzinfo=UTC)
    assert w.month_resets == datetime.fromisoformat(month_resets).replace(tzinfo=UTC)
    assert w.key("total") == "" and w.resets("total") is None


def test_window_refuses_a_naive_datetime() -> None:
    with pytest.raises(ValueError):
        window_at(datetime(2026, 1, 1))


@given(st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(9998, 1, 1), timezones=st.just(UTC)))
def test_window_contains_its_moment(moment: datetime) -> None:
    w = window_at(moment)
    assert w.day_resets - timedelta(days=1) <= moment < w.day_resets
    assert moment < w.month_resets <= w.day_resets + timedelta(days=31)
    assert w.day.startswith(w.month)


@given(st.floats(0, 100), st.floats(0, 100), st.floats(0.001, 1))
def test_lease_never_exceeds_what_is_left_and_covers_the_need(need: float, left: float, fraction: float) -> None:
    size = lease_size(need, left, fraction)
    assert 0.0 <= size <= left
    if need <= left:
        assert size >= need
        assert size >= min(left, fraction * left)
    elif need > left + 1e-12:  # within a nano-cent the need counts as fitting
        assert size == 0.0


@pytest.mark.parametrize(
    ("usd", "text"), [(1, "$1.00"), (0.99, "$0.99"), (0.0086, "$0.0086"), (12.5, "$12.50"), (0, "$0.00")]
)
def test_format_usd(usd: float, text: str) -> None:
    assert format_usd(usd) == text


def test_cap_stop_message_names_cap_spend_and_reset() -> None:
    stop = CapStop("daily", 1.0, 0.99, 0.0, datetime(2026, 12, 2, tzinfo=UTC), Path("/b/budget.jsonl"))
    assert stop.message.startswith("daily cap $1.00 used up: $0.99 spent today (UTC); resets 2026-12-02T00:00Z")
    total = CapStop("total", 5.0, 5.0, 0.25, None, Path("/out") / SPEND_NAME)
    assert "spent by all runs of /out" in str(total) and "$0.25 of it reserved" in str(total)


def test_tally_skips_bad_records_and_counts_open_leases() -> None:
    t = Tally()
    lease = {"op": "lease", "id": "a", "pid": 1, "host": "h", "day": "2026-12-01", "month": "2026-12", "exp": 0}
    for rec in [{**lease, "usd": 0.5}, {**lease, "usd": 0.25}, {"op": "lease"}, {"op": "spend", "usd": -1}, "x"]:
        t.apply(rec)
    assert t.unreadable == 3
    assert t.used("daily", "2026-12-01") == 0.75 and t.used("daily", "2026-12-02") == 0.0
    t.apply({"op": "settle", "id": "a", "usd": 0.1, "day": "x", "month": "y"})
    assert t.used("monthly", "2026-12") == pytest.approx(0.1) and not t.open


def test_cap_spec_refuses_negative_or_nan() -> None:
    with pytest.raises(InputError, match="--daily-cap"):
        CapSpec(daily_cap_usd=-1)
    with pytest.raises(InputError, match="--max-total-cost"):
        CapSpec(max_total_cost_usd=float("nan"))


# ------------------------------------------------------------------ one book


def test_reserve_until_the_cap_refuses_then_close_gives_back(tmp_path: Path) -> None:
    book = CapBook.open(CapSpec(daily_cap_usd=1.0), tmp_path, now=Clock(T0))
    spent = 0.0
    while (r := book.try_reserve(0.03)) is not None:
        book.settle(r, 0.01)  # answers cost a third of their worst case
        spent += 0.01
    assert book.refused is not None and book.refused.scope == "daily"
    assert spent > 0.97 - 1e-9  # refused only when less than one worst case was left
    book.close()
    # after close the unused part of the lease is back: only the real spend counts
    status = {s.scope: s for s in budget_status(tmp_path, now=T0).scopes}
    assert status["daily"].settled_usd == pytest.approx(spent)
    assert status["daily"].running_usd == 0 == status["daily"].possibly_spent_usd


def test_total_cap_holds_over_resumed_runs(tmp_path: Path) -> None:
    spent = 0.0
    for _ in range(3):
        with CapBook.open(CapSpec(max_total_cost_usd=0.01), tmp_path, now=Clock(T0)) as book:
            assert book.exhausted() is None or spent >= 0.01 - 0.002
            while (r := book.try_reserve(0.002)) is not None:
                book.settle(r, 0.002)
                spent += 0.002
    assert spent == pytest.approx(0.01)
    with CapBook.open(CapSpec(max_total_cost_usd=0.01), tmp_path, now=Clock(T0)) as book:
        stop = book.exhausted(0.001)
        assert stop is not None and stop.scope == "total"
        assert "total cap $0.01 used up: $0.01 spent by all runs" in stop.message


def test_prior_spend_from_the_ledger_is_carried_once(tmp_path: Path) -> None:
    for _ in range(2):
        CapBook.open(CapSpec(max_total_cost_usd=1.0), tmp_path, now=Clock(T0), prior_spend_usd=0.4).close()
    status = {s.scope: s for s in budget_status(tmp_path, now=T0).scopes}
    assert status["total"].settled_usd == pytest.approx(0.4)
    with CapBook.open(CapSpec(max_total_cost_usd=1.0), tmp_path, now=Clock(T0)) as book:
        assert book.try_reserve(0.61) is None
        assert book.try_reserve(0.6) is not None


def test_exhausted_message_at_start(tmp_path: Path) -> None:
    with CapBook.open(CapSpec(daily_cap_usd=1.0), tmp_path, now=Clock(T0)) as book:
        r = book.try_reserve(0.99)
        assert r is not None
        book.settle(r, 0.99)
    with CapBook.open(CapSpec(daily_cap_usd=1.0), tmp_path, now=Clock(T0)) as book:
        assert book.exhausted() is None  # a cent is left
        stop = book.exhausted(need_usd=0.02)
        assert stop is not None
        assert stop.message.startswith("daily cap $1.00 used up: $0.99 spent today (UTC); resets 2026-12-02T00:00Z")


def test_a_new_utc_day_frees_the_daily_cap_but_not_the_month(tmp_path: Path) -> None:
    clock = Clock(datetime(2026, 12, 1, 23, 59, tzinfo=UTC))
    book = CapBook.open(CapSpec(daily_cap_usd=1.0, monthly_cap_usd=1.5), tmp_path, now=clock)
    r = book.try_reserve(0.9)
    assert r is not None
    clock.at += timedelta(minutes=2)  # midnight passes while the request is in flight
    assert book.try_reserve(0.9) is None  # the month has 0.6 left, whatever the new day says
    assert book.refused is not None and book.refused.scope == "monthly"
    r2 = book.try_reserve(0.5)
    assert r2 is not None
    book.settle(r, 0.8)  # dated by its reservation: Dec 1
    book.settle(r2, 0.5)
    book.close()
    t = {(s.scope, s.key): s.settled_usd for s in budget_status(tmp_path, now=clock.at).scopes}
    assert t[("daily", "2026-12-02")] == pytest.approx(0.5)
    assert t[("monthly", "2026-12")] == pytest.approx(1.3)
    assert budget_status(tmp_path, now=T0).scopes[1].settled_usd == pytest.approx(0.8)


def test_an_answer_dearer_than_its_reservation_is_recorded_as_it_is(tmp_path: Path) -> None:
    with CapBook.open(CapSpec(max_total_cost_usd=1.0), tmp_path, now=Clock(T0), lease_fraction=0.0) as book:
        r = book.try_reserve(0.1)
        assert r is not None
        book.settle(r, 0.3)  # the server ignored max_tokens
        assert book.try_reserve(0.71) is None
    assert budget_status(tmp_path, now=T0).scopes[0].settled_usd == pytest.approx(0.3)


def test_a_killed_process_lease_stays_counted(tmp_path: Path) -> None:
    book = CapBook.open(CapSpec(daily_cap_usd=1.0), tmp_path, now=Clock(T0))
    assert book.try_reserve(0.2) is not None
    for store in book.stores:  # what kill -9 does: the fd goes, nothing is settled
        store.file.close()
    # rewrite the pid to one that is not running, as a crashed process leaves it
    path = tmp_path / SPEND_NAME
    rows = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    dead = _dead_pid()
    path.write_bytes(b"".join(orjson.dumps({**r, "pid": dead}) + b"\n" for r in rows))
    status = {s.scope: s for s in budget_status(tmp_path, now=T0).scopes}
    assert status["daily"].possibly_spent_usd == pytest.approx(0.2)  # the 5 % lease could cover 0.2: 0.2 leased
    assert status["daily"].settled_usd == 0
    with CapBook.open(CapSpec(daily_cap_usd=1.0), tmp_path, now=Clock(T0)) as other:
        assert other.try_reserve(0.81) is None
        assert other.try_reserve(0.8) is not None


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_a_torn_last_line_is_skipped_and_not_glued_to_the_next_record(tmp_path: Path) -> None:
    path = tmp_path / SPEND_NAME
    path.write_bytes(b'{"op":"spend","usd":0.5,"day":"2026-12-01","month":"2026-12"}\n{"op":"lea')
    with CapBook.open(CapSpec(daily_cap_usd=1.0), tmp_path, now=Clock(T0), lease_fraction=0.0) as book:
        r = book.try_reserve(0.25)
        assert r is not None
        book.settle(r, 0.25)
    status = budget_status(tmp_path, now=T0)
    assert status.unreadable_lines == 1
    assert status.scopes[1].settled_usd == pytest.approx(0.75)


def test_a_symlinked_budget_file_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real.jsonl"
    real.write_bytes(b"")
    link = tmp_path / "budget.jsonl"
    link.symlink_to(real)
    with pytest.raises(InputError, match="symbolic link"):
        CapBook.open(CapSpec(daily_cap_usd=1.0), tmp_path / "out", link)
    with pytest.raises(InputError, match="symbolic link"):
        budget_status(None, link)


def test_a_directory_as_budget_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="budget file"):
        CapBook.open(CapSpec(daily_cap_usd=1.0), None, tmp_path)


def test_budget_file_keeps_calendar_caps_out_dir_keeps_the_total(tmp_path: Path) -> None:
    shared = tmp_path / "shared.jsonl"
    for out in ("a", "b"):
        with CapBook.open(
            CapSpec(max_total_cost_usd=0.5, daily_cap_usd=0.6), tmp_path / out, shared, now=Clock(T0)
        ) as book:
            got = 0.0
            while (r := book.try_reserve(0.05)) is not None:
                book.settle(r, 0.05)
                got += 0.05
            assert got == pytest.approx(0.5 if out == "a" else 0.1)
            assert book.refused is not None
            assert book.refused.scope == ("total" if out == "a" else "daily")
    assert [s.settled_usd for s in budget_status(None, shared, now=T0).scopes] == pytest.approx([0.6] * 3)


def test_a_store_without_caps_still_records_spend(tmp_path: Path) -> None:
    with CapBook.open(CapSpec(), tmp_path, now=Clock(T0)) as book:
        for _ in range(3):
            r = book.try_reserve(1.0)
            assert r is not None
            book.settle(r, 0.1)
        book.flush()  # within a second of opening: not written yet
        assert budget_status(tmp_path, now=T0).scopes[0].settled_usd == 0
        book.flush(force=True)
        assert budget_status(tmp_path, now=T0).scopes[0].settled_usd == pytest.approx(0.3)
        r = book.try_reserve(1.0)
        assert r is not None
        book.settle(r, 0.1)
    assert budget_status(tmp_path, now=T0).scopes[0].settled_usd == pytest.approx(0.4)


# ------------------------------------------------------------------ property: simulated processes


ops = st.lists(
    st.one_of(
        st.tuples(st.just("reserve"), st.integers(0, 3), st.floats(0.0, 0.4)),
        st.tuples(st.just("settle"), st.integers(0, 3), st.floats(0.0, 1.0)),
        st.tuples(st.just("crash"), st.integers(0, 3), st.just(0.0)),
        st.tuples(st.just("close"), st.integers(0, 3), st.just(0.0)),
        st.tuples(st.just("tick"), st.integers(0, 3), st.floats(0.0, 14.0)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops, daily=st.floats(0.1, 2.0), total=st.one_of(st.none(), st.floats(0.2, 3.0)), fraction=st.floats(0, 0.5))
def test_books_sharing_a_file_never_jointly_pass_a_cap(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int, float]], daily: float, total: float | None,
    fraction: float,
) -> None:  # fmt: skip
    out = tmp_path_factory.mktemp("out")
    clock = Clock(datetime(2026, 12, 1, 20, tzinfo=UTC))
    caps = CapSpec(max_total_cost_usd=total, daily_cap_usd=daily)
    books: dict[int, CapBook] = {}
    inflight: dict[int, list[tuple[object, float, str]]] = {}
    truth: dict[str, float] = {}  # what may have been billed, by day of reservation

    def book(i: int) -> CapBook:
        if i not in books:
            books[i] = CapBook.open(caps, out, now=clock, lease_fraction=fraction)
            inflight[i] = []
        return books[i]

    for op, i, x in ops:
        if op == "reserve":
            r = book(i).try_reserve(x)
            if r is not None:
                inflight[i].append((r, x, r.day))
            else:
                assert books[i].refused is not None
        elif op == "settle" and inflight.get(i):
            r, reserved, day = inflight[i].pop(0)
            books[i].settle(r, reserved * x)  # type: ignore[arg-type]
            truth[day] = truth.get(day, 0.0) + reserved * x
        elif op == "crash" and i in books:
            for _r, reserved, day in inflight.pop(i):
                truth[day] = truth.get(day, 0.0) + reserved  # in flight at the crash: may have been billed
            for store in books.pop(i).stores:
                store.file.close()
        elif op == "close" and i in books:
            for _r, reserved, day in inflight.pop(i):
                truth[day] = truth.get(day, 0.0) + reserved  # unsettled at close counts as spent
            books.pop(i).close()
        elif op == "tick":
            clock.at += timedelta(hours=x)
    for i in list(books):
        for _, reserved, day in inflight.pop(i):
            truth[day] = truth.get(day, 0.0) + reserved
        books.pop(i).close()

    for day, billed in truth.items():
        assert billed <= daily + 1e-9, (day, billed, daily)
    if total is not None:
        assert sum(truth.values()) <= total + 1e-9
    # and the file never claims less than what may have been billed
    t = Tally()
    path = out / SPEND_NAME
    for line in path.read_bytes().splitlines() if path.exists() else []:
        t.apply(orjson.loads(line))
    for day, billed in truth.items():
        assert t.used("daily", day) >= billed - 1e-9
