"""Routes: a webhook's deliveries, one delivery with its attempts, resend, and summaries.

Everything is read from the history store, on its own reader threads (awaited,
so the event loop and the probes never wait on the disk). Resend puts the same
delivery (id and body) on the first retry stage, due now, with a fresh attempt
budget, and records who asked.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Path, Query, Response

from dispatcher.api import cursors
from dispatcher.api.auth import Caller, audit
from dispatcher.api.context import ApiContext
from dispatcher.api.historystore import (
    HOUR_MS,
    AttemptRow,
    DeliveryRow,
    Filters,
    HistoryStore,
    from_ms,
    to_ms,
)
from dispatcher.api.models import (
    AttemptDetail,
    DeliveryDetail,
    DeliveryPage,
    HourlySummary,
    IsoTime,
    Recovered,
    RecoverRequest,
    Resent,
    Status,
    WebhookSummary,
)
from dispatcher.api.pages import JsonBytes, page_json, summary_fields
from dispatcher.api.problems import field_problem, not_found
from dispatcher.api.webhooks import (
    BASE,
    CONFLICT,
    WRITE,
    Ctx,
    Cursor,
    Org,
    Reader,
    WebhookId,
    Writer,
    owned,
)
from dispatcher.attempts import AttemptRecord
from dispatcher.core.partitions import now_ms
from dispatcher.errors import Problem, WriteTimeout
from dispatcher.models import IDENTIFIER
from dispatcher.records import DeliveryRecord, Source, record_headers
from dispatcher.stages import retry_stages

router = APIRouter(tags=["deliveries"])
DeliveryId = Annotated[str, Path(pattern=IDENTIFIER.pattern, description="Delivery id.")]


@router.get(BASE + "/webhooks/{webhook_id}/deliveries", response_model=DeliveryPage)
async def list_deliveries(
    org: Org,
    webhook_id: WebhookId,
    ctx: Ctx,
    _: Reader,
    status: Status | None = None,
    event: Annotated[str | None, Query(max_length=128, description="Event type.")] = None,
    since: Annotated[IsoTime | None, Query(description="Created at or after (ISO 8601).")] = None,
    until: Annotated[IsoTime | None, Query(description="Created before (ISO 8601).")] = None,
    session_id: Annotated[str | None, Query(max_length=256)] = None,
    cursor: Cursor = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> Response:
    """Every delivery within retention, newest first (by first attempt time)."""
    owned(ctx, org, webhook_id)
    filters = Filters(
        status=status,
        event=event,
        session_id=session_id,
        since_ms=None if since is None else _ms(since, "query.since"),
        until_ms=None if until is None else _ms(until, "query.until"),
    )
    before = None if cursor is None else cursors.decode(cursor)
    page, more = await ctx.reads.call(
        lambda conn: HistoryStore.deliveries(conn, webhook_id, filters, before, limit)
    )
    last = page[-1] if more and page else None
    next_cursor = None if last is None else cursors.encode(last.created_ms, last.delivery_id)
    # The page's bytes at once: the same as DeliveryPage's, without a model per row.
    return JsonBytes(page_json(page, next_cursor))


def _ms(value: datetime, path: str) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    try:
        return to_ms(value)
    except (OverflowError, ValueError, OSError):
        raise field_problem(path, "time out of range") from None


def _detail(a: AttemptRow) -> AttemptDetail:
    return AttemptDetail(
        kind=a.kind,
        attempt=a.attempt,
        at=from_ms(a.at_ms),
        duration_ms=a.duration_ms,
        ok=a.ok,
        status_code=a.status_code,
        error_class=a.error_class,
        next_retry_at=None if a.next_retry_ms is None else from_ms(a.next_retry_ms),
        dead_lettered=a.dead_lettered,
        stage=a.stage,
        error=a.error,
        response_snippet=a.snippet,
        request_headers=a.headers,
        requested_by=a.requested_by,
    )


def _with_body(attempts: list[AttemptRow]) -> AttemptRow | None:
    """The latest record carrying the body (a first attempt)."""
    return next((a for a in reversed(attempts) if a.body is not None), None)


@router.get(BASE + "/webhooks/{webhook_id}/deliveries/{delivery_id}", response_model=DeliveryDetail)
async def get_delivery(
    org: Org, webhook_id: WebhookId, delivery_id: DeliveryId, ctx: Ctx, _: Reader
) -> DeliveryDetail:
    """One delivery: every attempt with the request headers as sent (signatures
    masked), the answers' snippets, and the body."""
    owned(ctx, org, webhook_id)
    found = await ctx.reads.call(lambda conn: HistoryStore.delivery(conn, webhook_id, delivery_id))
    if found is None:
        raise not_found("delivery")
    row, attempts = found
    first = _with_body(attempts)
    return DeliveryDetail(
        **summary_fields(row),
        body=None if first is None else first.body,
        attempt_details=[_detail(a) for a in attempts],
    )


