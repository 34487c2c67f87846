"""A crash or a stop at any moment loses no (event, subscription) pair.

``kill -9`` mid-stream leaves only uncommitted offsets behind, which a restart
delivers again: duplicates, counted per kill and bounded by the in-flight limit
(offsets are committed often), never losses. SIGTERM drains
what is in flight within ``drain_timeout_s`` and exits 0.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest

from dispatcher.records import DeliveryRecord
from dispatcher.stages import retry_stages
from tests.receiver import HttpsReceiver, Reply
from tests.streams import (
    Tally,
    all_delivered,
    expected_pairs,
    gauge,
    publish_spread,
    stream,
)
from tests.support import Namespace, wait_until

PER_ENDPOINT = 16


MAX_IN_FLIGHT = 128
#: Delivered pairs (of 9,000) at which the instance running then is killed.
KILL_AT = (1500, 4000, 6500)


# Alone: it holds that a healthy endpoint is never deferred, and a dispatcher
# starved of CPU by other tests measures its answers slow (about 2 s for a
# 50 ms receiver with a quarter of a core) and parks them as endpoint_slow.
@pytest.mark.alone
def test_kill_9_three_times_mid_stream_loses_nothing_and_repeats_little(
    ns_factory: Any,
    receiver: HttpsReceiver,
    run_dispatcher: Any,
    record_property: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ns: Namespace = ns_factory(
        max_in_flight=MAX_IN_FLIGHT,
        max_in_flight_per_endpoint=8,
        # Small buffers: partitions are paused and resumed all through the stream.
        partition_buffer_high=40,
        partition_buffer_low=10,
    )
    # Three webhooks on one host, as many customers of one integration platform.
    paths = ["/one", "/two", "/three"]
    for path in paths:
        # Slow enough that the stream lasts many commit intervals.
        receiver.respond(path, Reply(200, delay_s=0.05))
        ns.subscribe(receiver.url(path))
    events = stream("crash", 0, 3000)
    expected = expected_pairs(paths, events)

    def tally() -> Tally:
        return Tally.of([receiver])

    publish_spread(ns, events)
    proc = run_dispatcher(ns)
    per_kill = []
    for at in KILL_AT:
        wait_until(lambda at=at: tally().delivered >= at, 120, f"{at} pairs delivered")
        # A healthy receiver, however busy, is never deferred.
        assert gauge(proc, "dispatcher_deferrals_total") == 0
        proc.kill()
        before = tally()
        assert before.missing(expected), "the stream was over before the kill"
        proc = run_dispatcher(ns)
        # What this kill repeats is re-sent right after the restart, before the
        # stream moves on by much: counted once the stream has moved on well past.
        wait_until(
            lambda before=before: tally().delivered >= min(before.delivered + 1500, 9000),
            120,
            "the stream to move on after the restart",
        )
        per_kill.append(tally().duplicates - before.duplicates)
    wait_until(lambda: not tally().missing(expected), 180, "every pair after the restarts")
    after = tally()
    assert after.delivered == len(expected) == 9000
    wait_until(lambda: gauge(proc, "dispatcher_in_flight_deliveries") == 0, 30, "in-flight at 0")
    assert gauge(proc, "dispatcher_deferrals_total") == 0
    record_property("kill9_duplicates_per_kill", per_kill)
    record_property("kill9_duplicates", after.duplicates)
    with capsys.disabled():
        print(
            f"\n[kill -9 x{len(KILL_AT)}] pairs={len(expected)} duplicates per kill={per_kill} "
            f"total={after.duplicates} deferrals=0 bound per kill={MAX_IN_FLIGHT}"
        )
    # Only what was in flight or finished but not yet committed is sent again.
    assert all(n <= MAX_IN_FLIGHT for n in per_kill), per_kill


@pytest.mark.parametrize(
    ("reply_delay_s", "drain_timeout_s"),
    [(1.0, 6.0), (120.0, 3.0)],
    ids=["in-flight-finish", "drain-times-out"],
)
def test_sigterm_with_deliveries_in_flight_exits_0_in_time_and_loses_nothing(
    ns_factory: Any,
    receiver: HttpsReceiver,
    run_dispatcher: Any,
    reply_delay_s: float,
    drain_timeout_s: float,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ns: Namespace = ns_factory(
        max_in_flight=64,
        max_in_flight_per_endpoint=PER_ENDPOINT,
        drain_timeout_s=drain_timeout_s,
        http_timeout_s=150,
    )
    receiver.respond("/hook", Reply(200, delay_s=reply_delay_s))
    ns.subscribe(receiver.url("/hook"))
    events = stream("term", 0, 150)
    expected = expected_pairs(["/hook"], events)
    proc = run_dispatcher(ns)
    publish_spread(ns, events)
    receiver.wait_for_requests(PER_ENDPOINT, path="/hook", timeout_s=60)
    assert gauge(proc, "dispatcher_in_flight_deliveries") > 0

    started = time.monotonic()
    rc = proc.terminate(timeout_s=drain_timeout_s + 60)
    elapsed = time.monotonic() - started
    assert rc == 0, proc.logs()[-3000:]
    # The drain may take all of its timeout; leaving the groups and flushing is quick.
    assert elapsed <= drain_timeout_s + 5, f"took {elapsed:.1f} s to stop"
    with capsys.disabled():
        print(f"\n[sigterm] drain_timeout_s={drain_timeout_s} exit after {elapsed:.2f} s")

    receiver.respond("/hook", Reply(200))
    restarted = run_dispatcher(ns)
    wait_until(lambda: all_delivered([receiver], expected), 90, "every pair after the restart")
    tally = Tally.of([receiver])
    if reply_delay_s < drain_timeout_s:
        # Every delivery in hand finished and was committed on the way out.
        assert tally.duplicates == 0
    else:
        # Only those cut off at the drain timeout are sent again.
        assert 0 < tally.duplicates <= PER_ENDPOINT
    wait_until(
        lambda: gauge(restarted, "dispatcher_in_flight_deliveries") == 0, 30, "in-flight at 0"
    )


DEAD_EVENTS = 300
KILLS = 3


def test_kill_9_does_not_multiply_deferral_copies(
    ns_factory: Any,
    receiver: HttpsReceiver,
    run_dispatcher: Any,
    record_property: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Deliveries to a dead webhook cycle as deferrals; kills leave each one copy.

    A kill -9 after a deferral's copy was written but before the record it came
    from was committed makes a second copy of the same hop. Each such copy must
    stay a dead end (it is skipped when read), not become a lineage of its own
    deferred again every cycle (which, before copies were skipped, left 99 of the
    300 deliveries cycling as two or more copies after three kills).
    """
    ns: Namespace = ns_factory(
        max_in_flight=MAX_IN_FLIGHT,
        circuit_failure_threshold=1,
        circuit_cooldown_s=3600,  # no probes: the deliveries only cycle as deferrals
        # Paced (so in the last stage from the second deferral on), but fast.
        circuit_deferrals_per_s=1000,
    )
    receiver.respond("/dead", Reply(503))
    ns.subscribe(receiver.url("/dead"))
    publish_spread(ns, stream("dead", 0, DEAD_EVENTS))
    stage_topics = [stage.topic for stage in retry_stages(ns.settings)]

    proc = run_dispatcher(ns)
    for _ in range(KILLS):
        # Two cycles of every delivery through the retry stages, then kill.
        wait_until(
            lambda proc=proc: gauge(proc, "dispatcher_deferrals_total") >= 2 * DEAD_EVENTS,
            120,
            "two cycles of deferrals",
        )
        proc.kill()
        proc = run_dispatcher(ns)
    wait_until(
        lambda: gauge(proc, "dispatcher_deferrals_total") >= 4 * DEAD_EVENTS,
        120,
        "four cycles after the last restart",
    )
    records = [
        DeliveryRecord.model_validate_json(m.value())
        for topic in stage_topics
        for m in ns.read_all(topic)
    ]
    levels: dict[str, Counter[tuple[int, int]]] = {}
    for r in records:
        levels.setdefault(r.delivery_id, Counter())[(r.attempts_made, r.deferrals)] += 1
    assert len(levels) == DEAD_EVENTS
    # Copies of one hop the kills left behind (the same delivery at the same level).
    repeated = sum(n - 1 for per in levels.values() for n in per.values())
    # Copies still cycling: more than one record at a delivery's newest level.
    cycling = sum(per[max(per)] - 1 for per in levels.values())
    skipped = gauge(proc, "dispatcher_skipped_deliveries_total", reason="duplicate_copy")
    record_property("kill9_deferral_copies_repeated", repeated)
    record_property("kill9_deferral_copies_cycling", cycling)
    with capsys.disabled():
        print(
            f"\n[kill -9 x{KILLS}, dead webhook] deliveries={DEAD_EVENTS} records={len(records)} "
            f"repeated hop copies={repeated} still cycling={cycling} "
            f"skipped as duplicate copies (last instance)={skipped:.0f}"
        )
    # The copies the kills left are dead ends: each delivery goes on as one copy.
    assert cycling == 0
