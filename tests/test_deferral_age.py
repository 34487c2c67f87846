"""A webhook dead for longer than the deferral age limit ends in the dead-letter topic.

Its deliveries are deferred round the first retry stage while it stalls; once the
first deferral is older than ``deferral_max_age_s`` the next one is dead-lettered
with reason ``endpoint_unavailable``, listable like any other dead letter.
"""

from __future__ import annotations

from typing import Any

from dispatcher.records import DeliveryRecord
from tests.cli_support import Cli
from tests.receiver import HttpsReceiver, Reply
from tests.streams import gauge, stream
from tests.support import Namespace, wait_until


def test_a_delivery_deferred_past_the_age_limit_is_dead_lettered_and_listed(
    ns_factory: Any, receiver: HttpsReceiver, run_dispatcher: Any, cli: Cli
) -> None:
    ns: Namespace = ns_factory(
        topic_partitions=1,
        max_in_flight_per_endpoint=1,
        endpoint_stall_s=1.0,
        deferral_max_age_s=3,
        http_timeout_s=240,
    )
    # Takes the one slot and never answers while the test runs.
    receiver.respond("/dead", Reply(200, delay_s=600))
    sub = ns.subscribe(receiver.url("/dead"), webhook_id="wh_dead")
    proc = run_dispatcher(ns)
    first, second = stream("age", 0, 2)
    ns.publish(first, second)

    def dead_letters() -> list[DeliveryRecord]:
        return [
            DeliveryRecord.model_validate_json(m.value())
            for m in ns.read_all(ns.settings.dead_letter_topic)
        ]

    [record] = wait_until(dead_letters, 60, "the dead letter of the deferred delivery")
    assert record.dead_letter_reason == "endpoint_unavailable"
    assert record.webhook_id == sub.webhook_id
    assert record.attempts_made == 0 and record.history == []
    assert record.deferrals >= 1
    assert record.first_deferred_at is not None and record.dead_lettered_at is not None
    assert (record.dead_lettered_at - record.first_deferred_at).total_seconds() > 3
    assert second["session_id"] in record.body
    # Only the one in the slot was attempted; nothing was spent on the deferred one.
    assert len(receiver.requests_to("/dead")) == 1
    assert gauge(proc, "dispatcher_delivery_attempts_total") == 0
    assert gauge(proc, "dispatcher_deferrals_total", reason="endpoint_stalled") >= 1

    [listed] = cli(ns, "dead-letter", "list", "--json", "--webhook", "wh_dead").json()
    assert listed["delivery_id"] == record.delivery_id