@router.post(
    BASE + "/webhooks/{webhook_id}/deliveries/{delivery_id}/resend",
    status_code=202,
    response_model=Resent,
    responses={**WRITE, **CONFLICT},
)
async def resend_delivery(
    org: Org, webhook_id: WebhookId, delivery_id: DeliveryId, ctx: Ctx, caller: Writer
) -> Resent:
    """Send this delivery again now: same id and body, a fresh attempt budget."""
    return await ctx.blocking(_resend_delivery, org, webhook_id, delivery_id, ctx, caller)


def _resend_delivery(
    org: str, webhook_id: str, delivery_id: str, ctx: ApiContext, caller: Caller
) -> Resent:
    _active(ctx, org, webhook_id)
    found = ctx.reads.run(lambda conn: HistoryStore.delivery(conn, webhook_id, delivery_id))
    if found is None:
        raise not_found("delivery")
    row, attempts = found
    first = _with_body(attempts)
    if first is None or first.body is None or first.source is None:
        raise Problem(409, "body-expired", "Body no longer kept", "its retention has passed")
    _resend(ctx, org, webhook_id, caller.name, [(row, first)])
    audit(caller, "delivery.resend", org, webhook_id)
    return Resent(id=delivery_id, status="pending")


#: Deliveries one recover call queues at most; the answer says when more wait.
RECOVER_MAX = 500


@router.post(
    BASE + "/webhooks/{webhook_id}/recover",
    status_code=202,
    response_model=Recovered,
    responses={**WRITE, **CONFLICT},
)
async def recover_webhook(
    org: Org, webhook_id: WebhookId, body: RecoverRequest, ctx: Ctx, caller: Writer
) -> Recovered:
    """Send again every failing or dead-lettered delivery first attempted since
    `since`, oldest first, each recorded as a resend. At most 500 per call; a
    second call does not queue them twice (they are pending once queued)."""
    # Reads the store and writes to Kafka, waiting for both: blocking work.
    return await ctx.blocking(_recover_webhook, org, webhook_id, body, ctx, caller)


#: One recover at a time in a process: each finds what is not pending and marks it
#: pending before the next looks, so two calls never queue a delivery twice. Across
#: replicas the same holds because they forward recover to the writer.
_RECOVERING = threading.Lock()


def _recover_webhook(
    org: str, webhook_id: str, body: RecoverRequest, ctx: ApiContext, caller: Caller
) -> Recovered:
    _active(ctx, org, webhook_id)
    since_ms = _ms(body.since, "body.since")
    with _RECOVERING:
        found = ctx.reads.run(
            lambda conn: HistoryStore.failed_since(conn, webhook_id, since_ms, RECOVER_MAX + 1)
        )
        more = len(found) > RECOVER_MAX
        kept = [
            (row, first)
            for row, first in found[:RECOVER_MAX]
            if first is not None and first.body is not None and first.source is not None
        ]
        if kept:
            _resend(ctx, org, webhook_id, caller.name, kept)
    audit(caller, "webhook.recover", org, webhook_id)
    return Recovered(queued=len(kept), more=more)


