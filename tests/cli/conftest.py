from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from clitools import Sim, simulator_fixture


@pytest.fixture
def simulator(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Sim]:
    """A `batchgate simulate` process; parametrize indirectly with extra CLI args."""
    yield from simulator_fixture(tmp_path, request)
