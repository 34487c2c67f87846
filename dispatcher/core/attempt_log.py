"""Writing the attempts topic: the record of each finished attempt, built from the
delivery in hand (:mod:`dispatcher.attempts` holds the record type and encoding).

Writing is fire-and-forget on purpose: the history is an account of deliveries,
not part of them, and an attempt must never wait for it.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from dispatcher.attempts import CircuitState, attempt_json, session_of
from dispatcher.core.breaker import State
from dispatcher.models import Subscription
from dispatcher.records import Source

if TYPE_CHECKING:
    from dispatcher.core.producer import RecordSink
    from dispatcher.core.routing import NextHop
    from dispatcher.outbound.delivery import AttemptResult

log = logging.getLogger(__name__)


class Delivery(Protocol):
    """What a record reads from a delivery (``core.deliveries.Delivery`` has it), named
    here so that the engine imports this module and not the other way round."""

    @property
    def sub(self) -> Subscription: ...
    @property
    def delivery_id(self) -> str: ...
    @property
    def body(self) -> bytes: ...
    @property
    def event(self) -> str: ...
    @property
    def event_time(self) -> datetime: ...
    @property
    def stage(self) -> str: ...
    @property
    def source(self) -> Source: ...


#: Headers that could carry a credential are never recorded (none is sent today;
#: this keeps it so if one is ever added).
_NEVER_RECORDED = frozenset({"authorization", "proxy-authorization", "cookie"})

#: The breaker's states as the record names them.
_CIRCUIT: dict[State, CircuitState] = {
    State.CLOSED: "closed",
    State.OPEN: "open",
    State.HALF_OPEN: "half_open",
}


def attempt_doc(
    d: Delivery,
    attempt: int,
    headers: dict[str, str],
    result: AttemptResult,
    hop: NextHop | None,
    now: datetime | None = None,
    circuit: State | None = None,
) -> dict[str, Any]:
    """The record of one finished attempt as a plain document; ``hop`` is None after a
    success, ``circuit`` the webhook's circuit once the breaker counted the answer.

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
    if circuit is not None:
        doc["circuit"] = _CIRCUIT[circuit]
    doc["request_headers"] = _recordable(headers)
    if attempt == 1:
        doc["body"] = d.body.decode("utf-8")
    return doc


#: Whether a set of header names (attempts send the same few) is free of any that is
#: never recorded; bounded, as the names come from the code, not from requests.
_CLEAN_NAMES: dict[tuple[str, ...], bool] = {}
_CLEAN_NAMES_MAX = 64


def _recordable(headers: dict[str, str]) -> dict[str, str]:
    """``headers`` without those that could carry a credential (a copy)."""
    names = tuple(headers)
    clean = _CLEAN_NAMES.get(names)
    if clean is None:
        clean = not any(k.lower() in _NEVER_RECORDED for k in names)
        if len(_CLEAN_NAMES) < _CLEAN_NAMES_MAX:
            _CLEAN_NAMES[names] = clean
    if clean:
        return dict(headers)
    return {k: v for k, v in headers.items() if k.lower() not in _NEVER_RECORDED}


def emit_attempt(
    producer: RecordSink,
    topic: str,
    d: Delivery,
    attempt: int,
    headers: dict[str, str],
    result: AttemptResult,
    hop: NextHop | None,
    circuit: State | None = None,
) -> None:
    """Queue the attempt's record; a failure to write it is logged, never raised."""
    try:
        value = attempt_json(attempt_doc(d, attempt, headers, result, hop, circuit=circuit))
        producer.produce_nowait(topic, value, d.delivery_id.encode())
    except Exception:
        log.exception("attempt record not written", extra={"delivery_id": d.delivery_id})
