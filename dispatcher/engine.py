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
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from confluent_kafka import Message, TopicPartition
from pydantic import ValidationError

from dispatcher import metrics
from dispatcher.consumer import StageConsumer
from dispatcher.delivery import AttemptResult, build_headers, post
from dispatcher.endpoints import Admission, Endpoint, endpoint_key
from dispatcher.kafka import INPUT_STAGE, RetryStage, retry_stages
from dispatcher.models import InvalidEvent, Subscription, parse_event, short_errors
from dispatcher.offsets import OffsetTracker
from dispatcher.producer import AsyncProducer
from dispatcher.records import (
    H_SOURCE,
    Attempt,
    DeliveryRecord,
    Source,
    delivery_id_for,
    due_ms_of,
    record_headers,
)
from dispatcher.routing import after_failure, for_deferral
from dispatcher.settings import Settings
from dispatcher.table import SubscriptionTable

log = logging.getLogger(__name__)

H_INVALID_REASON = "dispatcher-invalid-reason"
H_INVALID_DETAIL = "dispatcher-invalid-detail"


def now_ms() -> int:
    return int(time.time() * 1000)


class PartitionState:
    """One assigned partition of one stage."""

    __slots__ = (
        "active",
        "buffer",
        "consumer",
        "paused",
        "queued",
        "revoked",
        "stage",
        "tasks",
        "timer",
        "tp",
        "tracker",
    )

    def __init__(self, consumer: StageConsumer, tp: TopicPartition, stage: RetryStage | None):
        self.consumer = consumer
        self.tp = TopicPartition(tp.topic, tp.partition)
        self.stage = stage  # None for the input stage
        self.tracker = OffsetTracker()
        self.buffer: deque[Message] = deque()
        self.paused = False
        self.queued = False  # in the pump's run queue
        self.active = True  # new work may start
        self.revoked = False  # completions no longer count
        self.tasks: set[asyncio.Task[None]] = set()
        self.timer: asyncio.TimerHandle | None = None


@dataclass(slots=True, eq=False)
class Slot:
    """One consumed message, finished when ``remaining`` deliveries reach zero."""

    part: PartitionState
    offset: int
    remaining: int = 0


