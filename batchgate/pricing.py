"""Cost maths: prices learnt from confirmed requests, estimates for cut streams, worst cases.

GonkaGate sends the exact cost of a request in its final chunk; a stream cut before that chunk
may still have been billed.  We price such attempts from what this run has already seen for the
same model: the server bills ``cost = a * prompt_tokens + b * completion_tokens`` (plus a fee
proportional to it), so a least-squares fit over confirmed requests recovers ``a`` and ``b``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Budget", "ModelPrice", "PriceBook", "RunningSum"]


class RunningSum:
    """An exact running sum in constant memory (Shewchuk's partials, what ``math.fsum`` uses).

    A run of ten million requests must neither drift nor keep ten million floats around.
    """

    __slots__ = ("_partials",)

    def __init__(self) -> None:
        self._partials: list[float] = []

    def add(self, x: float) -> None:
        partials = self._partials
        i = 0
        for y in partials:
            if abs(x) < abs(y):
                x, y = y, x
            hi = x + y
            lo = y - (hi - x)
            if lo:
                partials[i] = lo
                i += 1
            x = hi
        partials[i:] = [x]

    @property
    def value(self) -> float:
        return math.fsum(self._partials)


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """USD per prompt token, per completion token, and prompt tokens per prompt character."""

    per_prompt_token: float
    per_completion_token: float
    tokens_per_char: float

    def cost(self, prompt_tokens: float, completion_tokens: float) -> float:
        return prompt_tokens * self.per_prompt_token + completion_tokens * self.per_completion_token


class _Fit:
    __slots__ = ("cc", "chars", "cost", "ctok", "cy", "n", "pc", "pp", "ptok", "py")

    def __init__(self) -> None:
        self.n = 0
        self.pp = self.pc = self.cc = self.py = self.cy = 0.0
        self.cost = 0.0
        self.ptok = self.ctok = 0
        self.chars = 0


class PriceBook:
    """Per-model prices learnt from confirmed usage chunks during a run."""

    def __init__(self) -> None:
        self._fits: dict[str, _Fit] = {}
        self._prices: dict[str, ModelPrice | None] = {}
        self._published: dict[str, float] = {}  # USD per token, prompt and completion alike
        self._peak: dict[str, float] = {}  # the highest USD per token any confirmed request implied

    def publish(self, model: str, usd_per_token: float) -> None:
        """A price the API publishes (the pricing endpoint): known before the first answer."""
        if math.isfinite(usd_per_token) and usd_per_token > 0:
            self._published[model] = usd_per_token
            self._prices.pop(model, None)

    def worst_per_token(self, model: str) -> float | None:
        """The highest USD per token known for ``model`` (published, learnt or implied); None if none.

        A budget reserves at this price, so prices that rise mid-run are met by the reservations
        of requests already in flight, never by a stale, lower estimate.
        """
        best = max(self._published.get(model, 0.0), self._peak.get(model, 0.0))
        price = self.price(model)
        if price is not None:
            best = max(best, price.per_prompt_token, price.per_completion_token)
        return best or None

    def learn(self, model: str, prompt_tokens: int, completion_tokens: int, cost: float, prompt_chars: int) -> None:
        """Record one confirmed request."""
        fit = self._fits.get(model)
        if fit is None:
            fit = self._fits[model] = _Fit()
        p, c = float(prompt_tokens), float(completion_tokens)
        fit.n += 1
        fit.pp += p * p
        fit.pc += p * c
        fit.cc += c * c
        fit.py += p * cost
        fit.cy += c * cost
        fit.cost += cost
        fit.ptok += prompt_tokens
        fit.ctok += completion_tokens
        fit.chars += prompt_chars
        self._prices.pop(model, None)
        # Upper bound of this request's price per token: all its cost on its completion tokens
        # when the split is unknown would overstate wildly; cost / tokens is exact for a flat
        # price (GonkaGate publishes one) and the fit above covers split prices.
        tokens = prompt_tokens + completion_tokens
        if tokens > 0 and cost > 0:
            implied = cost / tokens
            if implied > self._peak.get(model, 0.0):
                self._peak[model] = implied

    def price(self, model: str) -> ModelPrice | None:
        """The learnt price of ``model`` (else its published one), or None while neither exists."""
        if model in self._prices:
            return self._prices[model]
        fit = self._fits.get(model)
        price = None if fit is None else _solve(fit)
        if price is None and model in self._published:
            flat = self._published[model]
            price = ModelPrice(flat, flat, 0.25)
        self._prices[model] = price
        return price

    def estimate(self, model: str, prompt_chars: int, completion_tokens: int) -> float | None:
        """Estimated cost of an attempt that received ``completion_tokens`` but no usage chunk."""
        price = self.price(model)
        if price is None:
            return None
        return price.cost(prompt_chars * price.tokens_per_char, completion_tokens)


def _solve(fit: _Fit) -> ModelPrice | None:
    if fit.n == 0:
        return None
    tokens_per_char = fit.ptok / fit.chars if fit.chars else 0.25
    det = fit.pp * fit.cc - fit.pc * fit.pc
    # Normal equations of cost ~ a*p + b*c; fall back to one price per token when the requests
    # seen so far cannot tell prompt from completion prices apart.
    if det > 1e-9 * max(fit.pp * fit.cc, 1.0):
        a = (fit.py * fit.cc - fit.cy * fit.pc) / det
        b = (fit.cy * fit.pp - fit.py * fit.pc) / det
        if a >= 0 and b >= 0:
            return ModelPrice(a, b, tokens_per_char)
    tokens = fit.ptok + fit.ctok
    per_token = fit.cost / tokens if tokens else 0.0
    return ModelPrice(per_token, per_token, tokens_per_char)


class Budget:
    """A spending cap: a request may start only if its worst case still fits.

    ``spent`` is confirmed plus estimated unconfirmed spend; ``reserved`` the worst cases of the
    requests in flight.  Worst case = estimated prompt tokens (with a margin) plus ``max_tokens``
    at the prices learnt so far.
    """

    PROMPT_MARGIN = 1.2

    def __init__(self, cap_usd: float, book: PriceBook) -> None:
        self.cap_usd = cap_usd
        self.book = book
        self.spent = 0.0
        self.reserved = 0.0

    def worst_case(self, model: str, prompt_chars: int, max_tokens: int) -> float | None:
        """What the server could bill for one request at most; None while no price is known."""
        return self.worst_case_of(self.book, model, prompt_chars, max_tokens)

    @classmethod
    def worst_case_of(cls, book: PriceBook, model: str, prompt_chars: int, max_tokens: int) -> float | None:
        """What the server could bill for one request at most; None while no price is known.

        Prompt tokens: the prompt's length at the learnt tokens per character with a margin,
        never less than one token per character / 2 (a tokenizer cannot do much worse on real
        text); completion: ``max_tokens``; all at the highest price known for the model.
        """
        per_token = book.worst_per_token(model)
        if per_token is None:
            return None
        price = book.price(model)
        per_char = price.tokens_per_char if price is not None else 0.25
        prompt = max(prompt_chars * per_char * cls.PROMPT_MARGIN, prompt_chars / 2) + 16
        return (prompt + max_tokens) * per_token

    def try_reserve(self, amount: float) -> bool:
        if self.spent + self.reserved + amount > self.cap_usd:
            return False
        self.reserved += amount
        return True

    def settle(self, reserved: float, actual: float) -> None:
        self.reserved = max(0.0, self.reserved - reserved)
        self.spent += actual

    @property
    def left_usd(self) -> float:
        return max(0.0, self.cap_usd - self.spent)
