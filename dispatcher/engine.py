"""The dispatch engine: every stage's partitions, deliveries and offsets on one event loop.

Messages consumed for a partition wait in that partition's buffer; a round-robin
pump takes them out while the global in-flight limit allows and, on a retry
stage, only once the head record is due. A partition is paused while its buffer
is over the high mark (or its head is not due yet) and resumed under the low
mark, so memory follows the limits and never the backlog. Each message fans out
to deliveries; its offset is finished when every one of them has succeeded, been
skipped on purpose, or been durably written to the next topic, and the tracker
then lets the committable position move past it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Coroutine
from typing import Any

import httpx
from confluent_kafka import Message, TopicPartition
from pydantic import ValidationError

from dispatcher import metrics
from dispatcher.consumer import StageConsumer
from dispatcher.deliveries import Delivery, DeliveryRunner
from dispatcher.kafka import INPUT_STAGE, RetryStage, retry_stages
from dispatcher.models import InvalidEvent, Subscription, parse_event, short_errors
from dispatcher.partitions import PartitionState, Slot, now_ms, position_of
from dispatcher.producer import AsyncProducer
from dispatcher.records import H_SOURCE, DeliveryRecord, Source, delivery_id_for, due_ms_of
from dispatcher.settings import Settings
from dispatcher.table import SubscriptionTable

log = logging.getLogger(__name__)

H_INVALID_REASON = "dispatcher-invalid-reason"
H_INVALID_DETAIL = "dispatcher-invalid-detail"
#: A retry partition paused until its head is due resumes this much earlier: a
#: resumed partition takes a fetch round trip (hundreds of ms) to deliver the
#: records behind the head, which are often due right after it.
RESUME_AHEAD_MS = 1000


class Engine:
    """Runs the input stage and every retry stage on the current event loop."""

    def __init__(
        self,
        settings: Settings,
        table: SubscriptionTable,
        client: httpx.AsyncClient,
        producer: AsyncProducer,
    ) -> None:
        self.settings = settings
        self.table = table
        self.client = client
        self.producer = producer
        self.stages = retry_stages(settings)
        self._stage_of_topic = {s.topic: s for s in self.stages}
        self._loop = asyncio.get_running_loop()
        self.consumers: list[StageConsumer] = []
        self.partitions: dict[tuple[str, int], PartitionState] = {}
        self.runner = DeliveryRunner(
            settings, client, producer, self.stages, self._spawn, self._slot_done
        )
        self._runnable: deque[PartitionState] = deque()
        self._dirty: set[PartitionState] = set()
        self._flush_pending = False
        self._pump_pending = False
        self._stopping = False
        self._entitled = frozenset(settings.entitled_plans)
        self._evictor: asyncio.Task[None] | None = None

    # --- lifecycle ------------------------------------------------------------
    def start(self) -> None:
        """Join the consumer groups of the input stage and of every retry stage."""
        group = self.settings.group_id
        self.consumers = [
            StageConsumer(
                self.settings, INPUT_STAGE, self.settings.input_topic, group, self, self._loop
            )
        ]
        for stage in self.stages:
            self.consumers.append(
                StageConsumer(
                    self.settings,
                    stage.name,
                    stage.topic,
                    f"{group}.{stage.name}",
                    self,
                    self._loop,
                )
            )
        for consumer in self.consumers:
            consumer.start()
        self._evictor = self._loop.create_task(self.runner.evict_excess())

    @property
    def ready(self) -> bool:
        return bool(self.consumers) and all(c.joined.is_set() for c in self.consumers)

    async def shutdown(self) -> None:
        """Stop fetching, finish in-flight work within the drain timeout, commit, leave."""
        self._stopping = True
        self.runner.stopping = True
        if self._evictor is not None:
            self._evictor.cancel()
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
        self._flush()
        await asyncio.to_thread(self.producer.close)
        for consumer in self.consumers:
            await asyncio.to_thread(consumer.close)

    # --- PartitionOwner (called on the loop by the consumer threads) ----------
    def assigned(self, consumer: StageConsumer, partitions: list[TopicPartition]) -> None:
        stage = self._stage_of_topic.get(consumer.topic)
        for tp in partitions:
            old = self.partitions.get((tp.topic, tp.partition))
            if old is not None:
                self._deactivate(old)
                old.revoked = True
            self.partitions[(tp.topic, tp.partition)] = PartitionState(consumer, tp, stage)

    def messages(self, consumer: StageConsumer, batch: list[Message]) -> None:
        try:
            touched: set[PartitionState] = set()
            for msg in batch:
                topic, partition, offset = position_of(msg)
                ps = self.partitions.get((topic, partition))
                if ps is None or not ps.active or ps.consumer is not consumer:
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
        self, consumer: StageConsumer, partitions: list[TopicPartition]
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
            ps.revoked = True
            self.partitions.pop((ps.tp.topic, ps.tp.partition), None)
            self._dirty.discard(ps)
            _forget_lag(ps.tp)
            position = ps.tracker.position
            if position is not None:
                offsets.append(TopicPartition(ps.tp.topic, ps.tp.partition, position))
        return offsets

    def lost(self, consumer: StageConsumer, partitions: list[TopicPartition]) -> None:
        states = []
        for tp in partitions:
            ps = self.partitions.get((tp.topic, tp.partition))
            if ps is not None and ps.consumer is consumer:
                self.partitions.pop((tp.topic, tp.partition))
                self._deactivate(ps)
                ps.revoked = True
                states.append(ps)
                _forget_lag(ps.tp)
        self.runner.abandon_queued(set(states))
        for ps in states:
            for task in ps.tasks:
                # On the next turn of the loop: a task cancelled before its first step
                # never runs its ``finally``, and would keep its in-flight count and
                # its endpoint slot for good.
                self._loop.call_soon(task.cancel)

    # --- the pump -------------------------------------------------------------
    def _enqueue(self, ps: PartitionState) -> None:
        if not ps.queued and ps.active and ps.buffer:
            ps.queued = True
            self._runnable.append(ps)

    def _pump_soon(self) -> None:
        if not self._pump_pending:
            self._pump_pending = True
            self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        self._pump_pending = False
        limit = self.settings.max_in_flight
        now = now_ms()
        while self.runner.in_flight < limit and self._runnable:
            ps = self._runnable.popleft()
            ps.queued = False
            if not ps.active or not ps.buffer:
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
        ps.timer = self._loop.call_later((due_ms - now) / 1000, self._wake, ps)

    def _wake(self, ps: PartitionState) -> None:
        ps.timer = None
        self._enqueue(ps)
        self._pump()

    def _update_pause(self, ps: PartitionState, now: int | None = None) -> None:
        want = self._want_paused(ps, now_ms() if now is None else now)
        if want != ps.paused and ps.active:
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
        if ps.stage is None:
            self._dispatch_event(slot, msg)
        else:
            self._dispatch_record(slot, msg, ps.stage)
        if slot.remaining == 0:
            self._finish_slot(slot)

    def _dispatch_event(self, slot: Slot, msg: Message) -> None:
        try:
            event = parse_event(msg.value(), self.settings.max_event_bytes)
        except InvalidEvent as exc:
            self._reject(slot, msg, exc.reason, exc.detail)
            return
        topic, partition = slot.part.tp.topic, slot.part.tp.partition
        source = Source(topic=topic, partition=partition, offset=slot.offset)
        for sub in self.table.for_organization(event.organization_id):
            if event.event not in sub.events:
                continue
            if self._skip(sub, None):
                continue
            delivery = Delivery(
                slot=slot,
                sub=sub,
                delivery_id=delivery_id_for(topic, partition, slot.offset, sub.webhook_id),
                body=event.body,
                event=event.event,
                event_time=event.occurred_at,
                attempts_made=0,
                stage=INPUT_STAGE,
                source=source,
            )
            self.runner.submit(delivery)

    def _dispatch_record(self, slot: Slot, msg: Message, stage: RetryStage) -> None:
        try:
            record = DeliveryRecord.model_validate_json(msg.value() or b"")
        except ValidationError as exc:
            self._reject(slot, msg, "invalid_record", short_errors(exc))
            return
        sub = self.table.get(record.webhook_id)
        if sub is None:
            metrics.SKIPPED.labels("deleted").inc()
            log.info(
                "retry skipped: subscription deleted",
                extra={"delivery_id": record.delivery_id, "webhook_id": record.webhook_id},
            )
            return
        if record.event not in sub.events:
            self._skip_log("unsubscribed", record.delivery_id, sub)
            return
        if self._skip(sub, record.delivery_id):
            return
        self.runner.submit(
            Delivery(
                slot=slot,
                sub=sub,
                delivery_id=record.delivery_id,
                body=record.body_bytes,
                event=record.event,
                event_time=record.event_timestamp,
                attempts_made=record.attempts_made,
                stage=stage.name,
                source=record.source,
                record=record,
            )
        )

    def _skip(self, sub: Subscription, delivery_id: str | None) -> bool:
        """Count and log a subscription that must not be called now."""
        if not sub.enabled:
            reason = "disabled"
        elif sub.plan not in self._entitled:
            reason = "not_entitled"
        elif not sub.url.startswith("https://") and not self.settings.allow_http:
            reason = "insecure_url"
        else:
            return False
        self._skip_log(reason, delivery_id, sub)
        return True

    def _skip_log(self, reason: str, delivery_id: str | None, sub: Subscription) -> None:
        metrics.SKIPPED.labels(reason).inc()
        log.info(
            "delivery skipped: %s",
            reason,
            extra={"delivery_id": delivery_id, "webhook_id": sub.webhook_id},
        )

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
        headers = [
            (H_INVALID_REASON, reason.encode()),
            (H_INVALID_DETAIL, detail.encode()[:1000]),
            (H_SOURCE, f"{msg.topic()}/{msg.partition()}/{msg.offset()}".encode()),
        ]
        slot.remaining += 1
        self.runner.add_in_flight(1)
        coro = self.producer.send(self.settings.invalid_topic, msg.value(), msg.key(), headers)
        self._spawn(slot.part, self._then_done(coro, slot))

    async def _then_done(self, coro: Coroutine[Any, Any, None], slot: Slot) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            self.runner.add_in_flight(-1)
            raise
        self.runner.add_in_flight(-1)
        self._slot_done(slot)

    # --- tasks -----------------------------------------------------------------
    def _spawn(self, ps: PartitionState, coro: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(coro)
        ps.tasks.add(task)
        task.add_done_callback(ps.tasks.discard)
        task.add_done_callback(_log_crash)

    # --- completion and offsets -----------------------------------------------
    def _slot_done(self, slot: Slot) -> None:
        slot.remaining -= 1
        if slot.remaining == 0:
            self._finish_slot(slot)
        self._pump_soon()

    def _finish_slot(self, slot: Slot) -> None:
        ps = slot.part
        if not ps.revoked and ps.tracker.finished(slot.offset):
            self._dirty.add(ps)
            if not self._flush_pending:
                self._flush_pending = True
                self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        by_consumer: dict[StageConsumer, list[TopicPartition]] = {}
        for ps in self._dirty:
            position = ps.tracker.position
            if not ps.revoked and position is not None:
                tp = TopicPartition(ps.tp.topic, ps.tp.partition, position)
                by_consumer.setdefault(ps.consumer, []).append(tp)
        self._dirty.clear()
        for consumer, offsets in by_consumer.items():
            consumer.store(offsets)

    def _deactivate(self, ps: PartitionState) -> None:
        ps.active = False
        ps.buffer.clear()
        if ps.timer is not None:
            ps.timer.cancel()
            ps.timer = None


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("delivery task failed", exc_info=exc)


def _forget_lag(tp: TopicPartition) -> None:
    with contextlib.suppress(KeyError):
        metrics.CONSUMER_LAG.remove(tp.topic, str(tp.partition))
