"""Isolation and backpressure under load.

An endpoint is a webhook: a stalled one holds only its own slots and queue, even
when another webhook shares its host, which is served meanwhile; once it is seen
stalled, what waits for it is deferred without spending an attempt. A backlog
that the endpoints cannot keep up with waits in Kafka (the partition is paused),
not in memory, and flows again once they can, with no deferral at all.
"""

from __future__ import annotations

import json
from typing import Any

from dispatcher.records import DeliveryRecord
from tests.receiver import HttpsReceiver, Reply
from tests.streams import Tally, expected_pairs, gauge, stream
from tests.support import Namespace, metric_value, wait_until

EVENTS = 200
PER_ENDPOINT = 4
QUEUE = 8


def test_a_stalled_webhook_does_not_hold_up_another_one_on_the_same_host(
    ns_factory: Any, receiver: HttpsReceiver, run_dispatcher: Any, capsys: Any
) -> None:
    ns: Namespace = ns_factory(
        max_in_flight=40,
        max_in_flight_per_endpoint=PER_ENDPOINT,
        endpoint_queue_size=QUEUE,
        endpoint_stall_s=1.0,
        # Longer than the test: the stalled requests neither answer nor time out
        # while it runs, so no attempt of them is ever counted.
        http_timeout_s=240,
    )
    # One host, two webhooks: answers only when the receiver stops, at the end of
    # the test, on one path; at once on the other.
    receiver.respond("/stalled", Reply(200, delay_s=600))
    stalled = ns.subscribe(receiver.url("/stalled"), webhook_id="wh_stalled")
    fine = ns.subscribe(receiver.url("/fine"), webhook_id="wh_fine")
    proc = run_dispatcher(ns)
    events = stream("iso", 0, EVENTS)
    ns.publish(*events)

    wanted = expected_pairs(["/fine"], events)
    wait_until(
        lambda: not Tally.of([receiver]).missing(wanted), 30, "every event at the healthy webhook"
    )
    # All the while the stalled webhook held exactly its slots, none answered.
    receiver.wait_for_requests(PER_ENDPOINT, path="/stalled", timeout_s=10)
    assert len(receiver.requests_to("/stalled")) == PER_ENDPOINT
    text = proc.metrics()
    assert gauge(proc, "dispatcher_delivery_attempts_total", outcome="failure") == 0, text
    assert gauge(proc, "dispatcher_delivery_attempts_total", outcome="success") >= EVENTS
    assert gauge(proc, "dispatcher_circuit_open_endpoints") == 0

    # Everything else for the stalled webhook was deferred without an attempt.
    deferred = EVENTS - PER_ENDPOINT
    first_stage = f"{ns.settings.retry_topic_prefix}2s"

    def deferred_records() -> list[DeliveryRecord]:
        records = [DeliveryRecord.model_validate_json(m.value()) for m in ns.read_all(first_stage)]
        sessions = {json.loads(r.body)["session_id"] for r in records}
        return records if len(sessions) >= deferred else []

    records = wait_until(deferred_records, 30, "the deferred deliveries' retry records")
    assert {r.webhook_id for r in records} == {stalled.webhook_id}, "the healthy one was deferred"
    for record in records:
        assert record.attempts_made == 0, record
        assert record.history == []
        assert record.deferrals >= 1
        assert record.first_deferred_at is not None
    # Exactly those not in the slots: the slots' deliveries were never deferred.
    sessions = {json.loads(r.body)["session_id"] for r in records}
    assert len(sessions) == deferred
    started = {json.loads(r.body)["session_id"] for r in receiver.requests_to("/stalled")}
    assert not sessions & started
    assert fine.webhook_id != stalled.webhook_id
    # One scrape for the three counts: deferrals may still be counted between two.
    scraped = proc.metrics()
    total = metric_value(scraped, "dispatcher_deferrals_total")
    # Before DISPATCHER_ENDPOINT_STALL_S without an answer it is only slow: what did
    # not fit its queue then was parked; once stalled, everything is deferred.
    stalled_n = metric_value(scraped, "dispatcher_deferrals_total", reason="endpoint_stalled")
    slow_n = metric_value(scraped, "dispatcher_deferrals_total", reason="endpoint_slow")
    assert stalled_n > 0 and total == stalled_n + slow_n
    with capsys.disabled():
        print(f"\n[isolation, same host] deferrals={total:.0f} (all of the stalled webhook)")


def test_a_backlog_waits_in_kafka_and_flows_once_the_endpoint_keeps_up(
    ns_factory: Any, receiver: HttpsReceiver, run_dispatcher: Any
) -> None:
    total = 2500
    ns: Namespace = ns_factory(
        topic_partitions=1,
        max_in_flight=4,
        max_in_flight_per_endpoint=4,
        endpoint_queue_size=4,
        partition_buffer_high=20,
        partition_buffer_low=5,
    )
    receiver.respond("/slow", Reply(200, delay_s=0.5))
    ns.subscribe(receiver.url("/slow"))
    proc = run_dispatcher(ns)
    events = stream("backlog", 0, total)
    ns.publish(*events)
    topic = ns.settings.input_topic

    def lag() -> float:
        return gauge(proc, "dispatcher_consumer_lag", topic=topic, partition="0")

    # A lag below the whole backlog is a report made after consumption started.
    wait_until(lambda: 0 < lag() < total, 30, "a lag report after consumption started")
    # The partition is paused at its high mark; what was taken before the pause took
    # effect is at most three consume batches (two handed to the loop, one waiting).
    # The rest of the backlog stays in Kafka, not in memory.
    assert lag() >= total - 3 * 500, lag()

    # Once the endpoint keeps up, the partition is resumed again and again until done.
    receiver.respond("/slow", Reply(200))
    wanted = expected_pairs(["/slow"], events)
    wait_until(lambda: not Tally.of([receiver]).missing(wanted), 120, "the whole backlog")
    wait_until(lambda: lag() == 0, 30, "the lag to come down to 0")
    wait_until(
        lambda: gauge(proc, "dispatcher_in_flight_deliveries") == 0, 10, "in-flight back to 0"
    )
    # A slow but answering endpoint is waited for, never deferred.
    assert gauge(proc, "dispatcher_deferrals_total") == 0
