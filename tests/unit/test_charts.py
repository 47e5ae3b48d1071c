"""The report's hand-written SVG charts: well-formed, escaped, readable axes, bounded, deterministic."""

from __future__ import annotations

import copy
import itertools
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchgate.reports.charts import MAX_LINE_POINTS, downsample, nice_ticks, render_charts
from batchgate.reports.data import Histogram, ReportData, RunCurve

SVG = "{http://www.w3.org/2000/svg}"
START_US = 1_740_790_800_000_000  # 2025-03-01 01:00 UTC
HOSTILE = "<script>alert('x')</script> & \"quoted\" \x00\x1b[31m"


def make_data(**fields: Any) -> ReportData:
    """A ReportData with every chart field filled as a real two-model, one-run report fills them."""
    values: dict[str, Any] = {
        "by": ["job"],
        "key_columns": ["job"],
        "summary": [],
        "totals": {},
        "ledgers": [Path("results.jsonl")],
        "cost_by_model": [("Qwen/Qwen3-32B-FP8", 0.1975, 0.0015), ("Qwen/Qwen3-235B-A22B", 0.0955, 0.0)],
        "spend_single": RunCurve(
            label="night-1",
            edges=[START_US + i * 5_000_000 for i in range(301)],
            spent=[0.001 * i for i in range(301)],
            unconfirmed=[0.0001 * i for i in range(301)],
        ),
        "run_count": 1,
        "latency": Histogram(
            counts=[0, 3, 10, 40, 25, 9, 2, 1],
            edges=[0.5 * i for i in range(9)],
            percentiles={50: 1.7, 95: 3.1, 99: 3.8},
            values=90,
        ),
        "ttft": Histogram(
            counts=[5, 20, 4], edges=[0.0, 0.1, 0.2, 0.3], percentiles={50: 0.12, 95: 0.25, 99: 0.29}, values=29
        ),
        "retry_causes": {"rate_limited": 335, "server_error": 321, "timeout": 260},
        "failed_by_error": {"timeout": 260},
        "cost_by_day": [("2025-03-01", 0.19), ("2025-03-02", 0.2)],
    }
    values.update(fields)
    return ReportData(**values)


def charts(data: ReportData) -> dict[str, ET.Element]:
    """Every chart parsed as XML (a parse error fails the test), by id."""
    return {name: ET.fromstring(svg) for name, svg, _ in render_charts(data)}


def texts(root: ET.Element) -> list[str]:
    return ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]


def titles(root: ET.Element) -> list[str]:
    return [t.text or "" for t in root.iter(f"{SVG}title")]


def paths(root: ET.Element) -> list[str]:
    return [p.get("d", "") for p in root.iter(f"{SVG}path")]


EMPTY = make_data(
    cost_by_model=[], spend_single=None, run_count=0, latency=None, ttft=None, retry_causes={}, failed_by_error={},
    cost_by_day=[],
)  # fmt: skip
DEGENERATE = make_data(
    cost_by_model=[("a", math.nan, math.inf), ("b", 0.0, 0.0), (None, -1.0, 0.0)],
    spend_single=RunCurve(label="x", edges=[float(START_US)], spent=[math.nan]),
    latency=Histogram(counts=[0, 0, 0], edges=[0.0, 0.0, 0.0, 0.0], percentiles={50: math.nan, 95: 0.0}, values=0),
    ttft=Histogram(counts=[], edges=[], percentiles={}, values=0),
    retry_causes={"rate_limited": 0},
    failed_by_error={"": 1},
    cost_by_day=[("2025-03-01", 0.0), ("2025-03-02", math.nan)],
)
ZERO_SPEND = make_data(
    cost_by_model=[("m", 0.0, 0.0)],
    spend_single=RunCurve(label="x", edges=[float(START_US), float(START_US)], spent=[0.0, 0.0]),
    cost_by_day=[("2025-03-01", 0.0), ("2025-03-02", 0.0)],
)
SEVERAL_RUNS = make_data(
    spend_single=None,
    spend_runs=[
        RunCurve(
            label=f"night-{i} · 2025-03-0{i} 01:00",
            edges=[s * 6.0 for s in range(301)],
            spent=[0.001 * s * i for s in range(301)],
        )
        for i in range(1, 9)
    ],
    run_count=11,
)
CASES = {"full": make_data(), "empty": EMPTY, "degenerate": DEGENERATE, "zero": ZERO_SPEND, "runs": SEVERAL_RUNS}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_chart_is_well_formed_scalable_svg_with_no_nan(case: str) -> None:
    rendered = render_charts(CASES[case])
    assert [name for name, _, _ in rendered][:4] == ["cost-by-model", "spend-over-time", "latency", "failures"]
    for name, svg, caption in rendered:
        root = ET.fromstring(svg)
        assert root.tag == f"{SVG}svg", name
        assert root.get("width") == "100%" and re.fullmatch(r"0 0 \d+ \d+", root.get("viewBox", "")), name
        assert caption.endswith(".")
        numbers = [v for el in root.iter() for k, v in el.attrib.items() if k not in {"aria-label", "font-family"}]
        assert not [v for v in numbers if re.search(r"nan|inf", v, re.IGNORECASE)], (name, numbers)
        assert "<script" not in svg and "href" not in svg and "url(" not in svg  # offline, no script
        assert len(root) > 0 and texts(root), name  # something drawn or said, never a blank box


