"""Each webhook's health, folded from the attempts and dead-letter topics, and the
events it gives.

Pure logic, no Kafka: :class:`HealthFold` takes attempt and dead-letter records and
the time, and says which health records, notifications and auto-disables follow. The writer
(:mod:`dispatcher.health_writer`) runs it and commits what it says, together with
its position in both topics, in one transaction.

What counts: every HTTP **attempt** (first tries and retries alike, whatever
delivery it belongs to). ``consecutive_failures`` counts failed attempts since the
webhook's last successful one; ``failing_since`` is the first of them. An
*episode* opens when ``webhook.failing`` is sent (after
``notify_after_failures`` such attempts, or ``notify_after_failing_s`` after
``failing_since``, whichever comes first) and closes at the next successful
attempt, with ``webhook.recovered``. A webhook failing for
``auto_disable_after_s`` without a success is disabled (``webhook.disabled``,
reason ``failing``), counted again from that moment if someone enables it while
it still fails. Dead-lettered deliveries (read from the dead-letter topic, so
with or without an attempt) are counted per digest period (``digest_every_s``,
from the first of them), and one ``webhook.dead_letters`` says how many once the
period is over. Deferrals (an
open circuit) are not attempts and change nothing; the circuit's half-open
probes are attempts.

Each attempt record also says what the webhook's circuit became in the instance
that made it, once its breaker counted the answer (``circuit``; absent from
records of earlier releases). Every instance has a breaker of its own, so
``circuit_open_since`` means: *some instance found the circuit open, and no
instance has had a request succeed through a closed circuit since*. It is set by
the first record saying ``open`` (kept by later ones), and cleared by a
successful attempt whose circuit is ``closed`` (or not reported). A success
through a half-open circuit (a probe that has not closed it yet) leaves it: that
circuit may still open again. One instance: exactly the time its circuit spent
open or half-open, from the answer that opened it to the probe that closed it.
Several: it may be cleared while another instance's circuit is still open, once
one of them has had a success, and that one's next probes (after its cool-down)
then close it or set the field again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, get_args

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dispatcher.attempts import CircuitState

#: Key of the record holding the writer's position in the attempts topic. Webhook ids
#: start with a letter or a digit, so it never names one.
POSITION_KEY = "_position"

#: How stale ``last_success_at`` of a healthy webhook may be: successes within it
#: write nothing, so a busy healthy webhook costs a record a minute, not one a batch.
SUCCESS_PRECISION = timedelta(seconds=60)

#: The values of an attempt record's ``circuit``.
CIRCUIT_STATES: frozenset[str] = frozenset(get_args(CircuitState))

#: Why a webhook was disabled: by the writer for failing, or by someone.
DisabledReason = Literal["failing", "manual"]

NoticeType = Literal[
    "webhook.failing", "webhook.recovered", "webhook.disabled", "webhook.dead_letters"
]


class WebhookHealth(BaseModel):
    """Value of the health topic for one webhook (key = webhook id)."""

    model_config = ConfigDict(extra="forbid")

    webhook_id: str
    organization_id: str
    consecutive_failures: int = Field(0, ge=0)
    failing_since: datetime | None = None
    last_failure_at: datetime | None = None
    last_error: str | None = None
    last_success_at: datetime | None = None
    #: When ``webhook.failing`` was sent; None outside an episode.
    episode_since: datetime | None = None
    #: When the writer disabled it in this episode; None if it did not.
    auto_disabled_at: datetime | None = None
    #: When someone disabled it while it was failing; None if nobody did. Enabled
    #: again, it is judged from then on, as after an auto-disable.
    disabled_at: datetime | None = None
    #: Deliveries dead-lettered (with or without an attempt), in the digest period
    #: that starts at ``dead_letters_since`` (None: none yet).
    dead_letters: int = Field(0, ge=0)
    dead_letters_since: datetime | None = None
    #: When an instance found its circuit open, none having succeeded through a
    #: closed circuit since (see the module's docstring); None: not open.
    circuit_open_since: datetime | None = None

    def to_json(self) -> bytes:
        # Fields added since the first release are written only when set, so that an
        # API of an earlier release, which does not know them, still reads the records
        # of webhooks that use none of them.
        leave = {
            name for name in ("disabled_at", "circuit_open_since") if getattr(self, name) is None
        }
        return self.model_dump_json(exclude=leave or None).encode()


class HealthPosition(BaseModel):
    """Value of :data:`POSITION_KEY`: the next offset to fold in each partition of the
    attempts topic and of the dead-letter topic (absent in a record written before
    dead letters were folded: read from the end of that topic then)."""

    model_config = ConfigDict(extra="forbid")

    attempts_topic: str
    positions: dict[int, int]
    dead_letter_topic: str | None = None
    dead_letter_positions: dict[int, int] = Field(default_factory=dict)

    def of(self, attempts_topic: str, dead_letter_topic: str) -> dict[str, dict[int, int]]:
        """The positions stored for these two topics (a topic renamed since: none)."""
        found: dict[str, dict[int, int]] = {}
        if self.attempts_topic == attempts_topic:
            found[attempts_topic] = dict(self.positions)
        if self.dead_letter_topic == dead_letter_topic:
            found[dead_letter_topic] = dict(self.dead_letter_positions)
        return found

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()


class Notification(BaseModel):
    """Value of the notifications topic (key = webhook id,
    ``schemas/notification.schema.json``)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(
        pattern=r"^ntf_[0-9a-f]{24}$",
        description="The same for every copy of one event: deduplicate on it.",
    )
    type: NoticeType
    webhook_id: str
    organization_id: str
    at: datetime
    consecutive_failures: int
    failing_since: datetime | None = None
    last_success_at: datetime | None = None
    last_error: str | None = None
    #: Since when a dispatcher instance has found the webhook's circuit open (its
    #: deliveries deferred there, without an attempt); None: not open.
    circuit_open_since: datetime | None = None
    reason: DisabledReason | None = None
    #: On ``webhook.dead_letters``: how many, in which period.
    dead_letters: int | None = None
    period_start: datetime | None = None
    period_end: datetime | None = None

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()


