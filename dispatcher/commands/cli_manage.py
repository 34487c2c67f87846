"""``dispatcher subscriptions ...`` and ``dispatcher send-test``: the management commands.

Output is a table (or ``key: value`` lines) by default and JSON with ``--json``.
A secret is printed only when it was generated: by ``put`` creating a
subscription, or by ``rotate-secret``; never by ``get`` or ``list``.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

from dispatcher import manage
from dispatcher.commands import subscriptions as subs
from dispatcher.commands.cli_common import (
    OneLineParser,
    add_secret_options,
    missing_action,
    print_json,
    print_table,
    printable,
    read_secret,
    warn,
    warn_of_secret_option,
)
from dispatcher.errors import DispatcherError
from dispatcher.models import Subscription, format_timestamp
from dispatcher.settings import Settings

_ACTIONS = ("put", "get", "list", "delete", "enable", "disable", "rotate-secret")


def add_commands(sub: Any) -> None:
    group = sub.add_parser("subscriptions", help="manage webhook subscriptions")
    group.set_defaults(handler=missing_action("subscriptions", _ACTIONS))
    ssub = group.add_subparsers(
        title="subscriptions commands", metavar="ACTION", parser_class=OneLineParser
    )

    put = ssub.add_parser(
        "put",
        help="create or update a subscription",
        description="Create a subscription, or with --id of an existing one change the "
        "given fields. A new subscription needs --organization, --url and --plan.",
    )
    put.add_argument("--id", dest="webhook_id", help="webhook id (default: a new one)")
    put.add_argument("--organization", help="organization id")
    put.add_argument("--url", help="endpoint URL (https://...)")
    put.add_argument(
        "--event",
        dest="events",
        metavar="EVENT",
        action="append",
        help="event to send (repeatable; default visitor.identified)",
    )
    put.add_argument("--plan", help="the organization's plan (e.g. scale, enterprise)")
    put.add_argument("--description", help='a note shown with the subscription ("" clears it)')
    rate = put.add_mutually_exclusive_group()
    rate.add_argument(
        "--rate-limit",
        dest="rate_limit_per_s",
        metavar="PER_S",
        type=float,
        help="most deliveries started per second, across all instances (e.g. 5, or 0.5)",
    )
    rate.add_argument("--no-rate-limit", action="store_true", help="remove the rate limit")
    secret = put.add_mutually_exclusive_group()
    add_secret_options(
        secret, "the signing secret", "default for a new one: generated and shown once"
    )
    secret.add_argument("--no-secret", action="store_true", help="send unsigned deliveries")
    state = put.add_mutually_exclusive_group()
    state.add_argument("--disabled", action="store_true", help="store it disabled")
    state.add_argument("--enabled", action="store_true", help="store it enabled")
    put.add_argument("--json", action="store_true", help="print JSON")
    put.set_defaults(handler=cmd_put)

    get = ssub.add_parser("get", help="show one subscription")
    get.add_argument("webhook_id", metavar="WEBHOOK_ID")
    get.add_argument("--json", action="store_true", help="print JSON")
    get.set_defaults(handler=cmd_get)

    lst = ssub.add_parser("list", help="list subscriptions")
    lst.add_argument("--organization", help="only this organization's")
    lst.add_argument("--json", action="store_true", help="print JSON")
    lst.set_defaults(handler=cmd_list)

    for name, helptext in (
        ("delete", "delete a subscription (tombstone)"),
        ("enable", "resume deliveries to a subscription"),
        ("disable", "stop deliveries to a subscription, keeping it"),
    ):
        p = ssub.add_parser(name, help=helptext)
        p.add_argument("webhook_id", metavar="WEBHOOK_ID")
        p.add_argument("--json", action="store_true", help="print JSON")
        p.set_defaults(handler=cmd_state, action=name)

    rot = ssub.add_parser(
        "rotate-secret",
        help="new secret; the old one signs too for the grace period",
        description="Replace the signing secret. Until DISPATCHER_SECRET_ROTATION_GRACE_S "
        "has passed, deliveries carry a signature with the old secret as well.",
    )
    rot.add_argument("webhook_id", metavar="WEBHOOK_ID")
    add_secret_options(
        rot.add_mutually_exclusive_group(),
        "the new secret",
        "default: generated and shown once",
    )
    rot.add_argument("--json", action="store_true", help="print JSON")
    rot.set_defaults(handler=cmd_rotate)

    test = sub.add_parser(
        "send-test",
        help="send a sample event to one endpoint now",
        description="POST a sample visitor.identified event, marked X-Bullseye-Test: true and "
        "signed like a real delivery, to one subscription's endpoint. Exit 0 on a 2xx answer.",
    )
    test.add_argument("webhook_id", metavar="WEBHOOK_ID")
    test.add_argument("--json", action="store_true", help="print JSON")
    test.set_defaults(handler=cmd_send_test)


def subscription_view(sub: Subscription, now: datetime | None = None) -> dict[str, Any]:
    """A subscription as shown to operators: never a secret, only whether one is set."""
    now = now or datetime.now(UTC)
    data = sub.model_dump(mode="json", exclude={"secret", "previous_secrets"})
    data["secret"] = "set" if sub.secret else "none"
    data["previous_secrets_until"] = [
        format_timestamp(p.expires_at) for p in sub.previous_secrets if p.expires_at > now
    ]
    return data


def _show(change_or_sub: subs.Outcome | Subscription, as_json: bool) -> None:
    if isinstance(change_or_sub, subs.Outcome):
        assert change_or_sub.sub is not None
        sub, secret = change_or_sub.sub, change_or_sub.new_secret
        for message in change_or_sub.warnings:
            warn(message)
    else:
        sub, secret = change_or_sub, None
    view = subscription_view(sub)
    if secret is not None:
        view["new_secret"] = secret
    if as_json:
        print_json(view)
        return
    for key, value in view.items():
        if isinstance(value, list):
            value = ", ".join(value) or "-"
        print(f"{key + ':':<24}{printable(value)}")
    if secret is not None:
        print("\nStore this secret now: it is not shown again.")


def cmd_put(args: argparse.Namespace, settings: Settings) -> int:
    enabled = False if args.disabled else (True if args.enabled else None)
    outcome = subs.put(
        settings,
        args.webhook_id,
        organization_id=args.organization,
        url=args.url,
        events=args.events,
        plan=args.plan,
        secret=read_secret(args),
        no_secret=args.no_secret,
        enabled=enabled,
        description=args.description,
        rate_limit_per_s=(
            None
            if args.no_rate_limit
            else (manage.KEEP if args.rate_limit_per_s is None else args.rate_limit_per_s)
        ),
    )
    _show(outcome, args.json)
    warn_of_secret_option(args)
    return 0


def cmd_get(args: argparse.Namespace, settings: Settings) -> int:
    _show(subs.get(settings, args.webhook_id), args.json)
    return 0


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    found = subs.list_all(settings, args.organization)
    if args.json:
        print_json([subscription_view(s) for s in found])
        return 0
    header = ("WEBHOOK ID", "ORGANIZATION", "PLAN", "ENABLED", "SECRET", "EVENTS", "URL")
    rows = [
        (
            s.webhook_id,
            s.organization_id,
            s.plan,
            "yes" if s.enabled else "no",
            ("rotating" if len(s.active_secrets(datetime.now(UTC))) > 1 else "set")
            if s.secret
            else "none",
            ",".join(s.events),
            s.url,
        )
        for s in found
    ]
    print_table(header, rows)
    print(f"\n{len(rows)} subscription(s)")
    return 0


def cmd_state(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "delete":
        webhook_id = subs.delete(settings, args.webhook_id)
        if args.json:
            print_json({"deleted": webhook_id})
        else:
            print(f"deleted {webhook_id}")
        return 0
    outcome = subs.set_enabled(settings, args.webhook_id, args.action == "enable")
    _show(outcome, args.json)
    return 0


def cmd_rotate(args: argparse.Namespace, settings: Settings) -> int:
    outcome = subs.rotate(settings, args.webhook_id, read_secret(args))
    _show(outcome, args.json)
    warn_of_secret_option(args)
    return 0


def cmd_send_test(args: argparse.Namespace, settings: Settings) -> int:
    from dispatcher.commands.sendtest import send_test

    sub = subs.get(settings, args.webhook_id)
    report = send_test(settings, sub)
    if report.not_called is not None:
        warn(f"{sub.webhook_id}: {report.not_called}: real events are not sent to it")
    result = report.result
    if args.json:
        print_json(report.as_dict())
    else:
        print(f"POST {sub.url}")
        print(f"delivery id: {report.delivery_id}")
        status = f"HTTP {result.status_code}" if result.status_code is not None else "no answer"
        print(f"{status} in {result.duration_s * 1000:.0f} ms")
        if report.response is not None:
            print(f"response: {report.response or '(empty)'}")
    if not result.ok:
        raise DispatcherError(f"test delivery to {sub.webhook_id} failed: {report.reason}")
    return 0