@dataclass(slots=True, eq=False)
class Delivery:
    """One (event, subscription) pair on its way through one attempt or deferral."""

    slot: Slot
    sub: Subscription
    delivery_id: str
    body: bytes
    event: str
    event_time: datetime
    attempts_made: int
    stage: str
    source: Source
    record: DeliveryRecord | None = None
    endpoint: str = field(default="")
    finished: bool = False


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
        self.endpoints: dict[str, Endpoint[Delivery]] = {}
        self.in_flight = 0
        self._runnable: deque[PartitionState] = deque()
        self._dirty: set[PartitionState] = set()
        self._flush_pending = False
        self._pump_pending = False
        self._stopping = False
        self._entitled = frozenset(settings.entitled_plans)

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

    @property
    def ready(self) -> bool:
        return bool(self.consumers) and all(c.joined.is_set() for c in self.consumers)

    async def shutdown(self) -> None:
        """Stop fetching, finish in-flight work within the drain timeout, commit, leave."""
        self._stopping = True
        for ps in self.partitions.values():
            self._deactivate(ps)
            ps.consumer.pause(ps.tp)
        self._abandon_queued(set(self.partitions.values()))
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
        log.debug("batch of %d from %s", len(batch), consumer.stage)
        try:
            touched: set[PartitionState] = set()
            for msg in batch:
                topic, partition, offset = _where(msg)
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
        self._abandon_queued(set(states))
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
        self._abandon_queued(set(states))
        for ps in states:
            for task in ps.tasks:
                task.cancel()

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
        while self.in_flight < limit and self._runnable:
            ps = self._runnable.popleft()
            ps.queued = False
            if not ps.active or not ps.buffer:
                continue
            if ps.stage is not None:
                due = due_ms_of(ps.buffer[0].headers())
                if due > now:
                    self._arm_timer(ps, due, now)
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
        if ps.stage is not None and size and due_ms_of(ps.buffer[0].headers()) > now:
            return True  # nothing to do on this partition until its head is due
        if ps.paused:
            return size > self.settings.partition_buffer_low
        return size >= self.settings.partition_buffer_high

    # --- turning messages into deliveries -------------------------------------
    def _dispatch(self, ps: PartitionState, msg: Message) -> None:
        slot = Slot(ps, _where(msg)[2])
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
            self._submit(delivery)

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
        self._submit(
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
        self.in_flight += 1
        coro = self.producer.send(self.settings.invalid_topic, msg.value(), msg.key(), headers)
        self._spawn(slot.part, self._then_done(coro, slot))

    async def _then_done(self, coro: Coroutine[Any, Any, None], slot: Slot) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            self.in_flight -= 1
            raise
        self._slot_done(slot)

    # --- endpoints ------------------------------------------------------------
    def _submit(self, d: Delivery) -> None:
        d.slot.remaining += 1
        self.in_flight += 1
        metrics.IN_FLIGHT.set(self.in_flight)
        d.endpoint = endpoint_key(d.sub.url)
        ep = self.endpoints.get(d.endpoint)
        if ep is None:
            s = self.settings
            ep = Endpoint(
                s.max_in_flight_per_endpoint,
                s.endpoint_queue_size,
                s.circuit_failure_threshold,
                s.circuit_cooldown_s,
            )
            self.endpoints[d.endpoint] = ep
        admission = ep.admit(d)
        if admission is Admission.START:
            self._spawn(d.slot.part, self._attempt(ep, d))
        elif admission is not Admission.QUEUED:
            self._spawn(d.slot.part, self._defer(d, admission.value))

    def _spawn(self, ps: PartitionState, coro: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(coro)
        ps.tasks.add(task)
        task.add_done_callback(ps.tasks.discard)
        task.add_done_callback(_log_crash)

    async def _attempt(self, ep: Endpoint[Delivery], d: Delivery) -> None:
        log.debug("attempt start", extra={"delivery_id": d.delivery_id})
        result: AttemptResult | None = None
        try:
            attempt = d.attempts_made + 1
            secrets = d.sub.active_secrets(datetime.now(UTC))
            headers = build_headers(d.delivery_id, attempt, d.body, secrets)
            result = await post(
                self.client,
                d.sub.url,
                d.body,
                headers,
                self.settings.http_timeout_s,
                self.settings.response_snippet_bytes,
            )
            outcome = "success" if result.ok else "failure"
            metrics.DELIVERY_ATTEMPTS.labels(d.stage, outcome, result.status_label).inc()
            metrics.ATTEMPT_DURATION.labels(d.stage).observe(result.duration_s)
            if result.ok:
                latency = (datetime.now(UTC) - d.event_time).total_seconds()
                metrics.END_TO_END_LATENCY.observe(max(latency, 0.0))
                log.debug(
                    "delivered",
                    extra={"delivery_id": d.delivery_id, "attempt": attempt, "stage": d.stage},
                )
                self._delivery_done(d)
            else:
                await self._after_failure(d, result)
        finally:
            self._abandon_if_unfinished(d)
            self._release(ep, d, None if result is None else result.ok)

    def _release(self, ep: Endpoint[Delivery], d: Delivery, ok: bool | None) -> None:
        nxt = ep.release(ok)
        if nxt is not None:
            self._spawn(nxt.slot.part, self._attempt(ep, nxt))
        if ep.open_until is not None and ep.queue and not self._stopping:
            for waiting in ep.drain_queue():
                self._spawn(waiting.slot.part, self._defer(waiting, "circuit_open"))
        if ep.idle and ep.failures == 0:
            self.endpoints.pop(d.endpoint, None)

    async def _after_failure(self, d: Delivery, result: AttemptResult) -> None:
        now = datetime.now(UTC)
        record = d.record or self._new_record(d)
        record.attempts_made = d.attempts_made + 1
        record.first_failure_at = record.first_failure_at or now
        record.history.append(
            Attempt(
                attempt=record.attempts_made,
                stage=d.stage,
                at=now,
                duration_ms=round(result.duration_s * 1000, 3),
                status_code=result.status_code,
                error_class=result.error_class,
                error=result.error,
                response_snippet=result.snippet,
            )
        )
        hop = after_failure(
            record.attempts_made,
            self.stages,
            now_ms(),
            result.retry_after_s,
            self.settings.max_retry_after_s,
        )
        extra = {"delivery_id": d.delivery_id, "webhook_id": d.sub.webhook_id}
        if hop.stage is None:
            record.dead_lettered_at = now
            record.dead_letter_reason = f"all {record.attempts_made} attempts failed"
            topic = self.settings.dead_letter_topic
            metrics.DEAD_LETTERS.labels(d.stage).inc()
            log.warning(
                "dead-lettered after attempt %d: %s",
                record.attempts_made,
                record.last_error(),
                extra=extra,
            )
        else:
            topic = hop.stage.topic
            metrics.RETRIES_SCHEDULED.labels(hop.stage.name).inc()
            log.info(
                "attempt %d failed (%s); retry in stage %s",
                record.attempts_made,
                record.last_error(),
                hop.stage.name,
                extra=extra,
            )
        await self.producer.send(
            topic, record.to_json(), d.delivery_id.encode(), record_headers(record, hop.due_ms)
        )
        self._delivery_done(d)

    async def _defer(self, d: Delivery, reason: str) -> None:
        metrics.DEFERRALS.labels(reason).inc()
        record = d.record or self._new_record(d)
        record.deferrals += 1
        hop = for_deferral(d.attempts_made, self.stages, now_ms())
        assert hop.stage is not None
        try:
            await self.producer.send(
                hop.stage.topic,
                record.to_json(),
                d.delivery_id.encode(),
                record_headers(record, hop.due_ms),
            )
            self._delivery_done(d)
        finally:
            self._abandon_if_unfinished(d)

    def _new_record(self, d: Delivery) -> DeliveryRecord:
        return DeliveryRecord(
            delivery_id=d.delivery_id,
            webhook_id=d.sub.webhook_id,
            organization_id=d.sub.organization_id,
            event=d.event,
            event_timestamp=d.event_time,
            body=d.body.decode("utf-8"),
            attempts_made=d.attempts_made,
            source=d.source,
        )

    # --- completion and offsets -----------------------------------------------
    def _delivery_done(self, d: Delivery) -> None:
        d.finished = True
        self._slot_done(d.slot)

    def _abandon_if_unfinished(self, d: Delivery) -> None:
        """A cancelled delivery frees its in-flight place; its message stays unfinished."""
        if not d.finished:
            d.finished = True
            self.in_flight -= 1
            metrics.IN_FLIGHT.set(self.in_flight)

    def _slot_done(self, slot: Slot) -> None:
        self.in_flight -= 1
        metrics.IN_FLIGHT.set(self.in_flight)
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

    def _abandon_queued(self, states: set[PartitionState]) -> None:
        """Drop deliveries still waiting for an endpoint slot on these partitions.

        They never started; their messages stay unfinished, so whoever reads the
        partition next delivers them.
        """
        if not states:
            return
        for ep in self.endpoints.values():
            keep = [d for d in ep.queue if d.slot.part not in states]
            dropped = len(ep.queue) - len(keep)
            if dropped:
                ep.queue.clear()
                ep.queue.extend(keep)
                self.in_flight -= dropped
        metrics.IN_FLIGHT.set(self.in_flight)


def _where(msg: Message) -> tuple[str, int, int]:
    """Topic, partition and offset of a consumed (never an error) message."""
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    assert topic is not None and partition is not None and offset is not None
    return topic, partition, offset


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("delivery task failed", exc_info=exc)


def _forget_lag(tp: TopicPartition) -> None:
    with contextlib.suppress(KeyError):
        metrics.CONSUMER_LAG.remove(tp.topic, str(tp.partition))
