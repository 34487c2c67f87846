"""The rules of managing webhooks, once, for the API and the command line.

Every change (create, change, enable or disable, rotate the secret, delete, set an
organization's plan) is decided here against the configuration *as it is now*
(:class:`ConfigState`) and comes out as the records to write in one transaction
(:class:`Outcome`). The one writer (:mod:`dispatcher.config_writer`) calls these
under its lock, so two changes never decide from the same stale view.

Refusals are typed (:class:`Refusal`, with a ``kind`` and the ``field`` they are
about); the API maps them to problem documents in one place and the command line
prints their message. Messages never quote a secret.
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
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any, Final, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dispatcher.errors import Refusal, SubscriptionError
from dispatcher.kafka import Outgoing
from dispatcher.models import (
    PreviousSecret,
    Subscription,
    check_text,
    require_https,
    short_errors,
)
from dispatcher.outbound.egress import IPAddress, blocked_reason
from dispatcher.outbound.signing import SECRET_PREFIX, generate_secret, standard_webhooks_key
from dispatcher.settings import Settings

DEFAULT_EVENTS = ("visitor.identified",)
#: How long the early address check may wait for DNS before leaving it to delivery time.
RESOLVE_TIMEOUT_S = 5.0

#: The fewest characters of a secret a customer chooses (a generated one has 50).
MIN_CHOSEN_SECRET = 24
_BASE64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")


class Unchanged(Enum):
    """A field a change leaves as it is, where None would clear it."""

    KEEP = "keep"


KEEP: Final = Unchanged.KEEP


class OrganizationRecord(BaseModel):
    """Value of the organizations topic (key = organization id)."""

    model_config = ConfigDict(extra="forbid")

    organization_id: str = Field(min_length=1, max_length=128)
    plan: str = Field(min_length=1, max_length=64)
    updated_at: datetime

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()


class ConfigState(Protocol):
    """The configuration as the writer sees it now (read_committed, read to the end)."""

    def subscription(self, webhook_id: str) -> Subscription | None: ...

    def plan_of(self, organization_id: str) -> str | None: ...

    def for_organization(self, organization_id: str) -> list[Subscription]: ...


@dataclass(frozen=True, slots=True)
class Change:
    """A subscription about to be written, the secret to show once, and warnings."""

    sub: Subscription
    new_secret: str | None = None
    warnings: tuple[str, ...] = ()


@dataclass(slots=True)
class Outcome:
    """What a decided change writes (one transaction) and what its answer shows."""

    records: list[Outgoing] = field(default_factory=list)
    sub: Subscription | None = None
    new_secret: str | None = None
    warnings: tuple[str, ...] = ()
    count: int = 0


def new_webhook_id() -> str:
    return f"wh_{uuid.uuid4().hex[:20]}"


# --- checks ------------------------------------------------------------------


def check_entitled(settings: Settings, plan: str) -> None:
    if plan.strip().lower() not in settings.entitled_plans:
        allowed = ", ".join(settings.entitled_plans)
        raise Refusal(
            f"plan {plan!r} does not include webhooks (entitled plans: {allowed}); "
            "upgrade the organization first",
            "plan-not-entitled",
            "plan",
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
    if secret != secret.strip() or not all(" " <= ch <= "~" for ch in secret):
        raise Refusal(
            "invalid secret: it must be printable ASCII, without spaces at either end",
            field="secret",
        )
    if secret.startswith(SECRET_PREFIX):
        _check_whsec(secret)
    if len(secret) < MIN_CHOSEN_SECRET:
        raise Refusal(
            f"invalid secret: its length is {len(secret)} characters, a chosen secret needs "
            f"at least {MIN_CHOSEN_SECRET}; leave --secret out to have one generated",
            field="secret",
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
        raise Refusal(
            f"invalid secret: the part after {SECRET_PREFIX} {problem}; "
            "leave --secret out to have one generated",
            field="secret",
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
    from urllib.parse import urlsplit

    warnings = []
    try:
        require_https(url, settings.allow_http)
    except SubscriptionError as exc:
        raise Refusal(str(exc), field="url") from None
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
            raise Refusal(
                f"{where} is a {reason.replace('_', '-')} address; endpoints must be public "
                "(DISPATCHER_ALLOWED_NETWORKS lists exceptions)",
                field="url",
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
        loc = exc.errors()[0].get("loc", ()) if exc.errors() else ()
        raise Refusal(
            f"invalid subscription: {detail}", field=str(loc[0]) if loc else None
        ) from None


def _next_version(existing: Subscription | None) -> int:
    return 1 if existing is None else existing.version + 1


# --- building one subscription ---------------------------------------------------


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
    known_events: Collection[str],
    no_secret: bool = False,
    enabled: bool | None = None,
    description: str | None = None,
    rate_limit_per_s: float | Unchanged | None = KEEP,
) -> Change:
    """A new subscription, or ``existing`` with only the given fields replaced.

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
    if enabled is not None:
        base.update(_disabling(existing, enabled, "manual", now))
    if description is not None:
        try:
            check_text(description)
        except ValueError as exc:  # the message names the character, never shows it
            raise Refusal(f"invalid description: {exc}", field="description") from None
        base["description"] = description or None
    if rate_limit_per_s is not KEEP:
        base["rate_limit_per_s"] = rate_limit_per_s
    base.setdefault("events", DEFAULT_EVENTS)
    base["updated_at"] = now
    base["version"] = _next_version(existing)
    missing = [k for k in ("organization_id", "url", "plan") if not base.get(k)]
    if missing:
        flags = ", ".join("--" + m.replace("_id", "").replace("_", "-") for m in missing)
        raise Refusal(f"a new subscription needs {flags}", field=missing[0])
    sub = _validated(base)
    unknown = sorted(set(events or ()) - set(known_events))
    if unknown:
        known = ", ".join(sorted(known_events))
        raise Refusal(
            f"unknown event(s) {', '.join(unknown)}; known events: {known}", field="events"
        )
    if secret is not None:
        check_secret(secret)
    check_entitled(settings, sub.plan)
    warnings = check_destination(settings, sub.url)
    return Change(sub, generated, tuple(warnings))


