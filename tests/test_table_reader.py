"""The subscriptions table over the one topic reader (``dispatcher.follow``), in process.

It waits for a missing topic saying why, reads the topic whole once it exists,
follows it, and keeps the positions a writer waits past to read its own writes.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from dispatcher.commands.subscriptions import write
from dispatcher.commands.topics import ensure_topics
from dispatcher.core.table import SubscriptionTable
from dispatcher.models import Subscription
from dispatcher.settings import Settings
from tests.support import Namespace, wait_until


def _sub(webhook_id: str, organization_id: str) -> Subscription:
    now = datetime.now(UTC)
    return Subscription(
        webhook_id=webhook_id,
        organization_id=organization_id,
        url=f"https://hooks.example.com/{webhook_id}",
        events=("visitor.identified",),
        plan="scale",
        created_at=now,
        updated_at=now,
    )


def test_the_table_waits_for_its_topic_then_follows_it_and_reads_its_own_writes(
    ns: Namespace,
) -> None:
    topic = f"{ns.settings.subscriptions_topic}.late"
    late = Settings(**{**ns.values, "subscriptions_topic": topic})
    changes: list[int] = []
    table = SubscriptionTable(late, on_change=changes.append)
    table.start()
    try:
        why = wait_until(lambda: table.waiting_for or "", 30, "the table to say what it waits for")
        assert topic in why and "does not exist" in why
        assert not table.caught_up and table.failure is None

        assert not ensure_topics(late).problems
        first = _sub("wh_a", "org_1")
        write(late, first.webhook_id, first)
        wait_until(lambda: table.caught_up, 30, "the table to catch up")
        assert table.waiting_for is None
        assert table.wait_until_end(time.monotonic() + 30)
        assert table.get("wh_a") == first

        # Followed live, and read back as soon as written: what the writer relies on.
        second = _sub("wh_b", "org_1")
        write(late, second.webhook_id, second)
        assert table.wait_until_end(time.monotonic() + 30)
        assert table.get("wh_b") == second
        assert {s.webhook_id for s in table.for_organization("org_1")} == {"wh_a", "wh_b"}

        write(late, "wh_a", None)
        assert table.wait_until_end(time.monotonic() + 30)
        assert table.get("wh_a") is None
        assert table.for_organization("org_1") == (second,)
        assert len(table) == 1 and changes[-1] == 1
        assert table.failure is None
    finally:
        table.stop()


def test_a_reader_given_a_new_client_goes_on_from_where_it_stood(ns: Namespace) -> None:
    """What a wait for the end does when the reader got no nearer to it (a client
    left fetching nothing after a broker outage): the reader takes a new client at
    its positions, applies what comes next, and applies nothing twice."""
    changes: list[int] = []
    table = SubscriptionTable(ns.settings, on_change=changes.append)
    table.start()
    try:
        wait_until(lambda: table.caught_up, 30, "the table to catch up")
        first = _sub("wh_a", "org_1")
        write(ns.settings, first.webhook_id, first)
        assert table.wait_until_end(time.monotonic() + 30)
        applied = len(changes)

        table.renew_client()
        wait_until(lambda: table.renewals == 1, 30, "the reader to take a new client")
        second = _sub("wh_b", "org_1")
        write(ns.settings, second.webhook_id, second)
        assert table.wait_until_end(time.monotonic() + 30)
        assert table.get("wh_b") == second and table.get("wh_a") == first
        # One change more: the new client did not read the first record again.
        assert len(changes) == applied + 1, changes
        assert table.renewals == 1 and table.failure is None
    finally:
        table.stop()
