"""The attempts topic: one record per HTTP attempt, the source of the delivery history.

Each record says what one attempt came to (time, duration, status code or error
class, a bounded snippet of the answer), where the delivery goes next (a retry
time or the dead-letter topic) and the request headers as sent: signatures are
there, a secret never is (they are derived from it, one way). The body travels
once per delivery, on its first attempt (and on the first attempt after a
resend), so history costs one copy of each body. Key = delivery id, so the
attempts of one delivery stay in order in one partition
(``schemas/attempt-record.schema.json``).

This module holds the record and its encoding only; the engine builds and writes
records in :mod:`dispatcher.core.attempt_log`.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from dispatcher.records import Source

#: A circuit's state as one dispatcher instance saw it (``core.breaker.State`` values).
CircuitState = Literal["closed", "open", "half_open"]


class AttemptRecord(BaseModel):
    """One attempt (``kind="attempt"``) or a resend request (``kind="resend"``)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["attempt", "resend"] = "attempt"
    delivery_id: str
    webhook_id: str
    organization_id: str
    event: str
    session_id: str | None = None
    event_timestamp: datetime
    source: Source
    attempt: int = Field(ge=0)
    stage: str
    at: datetime
    duration_ms: float = Field(0.0, ge=0)
    ok: bool = False
    status_code: int | None = None
    error_class: str = "none"
    error: str | None = None
    response_snippet: str | None = None
    next_retry_at: datetime | None = None
    dead_lettered: bool = False
    circuit: CircuitState | None = Field(
        None,
        description="The webhook's circuit in the instance that made the attempt, once "
        "its breaker had counted the answer; absent in records of earlier releases.",
    )
    request_headers: dict[str, str] = Field(default_factory=dict)
    body: str | None = Field(None, description="The exact body, on a delivery's first attempt.")
    requested_by: str | None = Field(None, description="API key name, on a resend.")

    def to_json(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


#: The body's top-level ``session_id``. The dispatcher writes the body itself, with
#: the top-level keys first and in a fixed order, and an unescaped ``"key":"`` cannot
#: occur inside a JSON string, so the first match is the top-level one. A tenth of
#: the cost of parsing the body, on every attempt.
_SESSION = re.compile(rb'"session_id":("(?:[^"\\]|\\.)*")')


def session_of(body: bytes) -> str | None:
    """The event's session id, read back from the body every attempt sends."""
    match = _SESSION.search(body)
    if match is None:
        return None
    text = match.group(1)
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        # orjson refuses a lone surrogate escape, which the body may hold.
        try:
            value = json.loads(text)
        except ValueError:
            return None
    return value if isinstance(value, str) else None


def attempt_json(doc: dict[str, Any]) -> bytes:
    """The record's value: compact JSON, datetimes in RFC 3339 with ``Z`` for UTC,
    byte for byte what pydantic writes for the same record."""
    return orjson.dumps(doc, option=orjson.OPT_UTC_Z)
