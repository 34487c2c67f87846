"""A crash or a stop at any moment loses no (event, subscription) pair.

``kill -9`` mid-stream leaves only uncommitted offsets behind, which a restart
delivers again: duplicates, counted and reported, never losses. SIGTERM drains
what is in flight within ``drain_timeout_s`` and exits 0.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.receiver import HttpsReceiver, Reply
from tests.streams import (
    Tally,
    all_delivered,
    committed_events,
    expected_pairs,
    gauge,
    publish_spread,
    stream,
)
from tests.support import Namespace, wait_until

PER_ENDPOINT = 16


@pytest.fixture
def other(receiver: HttpsReceiver) -> Iterator[HttpsReceiver]:
    with HttpsReceiver(ca=receiver.ca) as second:
        yield second


def test_kill_9_mid_stream_then_restart_loses_nothing(
    ns_factory: Any,
    receiver: HttpsReceiver,
    other: HttpsReceiver,
    run_dispatcher: Any,
    record_property: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ns: Namespace = ns_factory(
        max_in_flight=128,
        max_in_flight_per_endpoint=8,
        # Small buffers: partitions are paused and resumed all through the stream.
        partition_buffer_high=40,
        partition_buffer_low=10,
    )
    receivers = [receiver, other]
    paths = ["/one", "/two"]
    for r, path in zip(receivers, paths, strict=True):
        # Slow enough that the stream lasts several commit intervals.
        r.respond(path, Reply(200, delay_s=0.05))
        ns.subscribe(r.url(path))
    events = stream("crash", 0, 1500)
    expected = expected_pairs(paths, events)

    def tally() -> Tally:
        return Tally.of(receivers)

    first = run_dispatcher(ns)
    publish_spread(ns, events)
    wait_until(lambda: tally().delivered >= 1200, 120, "part of the stream to be delivered")
    committed = wait_until(lambda: committed_events(ns), 30, "a first commit")
    first.kill()
    before = tally()
    assert before.missing(expected), "the stream was over before the kill"

    restarted = run_dispatcher(ns)
    wait_until(lambda: not tally().missing(expected), 180, "every pair after the restart")
    after = tally()
    assert after.delivered == len(expected) == 3000
    # What was committed before the kill is never delivered again: only deliveries
    # of events past the committed offsets can repeat.
    assert after.duplicates <= before.delivered - len(paths) * committed
    wait_until(
        lambda: gauge(restarted, "dispatcher_in_flight_deliveries") == 0, 30, "in-flight at 0"
    )
    record_property("kill9_delivered_before", before.delivered)
    record_property("kill9_committed_events_before", committed)
    record_property("kill9_duplicates", after.duplicates)
    with capsys.disabled():
        print(
            f"\n[kill -9] pairs={len(expected)} delivered before the kill={before.delivered} "
            f"events committed seen before it={committed} duplicates={after.duplicates}"
        )


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
