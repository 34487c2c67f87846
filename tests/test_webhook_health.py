"""The fold of attempts into webhook health: pure logic, no Kafka."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson

from dispatcher.attempts import CircuitState
from dispatcher.webhook_health import (
    DeadLettered,
    HealthFold,
    Limits,
    Observed,
    WebhookHealth,
    dead_lettered,
    decode_health,
    manual_disable,
    notice_id,
    observed,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
LIMITS = Limits(notify_after_failures=3, notify_after_failing_s=0, auto_disable_after_s=600)
ON = (True, T0 - timedelta(days=1))


def fail(at: datetime, webhook_id: str = "wh_a") -> Observed:
    return Observed(webhook_id, "org_1", at, False, "http_status 500")


def ok(at: datetime, webhook_id: str = "wh_a") -> Observed:
    return Observed(webhook_id, "org_1", at, True, None)


def run(
    states: dict[str, WebhookHealth], attempts: list[Observed], limits: Limits = LIMITS
) -> HealthFold:
    """Fold ``attempts`` and make the result the committed state, as the writer does."""
    fold = HealthFold(limits, dict(states))
    for a in attempts:
        fold.attempt(a)
    commit(states, fold)
    return fold


def commit(states: dict[str, WebhookHealth], fold: HealthFold) -> None:
    for wid, h in fold.step.health.items():
        if h is None:
            states.pop(wid, None)
        else:
            states[wid] = h


def kinds(fold: HealthFold) -> list[str]:
    return [n.type for n in fold.step.notices]


def test_failing_once_per_episode_then_recovered_once() -> None:
    states: dict[str, WebhookHealth] = {}
    first = run(states, [fail(T0 + timedelta(seconds=i)) for i in range(2)])
    assert kinds(first) == []
    assert states["wh_a"].consecutive_failures == 2
    assert states["wh_a"].failing_since == T0
    # The third failure opens the episode; further failures send nothing more.
    third = run(states, [fail(T0 + timedelta(seconds=i)) for i in range(2, 10)])
    assert kinds(third) == ["webhook.failing"]
    notice = third.step.notices[0]
    assert notice.consecutive_failures == 3 and notice.failing_since == T0
    assert notice.last_error == "http_status 500"
    assert kinds(run(states, [fail(T0 + timedelta(seconds=11))])) == []
    back = run(states, [ok(T0 + timedelta(seconds=12)), ok(T0 + timedelta(seconds=13))])
    assert kinds(back) == ["webhook.recovered"]
    h = states["wh_a"]
    assert h.consecutive_failures == 0 and h.failing_since is None and h.episode_since is None
    assert h.last_success_at == T0 + timedelta(seconds=12)
    # The recovery names the episode it ends: the same id as its failing event's.
    assert back.step.notices[0].id == notice_id("webhook.recovered", "wh_a", notice.at)


def test_a_success_between_failures_resets_the_count() -> None:
    states: dict[str, WebhookHealth] = {}
    attempts = [fail(T0), fail(T0), ok(T0), fail(T0), fail(T0)]
    assert kinds(run(states, attempts)) == []
    assert states["wh_a"].consecutive_failures == 2


def test_webhooks_are_counted_apart() -> None:
    states: dict[str, WebhookHealth] = {}
    attempts = [fail(T0, "wh_a"), fail(T0, "wh_b"), fail(T0, "wh_a"), fail(T0, "wh_a")]
    fold = run(states, attempts)
    assert [(n.type, n.webhook_id) for n in fold.step.notices] == [("webhook.failing", "wh_a")]
    assert states["wh_b"].consecutive_failures == 1


def test_recent_successes_of_a_healthy_webhook_write_nothing() -> None:
    states: dict[str, WebhookHealth] = {}
    run(states, [ok(T0)])
    again = run(states, [ok(T0 + timedelta(seconds=30))])
    assert again.step.health == {}
    later = run(states, [ok(T0 + timedelta(seconds=61))])
    assert later.step.health["wh_a"] is not None
    assert states["wh_a"].last_success_at == T0 + timedelta(seconds=61)


def test_failing_for_long_enough_opens_the_episode_with_few_attempts() -> None:
    limits = Limits(notify_after_failures=100, notify_after_failing_s=60, auto_disable_after_s=0)
    states: dict[str, WebhookHealth] = {}
    run(states, [fail(T0)], limits)
    early = HealthFold(limits, dict(states))
    early.check(T0 + timedelta(seconds=59), {"wh_a": ON})
    assert kinds(early) == [] and early.step.health == {}
    late = HealthFold(limits, dict(states))
    late.check(T0 + timedelta(seconds=60), {"wh_a": ON})
    assert kinds(late) == ["webhook.failing"]
    assert late.step.disable == []  # 0 = never disabled


def test_auto_disable_after_the_period_without_a_success() -> None:
    states: dict[str, WebhookHealth] = {}
    run(states, [fail(T0)])  # below the count: no episode yet
    before = HealthFold(LIMITS, dict(states))
    before.check(T0 + timedelta(seconds=599), {"wh_a": ON})
    assert before.step.disable == [] and kinds(before) == []
    due = HealthFold(LIMITS, dict(states))
    now = T0 + timedelta(seconds=600)
    due.check(now, {"wh_a": ON})
    assert due.step.disable == ["wh_a"]
    due.disabled("wh_a", now)
    # Failing first (the episode opens), then disabled with its reason.
    assert kinds(due) == ["webhook.failing", "webhook.disabled"]
    assert due.step.notices[1].reason == "failing"
    commit(states, due)
    # Disabled now: the next checks decide nothing more.
    off = (False, now)
    again = HealthFold(LIMITS, dict(states))
    again.check(now + timedelta(seconds=600), {"wh_a": off})
    assert again.step.disable == [] and kinds(again) == [] and again.step.health == {}


def test_enabled_again_while_failing_is_counted_again_from_then() -> None:
    states: dict[str, WebhookHealth] = {}
    run(states, [fail(T0 + timedelta(seconds=i)) for i in range(3)])
    disabled_at = T0 + timedelta(seconds=600)
    fold = HealthFold(LIMITS, dict(states))
    fold.check(disabled_at, {"wh_a": ON})
    assert fold.step.disable == ["wh_a"]
    commit(states, fold)
    enabled_at = disabled_at + timedelta(seconds=300)
    sub = (True, enabled_at)
    soon = HealthFold(LIMITS, dict(states))
    soon.check(enabled_at + timedelta(seconds=599), {"wh_a": sub})
    assert soon.step.disable == []
    late = HealthFold(LIMITS, dict(states))
    late.check(enabled_at + timedelta(seconds=600), {"wh_a": sub})
    assert late.step.disable == ["wh_a"]
    late.disabled("wh_a", enabled_at + timedelta(seconds=600))
    # Still the same episode: no second failing event, only the disable.
    assert kinds(late) == ["webhook.disabled"]


def test_a_deleted_webhook_loses_its_health() -> None:
    states: dict[str, WebhookHealth] = {}
    run(states, [fail(T0)])
    fold = HealthFold(LIMITS, dict(states))
    fold.check(T0, {"wh_a": None})
    assert fold.step.health == {"wh_a": None}


def test_the_fold_leaves_the_committed_states_untouched() -> None:
    states: dict[str, WebhookHealth] = {}
    run(states, [fail(T0)])
    before = states["wh_a"].model_copy()
    fold = HealthFold(LIMITS, states)
    fold.attempt(fail(T0))
    fold.check(T0 + timedelta(days=1), {"wh_a": ON})
    assert states["wh_a"] == before


def test_attempt_records_are_read_and_others_ignored() -> None:
    doc = {
        "kind": "attempt",
        "webhook_id": "wh_a",
        "organization_id": "org_1",
        "at": "2026-01-01T00:00:00Z",
        "ok": False,
        "status_code": 503,
        "error_class": "http_status",
    }
    seen = observed(orjson.dumps(doc))
    assert seen == Observed("wh_a", "org_1", T0, False, "http_status 503")
    assert observed(orjson.dumps({**doc, "kind": "resend"})) is None
    assert observed(b"not json") is None
    assert observed(None) is None
    assert observed(orjson.dumps({"kind": "attempt"})) is None


def test_one_dead_letter_digest_per_period_once_it_is_over() -> None:
    limits = Limits(3, 0, 0, digest_every_s=3600)
    states: dict[str, WebhookHealth] = {}
    dead = DeadLettered("wh_a", "org_1")
    first = HealthFold(limits, dict(states), T0)
    for _ in range(4):
        first.dead_letter(dead)
    first.attempt(ok(T0))  # a success later does not forget them
    commit(states, first)
    assert states["wh_a"].dead_letters == 4
    early = HealthFold(limits, dict(states), T0 + timedelta(seconds=3599))
    early.check(T0 + timedelta(seconds=3599), {"wh_a": ON})
    assert kinds(early) == []
    # Counted in the period open when folded, whatever the record's own time.
    late_record = HealthFold(limits, dict(states), T0 + timedelta(seconds=3000))
    late_record.dead_letter(dead)
    commit(states, late_record)
    end = T0 + timedelta(seconds=3600)
    due = HealthFold(limits, dict(states), end)
    due.check(end, {"wh_a": ON})
    assert kinds(due) == ["webhook.dead_letters"]
    digest = due.step.notices[0]
    assert digest.dead_letters == 5
    assert (digest.period_start, digest.period_end) == (T0, end)
    commit(states, due)
    assert states["wh_a"].dead_letters == 0
    again = HealthFold(limits, dict(states), end + timedelta(hours=5))
    again.check(end + timedelta(hours=5), {"wh_a": ON})
    assert kinds(again) == []


def test_no_digest_when_digests_are_off() -> None:
    states: dict[str, WebhookHealth] = {}
    fold = HealthFold(LIMITS, dict(states), T0)
    fold.dead_letter(DeadLettered("wh_a", "org_1"))
    assert fold.step.health == {}


def test_dead_letter_records_are_read_and_replay_markers_ignored() -> None:
    letter = {
        "delivery_id": "d1",
        "webhook_id": "wh_a",
        "organization_id": "org_1",
        "attempts_made": 0,
        "deferrals": 9,
        "dead_lettered_at": "2026-01-01T00:00:00Z",
        "dead_letter_reason": "endpoint_unavailable",
    }
    assert dead_lettered(orjson.dumps(letter)) == DeadLettered("wh_a", "org_1")
    marker = {"replay_of": "t/0/5", "delivery_id": "d1", "replayed_at": "2026-01-01T00:00:00Z"}
    assert dead_lettered(orjson.dumps(marker)) is None
    assert dead_lettered(orjson.dumps({**letter, "webhook_id": 5})) is None
    assert dead_lettered(b"[1") is None and dead_lettered(None) is None


def test_a_dead_letter_digest_for_a_webhook_without_health() -> None:
    # A webhook never failing an attempt (disabled, or only deferred) gets a digest too.
    limits = Limits(3, 0, 0, digest_every_s=60)
    states: dict[str, WebhookHealth] = {}
    fold = HealthFold(limits, dict(states), T0)
    fold.dead_letter(DeadLettered("wh_z", "org_1"))
    commit(states, fold)
    due = HealthFold(limits, dict(states), T0 + timedelta(seconds=60))
    due.check(T0 + timedelta(seconds=60), {"wh_z": ON})
    assert kinds(due) == ["webhook.dead_letters"] and due.step.notices[0].dead_letters == 1
    assert due.step.notices[0].consecutive_failures == 0


def test_a_webhook_disabled_by_someone_is_neither_warned_about_nor_disabled() -> None:
    limits = Limits(notify_after_failures=100, notify_after_failing_s=60, auto_disable_after_s=60)
    states: dict[str, WebhookHealth] = {}
    run(states, [fail(T0)], limits)
    fold = HealthFold(limits, dict(states))
    fold.check(T0 + timedelta(days=30), {"wh_a": (False, T0)})
    assert kinds(fold) == [] and fold.step.disable == [] and fold.step.health == {}


def test_a_manual_disable_is_one_event_and_enabling_again_judges_from_then() -> None:
    limits = Limits(notify_after_failures=100, notify_after_failing_s=60, auto_disable_after_s=600)
    states: dict[str, WebhookHealth] = {}
    # Healthy (no health record): the event, and nothing to write to the health topic.
    quiet, nothing = manual_disable("wh_b", "org_1", T0, None)
    assert (quiet.type, quiet.reason, quiet.consecutive_failures) == (
        "webhook.disabled",
        "manual",
        0,
    )
    assert nothing is None
    # Failing for 50 s, no episode yet, when someone disables it.
    run(states, [fail(T0), fail(T0 + timedelta(seconds=50))], limits)
    off_at = T0 + timedelta(seconds=50)
    notice, marked = manual_disable("wh_a", "org_1", off_at, states["wh_a"])
    assert notice.reason == "manual" and notice.consecutive_failures == 2
    assert notice.id == notice_id("webhook.disabled", "wh_a", off_at)
    assert marked is not None and marked.disabled_at == off_at
    states["wh_a"] = marked
    # Disabled for a day, then enabled while it still fails: not warned about nor
    # disabled for the time nobody called it, only from the enable on.
    enabled_at = T0 + timedelta(days=1)
    sub = (True, enabled_at)
    soon = HealthFold(limits, dict(states))
    soon.check(enabled_at + timedelta(seconds=59), {"wh_a": sub})
    assert kinds(soon) == [] and soon.step.disable == []
    later = HealthFold(limits, dict(states))
    later.check(enabled_at + timedelta(seconds=600), {"wh_a": sub})
    assert kinds(later) == ["webhook.failing"] and later.step.disable == ["wh_a"]
    # An episode open when someone disables it stays open: the first success once
    # enabled again closes it.
    states["wh_a"] = states["wh_a"].model_copy(update={"episode_since": off_at})
    back = run(states, [ok(enabled_at + timedelta(seconds=5))], limits)
    assert kinds(back) == ["webhook.recovered"]
    assert states["wh_a"].disabled_at is None and states["wh_a"].failing_since is None


# --- the circuit ------------------------------------------------------------------
def at(s: int) -> datetime:
    return T0 + timedelta(seconds=s)


def tried(s: int, good: bool, circuit: CircuitState | None, webhook_id: str = "wh_a") -> Observed:
    """An attempt at ``T0 + s`` whose record says the circuit became ``circuit``."""
    error = None if good else "http 500"
    return Observed(webhook_id, "org_1", at(s), good, error, circuit)


def test_one_instance_open_from_the_answer_that_opens_it_to_the_probe_that_closes_it() -> None:
    states: dict[str, WebhookHealth] = {}
    run(states, [tried(0, False, "closed"), tried(1, False, "closed")])
    assert states["wh_a"].circuit_open_since is None
    run(states, [tried(2, False, "open"), tried(3, False, "open")])
    assert states["wh_a"].circuit_open_since == at(2)  # the first report, kept
    # Probes: a failed one, then a success that does not close it yet. The success
    # ends the failures (and the episode) but not the circuit's opening.
    run(states, [tried(40, False, "half_open"), tried(41, True, "half_open")])
    h = states["wh_a"]
    assert h.circuit_open_since == at(2) and h.consecutive_failures == 0
    # Opened again by the probes, still since the first opening; closed by a success.
    run(states, [tried(42, False, "open"), tried(80, True, "half_open")])
    assert states["wh_a"].circuit_open_since == at(2)
    closing = run(states, [tried(81, True, "closed")])
    assert states["wh_a"].circuit_open_since is None
    assert closing.step.health["wh_a"] is not None  # a change worth a record


def test_several_instances_a_success_through_a_closed_circuit_clears_it() -> None:
    states: dict[str, WebhookHealth] = {}
    # Instance A's circuit opens; B's, still closed, fails (says nothing of A's).
    run(states, [tried(0, False, "open"), tried(1, False, "closed")])
    assert states["wh_a"].circuit_open_since == at(0)
    # B's request succeeds through its closed circuit: the endpoint answers again.
    run(states, [tried(2, True, "closed")])
    assert states["wh_a"].circuit_open_since is None
    # A's probes fail after its cool-down: open again, since then.
    run(states, [tried(31, False, "half_open"), tried(32, False, "open")])
    assert states["wh_a"].circuit_open_since == at(32)


def test_records_of_earlier_releases_change_the_circuit_only_by_a_success() -> None:
    states: dict[str, WebhookHealth] = {}
    run(states, [tried(0, False, "open"), tried(1, False, None)])
    assert states["wh_a"].circuit_open_since == at(0)
    run(states, [tried(2, True, None)])
    assert states["wh_a"].circuit_open_since is None


def test_a_success_through_an_open_circuit_is_not_taken_for_a_healthy_one() -> None:
    """A request started before its circuit opened may succeed after: the circuit is
    open all the same, and a webhook just seen healthy must not skip the record."""
    states: dict[str, WebhookHealth] = {}
    run(states, [tried(0, True, "closed")])
    late = run(states, [tried(10, True, "open")])
    assert late.step.health["wh_a"] is not None
    assert states["wh_a"].circuit_open_since == at(10)
    cleared = run(states, [tried(20, True, "closed")])
    assert cleared.step.health["wh_a"] is not None
    assert states["wh_a"].circuit_open_since is None


def test_the_events_carry_the_circuit_as_it_stands() -> None:
    states: dict[str, WebhookHealth] = {}
    # The third failure (LIMITS: the episode opens at 3) is the one that opens it.
    fold = run(
        states, [tried(0, False, "closed"), tried(1, False, "closed"), tried(2, False, "open")]
    )
    assert kinds(fold) == ["webhook.failing"]
    assert fold.step.notices[0].circuit_open_since == at(2)
    # Recovered at the first success, through the half-open circuit: still open there.
    back = run(states, [tried(40, True, "half_open")])
    assert kinds(back) == ["webhook.recovered"]
    assert back.step.notices[0].circuit_open_since == at(2)
    # An episode that opens while every circuit is closed says so.
    other = run(states, [tried(s, False, "closed", "wh_b") for s in range(3)])
    assert [n.circuit_open_since for n in other.step.notices] == [None]


def test_the_circuit_is_read_from_attempt_records() -> None:
    doc = {
        "kind": "attempt",
        "webhook_id": "wh_a",
        "organization_id": "org_1",
        "at": "2026-01-01T00:00:00Z",
        "ok": False,
        "status_code": 503,
        "error_class": "http",
    }
    for circuit in ("closed", "open", "half_open"):
        seen = observed(orjson.dumps({**doc, "circuit": circuit}))
        assert seen is not None and seen.circuit == circuit
    # Absent (an earlier release) or unknown (a later one): not reported.
    for other in ({}, {"circuit": "ajar"}, {"circuit": 1}):
        seen = observed(orjson.dumps({**doc, **other}))
        assert seen is not None and seen.circuit is None and seen.error == "http 503"


def test_a_health_record_names_the_circuit_only_when_open() -> None:
    closed = WebhookHealth(webhook_id="wh_a", organization_id="org_1", consecutive_failures=2)
    assert b"circuit_open_since" not in closed.to_json()
    assert decode_health(closed.to_json()) == closed
    opened = closed.model_copy(update={"circuit_open_since": T0})
    assert orjson.loads(opened.to_json())["circuit_open_since"] == "2026-01-01T00:00:00Z"
    assert decode_health(opened.to_json()) == opened
