"""Managing subscriptions: validated writes to, and reads of, the compacted topic.

Every write goes through the same :class:`~dispatcher.models.Subscription` model
the dispatcher reads with, plus the checks the dispatcher would make anyway
(HTTPS, entitled plan, a public address), so a bad subscription is refused here
with one clear line rather than failing later at delivery time. Error messages
never quote a secret.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import socket
import threading
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError

from dispatcher.core.table import SubscriptionTable
from dispatcher.errors import KafkaSetupError, SubscriptionError
from dispatcher.kafka import Outgoing, check_topic, make_producer, produce_confirmed
from dispatcher.models import PreviousSecret, Subscription, require_https, short_errors
from dispatcher.outbound.egress import IPAddress, blocked_reason
from dispatcher.outbound.signing import SECRET_PREFIX, generate_secret, standard_webhooks_key
from dispatcher.settings import Settings

DEFAULT_EVENTS = ("visitor.identified",)
#: Events upstream publishes; a subscription to anything else would never fire.
KNOWN_EVENTS = frozenset(DEFAULT_EVENTS)
#: How long the early address check may wait for DNS before leaving it to delivery time.
RESOLVE_TIMEOUT_S = 5.0
#: How long a write may take to be acknowledged before the command fails.
WRITE_TIMEOUT_S = 30.0

#: The fewest characters of a secret a customer chooses (a generated one has 50).
MIN_CHOSEN_SECRET = 24
_BASE64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")


@dataclass(frozen=True, slots=True)
class Change:
    """A subscription about to be written, the secret to show once, and warnings."""

    sub: Subscription
    new_secret: str | None = None
    warnings: tuple[str, ...] = ()


def new_webhook_id() -> str:
    return f"wh_{uuid.uuid4().hex[:20]}"


def load_table(settings: Settings) -> SubscriptionTable:
    table = SubscriptionTable(settings)
    table.load_once()
    return table


def get(settings: Settings, webhook_id: str) -> Subscription:
    table = load_table(settings)
    sub = table.get(webhook_id)
    if sub is None:
        raise SubscriptionError(_missing(table, webhook_id))
    return sub


def _missing(table: SubscriptionTable, webhook_id: str) -> str:
    why = table.ignored.get(webhook_id)
    if why is None:
        return f"no subscription with webhook id {webhook_id!r}"
    return (
        f"no usable subscription with webhook id {webhook_id!r}: its record is ignored ({why}); "
        "`subscriptions delete` removes it"
    )


def delete(settings: Settings, webhook_id: str) -> str:
    """Write a tombstone for a subscription, or for a record the dispatcher ignores.

    A record that does not validate is never loaded, so it cannot be fetched;
    deleting it is still how it leaves the compacted topic.
    """
    table = load_table(settings)
    if table.get(webhook_id) is None and webhook_id not in table.ignored:
        raise SubscriptionError(_missing(table, webhook_id))
    write(settings, webhook_id, None)
    return webhook_id


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


def check_secret(secret: str) -> None:
    """Refuse a chosen secret that is too short or would sign differently than
    receivers expect.

    A ``whsec_`` secret must carry standard base64 after the prefix: the Standard
    Webhooks libraries decode it leniently (skipping stray characters) while the
    dispatcher falls back to the secret's UTF-8 bytes, so anything else would give
    the two sides different keys. Any chosen secret needs ``MIN_CHOSEN_SECRET``
    characters: a signature and its body are seen by whoever reads a request, and
    a short secret is found from them offline in moments.
    """
    if secret != secret.strip() or not secret.isprintable():
        raise SubscriptionError(
            "invalid secret: it must not start or end with spaces or hold control characters"
        )
    if secret.startswith(SECRET_PREFIX):
        _check_whsec(secret)
    if len(secret) < MIN_CHOSEN_SECRET:
        raise SubscriptionError(
            f"invalid secret: its length is {len(secret)} characters, a chosen secret needs "
            f"at least {MIN_CHOSEN_SECRET}; leave --secret out to have one generated"
        )


def _check_whsec(secret: str) -> None:
    encoded = secret[len(SECRET_PREFIX) :]
    problem = None
    if not _BASE64.match(encoded):
        problem = "holds characters outside the base64 alphabet (A-Z a-z 0-9 + / =)"
    elif len(encoded.rstrip("=")) % 4 == 1 or (encoded.endswith("=") and len(encoded) % 4 != 0):
        problem = "has a length or padding that is not valid base64"
    elif _library_key(encoded) != standard_webhooks_key(secret):
        problem = "does not decode to the same key in every Standard Webhooks library"
    if problem:
        raise SubscriptionError(
            f"invalid secret: the part after {SECRET_PREFIX} {problem}; "
            "leave --secret out to have one generated"
        )


def _library_key(encoded: str) -> bytes:
    """The key the Standard Webhooks reference libraries derive (lenient decoding)."""
    try:
        return base64.b64decode(encoded + "==")
    except (binascii.Error, ValueError):
        return b""


def check_destination(settings: Settings, url: str) -> list[str]:
    """Refuse a URL that is not HTTPS or that resolves to a blocked address now.

    Returns warnings for the operator. The dispatcher checks the address again at
    every connection, since DNS can change; this is only the early, friendly refusal.
    """
    warnings = []
    require_https(url, settings.allow_http)
    if urlsplit(url).scheme != "https":
        warnings.append(
            f"{url} is plain HTTP: deliveries and their signatures travel unencrypted. "
            "Accepted only because DISPATCHER_ALLOW_HTTP=true; never use this in production"
        )
    host = urlsplit(url).hostname or ""
    allowed = [ipaddress.ip_network(n, strict=False) for n in settings.allowed_networks]
    addresses = _resolve(host)
    if addresses is None:
        warnings.append(f"{host} does not resolve now; its address is checked at delivery time")
        return warnings
    for address in addresses:
        reason = blocked_reason(address, allowed)
        if reason is not None:
            where = host if host == str(address) else f"{host} resolves to {address}, which"
            raise SubscriptionError(
                f"{where} is a {reason.replace('_', '-')} address; endpoints must be public "
                "(DISPATCHER_ALLOWED_NETWORKS lists exceptions)"
            )
    return warnings


def _resolve(host: str) -> list[IPAddress] | None:
    """The host's addresses, or None when it does not resolve within the time limit."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    found: list[IPAddress] = []
    done = threading.Event()

    def lookup() -> None:
        # getaddrinfo has no timeout of its own; a stuck resolver must not hang the command.
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
            found.extend(ipaddress.ip_address(info[4][0]) for info in infos)
        except (OSError, UnicodeError, ValueError):
            pass
        finally:
            done.set()

    threading.Thread(target=lookup, daemon=True).start()
    if not done.wait(RESOLVE_TIMEOUT_S) or not found:
        return None
    return found


