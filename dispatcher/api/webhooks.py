"""Routes: an organization's webhooks, its plan, and the event types.

Reads come from this replica's view of the configuration. Every change is
decided by :mod:`dispatcher.manage` against the state in force and committed by
the one writer (:mod:`dispatcher.config_writer`) as one transaction; a replica
that is not the writer never gets here for a change (:mod:`dispatcher.api.forward`
sends it to the writer). Handlers are ``async``: reads answer from memory on the
event loop, test sends run on it too (bounded, see :mod:`dispatcher.api.sample_sends`),
and a change, which blocks on Kafka and DNS, runs on the API's blocking threads
(:meth:`ApiContext.blocking`), never on the loop nor on a pool shared with the reads
and the probes.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Body, Depends, Header, Path, Query, Response

from dispatcher import manage
from dispatcher.api import cursors
from dispatcher.api.auth import Caller, audit, reader, writer
from dispatcher.api.context import ApiContext, context
from dispatcher.api.idempotency import fingerprint, webhook_id_for
from dispatcher.api.models import (
    ORG_ID,
    EventTypeList,
    EventTypeOut,
    Plan,
    PlanRequest,
    RotateRequest,
    TestResult,
    Webhook,
    WebhookCreate,
    WebhookList,
    WebhookPatch,
)
from dispatcher.api.problems import PROBLEM, not_found
from dispatcher.config_state import Answer, answer_key
from dispatcher.config_writer import Decide
from dispatcher.errors import Problem
from dispatcher.kafka import Outgoing
from dispatcher.models import IDENTIFIER, Subscription

router = APIRouter()
Org = Annotated[str, Path(pattern=ORG_ID, description="Organization id.")]
WebhookId = Annotated[str, Path(pattern=IDENTIFIER.pattern, description="Webhook id.")]
Ctx = Annotated[ApiContext, Depends(context)]
Reader = Annotated[Caller, Depends(reader)]
Writer = Annotated[Caller, Depends(writer)]
IfMatch = Annotated[
    str | None,
    Header(
        max_length=1024,
        description='Apply only if the webhook is still at this ETag (`"3"`, or `*`); '
        "412 otherwise.",
    ),
]
Cursor = Annotated[
    str | None,
    Query(
        min_length=cursors.MIN_LENGTH,
        max_length=cursors.MAX_LENGTH,
        pattern=cursors.PATTERN,
        description="The `next_cursor` of the previous page.",
    ),
]
BASE = "/v1/organizations/{org}"
#: Where the writer wrote a change (``topic:partition:offset,...``): a replica that
#: forwarded the change waits to have read past it before answering.
POSITION_HEADER = "Config-Position"
T = TypeVar("T")

Responses = dict[int | str, dict[str, Any]]


def problem(description: str, **more: Any) -> dict[str, Any]:
    """An answer whose body is a problem document, for a route's ``responses``."""
    return {**PROBLEM, "description": description, **more}


#: The headers routes send, as the OpenAPI document declares them.
ETAG_HEADER = {
    "ETag": {
        "description": 'The webhook\'s version as an entity tag (`"3"`): send it back in '
        "If-Match to change the webhook only if nobody changed it since.",
        "schema": {"type": "string"},
    }
}
REPLAYED_HEADER = {
    "Idempotent-Replayed": {
        "description": "`true` when this answers an Idempotency-Key seen before.",
        "schema": {"type": "string", "enum": ["true"]},
    }
}
RETRY_AFTER_HEADER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "integer"},
    }
}

#: Changes need a read-write key.
WRITE: Responses = {403: problem("The key may only read")}
#: A change of one webhook: a read-write key, and If-Match may make it conditional.
CHANGE: Responses = {
    **WRITE,
    412: problem("If-Match names a version that is no longer current; nothing changed"),
}
#: The state in force refuses the change (no plan, a plan without webhooks, a
#: webhook disabled, a secret already in use...).
CONFLICT: Responses = {
    409: problem("Conflicts with the current state (the plan, the webhook's state or secrets)")
}


