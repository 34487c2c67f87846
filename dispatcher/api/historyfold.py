"""Folding the attempts topic into the history store, on a thread of its own.

At start the thread opens the store, reads the positions saved with its rows and
resumes every partition there (at the start of what the topic still holds, for a
new or an outdated file). It notes the end offsets seen at start and is *caught
up* once every partition reached them: until then the API is not ready. It then
follows the topic, one SQLite transaction per batch of records (rows and
positions together), and deletes rows past retention in short transactions
between batches: the store has this one writer.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from typing import Final

from confluent_kafka import Consumer, KafkaError, KafkaException, Message
from confluent_kafka import TopicPartition as TP

from dispatcher.api.historystore import HistoryStore, parse_records
from dispatcher.errors import KafkaSetupError
from dispatcher.kafka import table_consumer_config
from dispatcher.settings import Settings

log = logging.getLogger(__name__)

BATCH: Final = 2000
#: Records per SQLite transaction at most, and the longest a record waits for its
#: transaction. Each transaction writes every page it touched once (to the WAL,
#: then to the file): with thousands of webhooks a batch of 2,000 touched nearly
#: a page per record in each index, so a rebuild folds in large transactions.
FOLD_MAX: Final = 20_000
FOLD_WAIT_S: Final = 0.5
#: While a backlog is folded (a rebuild, a restart after a while down), one
#: transaction takes several such batches, up to DISPATCHER_API_HISTORY_BACKLOG_TX
#: records or this long: at 1 M attempts, committing every 20,000 records spent a
#: third of folding writing the same index pages again at each commit; every
#: 200,000 cut that to a tenth. Nothing waits for these commits yet (the API is
#: not ready, or readers are behind anyway), and a kill loses at most the open
#: transaction, which is folded again from the stored positions.
BACKLOG_TX_S: Final = 10.0
#: How often rows past retention are looked for; deleting them goes in short
#: batches between folds, so neither folding nor reads wait long for it.
EXPIRE_EVERY_S: Final = 60.0


class HistoryFolder:
    """The one writer of a :class:`HistoryStore`, fed from the attempts topic."""

    name = "delivery history"

    def __init__(self, settings: Settings, store: HistoryStore) -> None:
        self.settings = settings
        self.store = store
        self.topic = settings.attempts_topic
        self._positions: dict[int, int] = {}
        self._pending: dict[int, int] = {}
        self._applied = threading.Condition()
        self._caught_up = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failure: BaseException | None = None
        self.folded = 0
        self.transactions = 0
        self.started_at = 0.0
        self.caught_up_s: float | None = None

    @property
    def caught_up(self) -> bool:
        return self._caught_up.is_set()

    def start(self) -> None:
        """Open the store, find where each partition resumes, start folding.

        A missing topic or an unreachable broker is a setup error (retried by the
        caller); a store file that cannot be opened is too, with its path.
        """
        try:
            positions = self.store.open()
        except (OSError, sqlite3.Error) as exc:
            raise KafkaSetupError(
                f"cannot open the history store {self.store.path}: {exc}"
            ) from None
        self._positions.clear()
        self._pending.clear()
        conf = table_consumer_config(self.settings)
        # librdkafka prefetches up to 64 MB per consumer by default; folding takes
        # records by the tens of thousands anyway, so a quarter of it keeps up.
        conf.setdefault("queued.max.messages.kbytes", 16_384)
        # Once that prefetch is full, librdkafka waits fetch.queue.backoff.ms (1 s by
        # default) before fetching again, and a rebuild drains 16 MB in less: the
        # folding thread then waited for records a third of the time. With 10 ms, a
        # consumer doing 40 us of work per record waited 1.4 s instead of 9.3 s in
        # 1 M records (24,126 against 20,267 records/s).
        conf.setdefault("fetch.queue.backoff.ms", 10)
        consumer = Consumer(conf)
        try:
            meta = consumer.list_topics(self.topic, timeout=15).topics.get(self.topic)
            if meta is None or meta.error is not None or not meta.partitions:
                raise KafkaSetupError(
                    f"topic {self.topic} does not exist; run `dispatcher topics ensure` first"
                )
            marks = {
                p: consumer.get_watermark_offsets(TP(self.topic, p), timeout=15)
                for p in sorted(meta.partitions)
            }
            if any(positions.get(p, 0) > high for p, (_, high) in marks.items()):
                # Positions past the end: the topic was deleted and created again.
                log.warning("attempts topic %s was recreated: history rebuilt", self.topic)
                self.store.reset()
                self.store.close()
                positions = self.store.open()
            parts = []
            for p, (low, high) in marks.items():
                start = max(positions.get(p, low), low)
                self._positions[p] = start
                if high > start:
                    self._pending[p] = high
                parts.append(TP(self.topic, p, start))
            consumer.assign(parts)
        except (KafkaException, KafkaSetupError) as exc:
            consumer.close()
            self.store.close()
            raise KafkaSetupError(f"cannot read {self.topic}: {exc}") from None
        log.info(
            "history store %s: resuming %d partitions, %d records to fold",
            self.store.path,
            len(parts),
            sum(high - self._positions[p] for p, high in self._pending.items()),
        )
        self.started_at = time.monotonic()
        self._thread = threading.Thread(
            target=self._run, args=(consumer,), name="history-fold", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)

    def wait_past(self, topic: str, partition: int, offset: int, deadline: float) -> bool:
        """Block until the record at ``offset`` is in the store, or the deadline passed."""
        if topic != self.topic:
            return False
        with self._applied:
            return self._applied.wait_for(
                lambda: self._positions.get(partition, 0) > offset,
                max(deadline - time.monotonic(), 0),
            )

    def _run(self, consumer: Consumer) -> None:
        next_expiry = time.monotonic()
        expiring = False
        store = self.store
        # The open transaction: records in it, when it began, and the positions it
        # reached (end-of-partition marks included), made known only at its commit.
        in_tx = 0
        tx_began = 0.0
        reached: dict[int, int] = {}
        try:
            if not self._pending:
                self._mark_caught_up()
            while not self._stop.is_set():
                # Up to FOLD_MAX records within FOLD_WAIT_S, each chunk parsed and its
                # attempt rows written as it comes: holding the read records until the
                # batch was full kept up to 20,000 of them (and their bodies) in memory
                # at a rebuild's peak. The deliveries' upserts still wait for the whole
                # batch (flush), to go through the indexes in key order.
                chunk = consumer.consume(BATCH, timeout=0.2)
                first = time.monotonic()
                read = 0
                while True:
                    records = self._records(chunk, reached)
                    if records:
                        if not in_tx:
                            store.begin()
                            tx_began = time.monotonic()
                        store.write(parse_records(records))
                        in_tx += len(records)
                        self.folded += len(records)
                    read += len(chunk)
                    if (
                        len(chunk) < BATCH
                        or read >= FOLD_MAX
                        or time.monotonic() - first >= FOLD_WAIT_S
                    ):
                        break
                    chunk = consumer.consume(BATCH, timeout=0.05)
                if in_tx:
                    store.flush()
                # More is waiting (a full last chunk, or a rebuild still reading
                # towards the ends it noted at start, where a chunk often comes
                # short of BATCH): keep the transaction open, up to its bounds.
                # Otherwise (caught up with the topic) commit now.
                backlog = len(chunk) == BATCH or (read > 0 and not self.caught_up)
                if in_tx and (
                    not backlog
                    or in_tx >= self.settings.api_history_backlog_tx
                    or time.monotonic() - tx_began >= BACKLOG_TX_S
                ):
                    reached.update(store.commit())
                    self.transactions += 1
                    in_tx = 0
                if reached and not in_tx:
                    self._reached(reached)
                    reached = {}
                # Retention: only once caught up (a rebuild folds first), in batches.
                if not in_tx and self.caught_up and self.settings.attempts_retention_ms > 0:
                    now = time.monotonic()
                    if expiring or now >= next_expiry:
                        cutoff = int(time.time() * 1000) - self.settings.attempts_retention_ms
                        gone = store.expire(cutoff)
                        expiring = gone > 0
                        if not expiring:
                            next_expiry = now + EXPIRE_EVERY_S
            if in_tx:  # stopping: keep what the open transaction folded
                store.commit()
        except Exception as exc:  # surfaced through readiness
            log.exception("%s folding stopped", self.name)
            self.failure = exc
        finally:
            # An open transaction is rolled back (closing does it): its records are
            # folded again from the stored positions at the next start.
            consumer.close()
            store.close()

    @staticmethod
    def _records(
        msgs: list[Message], reached: dict[int, int]
    ) -> list[tuple[int, int, bytes | None]]:
        """The records among ``msgs`` (partition, offset, value); end-of-partition marks
        go to ``reached``, other errors to the log."""
        records: list[tuple[int, int, bytes | None]] = []
        for msg in msgs:
            err = msg.error()
            partition, offset = msg.partition(), msg.offset()
            if partition is None or offset is None:
                if err is not None:
                    log.warning("attempts topic: %s", err.str())
                continue
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    reached[partition] = offset
                else:
                    log.warning("attempts topic: %s", err.str())
                continue
            records.append((partition, offset, msg.value()))
        return records

    def _reached(self, positions: dict[int, int]) -> None:
        last = False
        with self._applied:
            for partition, position in positions.items():
                self._positions[partition] = max(self._positions.get(partition, 0), position)
                end = self._pending.get(partition)
                if end is not None and position >= end:
                    del self._pending[partition]
                    last = not self._pending
            self._applied.notify_all()
        if last:
            self._mark_caught_up()

    def _mark_caught_up(self) -> None:
        """On the folding thread: the indexes a rebuild deferred, then ready."""
        self.store.build_indexes()
        self.caught_up_s = time.monotonic() - self.started_at
        log.info(
            "%s caught up: %d records folded in %.1f s, %d transactions",
            self.name,
            self.folded,
            self.caught_up_s,
            self.transactions,
        )
        self._caught_up.set()
