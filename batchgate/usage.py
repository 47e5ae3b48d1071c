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
    if value.__class__ is float and math.isfinite(value) and value >= 0:
        return float(value)  # the common case, first
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


def _read(raw: dict[str, Any], name: str, conv: Any, bad: list[str]) -> Any:
    try:
        return conv(raw.get(name))
    except (ValueError, OverflowError):
        bad.append(name)
        return None


def parse_usage(raw: Any) -> Usage:
    """Validate a server's usage block; never raises."""
    if not isinstance(raw, dict):
        return Usage(warnings=["usage_malformed"])
    # Fast path: the usual block, plain ints and floats that need no conversion.
    prompt, completion, tokens = raw.get("prompt_tokens"), raw.get("completion_tokens"), raw.get("total_tokens")
    base, fee, total = raw.get("base_cost_usd"), raw.get("platform_fee_usd"), raw.get("total_cost_usd")
    if (
        prompt.__class__ is int
        and completion.__class__ is int
        and tokens.__class__ is int
        and base.__class__ is float
        and fee.__class__ is float
        and total.__class__ is float
        and prompt >= 0
        and completion >= 0
        and tokens >= 0
        and 0.0 <= base < math.inf
        and 0.0 <= fee < math.inf
        and 0.0 <= total < math.inf
        and math.isclose(total, base + fee, rel_tol=_REL_TOL, abs_tol=_ABS_TOL)
    ):
        return Usage(prompt, completion, tokens, base, fee, total, "confirmed", [])
    bad: list[str] = []
    prompt = _read(raw, "prompt_tokens", _tokens, bad)
    completion = _read(raw, "completion_tokens", _tokens, bad)
    tokens = _read(raw, "total_tokens", _tokens, bad)
    base = _read(raw, "base_cost_usd", to_number, bad)
    fee = _read(raw, "platform_fee_usd", to_number, bad)
    total = _read(raw, "total_cost_usd", to_number, bad)
    if tokens is None and prompt is not None and completion is not None:
        tokens = prompt + completion
    warnings: list[str] = []
    if bad:
        warnings.append("usage_malformed")
        status = "unconfirmed"
    elif total is not None:
        status = "confirmed"
        if (
            base is not None
            and fee is not None
            and not math.isclose(total, base + fee, rel_tol=_REL_TOL, abs_tol=_ABS_TOL)
        ):
            warnings.append("total_mismatch")
    elif base is not None and fee is not None:
        total = base + fee
        status = "derived"
    else:
        warnings.append("cost_missing")
        status = "unconfirmed"
    return Usage(prompt, completion, tokens, base, fee, total, status, warnings)