@dataclass(frozen=True, slots=True)
class Observed:
    """What the fold reads from one attempt record."""

    webhook_id: str
    organization_id: str
    at: datetime
    ok: bool
    error: str | None
    #: The circuit in the instance that made it, after the answer; None: not reported.
    circuit: CircuitState | None = None


@dataclass(frozen=True, slots=True)
class DeadLettered:
    """What the fold reads from one dead-letter record."""

    webhook_id: str
    organization_id: str


def dead_lettered(value: bytes | None) -> DeadLettered | None:
    """The delivery in a dead-letter record; None for anything else the topic holds (a
    replay marker) or a record that does not parse (skipped, never fatal)."""
    if not value:
        return None
    try:
        doc: Any = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict) or not doc.get("dead_lettered_at"):
        return None
    webhook_id, organization_id = doc.get("webhook_id"), doc.get("organization_id")
    if not isinstance(webhook_id, str) or not isinstance(organization_id, str):
        return None
    return DeadLettered(webhook_id, organization_id)


def observed(value: bytes | None) -> Observed | None:
    """The attempt in an attempts-topic record; None for a resend request or a record
    that is not an attempt (skipped, never fatal: the history reads it, not us)."""
    if not value:
        return None
    try:
        doc: Any = orjson.loads(value)
        if not isinstance(doc, dict) or doc.get("kind", "attempt") != "attempt":
            return None
        ok = bool(doc["ok"])
        error = None
        if not ok:
            code = doc.get("status_code")
            error = str(doc.get("error_class", "error")) + (f" {code}" if code else "")
        circuit = doc.get("circuit")
        return Observed(
            str(doc["webhook_id"]),
            str(doc["organization_id"]),
            datetime.fromisoformat(str(doc["at"])).astimezone(UTC),
            ok,
            error,
            # A state this release does not know says nothing it can use.
            circuit if circuit in CIRCUIT_STATES else None,
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def decode_health(value: bytes) -> WebhookHealth | None:
    try:
        return WebhookHealth.model_validate_json(value)
    except ValidationError:
        return None


@dataclass(frozen=True, slots=True)
class Limits:
    notify_after_failures: int
    notify_after_failing_s: float
    auto_disable_after_s: float
    #: Length of a dead-letter digest period; 0 = no digests.
    digest_every_s: float = 0.0


@dataclass(slots=True)
class Step:
    """What one fold decided: health records to write (None = delete), notifications,
    and the webhooks to disable."""

    health: dict[str, WebhookHealth | None] = field(default_factory=dict)
    notices: list[Notification] = field(default_factory=list)
    disable: list[str] = field(default_factory=list)


def notice_id(kind: NoticeType, webhook_id: str, since: datetime) -> str:
    """One id per (event type, webhook, episode): a repeat of it is a copy."""
    raw = f"{kind}\0{webhook_id}\0{since.isoformat()}"
    return "ntf_" + hashlib.sha256(raw.encode()).hexdigest()[:24]


def _notice(
    kind: NoticeType,
    h: WebhookHealth,
    at: datetime,
    since: datetime,
    reason: DisabledReason = "failing",
) -> Notification:
    return Notification(
        id=notice_id(kind, h.webhook_id, since),
        type=kind,
        webhook_id=h.webhook_id,
        organization_id=h.organization_id,
        at=at,
        consecutive_failures=h.consecutive_failures,
        failing_since=h.failing_since,
        last_success_at=h.last_success_at,
        last_error=h.last_error,
        circuit_open_since=h.circuit_open_since,
        reason=reason if kind == "webhook.disabled" else None,
    )


def manual_disable(
    webhook_id: str, organization_id: str, at: datetime, health: WebhookHealth | None
) -> tuple[Notification, WebhookHealth | None]:
    """Someone disabled an enabled webhook at ``at``: its ``webhook.disabled`` (reason
    ``manual``, with the health in force), and its health record to write with it
    (None: nothing to change, as it is not failing).

    A manual disable neither opens nor closes an episode: an open one stays open, so
    the first successful attempt once the webhook is enabled again still sends
    ``webhook.recovered``. A failing one is marked, so that once enabled it is judged
    from then on (no ``webhook.failing`` or auto-disable for the time nobody called
    it)."""
    h = health or WebhookHealth(webhook_id=webhook_id, organization_id=organization_id)
    notice = _notice("webhook.disabled", h, at, at, "manual")
    if health is None or health.failing_since is None:
        return notice, None
    return notice, health.model_copy(update={"disabled_at": at})


class HealthFold:
    """Folds attempts into health, over a working copy of the states in force.

    ``states`` are the committed states (read from the health topic); the fold
    copies what it changes, so an aborted transaction leaves them as they were.
    """

    def __init__(
        self, limits: Limits, states: dict[str, WebhookHealth], now: datetime | None = None
    ) -> None:
        self.limits = limits
        self.states = states
        self.step = Step()
        #: The time of the fold: dead letters count in the digest period open now.
        self.now = now or datetime.now(UTC)

    def _get(self, webhook_id: str, organization_id: str) -> WebhookHealth:
        if webhook_id in self.step.health:
            found = self.step.health[webhook_id]
            if found is not None:
                return found
        elif webhook_id in self.states:
            copy = self.states[webhook_id].model_copy()
            self.step.health[webhook_id] = copy
            return copy
        fresh = WebhookHealth(webhook_id=webhook_id, organization_id=organization_id)
        self.step.health[webhook_id] = fresh
        return fresh

    def _peek(self, webhook_id: str) -> WebhookHealth | None:
        if webhook_id in self.step.health:
            return self.step.health[webhook_id]
        return self.states.get(webhook_id)

    def attempt(self, a: Observed) -> None:
        if a.ok and a.circuit != "open":
            seen = self._peek(a.webhook_id)
            if (
                seen is not None
                and seen.consecutive_failures == 0
                and seen.circuit_open_since is None
                and seen.last_success_at is not None
                and a.at - seen.last_success_at < SUCCESS_PRECISION
            ):
                # Healthy and recently seen so: nothing worth a record.
                return
        h = self._get(a.webhook_id, a.organization_id)
        self._circuit(h, a)
        if a.ok:
            if h.episode_since is not None:
                self.step.notices.append(_notice("webhook.recovered", h, a.at, h.episode_since))
            if h.last_success_at is None or a.at > h.last_success_at:
                h.last_success_at = a.at
            h.consecutive_failures = 0
            h.failing_since = None
            h.episode_since = None
            h.auto_disabled_at = None
            h.disabled_at = None
            return
        h.consecutive_failures += 1
        h.failing_since = h.failing_since or a.at
        h.last_failure_at = a.at
        h.last_error = a.error
        if h.episode_since is None and h.consecutive_failures >= self.limits.notify_after_failures:
            self._open(h, a.at)

    @staticmethod
    def _circuit(h: WebhookHealth, a: Observed) -> None:
        """What ``a`` says of the circuit (see the module's docstring); before the
        events it may give, so that they carry it."""
        if a.circuit == "open":
            h.circuit_open_since = h.circuit_open_since or a.at
        elif a.ok and a.circuit in ("closed", None):
            h.circuit_open_since = None

    def dead_letter(self, d: DeadLettered) -> None:
        """One delivery dead-lettered, whatever the reason (its last attempt failed, or
        it never had one: ``endpoint_unavailable``, ``webhook_disabled``): counted in the
        digest period open now."""
        if self.limits.digest_every_s <= 0:
            return
        h = self._get(d.webhook_id, d.organization_id)
        h.dead_letters += 1
        h.dead_letters_since = h.dead_letters_since or self.now

    def _open(self, h: WebhookHealth, at: datetime) -> None:
        h.episode_since = at
        self.step.notices.append(_notice("webhook.failing", h, at, at))

    def check(self, now: datetime, enabled: dict[str, tuple[bool, datetime] | None]) -> None:
        """The time-based decisions, for every webhook that fails now.

        ``enabled`` gives, per webhook id, whether it is enabled and when its
        subscription last changed (None: deleted, and its health is deleted too).
        """
        ids = set(self.states) | {k for k, v in self.step.health.items() if v is not None}
        for webhook_id in sorted(ids):
            sub = enabled.get(webhook_id)
            if sub is None:
                self.step.health[webhook_id] = None
                continue
            current = self.step.health.get(webhook_id, self.states.get(webhook_id))
            if current is None or (current.failing_since is None and not current.dead_letters):
                continue
            pending = webhook_id in self.step.health
            h = self._get(webhook_id, current.organization_id)
            self._digest(h, now)
            if h.failing_since is not None:
                self._check_one(h, now, *sub)
            if not pending and self.states.get(webhook_id) == h:
                del self.step.health[webhook_id]  # unchanged: nothing to write

    def _digest(self, h: WebhookHealth, now: datetime) -> None:
        """One ``webhook.dead_letters`` per period with any, once the period is over."""
        since = h.dead_letters_since
        if not h.dead_letters or since is None:
            return
        end = since + timedelta(seconds=self.limits.digest_every_s)
        if now < end:
            return
        self.step.notices.append(
            _notice("webhook.dead_letters", h, now, since).model_copy(
                update={"dead_letters": h.dead_letters, "period_start": since, "period_end": end}
            )
        )
        h.dead_letters = 0
        h.dead_letters_since = None

    def _check_one(self, h: WebhookHealth, now: datetime, on: bool, changed: datetime) -> None:
        assert h.failing_since is not None
        lim = self.limits
        # Enabled again after the writer or someone disabled it: judged again from then.
        since = h.failing_since
        restarts = [t for t in (h.auto_disabled_at, h.disabled_at) if t is not None]
        if restarts:
            since = max(since, *restarts, changed)
        failing_for = now - since
        if (
            h.episode_since is None
            and on  # disabled by someone: no attempts, and nobody to warn
            and lim.notify_after_failing_s > 0
            and failing_for >= timedelta(seconds=lim.notify_after_failing_s)
        ):
            self._open(h, now)
        if lim.auto_disable_after_s <= 0 or not on:
            return
        if failing_for < timedelta(seconds=lim.auto_disable_after_s):
            return
        if h.episode_since is None:
            self._open(h, now)
        h.auto_disabled_at = now
        self.step.disable.append(h.webhook_id)

    def disabled(self, webhook_id: str, now: datetime) -> None:
        """The disable of ``webhook_id`` is written: say so."""
        h = self.step.health.get(webhook_id)
        if h is not None and h.episode_since is not None:
            self.step.notices.append(_notice("webhook.disabled", h, now, now))
