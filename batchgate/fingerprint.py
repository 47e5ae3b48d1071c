"""The request fingerprint: what identifies an answer, so an edited prompt is never served a stale one.

Two requests with the same fingerprint ask the server the same question (model, messages and
every chat parameter, plus which sample of it), so one may stand in for the other: resume keeps
an ``ok`` row only while its fingerprint still matches what would be sent now, and the answer
cache is keyed by it.  Pure: no I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import orjson

__all__ = ["request_fingerprint"]

#: Transport settings the client adds; they do not change the answer.
_NOT_PART_OF_THE_QUESTION = frozenset({"stream", "stream_options"})


def request_fingerprint(body: Mapping[str, Any], sample: int = 0) -> str:
    """32 hex digits (BLAKE2b-128) of the body's canonical JSON and the sample index."""
    question = {k: v for k, v in body.items() if k not in _NOT_PART_OF_THE_QUESTION}
    digest = hashlib.blake2b(orjson.dumps(question, option=orjson.OPT_SORT_KEYS), digest_size=16)
    digest.update(b"\x00sample=%d" % sample)
    return digest.hexdigest()