def with_etag(description: str) -> Responses:
    return {200: {"description": description, "headers": ETAG_HEADER}}


def _link(operation: str, conditional: bool) -> dict[str, Any]:
    parameters = {"org": "$request.path.org", "webhook_id": "$response.body#/id"}
    if conditional:  # the answer's ETag makes the next change conditional on it
        parameters["header.If-Match"] = "$response.header.ETag"
    return {"operationId": operation, "parameters": parameters}


#: Where a new webhook leads: the operations on it (for generated clients, and for
#: tests that chain calls), changes made conditional on the version just answered.
WEBHOOK_LINKS = {
    **{
        name: _link(name, conditional=False)
        for name in (
            "getWebhook",
            "testWebhook",
            "listDeliveries",
            "recoverWebhook",
            "getWebhookSummary",
            "getWebhookHourlySummary",
        )
    },
    **{
        name: _link(name, conditional=True)
        for name in (
            "updateWebhook",
            "deleteWebhook",
            "enableWebhook",
            "disableWebhook",
            "rotateSecret",
        )
    },
}


def owned(ctx: ApiContext, org: str, webhook_id: str) -> Subscription:
    """The webhook, if it belongs to ``org``; another organization's is a 404 too."""
    sub = ctx.store.subs.get(webhook_id)
    if sub is None or sub.organization_id != org:
        raise not_found("webhook")
    return sub


def view(ctx: ApiContext, sub: Subscription, secret: str | None = None) -> Webhook:
    health = ctx.store.health.get(sub.webhook_id)
    backlog = ctx.backlog.of(sub.webhook_id)
    return Webhook.of(sub, sub.plan in ctx.settings.entitled_plans, secret, health, backlog)


def tags(if_match: str | None) -> list[str] | None:
    """The entity tags of an If-Match header (RFC 9110 list syntax)."""
    if if_match is None:
        return None
    return [tag.strip() for tag in if_match.split(",") if tag.strip()]


async def change(ctx: ApiContext, response: Response, decide: Decide[T]) -> T:
    """Apply a change through the one writer, on the blocking threads; the answer says
    where it was written."""
    return await ctx.blocking(_change, ctx, response, decide)


def _change(ctx: ApiContext, response: Response, decide: Decide[T]) -> T:
    if ctx.writer is None:  # only the writer serves changes (see dispatcher.api.forward)
        raise Problem(503, "no-writer", "No writer", "retry", headers={"Retry-After": "2"})
    answer, written = ctx.writer.apply(decide)
    if written:
        response.headers[POSITION_HEADER] = ",".join(f"{t}:{p}:{o}" for t, p, o in written)
    return answer


def answered(response: Response, hook: Webhook) -> Webhook:
    response.headers["ETag"] = f'"{hook.version}"'
    return hook


@router.get(BASE + "/webhooks", response_model=WebhookList, tags=["webhooks"])
async def list_webhooks(
    org: Org,
    ctx: Ctx,
    _: Reader,
    cursor: Cursor = None,
    limit: Annotated[int, Query(ge=1, le=500, description="Webhooks per page.")] = 100,
) -> WebhookList:
    """The organization's webhooks, oldest first (secrets never shown), a page at a time:
    while `next_cursor` is not null, pass it as `?cursor=` for the next page."""
    found = ctx.store.for_organization(org)
    if cursor is not None:
        after = cursors.decode(cursor)
        found = [s for s in found if (_micros(s), s.webhook_id) > after]
    page = found[:limit]
    more = len(found) > limit
    next_cursor = cursors.encode(_micros(page[-1]), page[-1].webhook_id) if more else None
    return WebhookList(data=[view(ctx, s) for s in page], next_cursor=next_cursor)


def _micros(sub: Subscription) -> int:
    """The creation time in microseconds: the order of the list, exactly."""
    return int(sub.created_at.timestamp()) * 1_000_000 + sub.created_at.microsecond


