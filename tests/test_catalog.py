"""Event types from the catalog: a second type flows end to end by configuration alone."""

from __future__ import annotations

import base64
import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from hypothesis import given, settings
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook

from dispatcher.catalog import Catalog, load_catalog
from dispatcher.commands.topics import topic_specs
from dispatcher.errors import ConfigError, InvalidEvent
from dispatcher.records import header_value
from dispatcher.settings import Settings
from tests.hostile import MAX_EVENT_BYTES, json_values, poison_events
from tests.receiver import HttpsReceiver
from tests.streams import make_event
from tests.support import BOOTSTRAP, Namespace, wait_until

RETURNED_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["event", "organization_id", "visits"],
    "properties": {
        "event": {"const": "visitor.returned"},
        "organization_id": {"type": "string"},
        "visits": {"type": "integer", "minimum": 2},
    },
}


def write_catalog(folder: Path, prefix: str, schema: Any = RETURNED_SCHEMA) -> Path:
    (folder / "identified.schema.json").write_text('{"type": "object"}')
    (folder / "returned.schema.json").write_text(json.dumps(schema))
    path = folder / "catalog.json"
    entries = [
        ("visitor.identified", "identified.schema.json", f"{prefix}.visitor.identified"),
        ("visitor.returned", "returned.schema.json", f"{prefix}.visitor.returned"),
    ]
    path.write_text(
        json.dumps(
            [
                {"name": n, "description": f"{n}.", "schema_file": f, "input_topic": t}
                for n, f, t in entries
            ]
        )
    )
    return path


@pytest.mark.parametrize(
    ("catalog", "schema", "error"),
    [
        ("[]", RETURNED_SCHEMA, "lists no event type"),
        ("{not json", RETURNED_SCHEMA, "Expecting property name"),
        (None, {"type": "no-such-type"}, "returned.schema.json is not a JSON Schema"),
    ],
)
def test_a_bad_catalog_is_one_line_naming_the_file(
    tmp_path: Path, catalog: str | None, schema: Any, error: str
) -> None:
    path = write_catalog(tmp_path, "p", schema)
    if catalog is not None:
        path.write_text(catalog)
    with pytest.raises(ConfigError, match=error) as raised:
        load_catalog(Settings(event_catalog_file=str(path)))
    assert str(raised.value).startswith(f"DISPATCHER_EVENT_CATALOG_FILE: {path}: ")
    assert "\n" not in str(raised.value)


def test_a_catalog_input_topic_may_not_be_another_dispatcher_topic(tmp_path: Path) -> None:
    path = write_catalog(tmp_path, "p")
    settings = Settings(event_catalog_file=str(path), invalid_topic="p.visitor.returned")
    with pytest.raises(ConfigError, match=r"also another dispatcher topic: p\.visitor\.returned"):
        topic_specs(settings)


def test_events_are_checked_by_the_type_they_name(tmp_path: Path) -> None:
    settings = Settings(event_catalog_file=str(write_catalog(tmp_path, "p")))
    catalog = Catalog.load(settings)
    assert catalog.input_topics == ("p.visitor.identified", "p.visitor.returned")
    returned = {"event": "visitor.returned", "organization_id": "o", "visits": 3, "x": "é"}
    event = catalog.parse(json.dumps(returned).encode(), "p.visitor.returned", 1_000)
    assert (event.event, event.organization_id) == ("visitor.returned", "o")
    assert json.loads(event.body) == returned  # sent as published, with unknown fields
    assert event.occurred_at.timestamp() == 1.0  # no timestamp: the message's time
    shipped = catalog.parse(json.dumps(make_event("s")).encode(), "p.visitor.returned", 0)
    assert shipped.event == "visitor.identified"  # by its model, whatever its topic
    refused = [
        ({**returned, "visits": 1}, "visits: 1 is less than the minimum of 2"),
        ({**returned, "organization_id": ""}, "organization_id"),
        ({**returned, "timestamp": "yesterday"}, "timestamp"),
        ({**returned, "event": "visitor.left"}, "'visitor.left' is not in the catalog"),
    ]
    for doc, why in refused:
        with pytest.raises(InvalidEvent, match=why):
            catalog.parse(json.dumps(doc).encode(), "p.visitor.returned", 0)


