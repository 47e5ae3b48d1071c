"""Structured answers: the ``response_format`` to send, and whether an answer matches its JSON Schema.

An answer that does not match is still an answer the server billed: it is kept (``valid:
false`` with the first error) and never silently bought again; a re-ask is a new, paid request
that shows the model its mistake.  jsonschema is imported only when a schema is given (it costs
~0.1-0.3 s at start-up).  Pure: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from .errors import InputError

__all__ = ["AnswerSchema", "Verdict"]

_FENCE = re.compile(r"^\s*```(?:json|JSON)?\s*\n(.*?)\n?```\s*$", re.DOTALL)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What an answer's text holds: the parsed object (None if not JSON) and whether it fits the schema."""

    parsed: Any
    valid: bool
    error: str | None

    def as_row(self) -> dict[str, Any]:
        return {"parsed": self.parsed, "valid": self.valid, "valid_error": self.error}


class AnswerSchema:
    """A JSON Schema every answer must match; raises InputError for a schema that is not one."""

    def __init__(self, schema: Any, *, name: str = "answer", mode: str = "json_schema", source: str = "schema") -> None:
        import jsonschema

        if not isinstance(schema, dict):
            raise InputError(f"{source}: a JSON Schema must be an object, not {type(schema).__name__}")
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        try:
            cls.check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise InputError(f"{source}: not a valid JSON Schema: {exc.message}") from None
        if mode not in ("json_schema", "json_object"):
            raise InputError(f"{source}: response format mode must be json_schema or json_object, not {mode!r}")
        self.schema = schema
        self.name = re.sub(r"[^A-Za-z0-9_-]", "_", name)[:64] or "answer"
        self.mode = mode
        self._validator = cls(schema)

    def response_format(self) -> dict[str, Any]:
        """``json_schema`` where the model supports it; ``json_object`` asks only for JSON."""
        if self.mode == "json_object":
            return {"type": "json_object"}
        return {"type": "json_schema", "json_schema": {"name": self.name, "schema": self.schema, "strict": True}}

    def check(self, content: str) -> Verdict:
        """Parse the answer (a fenced ```json block is unwrapped) and validate it."""
        text = content.strip()
        fenced = _FENCE.match(text)
        if fenced:
            text = fenced.group(1)
        try:
            parsed = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            return Verdict(None, False, f"not JSON: {exc}"[:300])
        error = next(iter(self._validator.iter_errors(parsed)), None)
        if error is None:
            return Verdict(parsed, True, None)
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        return Verdict(parsed, False, f"at {where}: {error.message}"[:300])

    @staticmethod
    def reask(body: dict[str, Any], answer: str, error: str) -> dict[str, Any]:
        """The next request: the conversation so far, the answer, and what was wrong with it."""
        messages = [
            *body.get("messages", []),
            {"role": "assistant", "content": answer},
            {
                "role": "user",
                "content": f"Your answer does not match the required JSON Schema ({error}). "
                "Reply again with only the corrected JSON.",
            },
        ]
        return {**body, "messages": messages}

    @staticmethod
    def reask_after_length(body: dict[str, Any], answer: str) -> dict[str, Any]:
        """The next request after an answer cut by ``max_tokens``: ask for a shorter one."""
        messages = [
            *body.get("messages", []),
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "Your answer was cut off at the length limit. Answer again, more briefly."},
        ]
        return {**body, "messages": messages}
