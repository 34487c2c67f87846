"""The circuit breaker end to end: it protects a dead endpoint without starving a flaky one.

Real broker, real ``dispatcher run`` processes, a real HTTPS receiver whose answer
depends on the request (its attempt number, or a coin). Time is scaled down: retry
delays of seconds, a cool-down of 1 s (half the first delay, as 30 s is of 60 s by
default), a window of 10 s, 50 paced deferrals a second; the ratios and probe
counts are the defaults.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from tests.receiver import HttpsReceiver, ReceivedRequest, Reply
from tests.support import SEED_EVENT, DispatcherProcess, Namespace, metric_value, wait_until

StartDispatcher = Callable[..., DispatcherProcess]

#: Deliveries in the flaky-endpoint tests: what this 2-core machine gets through in
#: well under a minute when every delivery takes two requests.
DELIVERIES = 3000
#: The breaker's time constants, scaled down; everything else is the default.
BREAKER = {
    "circuit_cooldown_s": 1.0,
    "circuit_window_s": 10.0,
    "circuit_deferrals_per_s": 50.0,
}
SETTLE_S = 180.0


def attempt_of(request: ReceivedRequest) -> int:
    return int(request.header("x-bullseye-attempt") or 0)


def delivery_id_of(request: ReceivedRequest) -> str:
    return request.header("x-bullseye-delivery-id") or ""


def events(count: int) -> list[dict[str, Any]]:
    run = uuid.uuid4().hex[:6]
    return [{**SEED_EVENT, "session_id": f"{run}-{i}"} for i in range(count)]


def delivered(
    receiver: HttpsReceiver, path: str, ok: Callable[[ReceivedRequest], bool]
) -> set[str]:
    return {delivery_id_of(r) for r in receiver.requests_to(path) if ok(r)}


def metric(proc: DispatcherProcess, name: str, **labels: str) -> float:
    return metric_value(proc.metrics(), name, **labels)


@pytest.mark.parametrize("kills", [0, 3])
def test_an_endpoint_refusing_every_first_attempt_receives_every_delivery(
    ns_factory: Callable[..., Namespace],
    receiver: HttpsReceiver,
    run_dispatcher: StartDispatcher,
    kills: int,
    record_property: Callable[[str, object], None],
) -> None:
    """Each delivery fails once and is accepted on its retry: all of them arrive.

    The endpoint fails half of its requests, and at the start (before any retry is
    due) all of them: the circuit opens, and its half-open probes, half of them
    retries, close it again, and the retries it has seen succeed keep it closed
    while the rest of the first attempts fail. Under the consecutive-failure breaker
    this replaces, the same test saw 220 of 3,000 arrive in 124 s.
    """
    ns = ns_factory(retry_delays_s=[2, 4, 30], **BREAKER)
    receiver.respond_with("/first", lambda r: Reply(500) if attempt_of(r) == 1 else Reply(200))
    ns.subscribe(receiver.url("/first"))
    started = time.monotonic()
    proc = run_dispatcher(ns)
    ns.publish(*events(DELIVERIES))

    def accepted() -> set[str]:
        return delivered(receiver, "/first", lambda r: attempt_of(r) > 1)

    for kill in range(kills):
        wait_until(
            lambda kill=kill: len(accepted()) >= DELIVERIES * (kill + 1) // (kills + 2),
            SETTLE_S,
            f"a share of the deliveries before kill {kill + 1}",
            interval_s=0.2,
        )
        proc.kill()
        proc = run_dispatcher(ns)
    wait_until(
        lambda: len(accepted()) >= DELIVERIES, SETTLE_S, "every delivery accepted", interval_s=0.5
    )
    elapsed = time.monotonic() - started
    record_property("deliveries", DELIVERIES)
    record_property("seconds_to_deliver_all", round(elapsed, 1))
    print(f"\n{DELIVERIES} deliveries, {kills} kill -9: all accepted in {elapsed:.1f} s")

    requests = receiver.requests_to("/first")
    assert len(accepted()) == DELIVERIES
    assert not ns.read_all(ns.settings.dead_letter_topic)
    # No delivery needed a third attempt: a deferral never spends one.
    assert max(attempt_of(r) for r in requests) == 2
    if kills == 0:
        # Nothing attempted twice at the same attempt number either.
        seen = [(delivery_id_of(r), attempt_of(r)) for r in requests]
        assert len(seen) == len(set(seen)) == 2 * DELIVERIES


def test_an_endpoint_failing_half_its_requests_at_random_receives_nearly_all(
    ns_factory: Callable[..., Namespace],
    receiver: HttpsReceiver,
    run_dispatcher: StartDispatcher,
    record_property: Callable[[str, object], None],
) -> None:
    """A coin decides each answer: at least 99 % arrive within the retry schedule.

    With independent 50 % failures a delivery is lost only when every attempt
    fails: 1 in 16 with the default four attempts, so no breaker reaches 99 %
    there. Nine attempts (1 in 512) make the bar the breaker's, not the schedule's.
    """
    ns = ns_factory(retry_delays_s=[1, 2, 3, 4, 5, 6, 7, 30], **BREAKER)
    coin = random.Random(19)
    receiver.respond_with("/coin", lambda _r: Reply(200) if coin.random() < 0.5 else Reply(500))
    ns.subscribe(receiver.url("/coin"))
    started = time.monotonic()
    proc = run_dispatcher(ns)
    ns.publish(*events(DELIVERIES))

    def settled() -> bool:
        dead = metric(proc, "dispatcher_dead_letters_total")
        ok = metric(proc, "dispatcher_delivery_attempts_total", outcome="success")
        return dead + ok >= DELIVERIES

    wait_until(settled, SETTLE_S, "every delivery accepted or dead-lettered", interval_s=0.5)
    elapsed = time.monotonic() - started
    ok = metric(proc, "dispatcher_delivery_attempts_total", outcome="success")
    dead = len(ns.read_all(ns.settings.dead_letter_topic))
    record_property("deliveries", DELIVERIES)
    record_property("accepted", ok)
    record_property("seconds", round(elapsed, 1))
    print(f"\n{DELIVERIES} deliveries at 50 %: {ok:.0f} accepted, {dead} dead in {elapsed:.1f} s")
    assert ok + dead == DELIVERIES
    assert ok >= 0.99 * DELIVERIES


def test_a_dead_endpoint_costs_a_bounded_number_of_deferrals_per_second(
    ns_factory: Callable[..., Namespace],
    receiver: HttpsReceiver,
    run_dispatcher: StartDispatcher,
    record_property: Callable[[str, object], None],
) -> None:
    """An open circuit reads its webhook's backlog back at the stated rate, not all of it
    once per retry delay (before: 300 records a second here, the whole backlog each 1 s).

    The bound is DISPATCHER_CIRCUIT_DEFERRALS_PER_S re-reads a second for a webhook's
    deliveries already deferred twice; it is measured over 30 s once the backlog got there.
    """
    rate = 20.0
    backlog = 300
    ns = ns_factory(retry_delays_s=[1, 2, 30], **{**BREAKER, "circuit_deferrals_per_s": rate})
    receiver.respond("/dead", Reply(503))
    sub = ns.subscribe(receiver.url("/dead"))
    receiver.respond("/ok", Reply(200))
    neighbour = ns.subscribe(receiver.url("/ok"))  # the same organization, the same events
    proc = run_dispatcher(ns)
    ns.publish(*events(backlog))

    def deferrals() -> float:
        return metric(proc, "dispatcher_webhook_deferrals_total", webhook_id=sub.webhook_id)

    # Every delivery is deferred once from the input, and once more when it comes back
    # after the usual delay (these two are not paced); less the few taken as probes.
    wait_until(
        lambda: deferrals() >= 2 * backlog - 50,
        SETTLE_S,
        "the backlog deferred twice",
        interval_s=0.2,
    )
    window_s = 30.0
    before, t0 = deferrals(), time.monotonic()
    wait_until(lambda: time.monotonic() - t0 >= window_s, window_s + 5, "the window")
    after, t1 = deferrals(), time.monotonic()
    per_s = (after - before) / (t1 - t0)
    record_property("deferrals_per_s", round(per_s, 1))
    print(f"\ndead endpoint, backlog {backlog}: {per_s:.1f} deferrals/s (bound {rate:g})")
    # The bound holds on average: a paced record held behind a later-due one in its
    # partition comes back late, together with others, so a window sees a fifth more
    # at most. Without pacing it would be the whole backlog each second. And the
    # backlog still cycles: nothing is dropped or parked for good.
    assert 0 < per_s <= rate * 1.2
    # Its neighbour got every event, and the open circuit deferred none of them. A
    # dispatcher starved of CPU by the tests beside it can judge the healthy neighbour
    # slow while it is met cold (its first answers late, the dead one's 503s not) and
    # park some of its deliveries as endpoint_slow: that is the hold's verdict, not
    # the circuit's (see tests/test_crash.py, run alone for that reason).
    assert len(receiver.requests_to("/ok")) == backlog
    deferred = metric(proc, "dispatcher_webhook_deferrals_total", webhook_id=neighbour.webhook_id)
    slow = metric(
        proc,
        "dispatcher_webhook_deferrals_total",
        webhook_id=neighbour.webhook_id,
        reason="endpoint_slow",
    )
    assert deferred == slow, (deferred, slow)
    assert metric(proc, "dispatcher_circuit_open_endpoints") == 1
