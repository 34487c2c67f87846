"""Managing subscriptions: validated writes to, and reads of, the compacted topic.

Every write goes through the same :class:`~dispatcher.models.Subscription` model
the dispatcher reads with, plus the checks the dispatcher would make anyway
(HTTPS, entitled plan, a public address), so a bad subscription is refused here
with one clear line rather than failing later at delivery time.
"""

from __future__ import annotations

import ipaddress
import socket
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

from pydantic import ValidationError

from dispatcher.egress import blocked_reason
from dispatcher.errors import SubscriptionError
from dispatcher.kafka import flush_or_fail, make_producer
from dispatcher.models import PreviousSecret, Subscription, require_https, short_errors
from dispatcher.settings import Settings
from dispatcher.signing import generate_secret
from dispatcher.table import SubscriptionTable

DEFAULT_EVENTS = ("visitor.identified",)


def new_webhook_id() -> str:
    return f"wh_{uuid.uuid4().hex[:20]}"


def load_table(settings: Settings) -> SubscriptionTable:
    table = SubscriptionTable(settings)
    table.load_once()
    return table


def get(settings: Settings, webhook_id: str) -> Subscription:
    sub = load_table(settings).get(webhook_id)
    if sub is None:
        raise SubscriptionError(f"no subscription with webhook id {webhook_id!r}")
    return sub


def list_all(settings: Settings, organization_id: str | None = None) -> list[Subscription]:
    table = load_table(settings)
    subs = table.for_organization(organization_id) if organization_id else table.all()
    return sorted(subs, key=lambda s: (s.organization_id, s.created_at, s.webhook_id))


def check_entitled(settings: Settings, plan: str) -> None:
    if plan.strip().lower() not in settings.entitled_plans:
        allowed = ", ".join(settings.entitled_plans)
        raise SubscriptionError(
            f"plan {plan!r} does not include webhooks (entitled plans: {allowed}); "
            "upgrade the organization first"
        )


def check_destination(settings: Settings, url: str) -> None:
    """Refuse a URL that is not HTTPS or that resolves to a blocked address now.

    The dispatcher checks again at every connection, since DNS can change; this
    is only the early, friendly refusal.
    """
    require_https(url, settings.allow_http)
    host = urlsplit(url).hostname or ""
    allowed = [ipaddress.ip_network(n, strict=False) for n in settings.allowed_networks]
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except (socket.gaierror, UnicodeError):
            return  # not resolvable yet: judged at delivery time
        addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    for address in addresses:
        reason = blocked_reason(address, allowed)
        if reason is not None:
            raise SubscriptionError(
                f"{host} resolves to {address}, a {reason.replace('_', '-')} address; "
                "endpoints must be public (DISPATCHER_ALLOWED_NETWORKS lists exceptions)"
            )


def build(
    settings: Settings,
    *,
    existing: Subscription | None,
    webhook_id: str,
    organization_id: str | None,
    url: str | None,
    events: Sequence[str] | None,
    plan: str | None,
    secret: str | None,
    no_secret: bool = False,
    enabled: bool | None = None,
) -> tuple[Subscription, str | None]:
    """A new or updated subscription, and the secret to show if one was generated."""
    now = datetime.now(UTC)
    base = existing.model_dump() if existing else {"created_at": now, "enabled": True}
    generated = None
    if no_secret:
        base["secret"] = None
    elif secret is not None:
        base["secret"] = secret
    elif existing is None:
        generated = base["secret"] = generate_secret()
    fields = {
        "webhook_id": webhook_id,
        "organization_id": organization_id,
        "url": url,
        "events": tuple(events) if events else None,
        "plan": plan,
        "enabled": enabled,
    }
    base.update({k: v for k, v in fields.items() if v is not None})
    base.setdefault("events", DEFAULT_EVENTS)
    base["updated_at"] = now
    missing = [k for k in ("organization_id", "url", "plan") if not base.get(k)]
    if missing:
        flags = ", ".join("--" + m.replace("_id", "").replace("_", "-") for m in missing)
        raise SubscriptionError(f"a new subscription needs {flags}")
    try:
        sub = Subscription.model_validate(base)
    except ValidationError as exc:
        raise SubscriptionError(f"invalid subscription: {short_errors(exc)}") from None
    check_entitled(settings, sub.plan)
    check_destination(settings, sub.url)
    return sub, generated


def rotate(settings: Settings, sub: Subscription, secret: str | None) -> tuple[Subscription, str]:
    """A new current secret; the old one keeps signing for the grace period."""
    now = datetime.now(UTC)
    new_secret = secret or generate_secret()
    previous = [p for p in sub.previous_secrets if p.expires_at > now]
    if sub.secret:
        grace = timedelta(seconds=settings.secret_rotation_grace_s)
        previous.insert(0, PreviousSecret(secret=sub.secret, expires_at=now + grace))
    try:
        updated = sub.model_copy(
            update={
                "secret": new_secret,
                "previous_secrets": tuple(previous),
                "updated_at": now,
            }
        )
        Subscription.model_validate(updated.model_dump())
    except ValidationError as exc:
        raise SubscriptionError(f"invalid secret: {short_errors(exc)}") from None
    return updated, new_secret


def write(settings: Settings, webhook_id: str, sub: Subscription | None) -> None:
    """Write a subscription (or a tombstone for ``None``) and wait for the broker."""
    producer = make_producer(settings)
    producer.produce(
        settings.subscriptions_topic,
        None if sub is None else sub.to_json(),
        webhook_id.encode(),
    )
    flush_or_fail(producer, 30.0, "subscription")
