"""`batchgate balance` against the simulator's whoami and pricing endpoints, and against a server without them."""

from __future__ import annotations

import orjson
import pytest
from clitools import Sim, bg


@pytest.mark.parametrize("simulator", [["--balance", "2.5"]], indirect=True)
def test_balance_and_prices_as_text_and_json(simulator: Sim) -> None:
    res = bg("balance", "--base-url", simulator.url)
    assert res.returncode == 0, res.stderr
    assert "balance   $2.500000" in res.stdout and "sim-model" in res.stdout
    doc = orjson.loads(bg("balance", "--base-url", simulator.url, "--json").stdout)
    assert doc["balance_usd"] == 2.5 and doc["prices_usd_per_1m_tokens"]["sim-model"] > 0
    assert "gp-test" not in res.stdout + res.stderr


@pytest.mark.parametrize("simulator", [["--no-account-endpoints"]], indirect=True)
def test_a_gateway_without_account_endpoints_says_so(simulator: Sim) -> None:
    res = bg("balance", "--base-url", simulator.url)
    assert res.returncode == 0, res.stderr
    assert "not published here" in res.stdout


def test_no_key_is_one_clear_line() -> None:
    res = bg("balance", key=None)
    assert res.returncode == 2 and "GONKAGATE_API_KEY" in res.stderr and "Traceback" not in res.stderr
