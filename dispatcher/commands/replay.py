"""Replaying dead letters through the retry path with a fresh attempt budget.

Each selected delivery goes back to the first retry stage, due now, with its
attempt count and history cleared (same delivery id, same body), so the stage
attempts it as attempt 1 and, should it fail again, retries it in full. Each
replay is then recorded in the dead-letter topic itself by a marker (see
:mod:`dispatcher.commands.deadletter`); dead letters with a marker are left out of later
replays, so running the same replay twice sends nothing the second time. A
replayed delivery that fails again is dead-lettered anew, at a new offset, and
can be replayed again.

The retry record is acknowledged before its marker is written: a crash in
between can at worst replay a delivery twice, never lose one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from confluent_kafka import Producer

from dispatcher.commands.deadletter import DeadLetter, Filters, read
from dispatcher.core.fanout import SKIP_REASONS, CallPolicy
from dispatcher.core.partitions import now_ms
from dispatcher.errors import KafkaSetupError
from dispatcher.kafka import Outgoing, check_topic, make_producer, produce_confirmed
from dispatcher.models import Subscription, format_timestamp
from dispatcher.records import H_DELIVERY_ID, H_REPLAY_OF, DeliveryRecord, record_headers
from dispatcher.settings import Settings
from dispatcher.stages import retry_stages

#: Retry records written before their markers are; bounds what a crash can replay twice.
REPLAY_BATCH = 500

Progress = Callable[[int, int], None]


@dataclass(slots=True)
class ReplayReport:
    """What a replay did (or, dry, would do)."""

    replayed: list[DeadLetter] = field(default_factory=list)
    #: Older dead letters of a delivery replayed once, through its newest dead letter.
    merged: list[DeadLetter] = field(default_factory=list)
    already_replayed: int = 0
    #: Left alone, not marked: replayable once their subscription is back.
    skipped: dict[str, list[DeadLetter]] = field(default_factory=dict)
    failed: list[tuple[DeadLetter, str]] = field(default_factory=list)
    topic: str = ""


def replay(
    settings: Settings,
    filters: Filters,
    table: Callable[[str], Subscription | None],
    *,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> ReplayReport:
    """Send the matching, not yet replayed dead letters back through attempt 1.

    ``table`` looks a subscription up by webhook id: a dead letter whose
    subscription the dispatcher would not call (deleted, disabled, not entitled,
    an insecure URL: :class:`CallPolicy`) is skipped and not marked, so it can be
    replayed once the subscription is fixed.
    """
    scan = read(settings, filters, keep_body=True)
    report = ReplayReport(topic=retry_stages(settings)[0].topic)
    policy = CallPolicy.of(settings)
    newest: dict[str, DeadLetter] = {}
    older: dict[str, list[DeadLetter]] = {}
    for letter in scan.letters:
        if letter.replayed is not None:
            report.already_replayed += 1
            continue
        reason = policy.refusal(table(letter.record.webhook_id))
        if reason is not None:
            report.skipped.setdefault(SKIP_REASONS[reason], []).append(letter)
            continue
        # At-least-once writing can leave one delivery dead-lettered twice: send it once.
        key = letter.record.delivery_id
        if key in newest:
            older.setdefault(key, []).append(newest[key])
            report.merged.append(newest[key])
        newest[key] = letter
    chosen = list(newest.values())
    if dry_run:
        report.replayed = chosen
        return report
    producer = make_producer(settings)
    check_topic(producer, settings, report.topic, 10.0)
    for start in range(0, len(chosen), REPLAY_BATCH):
        batch = chosen[start : start + REPLAY_BATCH]
        sent = _send_retries(producer, report.topic, batch, report.failed)
        _send_markers(settings, producer, report.topic, sent, older)
        report.replayed.extend(sent)
        if progress is not None:
            progress(start + len(batch), len(chosen))
    return report


def fresh_record(record: DeliveryRecord) -> DeliveryRecord:
    """The same delivery (id, body, source) with a new attempt budget."""
    return record.model_copy(
        update={
            "attempts_made": 0,
            "deferrals": 0,
            "first_failure_at": None,
            "first_deferred_at": None,
            "history": [],
            "dead_lettered_at": None,
            "dead_letter_reason": None,
        }
    )


def _send_retries(
    producer: Producer,
    topic: str,
    batch: list[DeadLetter],
    failed: list[tuple[DeadLetter, str]],
) -> list[DeadLetter]:
    """Write the batch to the first retry stage, due now; the dead letters acknowledged."""
    due = now_ms()
    records = []
    for letter in batch:
        record = fresh_record(letter.record)
        headers = record_headers(record, due, [(H_REPLAY_OF, letter.position.encode())])
        records.append(
            Outgoing(topic, record.to_json(), record.delivery_id.encode(), list(headers))
        )
    errors = produce_confirmed(producer, records, 60.0, "replayed")
    for index, error in errors.items():
        failed.append((batch[index], error))
    return [letter for index, letter in enumerate(batch) if index not in errors]


def _send_markers(
    settings: Settings,
    producer: Producer,
    retry_topic: str,
    sent: list[DeadLetter],
    older: dict[str, list[DeadLetter]],
) -> None:
    now = format_timestamp(datetime.now(UTC))
    records = []
    for letter in sent:
        key = letter.record.delivery_id
        for target in [letter, *older.get(key, [])]:
            value = {
                "replay_of": target.position,
                "delivery_id": key,
                "replayed_at": now,
                "replayed_to": retry_topic,
            }
            headers: list[tuple[str, str | bytes | None]] = [
                (H_REPLAY_OF, target.position.encode()),
                (H_DELIVERY_ID, key.encode()),
            ]
            records.append(
                Outgoing(
                    settings.dead_letter_topic, json.dumps(value).encode(), key.encode(), headers
                )
            )
    errors = produce_confirmed(producer, records, 60.0, "replay marker")
    if errors:
        raise KafkaSetupError(
            f"{len(sent)} deliveries were replayed, but {len(errors)} replay marker(s) could "
            f"not be written ({next(iter(errors.values()))}); replaying the same selection "
            "again would send those deliveries twice"
        )
