"""Writes the broker refuses for good, against the real broker.

A topic is given a small ``max.message.bytes`` to provoke ``MSG_SIZE_TOO_LARGE``:
the send fails at once instead of being retried forever; an invalid-event write
still lands (without what does not fit); a retry hand-over that cannot land
leaves its message unfinished, is counted, and turns the service not ready.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any

import pytest

from dispatcher.core.invalid import H_INVALID_DROPPED, H_INVALID_REASON
from dispatcher.core.producer import AsyncProducer
from dispatcher.errors import ProduceRefused
from dispatcher.records import H_SOURCE, header_value
from dispatcher.stages import retry_stages
from tests.receiver import HttpsReceiver, Reply
from tests.streams import committed_events, make_event
from tests.support import Namespace, limit_record_size, metric_value, wait_until

#: Records are compressed: what they hold is random, so that they stay this large.
LIMIT = 1200


def test_a_record_too_large_for_its_topic_fails_the_send(ns: Namespace) -> None:
    topic = ns.settings.invalid_topic
    limit_record_size(topic, LIMIT)

    async def scenario() -> ProduceRefused:
        producer = AsyncProducer(ns.settings, asyncio.get_running_loop())
        try:
            with pytest.raises(ProduceRefused) as refused:
                await asyncio.wait_for(producer.send(topic, os.urandom(5000), b"k"), 60)
            # The producer goes on: a record that fits is written.
            await asyncio.wait_for(producer.send(topic, b"small", b"k"), 60)
            return refused.value
        finally:
            await asyncio.to_thread(producer.close)

    error = asyncio.run(scenario())
    assert error.too_large and error.name == "MSG_SIZE_TOO_LARGE" and error.topic == topic
    assert [m.value() for m in ns.read_all(topic)] == [b"small"]


def test_a_record_nobody_waits_for_is_logged_when_refused(
    ns: Namespace, caplog: pytest.LogCaptureFixture
) -> None:
    # Attempt records go through a producer that reports failures only: a refused
    # one is logged, and the producer goes on.
    topic = ns.settings.attempts_topic
    limit_record_size(topic, LIMIT)
    caplog.set_level(logging.WARNING, logger="dispatcher.core.producer")

    def refusals() -> list[str]:
        return [r.getMessage() for r in caplog.records if "not written" in r.getMessage()]

    async def scenario() -> None:
        producer = AsyncProducer(ns.settings, asyncio.get_running_loop())
        try:
            producer.produce_nowait(topic, os.urandom(5000), b"k")
            await asyncio.to_thread(wait_until, refusals, 30, "the refusal logged")
            # Written on its own: a batch with the refused record would fail with it.
            producer.produce_nowait(topic, b"small", b"k")
        finally:
            await asyncio.to_thread(producer.close)

    asyncio.run(scenario())
    [line] = refusals()
    assert line.startswith(f"record for {topic} not written:") and "too large" in line.lower()
    assert [m.value() for m in ns.read_all(topic)] == [b"small"]


def test_an_invalid_event_too_large_for_the_invalid_topic_still_lands(
    ns_factory: Any, receiver: HttpsReceiver, run_dispatcher: Any
) -> None:
    ns: Namespace = ns_factory(max_event_bytes=2000, topic_partitions=1)
    limit_record_size(ns.settings.invalid_topic, LIMIT)
    ns.subscribe(receiver.url("/hook"))
    big = json.dumps({**make_event("big"), "pad": os.urandom(1500).hex()}).encode()
    ns.publish(make_event("before"))
    ns.publish(big, key=b"visitor-1")
    ns.publish(make_event("after"))
    proc = run_dispatcher(ns)

    wait_until(lambda: len(receiver.requests_to("/hook")) == 2, 60, "both good events")
    # The good events may be delivered before the invalid-topic write is acknowledged.
    [landed] = wait_until(
        lambda: ns.read_all(ns.settings.invalid_topic), 30, "the event in the invalid topic"
    )
    headers = landed.headers()
    assert header_value(headers, H_INVALID_REASON) == b"too_large"
    assert header_value(headers, H_SOURCE) == f"{ns.settings.input_topic}/0/1".encode()
    dropped = header_value(headers, H_INVALID_DROPPED)
    assert dropped == f"value of {len(big)} bytes: too large for the topic".encode()
    assert landed.value() is None and landed.key() == b"visitor-1"
    wait_until(lambda: committed_events(ns) == 3, 30, "the partition's commit to reach its end")
    assert proc.readyz()[0] == 200
    topic = ns.settings.invalid_topic
    refused = metric_value(
        proc.metrics(), "dispatcher_produce_refused_total", topic=topic, error="MSG_SIZE_TOO_LARGE"
    )
    assert refused == 1


def test_a_refused_hand_over_turns_the_service_not_ready(
    ns_factory: Any, receiver: HttpsReceiver, run_dispatcher: Any
) -> None:
    ns: Namespace = ns_factory(topic_partitions=1)
    first = retry_stages(ns.settings)[0].topic
    limit_record_size(first, 500)  # smaller than any retry record of a sample event
    ns.subscribe(receiver.url("/down"))
    receiver.respond("/down", Reply(500, body=b"z" * 2000))
    proc = run_dispatcher(ns)
    ns.publish(make_event("refused"))

    _, why = wait_until(
        lambda: r if (r := proc.readyz())[0] == 503 else None, 60, "the service to turn not ready"
    )
    assert f"a write to {first} was refused: MSG_SIZE_TOO_LARGE" in why
    assert "restart" in why
    text = proc.metrics()
    assert metric_value(text, "dispatcher_produce_refused_total", topic=first) == 1
    assert "hand-over refused for good" in proc.logs()
    # Not retried in a loop, not committed past: the message waits for a restart.
    assert len(receiver.requests_to("/down")) == 1
    assert committed_events(ns) == 0
    assert ns.read_all(first, timeout_s=2) == []
