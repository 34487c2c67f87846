"""Routes: an organization's webhooks, its plan, and the event types.

Every write is validated by the same functions as ``dispatcher subscriptions``
(:mod:`dispatcher.commands.subscriptions`: model, HTTPS, SSRF guard, secret, plan), then
written to the compacted topic and read back before the answer (read-your-writes).
Handlers are ``async``: reads and test sends run on the event loop (reads answer
from memory), and the writes, which block on Kafka and DNS, run on the API's
blocking threads (:meth:`ApiContext.blocking`), never on the loop nor on a pool
shared with the reads and the probes.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, Path, Response

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
from dispatcher.api.problems import PROBLEM, Problem, field_problem, not_found
from dispatcher.api.store import OrganizationRecord
from dispatcher.commands import subscriptions as subs
from dispatcher.errors import SubscriptionError
from dispatcher.models import IDENTIFIER, Subscription

router = APIRouter()
Org = Annotated[str, Path(pattern=ORG_ID, description="Organization id.")]
WebhookId = Annotated[str, Path(pattern=IDENTIFIER.pattern, description="Webhook id.")]
Ctx = Annotated[ApiContext, Depends(context)]
Reader = Annotated[Caller, Depends(reader)]
Writer = Annotated[Caller, Depends(writer)]
BASE = "/v1/organizations/{org}"


def owned(ctx: ApiContext, org: str, webhook_id: str) -> Subscription:
    """The webhook, if it belongs to ``org``; another organization's is a 404 too."""
    sub = ctx.store.subs.get(webhook_id)
    if sub is None or sub.organization_id != org:
        raise not_found("webhook")
    return sub


def view(ctx: ApiContext, sub: Subscription, secret: str | None = None) -> Webhook:
    return Webhook.of(sub, sub.plan in ctx.settings.entitled_plans, secret)


def refusal(exc: SubscriptionError) -> Problem:
    """The shared validation's one-line refusal, given the field it is about."""
    message = str(exc)
    if "does not include webhooks" in message:
        return Problem(409, "plan-not-entitled", "The organization's plan has no webhooks", message)
    if message.startswith("invalid secret"):
        return field_problem("body.secret", message)
    if message.startswith("unknown event"):
        return field_problem("body.events", message)
    if message.startswith("invalid subscription: "):
        field, _, why = message.removeprefix("invalid subscription: ").partition(": ")
        name = {"webhook_id": "path.webhook_id", "organization_id": "path.org"}.get(field)
        return field_problem(name or f"body.{field.split('.')[0]}", why or message)
    return field_problem("body.url", message)


def _build(ctx: ApiContext, secret: str | None = None, **fields: Any) -> subs.Change:
    try:
        return subs.build(
            ctx.settings, known_events=[e.name for e in ctx.catalog], secret=secret, **fields
        )
    except SubscriptionError as exc:
        raise refusal(exc) from None


@router.get(BASE + "/webhooks", response_model=WebhookList, tags=["webhooks"])
async def list_webhooks(org: Org, ctx: Ctx, _: Reader) -> WebhookList:
    """The organization's webhooks, oldest first (secrets never shown)."""
    return WebhookList(data=[view(ctx, s) for s in ctx.store.for_organization(org)])