@router.post(
    BASE + "/webhooks",
    status_code=201,
    response_model=Webhook,
    tags=["webhooks"],
    responses={
        **WRITE,
        **CONFLICT,
        200: {
            "model": Webhook,
            "description": "The webhook an Idempotency-Key made before its answer was "
            "recorded or after that answer expired (no secret; header Idempotent-Replayed)",
            "headers": {**ETAG_HEADER, **REPLAYED_HEADER},
            "links": WEBHOOK_LINKS,
        },
        201: {
            "description": "Created; a replay of a keyed create answers exactly as the first "
            "time, the secret included (header Idempotent-Replayed: true)",
            "headers": {**ETAG_HEADER, **REPLAYED_HEADER},
            "links": WEBHOOK_LINKS,
        },
        422: problem(
            "Invalid input, with field paths; or an Idempotency-Key already used with another body"
        ),
    },
)
async def create_webhook(
    org: Org,
    body: WebhookCreate,
    response: Response,
    ctx: Ctx,
    caller: Writer,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> dict[str, Any]:
    """Create a webhook; a generated secret is in this answer only.

    With an ``Idempotency-Key``, a retried request, on any replica, returns the
    first answer and creates nothing more; another body with the key is a 422.
    """
    slot = None if idempotency_key is None else answer_key(org, caller.name, idempotency_key)
    # A request that sets no rate limit keeps the fingerprint it had before the field
    # existed, so a retry across an upgrade is still recognised.
    unset = {"rate_limit_per_s"} if body.rate_limit_per_s is None else None
    fp = fingerprint(body.model_dump(exclude=unset))
    webhook_id = (
        manage.new_webhook_id()
        if idempotency_key is None
        else webhook_id_for(org, caller.name, idempotency_key)
    )

    def decide() -> tuple[list[Outgoing], tuple[int, dict[str, Any], bool]]:
        if slot is not None:
            found = ctx.store.answer(slot)
            if found is not None:
                return [], (*replay(ctx, found, fp), True)
            existing = ctx.store.subscription(webhook_id)
            if existing is not None:  # made with this key before its answer was kept
                return [], (200, view(ctx, existing).model_dump(mode="json"), True)
        outcome = manage.create(
            ctx.settings,
            ctx.store,
            organization_id=org,
            webhook_id=webhook_id,
            url=body.url,
            events=body.events,
            secret=body.secret,
            enabled=body.enabled,
            description=body.description,
            known_events=[e.name for e in ctx.catalog],
            rate_limit_per_s=body.rate_limit_per_s,
        )
        assert outcome.sub is not None
        made = view(ctx, outcome.sub, outcome.new_secret).model_dump(mode="json")
        records = list(outcome.records)
        if slot is not None:
            kept = Answer(
                fingerprint=fp,
                status=201,
                body=made,
                webhook_id=webhook_id,
                expires_at=time.time() + ctx.settings.api_idempotency_ttl_s,
            )
            records.append(Outgoing(ctx.settings.idempotency_topic, kept.to_json(), slot.encode()))
        return records, (201, made, False)

    status, made, replayed = await change(ctx, response, decide)
    response.status_code = status
    response.headers["ETag"] = f'"{made["version"]}"'
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    else:
        audit(caller, "webhook.create", org, webhook_id)
    return made


def replay(ctx: ApiContext, found: Answer, fp: str) -> tuple[int, dict[str, Any]]:
    """The recorded answer to a keyed create, exactly; refused for another body."""
    if found.fingerprint != fp:
        raise Problem(
            422,
            "idempotency-key-reused",
            "Idempotency-Key reused",
            "this key was used for a different request",
        )
    if ctx.store.subscription(found.webhook_id) is None:
        raise Problem(
            404,
            "not-found",
            "Not found",
            f"the webhook this Idempotency-Key created ({found.webhook_id}) has been deleted",
        )
    return found.status, found.body


@router.get(
    BASE + "/webhooks/{webhook_id}",
    response_model=Webhook,
    tags=["webhooks"],
    responses=with_etag("The webhook"),
)
async def get_webhook(
    org: Org, webhook_id: WebhookId, response: Response, ctx: Ctx, _: Reader
) -> Webhook:
    return answered(response, view(ctx, owned(ctx, org, webhook_id)))


@router.patch(
    BASE + "/webhooks/{webhook_id}",
    response_model=Webhook,
    tags=["webhooks"],
    responses={**CHANGE, **CONFLICT, **with_etag("The webhook as changed")},
)
async def update_webhook(
    org: Org,
    webhook_id: WebhookId,
    body: WebhookPatch,
    response: Response,
    ctx: Ctx,
    caller: Writer,
    if_match: IfMatch = None,
) -> Webhook:
    """Change only the fields given; a new URL or events are validated as on create."""

    def decide() -> tuple[list[Outgoing], manage.Outcome]:
        outcome = manage.update(
            ctx.settings,
            ctx.store,
            org,
            webhook_id,
            known_events=[e.name for e in ctx.catalog],
            if_match=tags(if_match),
            url=body.url,
            events=body.events,
            enabled=body.enabled,
            description=body.description,
            # Given as null, it removes the limit; not given, it stays as it is.
            rate_limit_per_s=(
                body.rate_limit_per_s
                if "rate_limit_per_s" in body.model_fields_set
                else manage.KEEP
            ),
        )
        return outcome.records, outcome

    outcome = await change(ctx, response, decide)
    audit(caller, "webhook.update", org, webhook_id)
    assert outcome.sub is not None
    return answered(response, view(ctx, outcome.sub))


@router.delete(
    BASE + "/webhooks/{webhook_id}",
    status_code=204,
    tags=["webhooks"],
    responses=CHANGE,
)
async def delete_webhook(
    org: Org,
    webhook_id: WebhookId,
    response: Response,
    ctx: Ctx,
    caller: Writer,
    if_match: IfMatch = None,
) -> Response:
    def decide() -> tuple[list[Outgoing], manage.Outcome]:
        outcome = manage.delete(ctx.settings, ctx.store, org, webhook_id, tags(if_match))
        return outcome.records, outcome

    await change(ctx, response, decide)
    audit(caller, "webhook.delete", org, webhook_id)
    done = Response(status_code=204)
    if POSITION_HEADER in response.headers:
        done.headers[POSITION_HEADER] = response.headers[POSITION_HEADER]
    return done


async def _set_enabled(
    ctx: ApiContext,
    response: Response,
    org: str,
    webhook_id: str,
    caller: Caller,
    on: bool,
    if_match: str | None,
) -> Webhook:
    def decide() -> tuple[list[Outgoing], manage.Outcome]:
        outcome = manage.enable(ctx.settings, ctx.store, org, webhook_id, on, tags(if_match))
        return outcome.records, outcome

    outcome = await change(ctx, response, decide)
    audit(caller, "webhook.enable" if on else "webhook.disable", org, webhook_id)
    assert outcome.sub is not None
    return answered(response, view(ctx, outcome.sub))


@router.post(
    BASE + "/webhooks/{webhook_id}/enable",
    response_model=Webhook,
    tags=["webhooks"],
    responses={**CHANGE, **CONFLICT, **with_etag("The webhook, enabled")},
)
async def enable_webhook(
    org: Org,
    webhook_id: WebhookId,
    response: Response,
    ctx: Ctx,
    caller: Writer,
    if_match: IfMatch = None,
) -> Webhook:
    return await _set_enabled(ctx, response, org, webhook_id, caller, True, if_match)


@router.post(
    BASE + "/webhooks/{webhook_id}/disable",
    response_model=Webhook,
    tags=["webhooks"],
    responses={**CHANGE, **with_etag("The webhook, disabled")},
)
async def disable_webhook(
    org: Org,
    webhook_id: WebhookId,
    response: Response,
    ctx: Ctx,
    caller: Writer,
    if_match: IfMatch = None,
) -> Webhook:
    return await _set_enabled(ctx, response, org, webhook_id, caller, False, if_match)


@router.post(
    BASE + "/webhooks/{webhook_id}/rotate-secret",
    response_model=Webhook,
    tags=["webhooks"],
    responses={**CHANGE, **CONFLICT, **with_etag("The webhook with its new secret")},
)
async def rotate_secret(
    org: Org,
    webhook_id: WebhookId,
    response: Response,
    ctx: Ctx,
    caller: Writer,
    body: Annotated[RotateRequest | None, Body()] = None,
    if_match: IfMatch = None,
) -> Webhook:
    """A new secret; the old one keeps signing for the grace period. A generated one is shown
    in this answer only."""

    def decide() -> tuple[list[Outgoing], manage.Outcome]:
        outcome = manage.rotate_secret(
            ctx.settings, ctx.store, org, webhook_id, body.secret if body else None, tags(if_match)
        )
        return outcome.records, outcome

    outcome = await change(ctx, response, decide)
    audit(caller, "webhook.rotate-secret", org, webhook_id)
    assert outcome.sub is not None
    return answered(response, view(ctx, outcome.sub, outcome.new_secret))


@router.post(
    BASE + "/webhooks/{webhook_id}/test",
    response_model=TestResult,
    tags=["webhooks"],
    responses={
        **WRITE,
        429: problem(
            "Too many test sends in flight, for the organization or in all"
            " (header Retry-After: seconds)",
            headers={
                "Retry-After": {
                    "description": "Seconds after which a slot is free at the latest",
                    "schema": {"type": "integer"},
                }
            },
        ),
    },
)
async def test_webhook(org: Org, webhook_id: WebhookId, ctx: Ctx, caller: Writer) -> TestResult:
    """POST a sample event (marked ``X-Bullseye-Test: true``) now; the endpoint's answer.

    The send ends within the test-send timeout: an endpoint that does not answer by
    then is reported as a timeout (``ok: false``, ``error_class: timeout``). An
    organization has a bounded number of test sends in flight, and so has the API.
    """
    sub = owned(ctx, org, webhook_id)
    report = await ctx.sample_sends.send(
        sub, started=lambda: audit(caller, "webhook.test", org, webhook_id)
    )
    return TestResult.model_validate(report.as_dict())


@router.put(
    BASE + "/plan",
    response_model=Plan,
    tags=["organizations"],
    responses={
        **WRITE,
        200: {
            "description": "The plan in force",
            # With a plan set, the organization's webhooks can be created and listed.
            "links": {
                name: {"operationId": name, "parameters": {"org": "$request.path.org"}}
                for name in ("createWebhook", "listWebhooks")
            },
        },
    },
)
async def put_plan(
    org: Org, body: PlanRequest, response: Response, ctx: Ctx, caller: Writer
) -> Plan:
    """Set the organization's plan; below an entitled plan (Scale) deliveries stop at once,
    an upgrade resumes them. The plan is written into each of its webhooks, where the
    dispatcher checks it, in the same transaction."""

    def decide() -> tuple[list[Outgoing], manage.Outcome]:
        outcome = manage.set_plan(ctx.settings, ctx.store, org, body.plan)
        return outcome.records, outcome

    outcome = await change(ctx, response, decide)
    plan = body.plan.strip().lower()
    audit(caller, f"organization.plan={plan}", org)
    return Plan(
        organization_id=org,
        plan=plan,
        entitled=plan in ctx.settings.entitled_plans,
        webhooks_updated=outcome.count,
    )


@router.get("/v1/event-types", response_model=EventTypeList, tags=["event types"])
async def event_types(ctx: Ctx, _: Reader) -> EventTypeList:
    """The events a webhook can subscribe to, each with its JSON Schema."""
    return EventTypeList(
        data=[EventTypeOut.model_validate(e.model_dump(by_alias=True)) for e in ctx.catalog]
    )
