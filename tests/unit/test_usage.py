"""parse_usage: what a usage block says the answer cost, and how far that can be trusted."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchgate.errors import error_class, redact, status_for_code
from batchgate.usage import Usage, parse_usage, to_number

GOOD = {
    "prompt_tokens": 10,
    "completion_tokens": 5,
    "total_tokens": 15,
    "base_cost_usd": 0.000075,
    "platform_fee_usd": 0.0000075,
    "total_cost_usd": 0.0000825,
}


def test_well_formed_block_is_confirmed_as_sent() -> None:
    u = parse_usage(GOOD)
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (10, 5, 15)
    assert u.total_cost_usd == 0.0000825 and u.cost_status == "confirmed" and u.confirmed
    assert u.warnings == []


def test_numeric_strings_are_converted() -> None:
    raw = {k: str(v) for k, v in GOOD.items()}
    raw["completion_tokens"] = " 5.0 "
    u = parse_usage(raw)
    assert u.completion_tokens == 5 and isinstance(u.completion_tokens, int)
    assert u.total_cost_usd == pytest.approx(0.0000825) and u.cost_status == "confirmed"


def test_missing_total_with_base_and_fee_is_derived() -> None:
    raw = {k: v for k, v in GOOD.items() if k != "total_cost_usd"}
    u = parse_usage(raw)
    assert u.cost_status == "derived" and u.confirmed
    assert u.total_cost_usd == pytest.approx(0.0000825)


def test_total_not_base_plus_fee_keeps_the_server_total_and_warns() -> None:
    u = parse_usage({**GOOD, "total_cost_usd": 0.5})
    assert u.total_cost_usd == 0.5 and u.cost_status == "confirmed"
    assert u.warnings == ["total_mismatch"]


def test_rounding_differences_are_not_a_mismatch() -> None:
    u = parse_usage({**GOOD, "base_cost_usd": 0.00007500001})
    assert u.warnings == []


def test_missing_total_tokens_is_summed() -> None:
    raw = {k: v for k, v in GOOD.items() if k != "total_tokens"}
    assert parse_usage(raw).total_tokens == 15


@pytest.mark.parametrize(
    "bad",
    [
        {"total_cost_usd": "free"},
        {"total_cost_usd": -1.0},
        {"total_cost_usd": float("nan")},
        {"total_cost_usd": float("inf")},
        {"total_cost_usd": [0.1]},
        {"total_cost_usd": True},
        {"prompt_tokens": 1.5},
        {"completion_tokens": {"n": 5}},
        {"completion_tokens": "1e400"},
    ],
)
def test_malformed_fields_make_the_cost_unconfirmed(bad: dict[str, Any]) -> None:
    u = parse_usage({**GOOD, **bad})
    assert u.cost_status == "unconfirmed" and not u.confirmed
    assert "usage_malformed" in u.warnings
    name = next(iter(bad))
    assert getattr(u, name) is None  # the bad field is not guessed
    assert u.prompt_tokens is not None or name == "prompt_tokens"  # the good ones are still read


@pytest.mark.parametrize("raw", [None, "usage", 7, [1, 2], True])
def test_a_block_that_is_not_an_object_is_unconfirmed(raw: Any) -> None:
    u = parse_usage(raw)
    assert u == Usage(warnings=["usage_malformed"])


def test_tokens_without_any_cost_are_unconfirmed() -> None:
    u = parse_usage({"prompt_tokens": 3, "completion_tokens": 4})
    assert u.cost_status == "unconfirmed" and u.warnings == ["cost_missing"] and u.total_tokens == 7


def test_to_number() -> None:
    assert to_number("0.25") == 0.25 and to_number(3) == 3.0 and to_number(None) is None
    for bad in ("x", -0.1, float("nan"), False, [1]):
        with pytest.raises(ValueError):
            to_number(bad)


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**30), 10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["1", "0.5", " 2 ", "1e3", "-3", "nan", "inf", "0x10"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
fields = st.sampled_from(
    ["prompt_tokens", "completion_tokens", "total_tokens", "base_cost_usd", "platform_fee_usd", "total_cost_usd", "x"]
)


@given(st.one_of(values, st.dictionaries(fields, values, max_size=7)))
def test_any_block_parses_without_raising_into_finite_non_negative_numbers(raw: Any) -> None:
    u = parse_usage(raw)
    assert u.cost_status in ("confirmed", "derived", "unconfirmed")
    for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
        v = getattr(u, name)
        assert v is None or (type(v) is int and v >= 0)
    for name in ("base_cost_usd", "platform_fee_usd", "total_cost_usd"):
        v = getattr(u, name)
        assert v is None or (type(v) is float and math.isfinite(v) and v >= 0)
    if u.confirmed:
        assert u.total_cost_usd is not None


# -- errors.py: the pure half of the error handling ------------------------------------------------


def test_redact_removes_the_key_bearer_tokens_and_key_shaped_words() -> None:
    key = "gp-Secret.Key_123"
    text = (
        f'echo: {{"authorization": "Bearer {key}", "x": "bearer abc.def", "raw": "{key}", "other": "gp-AAAAAAAAAAAA"}}'
    )
    out = redact(text, [key])
    assert key not in out and "abc.def" not in out and "gp-AAAAAAAAAAAA" not in out
    assert out.count("[REDACTED]") == 4 and out.startswith("echo: ")


def test_redact_leaves_ordinary_text_alone() -> None:
    text = "model Qwen/Qwen3-32B-FP8 is busy (gpu 3 of 8); retry in 2 s"
    assert redact(text, ["", "ab"]) == text  # secrets under 4 characters would garble everything


def test_error_class_falls_back_on_the_status_for_unknown_codes() -> None:
    assert error_class(429, "something_new").__name__ == "RateLimited"
    assert error_class(404, "model_not_found").__name__ == "ModelNotFound"
    assert error_class(404, "nope").__name__ == "BadRequest"
    assert error_class(503, "service_unavailable").__name__ == "ServerError"
    assert error_class(307).__name__ == "Redirected"
    assert error_class(418).__name__ == "BadRequest"
    assert status_for_code("insufficient_quota") == 429 and status_for_code("500") == 500
    assert status_for_code("whatever") is None and status_for_code(None) is None
