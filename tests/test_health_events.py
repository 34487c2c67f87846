"""Health events and auto-disable, end to end: a real broker, a real HTTPS receiver,
``dispatcher run`` and the API's writer (``dispatcher api``).

A webhook failing every request gives one ``webhook.failing``, then (with a short
auto-disable period) one ``webhook.disabled``; it is disabled in the API and in
the dispatcher's table, and its pending retries are dead-lettered with reason
``webhook_disabled``. Enabled again once its endpoint answers, its next success
gives one ``webhook.recovered``. The same counts when the writer is killed
(``kill -9``) in the middle of the episode and a new one takes over, and with two
dispatcher instances sharing the webhook's traffic, one of them killed mid-episode,
and when another process takes the writer role for a moment (fencing the writer).
An endpoint failing every request opens the dispatchers' circuits, which the
attempt records report and the API's health shows (``circuit_open_since``), with
one instance and with two; once it answers again, a probe's success clears it.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

import httpx
import pytest

from dispatcher.config_state import ConfigView
from dispatcher.config_writer import ConfigWriter
from dispatcher.records import DeliveryRecord
from dispatcher.webhook_health import POSITION_KEY
from tests.api_support import ORG, ApiProcess
from tests.cli_support import Cli
from tests.receiver import HttpsReceiver, Reply
from tests.support import (
    SEED_EVENT,
    Namespace,
    free_port,
    limit_record_size,
    metric_value,
    wait_until,
)

HOOKS = f"/v1/organizations/{ORG}/webhooks"
EVENTS = 5
SETTLE_S = 60.0
PATHS = ("exhausted", "disabled")


def notifications(ns: Namespace) -> list[dict[str, Any]]:
    """Every committed health event, in the order of its partition (one per webhook)."""
    return [json.loads(m.value()) for m in ns.read_all(ns.settings.notifications_topic)]


def digests(ns: Namespace, webhook_id: str) -> list[dict[str, Any]]:
    return [
        n
        for n in notifications(ns)
        if n["type"] == "webhook.dead_letters" and n["webhook_id"] == webhook_id
    ]


def counted(ns: Namespace, webhook_id: str) -> int:
    """Dead letters of the webhook in its committed health (the last record of its key)
    and in the digests already sent."""
    health = [m for m in ns.read_all(ns.settings.health_topic) if m.key() == webhook_id.encode()]
    pending = json.loads(health[-1].value() or b"{}").get("dead_letters", 0) if health else 0
    return int(pending) + sum(n["dead_letters"] for n in digests(ns, webhook_id))


def types_of(ns: Namespace) -> list[str]:
    return [n["type"] for n in notifications(ns)]


def webhook(http: httpx.Client, webhook_id: str) -> dict[str, Any]:
    got = http.get(f"{HOOKS}/{webhook_id}")
    assert got.status_code == 200, got.text
    body: dict[str, Any] = got.json()
    return body


def created_webhook(http: httpx.Client, url: str) -> dict[str, Any]:
    """A webhook created for ORG (on a plan that allows it), as the API answered it."""
    assert http.put(f"/v1/organizations/{ORG}/plan", json={"plan": "scale"}).status_code == 200
    created = http.post(HOOKS, json={"url": url})
    assert created.status_code == 201, created.text
    answer: dict[str, Any] = created.json()
    return answer


def disabled_letters(ns: Namespace) -> list[DeliveryRecord]:
    letters = [
        DeliveryRecord.model_validate_json(m.value() or b"")
        for m in ns.read_all(ns.settings.dead_letter_topic)
    ]
    return [r for r in letters if r.dead_letter_reason == "webhook_disabled"]


def fence(ns: Namespace) -> None:
    view = ConfigView(ns.settings)
    view.start()
    try:
        other = ConfigWriter(ns.settings, view)
        other.take_role()
        other.close()
    finally:
        view.stop()


@pytest.mark.parametrize("kill", [None, "writer", "dispatcher", "fenced"])
def test_one_event_of_each_kind_per_episode(
    kill: str | None,
    ns_factory: Callable[..., Namespace],
    receiver: HttpsReceiver,
    run_dispatcher: Callable[..., Any],
    run_api: Callable[..., ApiProcess],
) -> None:
    ns = ns_factory(
        # The retries come due after the webhook is disabled.
        retry_delays_s=[14, 28, 42],
        circuit_failure_threshold=1000,
        notify_after_failures=3,
        auto_disable_after_s=6,
        health_check_every_s=0.5,
    )
    receiver.respond("/down", Reply(500))
    writer = run_api(ns)
    http = writer.admin()
    created = created_webhook(http, receiver.url("/down"))
    webhook_id = created["id"]
    dispatcher = run_dispatcher(ns)
    if kill == "dispatcher":
        # Two instances share the webhook's traffic; one is killed mid-episode.
        doomed, dispatcher = dispatcher, run_dispatcher(ns, http_port=free_port())

    ns.publish(*[SEED_EVENT] * EVENTS)
    receiver.wait_for_requests(EVENTS, path="/down", timeout_s=SETTLE_S)
    wait_until(
        lambda: "webhook.failing" in types_of(ns), SETTLE_S, "webhook.failing", interval_s=0.3
    )
    shown = wait_until(
        lambda: (w := webhook(http, webhook_id))["consecutive_failures"] >= EVENTS and w,
        SETTLE_S,
        "the API to show the failures",
    )
    assert shown["failing_since"] is not None and shown["last_success_at"] is None
    assert shown["last_error"] == "http 500"

    # In the middle of the episode: failing sent, not disabled yet.
    if kill == "writer":
        assert "webhook.disabled" not in types_of(ns)
        writer.kill()
        writer = run_api(ns, same_keys_as=writer)
        http = writer.admin()
    elif kill == "dispatcher":
        assert "webhook.disabled" not in types_of(ns)
        doomed.kill()
    elif kill == "fenced":
        # Another process takes the writer role for a moment (as the CLI does for a
        # change): the running writer's next transaction is refused, and it takes the
        # role back, reading to the end, before deciding again.
        assert "webhook.disabled" not in types_of(ns)
        fence(ns)

    wait_until(
        lambda: "webhook.disabled" in types_of(ns), SETTLE_S, "webhook.disabled", interval_s=0.3
    )
    if kill == "fenced":
        # Its disable was the transaction refused, then decided again and committed.
        assert "the writer role was taken by another process" in writer.logs()
    off = wait_until(
        lambda: (w := webhook(http, webhook_id))["enabled"] is False and w,
        SETTLE_S,
        "the API to show the webhook disabled",
    )
    assert off["disabled_reason"] == "failing" and off["disabled_at"] is not None
    # The dispatcher's table has it disabled: a new event is skipped, not attempted.
    ns.publish(SEED_EVENT)
    wait_until(
        lambda: (
            metric_value(
                dispatcher.metrics(), "dispatcher_skipped_deliveries_total", reason="disabled"
            )
            >= 1
        ),
        SETTLE_S,
        "the new event to be skipped for the disabled webhook",
    )
    # A killed dispatcher may leave an attempt to be made again by the other (at least
    # once), never one skipped.
    tried = len(receiver.requests_to("/down"))
    assert tried == EVENTS if kill != "dispatcher" else tried >= EVENTS
    # Every pending retry is dead-lettered, replayable, with the reason.
    letters = wait_until(
        lambda: (
            (found := disabled_letters(ns))
            and len({r.delivery_id for r in found}) == EVENTS
            and found
        ),
        SETTLE_S,
        "the pending retries to be dead-lettered",
        interval_s=0.3,
    )
    assert {r.webhook_id for r in letters} == {webhook_id}
    assert all(r.attempts_made == 1 for r in letters)

    down_requests = len(receiver.requests_to("/down"))
    receiver.respond("/down", Reply(200))
    enabled = http.post(f"{HOOKS}/{webhook_id}/enable")
    assert enabled.status_code == 200, enabled.text
    assert enabled.json()["disabled_reason"] is None and enabled.json()["disabled_at"] is None
    # The dispatcher's table reads the change a moment later: publish until one arrives.
    wait_until(
        lambda: receiver.requests_to("/down")[down_requests:] or ns.publish(SEED_EVENT),
        SETTLE_S,
        "a delivery after enabling",
        interval_s=1.0,
    )
    wait_until(
        lambda: "webhook.recovered" in types_of(ns), SETTLE_S, "webhook.recovered", interval_s=0.3
    )
    # One partition per webhook, in order: nothing can follow unseen behind the recovery.
    assert types_of(ns) == ["webhook.failing", "webhook.disabled", "webhook.recovered"]
    events = notifications(ns)
    assert {n["webhook_id"] for n in events} == {webhook_id}
    assert {n["organization_id"] for n in events} == {ORG}
    assert events[1]["reason"] == "failing"
    assert len({n["id"] for n in events}) == 3
    healthy = wait_until(
        lambda: (w := webhook(http, webhook_id))["consecutive_failures"] == 0 and w,
        SETTLE_S,
        "the API to show the webhook healthy",
    )
    assert healthy["failing_since"] is None and healthy["last_success_at"] is not None
    # The writer's metrics, which the chart's alerts select (the failing event was
    # counted by the writer killed, if it was).
    with httpx.Client(timeout=5) as probe:
        text = probe.get(f"http://127.0.0.1:{writer.probe_port}/metrics").text
    assert metric_value(text, "dispatcher_webhooks_auto_disabled_total") == 1
    assert metric_value(text, "dispatcher_health_write_failing") == 0
    for kind in ("webhook.disabled", "webhook.recovered"):
        assert metric_value(text, "dispatcher_notifications_total", type=kind) == 1
    failing = metric_value(text, "dispatcher_notifications_total", type="webhook.failing")
    assert failing == (0 if kill == "writer" else 1)
    if kill is None:
        # Successes of a healthy webhook change nothing to write for a minute; they
        # are folded all the same, and counted.
        folded = metric_value(text, "dispatcher_health_attempts_folded_total")
        before = len(receiver.requests_to("/down"))
        ns.publish(*[SEED_EVENT] * 5)
        receiver.wait_for_requests(before + 5, path="/down", timeout_s=SETTLE_S)

        def counted() -> bool:
            with httpx.Client(timeout=5) as probe:
                text = probe.get(f"http://127.0.0.1:{writer.probe_port}/metrics").text
            return metric_value(text, "dispatcher_health_attempts_folded_total") >= folded + 5

        wait_until(counted, SETTLE_S, "the five successes to be counted as folded")


def test_a_manual_disable_gives_one_event_in_its_own_transaction(
    ns_factory: Callable[..., Namespace],
    receiver: HttpsReceiver,
    run_api: Callable[..., ApiProcess],
    cli: Cli,
) -> None:
    ns = ns_factory()
    api = run_api(ns)
    http = api.admin()
    created = created_webhook(http, receiver.url("/ok"))
    webhook_id = created["id"]

    off = http.post(f"{HOOKS}/{webhook_id}/disable")
    assert off.status_code == 200, off.text
    assert off.json()["disabled_reason"] == "manual"
    # Committed with the change, so readable as soon as the change is answered.
    events = notifications(ns)
    assert [n["type"] for n in events] == ["webhook.disabled"]
    first = events[0]
    assert first["reason"] == "manual" and first["webhook_id"] == webhook_id
    assert first["organization_id"] == ORG and first["consecutive_failures"] == 0
    assert first["at"][:19] == off.json()["disabled_at"][:19]

    # Disabling a disabled webhook again, by either route, changes no state worth an event.
    again = http.post(f"{HOOKS}/{webhook_id}/disable")
    assert again.status_code == 200, again.text
    assert again.json()["version"] == off.json()["version"] + 1
    patched = http.patch(f"{HOOKS}/{webhook_id}", json={"enabled": False})
    assert patched.status_code == 200, patched.text
    # Enabling sends nothing either: nothing failed, nothing recovered.
    on = http.post(f"{HOOKS}/{webhook_id}/enable")
    assert on.status_code == 200 and on.json()["disabled_reason"] is None
    assert notifications(ns) == [first]

    # A change that disables among other fields is a disable too, as is the command line's.
    patched = http.patch(f"{HOOKS}/{webhook_id}", json={"enabled": False, "description": "x"})
    assert patched.status_code == 200, patched.text
    assert http.post(f"{HOOKS}/{webhook_id}/enable").status_code == 200
    assert cli(ns, "subscriptions", "disable", webhook_id, "--json").json()["enabled"] is False
    assert cli(ns, "subscriptions", "disable", webhook_id, "--json").json()["enabled"] is False
    events = notifications(ns)
    assert [(n["type"], n["reason"]) for n in events] == [("webhook.disabled", "manual")] * 3
    assert len({n["id"] for n in events}) == 3
    # The API took the writer role back after the command line's change, and reads it.
    shown = wait_until(
        lambda: (w := webhook(http, webhook_id))["enabled"] is False and w,
        SETTLE_S,
        "the API to show the command line's disable",
    )
    assert shown["disabled_reason"] == "manual"
    with httpx.Client(timeout=5) as probe:
        text = probe.get(f"http://127.0.0.1:{api.probe_port}/metrics").text
    assert metric_value(text, "dispatcher_notifications_total", type="webhook.disabled") == 2
    assert metric_value(text, "dispatcher_webhooks_auto_disabled_total") == 0


def test_dead_letter_digest_counts_every_dead_letter_once_across_a_kill(
    ns_factory: Callable[..., Namespace],
    receiver: HttpsReceiver,
    run_dispatcher: Callable[..., Any],
    run_api: Callable[..., ApiProcess],
) -> None:
    """Deliveries dead-lettered after their last attempt, and others dead-lettered
    without one (their webhook disabled while they waited for a retry), each counted
    once in the digest, with the writer killed (``kill -9``) after folding them and
    before the digest is due."""
    ns = ns_factory(
        # One retry, due long enough after the first attempt for the disable to be read.
        retry_delays_s=[8],
        circuit_failure_threshold=1000,
        notify_after_failures=1000,
        dead_letter_digest_s=6,
        health_check_every_s=0.5,
    )
    receiver.respond("/exhausted", Reply(500))
    receiver.respond("/disabled", Reply(500))
    api = run_api(ns)
    http = api.admin()
    assert http.put(f"/v1/organizations/{ORG}/plan", json={"plan": "scale"}).status_code == 200
    made = {path: http.post(HOOKS, json={"url": receiver.url(f"/{path}")}) for path in PATHS}
    assert all(r.status_code == 201 for r in made.values()), [r.text for r in made.values()]
    ids = {path: r.json()["id"] for path, r in made.items()}
    secrets = [r.json()["secret"] for r in made.values()]
    run_dispatcher(ns)

    ns.publish(*[SEED_EVENT] * EVENTS)
    receiver.wait_for_requests(EVENTS, path="/disabled", timeout_s=SETTLE_S)
    off = http.post(f"{HOOKS}/{ids['disabled']}/disable")
    assert off.status_code == 200, off.text

    def letters() -> dict[str, list[DeliveryRecord]]:
        found: dict[str, list[DeliveryRecord]] = {p: [] for p in PATHS}
        for m in ns.read_all(ns.settings.dead_letter_topic):
            r = DeliveryRecord.model_validate_json(m.value() or b"")
            found[next(p for p, i in ids.items() if i == r.webhook_id)].append(r)
        return found

    dead = wait_until(
        lambda: (f := letters()) and all(len(v) >= EVENTS for v in f.values()) and f,
        SETTLE_S,
        "every delivery dead-lettered",
        interval_s=0.3,
    )
    assert {r.dead_letter_reason for r in dead["disabled"]} == {"webhook_disabled"}
    assert all(r.attempts_made == 1 for r in dead["disabled"])
    assert all(r.attempts_made == 2 for r in dead["exhausted"])
    # Folded and committed (most likely before their digest is due): the writer dies now.
    wait_until(
        lambda: all(counted(ns, i) >= EVENTS for i in ids.values()),
        SETTLE_S,
        "the dead letters folded",
        interval_s=0.2,
    )
    api.kill()
    api = run_api(ns, same_keys_as=api)

    for path, webhook_id in ids.items():
        sent = wait_until(
            lambda webhook_id=webhook_id: (
                (d := digests(ns, webhook_id)) and sum(n["dead_letters"] for n in d) >= EVENTS and d
            ),
            SETTLE_S,
            f"the digest of {path}",
            interval_s=0.3,
        )
        assert sum(n["dead_letters"] for n in sent) == len(dead[path]) == EVENTS, sent
        assert {n["organization_id"] for n in sent} == {ORG}
        # Periods of one webhook never overlap; each digest once.
        spans = sorted((n["period_start"], n["period_end"]) for n in sent)
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), spans
        assert len({n["id"] for n in sent}) == len(sent)
    # No secret in the records the digest was made from, nor in the events.
    raw = b"".join(
        m.value() or b""
        for topic in (ns.settings.dead_letter_topic, ns.settings.notifications_topic)
        for m in ns.read_all(topic)
    )
    assert not any(s.encode() in raw for s in secrets)


def test_a_disable_whose_event_kafka_refuses_is_not_applied(
    ns_factory: Callable[..., Namespace],
    receiver: HttpsReceiver,
    run_api: Callable[..., ApiProcess],
) -> None:
    """The event and the change are one transaction: the notifications topic refusing
    the event (a record larger than it takes) refuses the change too, answered 503,
    and nothing of it is visible; once the topic takes it, the disable and its one
    event are written together."""
    ns = ns_factory(api_write_timeout_s=5)
    api = run_api(ns)
    http = api.admin()
    created = created_webhook(http, receiver.url("/ok"))
    webhook_id = created["id"]
    topic = ns.settings.notifications_topic
    # Room for a transaction marker, not for an event.
    limit_record_size(topic, 200)

    refused = http.post(f"{HOOKS}/{webhook_id}/disable")
    assert refused.status_code == 503, refused.text
    shown = webhook(http, webhook_id)
    assert shown["enabled"] is True and shown["version"] == created["version"]
    assert notifications(ns) == []
    assert [
        json.loads(m.value())["enabled"]
        for m in ns.read_all(ns.settings.subscriptions_topic)
        if m.key() == webhook_id.encode()
    ] == [True]

    limit_record_size(topic, 1_000_000)
    # The broker applies a topic's new config a moment after it answered the change.
    wait_until(
        lambda: http.post(f"{HOOKS}/{webhook_id}/disable").status_code == 200,
        SETTLE_S,
        "the disable to be taken once the topic takes its event",
        interval_s=0.5,
    )
    assert [(n["type"], n["reason"]) for n in notifications(ns)] == [("webhook.disabled", "manual")]


def circuit_reports(ns: Namespace, webhook_id: str) -> list[dict[str, Any]]:
    """The webhook's attempt records, each with what its instance's circuit became."""
    docs = [json.loads(m.value()) for m in ns.read_all(ns.settings.attempts_topic)]
    return [d for d in docs if d.get("kind") == "attempt" and d["webhook_id"] == webhook_id]


def folded_past(ns: Namespace, records: list[Any]) -> bool:
    """Whether the writer's committed position is past ``records`` (of the attempts topic)."""
    stored = [m for m in ns.read_all(ns.settings.health_topic) if m.key() == POSITION_KEY.encode()]
    if not stored:
        return False
    position = json.loads(stored[-1].value())["positions"]
    return all(int(position.get(str(m.partition()), 0)) > m.offset() for m in records)


