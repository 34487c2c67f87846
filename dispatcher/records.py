"""The retry / dead-letter record: one delivery, its exact body and its history.

The value is JSON (``schemas/delivery-record.schema.json``); the routing facts a
stage needs before parsing it (due time, attempt) also travel as headers, which
are written afresh on every hop so they never pile up. No secret is ever part
of a record: the subscription is looked up again when the delivery is retried.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field

H_DUE_MS: Final = "dispatcher-due-ms"
H_ATTEMPT: Final = "dispatcher-attempt"
H_DELIVERY_ID: Final = "dispatcher-delivery-id"
H_WEBHOOK_ID: Final = "dispatcher-webhook-id"
H_FIRST_FAILURE_MS: Final = "dispatcher-first-failure-ms"
H_SOURCE: Final = "dispatcher-source"
H_LAST_ERROR: Final = "dispatcher-last-error"
H_REPLAY_OF: Final = "dispatcher-replay-of"

Headers = list[tuple[str, bytes]]


def delivery_id_for(topic: str, partition: int, offset: int, webhook_id: str) -> str:
    """A stable id for one (event, endpoint) pair.

    Derived from the event's position, so a redelivery after a crash carries the
    same id and receivers can deduplicate on it.
    """
    digest = hashlib.sha256(f"{topic}\0{partition}\0{offset}\0{webhook_id}".encode()).hexdigest()
    return f"msg_{digest[:32]}"


class Source(BaseModel):
    """Where the event was first read."""

    model_config = ConfigDict(extra="forbid")

    topic: str
    partition: int = Field(ge=0)
    offset: int = Field(ge=0)


class Attempt(BaseModel):
    """One HTTP attempt of a delivery."""

    model_config = ConfigDict(extra="forbid")

    attempt: int = Field(ge=1)
    stage: str
    at: datetime
    duration_ms: float = Field(ge=0)
    status_code: int | None = None
    error_class: str
    error: str | None = None
    response_snippet: str | None = None


class DeliveryRecord(BaseModel):
    """A delivery on its way through the retry topics, or parked in the dead-letter topic."""

    model_config = ConfigDict(extra="forbid")

    delivery_id: str
    webhook_id: str
    organization_id: str
    event: str
    event_timestamp: datetime
    body: str = Field(description="The exact UTF-8 body sent on every attempt.")
    attempts_made: int = Field(ge=0)
    deferrals: int = Field(0, ge=0)
    first_failure_at: datetime | None = None
    first_deferred_at: datetime | None = None
    source: Source
    history: list[Attempt] = Field(default_factory=list)
    dead_lettered_at: datetime | None = None
    dead_letter_reason: str | None = None

    @property
    def body_bytes(self) -> bytes:
        return self.body.encode("utf-8")

    def last_error(self) -> str:
        if not self.history:
            return ""
        last = self.history[-1]
        code = f" {last.status_code}" if last.status_code is not None else ""
        return f"{last.error_class}{code}"

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()

    def hop(self) -> int | None:
        """The same for every copy of one hop of one delivery, else (nearly surely) not.

        Along a delivery's chain every hop adds an attempt or a deferral, and a
        chain started again (by an input message read twice, or a replay) gets new
        first-failure or first-deferral times: two records with the same values
        here are copies of one hop, as a crash between writing a hop and
        committing the record it came from leaves. None for a record that starts
        a chain (a replay: no attempt, no deferral).
        """
        if self.attempts_made == 0 and self.deferrals == 0:
            return None
        return hash(
            (
                self.delivery_id,
                self.attempts_made,
                self.deferrals,
                self.first_failure_at,
                self.first_deferred_at,
            )
        )


def record_headers(
    record: DeliveryRecord, due_ms: int, extra: Sequence[tuple[str, bytes]] = ()
) -> Headers:
    """Fresh headers for one hop; never copied from the previous hop."""
    headers: Headers = [
        (H_DUE_MS, str(due_ms).encode()),
        (H_ATTEMPT, str(record.attempts_made).encode()),
        (H_DELIVERY_ID, record.delivery_id.encode()),
        (H_WEBHOOK_ID, record.webhook_id.encode()),
        (
            H_SOURCE,
            f"{record.source.topic}/{record.source.partition}/{record.source.offset}".encode(),
        ),
    ]
    if record.first_failure_at is not None:
        first_ms = int(record.first_failure_at.timestamp() * 1000)
        headers.append((H_FIRST_FAILURE_MS, str(first_ms).encode()))
    last = record.last_error()
    if last:
        headers.append((H_LAST_ERROR, last.encode()[:200]))
    headers.extend(extra)
    return headers


def header_value(headers: Any, name: str) -> bytes | None:
    """The first value of a header in confluent-kafka's list of pairs, or None."""
    for key, value in headers or ():
        if key == name:
            return value if isinstance(value, bytes) else None
    return None


def due_ms_of(headers: Any) -> int:
    """The absolute due time of a retry record (0 = due now, for a missing header)."""
    raw = header_value(headers, H_DUE_MS)
    try:
        return int(raw) if raw else 0
    except ValueError:
        return 0
