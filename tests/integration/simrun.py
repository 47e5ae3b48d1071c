"""The RunConfig integration tests use against an in-process simulator: fast backoff, no key limits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from batchgate.config import RunConfig


def sim_config(out: Path, url: str, **kw: Any) -> RunConfig:
    """A run into ``out`` against the simulator at ``url``; ``kw`` overrides any field.

    The simulator here enforces no per-key limits, so none are kept; and it serves made-up model
    ids its catalog lacks, so tests that use them pass ``check_models=False``.
    """
    base: dict[str, Any] = dict(
        out_dir=out,
        api_key="gp-test",
        base_url=url,
        default_model="sim-model",
        backoff_base_s=0.001,
        backoff_max_s=0.01,
        key_concurrency=None,
        key_rpm=None,
        key_burst_10s=None,
    )
    base.update(kw)
    return RunConfig(**base)
