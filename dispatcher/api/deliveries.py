"""Routes: a webhook's deliveries, one delivery with its attempts, resend, and a summary.

Lists come from the in-memory history index, on the event loop; one delivery's
attempt details (headers as sent, snippets) and its body are read back from the
attempts topic by position, on the API's blocking threads. Resend puts the same
delivery (id and body) on the first retry stage, due now, with a fresh attempt
budget, and records who asked.
"""

from __future__ import annotations

import base64
import binascii
import time
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Path, Query

from dispatcher.api.auth import Caller, audit
from dispatcher.api.context import ApiContext
from dispatcher.api.history import DeliveryEntry, from_ms, to_ms
from dispatcher.api.models import (
    AttemptDetail,
    AttemptOut,
    DeliveryDetail,
    DeliveryPage,
    DeliverySummary,
    Resent,
    Status,
    WebhookSummary,
)
from dispatcher.api.problems import Problem, field_problem, not_found
from dispatcher.api.store import WriteTimeout
from dispatcher.api.webhooks import BASE, Ctx, Org, Reader, WebhookId, Writer, owned
from dispatcher.core.partitions import now_ms
from dispatcher.models import IDENTIFIER
from dispatcher.records import DeliveryRecord, record_headers
from dispatcher.stages import retry_stages

router = APIRouter(tags=["deliveries"])
DeliveryId = Annotated[str, Path(pattern=IDENTIFIER.pattern, description="Delivery id.")]


def _summary(entry: DeliveryEntry) -> DeliverySummary:
    last = entry.last
    return DeliverySummary(
        id=entry.delivery_id,
        event=entry.event,
        session_id=entry.session_id,
        status=entry.status,
        created_at=from_ms(entry.first_ms),
        last_attempt_at=None if last is None else from_ms(last.at_ms),
        attempts=sum(1 for a in entry.attempts if a.kind == "attempt"),
        last_status_code=None if last is None else last.status_code,
        last_error_class=None if last is None or last.ok else last.error_class,
        next_retry_at=None
        if last is None or last.next_retry_ms is None or entry.status != "failing"
        else from_ms(last.next_retry_ms),
    )


def _cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(str(seq).encode()).decode().rstrip("=")


def _seq(cursor: str) -> int:
    try:
        value = int(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode())
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise field_problem("query.cursor", "not a cursor from a previous page") from None
    if value < 0:
        raise field_problem("query.cursor", "not a cursor from a previous page")
    return value


