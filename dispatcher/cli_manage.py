"""``dispatcher subscriptions ...``: the management commands."""

from __future__ import annotations

import argparse
from typing import Any

from dispatcher import subscriptions as subs
from dispatcher.cli import print_json, subscription_view
from dispatcher.models import Subscription
from dispatcher.settings import Settings


def add_commands(sub: Any) -> None:
    group = sub.add_parser("subscriptions", help="manage webhook subscriptions")
    ssub = group.add_subparsers(title="subscriptions commands", metavar="ACTION", required=True)

    put = ssub.add_parser("put", help="create or update a subscription")
    put.add_argument("--id", dest="webhook_id", help="webhook id (default: a new one)")
    put.add_argument("--organization", help="organization id")
    put.add_argument("--url", help="endpoint URL (https://...)")
    put.add_argument(
        "--event",
        dest="events",
        action="append",
        help="event to send (repeatable; default visitor.identified)",
    )
    put.add_argument("--plan", help="the organization's plan (e.g. scale, enterprise)")
    secret = put.add_mutually_exclusive_group()
    secret.add_argument("--secret", help="signing secret (default: generated and shown once)")
    secret.add_argument("--no-secret", action="store_true", help="send unsigned deliveries")
    state = put.add_mutually_exclusive_group()
    state.add_argument("--disabled", action="store_true", help="store it disabled")
    state.add_argument("--enabled", action="store_true", help="store it enabled")
    put.add_argument("--json", action="store_true", help="print JSON")
    put.set_defaults(handler=cmd_put)

    get = ssub.add_parser("get", help="show one subscription")
    get.add_argument("webhook_id")
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
        p.add_argument("webhook_id")
        p.add_argument("--json", action="store_true", help="print JSON")
        p.set_defaults(handler=cmd_state, action=name)

    rot = ssub.add_parser(
        "rotate-secret", help="new secret; the old one signs too for the grace period"
    )
    rot.add_argument("webhook_id")
    rot.add_argument("--secret", help="the new secret (default: generated and shown once)")
    rot.add_argument("--json", action="store_true", help="print JSON")
    rot.set_defaults(handler=cmd_rotate)


def _show(sub: Subscription, as_json: bool, secret: str | None = None) -> None:
    view = subscription_view(sub)
    if secret is not None:
        view["new_secret"] = secret
    if as_json:
        print_json(view)
        return
    for key, value in view.items():
        shown = ", ".join(value) if isinstance(value, list) else value
        print(f"{key + ':':<18}{shown}")
    if secret is not None:
        print("\nStore this secret now: it is not shown again.")


def cmd_put(args: argparse.Namespace, settings: Settings) -> int:
    webhook_id = args.webhook_id or subs.new_webhook_id()
    existing = subs.load_table(settings).get(webhook_id) if args.webhook_id else None
    enabled = False if args.disabled else (True if args.enabled else None)
    sub, generated = subs.build(
        settings,
        existing=existing,
        webhook_id=webhook_id,
        organization_id=args.organization,
        url=args.url,
        events=args.events,
        plan=args.plan,
        secret=args.secret,
        no_secret=args.no_secret,
        enabled=enabled,
    )
    subs.write(settings, webhook_id, sub)
    _show(sub, args.json, generated)
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
            "set" if s.secret else "none",
            ",".join(s.events),
            s.url,
        )
        for s in found
    ]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    print(f"\n{len(rows)} subscription(s)")
    return 0


def cmd_state(args: argparse.Namespace, settings: Settings) -> int:
    sub = subs.get(settings, args.webhook_id)
    if args.action == "delete":
        subs.write(settings, sub.webhook_id, None)
        print(f"deleted {sub.webhook_id}")
        return 0
    updated, _ = subs.build(
        settings,
        existing=sub,
        webhook_id=sub.webhook_id,
        organization_id=None,
        url=None,
        events=None,
        plan=None,
        secret=None,
        enabled=args.action == "enable",
    )
    subs.write(settings, sub.webhook_id, updated)
    _show(updated, args.json)
    return 0


def cmd_rotate(args: argparse.Namespace, settings: Settings) -> int:
    sub = subs.get(settings, args.webhook_id)
    updated, secret = subs.rotate(settings, sub, args.secret)
    subs.write(settings, sub.webhook_id, updated)
    _show(updated, args.json, None if args.secret else secret)
    return 0
