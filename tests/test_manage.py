"""The management rules on their own: decisions against a given state (pure logic)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from dispatcher import manage
from dispatcher.errors import Refusal
from dispatcher.models import Subscription
from dispatcher.settings import Settings

SETTINGS = Settings(allowed_networks=["127.0.0.0/8"])
NOW = datetime(2026, 1, 1, tzinfo=UTC)


class State:
    """A configuration held in dicts."""

    def __init__(self, *subs: Subscription, plans: dict[str, str] | None = None) -> None:
        self.subs = {s.webhook_id: s for s in subs}
        self.plans = plans or {}

    def subscription(self, webhook_id: str) -> Subscription | None:
        return self.subs.get(webhook_id)

    def plan_of(self, organization_id: str) -> str | None:
        return self.plans.get(organization_id)

    def for_organization(self, organization_id: str) -> list[Subscription]:
        return [s for s in self.subs.values() if s.organization_id == organization_id]


def hook(version: int = 4, **fields: object) -> Subscription:
    values: dict[str, object] = {
        "webhook_id": "wh_1",
        "organization_id": "org",
        "url": "https://127.0.0.1/h",
        "events": ("visitor.identified",),
        "secret": "secret-one",
        "plan": "scale",
        "created_at": NOW,
        "updated_at": NOW,
        "version": version,
    }
    values.update(fields)
    return Subscription.model_validate(values)


def test_if_match_compares_versions_as_rfc_9110_says() -> None:
    sub = hook(version=4)
    assert manage.matches(sub, None)
    assert manage.matches(sub, ['"4"'])
    assert manage.matches(sub, ['W/"4"'])
    assert manage.matches(sub, ['"1"', '"4"'])
    assert manage.matches(sub, ["*"])
    assert not manage.matches(sub, ['"3"'])
    assert not manage.matches(sub, ["4"])  # an entity tag is quoted
    with pytest.raises(Refusal) as stale:
        manage.update(SETTINGS, State(sub), "org", "wh_1", known_events=[], if_match=['"3"'])
    assert stale.value.kind == "stale"


def test_changes_touch_only_what_they_name_and_count_versions() -> None:
    state = State(hook(version=4, description="kept", enabled=False))
    patched = manage.update(
        SETTINGS,
        state,
        "org",
        "wh_1",
        known_events=["visitor.identified"],
        url="https://127.0.0.1/n",
    )
    assert patched.sub is not None
    assert patched.sub.version == 5 and patched.sub.url == "https://127.0.0.1/n"
    assert patched.sub.description == "kept" and patched.sub.enabled is False
    rotated = manage.rotate_secret(SETTINGS, state, "org", "wh_1", None)
    assert rotated.sub is not None and rotated.new_secret == rotated.sub.secret
    assert rotated.sub.enabled is False and rotated.sub.version == 5
    assert [r.topic for r in rotated.records] == [SETTINGS.subscriptions_topic]


def test_a_missing_or_foreign_webhook_is_not_found() -> None:
    state = State(hook())
    for org, webhook_id in (("org", "wh_gone"), ("other_org", "wh_1")):
        with pytest.raises(Refusal) as refused:
            manage.delete(SETTINGS, state, org, webhook_id)
        assert refused.value.kind == "not-found"


def test_create_uses_the_plan_in_force() -> None:
    args = {
        "organization_id": "org",
        "webhook_id": "wh_2",
        "url": "https://127.0.0.1/h",
        "events": None,
        "secret": None,
        "enabled": None,
        "description": None,
        "known_events": ["visitor.identified"],
    }
    with pytest.raises(Refusal) as unset:
        manage.create(SETTINGS, State(), **args)  # type: ignore[arg-type]
    assert unset.value.kind == "plan-unset"
    with pytest.raises(Refusal) as below:
        manage.create(SETTINGS, State(plans={"org": "growth"}), **args)  # type: ignore[arg-type]
    assert below.value.kind == "plan-not-entitled"
    made = manage.create(SETTINGS, State(plans={"org": "scale"}), **args)  # type: ignore[arg-type]
    assert made.sub is not None and made.sub.version == 1 and made.sub.plan == "scale"


def test_a_plan_change_rewrites_the_webhooks_in_one_outcome() -> None:
    state = State(hook(version=2), hook(webhook_id="wh_3", version=7, plan="growth"))
    outcome = manage.set_plan(SETTINGS, state, "org", " Growth ")
    assert outcome.count == 1  # wh_3 already was on growth
    topics = [r.topic for r in outcome.records]
    assert topics == [SETTINGS.organizations_topic, SETTINGS.subscriptions_topic]
    with pytest.raises(Refusal) as unknown:
        manage.set_plan(SETTINGS, state, "org", "platinum")
    assert unknown.value.field == "plan"


def test_disabling_says_why_and_enabling_clears_it() -> None:
    failing = manage.disable_failing(SETTINGS, State(hook()), "wh_1")
    off = failing.sub
    assert off is not None and not off.enabled
    assert off.disabled_reason == "failing" and off.disabled_at is not None
    assert off.version == 5
    # Already disabled (by the writer or by someone) or deleted: the writer writes nothing.
    assert manage.disable_failing(SETTINGS, State(off), "wh_1").records == []
    assert manage.disable_failing(SETTINGS, State(), "wh_1").records == []
    # Disabled again by someone, it keeps the first reason.
    again = manage.enable(SETTINGS, State(off), "org", "wh_1", False).sub
    assert again is not None and again.disabled_reason == "failing"
    back = manage.enable(SETTINGS, State(off), "org", "wh_1", True).sub
    assert back is not None and back.enabled
    assert back.disabled_reason is None and back.disabled_at is None
    manual = manage.enable(SETTINGS, State(hook()), "org", "wh_1", False).sub
    assert manual is not None and manual.disabled_reason == "manual"
    # Through a change of fields too (PATCH enabled, the CLI's --enabled).
    patched = manage.update(SETTINGS, State(off), "org", "wh_1", known_events=[], enabled=True)
    assert patched.sub is not None and patched.sub.disabled_reason is None
    # The record of a disabled webhook carries both; an enabled one's neither.
    assert b'"disabled_reason":"failing"' in off.to_json()
    assert b"disabled" not in back.to_json()
