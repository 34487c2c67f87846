"""The delivery history index: the attempts topic folded into a bounded index per webhook.

For each webhook it keeps the latest ``DISPATCHER_API_HISTORY_PER_WEBHOOK``
deliveries, each with a compact line per attempt and the position of the
attempts-topic records behind it; the full records (headers, snippet, body) stay
in Kafka and are read back by position for the one delivery a caller opens. So
memory follows the number of deliveries kept, never their bodies. Next to that,
per webhook: successes and failures by hour for the last 24 h, recent latencies,
the last error.

A reader thread reads the topic from the beginning (``caught_up`` once it
reached the end offsets seen at start) and then follows it.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Final

from confluent_kafka import Consumer
from confluent_kafka import TopicPartition as TP
from pydantic import ValidationError

from dispatcher.api.follow import Follower
from dispatcher.attempts import AttemptRecord
from dispatcher.kafka import table_consumer_config
from dispatcher.settings import Settings

log = logging.getLogger(__name__)

HOUR_MS: Final = 3_600_000
LATENCIES_KEPT: Final = 512
STATUSES: Final = ("succeeded", "failing", "dead_lettered", "pending")


def to_ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


def from_ms(value: int) -> datetime:
    return datetime.fromtimestamp(value / 1000, UTC)


@dataclass(slots=True)
class AttemptLine:
    """One attempt (or resend request) as the index keeps it; ``offset`` finds the record."""

    kind: str
    attempt: int
    at_ms: int
    duration_ms: float
    ok: bool
    status_code: int | None
    error_class: str
    next_retry_ms: int | None
    dead_lettered: bool
    partition: int
    offset: int


@dataclass(slots=True)
class DeliveryEntry:
    """One delivery of one webhook."""

    seq: int
    delivery_id: str
    event: str
    session_id: str | None
    first_ms: int
    status: str = "pending"
    attempts: list[AttemptLine] = field(default_factory=list)
    body_at: tuple[int, int] | None = None

    @property
    def last(self) -> AttemptLine | None:
        for line in reversed(self.attempts):
            if line.kind == "attempt":
                return line
        return None


@dataclass(slots=True)
class LastError:
    at_ms: int
    error_class: str
    status_code: int | None
    error: str | None


@dataclass(slots=True)
class WebhookHistory:
    deliveries: OrderedDict[str, DeliveryEntry] = field(default_factory=OrderedDict)
    hours: dict[int, list[int]] = field(default_factory=dict)
    latencies: deque[tuple[int, float]] = field(
        default_factory=lambda: deque(maxlen=LATENCIES_KEPT)
    )
    last_error: LastError | None = None
    last_ok: bool | None = None


class HistoryIndex:
    """Per-webhook delivery history; one writer thread, readers take the lock briefly."""

    def __init__(self, per_webhook: int) -> None:
        self.per_webhook = per_webhook
        self.webhooks: dict[str, WebhookHistory] = {}
        self.lock = threading.Lock()
        self._seq = 0
        self.invalid_records = 0

    def apply(self, record: AttemptRecord, partition: int, offset: int) -> None:
        with self.lock:
            self._apply(record, partition, offset)

    def _apply(self, r: AttemptRecord, partition: int, offset: int) -> None:
        hist = self.webhooks.get(r.webhook_id)
        if hist is None:
            hist = self.webhooks[r.webhook_id] = WebhookHistory()
        entry = hist.deliveries.get(r.delivery_id)
        at_ms = to_ms(r.at)
        if entry is None:
            self._seq += 1
            entry = DeliveryEntry(
                self._seq,
                r.delivery_id,
                sys.intern(r.event),
                r.session_id,
                at_ms,
            )
            hist.deliveries[r.delivery_id] = entry
            while len(hist.deliveries) > self.per_webhook:
                hist.deliveries.popitem(last=False)
        line = AttemptLine(
            sys.intern(r.kind),
            r.attempt,
            at_ms,
            r.duration_ms,
            r.ok,
            r.status_code,
            sys.intern(r.error_class),
            None if r.next_retry_at is None else to_ms(r.next_retry_at),
            r.dead_lettered,
            partition,
            offset,
        )
        entry.attempts.append(line)
        if r.body is not None:
            entry.body_at = (partition, offset)
        if r.kind == "resend":
            entry.status = "pending"
            return
        entry.status = "succeeded" if r.ok else ("dead_lettered" if r.dead_lettered else "failing")
        hour = at_ms // HOUR_MS
        counts = hist.hours.setdefault(hour, [0, 0])
        counts[0 if r.ok else 1] += 1
        for old in [h for h in hist.hours if h < hour - 24]:
            del hist.hours[old]
        hist.latencies.append((at_ms, r.duration_ms))
        hist.last_ok = r.ok
        if not r.ok:
            hist.last_error = LastError(at_ms, r.error_class, r.status_code, r.error)

    # --- queries ----------------------------------------------------------
    def deliveries(
        self,
        webhook_id: str,
        *,
        status: str | None = None,
        since_ms: int | None = None,
        until_ms: int | None = None,
        session_id: str | None = None,
        before_seq: int | None = None,
        limit: int = 50,
    ) -> tuple[list[DeliveryEntry], bool]:
        """Newest first; returns the page and whether more follow."""
        with self.lock:
            hist = self.webhooks.get(webhook_id)
            if hist is None:
                return [], False
            page: list[DeliveryEntry] = []
            for entry in reversed(hist.deliveries.values()):
                if before_seq is not None and entry.seq >= before_seq:
                    continue
                if status is not None and entry.status != status:
                    continue
                if since_ms is not None and entry.first_ms < since_ms:
                    continue
                if until_ms is not None and entry.first_ms >= until_ms:
                    continue
                if session_id is not None and entry.session_id != session_id:
                    continue
                if len(page) == limit:
                    return page, True
                page.append(_snapshot(entry))
            return page, False

    def delivery(self, webhook_id: str, delivery_id: str) -> DeliveryEntry | None:
        with self.lock:
            hist = self.webhooks.get(webhook_id)
            entry = None if hist is None else hist.deliveries.get(delivery_id)
            return None if entry is None else _snapshot(entry)

    def summary(self, webhook_id: str, now_ms: int) -> dict[str, object]:
        with self.lock:
            hist = self.webhooks.get(webhook_id) or WebhookHistory()
            since = now_ms - 24 * HOUR_MS
            first_hour = since // HOUR_MS
            ok = sum(c[0] for h, c in hist.hours.items() if h >= first_hour)
            failed = sum(c[1] for h, c in hist.hours.items() if h >= first_hour)
            recent = sorted(d for at, d in hist.latencies if at >= since)
            err = hist.last_error
        return {
            "successes_24h": ok,
            "failures_24h": failed,
            "latency_ms": {f"p{q}": _percentile(recent, q) for q in (50, 90, 99)},
            "last_error": None
            if err is None
            else {
                "at": from_ms(err.at_ms),
                "error_class": err.error_class,
                "status_code": err.status_code,
                "error": err.error,
            },
            "failing_now": hist.last_ok is False,
        }


def _snapshot(entry: DeliveryEntry) -> DeliveryEntry:
    """A copy that the reader thread will not change while a request reads it."""
    return replace(entry, attempts=list(entry.attempts))


def _percentile(sorted_values: list[float], q: int) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, round(q / 100 * (len(sorted_values) - 1)))
    return round(sorted_values[index], 3)


class HistoryReader(Follower):
    """Feeds a :class:`HistoryIndex` from the attempts topic and reads records back."""

    name = "delivery history"

    def __init__(self, settings: Settings, index: HistoryIndex) -> None:
        super().__init__(settings, (settings.attempts_topic,))
        self.index = index
        self._fetch_lock = threading.Lock()
        self._fetcher: Consumer | None = None

    def start(self) -> None:
        super().start()
        self._fetcher = Consumer(table_consumer_config(self.settings))

    def stop(self) -> None:
        super().stop()
        with self._fetch_lock:
            if self._fetcher is not None:
                self._fetcher.close()
                self._fetcher = None

    def apply(
        self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None
    ) -> None:
        try:
            record = AttemptRecord.model_validate_json(value or b"")
        except ValidationError:
            self.index.invalid_records += 1
            return
        self.index.apply(record, partition, offset)

    def read(self, partition: int, offset: int, timeout_s: float = 10.0) -> AttemptRecord | None:
        """The attempts-topic record at one position (None if gone with retention)."""
        with self._fetch_lock:
            if self._fetcher is None:
                return None
            self._fetcher.assign([TP(self.settings.attempts_topic, partition, offset)])
            msgs = self._fetcher.consume(1, timeout=timeout_s)
            if not msgs or msgs[0].error() is not None or msgs[0].offset() != offset:
                return None
            try:
                return AttemptRecord.model_validate_json(msgs[0].value() or b"")
            except ValidationError:
                return None
