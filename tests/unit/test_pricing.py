"""Prices learnt from confirmed requests price the cut ones."""

from __future__ import annotations

import math
import random

from batchgate.pricing import PriceBook


def bill(p: int, c: int, pin: float = 0.3e-6, pout: float = 1.2e-6, fee: float = 0.1) -> float:
    base = p * pin + c * pout
    return base + base * fee


def test_unknown_model_has_no_estimate() -> None:
    book = PriceBook()
    assert book.price("m") is None
    assert book.estimate("m", 400, 10) is None


def test_recovers_prompt_and_completion_prices() -> None:
    book = PriceBook()
    rng = random.Random(1)
    for _ in range(50):
        p, c = rng.randint(5, 500), rng.randint(1, 300)
        book.learn("m", p, c, bill(p, c), prompt_chars=p * 4)
    price = book.price("m")
    assert price is not None
    assert math.isclose(price.per_prompt_token, 0.3e-6 * 1.1, rel_tol=1e-6)
    assert math.isclose(price.per_completion_token, 1.2e-6 * 1.1, rel_tol=1e-6)
    assert math.isclose(price.tokens_per_char, 0.25)
    # A cut stream of a 400-char prompt that received 20 tokens: 100 prompt tokens + 20 completion.
    est = book.estimate("m", 400, 20)
    assert est is not None and math.isclose(est, bill(100, 20), rel_tol=1e-6)


def test_single_request_falls_back_to_per_token_price() -> None:
    book = PriceBook()
    book.learn("m", 10, 10, 0.002, prompt_chars=40)
    price = book.price("m")
    assert price is not None
    assert math.isclose(price.per_prompt_token, 0.0001)
    assert math.isclose(price.per_completion_token, 0.0001)


def test_models_are_priced_apart_and_cache_refreshes() -> None:
    book = PriceBook()
    book.learn("a", 10, 10, 0.002, prompt_chars=40)
    first = book.estimate("a", 40, 10)
    book.learn("a", 10, 10, 0.004, prompt_chars=40)
    assert book.estimate("a", 40, 10) != first
    assert book.price("b") is None


def test_running_sum_is_exact_and_small() -> None:
    from hypothesis import given
    from hypothesis import strategies as st

    from batchgate.pricing import RunningSum

    acc = RunningSum()
    for _ in range(1_000_000):
        acc.add(0.1e-6)
    assert abs(acc.value - 0.1) < 1e-15
    assert len(acc._partials) < 8

    @given(st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), max_size=200))
    def matches_fsum(values: list[float]) -> None:
        acc = RunningSum()
        for v in values:
            acc.add(v)
        assert acc.value == math.fsum(values)

    matches_fsum()
