"""Stuck is visible: a partition whose commit stands still shows in lag, /readyz and a metric.

A webhook that takes longer to answer than the watchdog's threshold (and is not
judged stalled) holds its partition's committed offset where it is; the lag,
measured from the committed offset, says how many messages wait behind it, and
once it answers everything clears.
"""

from __future__ import annotations

from typing import Any

from tests.receiver import HttpsReceiver, Reply
from tests.streams import gauge, stream
from tests.support import Namespace, wait_until

ANSWER_AFTER_S = 10.0


def test_a_partition_held_up_shows_in_lag_readyz_and_the_metric_then_clears(
    ns_factory: Any, receiver: HttpsReceiver, run_dispatcher: Any
) -> None:
    ns: Namespace = ns_factory(
        topic_partitions=1,
        stuck_partition_after_s=2.0,
        # Neither stalled nor timed out while the test watches: only held up.
        endpoint_stall_s=120,
        http_timeout_s=60,
    )
    receiver.respond("/held", *[Reply(200, delay_s=ANSWER_AFTER_S)] * 3)
    ns.subscribe(receiver.url("/held"))
    proc = run_dispatcher(ns)
    ns.publish(*stream("stuck", 0, 3))
    topic = ns.settings.input_topic

    def not_ready() -> str:
        code, body = proc.readyz()
        return body if code == 503 and f"{topic}/0 for " in body else ""

    body = wait_until(not_ready, ANSWER_AFTER_S - 1, "/readyz to name the stuck partition")
    assert body.startswith("partitions not moving while work is pending"), body
    assert gauge(proc, "dispatcher_stuck_partitions") == 1
    # The gauge follows /readyz at the service's next beat (every second).
    wait_until(lambda: gauge(proc, "dispatcher_ready") == 0, 3, "dispatcher_ready to be 0")
    # The lag counts from the committed offset: all three wait, though all were fetched.
    wait_until(
        lambda: gauge(proc, "dispatcher_consumer_lag", topic=topic, partition="0") == 3,
        ANSWER_AFTER_S - 1,
        "the lag of the held-up partition",
    )

    # Answered: the commit moves, and everything clears.
    receiver.wait_for_requests(3, path="/held", timeout_s=30)
    wait_until(lambda: proc.readyz()[0] == 200, 30, "/readyz to be ready again")
    assert gauge(proc, "dispatcher_stuck_partitions") == 0
    wait_until(
        lambda: gauge(proc, "dispatcher_consumer_lag", topic=topic, partition="0") == 0,
        30,
        "the lag to come down to 0",
    )
    assert gauge(proc, "dispatcher_deferrals_total") == 0