def _active(ctx: ApiContext, org: str, webhook_id: str) -> None:
    sub = owned(ctx, org, webhook_id)
    if not sub.enabled or sub.plan not in ctx.settings.entitled_plans:
        why = "disabled" if not sub.enabled else "on a plan without webhooks"
        raise Problem(409, "webhook-inactive", "Webhook not active", f"the webhook is {why}")


def _resend(
    ctx: ApiContext,
    org: str,
    webhook_id: str,
    requested_by: str,
    deliveries: list[tuple[DeliveryRow, AttemptRow]],
) -> None:
    """Record a resend of each delivery, wait for those records in the store, then
    queue each on the first retry stage, due now, with a fresh attempt budget."""
    markers: list[tuple[str, str, bytes | None]] = []
    records: list[DeliveryRecord] = []
    now = datetime.now(UTC)
    for row, first in deliveries:
        event_timestamp = datetime.fromisoformat(first.event_timestamp or "")
        source = Source.model_validate(first.source)
        records.append(
            DeliveryRecord(
                delivery_id=row.delivery_id,
                webhook_id=webhook_id,
                organization_id=org,
                event=row.event,
                event_timestamp=event_timestamp,
                body=first.body or "",
                attempts_made=0,
                source=source,
            )
        )
        marker = AttemptRecord(
            kind="resend",
            delivery_id=row.delivery_id,
            webhook_id=webhook_id,
            organization_id=org,
            event=row.event,
            session_id=row.session_id,
            event_timestamp=event_timestamp,
            source=source,
            attempt=0,
            stage="api",
            at=now,
            requested_by=requested_by,
        )
        markers.append((ctx.settings.attempts_topic, row.delivery_id, marker.to_json()))
    # The markers first, and read back: each resend shows at once as pending, and
    # the attempts it leads to (same key, so the same partition) come after it.
    written = ctx.store.write(markers)
    deadline = time.monotonic() + ctx.settings.api_write_timeout_s
    for topic, partition, offset in written:
        if not ctx.history.wait_past(topic, partition, offset, deadline):
            raise WriteTimeout("resend recorded but not read back in time")
    stage = retry_stages(ctx.settings)[0]
    due = now_ms()
    ctx.store.write(
        [(stage.topic, r.delivery_id, r.to_json()) for r in records],
        each=[record_headers(r, due) for r in records],
    )


@router.get(BASE + "/webhooks/{webhook_id}/summary", response_model=WebhookSummary)
async def webhook_summary(org: Org, webhook_id: WebhookId, ctx: Ctx, _: Reader) -> WebhookSummary:
    """Successes and failures in the last 24 h, latency percentiles, the last error."""
    owned(ctx, org, webhook_id)
    now = int(datetime.now(UTC).timestamp() * 1000)
    data = await ctx.reads.call(lambda conn: HistoryStore.summary(conn, webhook_id, now))
    return WebhookSummary.model_validate({"webhook_id": webhook_id, **data})


@router.get(BASE + "/webhooks/{webhook_id}/summary/hourly", response_model=HourlySummary)
async def webhook_hourly_summary(
    org: Org,
    webhook_id: WebhookId,
    ctx: Ctx,
    _: Reader,
    since: Annotated[
        IsoTime | None, Query(description="From (ISO 8601); default: the retention window.")
    ] = None,
    until: Annotated[IsoTime | None, Query(description="Before (ISO 8601); default: now.")] = None,
) -> HourlySummary:
    """Per hour with attempts: successes, failures and latency percentiles (the
    dashboard's health chart), over the retention window by default."""
    owned(ctx, org, webhook_id)
    now = datetime.now(UTC)
    retention_ms = ctx.settings.attempts_retention_ms
    default_since = now - timedelta(milliseconds=retention_ms if retention_ms > 0 else 0)
    since_ms = _ms(since or default_since, "query.since")
    until_ms = _ms(until or now, "query.until")
    since_ms -= since_ms % HOUR_MS  # whole hours
    data = await ctx.reads.call(
        lambda conn: HistoryStore.hourly(conn, webhook_id, since_ms, until_ms)
    )
    return HourlySummary.model_validate({"webhook_id": webhook_id, "data": data})
