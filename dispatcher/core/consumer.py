"""A group consumer for one stage, run in its own thread.

The thread only polls and hands batches to the event loop; all decisions are
taken on the loop (see :mod:`dispatcher.core.engine`). The loop's pause, resume and
offset-store requests are queued and carried out by this thread between polls:
called from the loop they would wait on the consumer while it is inside
``consume()``, stalling every delivery for that long. Rebalance
callbacks run in this thread: a revoke waits, within a bound, for the loop to
finish or give up the revoked partitions' work, then commits their offsets
synchronously, so the next owner starts right where this one stopped.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from dispatcher import metrics
from dispatcher.core.links import ClientLink
from dispatcher.kafka import make_consumer
from dispatcher.settings import Settings

log = logging.getLogger(__name__)

_BATCH = 500
#: How long one poll may wait for a full batch; also the latency of queued pause/resume/
#: store requests. At a few hundred events a second a batch never fills, so this is
#: added to every delivery's latency (bench/, latency phase).
_POLL_S = 0.01
_LAG_EVERY_S = 5.0
#: How often the stage's topics' partition counts are read (a rate limit's share).
_COUNT_EVERY_S = 30.0
_COUNT_TIMEOUT_S = 2.0
#: A client that has not reached the broker this long after the others did is
#: replaced (see ClientLink.cut_off); well below the 15 s promised after an outage.
_CUT_OFF_S = 4.0


class StageFeed(Protocol):
    """What the loop asks of a stage consumer (a fake one in the engine's unit tests)."""

    stage: str
    topics: tuple[str, ...]

    @property
    def link(self) -> ClientLink | None:
        """What its client last reported about its connections and group (None: no client)."""
        ...

    @property
    def ready(self) -> bool: ...

    @property
    def failure(self) -> str | None: ...

    @property
    def partitions_total(self) -> int | None:
        """Partitions of its topics together, as last read; None until read."""
        ...

    def start(self) -> None: ...

    def pause(self, tp: TopicPartition) -> None: ...

    def resume(self, tp: TopicPartition) -> None: ...

    def store(self, offsets: list[TopicPartition]) -> None: ...

    def batch_done(self) -> None: ...

    def close(self, timeout_s: float = 30.0) -> None: ...


class PartitionOwner(Protocol):
    """The loop side of a stage consumer."""

    def assigned(self, consumer: StageFeed, partitions: list[TopicPartition]) -> None: ...

    def messages(self, consumer: StageFeed, batch: list[Message]) -> None: ...

    def revoke(
        self, consumer: StageFeed, partitions: list[TopicPartition]
    ) -> Awaitable[list[TopicPartition]]: ...

    def lost(self, consumer: StageFeed, partitions: list[TopicPartition]) -> None: ...


#: Makes the consumer of one stage: (settings, stage, topics, group id, owner, loop).
ConsumerFactory = Callable[
    [Settings, str, tuple[str, ...], str, PartitionOwner, asyncio.AbstractEventLoop], StageFeed
]


class StageConsumer:
    """Polls the topics of one stage (one group) and feeds an event loop."""

    def __init__(
        self,
        settings: Settings,
        stage: str,
        topics: tuple[str, ...],
        group_id: str,
        owner: PartitionOwner,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.stage = stage
        self.topics = topics
        self.joined = threading.Event()
        self._settings = settings
        self._group_id = group_id
        self._owner = owner
        self._loop = loop
        self._stop = threading.Event()
        self._started = False
        self._failure: str | None = None
        # At most two batches wait on the loop: the thread cannot run ahead of it.
        self._handoff = threading.BoundedSemaphore(2)
        self._requests: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()
        self._link = ClientLink(f"stage {stage}", group_id)
        self._consumer: Consumer = make_consumer(settings, group_id, self._link.config())
        #: Set when the session was lost to an outage, cleared by the next assignment.
        self._lost_session = False
        self._partitions_total: int | None = None
        self._thread = threading.Thread(target=self._run, name=f"consumer-{stage}", daemon=True)

    # --- called from the loop -------------------------------------------------
    def start(self) -> None:
        self._subscribe()
        self._thread.start()
        self._started = True

    def _subscribe(self) -> None:
        self._consumer.subscribe(
            list(self.topics),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )

    def pause(self, tp: TopicPartition) -> None:
        self._requests.put(lambda: self._consumer.pause([tp]))

    def resume(self, tp: TopicPartition) -> None:
        self._requests.put(lambda: self._consumer.resume([tp]))

    def store(self, offsets: list[TopicPartition]) -> None:
        self._requests.put(lambda: self._consumer.store_offsets(offsets=offsets))

    def batch_done(self) -> None:
        self._handoff.release()

    @property
    def ready(self) -> bool:
        return self.joined.is_set()

    @property
    def link(self) -> ClientLink:
        return self._link

    @property
    def partitions_total(self) -> int | None:
        return self._partitions_total

    @property
    def failure(self) -> str | None:
        """Why the polling thread is gone while nobody asked it to stop, or None."""
        gone = self._started and not self._thread.is_alive() and not self._stop.is_set()
        if self._failure is None and gone:
            return f"the consumer thread of stage {self.stage} stopped"
        return self._failure

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop polling and leave the group (final revoke and commit happen here)."""
        self._stop.set()
        self._thread.join(timeout_s)

    # --- the polling thread ---------------------------------------------------
    def _run(self) -> None:
        next_lag = next_count = 0.0
        replaced_at = 0.0
        # One partition's lag at a time, a round every _LAG_EVERY_S: each query is a
        # broker round trip made on this thread, and a dozen in a row held back
        # every delivery behind them (the benchmark's latency tail).
        due: deque[TopicPartition] = deque()
        step = _LAG_EVERY_S
        try:
            while not self._stop.is_set():
                self._carry_out_requests()
                batch = self._consumer.consume(_BATCH, timeout=_POLL_S)
                if batch:
                    try:
                        self._hand_over(batch)
                    except KafkaException as exc:
                        if not self._self_fenced(exc):
                            raise
                        self._replace_client(
                            f"fenced by its own commit after losing its session: {exc}"
                        )
                        continue
                now = time.monotonic()
                if self._link.cut_off(now, _CUT_OFF_S) and now - replaced_at >= _CUT_OFF_S:
                    replaced_at = now
                    self._replace_client(
                        f"no broker reached for {now - (self._link.down_since or now):.0f} s "
                        "while the other clients reach one"
                    )
                    continue
                # Not while the broker is away: each query would hold this thread
                # (and the rebalance callbacks it serves) for its whole timeout.
                if now >= next_count and self._link.down_since is None:
                    self._count_partitions()
                    next_count = now + _COUNT_EVERY_S
                if now >= next_lag and self._link.down_since is None:
                    if not due:
                        due.extend(self._consumer.assignment())
                        step = _LAG_EVERY_S / max(len(due), 1)
                    if due:
                        self._report_lag(due.popleft())
                    next_lag = now + step
        except Exception as exc:
            metrics.INTERNAL_ERRORS.labels("thread").inc()
            self._failure = f"the consumer thread of stage {self.stage} died: {exc!r}"
            log.exception("the consumer thread of stage %s died", self.stage)
        finally:
            self._carry_out_requests()
            try:
                self._consumer.close()
            except (KafkaException, RuntimeError) as exc:
                log.warning("closing the consumer of stage %s: %s", self.stage, exc)

    def _count_partitions(self) -> None:
        """Read how many partitions the stage's topics have (a metadata round trip).

        A topic that cannot be described leaves the last count in place.
        """
        total = 0
        for topic in self.topics:
            try:
                meta = self._consumer.list_topics(topic, timeout=_COUNT_TIMEOUT_S)
            except KafkaException as exc:
                log.debug("stage %s: partitions of %s not known: %s", self.stage, topic, exc)
                return
            described = meta.topics.get(topic)
            if described is None or described.error is not None or not described.partitions:
                return
            total += len(described.partitions)
        self._partitions_total = total

    def _self_fenced(self, exc: KafkaException) -> bool:
        """A fatal error between a lost session and the rejoin, for a static member.

        After its session timed out on its own side (a broker outage longer than
        the session), librdkafka forgets the member id and still commits the
        offsets of the lost partitions before rejoining; the broker answers that
        commit, sent without a member id under a known ``group.instance.id``, with
        FENCED_INSTANCE_ID, which librdkafka makes fatal (librdkafka pull request
        5585). No other instance is involved: a new client rejoins at once. A
        second instance started with the same id fences this one while the broker
        is reachable, never in this window (a session lost to an outage, no new
        assignment yet), and stays fatal.
        """
        err = exc.args[0] if exc.args else None
        fatal = isinstance(err, KafkaError) and (err.fatal() or err.code() == KafkaError._FATAL)
        return fatal and self._lost_session and bool(self._settings.group_instance_id)

    def _replace_client(self, why: str) -> None:
        """Close the client (off this thread: it may wait) and rejoin with a new one.

        Its partitions are already gone (lost with the session) or go with it; the
        link, and so what /readyz says, carries over to the new client.
        """
        log.warning("stage %s: %s; rejoining with a new client", self.stage, why)
        old = self._consumer
        threading.Thread(
            target=_close_quietly, args=(old, self.stage), name="consumer-close", daemon=True
        ).start()
        self._lost_session = False
        self._consumer = make_consumer(self._settings, self._group_id, self._link.config())
        self._subscribe()

    def _hand_over(self, batch: list[Message]) -> None:
        good: list[Message] = []
        for msg in batch:
            err = msg.error()
            if err is None:
                good.append(msg)
            elif err.fatal() or err.code() == KafkaError._FATAL:
                # The client is done for (fenced by another member with the same
                # group.instance.id, say): it would poll on, consuming nothing.
                raise KafkaException(err)
            elif err.code() != KafkaError._PARTITION_EOF:
                if err.code() == KafkaError._ALL_BROKERS_DOWN:
                    self._link.broker_down()
                log.warning("stage %s: consumer error: %s", self.stage, err)
        if not good:
            return
        while not self._handoff.acquire(timeout=0.5):
            if self._stop.is_set():
                return
        self._loop.call_soon_threadsafe(self._owner.messages, self, good)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if consumer is not self._consumer:
            return  # a replaced client, closing: its partitions are not ours to take
        self._lost_session = False
        # Requests made for an earlier generation go first, so the resume below wins.
        self._carry_out_requests()
        consumer.incremental_assign(partitions)
        if partitions:
            # A partition paused under a previous owner or generation must not stay
            # paused: our state for it starts empty.
            consumer.resume(partitions)
        self._loop.call_soon_threadsafe(self._owner.assigned, self, partitions)
        self.joined.set()
        log.info("stage %s assigned %s", self.stage, [p.partition for p in partitions] or "nothing")

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if consumer is not self._consumer:
            consumer.incremental_unassign(partitions)  # a replaced client, closing
            return
        if partitions:
            offsets = self._await(self._owner.revoke(self, partitions))
            if offsets:
                try:
                    # With auto-commit on, librdkafka commits the stored offsets of the
                    # partitions being unassigned, after this commit: store them too, or
                    # that commit rewinds the group to an older position (duplicates).
                    consumer.store_offsets(offsets=offsets)
                    consumer.commit(offsets=offsets, asynchronous=False)
                except KafkaException as exc:
                    log.warning("stage %s: commit on revoke failed: %s", self.stage, exc)
            log.info("stage %s revoked %s", self.stage, [p.partition for p in partitions])
        consumer.incremental_unassign(partitions)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Wait until the loop has dropped its state, as a revoke does: a pause it
        # queued for these partitions afterwards would be carried out after a
        # re-assignment, and hold the new owner's partition paused for good.
        async def lose() -> list[TopicPartition]:
            self._owner.lost(self, partitions)
            return []

        if consumer is not self._consumer:
            consumer.incremental_unassign(partitions)  # a replaced client, closing
            return
        # Lost to an outage (the broker unreachable within a session of now), not
        # to another instance taking over: see _self_fenced.
        self._lost_session = self._link.down_within(self._settings.session_timeout_s + 5)
        if not self._loop.is_closed():
            self._await(lose())
        log.warning("stage %s lost %s", self.stage, [p.partition for p in partitions])
        consumer.incremental_unassign(partitions)

    def _await(self, awaitable: Awaitable[list[TopicPartition]]) -> list[TopicPartition]:
        async def wrap() -> list[TopicPartition]:
            return await awaitable

        if self._loop.is_closed():
            return []
        future = asyncio.run_coroutine_threadsafe(wrap(), self._loop)
        try:
            return future.result(timeout=self._settings.drain_timeout_s + 10)
        except Exception as exc:
            log.warning("stage %s: revoke did not finish: %s", self.stage, exc)
            return []

    def _report_lag(self, partition: TopicPartition) -> None:
        """Lag of one assigned partition from the group's committed offset.

        Measured from what is committed, not from the fetch position: a partition
        whose commit stands still while it is fetched ahead shows its true backlog.
        One partition per call, spread over a round: each query is a broker round
        trip made on this thread, and a dozen in a row held back every delivery.
        """
        try:
            if partition not in self._consumer.assignment():
                return  # revoked since the round began: its series is gone
            for tp in self._consumer.committed([partition], timeout=2):
                if tp.error is not None:
                    continue
                # Asked of the broker: the cached end offset only moves with fetches,
                # so it stands still on a paused partition, just when a backlog grows.
                low, high = self._consumer.get_watermark_offsets(tp, timeout=2, cached=False)
                if high < 0:
                    continue
                # No committed offset yet: auto.offset.reset=earliest starts at low.
                start = tp.offset if tp.offset >= 0 else low
                _set_lag(tp.topic, tp.partition, high - max(start, low))
        except KafkaException:
            pass

    def _carry_out_requests(self) -> None:
        while True:
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                return
            try:
                request()
            except KafkaException as exc:
                # _STATE and friends after a revoke: the partition moved on without us.
                log.debug("stage %s: request ignored: %s", self.stage, exc)


def _close_quietly(consumer: Consumer, stage: str) -> None:
    try:
        consumer.close()
    except (KafkaException, RuntimeError) as exc:
        log.debug("closing the fenced consumer of stage %s: %s", stage, exc)


def _set_lag(topic: str, partition: int, lag: int) -> None:
    # The cached end offset can trail a position just consumed past it.
    metrics.CONSUMER_LAG.labels(topic, str(partition)).set(max(lag, 0))