def test_extreme_values_draw_without_raising() -> None:
    huge = make_data(
        cost_by_model=[("a", 1e308, 1e308), ("b", 1e-300, 0.0)],
        spend_single=RunCurve("x", [-1e30, 0.0, 1e30], [0.0, 1e308, -1e308], [1e308, 1e308, 1e308]),
        latency=Histogram(counts=[10**30, 1], edges=[-1e308, 0.0, 1e308], percentiles={50: 1e308}, values=10**30),
        retry_causes={"x": 10**30},
        cost_by_day=[("2025-03-01", 1e308), ("9999-99-99", 1e308)],
    )
    runs = make_data(spend_single=None, spend_runs=[RunCurve("r", [0.0, 1e300], [0.0, 1.0])], run_count=1)
    for data in (huge, runs):
        for name, root in charts(data).items():
            assert texts(root), name
    ticks = nice_ticks(-1e308, 1e308)  # clamped to +-1e300, so the span stays finite
    assert ticks[0] == -1e300 and ticks[-1] == 1e300 and len(ticks) <= 8


def test_cost_by_day_only_when_more_than_one_day() -> None:
    assert "cost-by-day" in charts(make_data())
    assert "cost-by-day" not in charts(make_data(cost_by_day=[("2025-03-01", 0.5)]))
    assert "cost-by-day" not in charts(EMPTY)


def test_empty_charts_say_so_instead_of_drawing() -> None:
    drawn = {name: texts(root) for name, root in charts(EMPTY).items()}
    assert "no spend recorded" in drawn["cost-by-model"]
    assert "no timestamps recorded" in drawn["spend-over-time"]
    assert drawn["latency"].count("none recorded") == 2
    assert "no failed attempts" in drawn["failures"] and "no failed requests" in drawn["failures"]
    zero = charts(ZERO_SPEND)
    assert "no spend recorded" in texts(zero["cost-by-model"])
    assert "no spend recorded" in texts(zero["cost-by-day"])


def test_degenerate_values_still_draw_sensible_axes() -> None:
    drawn = charts(DEGENERATE)
    model_labels = texts(drawn["cost-by-model"])
    assert "(none)" not in model_labels  # a negative cost is no spend
    assert "no spend recorded" in model_labels  # NaN and infinity count as nothing, not as a bar
    spend = texts(drawn["spend-over-time"])
    assert "$0" in spend and "01:00:00" in spend  # one moment in time: half a second either side
    assert "none recorded" in texts(drawn["latency"])  # ttft has no bins
    assert "0" in texts(drawn["latency"])  # all-zero latency bins: axes from 0 still drawn
    assert "no failed attempts" in texts(drawn["failures"])  # a zero count is no bar
    assert '""' in texts(drawn["failures"]) and "1" in texts(drawn["failures"])  # a blank error type is visible


def test_hostile_names_are_escaped_and_shown_in_full_in_tooltips() -> None:
    data = make_data(
        cost_by_model=[(HOSTILE, 1.0, 0.5), ("m&m's", 0.5, 0.0)],
        spend_single=None,
        spend_runs=[
            RunCurve(label=HOSTILE, edges=[0.0, 60.0], spent=[0.0, 1.0]),
            RunCurve("b", [0.0, 30.0], [0.0, 2.0]),
        ],
        run_count=2,
        retry_causes={HOSTILE: 3},
        failed_by_error={HOSTILE: 2, '"><svg onload=alert(1)>': 1},
        cost_by_day=[(HOSTILE, 1.0), ("2025-03-02", 2.0)],
    )
    shown = HOSTILE.replace("\x00", "\ufffd").replace("\x1b", "\ufffd")  # XML cannot hold control characters
    for name, svg, _ in render_charts(data):
        if name == "latency":
            continue  # no names in it
        assert "<script" not in svg and "<svg onload" not in svg, name
        root = ET.fromstring(svg)  # well-formed despite quotes, ampersands and control characters
        assert not list(root.iter(f"{SVG}script")), name
        assert any(shown in title for title in titles(root)), name  # the full name, unescaped back by the parser
    model = charts(data)["cost-by-model"]
    assert "m&m's" in texts(model)
    assert any(text.endswith("…") and shown.startswith(text[:-1]) for text in texts(model))  # shortened on the axis