def _returned_events(extras: dict[str, Any], visits: Any, stamp: Any) -> bytes:
    doc = {"event": "visitor.returned", "organization_id": "o", "visits": visits, **extras}
    if stamp is not None:
        doc["timestamp"] = stamp
    return json.dumps(doc).encode()


hostile_returned = st.builds(
    _returned_events,
    st.dictionaries(st.text(max_size=6).map(lambda k: "x_" + k), json_values, max_size=4),
    st.one_of(st.integers(), json_values),
    st.one_of(st.none(), st.text(max_size=30), json_values),
)


@pytest.fixture(scope="module")
def returned_catalog(tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    path = write_catalog(tmp_path_factory.mktemp("catalog"), "p")
    return Catalog.load(Settings(event_catalog_file=str(path), max_event_bytes=MAX_EVENT_BYTES))


@settings(max_examples=300, deadline=None)
@given(value=st.one_of(st.binary(max_size=300), poison_events, hostile_returned))
def test_any_bytes_on_a_schema_topic_give_a_json_body_or_invalid_event(
    returned_catalog: Catalog, value: bytes
) -> None:
    catalog = returned_catalog
    try:
        event = catalog.parse(value, "p.visitor.returned", 0)
    except InvalidEvent as exc:
        assert exc.reason in ("too_large", "not_json", "invalid_event")
        assert exc.detail and "\n" not in exc.detail
        exc.detail.encode("utf-8")  # goes into a Kafka header and a log line
        return
    body = json.loads(event.body.decode("utf-8"))  # strict JSON, UTF-8
    assert body["event"] in ("visitor.returned", "visitor.identified")
    assert isinstance(body["organization_id"], str) and body["organization_id"]


def test_a_second_event_type_is_delivered_by_configuration(
    tmp_path: Path, ns_factory: Any, receiver: HttpsReceiver, run_dispatcher: Any
) -> None:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    returned_topic = f"{prefix}.visitor.returned"
    ns: Namespace = ns_factory(
        input_topic=f"{prefix}.visitor.identified",
        event_catalog_file=str(write_catalog(tmp_path, prefix)),
    )
    # `topics ensure` (run by the namespace) created the second type's input topic.
    meta = AdminClient({"bootstrap.servers": BOOTSTRAP}).list_topics(timeout=10)
    assert len(meta.topics[returned_topic].partitions) == ns.settings.topic_partitions
    secret = "whsec_" + base64.b64encode(os.urandom(24)).decode()
    org = "org_catalog"
    ns.subscribe(
        receiver.url("/returned"), organization_id=org, events=["visitor.returned"], secret=secret
    )
    ns.subscribe(receiver.url("/identified"), organization_id=org, secret=secret)
    run_dispatcher(ns)

    good = {"event": "visitor.returned", "organization_id": org, "visits": 4, "page": "/pricing"}
    bad = {**good, "visits": "many"}
    producer = Producer({"bootstrap.servers": BOOTSTRAP, "enable.idempotence": True})
    producer.produce(returned_topic, json.dumps(bad).encode(), b"k-bad", partition=0)
    producer.produce(returned_topic, json.dumps(good).encode(), b"k-good", partition=0)
    assert producer.flush(30) == 0
    ns.publish(make_event("still-flows", org))

    (returned,) = receiver.wait_for_requests(1, "/returned", timeout_s=60)
    Webhook(secret).verify(returned.body, dict(returned.headers))
    assert json.loads(returned.body) == good
    (identified,) = receiver.wait_for_requests(1, "/identified", timeout_s=60)
    Webhook(secret).verify(identified.body, dict(identified.headers))
    assert json.loads(identified.body)["session_id"] == "still-flows"

    (invalid,) = wait_until(
        lambda: ns.read_all(ns.settings.invalid_topic), 30, "the bad event set aside"
    )
    assert (invalid.key(), invalid.value()) == (b"k-bad", json.dumps(bad).encode())
    assert header_value(invalid.headers(), "dispatcher-invalid-reason") == b"invalid_event"
    assert b"visits" in (header_value(invalid.headers(), "dispatcher-invalid-detail") or b"")
    source = header_value(invalid.headers(), "dispatcher-source") or b""
    assert source.decode().startswith(f"{returned_topic}/0/")
    # Each subscription got its own type only.
    assert len(receiver.requests) == 2
