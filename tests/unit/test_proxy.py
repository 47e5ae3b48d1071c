"""Which proxy a run uses: the environment's, looked up once, never for loopback."""

from __future__ import annotations

import pytest

from batchgate.client import env_proxy


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def test_no_proxy_configured() -> None:
    assert env_proxy("https://api.gonkagate.com/v1") is None


def test_https_proxy_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert env_proxy("https://api.gonkagate.com/v1") == "http://proxy.internal:3128"
    assert env_proxy("http://api.gonkagate.com/v1") is None  # only HTTPS_PROXY set


def test_no_proxy_and_loopback_bypass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("NO_PROXY", "gonkagate.com")
    assert env_proxy("https://api.gonkagate.com/v1") is None
    assert env_proxy("http://127.0.0.1:8080/v1") is None
    assert env_proxy("http://localhost:8080/v1") is None
