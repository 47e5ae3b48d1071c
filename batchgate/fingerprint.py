"""The request fingerprint: one stable name for "the same question", for the ledger and the answer cache."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import orjson

__all__ = ["request_fingerprint"]

_TRANSPORT_KEYS = frozenset({"stream", "stream_options"})  # how the answer travels, not what it is


def request_fingerprint(body: Mapping[str, Any], sample: int = 0) -> str:
    """32 hex chars: BLAKE2b-128 of the body (minus stream/stream_options) as sorted-key JSON, then the sample index.

    Model, messages and every sampling parameter are in the key, so two requests share a
    fingerprint only when the server would see the same question.  ``sample`` tells apart the
    answers of one prompt sampled several times.  Raises TypeError for a body orjson cannot encode.
    """
    trimmed = {k: v for k, v in body.items() if k not in _TRANSPORT_KEYS}
    digest = hashlib.blake2b(orjson.dumps(trimmed, option=orjson.OPT_SORT_KEYS), digest_size=16)
    digest.update(b"\nsample=%d" % sample)
    return digest.hexdigest()
