"""Request and response bodies of the API (the OpenAPI document is built from these)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dispatcher.models import EVENT_NAME, MAX_RATE_LIMIT_PER_S, Subscription
from dispatcher.webhook_health import WebhookHealth

Status = Literal["succeeded", "failing", "dead_lettered", "pending"]
ORG_ID = r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}$"


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


class WebhookCreate(_In):
    url: str = Field(min_length=1, max_length=2048, examples=["https://hooks.example.com/bullseye"])
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
        description="At least 24 characters (a `whsec_` secret: standard base64 after "
        "the prefix). Default: a generated whsec_ secret.",
    )
    description: str | None = Field(None, max_length=500)
    enabled: bool = True
    rate_limit_per_s: float | None = _rate_limit(_RATE_LIMIT_DOC)


class WebhookPatch(_In):
    url: str | None = Field(None, min_length=1, max_length=2048)
    events: list[str] | None = Field(None, min_length=1, max_length=50)
    description: str | None = Field(None, max_length=500, description='"" clears it.')
    enabled: bool | None = None
    rate_limit_per_s: float | None = _rate_limit(_RATE_LIMIT_DOC + " `null` removes the limit.")


class RotateRequest(_In):
    secret: str | None = Field(
        None,
        min_length=24,
        max_length=256,
        description="At least 24 characters (a `whsec_` secret: standard base64 after "
        "the prefix). Default: a generated whsec_ secret.",
    )


class PlanRequest(_In):
    plan: str = Field(min_length=1, max_length=64, examples=["scale"])


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

    @classmethod
    def of(
        cls,
        sub: Subscription,
        entitled: bool,
        secret: str | None = None,
        health: WebhookHealth | None = None,
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
        )


class WebhookList(BaseModel):
    data: list[Webhook]


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
    since: datetime = Field(description="Deliveries first attempted at or after (ISO 8601).")


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
