"""GonkaGate's account endpoints: the model catalog, the key's balance, the published prices.

All three are optional: a gateway may not serve them, may answer 503 while loading, or send
garbage. Every function returns None then and never raises, with two exceptions that a caller
wants before it spends anything: :func:`fetch_catalog` raises ``AuthError`` when ``/models``
rejects the key (401/403) and ``ConnectFailed`` when the base URL cannot be reached at all.
No redirect is followed (the key stays on its origin).
"""

from __future__ import annotations

import asyncio
import difflib
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from .client import read_capped, session_secrets
from .errors import AuthError, ConnectFailed
from .usage import to_number

__all__ = [
    "Account",
    "Balance",
    "PublishedPrice",
    "api_root",
    "fetch_account",
    "fetch_balance",
    "fetch_catalog",
    "fetch_pricing",
    "nearest_models",
]

_MAX_BODY = 8 << 20
_JSON = {"Accept": "application/json"}
_CONNECT = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError, aiohttp.InvalidURL)


@dataclass(frozen=True, slots=True)
class Balance:
    """The key's prepaid balance as ``GET /api/v1/whoami`` tells it."""

    usd: float
    status: str | None = None  # "active" | "low" | "suspended"
    key_status: str | None = None  # "active" | "disabled" | "expired"


@dataclass(frozen=True, slots=True)
class PublishedPrice:
    """USD per token (not per million) as ``GET /api/v1/public/pricing`` publishes it."""

    usd_per_token_network: float
    usd_per_token_fee: float
    usd_per_token_total: float


def api_root(base_url: str) -> str:
    """The host root of a base URL: ``https://api.gonkagate.com/v1`` -> ``https://api.gonkagate.com``."""
    root = base_url.rstrip("/")
    return root[:-3] if root.endswith("/v1") else root


class _Unreachable(Exception):
    pass


async def _get(session: aiohttp.ClientSession, url: str, timeout_s: float) -> tuple[int, Any, dict[str, str]]:
    """(status, parsed JSON or None, headers); raises _Unreachable when no connection could be made."""
    sock_connect = session.timeout.sock_connect
    timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(sock_connect or timeout_s, timeout_s))
    try:
        async with session.get(url, headers=_JSON, allow_redirects=False, timeout=timeout) as resp:
            raw = await read_capped(resp, _MAX_BODY)
            headers = {"x-request-id": resp.headers.get("x-request-id", "")}
            try:
                body = orjson.loads(raw) if raw else None
            except orjson.JSONDecodeError:
                body = None
            return resp.status, body, headers
    except _CONNECT as exc:
        raise _Unreachable(f"{type(exc).__name__}: {getattr(exc, 'os_error', None) or exc}") from None


async def _optional_data(session: aiohttp.ClientSession, url: str, timeout_s: float) -> Any:
    """The object an optional endpoint answers 200 with (inside its ``data`` envelope, or bare);
    None when it cannot be reached or answers anything else: these endpoints never fail a run."""
    try:
        status, body, _ = await _get(session, url, timeout_s)
    except (_Unreachable, TimeoutError, aiohttp.ClientError):
        return None
    if status != 200:
        return None
    data = _field(body, "data")
    return data if isinstance(data, dict) else body


def _field(obj: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


async def fetch_catalog(
    session: aiohttp.ClientSession,
    base_url: str,
    *,
    attempts: int = 3,
    retry_delay_s: float = 0.5,
    timeout_s: float = 10.0,
) -> list[str] | None:
    """The model ids ``GET {base_url}/models`` lists, exactly as spelled; None when it cannot tell.

    503, 429, timeouts and an empty list are retried briefly (``attempts``), then None. Raises
    AuthError on 401/403 and ConnectFailed when the host cannot be reached (no retry: the run
    should end now, before anything is spent).
    """
    url = base_url.rstrip("/") + "/models"
    for attempt in range(max(1, attempts)):
        if attempt:
            await asyncio.sleep(retry_delay_s * 2 ** (attempt - 1))
        try:
            status, body, headers = await _get(session, url, timeout_s)
        except _Unreachable as exc:
            raise ConnectFailed(f"cannot connect to {url}: {exc}", secrets=session_secrets(session)) from None
        except (TimeoutError, aiohttp.ClientError):
            continue
        if status in (401, 403):
            err = _field(body, "error")
            message = _field(err, "message") if isinstance(_field(err, "message"), str) else "the key was rejected"
            code = _field(err, "code")
            raise AuthError(
                f"GET {url}: {message}",
                status=status,
                code=code if isinstance(code, str) else None,
                request_id=headers["x-request-id"] or None,
                secrets=session_secrets(session),
            )
        if status == 200:
            data = _field(body, "data")
            if isinstance(data, list):
                ids = [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str) and m["id"]]
                if ids:
                    return ids
            elif data is not None or body is not None:
                return None  # an answer, but not a catalog: retrying will not make it one
            continue  # empty: the catalog may still be loading
        if status in (408, 425, 429) or status >= 500:
            continue
        return None  # 404 (no such endpoint), a redirect, anything else: no catalog here
    return None


