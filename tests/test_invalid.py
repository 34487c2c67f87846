"""Unusable input lands, bytes and key intact, in the invalid-events topic; the rest flows."""

from __future__ import annotations

import json
from typing import Any

from confluent_kafka import Producer

from dispatcher.records import header_value
from tests.receiver import HttpsReceiver
from tests.streams import Tally, expected_pairs, gauge, make_event, stream
from tests.support import BOOTSTRAP, Namespace, wait_until

MAX_EVENT_BYTES = 2048


def _without(field: str) -> bytes:
    doc = make_event("bad-missing")
    del doc[field]
    return json.dumps(doc).encode()


def _oversized() -> bytes:
    doc = make_event("bad-large")
    doc["visitor"]["notes"] = "x" * MAX_EVENT_BYTES  # valid in every other way
    return json.dumps(doc).encode()


#: key -> (value, reason); a None value is a tombstone.
INVALID: dict[bytes, tuple[bytes | None, str]] = {
    b"k-not-json": (b"{this is not json", "not_json"),
    b"k-not-utf8": (b"\xff\xfe\x00binary", "not_json"),
    b"k-array": (b'["visitor.identified"]', "invalid_event"),
    b"k-number": (b"42", "invalid_event"),
    b"k-missing": (_without("organization_id"), "invalid_event"),
    b"k-type": (
        json.dumps({**make_event("bad-type"), "visitor": "not an object"}).encode(),
        "invalid_event",
    ),
    b"k-timestamp": (
        json.dumps({**make_event("bad-ts"), "timestamp": "yesterday"}).encode(),
        "invalid_event",
    ),
    b"k-large": (_oversized(), "too_large"),
    b"k-tombstone": (None, "invalid_event"),
}


def test_each_kind_of_invalid_input_is_set_aside_and_valid_events_still_flow(
    ns_factory: Any, receiver: HttpsReceiver, run_dispatcher: Any
) -> None:
    ns: Namespace = ns_factory(max_event_bytes=MAX_EVENT_BYTES)
    ns.subscribe(receiver.url("/hook"))
    proc = run_dispatcher(ns)

    producer = Producer({"bootstrap.servers": BOOTSTRAP, "enable.idempotence": True})
    # Everything on one partition, so the valid events come after the invalid ones.
    valid = stream("ok", 0, 20)
    for key, (value, _reason) in INVALID.items():
        producer.produce(ns.settings.input_topic, value, key, partition=0)
    for doc in valid:
        producer.produce(ns.settings.input_topic, json.dumps(doc).encode(), b"k-ok", partition=0)
    assert producer.flush(30) == 0

    wanted = expected_pairs(["/hook"], valid)
    wait_until(lambda: not Tally.of([receiver]).missing(wanted), 60, "the valid events")

    def set_aside() -> list[Any]:
        records = ns.read_all(ns.settings.invalid_topic)
        return records if len(records) >= len(INVALID) else []

    records = wait_until(set_aside, 30, "every invalid message in the invalid-events topic")
    assert len(records) == len(INVALID)
    by_key = {m.key(): m for m in records}
    assert set(by_key) == set(INVALID)
    offsets = []
    for key, (value, reason) in INVALID.items():
        msg = by_key[key]
        assert msg.value() == value, key  # bytes intact, a tombstone stays a tombstone
        headers = msg.headers()
        assert header_value(headers, "dispatcher-invalid-reason") == reason.encode(), key
        detail = header_value(headers, "dispatcher-invalid-detail")
        assert detail, key
        source = header_value(headers, "dispatcher-source")
        assert source is not None
        topic, partition, offset = source.decode().rsplit("/", 2)
        assert (topic, partition) == (ns.settings.input_topic, "0"), source
        offsets.append(int(offset))
    # Each points at its own input message, in the order they were written.
    assert offsets == sorted(offsets) and len(set(offsets)) == len(INVALID)
    assert json.loads(by_key[b"k-missing"].value() or b"")["session_id"] == "bad-missing"
    assert b"organization_id" in (
        header_value(by_key[b"k-missing"].headers(), "dispatcher-invalid-detail") or b""
    )

    text = proc.metrics()
    for reason in ("not_json", "invalid_event", "too_large"):
        count = sum(1 for _v, r in INVALID.values() if r == reason)
        assert gauge(proc, "dispatcher_invalid_events_total", reason=reason) == count, text
    # Nothing of the invalid input reached the endpoint, and nothing is left in flight.
    assert {json.loads(r.body)["session_id"] for r in receiver.requests} == {
        str(doc["session_id"]) for doc in valid
    }
    wait_until(
        lambda: gauge(proc, "dispatcher_in_flight_deliveries") == 0, 10, "in-flight back to 0"
    )
