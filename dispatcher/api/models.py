"""Request and response bodies of the API (the OpenAPI document is built from these)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, field_validator

from dispatcher.backlog import Backlog
from dispatcher.models import (
    EVENT_NAME,
    MAX_RATE_LIMIT_PER_S,
    TEXT_PATTERN,
    Subscription,
    check_text,
)
from dispatcher.webhook_health import WebhookHealth

Status = Literal["succeeded", "failing", "dead_lettered", "pending"]
ORG_ID = r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}$"


# What the document promises about input, as patterns (ECMA-262, as OpenAPI reads
# them). The server checks the same rules with messages that say what is wrong
# (dispatcher.manage, dispatcher.outbound.urls); these let a client, or a test
# generating requests from the document, know what will be accepted. Where a rule
# depends on the deployment (plans, events, plain HTTP), the document is completed
# at start-up from the settings and the catalog (dispatcher.api.contract).

#: An https URL as delivered to: a DNS name (its last label starting with a letter)
#: or an IPv4 address, an optional port 1-65535, a path and query of URL characters.
#: Addresses outside the public internet are refused unless the deployment allows
#: them (DISPATCHER_ALLOWED_NETWORKS).
#: No label with "--" in its 3rd and 4th characters: those are reserved for IDNA
#: (``xn--``), and one that is not valid punycode cannot be read.
_LABEL = r"(?![A-Za-z0-9]{2}--)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_LAST_LABEL = r"(?![A-Za-z0-9]{2}--)[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_HOST = rf"(?:(?:{_LABEL}\.)*{_LAST_LABEL}|(?:{_OCTET}\.){{3}}{_OCTET})"
_PORT = (
    r"(?::(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}"
    r"|[1-9][0-9]{0,3}))?"
)
_URL_CHAR = r"(?:%[0-9A-Fa-f]{2}|[A-Za-z0-9._~!$&'()*+,;=:@/-])"
_PATH = rf"(?:/{_URL_CHAR}*)?(?:\?(?:{_URL_CHAR}|\?)*)?"
#: A host over 253 characters is refused too, which a pattern says only with a
#: lookahead, one that generators from the document would spend most tries on.
URL_PATTERN = rf"^https://{_HOST}{_PORT}{_PATH}$"
#: A secret chosen by the caller: printable ASCII, no space at either end, and a
#: ``whsec_`` one holds canonical standard base64 after the prefix.
SECRET_PATTERN = (
    r"^(?:whsec_(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?"
    r"|(?!whsec_)[!-~](?:[ -~]*[!-~])?)$"
)
_URL_TEXT = (
    "An https URL of the endpoint, on a public address (private, loopback and other "
    "special addresses are refused unless the deployment allows them)."
)
_SECRET_TEXT = (
    "At least 24 characters (a `whsec_` secret: standard base64 after the prefix). "
    "Default: a generated whsec_ secret."
)
_DESCRIPTION_TEXT = (
    "A note shown with the webhook; no control characters (NUL, ESC, CR, LF...) "
    "and no bidirectional overrides."
)


_ISO_TIME = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?(?:[Zz]|[+-]\d{2}:?\d{2})?"
)


def _iso_time(value: object) -> object:
    """Only a date and time as text (RFC 3339, a zone optional: UTC): pydantic alone
    would also take a number of seconds (``0.5``) or a bare date, which the document
    does not offer."""
    if isinstance(value, datetime) or (isinstance(value, str) and _ISO_TIME.fullmatch(value)):
        return value
    raise ValueError("expected a date and time like 2026-01-15T10:30:00Z")


#: A time in a request (query or body).
IsoTime = Annotated[datetime, BeforeValidator(_iso_time)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


_RATE_LIMIT_DOC = (
    "Most deliveries started per second to this webhook (fractions allowed: 0.5 is one "
    "every 2 s), across every dispatcher instance; deliveries over it wait, without "
    "spending an attempt. Default: no limit but the concurrency slots."
)


def _rate_limit(doc: str) -> Any:
    return Field(
        None,
        gt=0,
        le=MAX_RATE_LIMIT_PER_S,
        allow_inf_nan=False,
        strict=True,  # true is not 1 a second, nor "5" a number
        description=doc,
        examples=[5],
    )


def _no_control(value: str | None) -> str | None:
    if value is not None:
        check_text(value)
    return value


class WebhookCreate(_In):
    url: str = Field(
        min_length=1,
        max_length=2048,
        description=_URL_TEXT,
        examples=["https://hooks.example.com/bullseye"],
        json_schema_extra={"pattern": URL_PATTERN},
    )
    events: list[str] = Field(
        default_factory=lambda: ["visitor.identified"],
        min_length=1,
        max_length=50,
        json_schema_extra={"items": {"type": "string", "pattern": EVENT_NAME.pattern}},
    )
    secret: str | None = Field(
        None,
        min_length=24,
        max_length=256,
        description=_SECRET_TEXT,
        json_schema_extra={"pattern": SECRET_PATTERN},
    )
    description: str | None = Field(
        None,
        max_length=500,
        description=_DESCRIPTION_TEXT,
        json_schema_extra={"pattern": TEXT_PATTERN},
    )
    enabled: StrictBool = True
    rate_limit_per_s: float | None = _rate_limit(_RATE_LIMIT_DOC)

    _description = field_validator("description")(_no_control)


class WebhookPatch(_In):
    url: str | None = Field(
        None,
        min_length=1,
        max_length=2048,
        description=_URL_TEXT,
        json_schema_extra={"pattern": URL_PATTERN},
    )
    events: list[str] | None = Field(
        None,
        min_length=1,
        max_length=50,
        json_schema_extra={"items": {"type": "string", "pattern": EVENT_NAME.pattern}},
    )
    description: str | None = Field(
        None,
        max_length=500,
        description=_DESCRIPTION_TEXT + ' "" clears it.',
        json_schema_extra={"pattern": TEXT_PATTERN},
    )
    enabled: StrictBool | None = None
    rate_limit_per_s: float | None = _rate_limit(_RATE_LIMIT_DOC + " `null` removes the limit.")

    _description = field_validator("description")(_no_control)


class RotateRequest(_In):
    secret: str | None = Field(
        None,
        min_length=24,
        max_length=256,
        description=_SECRET_TEXT,
        json_schema_extra={"pattern": SECRET_PATTERN},
    )


class PlanRequest(_In):
    plan: str = Field(
        min_length=1,
        max_length=64,
        examples=["scale"],
        description="One of the deployment's plans (DISPATCHER_KNOWN_PLANS).",
    )


class Webhook(BaseModel):
    id: str
    organization_id: str
    url: str
    events: list[str]
    description: str | None
    enabled: bool
    rate_limit_per_s: float | None = Field(description="Deliveries a second at most; null: none.")
    plan: str
    entitled: bool = Field(description="Whether the organization's plan includes webhooks.")
    secret_set: bool
    previous_secrets_until: list[datetime] = Field(
        description="Rotated-out secrets that still sign until these times."
    )
    created_at: datetime
    updated_at: datetime
    version: int = Field(
        description="Incremented by every change; sent as the ETag, compared with If-Match."
    )
    secret: str | None = Field(
        None, description="Only in the answer that generated it: store it, it is not shown again."
    )
    disabled_reason: Literal["failing", "manual"] | None = Field(
        None,
        description="Why it is disabled: `failing` (disabled after failing without a success "
        "for the auto-disable period) or `manual`; null while enabled. Enabling clears it.",
    )
    disabled_at: datetime | None = Field(None, description="When it was disabled.")
    consecutive_failures: int = Field(
        0, description="Failed attempts since its last successful one (any delivery)."
    )
    failing_since: datetime | None = Field(
        None, description="The first of those failed attempts; null while it succeeds."
    )
    last_success_at: datetime | None = Field(
        None, description="Its last successful attempt, to the minute; null if none seen."
    )
    last_error: str | None = Field(
        None, description="What its last failed attempt came to (class and status)."
    )
    circuit_open_since: datetime | None = Field(
        None,
        description="Since when a dispatcher instance has found its circuit open (its "
        "deliveries there deferred, without an attempt, until a probe succeeds), no "
        "request having succeeded through a closed circuit since; null: not open.",
    )
    backlog: int | None = Field(
        None,
        description="Deliveries waiting for it (queued for its connections, or parked in "
        "Kafka while it is slow), summed over the dispatcher instances that reported in the "
        "last three of their reporting intervals (DISPATCHER_BACKLOG_REPORT_EVERY_S); 0: none "
        "waiting; null: no instance reported lately. Parked deliveries are estimated from "
        "their turns and the endpoint's pace.",
    )
    backlog_as_of: datetime | None = Field(
        None,
        description="The oldest of the reports summed in `backlog`: it is at least this "
        "recent; null with it.",
    )

    @classmethod
    def of(
        cls,
        sub: Subscription,
        entitled: bool,
        secret: str | None = None,
        health: WebhookHealth | None = None,
        backlog: Backlog | None = None,
    ) -> Webhook:
        now = datetime.now(UTC)
        failing = health is not None and health.consecutive_failures > 0
        return cls(
            id=sub.webhook_id,
            organization_id=sub.organization_id,
            url=sub.url,
            events=list(sub.events),
            description=sub.description,
            enabled=sub.enabled,
            rate_limit_per_s=sub.rate_limit_per_s,
            plan=sub.plan,
            entitled=entitled,
            secret_set=sub.secret is not None,
            previous_secrets_until=[
                p.expires_at for p in sub.previous_secrets if p.expires_at > now
            ],
            created_at=sub.created_at,
            updated_at=sub.updated_at,
            version=sub.version,
            secret=secret,
            disabled_reason=None if sub.enabled else sub.disabled_reason,
            disabled_at=None if sub.enabled else sub.disabled_at,
            consecutive_failures=health.consecutive_failures if health else 0,
            failing_since=health.failing_since if health else None,
            last_success_at=health.last_success_at if health else None,
            last_error=health.last_error if health and failing else None,
            circuit_open_since=health.circuit_open_since if health else None,
            backlog=backlog.deliveries if backlog else None,
            backlog_as_of=backlog.as_of if backlog else None,
        )


class WebhookList(BaseModel):
    data: list[Webhook] = Field(description="Oldest first (by creation time, then id).")
    next_cursor: str | None = Field(
        None, description="Pass as ?cursor= for the next page; null on the last page."
    )


class Plan(BaseModel):
    organization_id: str
    plan: str
    entitled: bool
    webhooks_updated: int


class TestResult(BaseModel):
    delivery_id: str
    webhook_url: str
    ok: bool
    status_code: int | None
    duration_ms: float
    error_class: str | None
    reason: str
    response: str | None


class EventTypeOut(BaseModel):
    name: str
    description: str
    input_topic: str
    schema_: dict[str, Any] = Field(alias="schema", serialization_alias="schema")


class EventTypeList(BaseModel):
    data: list[EventTypeOut]


class AttemptOut(BaseModel):
    kind: Literal["attempt", "resend"]
    attempt: int
    at: datetime
    duration_ms: float
    ok: bool
    status_code: int | None
    error_class: str
    next_retry_at: datetime | None
    dead_lettered: bool


class DeliverySummary(BaseModel):
    id: str
    event: str
    session_id: str | None
    status: Status
    created_at: datetime
    last_attempt_at: datetime | None
    attempts: int
    last_status_code: int | None
    last_error_class: str | None
    next_retry_at: datetime | None


class DeliveryPage(BaseModel):
    data: list[DeliverySummary]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page.")


class AttemptDetail(AttemptOut):
    stage: str | None = None
    error: str | None = None
    response_snippet: str | None = None
    request_headers: dict[str, str] | None = Field(
        None,
        description="As sent; signature values masked (`v1,…` and their last 4 "
        "characters), never a secret.",
    )
    requested_by: str | None = None


class DeliveryDetail(DeliverySummary):
    body: str | None = Field(description="The exact body sent (null once past retention).")
    attempt_details: list[AttemptDetail]


class RecoverRequest(_In):
    since: IsoTime = Field(description="Deliveries first attempted at or after (ISO 8601).")


class Recovered(BaseModel):
    queued: int = Field(description="Deliveries queued to be sent again now.")
    more: bool = Field(
        description="More failed since then than one call queues: call again, same `since`."
    )


class Resent(BaseModel):
    id: str
    status: Status


class LastErrorOut(BaseModel):
    at: datetime
    error_class: str
    status_code: int | None
    error: str | None


class Latency(BaseModel):
    p50: float | None
    p90: float | None
    p99: float | None


class WebhookSummary(BaseModel):
    webhook_id: str
    successes_24h: int
    failures_24h: int
    latency_ms: Latency
    last_error: LastErrorOut | None
    failing_now: bool


class HourPoint(BaseModel):
    hour: datetime = Field(description="Start of the hour (UTC).")
    successes: int
    failures: int
    latency_ms: Latency


class HourlySummary(BaseModel):
    webhook_id: str
    data: list[HourPoint] = Field(description="Hours with attempts, oldest first.")
