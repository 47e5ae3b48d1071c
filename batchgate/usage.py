"""The usage block of a streamed answer, validated: what it says the answer cost, or that it says nothing sure.

Pure. Servers send counts and costs as numbers, numeric strings, or garbage; a delivered answer
is never failed for its usage block, so :func:`parse_usage` never raises. It tells the caller
how far the cost can be trusted in :attr:`Usage.cost_status`:

* ``"confirmed"``: the server's ``total_cost_usd`` (kept even when it differs from base + fee,
  with a ``total_mismatch`` warning);
* ``"derived"``: no total, but base and fee were given: total = base + fee;
* ``"unconfirmed"``: a field could not be read (``usage_malformed``) or no cost at all was given
  (``cost_missing``). Book no cost from it; estimate instead. Fields hold what could be read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Usage", "parse_usage", "to_number"]

_TOKEN_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")
_COST_FIELDS = ("base_cost_usd", "platform_fee_usd", "total_cost_usd")
#: base + fee may differ from total by this much (relative) before it is called a mismatch: servers round each.
_REL_TOL = 1e-3
_ABS_TOL = 1e-8


@dataclass(slots=True)
class Usage:
    """A validated usage block; ``None`` where the server gave nothing readable."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    base_cost_usd: float | None = None
    platform_fee_usd: float | None = None
    total_cost_usd: float | None = None
    cost_status: str = "unconfirmed"  # "confirmed" | "derived" | "unconfirmed"
    warnings: list[str] = field(default_factory=list)

    @property
    def confirmed(self) -> bool:
        """The total can be booked as spent (the server's, or base + fee)."""
        return self.cost_status != "unconfirmed"


def to_number(value: Any) -> float | None:
    """A finite non-negative number from a number or numeric string; None when absent; raises ValueError if bad."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    if isinstance(value, int):
        x = float(value)
    elif isinstance(value, float):
        x = value
    elif isinstance(value, str):
        try:
            x = float(value.strip())
        except ValueError:
            raise ValueError(f"{value[:40]!r} is not a number") from None
    else:
        raise ValueError(f"a {type(value).__name__} is not a number")
    if not math.isfinite(x) or x < 0:
        raise ValueError(f"{value!r} is not a finite non-negative number")
    return x


def _tokens(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value  # the common case, first
    x = to_number(value)
    if x is None:
        return None
    if x != int(x):
        raise ValueError(f"{value!r} is not a whole number of tokens")
    return int(x)


def parse_usage(raw: Any) -> Usage:
    """Validate a server's usage block; never raises."""
    out = Usage()
    if not isinstance(raw, dict):
        out.warnings.append("usage_malformed")
        return out
    malformed = False
    for name in _TOKEN_FIELDS:
        try:
            setattr(out, name, _tokens(raw.get(name)))
        except (ValueError, OverflowError):
            malformed = True
    for name in _COST_FIELDS:
        try:
            setattr(out, name, to_number(raw.get(name)))
        except ValueError:
            malformed = True
    if out.total_tokens is None and out.prompt_tokens is not None and out.completion_tokens is not None:
        out.total_tokens = out.prompt_tokens + out.completion_tokens
    base, fee, total = out.base_cost_usd, out.platform_fee_usd, out.total_cost_usd
    if malformed:
        out.warnings.append("usage_malformed")
        out.cost_status = "unconfirmed"
    elif total is not None:
        out.cost_status = "confirmed"
        if (
            base is not None
            and fee is not None
            and not math.isclose(total, base + fee, rel_tol=_REL_TOL, abs_tol=_ABS_TOL)
        ):
            out.warnings.append("total_mismatch")
    elif base is not None and fee is not None:
        out.total_cost_usd = base + fee
        out.cost_status = "derived"
    else:
        out.warnings.append("cost_missing")
        out.cost_status = "unconfirmed"
    return out
