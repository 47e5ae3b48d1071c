"""The run's money: confirmed, unconfirmed and possibly-billed spend, and what each row costs.

The runner schedules; this keeps the books.  Confirmed spend is the server's ``total_cost_usd``
summed exactly.  Unconfirmed spend is the one estimate batchgate makes: an attempt cut before
its usage chunk (or a delivered answer whose usage block is unusable) is priced from what it
received, counted in *characters* (a gateway may pack any number of tokens in one chunk) and
turned into tokens with the characters-per-token learnt from this run's confirmed answers of the
same model.  Pure: no I/O, no event loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .models import PromptRecord
from .pricing import PriceBook, RunningSum
from .usage import parse_usage

__all__ = ["Accounts", "Charge", "combine_charges", "usage_numbers"]

#: Characters per completion token before a model's first confirmed answer teaches its own.
DEFAULT_CHARS_PER_TOKEN = 4.0


@dataclass(slots=True)
class Charge:
    """The money side of one ledger row."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    base_cost_usd: float = 0.0
    platform_fee_usd: float = 0.0
    total_cost_usd: float = 0.0  # confirmed (or derived from base + fee)
    cost_status: str | None = None
    unconfirmed_completion_tokens: int = 0
    unconfirmed_cost_usd: float | None = 0.0  # None: no price known for the model yet
    usage_raw: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def spent(self) -> float:
        """Confirmed plus estimated unconfirmed: what a budget must count."""
        return self.total_cost_usd + (self.unconfirmed_cost_usd or 0.0)


def usage_numbers(usage: Any) -> tuple[dict[str, Any], str, list[str], dict[str, Any] | None]:
    """(numbers, cost_status, warnings, raw-if-invalid) of a usage block: a checked Usage or a raw dict.

    The client checks usage (``batchgate.usage.parse_usage``); a plain dict goes through the same
    check here, so a string or a NaN never reaches a sum.
    """
    if usage is None:
        return {}, "unconfirmed", [], None
    checked = parse_usage(usage) if isinstance(usage, dict) else usage
    numbers = {n: getattr(checked, n, None) for n in _USAGE_NUMBERS}
    status = getattr(checked, "cost_status", "confirmed")
    raw = dict(usage) if isinstance(usage, dict) and status == "unconfirmed" else None
    return numbers, status, list(getattr(checked, "warnings", []) or []), raw


_USAGE_NUMBERS = (
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "base_cost_usd",
    "platform_fee_usd",
    "total_cost_usd",
)


