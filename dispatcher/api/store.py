"""The API's own view of the compacted topics, and writes that are read back.

One reader thread follows the subscriptions topic and the organizations topic
from the beginning (like the dispatcher's table) and remembers, per partition,
the next offset it will apply. A write produces, takes the offset from the
delivery report, and waits until the reader has applied that offset: so the
answer to a write, and every read after it, already sees it (read-your-writes),
although the only store is Kafka.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime

from confluent_kafka import KafkaError, Producer
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dispatcher.api.follow import Follower
from dispatcher.errors import KafkaSetupError, SubscriptionError
from dispatcher.kafka import make_producer
from dispatcher.models import Subscription, decode_subscription
from dispatcher.records import Headers
from dispatcher.settings import Settings

log = logging.getLogger(__name__)


class OrganizationRecord(BaseModel):
    """Value of the organizations topic (key = organization id)."""

    model_config = ConfigDict(extra="forbid")

    organization_id: str = Field(min_length=1, max_length=128)
    plan: str = Field(min_length=1, max_length=64)
    updated_at: datetime

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()


class WriteTimeout(KafkaSetupError):
    """A write was acknowledged but not read back in time."""


class Store(Follower):
    """Subscriptions by id and organization, organizations' plans; written through Kafka."""

    name = "webhooks"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, (settings.subscriptions_topic, settings.organizations_topic))
        self.subs: dict[str, Subscription] = {}
        self.plans: dict[str, str] = {}
        self._producer: Producer | None = None

    # --- reads ------------------------------------------------------------
    def for_organization(self, organization_id: str) -> list[Subscription]:
        found = [s for s in list(self.subs.values()) if s.organization_id == organization_id]
        return sorted(found, key=lambda s: (s.created_at, s.webhook_id))

    def plan_of(self, organization_id: str) -> str | None:
        """The organization's plan, or that of its webhooks when none was set."""
        plan = self.plans.get(organization_id)
        if plan is None:
            for sub in list(self.subs.values()):
                if sub.organization_id == organization_id:
                    return sub.plan
        return plan

    # --- lifecycle --------------------------------------------------------
    def start(self) -> None:
        super().start()
        self._producer = make_producer(self.settings)

    def stop(self) -> None:
        super().stop()
        if self._producer is not None:
            self._producer.flush(10)

    # --- writes -----------------------------------------------------------
    def put_subscription(self, sub: Subscription) -> None:
        self.write([(self.settings.subscriptions_topic, sub.webhook_id, sub.to_json())])

    def delete_subscription(self, webhook_id: str) -> None:
        self.write([(self.settings.subscriptions_topic, webhook_id, None)])

    def put_organization(self, record: OrganizationRecord, subs: list[Subscription]) -> None:
        """The organization's record first, then each of its webhooks with the new plan."""
        batch: list[tuple[str, str, bytes | None]] = [
            (self.settings.organizations_topic, record.organization_id, record.to_json())
        ]
        batch += [(self.settings.subscriptions_topic, s.webhook_id, s.to_json()) for s in subs]
        self.write(batch)

    def write(
        self,
        batch: list[tuple[str, str, bytes | None]],
        headers: Headers | None = None,
        each: list[Headers] | None = None,
    ) -> list[tuple[str, int, int]]:
        """Produce every record, then wait until the reader has applied those it reads.

        ``headers`` go on every record of the batch, or ``each`` gives every record
        its own (used for other topics only).
        Returns where each record was written: (topic, partition, offset).
        """
        assert self._producer is not None, "store not started"
        written: list[tuple[str, int, int]] = []
        errors: list[str] = []

        def report(err: KafkaError | None, msg: object) -> None:
            if err is not None:
                errors.append(err.str())
            else:
                written.append((msg.topic(), msg.partition(), msg.offset()))  # type: ignore[attr-defined]

        for i, (topic, key, value) in enumerate(batch):
            own = each[i] if each is not None else headers
            self._producer.produce(
                topic, value, key.encode(), headers=list(own or []), on_delivery=report
            )
        timeout_s = self.settings.api_write_timeout_s
        left = self._producer.flush(timeout_s)
        if left or errors:
            raise KafkaSetupError(f"write not acknowledged by Kafka: {'; '.join(errors) or left}")
        deadline = time.monotonic() + timeout_s
        for topic, partition, offset in written:
            if topic in self.topics and not self.wait_past(topic, partition, offset, deadline):
                raise WriteTimeout("write acknowledged but not read back in time")
        return written

    # --- applying records (reader thread) -----------------------------------
    def apply(
        self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None
    ) -> None:
        if key is None:
            return
        if topic == self.settings.subscriptions_topic:
            self._apply_subscription(key.decode("utf-8", "replace"), value)
        else:
            self._apply_plan(key.decode("utf-8", "replace"), value)

    def _apply_subscription(self, webhook_id: str, value: bytes | None) -> None:
        if value is None:
            self.subs.pop(webhook_id, None)
            return
        try:
            self.subs[webhook_id] = decode_subscription(webhook_id.encode(), value)
        except SubscriptionError as exc:
            log.warning("subscription record %s ignored: %s", webhook_id, exc)

    def _apply_plan(self, organization_id: str, value: bytes | None) -> None:
        if value is None:
            self.plans.pop(organization_id, None)
            return
        try:
            self.plans[organization_id] = OrganizationRecord.model_validate_json(value).plan
        except ValidationError:
            log.warning("organization record %s ignored", organization_id)
