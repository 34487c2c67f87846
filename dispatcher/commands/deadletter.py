"""Reading the dead-letter topic: the dead letters, and which of them were replayed.

The topic is read whole, every partition from the beginning up to its end offset
as of the start of the command. Besides dead letters it holds *replay markers*
(see :mod:`dispatcher.commands.replay`): records keyed by the delivery id with the header
``dispatcher-replay-of: <partition>/<offset>`` naming the dead letter replayed.
A dead letter with a marker has been replayed already.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from pydantic import ValidationError

from dispatcher.errors import KafkaSetupError
from dispatcher.kafka import check_topic, make_table_consumer
from dispatcher.models import format_timestamp
from dispatcher.records import H_REPLAY_OF, DeliveryRecord, header_value
from dispatcher.settings import Settings

#: Reading stops with an error when no partition advanced for this long.
STALL_TIMEOUT_S = 30.0
#: Errors that end a read: retrying cannot help.
_TOPIC_GONE = frozenset(
    {
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError._UNKNOWN_TOPIC,
        KafkaError._UNKNOWN_PARTITION,
    }
)
#: Errors of a partition whose leader is moving or not yet known: worth a retry.
_TRANSIENT = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
    }
)


@dataclass(frozen=True, slots=True)
class Filters:
    """Which dead letters a command works on; an unset field selects everything."""

    webhook_id: str | None = None
    organization_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    delivery_ids: frozenset[str] = frozenset()

    @property
    def empty(self) -> bool:
        return not (
            self.webhook_id or self.organization_id or self.since or self.until or self.delivery_ids
        )

    def matches(self, record: DeliveryRecord) -> bool:
        """``since`` is inclusive and ``until`` exclusive, both on ``dead_lettered_at``."""
        if self.webhook_id and record.webhook_id != self.webhook_id:
            return False
        if self.organization_id and record.organization_id != self.organization_id:
            return False
        if self.delivery_ids and record.delivery_id not in self.delivery_ids:
            return False
        when = record.dead_lettered_at
        if self.since and (when is None or when < self.since):
            return False
        return not (self.until and (when is None or when >= self.until))


@dataclass(frozen=True, slots=True)
class Marker:
    """The record of one replay, found in the dead-letter topic."""

    partition: int
    offset: int
    replayed_at: datetime | None


@dataclass(slots=True)
class DeadLetter:
    """One dead-lettered delivery, where it sits, and its replay if there was one."""

    partition: int
    offset: int
    record: DeliveryRecord
    replayed: Marker | None = None

    @property
    def position(self) -> str:
        return f"{self.partition}/{self.offset}"

    def view(self, with_body: bool = False) -> dict[str, object]:
        """JSON for operators: the record (its body only if asked) and its position."""
        data: dict[str, object] = {"partition": self.partition, "offset": self.offset}
        data.update(self.record.model_dump(mode="json", exclude=None if with_body else {"body"}))
        data["replayed"] = self.replayed is not None
        data["replayed_at"] = (
            format_timestamp(self.replayed.replayed_at)
            if self.replayed and self.replayed.replayed_at
            else None
        )
        return data


@dataclass(slots=True)
class Scan:
    """The dead letters that matched, oldest first, and what could not be read."""

    letters: list[DeadLetter]
    markers: int = 0
    unreadable: int = 0


def read(settings: Settings, filters: Filters, keep_body: bool = False) -> Scan:
    """Every matching dead letter now in the topic, each with its replay marker if any.

    Bodies are dropped unless ``keep_body``, so listing a large topic stays small.
    """
    topic = settings.dead_letter_topic
    letters: list[DeadLetter] = []
    markers: dict[tuple[int, int], Marker] = {}
    unreadable = 0
    for msg in _read_topic(settings, topic):
        partition, offset = msg.partition(), msg.offset()
        assert partition is not None and offset is not None
        headers = msg.headers()
        replay_of = header_value(headers, H_REPLAY_OF)
        if replay_of is not None:
            target = _parse_position(replay_of)
            if target is not None:
                markers[target] = Marker(partition, offset, _marker_time(msg.value()))
            continue
        try:
            record = DeliveryRecord.model_validate_json(msg.value() or b"")
        except ValidationError:
            unreadable += 1
            continue
        if not filters.matches(record):
            continue
        if not keep_body:
            record.body = ""
        letters.append(DeadLetter(partition, offset, record))
    for letter in letters:
        letter.replayed = markers.get((letter.partition, letter.offset))
    letters.sort(key=_age)
    return Scan(letters, len(markers), unreadable)


def _read_topic(settings: Settings, topic: str) -> Iterable[Message]:
    consumer = make_table_consumer(settings)
    try:
        tmeta = check_topic(consumer, settings, topic, 15)
        ends: dict[int, int] = {}
        for p in sorted(tmeta.partitions):
            low, high = _watermarks(consumer, TopicPartition(topic, p))
            if high > low:
                ends[p] = high
        if not ends:
            return
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        stalled_at = time.monotonic() + STALL_TIMEOUT_S
        while ends:
            # consume() waits out its timeout unless the batch fills: keep it short.
            batch = consumer.consume(500, timeout=0.1)
            if batch:
                stalled_at = time.monotonic() + STALL_TIMEOUT_S
            elif time.monotonic() > stalled_at:
                raise KafkaSetupError(
                    f"reading {topic} made no progress for {STALL_TIMEOUT_S:.0f} s "
                    f"({len(ends)} partition(s) not read to their end)"
                )
            for msg in batch:
                partition, offset = msg.partition(), msg.offset()
                assert partition is not None and offset is not None
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        _reached(ends, partition, offset)
                        continue
                    if err.fatal() or err.code() in _TOPIC_GONE:
                        raise KafkaSetupError(f"reading {topic}: {err.str()}")
                    continue  # librdkafka retries on its own; a stall is caught above
                if partition in ends:
                    # Records past the end noted at the start belong to a later run.
                    if offset < ends[partition]:
                        yield msg
                    _reached(ends, partition, offset + 1)
    finally:
        consumer.close()


def _watermarks(consumer: Consumer, tp: TopicPartition, attempts: int = 5) -> tuple[int, int]:
    """Low and high offsets, riding out a leader election (NOT_LEADER and the like)."""
    for attempt in range(attempts):
        try:
            low, high = consumer.get_watermark_offsets(tp, timeout=15)
            return int(low), int(high)
        except KafkaException as exc:
            err = exc.args[0]
            retriable = isinstance(err, KafkaError) and (
                err.retriable() or err.code() in _TRANSIENT
            )
            if not retriable or attempt == attempts - 1:
                raise KafkaSetupError(
                    f"cannot read the end offsets of {tp.topic} [{tp.partition}]: {err}"
                ) from None
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def _reached(ends: dict[int, int], partition: int, position: int) -> None:
    if partition in ends and position >= ends[partition]:
        del ends[partition]


def _parse_position(raw: bytes) -> tuple[int, int] | None:
    partition, _, offset = raw.decode("ascii", "replace").partition("/")
    try:
        return int(partition), int(offset)
    except ValueError:
        return None


def _marker_time(value: bytes | None) -> datetime | None:
    try:
        return datetime.fromisoformat(json.loads(value or b"")["replayed_at"])
    except (ValueError, KeyError, TypeError):
        return None


def _age(letter: DeadLetter) -> tuple[datetime, int, int]:
    when = letter.record.dead_lettered_at or datetime.min.replace(tzinfo=UTC)
    return when, letter.partition, letter.offset
