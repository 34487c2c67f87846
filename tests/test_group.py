"""Instances joining and leaving the group mid-stream lose no (event, subscription) pair."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.receiver import HttpsReceiver, Reply
from tests.streams import Tally, all_delivered, expected_pairs, gauge, publish_spread, stream
from tests.support import Namespace, free_port, wait_until

BATCH = 400
PATHS = ["/a", "/b"]


# Alone: the bound on repeats below holds while two endpoints answering alike go
# through a partition nearly in step, which a machine busy with other tests can
# break; repeats stay within at-least-once.
@pytest.mark.alone
def test_join_and_leave_mid_stream_lose_nothing(
    ns_factory: Any,
    receiver: HttpsReceiver,
    run_dispatcher: Any,
    record_property: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ns: Namespace = ns_factory(
        topic_partitions=4,
        max_in_flight=64,
        # Small buffers: partitions are paused and resumed all through the stream.
        partition_buffer_high=40,
        partition_buffer_low=10,
    )
    for path in PATHS:
        # Slow enough that each instance still has work in hand when the group changes.
        receiver.respond(path, Reply(200, delay_s=0.05))
        ns.subscribe(receiver.url(path))
    expected: set[tuple[str, str]] = set()

    def publish(start: int) -> None:
        events = stream("grp", start, BATCH)
        expected.update(expected_pairs(PATHS, events))
        publish_spread(ns, events)

    first = run_dispatcher(ns)
    publish(0)
    wait_until(lambda: len(receiver.requests) >= 100, 60, "the first instance to be delivering")

    # A second instance joins while the first is busy, and takes partitions over.
    second = run_dispatcher(ns, http_port=free_port())
    publish(BATCH)
    wait_until(
        lambda: gauge(second, "dispatcher_delivery_attempts_total", outcome="success") > 0,
        60,
        "the second instance to deliver part of the stream",
    )
    assert first.proc is not None and first.proc.poll() is None

    # The first one leaves with deliveries in hand.
    publish(2 * BATCH)
    wait_until(
        lambda: gauge(first, "dispatcher_in_flight_deliveries") > 0,
        30,
        "the first instance to take on part of the last batch",
    )
    assert first.terminate(timeout_s=60) == 0, first.logs()[-3000:]
    assert re.search(r"draining \d+ in-flight deliveries", first.logs())

    wait_until(lambda: all_delivered([receiver], expected), 120, "every pair to be delivered")
    tally = Tally.of([receiver])
    assert not tally.missing(expected)
    assert tally.delivered == len(expected) == 3 * BATCH * len(PATHS)
    record_property("group_duplicates", tally.duplicates)
    with capsys.disabled():
        print(f"\n[group] pairs={len(expected)} duplicates={tally.duplicates}")
    # Both hand-overs were orderly (drained, then committed synchronously on revoke),
    # so the next owner started where the previous one stopped. The one exception:
    # an event whose delivery to one subscription had finished while its delivery
    # to the other still waited in that endpoint's queue; the waiting one is dropped
    # at the revoke, so the next owner delivers the whole event again. That is as
    # many events as one endpoint ran ahead of the other: a few when they answer
    # alike (1 to 3 seen), far below the slots of one endpoint. A hand-over that
    # did not commit on revoke would repeat what was finished since the last
    # automatic commit: up to 200 ms of 2 x 16 slots at 50 ms, about 128 pairs.
    handovers = sum(p.logs().count("stage input revoked") for p in (first, second))
    assert handovers >= 2
    assert tally.duplicates <= handovers * ns.settings.max_in_flight_per_endpoint
    # Everything the remaining instance took on has finished and been released.
    wait_until(
        lambda: gauge(second, "dispatcher_in_flight_deliveries") == 0, 30, "in-flight back to 0"
    )