DisabledReason = Literal["failing", "manual"]


def _disabling(
    existing: Subscription | None, enabled: bool, reason: DisabledReason, now: datetime
) -> dict[str, Any]:
    """The disabling fields after setting ``enabled``: enabling clears them; disabling an
    enabled webhook says why and when, and a disabled one keeps its first reason."""
    if enabled:
        return {"disabled_reason": None, "disabled_at": None}
    if existing is not None and not existing.enabled and existing.disabled_reason is not None:
        return {"disabled_reason": existing.disabled_reason, "disabled_at": existing.disabled_at}
    return {"disabled_reason": reason, "disabled_at": now}


def set_enabled(
    settings: Settings, sub: Subscription, enabled: bool, reason: DisabledReason = "manual"
) -> Change:
    """Enable or disable; enabling checks the plan and the address again, disabling never."""
    now = datetime.now(UTC)
    updated = _validated(
        {
            **sub.model_dump(),
            "enabled": enabled,
            "updated_at": now,
            "version": _next_version(sub),
            **_disabling(sub, enabled, reason, now),
        }
    )
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
            raise Refusal(
                "the new secret must differ from the secrets in force", "conflict", "secret"
            )
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
            "version": _next_version(sub),
        }
    )
    return Change(updated, None if secret else new_secret)


# --- changes against the state in force --------------------------------------------


def matches(sub: Subscription, if_match: Sequence[str] | None) -> bool:
    """RFC 9110 If-Match: ``*`` or one of the entity tags equals the current one."""
    if if_match is None:
        return True
    current = etag(sub)
    return any(tag == "*" or tag.removeprefix("W/") == current for tag in if_match)


def etag(sub: Subscription) -> str:
    """The webhook's entity tag: its version, quoted (a strong validator)."""
    return f'"{sub.version}"'


def current(
    state: ConfigState,
    webhook_id: str,
    organization_id: str | None = None,
    if_match: Sequence[str] | None = None,
) -> Subscription:
    """The webhook in force; another organization's, or a deleted one, is not found."""
    sub = state.subscription(webhook_id)
    if sub is None or (organization_id is not None and sub.organization_id != organization_id):
        raise Refusal(f"no subscription with webhook id {webhook_id!r}", "not-found", "webhook_id")
    check_precondition(sub, if_match)
    return sub


def check_precondition(sub: Subscription, if_match: Sequence[str] | None) -> None:
    """Refuse a change whose If-Match names another version (checked, as RFC 9110 says,
    after the request's own checks: bad input is a 422 whatever the version)."""
    if not matches(sub, if_match):
        raise Refusal(
            f"webhook {sub.webhook_id} is at version {sub.version}, not the one If-Match "
            "names; read it again and retry",
            "stale",
        )


def record_of(settings: Settings, sub: Subscription) -> Outgoing:
    return Outgoing(settings.subscriptions_topic, sub.to_json(), sub.webhook_id.encode())


