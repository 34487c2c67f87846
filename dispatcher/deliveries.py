"""Deliveries: one attempt at an endpoint, or the hand-over to the next topic.

A :class:`Delivery` is one (event, subscription) pair for one try. The
:class:`DeliveryRunner` admits it at its endpoint (start, queue or defer), makes
the attempt, and on failure writes the delivery record to the next retry stage
or to the dead-letter topic. Whatever the outcome, it reports the delivery done
only once its result is final or durably written, so the message's offset may
then be committed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

from dispatcher import metrics
from dispatcher.attempts import emit_attempt
from dispatcher.delivery import AttemptResult, build_headers, post
from dispatcher.endpoints import Admission, Endpoint, endpoint_key
from dispatcher.kafka import RetryStage
from dispatcher.models import Subscription
from dispatcher.partitions import PartitionState, Slot, now_ms
from dispatcher.producer import AsyncProducer
from dispatcher.records import Attempt, DeliveryRecord, Source, record_headers
from dispatcher.routing import NextHop, after_failure, for_deferral
from dispatcher.settings import Settings

log = logging.getLogger(__name__)

Spawn = Callable[[PartitionState, Coroutine[Any, Any, None]], None]


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


class DeliveryRunner:
    """Runs deliveries within the per-endpoint limits; counts what is in flight."""

    def __init__(
        self,
        settings: Settings,
        client: httpx.AsyncClient,
        producer: AsyncProducer,
        stages: list[RetryStage],
        spawn: Spawn,
        slot_done: Callable[[Slot], None],
    ) -> None:
        self.settings = settings
        self.client = client
        self.producer = producer
        self.stages = stages
        self.endpoints: dict[str, Endpoint[Delivery]] = {}
        self.in_flight = 0
        self.stopping = False
        self._spawn = spawn
        self._slot_done = slot_done

    def submit(self, d: Delivery) -> None:
        """Start, queue or defer one delivery; its slot waits for it."""
        d.slot.remaining += 1
        self.add_in_flight(1)
        d.endpoint = endpoint_key(d.sub.url)
        ep = self.endpoints.get(d.endpoint)
        if ep is None:
            s = self.settings
            ep = Endpoint(
                s.max_in_flight_per_endpoint,
                s.endpoint_queue_size,
                s.circuit_failure_threshold,
                s.circuit_cooldown_s,
                queue_wait_s=s.endpoint_queue_wait_s,
            )
            self.endpoints[d.endpoint] = ep
        admission = ep.admit(d)
        if admission is Admission.START:
            self._spawn(d.slot.part, self._attempt(ep, d))
        elif admission is not Admission.QUEUED:
            self._spawn(d.slot.part, self._defer(d, admission.value))

    async def _attempt(self, ep: Endpoint[Delivery], d: Delivery) -> None:
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
            hop = None if result.ok else await self._after_failure(d, result)
            emit_attempt(
                self.producer, self.settings.attempts_topic, d, attempt, headers, result, hop
            )
        finally:
            self._abandon_if_unfinished(d)
            self._release(ep, d, None if result is None else result.ok)

    def _release(self, ep: Endpoint[Delivery], d: Delivery, ok: bool | None) -> None:
        nxt = ep.release(ok)
        if nxt is not None:
            self._spawn(nxt.slot.part, self._attempt(ep, nxt))
        if ep.open_until is not None and ep.queue and not self.stopping:
            for waiting in ep.drain_queue():
                self._spawn(waiting.slot.part, self._defer(waiting, "circuit_open"))
        if ep.idle and ep.failures == 0:
            self.endpoints.pop(d.endpoint, None)

    async def _after_failure(self, d: Delivery, result: AttemptResult) -> NextHop:
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
        return hop

    async def _defer(self, d: Delivery, reason: str) -> None:
        metrics.DEFERRALS.labels(reason).inc()
        record = d.record or self._new_record(d)
        record.deferrals += 1
        hop = for_deferral(d.attempts_made, self.stages, now_ms())
        assert hop.stage is not None
        log.info(
            "deferred (%s) to stage %s",
            reason,
            hop.stage.name,
            extra={"delivery_id": d.delivery_id, "webhook_id": d.sub.webhook_id},
        )
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

    def _delivery_done(self, d: Delivery) -> None:
        d.finished = True
        self.add_in_flight(-1)
        self._slot_done(d.slot)

    def _abandon_if_unfinished(self, d: Delivery) -> None:
        """A cancelled delivery frees its in-flight place; its message stays unfinished."""
        if not d.finished:
            d.finished = True
            self.add_in_flight(-1)

    async def evict_excess(self, every_s: float = 0.25) -> None:
        """Defer what waits at endpoints beyond their bound, as their rates become known.

        Runs for the life of the engine: a burst queued at an endpoint that is not
        yet measured is handed to the retry path once it shows itself slow.
        """
        while True:
            await asyncio.sleep(every_s)
            if self.stopping:
                return
            for ep in list(self.endpoints.values()):
                for waiting in ep.excess():
                    self._spawn(waiting.slot.part, self._defer(waiting, "endpoint_busy"))

    def add_in_flight(self, n: int) -> None:
        self.in_flight += n
        metrics.IN_FLIGHT.set(self.in_flight)

    def abandon_queued(self, states: set[PartitionState]) -> None:
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
                self.add_in_flight(-dropped)
