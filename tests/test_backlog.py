"""Each webhook's backlog in the API: the instances' snapshots, summed while fresh.

The unit tests check the snapshot and the view's arithmetic (pure logic); the
broker test runs a real ``dispatcher run`` and ``dispatcher api`` against a slow
HTTPS endpoint and reads the field as a customer would.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from dispatcher.backlog import (
    SNAPSHOT_MAX_WEBHOOKS,
    STALE_AFTER_REPORTS,
    BacklogSnapshot,
    BacklogView,
    snapshot,
)
from dispatcher.settings import Settings
from tests.api_support import ORG
from tests.receiver import HttpsReceiver, Reply
from tests.streams import publish_spread, stream
from tests.support import wait_until

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def _view(*snaps: BacklogSnapshot) -> BacklogView:
    view = BacklogView(Settings())
    for snap in snaps:
        view.apply("webhooks.backlog", 0, 0, snap.instance.encode(), snap.to_json())
    view._mark_caught_up()
    return view


def test_a_snapshot_lists_the_largest_backlogs_only_and_says_when_it_left_some_out() -> None:
    backlogs = {f"wh_{i}": i for i in range(SNAPSHOT_MAX_WEBHOOKS + 5)}
    snap = snapshot("a", 5.0, backlogs, at=T0)
    assert len(snap.webhooks) == SNAPSHOT_MAX_WEBHOOKS
    assert snap.truncated
    # The largest kept, zeros never listed.
    assert min(snap.webhooks.values()) == 5
    assert "wh_0" not in snap.webhooks
    small = snapshot("a", 5.0, {"wh_a": 3, "wh_b": 0}, at=T0)
    assert small.webhooks == {"wh_a": 3}
    assert not small.truncated
    assert BacklogSnapshot.model_validate_json(small.to_json()) == small


def test_the_view_sums_fresh_snapshots_and_leaves_stale_ones_out() -> None:
    every = 5.0
    stale_age = timedelta(seconds=STALE_AFTER_REPORTS * every + 1)
    view = _view(
        snapshot("a", every, {"wh_x": 10, "wh_y": 1}, at=T0),
        snapshot("b", every, {"wh_x": 5}, at=T0 + timedelta(seconds=2)),
        snapshot("gone", every, {"wh_x": 1000}, at=T0 - stale_age),
    )
    now = T0 + timedelta(seconds=3)
    x = view.of("wh_x", now)
    assert x is not None
    assert x.deliveries == 15
    assert x.as_of == T0
    y = view.of("wh_y", now)
    assert y is not None and y.deliveries == 1
    # Known to be none: instances reported, none holds anything for it.
    z = view.of("wh_z", now)
    assert z is not None and z.deliveries == 0
    # Once every snapshot is stale: unknown, not zero.
    assert view.of("wh_x", T0 + stale_age + timedelta(seconds=3)) is None


def test_a_newer_snapshot_or_a_tombstone_replaces_an_instances_word() -> None:
    view = _view(
        snapshot("a", 5.0, {"wh_x": 10}, at=T0),
        snapshot("a", 5.0, {}, at=T0 + timedelta(seconds=5)),
    )
    now = T0 + timedelta(seconds=6)
    x = view.of("wh_x", now)
    assert x is not None and x.deliveries == 0
    view.apply("webhooks.backlog", 0, 2, b"a", None)
    assert view.of("wh_x", now) is None
    # A record the view cannot read is skipped; the last good word stands.
    view.apply("webhooks.backlog", 0, 3, b"b", b"{not json")
    view.apply("webhooks.backlog", 0, 4, b"b", snapshot("b", 5.0, {"wh_x": 2}, at=T0).to_json())
    view.apply("webhooks.backlog", 0, 5, b"b", b'{"instance": "b"}')
    x = view.of("wh_x", now)
    assert x is not None and x.deliveries == 2


def test_a_view_that_has_not_caught_up_knows_nothing() -> None:
    view = BacklogView(Settings())
    view.apply("webhooks.backlog", 0, 0, b"a", snapshot("a", 5.0, {"wh_x": 1}, at=T0).to_json())
    assert view.of("wh_x", T0) is None


def test_a_slow_webhooks_backlog_shows_in_the_api_goes_back_to_zero_and_goes_stale(
    ns_factory: Any, receiver: HttpsReceiver, run_dispatcher: Any, run_api: Any
) -> None:
    ns = ns_factory(
        topic_partitions=2,
        max_in_flight_per_endpoint=2,
        backlog_report_every_s=0.5,
        http_timeout_s=10.0,
    )
    receiver.respond("/slow", Reply(200, delay_s=0.5))
    receiver.respond("/fast", Reply(200))
    slow = ns.subscribe(receiver.url("/slow"), organization_id=ORG)
    fast = ns.subscribe(receiver.url("/fast"), organization_id=ORG)
    api = run_api(ns)
    client = api.admin()

    def webhook(webhook_id: str) -> dict[str, Any]:
        r = client.get(f"/v1/organizations/{ORG}/webhooks/{webhook_id}")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    # No dispatcher has reported yet: unknown, not zero.
    assert webhook(slow.webhook_id)["backlog"] is None
    proc = run_dispatcher(ns)
    events = stream("backlog", 0, 30, org=ORG)
    publish_spread(ns, events)

    # 30 deliveries to two slots at 0.5 s each: about 7 s of backlog.
    def backlog_if(wanted: Callable[[int | None], bool]) -> dict[str, Any] | None:
        hook = webhook(slow.webhook_id)
        return hook if wanted(hook["backlog"]) else None

    seen = wait_until(
        lambda: backlog_if(lambda n: (n or 0) > 0),
        20,
        "a backlog for the slow webhook in the API",
        interval_s=0.2,
    )
    assert seen["backlog_as_of"] is not None
    wait_until(lambda: len(receiver.requests_to("/slow")) >= len(events), 60, "every slow delivery")
    drained = wait_until(
        lambda: backlog_if(lambda n: n == 0), 20, "the backlog to read 0 once drained"
    )
    assert drained["backlog_as_of"] is not None
    assert webhook(fast.webhook_id)["backlog"] == 0
    # An instance killed outright leaves its last snapshot behind: stale after three
    # of its intervals (1.5 s here), it is no longer counted, and nothing is known.
    proc.kill()
    wait_until(
        lambda: backlog_if(lambda n: n is None), 20, "the killed instance's word to go stale"
    )