def test_long_model_names_are_shortened_with_the_full_name_in_a_title() -> None:
    long_name = "org/a-model-name-that-goes-on-and-on-for-ever-Instruct-2507-FP8"
    model = charts(make_data(cost_by_model=[(long_name, 1.0, 0.0)]))["cost-by-model"]
    shortened = [t for t in texts(model) if t.endswith("…")]
    assert len(shortened) == 1 and long_name.startswith(shortened[0][:-1]) and len(shortened[0]) <= 31
    assert long_name not in texts(model)
    assert f"{long_name}: $1.000 confirmed" in titles(model)


def test_cost_by_model_labels_bars_and_has_a_legend_only_with_two_series() -> None:
    both = texts(charts(make_data())["cost-by-model"])
    assert "$0.1975 + $0.001500" in both and "$0.09550" in both  # about four significant digits
    assert "confirmed" in both and "unconfirmed (cut streams)" in both
    assert [t for t in both if re.fullmatch(r"\$0(\.\d\d)?", t)] == ["$0", "$0.05", "$0.10", "$0.15", "$0.20"]
    confirmed_only = make_data(cost_by_model=[("a", 12.5, 0.0), ("b", 3.0, 0.0)])
    only = texts(charts(confirmed_only)["cost-by-model"])
    assert "unconfirmed (cut streams)" not in only and "confirmed" not in only
    assert "$12.50" in only and "$0" in only and "$10" in only


def test_many_models_fold_into_others() -> None:
    data = make_data(cost_by_model=[(f"model-{i:02}", 100.0 - i, 0.0) for i in range(30)])
    labels = texts(charts(data)["cost-by-model"])
    assert "model-10" in labels and "model-11" not in labels
    assert "19 others" in labels


def test_latency_marks_percentiles_in_seconds() -> None:
    labels = texts(charts(make_data())["latency"])
    assert {"p50 1.70s", "p95 3.10s", "p99 3.80s", "p50 0.120s"} <= set(labels)
    assert "seconds (90 rows)" in labels and "requests" in labels
    assert {"0", "1", "2", "3", "4"} <= set(labels)  # round seconds on the x axis


def test_spend_over_time_reads_the_utc_clock() -> None:
    root = charts(make_data())["spend-over-time"]
    labels = texts(root)
    assert "Cumulative spend" in labels and "time (UTC)" in labels
    assert {"01:00", "01:05", "01:25", "Mar 1"} <= set(labels)  # 25 minutes: 5-minute ticks, the date once
    assert labels.count("Mar 1") == 1
    assert "+ unconfirmed" in labels
    assert [t for t in labels if "$" in t] == ["$0", "$0.1", "$0.2", "$0.3", "$0.4"]


def test_several_runs_share_an_axis_of_time_since_their_start() -> None:
    labels = texts(charts(SEVERAL_RUNS)["spend-over-time"])
    assert "minutes since the run started" in labels
    assert "the 8 costliest of 11 runs" in labels
    assert sum(label.startswith("night-") for label in labels) == 8
    assert {"0", "10", "20", "30"} <= set(labels)  # 1,800 s = 30 minutes


@given(
    st.floats(-1e9, 1e9, allow_nan=False),
    st.floats(0, 1e9, allow_nan=False),
    st.integers(3, 10),
    st.booleans(),
)
def test_nice_ticks_cover_the_range_evenly_in_round_steps(
    lo: float, width: float, max_ticks: int, integer: bool
) -> None:
    hi = lo + width
    ticks = nice_ticks(lo, hi, max_ticks, integer=integer)
    assert 2 <= len(ticks) <= max_ticks
    step = ticks[1] - ticks[0]
    assert step > 0
    slack = step * 1e-6
    assert ticks[0] <= lo + slack and ticks[-1] >= hi - slack  # covers the data
    # Tick values are floats: far from zero, their spacing is only as exact as a few ulps of their size.
    tol = 1e-9 + 4 * math.ulp(max(abs(ticks[0]), abs(ticks[-1]))) / step
    for a, b in itertools.pairwise(ticks):  # evenly spaced
        assert math.isclose(b - a, step, rel_tol=tol)
    mantissa = step / 10 ** math.floor(math.log10(step) + 1e-9)
    assert min(abs(mantissa / m - 1) for m in (1, 2, 5, 10)) < tol, step  # 1, 2 or 5 times a power of ten
    if integer:
        assert step >= 1 and all(t == round(t) for t in ticks)
    if hi - lo > max(abs(lo), abs(hi)) * 1e-6 and hi - lo > 1e-12:  # narrower ranges count as one value
        raw = (hi - lo) / (max_ticks - 1)
        assert step <= max(20 * raw, 1 if integer else 0)  # never a far coarser axis than the ticks allow


