"""Fan-out: which deliveries one consumed message makes, decided without side effects.

An input event becomes one delivery per subscription of its organization that
lists its event and may be called now; a retry record becomes its one delivery
again, if its subscription still may be called and it is not a second copy of a
hop already read in its partition (the one thing remembered here). A retry of a
disabled subscription becomes a delivery *refused*: the engine dead-letters it
with reason ``webhook_disabled``, replayable once the webhook is enabled again. What is
skipped on purpose is counted and logged; nothing is started or written here
(the engine does that).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Final, Protocol

from confluent_kafka import Message
from pydantic import ValidationError

from dispatcher import metrics
from dispatcher.catalog import Catalog
from dispatcher.core.deliveries import WEBHOOK_DISABLED, Delivery
from dispatcher.core.partitions import Slot
from dispatcher.errors import InvalidEvent, Unusable
from dispatcher.models import Subscription, short_errors
from dispatcher.records import DeliveryRecord, Source, delivery_id_for
from dispatcher.settings import Settings
from dispatcher.stages import INPUT_STAGE, RetryStage

log = logging.getLogger(__name__)


class Subscriptions(Protocol):
    """The lookups fan-out makes in the subscriptions table."""

    def get(self, webhook_id: str) -> Subscription | None: ...

    def for_organization(self, organization_id: str) -> tuple[Subscription, ...]: ...


#: Why a subscription must not be called, by reason (the label of
#: ``dispatcher_skipped_deliveries_total``), in words for operators.
SKIP_REASONS: Final = {
    "deleted": "subscription deleted",
    "disabled": "subscription disabled",
    "not_entitled": "plan not entitled",
    "insecure_url": "URL is not https:// and DISPATCHER_ALLOW_HTTP is off",
}


@dataclass(frozen=True, slots=True)
class CallPolicy:
    """The one answer to "may this subscription be called now?".

    Used by fan-out for every input event and retry record, and by dead-letter
    replay and send-test, so that no command calls (or replays to) a webhook the
    service itself would skip.
    """

    entitled: frozenset[str]
    allow_http: bool

    @classmethod
    def of(cls, settings: Settings) -> CallPolicy:
        return cls(frozenset(settings.entitled_plans), settings.allow_http)

    def refusal(self, sub: Subscription | None) -> str | None:
        """None if ``sub`` may be called, else the reason (a key of :data:`SKIP_REASONS`)."""
        if sub is None:
            return "deleted"
        if not sub.enabled:
            return "disabled"
        if sub.plan not in self.entitled:
            return "not_entitled"
        # Stored URLs have their scheme in lower case (see outbound.urls).
        if not sub.url.startswith("https://") and not self.allow_http:
            return "insecure_url"
        return None


class Fanout:
    """Deliveries of a message, by the one policy of who may be called."""

    def __init__(
        self, settings: Settings, table: Subscriptions, catalog: Catalog | None = None
    ) -> None:
        self.settings = settings
        self.table = table
        self.policy = CallPolicy.of(settings)
        self.catalog = catalog or Catalog.load(settings)

    def of_event(self, slot: Slot, msg: Message) -> list[Delivery]:
        topic, partition = slot.part.tp.topic, slot.part.tp.partition
        try:
            event = self.catalog.parse(msg.value(), topic, msg.timestamp()[1])
        except InvalidEvent as exc:
            raise Unusable(exc.reason, exc.detail) from None
        source = Source(topic=topic, partition=partition, offset=slot.offset)
        out = []
        for sub in self.table.for_organization(event.organization_id):
            if event.event not in sub.events or self.skip(sub, None):
                continue
            out.append(
                Delivery(
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
            )
        return out

    def of_record(self, slot: Slot, msg: Message, stage: RetryStage) -> list[Delivery]:
        try:
            record = DeliveryRecord.model_validate_json(msg.value() or b"")
        except ValidationError as exc:
            raise Unusable("invalid_record", short_errors(exc)) from None
        hop = record.hop()
        if hop is not None and slot.part.seen_before(hop):
            # A second copy of one hop (a crash came between writing it and
            # committing its source): going on would double the delivery's chain,
            # and every later crash double it again.
            metrics.SKIPPED.labels("duplicate_copy").inc()
            log.debug(
                "retry skipped: copy of a hop already read",
                extra={"delivery_id": record.delivery_id},
            )
            return []
        sub = self.table.get(record.webhook_id)
        if sub is None:
            metrics.SKIPPED.labels("deleted").inc()
            log.info(
                "retry skipped: subscription deleted",
                extra={"delivery_id": record.delivery_id, "webhook_id": record.webhook_id},
            )
            return []
        if record.event not in sub.events:
            self._skip_log("unsubscribed", record.delivery_id, sub)
            return []
        refused = None
        if not sub.enabled:
            # Disabled while it waited (by someone, or by the writer for failing): kept,
            # replayable, in the dead-letter topic rather than dropped.
            refused = WEBHOOK_DISABLED
        elif self.skip(sub, record.delivery_id):
            return []
        return [
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
                refused=refused,
            )
        ]

    def skip(self, sub: Subscription, delivery_id: str | None) -> bool:
        """Count and log a subscription that must not be called now."""
        reason = self.policy.refusal(sub)
        if reason is None:
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
