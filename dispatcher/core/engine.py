"""The dispatch engine: every stage's partitions, deliveries and offsets on one event loop.

Messages consumed for a partition wait in that partition's buffer; a round-robin
pump takes them out while the global in-flight limit allows and, on a retry
stage, only once the head record is due. A partition is paused while its buffer
is over the high mark (or its head is not due yet) and resumed under the low
mark, so memory follows the limits and never the backlog; it also waits while an
endpoint it fed has a full queue (backpressure, recorded in
:class:`~dispatcher.core.backpressure.Backpressure`). Each message fans out to
deliveries; its offset is finished when every one of them has succeeded, been
skipped on purpose, or been durably written to the next topic, and the tracker
then lets the committable position move past it. The counting is owned by
:class:`~dispatcher.core.work.Work` alone.

The way back is one event: whatever ends a ticket or lets a partition go on
sets it, and one settling task (:meth:`Engine._settle`) then stores the moved
positions, queues the partitions that no longer wait and runs the pump.

Nothing that one record holds may stop the pump: an exception while fanning a
message out sends it to the invalid-events topic (reason ``internal``); one that
escapes the pump itself sets :attr:`Engine.failure`, and the service drains and
exits. A progress watchdog reports partitions whose committable offset stands
still while work is pending (:attr:`Engine.stuck`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque

from confluent_kafka import Message, TopicPartition

from dispatcher import metrics
from dispatcher.backlog import instance_id, snapshot
from dispatcher.catalog import Catalog
from dispatcher.core.backpressure import Backpressure
from dispatcher.core.consumer import ConsumerFactory, StageConsumer, StageFeed
from dispatcher.core.deliveries import DeliveryRunner
from dispatcher.core.fanout import Fanout, Subscriptions
from dispatcher.core.invalid import Headers, invalid_headers, write_invalid
from dispatcher.core.links import first_problem
from dispatcher.core.loop_lag import LoopLag
from dispatcher.core.partitions import PartitionState, Phase, Slot, now_ms, position_of
from dispatcher.core.producer import RecordSink
from dispatcher.core.ratelimit import partition_share
from dispatcher.core.watchdog import stuck_partitions
from dispatcher.core.work import Ticket, Work
from dispatcher.errors import Unusable
from dispatcher.outbound.sender import Sender
from dispatcher.records import due_ms_of
from dispatcher.settings import Settings
from dispatcher.stages import INPUT_STAGE, retry_stages

log = logging.getLogger(__name__)

#: A retry partition paused until its head is due resumes this much earlier: a
#: resumed partition takes a fetch round trip (hundreds of ms) to deliver the
#: records behind the head, which are often due right after it.
RESUME_AHEAD_MS = 1000
#: How often endpoints are checked for stalls and partitions for progress.
TICK_S = 0.25


class Engine:
    """Runs the input stage and every retry stage on the current event loop."""

    def __init__(
        self,
        settings: Settings,
        table: Subscriptions,
        sender: Sender,
        producer: RecordSink,
        consumer_factory: ConsumerFactory = StageConsumer,
        catalog: Catalog | None = None,
    ) -> None:
        self.settings = settings
        self.table = table
        self.sender = sender
        self.producer = producer
        self.stages = retry_stages(settings)
        self._stage_of_topic = {s.topic: s for s in self.stages}
        metrics.counters_from_zero([INPUT_STAGE, *(s.name for s in self.stages)])
        self._loop = asyncio.get_running_loop()
        self._consumer_factory = consumer_factory
        self.consumers: list[StageFeed] = []
        self.partitions: dict[tuple[str, int], PartitionState] = {}
        #: Set when a ticket ends or a partition stops waiting; :meth:`_settle` clears it.
        self._wake = asyncio.Event()
        self.work = Work(self._wake)
        self.backpressure = Backpressure(self._wake)
        #: How late the loop runs (measured by the tick): the runner asks it before
        #: judging an endpoint slow from its answers' durations.
        self.loop_lag = LoopLag()
        self.runner = DeliveryRunner(
            settings, sender, producer, self.stages, self.work, self.backpressure, self.loop_lag
        )
        self._runnable: deque[PartitionState] = deque()
        self._stopping = False
        #: The event types: the input stage reads every one's input topic.
        self.catalog = catalog or Catalog.load(settings)
        self.fanout = Fanout(settings, table, self.catalog)
        self._ticker: asyncio.Task[None] | None = None
        self._settler: asyncio.Task[None] | None = None
        self._failure: str | None = None
        #: Partitions reported stuck by the watchdog ("topic/partition for N s").
        self.stuck: list[str] = []
        #: This instance's key in the backlog topic, and when it last wrote there
        #: (the first snapshot one interval after start, once endpoints were seen).
        self._instance = instance_id(settings)
        self._backlog_written = time.monotonic()

    # --- lifecycle ------------------------------------------------------------
    def start(self) -> None:
        """Join the consumer groups of the input stage and of every retry stage."""
        group = self.settings.group_id
        # One group for the input stage, whatever number of topics the catalog names.
        feeds = [(INPUT_STAGE, self.catalog.input_topics, group)]
        feeds += [(s.name, (s.topic,), f"{group}.{s.name}") for s in self.stages]
        self.consumers = [
            self._consumer_factory(self.settings, name, topic, group_id, self, self._loop)
            for name, topic, group_id in feeds
        ]
        for consumer in self.consumers:
            consumer.start()
        self._settler = self._loop.create_task(self._settle())
        self._ticker = self._loop.create_task(self._tick())

    @property
    def ready(self) -> bool:
        return bool(self.consumers) and all(c.ready for c in self.consumers)

    @property
    def disconnected(self) -> str | None:
        """Why a stage cannot consume now (broker unreachable, not in its group), or None.

        From what the consumers' clients last reported: never waits on Kafka.
        """
        return first_problem([c.link for c in self.consumers if c.link is not None])

    @property
    def refused(self) -> str | None:
        """A hand-over or invalid-event write refused for good (its message stays unfinished)."""
        return self.work.refused

    @property
    def failure(self) -> str | None:
        """Why the engine cannot go on (the pump, a polling thread), or None."""
        if self._failure is not None:
            return self._failure
        for consumer in self.consumers:
            if consumer.failure is not None:
                return consumer.failure
        return self.producer.failure

    async def shutdown(self) -> None:
        """Stop fetching, finish in-flight work within the drain timeout, commit, leave."""
        self._stopping = True
        self.runner.stopping = True
        if self._ticker is not None:
            self._ticker.cancel()
        for ps in self.partitions.values():
            self._deactivate(ps)
            ps.consumer.pause(ps.tp)
        self.runner.abandon_queued(set(self.partitions.values()))
        tasks = {t for ps in self.partitions.values() for t in ps.tasks}
        if tasks:
            log.info("draining %d in-flight deliveries", len(tasks))
            _done, pending = await asyncio.wait(tasks, timeout=self.settings.drain_timeout_s)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("gave up %d deliveries at the drain timeout", len(pending))
                await asyncio.wait(pending, timeout=5)
        if self._settler is not None:
            self._settler.cancel()
        self._store_positions()
        self.runner.deferrals.flush(force=True)
        self._write_backlog(stopping=True)
        await asyncio.to_thread(self.producer.close)
        for consumer in self.consumers:
            await asyncio.to_thread(consumer.close)

    # --- PartitionOwner (called on the loop by the consumer threads) ----------
    def assigned(self, consumer: StageFeed, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            stage = self._stage_of_topic.get(tp.topic)
            old = self.partitions.get((tp.topic, tp.partition))
            if old is not None:
                self._deactivate(old)
                old.phase = Phase.REVOKED
            self.partitions[(tp.topic, tp.partition)] = PartitionState(consumer, tp, stage)

    def messages(self, consumer: StageFeed, batch: list[Message]) -> None:
        try:
            touched: set[PartitionState] = set()
            for msg in batch:
                topic, partition, offset = position_of(msg)
                ps = self.partitions.get((topic, partition))
                if ps is None or ps.phase is not Phase.ACTIVE or ps.consumer is not consumer:
                    continue
                try:
                    ps.tracker.received(offset)
                except ValueError:
                    continue  # already seen: refetched after a pause or rebalance
                ps.buffer.append(msg)
                touched.add(ps)
            for ps in touched:
                self._enqueue(ps)
                self._update_pause(ps)
        finally:
            consumer.batch_done()
        self._pump()

    async def revoke(
        self, consumer: StageFeed, partitions: list[TopicPartition]
    ) -> list[TopicPartition]:
        states = [
            ps
            for tp in partitions
            if (ps := self.partitions.get((tp.topic, tp.partition))) is not None
            and ps.consumer is consumer
        ]
        for ps in states:
            self._deactivate(ps)
        self.runner.abandon_queued(set(states))
        tasks = {t for ps in states for t in ps.tasks}
        if tasks and not self._stopping:
            _done, pending = await asyncio.wait(tasks, timeout=self.settings.drain_timeout_s)
            for task in pending:
                task.cancel()
        offsets = []
        for ps in states:
            ps.phase = Phase.REVOKED
            self.partitions.pop((ps.tp.topic, ps.tp.partition), None)
            _forget_lag(ps.tp)
            position = ps.tracker.position
            if position is not None:
                offsets.append(TopicPartition(ps.tp.topic, ps.tp.partition, position))
        return offsets

    def lost(self, consumer: StageFeed, partitions: list[TopicPartition]) -> None:
        states = []
        for tp in partitions:
            ps = self.partitions.get((tp.topic, tp.partition))
            if ps is not None and ps.consumer is consumer:
                self.partitions.pop((tp.topic, tp.partition))
                self._deactivate(ps)
                ps.phase = Phase.REVOKED
                states.append(ps)
                _forget_lag(ps.tp)
        self.runner.abandon_queued(set(states))
        for ps in states:
            for task in ps.tasks:
                # On the next turn of the loop: a task cancelled before its first step
                # never runs its ``finally``, and would keep its endpoint slot for good
                # (its ticket is released by its done callback either way).
                self._loop.call_soon(task.cancel)

    # --- the pump -------------------------------------------------------------
    def _enqueue(self, ps: PartitionState) -> None:
        if (
            not ps.queued
            and ps.phase is Phase.ACTIVE
            and ps.buffer
            and not self.backpressure.holds(ps)
        ):
            ps.queued = True
            self._runnable.append(ps)

    async def _settle(self) -> None:
        """After tickets end or partitions stop waiting: store the positions that
        moved, queue what goes on, take more work. Runs until the shutdown."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                self._store_positions()
                for ps in self.backpressure.take_resumed():
                    self._enqueue(ps)
            except Exception as exc:
                # Without it no offset would move again and no partition go on.
                metrics.INTERNAL_ERRORS.labels("pump").inc()
                self._failure = f"storing offsets failed: {exc!r}"
                log.exception("storing offsets failed")
                return
            self._pump()

    def _pump(self) -> None:
        if self._failure is not None:
            return
        try:
            self._pump_some()
        except Exception as exc:
            metrics.INTERNAL_ERRORS.labels("pump").inc()
            self._failure = f"the dispatch pump failed: {exc!r}"
            log.exception("the dispatch pump failed")

    def _pump_some(self) -> None:
        limit = self.settings.max_in_flight
        now = now_ms()
        while self.work.in_flight < limit and self._runnable:
            ps = self._runnable.popleft()
            ps.queued = False
            if ps.phase is not Phase.ACTIVE or not ps.buffer or self.backpressure.holds(ps):
                continue
            if ps.stage is not None:
                due = due_ms_of(ps.buffer[0].headers())
                if due > now:
                    # Wake once to resume fetching ahead of the due time, then to dispatch.
                    ahead = due - RESUME_AHEAD_MS
                    self._arm_timer(ps, ahead if ahead > now else due, now)
                    self._update_pause(ps, now)
                    continue
            self._dispatch(ps, ps.buffer.popleft())
            self._enqueue(ps)
            self._update_pause(ps, now)

    def _arm_timer(self, ps: PartitionState, due_ms: int, now: int) -> None:
        if ps.timer is not None:
            ps.timer.cancel()
        ps.timer = self._loop.call_later((due_ms - now) / 1000, self._head_due, ps)

    def _head_due(self, ps: PartitionState) -> None:
        ps.timer = None
        self._enqueue(ps)
        self._pump()

    def _update_pause(self, ps: PartitionState, now: int | None = None) -> None:
        want = self._want_paused(ps, now_ms() if now is None else now)
        if want != ps.paused and ps.phase is Phase.ACTIVE:
            ps.paused = want
            if want:
                ps.consumer.pause(ps.tp)
            else:
                ps.consumer.resume(ps.tp)

    def _want_paused(self, ps: PartitionState, now: int) -> bool:
        size = len(ps.buffer)
        if (
            ps.stage is not None
            and size
            and due_ms_of(ps.buffer[0].headers()) > now + RESUME_AHEAD_MS
        ):
            return True  # nothing to do on this partition until its head is (nearly) due
        if ps.paused:
            return size > self.settings.partition_buffer_low
        return size >= self.settings.partition_buffer_high

    # --- turning messages into deliveries -------------------------------------
    def _dispatch(self, ps: PartitionState, msg: Message) -> None:
        slot = Slot(ps, position_of(msg)[2])
        with self.work.message(slot):
            try:
                if ps.stage is None:
                    deliveries = self.fanout.of_event(slot, msg)
                else:
                    deliveries = self.fanout.of_record(slot, msg, ps.stage)
            except Unusable as exc:
                self._reject(slot, msg, exc.reason, exc.detail)
                return
            except Exception as exc:
                # Whatever the record holds, it ends somewhere recorded.
                metrics.INTERNAL_ERRORS.labels("fan_out").inc()
                log.exception(
                    "fanning out %s/%d@%d failed", ps.tp.topic, ps.tp.partition, slot.offset
                )
                self._reject(slot, msg, "internal", f"{type(exc).__name__}: {exc}")
                return
            for delivery in deliveries:
                if delivery.refused is None:
                    self.runner.submit(delivery)
                else:
                    self.runner.refuse(delivery)

    def _reject(self, slot: Slot, msg: Message, reason: str, detail: str) -> None:
        """Write an unusable input message, bytes intact, to the invalid-events topic."""
        metrics.INVALID_EVENTS.labels(reason).inc()
        log.warning(
            "invalid message %s/%d@%d: %s: %s",
            msg.topic(),
            msg.partition(),
            msg.offset(),
            reason,
            detail,
        )
        headers = invalid_headers(msg, reason, detail)
        label = f"the invalid-event write of {msg.topic()}@{msg.offset()}"
        ticket = self.work.open(slot, label)
        self.work.start(ticket, self._write_invalid(ticket, msg.value(), msg.key(), headers))

    async def _write_invalid(
        self, ticket: Ticket, value: bytes | None, key: bytes | None, headers: Headers
    ) -> None:
        topic = self.settings.invalid_topic
        refused = await write_invalid(self.producer, topic, ticket.label, value, key, headers)
        if refused is None:
            self.work.finish(ticket)
        else:
            self.work.refuse(ticket, refused)

    # --- supervision -----------------------------------------------------------
    async def _tick(self) -> None:
        """Stalled endpoints, deferral counts and partition progress, a few times a second."""
        try:
            while not self._stopping:
                asleep = self._loop.time()
                await asyncio.sleep(TICK_S)
                self.loop_lag.observe(self._loop.time() - asleep, TICK_S)
                self.runner.share = self._rate_limit_share()
                self.runner.check_endpoints()
                self._write_backlog()
                self.runner.deferrals.flush()
                self.stuck = stuck_partitions(
                    self.partitions.values(), self.settings, len(self.stuck)
                )
        except Exception as exc:
            # Without it stalls go unnoticed and partitions may wait for good.
            metrics.INTERNAL_ERRORS.labels("tick").inc()
            self._failure = f"the engine's supervision tick failed: {exc!r}"
            log.exception("the engine's supervision tick failed")

    def _write_backlog(self, stopping: bool = False) -> None:
        """Every DISPATCHER_BACKLOG_REPORT_EVERY_S, this instance's backlogs for the API.

        Written even when empty, so the API tells "none here" from "no word from
        this instance" (a stale snapshot); on shutdown an empty one, as what this
        instance held is handed on. Queued without waiting: a lost snapshot is
        replaced by the next one.
        """
        now = time.monotonic()
        every_s = self.settings.backlog_report_every_s
        if not stopping and now - self._backlog_written < every_s:
            return
        self._backlog_written = now
        snap = snapshot(self._instance, every_s, {} if stopping else self.runner.backlogs)
        self.producer.produce_nowait(
            self.settings.backlog_topic, snap.to_json(), self._instance.encode()
        )

    def _rate_limit_share(self) -> float:
        """This instance's share of every webhook's rate limit: of the partitions of
        every stage, the fraction it consumes (see :mod:`dispatcher.core.ratelimit`)."""
        owned = sum(1 for ps in self.partitions.values() if ps.phase is Phase.ACTIVE)
        share = partition_share(owned, (c.partitions_total for c in self.consumers))
        metrics.RATE_LIMIT_SHARE.set(share)
        return share

    # --- offsets ---------------------------------------------------------------
    def _store_positions(self) -> None:
        """Hand each moved committable position to its consumer, to commit."""
        by_consumer: dict[StageFeed, list[TopicPartition]] = {}
        for ps in self.work.take_moved():
            position = ps.tracker.position
            if ps.phase is not Phase.REVOKED and position is not None:
                tp = TopicPartition(ps.tp.topic, ps.tp.partition, position)
                by_consumer.setdefault(ps.consumer, []).append(tp)
        for consumer, offsets in by_consumer.items():
            consumer.store(offsets)

    def _deactivate(self, ps: PartitionState) -> None:
        """No new work on ``ps``: what runs may still finish (one given up stays so)."""
        if ps.phase is Phase.ACTIVE:
            ps.phase = Phase.DRAINING
        ps.buffer.clear()
        if ps.timer is not None:
            ps.timer.cancel()
            ps.timer = None


def _forget_lag(tp: TopicPartition) -> None:
    with contextlib.suppress(KeyError):
        metrics.CONSUMER_LAG.remove(tp.topic, str(tp.partition))
