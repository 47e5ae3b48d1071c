"""batchgate: stream JSONL prompt files to the GonkaGate chat API and account for every cent.

Library use::

    import asyncio
    from pathlib import Path
    import batchgate

    config = batchgate.RunConfig(out_dir=Path("reports/mine"), api_key=batchgate.load_api_key(), default_model="...")
    summary = asyncio.run(batchgate.run(["prompts.jsonl"], config))
    batchgate.build_reports([config.out_dir])  # report.html, summary.csv, ... beside the ledger
"""

from typing import TYPE_CHECKING, Any

from .config import RunConfig, load_api_key
from .errors import (
    ApiError,
    BatchgateError,
    InputError,
    InsufficientBalance,
    LedgerError,
    OutputLocked,
    RetryableError,
)
from .models import LEDGER_FIELDS, PromptRecord, RunSummary

if TYPE_CHECKING:
    from .reports import build_reports
    from .runner import Runner, run

# Imported on first use, so that `batchgate report`, `status` and completion do not load aiohttp
# and the engine (PEP 562).
_LAZY = {"Runner": ".runner", "run": ".runner", "build_reports": ".reports"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LEDGER_FIELDS",
    "ApiError",
    "BatchgateError",
    "InputError",
    "InsufficientBalance",
    "LedgerError",
    "OutputLocked",
    "PromptRecord",
    "RetryableError",
    "RunConfig",
    "RunSummary",
    "Runner",
    "build_reports",
    "load_api_key",
    "run",
]