def test_nice_ticks_examples() -> None:
    assert nice_ticks(0, 0.37) == [0, 0.1, 0.2, 0.3, 0.4]
    assert nice_ticks(0, 0.37, 9) == [0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4]
    assert nice_ticks(0, 138.16) == [0, 20, 40, 60, 80, 100, 120, 140]
    assert nice_ticks(0, 1e-7) == [0, 2e-8, 4e-8, 6e-8, 8e-8, 1e-7]  # a tiny spend still gets round ticks
    assert nice_ticks(-3, 12) == [-5, 0, 5, 10, 15]
    assert nice_ticks(0, 7, 8, integer=True) == [0, 1, 2, 3, 4, 5, 6, 7]
    assert nice_ticks(0, 0.3, integer=True) == [0, 1]
    assert nice_ticks(0, 0) == [0, 0.2, 0.4, 0.6, 0.8, 1]  # nothing to show: still an axis
    assert nice_ticks(5, 5) == [0, 1, 2, 3, 4, 5]  # one value: from zero
    assert nice_ticks(math.nan, math.inf) == nice_ticks(0, 1)
    assert nice_ticks(3, 1) == nice_ticks(1, 3)


def test_downsample_keeps_both_ends_and_at_most_the_limit() -> None:
    assert downsample(10) == list(range(10))
    kept = downsample(100_000)
    assert len(kept) <= MAX_LINE_POINTS and kept[0] == 0 and kept[-1] == 99_999
    assert kept == sorted(set(kept))
    assert downsample(1_001, 3) == [0, 500, 1_000]
    assert downsample(0) == []


def test_long_spend_curves_are_drawn_with_a_bounded_number_of_points() -> None:
    n = 20_000
    single = RunCurve(
        "x", [START_US + i * 1e6 for i in range(n)], [i * 0.01 for i in range(n)], [0.001 * i for i in range(n)]
    )
    runs = [RunCurve(f"r{i}", [float(s) for s in range(n)], [s * 0.01 for s in range(n)]) for i in range(3)]
    for data in (make_data(spend_single=single), make_data(spend_single=None, spend_runs=runs, run_count=3)):
        lines = [d for d in paths(charts(data)["spend-over-time"]) if d.count("H") > 100]
        assert lines, "the spend line is drawn"
        assert all(d.count("V") <= MAX_LINE_POINTS for d in lines)
        assert len(render_charts(data)[1][1]) < 60_000


def test_output_is_bounded_whatever_the_number_of_models_causes_bins_or_days() -> None:
    data = make_data(
        cost_by_model=[(f"m{i}", float(i), 0.0) for i in range(5_000)],
        latency=Histogram(
            counts=[1] * 10_000, edges=[i / 1000 for i in range(10_001)], percentiles={50: 5.0}, values=10_000
        ),
        retry_causes={f"cause-{i}": i + 1 for i in range(5_000)},
        failed_by_error={f"error-{i}": i + 1 for i in range(5_000)},
        cost_by_day=[(f"{2000 + i // 365}-01-01", 1.0) for i in range(3_650)],
    )
    drawn = render_charts(data)
    assert sum(len(svg) for _, svg, _ in drawn) < 120_000
    parsed = charts(data)
    assert len(list(parsed["latency"].iter(f"{SVG}rect"))) <= 130  # bins merged
    assert len(list(parsed["cost-by-day"].iter(f"{SVG}rect"))) <= 100  # days grouped
    assert any("days a column" in t for t in texts(parsed["cost-by-day"]))
    failures = texts(parsed["failures"])
    assert "cause-4999" in failures and "cause-4989" not in failures  # the ten biggest


def test_same_data_gives_the_same_bytes() -> None:
    for data in CASES.values():
        assert render_charts(data) == render_charts(copy.deepcopy(data))
    tied = {"timeout": 260, "server_error": 321, "rate_limited": 321}
    shuffled = dict(reversed(tied.items()))
    assert render_charts(make_data(retry_causes=shuffled)) == render_charts(make_data(retry_causes=tied))  # ties too


def test_charts_use_the_page_palette_and_font() -> None:
    svgs = "".join(svg for _, svg, _ in render_charts(make_data()))
    for colour in ("#2f6fdf", "#f0a030", "#d0453a"):
        assert colour in svgs
    assert "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif" in svgs
