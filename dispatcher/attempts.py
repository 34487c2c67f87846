"""The attempts topic: one record per HTTP attempt, the source of the delivery history.

Each record says what one attempt came to (time, duration, status code or error
class, a bounded snippet of the answer), where the delivery goes next (a retry
time or the dead-letter topic) and the request headers as sent: signatures are
there, a secret never is (they are derived from it, one way). The body travels
once per delivery, on its first attempt (and on the first attempt after a
resend), so history costs one copy of each body. Key = delivery id, so the
attempts of one delivery stay in order in one partition
(``schemas/attempt-record.schema.json``).

Writing is fire-and-forget on purpose: the history is an account of deliveries,
not part of them, and an attempt must never wait for it.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from dispatcher.records import Source

if TYPE_CHECKING:
    from dispatcher.core.deliveries import Delivery
    from dispatcher.core.producer import RecordSink
    from dispatcher.core.routing import NextHop
    from dispatcher.outbound.delivery import AttemptResult

log = logging.getLogger(__name__)

#: Headers that could carry a credential are never recorded (none is sent today;
#: this keeps it so if one is ever added).
_NEVER_RECORDED = frozenset({"authorization", "proxy-authorization", "cookie"})


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
    try:
        value = json.loads(match.group(1))
    except ValueError:
        return None
    return value if isinstance(value, str) else None


def attempt_doc(
    d: Delivery,
    attempt: int,
    headers: dict[str, str],
    result: AttemptResult,
    hop: NextHop | None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The record of one finished attempt as a plain document; ``hop`` is None after a
    success.

    Built without pydantic: every value comes typed from the delivery in hand, and
    this runs on every attempt. The keys are :class:`AttemptRecord`'s fields in
    their order, ``None`` left out, so :func:`attempt_json` writes the very bytes
    ``AttemptRecord.to_json`` would (the schema test checks both).
    """
    source = d.source
    doc: dict[str, Any] = {
        "kind": "attempt",
        "delivery_id": d.delivery_id,
        "webhook_id": d.sub.webhook_id,
        "organization_id": d.sub.organization_id,
        "event": d.event,
    }
    session_id = session_of(d.body)
    if session_id is not None:
        doc["session_id"] = session_id
    doc["event_timestamp"] = d.event_time
    doc["source"] = {"topic": source.topic, "partition": source.partition, "offset": source.offset}
    doc["attempt"] = attempt
    doc["stage"] = d.stage
    doc["at"] = now or datetime.now(UTC)
    doc["duration_ms"] = round(result.duration_s * 1000, 3)
    doc["ok"] = result.ok
    if result.status_code is not None:
        doc["status_code"] = result.status_code
    doc["error_class"] = result.error_class
    if result.error is not None:
        doc["error"] = result.error
    if result.snippet is not None:
        doc["response_snippet"] = result.snippet
    if hop is not None and hop.stage is not None:
        doc["next_retry_at"] = datetime.fromtimestamp(hop.due_ms / 1000, UTC)
    doc["dead_lettered"] = hop is not None and hop.stage is None
    doc["request_headers"] = {k: v for k, v in headers.items() if k.lower() not in _NEVER_RECORDED}
    if attempt == 1:
        doc["body"] = d.body.decode("utf-8")
    return doc


def attempt_json(doc: dict[str, Any]) -> bytes:
    """The record's value: compact JSON, datetimes in RFC 3339 with ``Z`` for UTC,
    byte for byte what pydantic writes for the same record."""
    return orjson.dumps(doc, option=orjson.OPT_UTC_Z)


def emit_attempt(
    producer: RecordSink,
    topic: str,
    d: Delivery,
    attempt: int,
    headers: dict[str, str],
    result: AttemptResult,
    hop: NextHop | None,
) -> None:
    """Queue the attempt's record; a failure to write it is logged, never raised."""
    try:
        value = attempt_json(attempt_doc(d, attempt, headers, result, hop))
        producer.produce_nowait(topic, value, d.delivery_id.encode())
    except Exception:
        log.exception("attempt record not written", extra={"delivery_id": d.delivery_id})