@router.get(BASE + "/webhooks/{webhook_id}/deliveries", response_model=DeliveryPage)
async def list_deliveries(
    org: Org,
    webhook_id: WebhookId,
    ctx: Ctx,
    _: Reader,
    status: Status | None = None,
    since: Annotated[datetime | None, Query(description="Created at or after (ISO 8601).")] = None,
    until: Annotated[datetime | None, Query(description="Created before (ISO 8601).")] = None,
    session_id: Annotated[str | None, Query(max_length=256)] = None,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> DeliveryPage:
    """Newest first, from the last deliveries kept per webhook."""
    owned(ctx, org, webhook_id)
    page, more = ctx.index.deliveries(
        webhook_id,
        status=status,
        since_ms=None if since is None else _ms(since, "query.since"),
        until_ms=None if until is None else _ms(until, "query.until"),
        session_id=session_id,
        before_seq=None if cursor is None else _seq(cursor),
        limit=limit,
    )
    next_cursor = _cursor(page[-1].seq) if more and page else None
    return DeliveryPage(data=[_summary(e) for e in page], next_cursor=next_cursor)


def _ms(value: datetime, path: str) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    try:
        return to_ms(value)
    except (OverflowError, ValueError, OSError):
        raise field_problem(path, "time out of range") from None


@router.get(BASE + "/webhooks/{webhook_id}/deliveries/{delivery_id}", response_model=DeliveryDetail)
async def get_delivery(
    org: Org, webhook_id: WebhookId, delivery_id: DeliveryId, ctx: Ctx, _: Reader
) -> DeliveryDetail:
    """One delivery: every attempt with the request headers as sent, and the body."""
    # Its records are fetched from Kafka by position: blocking work.
    return await ctx.blocking(_get_delivery, org, webhook_id, delivery_id, ctx)


def _get_delivery(org: str, webhook_id: str, delivery_id: str, ctx: ApiContext) -> DeliveryDetail:
    owned(ctx, org, webhook_id)
    entry = ctx.index.delivery(webhook_id, delivery_id)
    if entry is None:
        raise not_found("delivery")
    details = []
    for line in list(entry.attempts):
        base = AttemptOut(
            kind=line.kind,
            attempt=line.attempt,
            at=from_ms(line.at_ms),
            duration_ms=line.duration_ms,
            ok=line.ok,
            status_code=line.status_code,
            error_class=line.error_class,
            next_retry_at=None if line.next_retry_ms is None else from_ms(line.next_retry_ms),
            dead_lettered=line.dead_lettered,
        )
        record = ctx.history.read(line.partition, line.offset)
        extra = {}
        if record is not None:
            extra = {
                "stage": record.stage,
                "error": record.error,
                "response_snippet": record.response_snippet,
                "request_headers": record.request_headers or None,
                "requested_by": record.requested_by,
            }
        details.append(AttemptDetail(**base.model_dump(), **extra))
    body_record = None if entry.body_at is None else ctx.history.read(*entry.body_at)
    return DeliveryDetail(
        **_summary(entry).model_dump(),
        body=None if body_record is None else body_record.body,
        attempt_details=details,
    )


@router.post(
    BASE + "/webhooks/{webhook_id}/deliveries/{delivery_id}/resend",
    status_code=202,
    response_model=Resent,
)
async def resend_delivery(
    org: Org, webhook_id: WebhookId, delivery_id: DeliveryId, ctx: Ctx, caller: Writer
) -> Resent:
    """Send this delivery again now: same id and body, a fresh attempt budget."""
    return await ctx.blocking(_resend_delivery, org, webhook_id, delivery_id, ctx, caller)


def _resend_delivery(
    org: str, webhook_id: str, delivery_id: str, ctx: ApiContext, caller: Caller
) -> Resent:
    sub = owned(ctx, org, webhook_id)
    if not sub.enabled or sub.plan not in ctx.settings.entitled_plans:
        why = "disabled" if not sub.enabled else "on a plan without webhooks"
        raise Problem(409, "webhook-inactive", "Webhook not active", f"the webhook is {why}")
    entry = ctx.index.delivery(webhook_id, delivery_id)
    if entry is None:
        raise not_found("delivery")
    first = None if entry.body_at is None else ctx.history.read(*entry.body_at)
    if first is None or first.body is None:
        raise Problem(409, "body-expired", "Body no longer kept", "its retention has passed")
    record = DeliveryRecord(
        delivery_id=delivery_id,
        webhook_id=webhook_id,
        organization_id=org,
        event=first.event,
        event_timestamp=first.event_timestamp,
        body=first.body,
        attempts_made=0,
        source=first.source,
    )
    marker = first.model_copy(
        update={
            "kind": "resend",
            "attempt": 0,
            "stage": "api",
            "at": datetime.now(UTC),
            "duration_ms": 0.0,
            "ok": False,
            "status_code": None,
            "error_class": "none",
            "error": None,
            "response_snippet": None,
            "next_retry_at": None,
            "dead_lettered": False,
            "request_headers": {},
            "body": None,
            "requested_by": caller.name,
        }
    )
    # The marker first, and read back: the resend shows at once as pending, and the
    # attempts it leads to (same key, so the same partition) come after it.
    ((topic, partition, offset),) = ctx.store.write(
        [(ctx.settings.attempts_topic, delivery_id, marker.to_json())]
    )
    deadline = time.monotonic() + ctx.settings.api_write_timeout_s
    if not ctx.history.wait_past(topic, partition, offset, deadline):
        raise WriteTimeout("resend recorded but not read back in time")
    stage = retry_stages(ctx.settings)[0]
    ctx.store.write(
        [(stage.topic, delivery_id, record.to_json())], record_headers(record, now_ms())
    )
    audit(caller, "delivery.resend", org, webhook_id)
    return Resent(id=delivery_id, status="pending")


@router.get(BASE + "/webhooks/{webhook_id}/summary", response_model=WebhookSummary)
async def webhook_summary(org: Org, webhook_id: WebhookId, ctx: Ctx, _: Reader) -> WebhookSummary:
    """Successes and failures in the last 24 h, latency percentiles, the last error."""
    owned(ctx, org, webhook_id)
    data = ctx.index.summary(webhook_id, int(datetime.now(UTC).timestamp() * 1000))
    return WebhookSummary.model_validate({"webhook_id": webhook_id, **data})
