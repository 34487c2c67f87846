"""The configuration as one process sees it: subscriptions, plans, answers to keyed creates.

A :class:`~dispatcher.follow.Follower` (the reader the dispatcher's subscriptions
table uses too) over the three configuration topics and the webhooks' health
(:mod:`dispatcher.webhook_health`), read ``read_committed`` (a change is seen
whole or not at all). The one writer decides every change against this view (see
:mod:`dispatcher.manage`), after reading it to the end; the API's replicas answer
reads from it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from dispatcher.errors import SubscriptionError
from dispatcher.follow import Follower
from dispatcher.kafka import Outgoing
from dispatcher.manage import OrganizationRecord
from dispatcher.models import Subscription, decode_subscription
from dispatcher.settings import Settings
from dispatcher.webhook_health import POSITION_KEY, HealthPosition, WebhookHealth, decode_health

log = logging.getLogger(__name__)

#: Answers applied between two sweeps of the expired ones.
_PRUNE_EVERY = 1000


class Answer(BaseModel):
    """The answer to a keyed create, replayed as it was (the generated secret included).

    Value of the idempotency topic; its key is :func:`answer_key` of the request's slot.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    fingerprint: str
    status: int
    body: dict[str, Any]
    webhook_id: str
    expires_at: float  # epoch seconds

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()


def answer_key(organization_id: str, key_name: str, idempotency_key: str) -> str:
    """One record key per (organization, API key name, Idempotency-Key)."""
    digest = hashlib.sha256(f"{organization_id}\0{key_name}\0{idempotency_key}".encode())
    return digest.hexdigest()


class ConfigView(Follower):
    """Subscriptions by id, organizations' plans, and live answers to keyed creates."""

    name = "configuration"

    def __init__(self, settings: Settings) -> None:
        super().__init__(
            settings,
            (
                settings.subscriptions_topic,
                settings.organizations_topic,
                settings.idempotency_topic,
                settings.health_topic,
            ),
        )
        self.subs: dict[str, Subscription] = {}
        self.plans: dict[str, str] = {}
        self.answers: dict[str, Answer] = {}
        #: Webhook ids whose latest record does not validate, with why (delete clears them).
        self.ignored: dict[str, str] = {}
        self._applied_answers = 0
        #: Each webhook's health, and where the writer's fold of the attempts stands.
        self.health: dict[str, WebhookHealth] = {}
        self.health_position: HealthPosition | None = None

    # --- reads (any thread) --------------------------------------------------
    def subscription(self, webhook_id: str) -> Subscription | None:
        return self.subs.get(webhook_id)

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

    def answer(self, key: str) -> Answer | None:
        found = self.answers.get(key)
        if found is None or found.expires_at < time.time():
            return None
        return found

    def holds(self, record: Outgoing) -> bool:
        """Whether the view shows ``record`` in force (checks a change whose commit went
        unanswered, once the view has been read to the end)."""
        key = (record.key or b"").decode()
        if record.topic == self.settings.subscriptions_topic:
            sub = self.subs.get(key)
            if record.value is None:
                return sub is None
            return sub is not None and sub.to_json() == record.value
        if record.topic == self.settings.idempotency_topic:
            found = self.answers.get(key)
            return (
                found is not None
                and record.value is not None
                and (found == Answer.model_validate_json(record.value))
            )
        if record.topic == self.settings.health_topic:
            if key == POSITION_KEY:
                return record.value is not None and self.health_position == (
                    HealthPosition.model_validate_json(record.value)
                )
            if record.value is None:
                return key not in self.health
            return self.health.get(key) == decode_health(record.value)
        if record.value is None:
            return key not in self.plans
        return self.plans.get(key) == OrganizationRecord.model_validate_json(record.value).plan

    # --- applying records (reader thread) -------------------------------------
    def apply(
        self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None
    ) -> None:
        if key is None:
            return
        name = key.decode("utf-8", "replace")
        if topic == self.settings.subscriptions_topic:
            self._apply_subscription(name, value)
        elif topic == self.settings.organizations_topic:
            self._apply_plan(name, value)
        elif topic == self.settings.health_topic:
            self._apply_health(name, value)
        else:
            self._apply_answer(name, value)

    def _apply_subscription(self, webhook_id: str, value: bytes | None) -> None:
        if value is None:
            self.subs.pop(webhook_id, None)
            self.ignored.pop(webhook_id, None)
            return
        try:
            self.subs[webhook_id] = decode_subscription(webhook_id.encode(), value)
            self.ignored.pop(webhook_id, None)
        except SubscriptionError as exc:
            self.ignored[webhook_id] = str(exc)
            log.warning("subscription record %s ignored: %s", webhook_id, exc)

    def _apply_health(self, key: str, value: bytes | None) -> None:
        if key == POSITION_KEY:
            try:
                self.health_position = (
                    None if value is None else (HealthPosition.model_validate_json(value))
                )
            except ValidationError:
                log.warning("health position record ignored")
            return
        if value is None:
            self.health.pop(key, None)
            return
        found = decode_health(value)
        if found is None:
            log.warning("health record %s ignored", key)
        else:
            self.health[key] = found

    def _apply_plan(self, organization_id: str, value: bytes | None) -> None:
        if value is None:
            self.plans.pop(organization_id, None)
            return
        try:
            self.plans[organization_id] = OrganizationRecord.model_validate_json(value).plan
        except ValidationError:
            log.warning("organization record %s ignored", organization_id)

    def _apply_answer(self, key: str, value: bytes | None) -> None:
        if value is None:
            self.answers.pop(key, None)
            return
        try:
            self.answers[key] = Answer.model_validate_json(value)
        except ValidationError:
            log.warning("idempotency record %s ignored", key)
        self._applied_answers += 1
        if self._applied_answers % _PRUNE_EVERY == 0:
            # Expired answers are never replayed; the topic drops them after the TTL,
            # and so does memory, without a timer of its own.
            now = time.time()
            for old in [k for k, a in self.answers.items() if a.expires_at < now]:
                del self.answers[old]