def _validated(data: dict[str, Any]) -> Subscription:
    try:
        return Subscription.model_validate(data)
    except ValidationError as exc:
        detail = short_errors(exc).replace("Value error, ", "")
        raise SubscriptionError(f"invalid subscription: {detail}") from None


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
    description: str | None = None,
    known_events: Collection[str] = KNOWN_EVENTS,
) -> Change:
    """A new subscription, or ``existing`` with the given fields replaced.

    A new one without ``secret`` gets a generated secret, returned to be shown once.
    Setting ``secret`` on an existing one replaces it at once; use :func:`rotate`
    for a change that keeps the old one signing for a while.
    """
    now = datetime.now(UTC)
    base = existing.model_dump() if existing else {"created_at": now, "enabled": True}
    generated = None
    if no_secret:
        base["secret"] = None
        base["previous_secrets"] = ()
    elif secret is not None:
        base["secret"] = secret
    elif existing is None:
        generated = base["secret"] = generate_secret()
    fields = {
        "webhook_id": webhook_id,
        "organization_id": organization_id,
        "url": url,
        # Each event once, in the order given: repeating a flag changes nothing.
        "events": tuple(dict.fromkeys(events)) if events else None,
        "plan": plan,
        "enabled": enabled,
    }
    base.update({k: v for k, v in fields.items() if v is not None})
    if description is not None:
        base["description"] = description or None
    base.setdefault("events", DEFAULT_EVENTS)
    base["updated_at"] = now
    missing = [k for k in ("organization_id", "url", "plan") if not base.get(k)]
    if missing:
        flags = ", ".join("--" + m.replace("_id", "").replace("_", "-") for m in missing)
        raise SubscriptionError(f"a new subscription needs {flags}")
    sub = _validated(base)
    unknown = sorted(set(events or ()) - set(known_events))
    if unknown:
        known = ", ".join(sorted(known_events))
        raise SubscriptionError(f"unknown event(s) {', '.join(unknown)}; known events: {known}")
    if secret is not None:
        check_secret(secret)
    check_entitled(settings, sub.plan)
    warnings = check_destination(settings, sub.url)
    return Change(sub, generated, tuple(warnings))


def set_enabled(settings: Settings, sub: Subscription, enabled: bool) -> Change:
    """Enable or disable; enabling checks the plan and the address again, disabling never."""
    updated = _validated({**sub.model_dump(), "enabled": enabled, "updated_at": datetime.now(UTC)})
    warnings: list[str] = []
    if enabled:
        check_entitled(settings, sub.plan)
        warnings = check_destination(settings, sub.url)
    return Change(updated, None, tuple(warnings))


def rotate(settings: Settings, sub: Subscription, secret: str | None) -> Change:
    """A new current secret; the old one keeps signing for the grace period.

    The returned ``new_secret`` is set only when it was generated here, so a
    secret the operator typed is never echoed back.
    """
    now = datetime.now(UTC)
    if secret is not None:
        check_secret(secret)
        if secret in sub.active_secrets(now):
            raise SubscriptionError("invalid secret: the new secret must differ from active ones")
    new_secret = secret or generate_secret()
    previous = [p for p in sub.previous_secrets if p.expires_at > now]
    grace = timedelta(seconds=settings.secret_rotation_grace_s)
    if sub.secret and grace > timedelta(0):
        previous.insert(0, PreviousSecret(secret=sub.secret, expires_at=now + grace))
    updated = _validated(
        {
            **sub.model_dump(),
            "secret": new_secret,
            "previous_secrets": tuple(p.model_dump() for p in previous),
            "updated_at": now,
        }
    )
    return Change(updated, None if secret else new_secret)


def write(settings: Settings, webhook_id: str, sub: Subscription | None) -> None:
    """Write a subscription (or a tombstone for ``None``) and wait for its acknowledgement.

    Raises :class:`KafkaSetupError` unless the broker confirmed the record, so a
    caller never reports success (or shows a new secret) for a write that was lost.
    """
    topic = settings.subscriptions_topic
    producer = make_producer(settings)
    # Checked first: librdkafka would otherwise wait 30 s for a missing topic to appear.
    check_topic(producer, settings, topic, WRITE_TIMEOUT_S / 3)
    record = Outgoing(topic, None if sub is None else sub.to_json(), webhook_id.encode())
    errors = produce_confirmed(producer, [record], WRITE_TIMEOUT_S, "subscription")
    if errors:
        raise KafkaSetupError(f"subscription {webhook_id} was not written to {topic}: {errors[0]}")