def tombstone(settings: Settings, webhook_id: str) -> Outgoing:
    return Outgoing(settings.subscriptions_topic, None, webhook_id.encode())


def of_change(settings: Settings, change: Change) -> Outcome:
    return Outcome(
        [record_of(settings, change.sub)], change.sub, change.new_secret, change.warnings
    )


def create(
    settings: Settings,
    state: ConfigState,
    *,
    organization_id: str,
    webhook_id: str,
    url: str,
    events: Sequence[str] | None,
    secret: str | None,
    enabled: bool | None,
    description: str | None,
    known_events: Collection[str],
    rate_limit_per_s: float | None = None,
) -> Outcome:
    """A new webhook on the organization's plan in force now."""
    plan = state.plan_of(organization_id)
    if plan is None:
        raise Refusal(
            f"organization {organization_id} has no plan; set it first", "plan-unset", "plan"
        )
    change = build(
        settings,
        existing=None,
        webhook_id=webhook_id,
        organization_id=organization_id,
        url=url,
        events=events,
        plan=plan,
        secret=secret,
        enabled=enabled,
        description=description,
        known_events=known_events,
        rate_limit_per_s=rate_limit_per_s,
    )
    return of_change(settings, change)


def update(
    settings: Settings,
    state: ConfigState,
    organization_id: str,
    webhook_id: str,
    *,
    known_events: Collection[str],
    if_match: Sequence[str] | None = None,
    url: str | None = None,
    events: Sequence[str] | None = None,
    enabled: bool | None = None,
    description: str | None = None,
    rate_limit_per_s: float | Unchanged | None = KEEP,
) -> Outcome:
    """Only the named fields change; everything else stays as it is now."""
    sub = current(state, webhook_id, organization_id)
    change = build(
        settings,
        existing=sub,
        webhook_id=webhook_id,
        organization_id=organization_id,
        url=url,
        events=events,
        plan=None,
        secret=None,
        enabled=enabled,
        description=description,
        known_events=known_events,
        rate_limit_per_s=rate_limit_per_s,
    )
    check_precondition(sub, if_match)
    return of_change(settings, change)


def enable(
    settings: Settings,
    state: ConfigState,
    organization_id: str | None,
    webhook_id: str,
    on: bool,
    if_match: Sequence[str] | None = None,
) -> Outcome:
    sub = current(state, webhook_id, organization_id, if_match)
    return of_change(settings, set_enabled(settings, sub, on))


def disable_failing(settings: Settings, state: ConfigState, webhook_id: str) -> Outcome:
    """The writer's own change: disable a webhook that has failed without a success for
    DISPATCHER_AUTO_DISABLE_AFTER_S. Nothing to write for one deleted or already disabled
    (a person's decision stands)."""
    sub = state.subscription(webhook_id)
    if sub is None or not sub.enabled:
        return Outcome()
    return of_change(settings, set_enabled(settings, sub, False, "failing"))


def rotate_secret(
    settings: Settings,
    state: ConfigState,
    organization_id: str | None,
    webhook_id: str,
    secret: str | None,
    if_match: Sequence[str] | None = None,
) -> Outcome:
    """Only the secret changes; the one in force now keeps signing for the grace period."""
    sub = current(state, webhook_id, organization_id)
    if secret is not None:
        check_secret(secret)
    check_precondition(sub, if_match)
    return of_change(settings, rotate(settings, sub, secret))


def delete(
    settings: Settings,
    state: ConfigState,
    organization_id: str | None,
    webhook_id: str,
    if_match: Sequence[str] | None = None,
) -> Outcome:
    sub = current(state, webhook_id, organization_id, if_match)
    return Outcome([tombstone(settings, webhook_id)], sub)


def set_plan(settings: Settings, state: ConfigState, organization_id: str, plan: str) -> Outcome:
    """The organization's plan, written into each of its webhooks (where the dispatcher
    checks it) in the same transaction."""
    plan = plan.strip().lower()
    if plan not in settings.known_plans:
        raise Refusal(f"unknown plan; one of {', '.join(settings.known_plans)}", field="plan")
    now = datetime.now(UTC)
    changed = [
        s.model_copy(update={"plan": plan, "updated_at": now, "version": s.version + 1})
        for s in state.for_organization(organization_id)
        if s.plan != plan
    ]
    record = OrganizationRecord(organization_id=organization_id, plan=plan, updated_at=now)
    records = [Outgoing(settings.organizations_topic, record.to_json(), organization_id.encode())]
    records += [record_of(settings, s) for s in changed]
    return Outcome(records, count=len(changed))