@router.post(
    BASE + "/webhooks",
    status_code=201,
    response_model=Webhook,
    tags=["webhooks"],
    responses={
        200: {
            "model": Webhook,
            "description": (
                "A replay of an earlier create with the same Idempotency-Key"
                " (header Idempotent-Replayed: true)"
            ),
        }
    },
)
async def create_webhook(
    org: Org,
    body: WebhookCreate,
    response: Response,
    ctx: Ctx,
    caller: Writer,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> Webhook | dict[str, Any]:
    """Create a webhook; a generated secret is in this answer only.

    With an ``Idempotency-Key``, a retried request returns the first answer and
    creates nothing more.
    """
    return await ctx.blocking(_create_webhook, org, body, response, ctx, caller, idempotency_key)


def _create_webhook(
    org: str,
    body: WebhookCreate,
    response: Response,
    ctx: ApiContext,
    caller: Caller,
    idempotency_key: str | None,
) -> Webhook | dict[str, Any]:
    plan = ctx.store.plan_of(org)
    if plan is None:
        raise Problem(
            409,
            "plan-unset",
            "The organization has no plan",
            f"set it first: PUT /v1/organizations/{org}/plan",
        )
    if idempotency_key is None:
        return _create(ctx, org, plan, body, caller, subs.new_webhook_id())
    slot = (org, caller.name, idempotency_key)
    fp = fingerprint(body.model_dump())
    with ctx.idempotency.lock(slot):
        stored = ctx.idempotency.get(slot)
        if stored is not None:
            if stored.fingerprint != fp:
                raise Problem(
                    422,
                    "idempotency-key-reused",
                    "Idempotency-Key reused",
                    "this key was used for a different request",
                )
            response.status_code = stored.status
            response.headers["Idempotent-Replayed"] = "true"
            return stored.body
        webhook_id = webhook_id_for(*slot)
        existing = ctx.store.subs.get(webhook_id)
        if existing is not None:  # made before a restart, or through another replica
            response.status_code = 200
            response.headers["Idempotent-Replayed"] = "true"
            return view(ctx, existing)
        made = _create(ctx, org, plan, body, caller, webhook_id)
        ctx.idempotency.put(slot, fp, 201, made.model_dump(mode="json"))
        return made


def _create(
    ctx: ApiContext, org: str, plan: str, body: WebhookCreate, caller: Caller, webhook_id: str
) -> Webhook:
    change = _build(
        ctx,
        secret=body.secret,
        existing=None,
        webhook_id=webhook_id,
        organization_id=org,
        url=body.url,
        events=body.events,
        plan=plan,
        enabled=body.enabled,
        description=body.description,
    )
    ctx.store.put_subscription(change.sub)
    audit(caller, "webhook.create", org, webhook_id)
    return view(ctx, change.sub, change.new_secret)


@router.get(BASE + "/webhooks/{webhook_id}", response_model=Webhook, tags=["webhooks"])
async def get_webhook(org: Org, webhook_id: WebhookId, ctx: Ctx, _: Reader) -> Webhook:
    return view(ctx, owned(ctx, org, webhook_id))


@router.patch(BASE + "/webhooks/{webhook_id}", response_model=Webhook, tags=["webhooks"])
async def update_webhook(
    org: Org, webhook_id: WebhookId, body: WebhookPatch, ctx: Ctx, caller: Writer
) -> Webhook:
    """Change some fields; a new URL or events are validated as on create."""
    return await ctx.blocking(_update_webhook, org, webhook_id, body, ctx, caller)


def _update_webhook(
    org: str, webhook_id: str, body: WebhookPatch, ctx: ApiContext, caller: Caller
) -> Webhook:
    sub = owned(ctx, org, webhook_id)
    change = _build(
        ctx,
        existing=sub,
        webhook_id=webhook_id,
        organization_id=org,
        url=body.url,
        events=body.events,
        plan=None,
        enabled=body.enabled,
        description=body.description,
    )
    ctx.store.put_subscription(change.sub)
    audit(caller, "webhook.update", org, webhook_id)
    return view(ctx, change.sub)


@router.delete(BASE + "/webhooks/{webhook_id}", status_code=204, tags=["webhooks"])
async def delete_webhook(org: Org, webhook_id: WebhookId, ctx: Ctx, caller: Writer) -> Response:
    owned(ctx, org, webhook_id)
    await ctx.blocking(ctx.store.delete_subscription, webhook_id)
    audit(caller, "webhook.delete", org, webhook_id)
    return Response(status_code=204)


def _set_enabled(ctx: ApiContext, org: str, webhook_id: str, caller: Caller, on: bool) -> Webhook:
    sub = owned(ctx, org, webhook_id)
    try:
        change = subs.set_enabled(ctx.settings, sub, on)
    except SubscriptionError as exc:
        raise refusal(exc) from None
    ctx.store.put_subscription(change.sub)
    audit(caller, "webhook.enable" if on else "webhook.disable", org, webhook_id)
    return view(ctx, change.sub)


@router.post(BASE + "/webhooks/{webhook_id}/enable", response_model=Webhook, tags=["webhooks"])
async def enable_webhook(org: Org, webhook_id: WebhookId, ctx: Ctx, caller: Writer) -> Webhook:
    return await ctx.blocking(_set_enabled, ctx, org, webhook_id, caller, True)


@router.post(BASE + "/webhooks/{webhook_id}/disable", response_model=Webhook, tags=["webhooks"])
async def disable_webhook(org: Org, webhook_id: WebhookId, ctx: Ctx, caller: Writer) -> Webhook:
    return await ctx.blocking(_set_enabled, ctx, org, webhook_id, caller, False)


@router.post(
    BASE + "/webhooks/{webhook_id}/rotate-secret", response_model=Webhook, tags=["webhooks"]
)
async def rotate_secret(
    org: Org,
    webhook_id: WebhookId,
    ctx: Ctx,
    caller: Writer,
    body: Annotated[RotateRequest | None, Body()] = None,
) -> Webhook:
    """A new secret; the old one keeps signing for the grace period. A generated one is shown
    in this answer only."""
    return await ctx.blocking(_rotate_secret, org, webhook_id, ctx, caller, body)


def _rotate_secret(
    org: str, webhook_id: str, ctx: ApiContext, caller: Caller, body: RotateRequest | None
) -> Webhook:
    sub = owned(ctx, org, webhook_id)
    try:
        change = subs.rotate(ctx.settings, sub, body.secret if body else None)
    except SubscriptionError as exc:
        raise refusal(exc) from None
    ctx.store.put_subscription(change.sub)
    audit(caller, "webhook.rotate-secret", org, webhook_id)
    return view(ctx, change.sub, change.new_secret)


@router.post(
    BASE + "/webhooks/{webhook_id}/test",
    response_model=TestResult,
    tags=["webhooks"],
    responses={
        429: {
            **PROBLEM,
            "description": "Too many test sends in flight, for the organization or in all"
            " (header Retry-After: seconds)",
            "headers": {
                "Retry-After": {
                    "description": "Seconds after which a slot is free at the latest",
                    "schema": {"type": "integer"},
                }
            },
        }
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


@router.put(BASE + "/plan", response_model=Plan, tags=["organizations"])
async def put_plan(org: Org, body: PlanRequest, ctx: Ctx, caller: Writer) -> Plan:
    """Set the organization's plan; below an entitled plan (Scale) deliveries stop at once,
    an upgrade resumes them. The plan is written into each of its webhooks, where the
    dispatcher checks it."""
    return await ctx.blocking(_put_plan, org, body, ctx, caller)


def _put_plan(org: str, body: PlanRequest, ctx: ApiContext, caller: Caller) -> Plan:
    plan = body.plan.strip().lower()
    if plan not in ctx.settings.known_plans:
        raise field_problem(
            "body.plan", f"unknown plan; one of {', '.join(ctx.settings.known_plans)}"
        )
    now = datetime.now(UTC)
    changed = [
        s.model_copy(update={"plan": plan, "updated_at": now})
        for s in ctx.store.for_organization(org)
        if s.plan != plan
    ]
    ctx.store.put_organization(
        OrganizationRecord(organization_id=org, plan=plan, updated_at=now), changed
    )
    audit(caller, f"organization.plan={plan}", org)
    return Plan(
        organization_id=org,
        plan=plan,
        entitled=plan in ctx.settings.entitled_plans,
        webhooks_updated=len(changed),
    )


@router.get("/v1/event-types", response_model=EventTypeList, tags=["event types"])
async def event_types(ctx: Ctx, _: Reader) -> EventTypeList:
    """The events a webhook can subscribe to, each with its JSON Schema."""
    return EventTypeList(
        data=[EventTypeOut.model_validate(e.model_dump(by_alias=True)) for e in ctx.catalog]
    )