class Accounts:
    """Sums for one run, and the price knowledge the run builds up as answers arrive."""

    def __init__(self, prices: PriceBook | None = None) -> None:
        self.prices = prices or PriceBook()
        self.confirmed = RunningSum()
        self.unconfirmed = RunningSum()
        self._unpriced: list[tuple[str, int, int]] = []  # (model, prompt chars, tokens) cut before any price
        self._chars = dict[str, float]()
        self._tokens = dict[str, float]()
        self.warnings: dict[str, int] = {}

    def chars_per_token(self, model: str) -> float:
        tokens = self._tokens.get(model, 0.0)
        return self._chars[model] / tokens if tokens >= 16 else DEFAULT_CHARS_PER_TOKEN

    def tokens_of(self, model: str, chars: int) -> int:
        """Completion tokens that ``chars`` received characters are worth, rounded up."""
        if chars <= 0:
            return 0
        return max(1, math.ceil(chars / self.chars_per_token(model)))

    def charge(
        self,
        rec: PromptRecord,
        completion: Any | None,
        cut_chars: int,
        cut_events: int,
    ) -> Charge:
        """Price one finished prompt: its delivered answer (if any) and its cut attempts."""
        c = Charge()
        cut_tokens = self.tokens_of(rec.model, cut_chars) if cut_chars else cut_events
        if completion is not None:
            numbers, status, warnings, raw = usage_numbers(completion.usage)
            c.prompt_tokens = numbers.get("prompt_tokens")
            c.completion_tokens = numbers.get("completion_tokens")
            c.total_tokens = numbers.get("total_tokens")
            c.warnings = list(dict.fromkeys([*warnings, *(getattr(completion, "warnings", None) or [])]))
            if raw is None and status == "unconfirmed":
                kept = getattr(completion, "usage_raw", None)
                raw = kept if isinstance(kept, dict) else ({"value": kept} if kept is not None else None)
            c.usage_raw = raw
            received = int(getattr(completion, "received_chars", 0) or 0)
            if status in ("confirmed", "derived"):
                c.cost_status = status
                c.base_cost_usd = numbers.get("base_cost_usd") or 0.0
                c.platform_fee_usd = numbers.get("platform_fee_usd") or 0.0
                c.total_cost_usd = numbers.get("total_cost_usd") or 0.0
                if c.prompt_tokens is not None and c.completion_tokens is not None:
                    self.prices.learn(
                        rec.model, c.prompt_tokens, c.completion_tokens, c.total_cost_usd, rec.prompt_chars
                    )
                    if received and c.completion_tokens:
                        self._chars[rec.model] = self._chars.get(rec.model, 0.0) + received
                        self._tokens[rec.model] = self._tokens.get(rec.model, 0.0) + c.completion_tokens
            else:
                # Delivered, maybe billed, but nothing proves what: priced as unconfirmed, never re-bought.
                c.cost_status = "unconfirmed"
                if c.completion_tokens is not None:
                    cut_tokens += c.completion_tokens
                elif received:
                    cut_tokens += self.tokens_of(rec.model, received)
                else:
                    cut_tokens += int(getattr(completion, "received_tokens", 0) or 0)
                if not c.warnings:
                    c.warnings = ["usage_missing"]
        c.unconfirmed_completion_tokens = cut_tokens
        if cut_tokens:
            est = self.prices.estimate(rec.model, rec.prompt_chars, cut_tokens)
            c.unconfirmed_cost_usd = est
            if est is None:
                self._unpriced.append((rec.model, rec.prompt_chars, cut_tokens))
            else:
                self.unconfirmed.add(est)
        if c.total_cost_usd:
            self.confirmed.add(c.total_cost_usd)
        for w in c.warnings:
            self.warnings[w] = self.warnings.get(w, 0) + 1
        return c

    def settle_unpriced(self) -> int:
        """Price the cut attempts seen before any price was known; return the tokens still unpriced."""
        still = 0
        left: list[tuple[str, int, int]] = []
        for model, chars, tokens in self._unpriced:
            est = self.prices.estimate(model, chars, tokens)
            if est is None:
                still += tokens
                left.append((model, chars, tokens))
            else:
                self.unconfirmed.add(est)
        self._unpriced = left
        return still


def _sum_or_none(values: list[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def combine_charges(charges: list[Charge]) -> Charge:
    """One row's charge from several paid requests (an answer and the re-asks that replaced it)."""
    order = {"confirmed": 0, "derived": 1, "unconfirmed": 2}
    statuses = [c.cost_status for c in charges if c.cost_status is not None]
    unconfirmed = [c.unconfirmed_cost_usd for c in charges if c.unconfirmed_completion_tokens]
    warnings = [w for c in charges for w in c.warnings]
    return Charge(
        prompt_tokens=_sum_or_none([c.prompt_tokens for c in charges]),
        completion_tokens=_sum_or_none([c.completion_tokens for c in charges]),
        total_tokens=_sum_or_none([c.total_tokens for c in charges]),
        base_cost_usd=math.fsum(c.base_cost_usd for c in charges),
        platform_fee_usd=math.fsum(c.platform_fee_usd for c in charges),
        total_cost_usd=math.fsum(c.total_cost_usd for c in charges),
        cost_status=max(statuses, key=lambda st: order.get(st, 2)) if statuses else None,
        unconfirmed_completion_tokens=sum(c.unconfirmed_completion_tokens for c in charges),
        unconfirmed_cost_usd=None if None in unconfirmed else math.fsum(u or 0.0 for u in unconfirmed),
        usage_raw=next((c.usage_raw for c in reversed(charges) if c.usage_raw is not None), None),
        warnings=list(dict.fromkeys(warnings)),
    )
