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
import struct
import sys
import threading
from array import array
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Final

from confluent_kafka import Consumer
from confluent_kafka import TopicPartition as TP
from pydantic import ValidationError

from dispatcher.attempts import AttemptRecord
from dispatcher.follow import Follower
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
    has_body: bool = False


# An attempt packed into 36 bytes: flags, attempt, status code (-1 = none), time,
# duration, error class (index into _ERRORS), next retry (-1 = none), partition,
# offset. Kept as objects, an attempt cost about 200 bytes; a million deliveries
# made that the bulk of the index (bench/history_memory.py).
_PACKED = struct.Struct("<BHhqfBqHq")
_RESEND, _OK, _DEAD, _BODY = 1, 2, 4, 8
_ERRORS: list[str] = ["none", "http", "timeout", "connection", "tls", "blocked", "other"]
_ERROR_INDEX = {name: i for i, name in enumerate(_ERRORS)}


def _error_index(name: str) -> int:
    index = _ERROR_INDEX.get(name)
    if index is None:
        if len(_ERRORS) >= 255:  # a closed set in practice; never let it grow without bound
            return _ERROR_INDEX["other"]
        index = _ERROR_INDEX[name] = len(_ERRORS)
        _ERRORS.append(sys.intern(name))
    return index


def _unpack(packed: bytes) -> list[AttemptLine]:
    lines = []
    for (
        flags,
        attempt,
        status,
        at,
        duration,
        error,
        retry,
        partition,
        offset,
    ) in _PACKED.iter_unpack(packed):
        lines.append(
            AttemptLine(
                "resend" if flags & _RESEND else "attempt",
                attempt,
                at,
                round(duration, 3),
                bool(flags & _OK),
                None if status < 0 else status,
                _ERRORS[error],
                None if retry < 0 else retry,
                bool(flags & _DEAD),
                partition,
                offset,
                bool(flags & _BODY),
            )
        )
    return lines


@dataclass(slots=True)
class DeliveryEntry:
    """One delivery of one webhook; its attempts packed (see ``_PACKED``)."""

    seq: int
    delivery_id: str
    event: str
    session_id: str | None
    first_ms: int
    status: str = "pending"
    packed: bytes = b""

    @property
    def attempts(self) -> list[AttemptLine]:
        return _unpack(self.packed)

    @property
    def body_at(self) -> tuple[int, int] | None:
        """Where the record carrying the body is (the latest first attempt)."""
        for line in reversed(self.attempts):
            if line.has_body:
                return line.partition, line.offset
        return None

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


class WebhookHistory:
    """One webhook's deliveries (oldest first) and its counters, in compact arrays."""

    __slots__ = (
        "count_hours",
        "counts",
        "deliveries",
        "last_error",
        "last_ok",
        "lat_at",
        "lat_ms",
        "lat_next",
    )

    def __init__(self) -> None:
        self.deliveries: dict[str, DeliveryEntry] = {}  # insertion order = age
        # Successes and failures per hour for the last 25 hours, in a ring by hour.
        self.count_hours = array("q", [-1] * 25)
        self.counts = array("L", [0] * 50)
        # The latest attempts' times and durations, in a ring.
        self.lat_at = array("q")
        self.lat_ms = array("f")
        self.lat_next = 0
        self.last_error: LastError | None = None
        self.last_ok: bool | None = None

    def count(self, hour: int, ok: bool) -> None:
        slot = hour % 25
        if self.count_hours[slot] != hour:
            self.count_hours[slot] = hour
            self.counts[2 * slot] = self.counts[2 * slot + 1] = 0
        self.counts[2 * slot + (0 if ok else 1)] += 1

    def latency(self, at_ms: int, duration_ms: float) -> None:
        if len(self.lat_at) < LATENCIES_KEPT:
            self.lat_at.append(at_ms)
            self.lat_ms.append(duration_ms)
            return
        self.lat_at[self.lat_next] = at_ms
        self.lat_ms[self.lat_next] = duration_ms
        self.lat_next = (self.lat_next + 1) % LATENCIES_KEPT


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
                self._seq, r.delivery_id, sys.intern(r.event), r.session_id, at_ms
            )
            hist.deliveries[r.delivery_id] = entry
            while len(hist.deliveries) > self.per_webhook:
                del hist.deliveries[next(iter(hist.deliveries))]
        flags = (
            (_RESEND if r.kind == "resend" else 0)
            | (_OK if r.ok else 0)
            | (_DEAD if r.dead_lettered else 0)
            | (_BODY if r.body is not None else 0)
        )
        entry.packed += _PACKED.pack(
            flags,
            min(r.attempt, 65535),
            -1 if r.status_code is None else max(min(r.status_code, 32767), -1),
            at_ms,
            r.duration_ms,
            _error_index(r.error_class),
            -1 if r.next_retry_at is None else to_ms(r.next_retry_at),
            min(partition, 65535),
            offset,
        )
        if r.kind == "resend":
            entry.status = "pending"
            return
        entry.status = "succeeded" if r.ok else ("dead_lettered" if r.dead_lettered else "failing")
        hist.count(at_ms // HOUR_MS, r.ok)
        hist.latency(at_ms, r.duration_ms)
        hist.last_ok = r.ok
        if not r.ok:
            hist.last_error = LastError(at_ms, r.error_class, r.status_code, r.error)

    def forget_missing(self, live: set[str]) -> int:
        """Drop the histories of webhooks not in ``live`` (deleted); how many went.

        Attempts of a deleted webhook may still arrive (retries in flight), so this
        runs now and then rather than on the tombstone.
        """
        with self.lock:
            gone = [w for w in self.webhooks if w not in live]
            for webhook_id in gone:
                del self.webhooks[webhook_id]
        return len(gone)

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
            ok = failed = 0
            for slot, hour in enumerate(hist.count_hours):
                if hour >= first_hour:
                    ok += hist.counts[2 * slot]
                    failed += hist.counts[2 * slot + 1]
            recent = sorted(
                d for at, d in zip(hist.lat_at, hist.lat_ms, strict=True) if at >= since
            )
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
    return replace(entry)


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
