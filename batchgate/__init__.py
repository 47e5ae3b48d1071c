"""batchgate: stream JSONL prompt files to the GonkaGate chat API and account for every cent.

Library use::

    import asyncio
    from pathlib import Path
    import batchgate

    config = batchgate.RunConfig(out_dir=Path("reports/mine"), api_key=batchgate.load_api_key(), default_model="...")
    summary = asyncio.run(batchgate.run(["prompts.jsonl"], config))
    batchgate.build_reports([config.out_dir])  # report.html, summary.csv, ... beside the ledger
"""

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
from .reports import build_reports
from .runner import Runner, run

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
