from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test sees the developer's key, base URL or BATCHGATE_* settings; output goes to tmp."""
    import os

    for name in list(os.environ):
        if name.startswith(("BATCHGATE_", "GONKAGATE_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