def when(text: str) -> datetime:
    return datetime.fromisoformat(text)


@pytest.mark.parametrize("instances", [1, 2])
def test_an_open_circuit_shows_in_the_health_until_a_request_succeeds_through_a_closed_one(
    instances: int,
    ns_factory: Callable[..., Namespace],
    receiver: HttpsReceiver,
    run_dispatcher: Callable[..., Any],
    run_api: Callable[..., ApiProcess],
) -> None:
    """Each instance's circuit opens on the failures it sees; the attempt records say
    so, and the writer's health shows since when. Once the endpoint answers again, a
    probe closes a circuit, its success clears it, and no instance opens it again."""
    ns = ns_factory(
        retry_delays_s=[2, 4, 30],
        circuit_failure_threshold=3,
        circuit_window_s=10.0,
        circuit_cooldown_s=1.0,
        # One successful probe closes the circuit.
        circuit_half_open_probes=2,
        circuit_deferrals_per_s=50.0,
        notify_after_failures=3,
        auto_disable_after_s=0,
        health_check_every_s=0.5,
    )
    receiver.respond("/flaky", Reply(500))
    writer = run_api(ns)
    http = writer.admin()
    created = created_webhook(http, receiver.url("/flaky"))
    webhook_id = created["id"]
    assert created["circuit_open_since"] is None
    dispatchers = [run_dispatcher(ns)]
    dispatchers += [run_dispatcher(ns, http_port=free_port()) for _ in range(instances - 1)]
    if instances > 1:
        wait_until(
            lambda: all(
                0 < metric_value(p.metrics(), "dispatcher_rate_limit_share") < 1
                for p in dispatchers
            ),
            SETTLE_S,
            "the instances to split the partitions",
            interval_s=0.5,
        )

    # Events keyed over every partition, so that each instance sees failures of its own.
    for i in range(12 * instances):
        ns.publish({**SEED_EVENT, "session_id": f"s-{i}"}, key=f"k-{i}".encode())
    opened = wait_until(
        lambda: (w := webhook(http, webhook_id))["circuit_open_since"] and w,
        SETTLE_S,
        "the API to show the circuit open",
        interval_s=0.3,
    )
    since = when(opened["circuit_open_since"])
    reports = circuit_reports(ns, webhook_id)
    # The first answers leave a circuit closed; the one that opens it says open.
    assert any(r["circuit"] == "closed" and not r["ok"] for r in reports)
    opening = {when(r["at"]) for r in reports if r["circuit"] == "open"}
    assert since in opening, (since, sorted(opening))
    assert opened["consecutive_failures"] >= 3 and opened["failing_since"] is not None
    # What the open circuits did with the rest: deferred, without an attempt.
    wait_until(
        lambda: (
            sum(
                metric_value(p.metrics(), "dispatcher_deferrals_total", reason="circuit_open")
                for p in dispatchers
            )
            >= instances
        ),
        SETTLE_S,
        "deliveries deferred by the open circuits",
    )
    for proc in dispatchers:
        assert "circuit open (was closed)" in proc.logs()
    failing = wait_until(
        lambda: [n for n in notifications(ns) if n["type"] == "webhook.failing"],
        SETTLE_S,
        "webhook.failing",
        interval_s=0.3,
    )
    # The event carries the circuit as the fold had it then: not open yet, or open
    # since the same report (never another time).
    assert failing[0]["circuit_open_since"] in (None, opened["circuit_open_since"])

    recovered_from = len(circuit_reports(ns, webhook_id))
    receiver.respond("/flaky", Reply(200))
    # Deferred deliveries come back as probes; new events keep coming meanwhile.
    cleared = wait_until(
        lambda: (
            ((w := webhook(http, webhook_id))["circuit_open_since"] is None and w)
            or ns.publish(SEED_EVENT)
        ),
        SETTLE_S,
        "the API to show the circuit closed",
        interval_s=1.0,
    )
    assert cleared["consecutive_failures"] == 0 and cleared["last_success_at"] is not None
    after = circuit_reports(ns, webhook_id)[recovered_from:]
    assert any(r["ok"] and r["circuit"] == "closed" for r in after)
    # Every instance gets through its backlog with its circuit closed: nothing sets
    # it again (a success through a circuit found open would).
    for proc in dispatchers:
        wait_until(
            lambda p=proc: "circuit closed (was half_open)" in p.logs(),
            SETTLE_S,
            "every instance's circuit to close",
        )
    assert "webhook.recovered" in types_of(ns)
    # Once the writer has folded every attempt made, the circuit is still closed.
    made = ns.read_all(ns.settings.attempts_topic)
    wait_until(lambda: folded_past(ns, made), SETTLE_S, "the writer to fold every attempt")
    assert webhook(http, webhook_id)["circuit_open_since"] is None
