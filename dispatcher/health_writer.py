"""The writer's fold of the attempts and dead-letter topics into webhook health,
notifications and auto-disables, exactly once per episode.

Runs on a thread of the process that holds the configuration writer role
(:mod:`dispatcher.config_writer`), which is alone and fenced. It reads the
attempts topic (every dispatcher instance writes there; they decide nothing about
health) and, for each batch, commits through the writer's transactional producer,
in **one transaction**: the health records of the webhooks the batch changed, the
notifications they give, the subscription records of webhooks it disables
(:func:`dispatcher.manage.disable_failing`), and its own position in the attempts
and dead-letter topics (a record of the health topic,
:data:`~dispatcher.webhook_health.POSITION_KEY`). The dead-letter topic is folded
for the digest: it holds every dead-lettered delivery, those that never had an
attempt (``endpoint_unavailable``, ``webhook_disabled``) too, and no secret.

Why exactly once: the health state and the position are read back from the
health topic (``read_committed``, part of the writer's
:class:`~dispatcher.config_state.ConfigView`), and each batch is folded and
decided *under the writer's lock* against that committed state, only if the
batch starts exactly at the committed position (else it is dropped and read
again from there). A notification is committed together with the state that
says it was sent, or not at all; after a crash, a ``kill -9`` or a fencing, the
next holder resumes at the committed position with the committed state, so it
neither repeats a notification nor misses one. Aborted transactions are never
seen by ``read_committed`` consumers of the notifications topic.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime
from typing import Final

from confluent_kafka import Consumer, KafkaException
from confluent_kafka import TopicPartition as TP

from dispatcher import manage, metrics
from dispatcher.config_state import ConfigView
from dispatcher.config_writer import ConfigWriter
from dispatcher.errors import KafkaSetupError, Refusal
from dispatcher.kafka import Outgoing, check_topic, table_consumer_config
from dispatcher.settings import Settings
from dispatcher.webhook_health import (
    POSITION_KEY,
    HealthFold,
    HealthPosition,
    Limits,
    Step,
    dead_lettered,
    observed,
)

log = logging.getLogger(__name__)

#: A position per topic read: the next offset of each partition.
Positions = dict[str, dict[int, int]]
#: Records (attempts and dead letters) folded per transaction at most.
BATCH: Final = 2000
#: How long records gather before a transaction: the delay of a health event at most
#: (with ``health_check_every_s`` for the time-based ones).
COMMIT_EVERY_S: Final = 0.5
#: The position alone (nothing else changed) is written at most this often.
POSITION_EVERY_S: Final = 10.0
#: Pause after a transaction that failed, before reading again from the committed position.
RETRY_AFTER_S: Final = 1.0


class _Stale(Exception):
    """The committed position is not where this batch starts."""


class HealthWriter:
    """Folds the attempts and dead-letter topics into health and commits it with the
    writer's producer."""

    name = "webhook health"

    def __init__(self, settings: Settings, view: ConfigView, writer: ConfigWriter) -> None:
        self.settings = settings
        self.view = view
        self.writer = writer
        self.topic = settings.attempts_topic
        self.dead_letter_topic = settings.dead_letter_topic
        self.topics = (self.topic, self.dead_letter_topic)
        self.limits = Limits(
            settings.notify_after_failures,
            settings.notify_after_failing_s,
            settings.auto_disable_after_s,
            settings.dead_letter_digest_s,
        )
        #: The committed position this reader started from (None: none committed yet).
        self._base: Positions | None = None
        #: The next offset to read in each partition of each topic.
        self._next: Positions = {}
        self._position_written = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failure: BaseException | None = None
        self.commits = 0
        #: Set once the reader stands at the committed position (readiness waits for it:
        #: attempts made after the API is ready are folded).
        self.positioned = threading.Event()
        metrics.health_counters_from_zero()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="health-fold", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)

    # --- reading ----------------------------------------------------------------
    def _seek(self, consumer: Consumer) -> None:
        """Read on from the committed position: the view read to its end first."""
        deadline = time.monotonic() + self.settings.api_write_timeout_s
        if not self.view.wait_until_end(deadline):
            raise KafkaSetupError("cannot read the health topic to its end")
        base = self._committed()
        parts: list[TP] = []
        nxt: Positions = {}
        for topic in self.topics:
            meta = check_topic(consumer, self.settings, topic, 15)
            stored = (base or {}).get(topic)
            nxt[topic] = {}
            for p in sorted(meta.partitions):
                try:
                    low, high = consumer.get_watermark_offsets(TP(topic, p), timeout=15)
                except KafkaException as exc:
                    raise KafkaSetupError(f"cannot read {topic}: {exc}") from None
                # None committed yet: from now on (a new writer does not judge the past);
                # past retention: from what the topic still holds.
                start = max(stored.get(p, high) if stored is not None else high, low)
                nxt[topic][p] = start
                parts.append(TP(topic, p, start))
        consumer.assign(parts)
        self._base = base
        self._next = nxt
        self.positioned.set()

    def _committed(self) -> Positions | None:
        """The committed position in the topics read now (None: none committed yet)."""
        stored = self.view.health_position
        return None if stored is None else stored.of(self.topic, self.dead_letter_topic)

    def _run(self) -> None:
        consumer: Consumer | None = None
        next_check = 0.0
        batch: list[tuple[str, bytes | None]] = []
        try:
            while not self._stop.is_set():
                if consumer is None:
                    try:
                        consumer = Consumer(table_consumer_config(self.settings))
                        self._seek(consumer)
                    except KafkaSetupError as exc:
                        log.warning("webhook health waiting: %s", exc)
                        if consumer is not None:
                            consumer.close()
                            consumer = None
                        self._stop.wait(RETRY_AFTER_S * 2)
                        continue
                    batch = []
                self._read(consumer, batch)
                now = time.monotonic()
                check = now >= next_check
                if not batch and not check:
                    continue
                if self._commit(batch, check):
                    batch = []
                    if check:
                        next_check = now + self.settings.health_check_every_s
                else:
                    # Read again from the committed position, whatever it is now.
                    consumer.close()
                    consumer = None
                    self._stop.wait(RETRY_AFTER_S)
        except Exception as exc:
            log.exception("%s folding stopped", self.name)
            self.failure = exc
        finally:
            if consumer is not None:
                consumer.close()

    def _read(self, consumer: Consumer, batch: list[tuple[str, bytes | None]]) -> None:
        """Add to ``batch`` what comes within ``COMMIT_EVERY_S`` (or until it is full):
        a transaction per interval at most, not one per record, while attempts stream in
        (each holds the writer's lock, which the API's changes wait for)."""
        until = time.monotonic() + COMMIT_EVERY_S
        while len(batch) < BATCH and not self._stop.is_set():
            left = until - time.monotonic()
            if left <= 0:
                return
            for msg in consumer.consume(BATCH - len(batch), timeout=left):
                topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
                if msg.error() is not None or None in (topic, partition, offset):
                    continue
                assert topic is not None and partition is not None and offset is not None
                batch.append((topic, msg.value()))
                self._next[topic][partition] = offset + 1

    # --- deciding and committing ----------------------------------------------------
    def _commit(self, batch: list[tuple[str, bytes | None]], check: bool) -> bool:
        """Fold and commit; False when the batch must be read again."""
        try:
            step, written = self.writer.apply(lambda: self._decide(batch, check))[0]
        except _Stale:
            log.info("webhook health: the committed position moved; reading on from it")
            return False
        except KafkaSetupError as exc:
            metrics.HEALTH_WRITE_FAILURES.inc()
            metrics.HEALTH_WRITE_FAILING.set(1)
            log.warning("webhook health not written: %s", exc)
            return False
        metrics.HEALTH_WRITE_FAILING.set(0)
        # Folded, whether the batch changed a webhook's health or not (a healthy
        # webhook's successes are written at most once a minute): a batch that is
        # read again after a failure is not counted the first time.
        metrics.HEALTH_FOLDED.inc(sum(1 for topic, _ in batch if topic == self.topic))
        if written:
            self._base = {topic: dict(parts) for topic, parts in self._next.items()}
            self.commits += 1
            # Counted once committed: a decision may be taken again (after a fencing).
            for notice in step.notices:
                metrics.NOTIFICATIONS.labels(notice.type).inc()
                log.info("%s sent", notice.type, extra={"webhook_id": notice.webhook_id})
                if notice.type == "webhook.disabled":
                    metrics.WEBHOOKS_AUTO_DISABLED.inc()
                    log.warning(
                        "webhook disabled: failing without a success for %.0f s",
                        self.limits.auto_disable_after_s,
                        extra={"webhook_id": notice.webhook_id},
                    )
        return True

    def _decide(
        self, batch: list[tuple[str, bytes | None]], check: bool
    ) -> tuple[list[Outgoing], tuple[Step, int]]:
        """Under the writer's lock, against the committed state: the records of one batch."""
        if self._committed() != self._base:
            raise _Stale()
        now = datetime.now(UTC)
        fold = HealthFold(self.limits, dict(self.view.health), now)
        for topic, value in batch:
            if topic == self.topic:
                a = observed(value)
                if a is not None:
                    fold.attempt(a)
            elif (d := dead_lettered(value)) is not None:
                fold.dead_letter(d)
        records: list[Outgoing] = []
        if check:
            subs = {
                wid: (None if sub is None else (sub.enabled, sub.updated_at))
                for wid in set(fold.states) | set(fold.step.health)
                for sub in (self.view.subscription(wid),)
            }
            fold.check(now, subs)
            for wid in fold.step.disable:
                try:
                    outcome = manage.disable_failing(self.settings, self.view, wid)
                except Refusal as exc:
                    # A record the rules no longer accept: left as it is, said once a check.
                    log.warning("webhook not disabled: %s", exc, extra={"webhook_id": wid})
                    continue
                if outcome.records:
                    records += outcome.records
                    fold.disabled(wid, now)
        step = fold.step
        topic = self.settings.health_topic
        for wid, h in step.health.items():
            records.append(Outgoing(topic, None if h is None else h.to_json(), wid.encode()))
        records += [
            Outgoing(self.settings.notifications_topic, n.to_json(), n.webhook_id.encode())
            for n in step.notices
        ]
        moved = self._next != self._base
        due = time.monotonic() - self._position_written >= POSITION_EVERY_S
        if records or (moved and due):
            position = HealthPosition(
                attempts_topic=self.topic,
                positions=dict(self._next[self.topic]),
                dead_letter_topic=self.dead_letter_topic,
                dead_letter_positions=dict(self._next[self.dead_letter_topic]),
            )
            records.append(Outgoing(topic, position.to_json(), POSITION_KEY.encode()))
            self._position_written = time.monotonic()
        return records, (step, len(records))
