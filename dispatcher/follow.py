"""Reading topics whole, then following them: the base of in-memory views of topics.

Like the dispatcher's subscriptions table (and Kafka Streams' GlobalKTable): note
each partition's end offset at start, read from the beginning, be *caught up*
once every partition reached its noted end, and keep applying records after
that. The position reached in each partition is kept, so a writer can wait until
its own record has been applied (read-your-writes).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException
from confluent_kafka import TopicPartition as TP

from dispatcher.errors import KafkaSetupError
from dispatcher.kafka import check_topic, describe, table_consumer_config
from dispatcher.settings import Settings

log = logging.getLogger(__name__)


class Follower:
    """One reader thread over ``topics``; subclasses say what a record does (:meth:`apply`)."""

    name = "topics"

    def __init__(self, settings: Settings, topics: Sequence[str]) -> None:
        self.settings = settings
        self.topics = tuple(topics)
        self._positions: dict[tuple[str, int], int] = {}
        self._pending: dict[tuple[str, int], int] = {}
        self._applied = threading.Condition()
        self._caught_up = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failure: BaseException | None = None

    def apply(
        self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None
    ) -> None:
        raise NotImplementedError

    @property
    def caught_up(self) -> bool:
        return self._caught_up.is_set()

    def start(self) -> None:
        """Note the end offsets and start reading; a missing topic is a setup error."""
        consumer = Consumer(table_consumer_config(self.settings))
        try:
            parts = []
            for topic in self.topics:
                # One line naming the broker when it cannot be reached, or the topic.
                meta = check_topic(consumer, self.settings, topic, 15)
                for p in sorted(meta.partitions):
                    low, high = consumer.get_watermark_offsets(TP(topic, p), timeout=15)
                    self._positions[(topic, p)] = low
                    if high > low:
                        self._pending[(topic, p)] = high
                    parts.append(TP(topic, p, OFFSET_BEGINNING))
            consumer.assign(parts)
        except KafkaSetupError:
            consumer.close()
            raise
        except KafkaException as exc:
            consumer.close()
            raise KafkaSetupError(
                f"cannot read {', '.join(self.topics)}: {describe(exc)}"
            ) from None
        if not self._pending:
            self._caught_up.set()
        self._thread = threading.Thread(target=self._run, args=(consumer,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def wait_past(self, topic: str, partition: int, offset: int, deadline: float) -> bool:
        """Block until the record at ``offset`` has been applied, or the deadline passed."""
        with self._applied:
            return self._applied.wait_for(
                lambda: self._positions.get((topic, partition), 0) > offset,
                max(deadline - time.monotonic(), 0),
            )

    def wait_until_end(self, deadline: float) -> bool:
        """Block until every partition has been read to its end as of now.

        The writer calls this after ``init_transactions``: what an earlier holder
        of the role committed is then below the end, and read before any change.
        """
        consumer = Consumer(table_consumer_config(self.settings))
        try:
            ends = {}
            for where in list(self._positions):
                left = max(deadline - time.monotonic(), 0.1)
                ends[where] = consumer.get_watermark_offsets(TP(*where), timeout=left)[1]
        except KafkaException as exc:
            raise KafkaSetupError(f"cannot read the end offsets: {exc.args[0]}") from None
        finally:
            consumer.close()
        with self._applied:
            return self._applied.wait_for(
                lambda: all(self._positions.get(w, 0) >= end for w, end in ends.items()),
                max(deadline - time.monotonic(), 0),
            )

    def _run(self, consumer: Consumer) -> None:
        try:
            while not self._stop.is_set():
                # poll() returns with the first record, where consume() would wait out its
                # whole timeout for a full batch: a change is applied (and a writer waiting
                # to read it back answers) in milliseconds, not a fifth of a second.
                first = consumer.poll(0.2)
                if first is None:
                    continue
                msgs = [first, *consumer.consume(999, timeout=0)]
                with self._applied:
                    for msg in msgs:
                        self._handle(msg)
                    self._applied.notify_all()
        except Exception as exc:  # surfaced through readiness
            log.exception("%s reader stopped", self.name)
            self.failure = exc
        finally:
            consumer.close()

    def _handle(self, msg: object) -> None:
        err = msg.error()  # type: ignore[attr-defined]
        topic: str = msg.topic()  # type: ignore[attr-defined]
        partition: int = msg.partition()  # type: ignore[attr-defined]
        offset: int = msg.offset()  # type: ignore[attr-defined]
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                self._reached((topic, partition), offset)
            return
        self.apply(topic, partition, offset, msg.key(), msg.value())  # type: ignore[attr-defined]
        self._reached((topic, partition), offset + 1)

    def _reached(self, where: tuple[str, int], position: int) -> None:
        self._positions[where] = max(self._positions.get(where, 0), position)
        end = self._pending.get(where)
        if end is not None and position >= end:
            del self._pending[where]
            if not self._pending:
                log.info("%s caught up", self.name)
                self._caught_up.set()
