"""The one "may this subscription be called?" policy (pure logic, no broker)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from dispatcher.core.fanout import SKIP_REASONS, CallPolicy
from dispatcher.models import Subscription

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def sub(
    url: str = "https://hooks.example.com/a", *, enabled: bool = True, plan: str = "scale"
) -> Subscription:
    return Subscription(
        webhook_id="wh_1",
        organization_id="org_1",
        url=url,
        events=("visitor.identified",),
        enabled=enabled,
        plan=plan,
        created_at=NOW,
        updated_at=NOW,
    )


@pytest.mark.parametrize(
    ("subscription", "allow_http", "expected"),
    [
        (sub(), False, None),
        (None, False, "deleted"),
        (sub(enabled=False), False, "disabled"),
        (sub(plan="free"), False, "not_entitled"),
        (sub("http://hooks.example.com/a"), False, "insecure_url"),
        (sub("http://hooks.example.com/a"), True, None),
        (sub("HTTP://hooks.example.com/a"), False, "insecure_url"),
        # The first reason wins, in a fixed order.
        (sub("http://hooks.example.com/a", enabled=False, plan="free"), False, "disabled"),
    ],
)
def test_refusal(subscription: Subscription | None, allow_http: bool, expected: str | None) -> None:
    policy = CallPolicy(frozenset({"scale", "enterprise"}), allow_http)
    assert policy.refusal(subscription) == expected
    assert expected is None or expected in SKIP_REASONS
