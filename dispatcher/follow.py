"""Reading topics whole, then following them: the one reader of in-memory views of topics.

Like Kafka Streams' GlobalKTable: note each partition's end offset at start,
read from the beginning, be *caught up* once every partition reached its noted
end, and keep applying records after that. The position reached in each
partition is kept, so a writer can wait until its own record has been applied
(read-your-writes). Subclasses say what a record does (:meth:`Follower.apply`):
the dispatcher's subscriptions table (:mod:`dispatcher.core.table`) and the
configuration the API and the writer decide from (:mod:`dispatcher.config_state`).

Three ways to run one: :meth:`~Follower.start` fails at once when a topic is
missing; :meth:`~Follower.start_when_available` waits for it in the reader
thread, saying why through :attr:`~Follower.waiting_for`; :meth:`~Follower.load_once`
reads to the end and stops (for commands).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException
from confluent_kafka import TopicPartition as TP

from dispatcher.errors import ConfigError, KafkaSetupError
from dispatcher.kafka import check_topic, close_aside, describe, make_table_consumer
from dispatcher.settings import Settings

log = logging.getLogger(__name__)

#: While a topic is missing or the broker unreachable: how often to look again,
#: and how often to repeat the warning (logged at once whenever the reason changes).
_REOPEN_EVERY_S = 2.0
_REOPEN_TIMEOUT_S = 5.0
_WAIT_LOG_EVERY_S = 60.0


class Follower:
    """One reader thread over ``topics``; subclasses say what a record does (:meth:`apply`).

    Records are applied by the reader thread only, a batch at a time under
    ``_applied`` (the condition :meth:`wait_past` waits on); what subclasses
    expose to other threads must be readable without that lock.
    """

    #: Names the view in logs, readiness reasons and the reader thread.
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
        self._waiting_for: str | None = None
        #: Set when a wait for the end found the reader stuck: it takes a new client.
        self._renew = threading.Event()
        #: How many times the reader took a new client (see :meth:`wait_until_end`).
        self.renewals = 0
        #: The error that stopped the reader thread, if it stopped.
        self.failure: BaseException | None = None

    def apply(
        self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None
    ) -> None:
        raise NotImplementedError

    def summary(self) -> dict[str, object]:
        """Fields logged with "caught up" (sizes of what was read)."""
        return {}

    @property
    def caught_up(self) -> bool:
        return self._caught_up.is_set()

    @property
    def waiting_for(self) -> str | None:
        """Why reading cannot start yet (missing topic, no broker), or None."""
        return self._waiting_for

    # --- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        """Note the end offsets and start reading; a missing topic is a setup error."""
        consumer = self._open()
        self._thread = self._spawn(consumer, follow=True)

    def start_when_available(self) -> None:
        """Start following in a background thread, waiting there for the topics.

        A missing topic or an unreachable broker is waited for, not fatal: a pod
        started before ``dispatcher topics ensure`` ran stays alive and not ready
        (saying why, see :attr:`waiting_for`) and starts once the topic exists,
        instead of crash-looping.
        """
        self._thread = threading.Thread(
            target=self._open_and_follow, name=self._thread_name, daemon=True
        )
        self._thread.start()

    def load_once(self, timeout_s: float = 30.0) -> None:
        """Read the topics up to their current end, then stop (for commands)."""
        consumer = self._open()
        self._stop.clear()
        thread = self._spawn(consumer, follow=False)
        thread.join(timeout_s)
        topics = ", ".join(self.topics)
        if self.failure is not None:
            raise KafkaSetupError(f"cannot read {topics}: {self.failure}")
        if not self._caught_up.is_set():
            self._stop.set()
            thread.join(5)
            raise KafkaSetupError(f"reading {topics} took longer than {timeout_s:.0f} s")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    # --- read-your-writes ----------------------------------------------------
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
        consumer = make_table_consumer(self.settings)
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
            before = {w: self._positions.get(w, 0) for w in ends}
            if self._applied.wait_for(
                lambda: all(self._positions.get(w, 0) >= end for w, end in ends.items()),
                max(deadline - time.monotonic(), 0),
            ):
                return True
            behind = {
                w: (at, ends[w]) for w, at in self._positions.items() if w in ends and at < ends[w]
            }
        # The broker has just answered for the ends, yet the reader got no nearer to
        # them: after a broker outage, librdkafka has now and then left such a client
        # fetching nothing for a minute and more (every change refused meanwhile).
        # The reader goes on from where it stands with a new client.
        if all(at <= before[w] for w, (at, _end) in behind.items()):
            log.warning(
                "%s: not read to the end in time and no nearer to it (%s); reading on "
                "with a new Kafka client",
                self.name,
                ", ".join(f"{t}/{p} at {at} of {end}" for (t, p), (at, end) in behind.items()),
            )
            self.renew_client()
        return False

    def renew_client(self) -> None:
        """Have the reader go on from where it stands with a new Kafka client."""
        self._renew.set()

    # --- the reader thread -----------------------------------------------------
    @property
    def _thread_name(self) -> str:
        return self.name.replace(" ", "-")

    def _spawn(self, consumer: Consumer, follow: bool) -> threading.Thread:
        thread = threading.Thread(
            target=self._run, args=(consumer, follow), name=self._thread_name, daemon=True
        )
        thread.start()
        return thread

    def _open(self, timeout_s: float = 15.0) -> Consumer:
        """A consumer assigned every partition from the beginning, their ends noted."""
        consumer = make_table_consumer(self.settings)
        positions: dict[tuple[str, int], int] = {}
        pending: dict[tuple[str, int], int] = {}
        parts = []
        try:
            for topic in self.topics:
                # One line naming the broker when it cannot be reached, or the topic.
                meta = check_topic(consumer, self.settings, topic, timeout_s)
                try:
                    for p in sorted(meta.partitions):
                        low, high = consumer.get_watermark_offsets(TP(topic, p), timeout=timeout_s)
                        positions[(topic, p)] = low
                        if high > low:
                            pending[(topic, p)] = high
                        parts.append(TP(topic, p, OFFSET_BEGINNING))
                except KafkaException as exc:
                    raise KafkaSetupError(
                        f"cannot read the end offsets of {topic}: {describe(exc)}"
                    ) from None
            consumer.assign(parts)
        except KafkaSetupError:
            consumer.close()
            raise
        except KafkaException as exc:
            consumer.close()
            raise KafkaSetupError(
                f"cannot read {', '.join(self.topics)}: {describe(exc)}"
            ) from None
        # Only a complete opening replaces what a failed one may have noted.
        self._positions, self._pending = positions, pending
        if not pending:
            self._mark_caught_up()
        return consumer

    def _open_and_follow(self) -> None:
        logged_at = -_WAIT_LOG_EVERY_S
        while not self._stop.is_set():
            try:
                consumer = self._open(_REOPEN_TIMEOUT_S)
            except KafkaSetupError as exc:
                reason = str(exc)
                now = time.monotonic()
                if reason != self._waiting_for or now - logged_at >= _WAIT_LOG_EVERY_S:
                    log.warning("%s waiting: %s", self.name, reason)
                    logged_at = now
                self._waiting_for = reason
                self._stop.wait(_REOPEN_EVERY_S)
                continue
            except ConfigError as exc:  # a setting to fix: one line, no traceback
                log.error("%s reader could not start: %s", self.name, exc)
                self.failure = exc
                return
            except Exception as exc:
                log.exception("%s reader could not start", self.name)
                self.failure = exc
                return
            if self._waiting_for is not None:
                log.info("%s: %s available", self.name, ", ".join(self.topics))
                self._waiting_for = None
            self._run(consumer, follow=True)
            return

    def _run(self, consumer: Consumer, follow: bool) -> None:
        try:
            while not self._stop.is_set():
                if not follow and self._caught_up.is_set():
                    return
                if self._renew.is_set():
                    self._renew.clear()
                    consumer = self._renewed(consumer)
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

    def _renewed(self, stuck: Consumer) -> Consumer:
        """A new client assigned where the reader stands; the stuck one closed aside
        (its close may wait on the broker)."""
        fresh = make_table_consumer(self.settings)
        fresh.assign([TP(topic, p, at) for (topic, p), at in self._positions.items()])
        close_aside(stuck, f"{self._thread_name}-close")
        self.renewals += 1
        return fresh

    def _handle(self, msg: object) -> None:
        err = msg.error()  # type: ignore[attr-defined]
        topic: str = msg.topic()  # type: ignore[attr-defined]
        partition: int = msg.partition()  # type: ignore[attr-defined]
        offset: int = msg.offset()  # type: ignore[attr-defined]
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                self._reached((topic, partition), offset)
                return
            log.warning("%s: topic error: %s", self.name, err)
            return
        self.apply(topic, partition, offset, msg.key(), msg.value())  # type: ignore[attr-defined]
        self._reached((topic, partition), offset + 1)

    def _reached(self, where: tuple[str, int], position: int) -> None:
        self._positions[where] = max(self._positions.get(where, 0), position)
        end = self._pending.get(where)
        if end is not None and position >= end:
            del self._pending[where]
            if not self._pending:
                self._mark_caught_up()

    def _mark_caught_up(self) -> None:
        if not self._caught_up.is_set():
            log.info("%s caught up", self.name, extra=self.summary())
            self._caught_up.set()