async def fetch_balance(session: aiohttp.ClientSession, base_url: str, *, timeout_s: float = 10.0) -> Balance | None:
    """The key's USD balance from ``GET {root}/api/v1/whoami``; None when absent or unreadable."""
    data = await _optional_data(session, api_root(base_url) + "/api/v1/whoami", timeout_s)
    balance = _field(data, "balance")
    raw = _field(balance, "usd") if isinstance(balance, dict) else balance
    try:
        usd = to_number(raw)
    except ValueError:
        return None
    if usd is None:
        return None
    state = _field(balance, "status")
    key_state = _field(data, "apiKey", "status")
    return Balance(
        usd,
        state if isinstance(state, str) else None,
        key_state if isinstance(key_state, str) else None,
    )


async def fetch_pricing(
    session: aiohttp.ClientSession, base_url: str, *, timeout_s: float = 10.0
) -> dict[str, PublishedPrice] | None:
    """Published USD-per-token prices by model id from ``GET {root}/api/v1/public/pricing``; None when absent.

    Entries that cannot be read are skipped; a fee missing from an entry comes from the
    published fee rate, a total missing from network + fee.
    """
    data = await _optional_data(session, api_root(base_url) + "/api/v1/public/pricing", timeout_s)
    models = _field(data, "models")
    if not isinstance(models, list):
        return None
    try:
        rate = to_number(_field(data, "fees", "platformFeeRate"))
    except ValueError:
        rate = None
    out: dict[str, PublishedPrice] = {}
    for entry in models:
        model = _field(entry, "id")
        per_m = _field(entry, "usdPer1MTokens")
        if not isinstance(model, str) or not model or not isinstance(per_m, dict):
            continue
        try:
            network = to_number(per_m.get("network"))
            fee = to_number(per_m.get("platformFee"))
            total = to_number(per_m.get("total"))
        except ValueError:
            continue
        if network is None and total is not None:
            network = total - fee if fee is not None else (total / (1 + rate) if rate is not None else None)
        if network is None:
            continue
        if fee is None:
            fee = network * rate if rate is not None else (total - network if total is not None else 0.0)
        if total is None:
            total = network + fee
        out[model] = PublishedPrice(network / 1e6, max(0.0, fee) / 1e6, total / 1e6)
    return out or None


def nearest_models(name: str, catalog: list[str], n: int = 3) -> list[str]:
    """Catalog ids closest to ``name``: a case-insensitive match first (ids differ in case between pages)."""
    low = name.lower()
    same = [m for m in catalog if m.lower() == low]
    if same:
        return same[:n]
    by_lower: dict[str, str] = {}
    for m in catalog:
        by_lower.setdefault(m.lower(), m)
    close = difflib.get_close_matches(low, list(by_lower), n=n, cutoff=0.5)
    tail = low.rsplit("/", 1)[-1]
    if tail != low:  # the same model under another organisation's prefix
        for key in by_lower:
            if key.rsplit("/", 1)[-1] == tail and key not in close:
                close.insert(0, key)
    return [by_lower[k] for k in close[:n]]


@dataclass(frozen=True, slots=True)
class Account:
    """What GonkaGate says about a key: its balance and the published prices (each None when absent)."""

    balance: Balance | None
    prices: dict[str, PublishedPrice] | None


async def fetch_account(api_key: str, base_url: str, *, timeout_s: float = 10.0) -> Account:
    """Balance and prices in one short session (for ``batchgate balance``)."""
    from .client import make_session

    async with make_session(api_key, concurrency=2, connect_timeout_s=timeout_s, base_url=base_url) as session:
        balance = await fetch_balance(session, base_url, timeout_s=timeout_s)
        prices = await fetch_pricing(session, base_url, timeout_s=timeout_s)
    return Account(balance, prices)
