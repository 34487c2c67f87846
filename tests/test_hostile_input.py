"""Hostile input at the parsing boundaries, property-tested (no broker: fast).

Whatever an input message holds, :meth:`Catalog.parse` (what the engine calls)
returns an event whose body is JSON or raises :class:`InvalidEvent` (nothing
else); whatever a subscription record holds, it is refused or usable by the hot
path as it stands; a URL is accepted only when the HTTP client reads it the same
way.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher import metrics
from dispatcher.catalog import Catalog
from dispatcher.core.table import SubscriptionTable
from dispatcher.errors import InvalidEvent, InvalidUrl, SubscriptionError
from dispatcher.models import ParsedEvent, decode_subscription
from dispatcher.outbound.urls import normalize_url
from dispatcher.settings import Settings
from tests.hostile import (
    MAX_EVENT_BYTES,
    POISON_KINDS,
    good_event,
    json_values,
    poison_events,
    subscription_record,
    subscription_records,
    urls,
)

REASONS = {"too_large", "not_json", "invalid_event"}

#: The built-in catalog, as the engine loads it without a catalog file.
CATALOG = Catalog.load(Settings(max_event_bytes=MAX_EVENT_BYTES))
TOPIC = CATALOG.input_topics[0]


def parse_event(value: bytes | None, max_bytes: int) -> ParsedEvent:
    assert max_bytes == CATALOG.max_bytes
    return CATALOG.parse(value, TOPIC, 1_700_000_000_000)


def _strict_json(body: bytes) -> Any:
    def refuse(name: str) -> Any:
        raise AssertionError(f"{name} in a delivered body")

    return json.loads(body.decode("utf-8"), parse_constant=refuse)


def _assert_set_aside(value: bytes | None) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as caught:
        parse_event(value, MAX_EVENT_BYTES)
    exc = caught.value
    assert exc.reason in REASONS
    assert exc.detail and "\n" not in exc.detail and len(exc.detail) <= 500
    exc.detail.encode("utf-8")  # goes into a Kafka header and a log line
    return exc


# --- input events -------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(POISON_KINDS))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_every_kind_of_poison_event_is_set_aside_with_a_reason(kind: str, data: Any) -> None:
    _assert_set_aside(data.draw(POISON_KINDS[kind]))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=500), poison_events))
def test_any_bytes_give_a_json_body_or_invalid_event_never_another_exception(
    value: bytes,
) -> None:
    try:
        event = parse_event(value, MAX_EVENT_BYTES)
    except InvalidEvent as exc:
        assert exc.reason in REASONS
        return
    _strict_json(event.body)


@settings(max_examples=200, deadline=None)
@given(
    where=st.sampled_from(["visitor", "company", "session"]),
    extras=st.dictionaries(st.text(max_size=6).map(lambda k: "x_" + k), json_values, max_size=4),
)
def test_valid_events_with_any_inner_fields_are_delivered_as_sent(
    where: str, extras: dict[str, Any]
) -> None:
    doc = good_event()
    doc[where].update(extras)
    event = parse_event(json.dumps(doc).encode(), MAX_EVENT_BYTES)
    body = _strict_json(event.body)
    assert body[where] == doc[where]


ISSUE_POISON: dict[str, tuple[bytes, str]] = {
    "100,000 open brackets": (b"[" * 100_000, "nested deeper"),
    "50,000 open objects": (b'{"a":' * 50_000, "nested deeper"),
    "timestamp before year 1 in UTC": (
        json.dumps({**good_event(), "timestamp": "0001-01-01T00:00:00+01:00"}).encode(),
        "out of range",
    ),
    "integer of 4,301 digits": (
        json.dumps(good_event()).encode().replace(b'"employee_count": 500', b'"n": ' + b"7" * 4301),
        "4300 digits",
    ),
    "lone surrogate escape": (
        json.dumps(good_event()).encode().replace(b'"Jane"', b'"J\\ud800ne"'),
        "surrogate",
    ),
    "NaN in an inner field": (
        json.dumps(good_event()).encode().replace(b"500", b"NaN"),
        "NaN",
    ),
    "Infinity in an inner field": (
        json.dumps(good_event()).encode().replace(b"500", b"-Infinity"),
        "Infinity",
    ),
}


@pytest.mark.parametrize(("value", "needle"), ISSUE_POISON.values(), ids=list(ISSUE_POISON))
def test_poison_events_from_the_report_are_invalid_events_not_crashes(
    value: bytes, needle: str
) -> None:
    exc = _assert_set_aside(value)
    assert exc.reason == "invalid_event"
    assert needle in exc.detail, exc.detail


def test_json_in_utf16_is_not_json() -> None:
    # json.loads alone would guess UTF-16 and accept it; the wire format is UTF-8.
    value = json.dumps(good_event()).encode("utf-16")
    assert _assert_set_aside(value).reason == "not_json"


# --- URLs ------------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(urls)
def test_an_accepted_url_is_read_alike_by_the_http_client_and_the_url_parser(
    url: str,
) -> None:
    try:
        stored = normalize_url(url)
    except InvalidUrl as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert stored.startswith(("https://", "http://"))
    assert not any(ch.isspace() or not ch.isprintable() for ch in stored)
    assert normalize_url(stored) == stored
    parsed = httpx.URL(stored)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    assert 1 <= port <= 65535
    assert parsed.host == (urlsplit(stored).hostname or "")


REFUSED_URLS = {
    "port too high": "https://hooks.example.com:99999/x",
    "port not a number": "https://hooks.example.com:abc/x",
    "negative port": "https://hooks.example.com:-1/x",
    "port zero": "https://hooks.example.com:0/x",
    "control character in path": "https://hooks.example.com/a\x01b",
    "space in path": "https://hooks.example.com/a b",
    "not IDNA-valid": "https://☃_.example/hook",
    "bad punycode": "https://xn--n3h.example/hook",
    "empty label": "https://a..example.com/",
    "label too long": "https://" + "a" * 64 + ".example.com/",
    "backslash trick": "https://a.example\\@b.example/",
}


@pytest.mark.parametrize("url", REFUSED_URLS.values(), ids=list(REFUSED_URLS))
def test_urls_the_http_client_would_refuse_are_refused(url: str) -> None:
    with pytest.raises(InvalidUrl):
        normalize_url(url)


@pytest.mark.parametrize(
    ("url", "stored"),
    [
        ("HTTPS://hooks.example.com/x", "https://hooks.example.com/x"),
        (" https://hooks.example.com/x\n", "https://hooks.example.com/x"),
        ("https://bücher.example/x", "https://bücher.example/x"),
        ("https://[::1]:8443/x", "https://[::1]:8443/x"),
    ],
)
def test_scheme_case_and_surrounding_space_are_normalized(url: str, stored: str) -> None:
    assert normalize_url(url) == stored


# --- subscription records --------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(subscription_records)
def test_a_subscription_record_is_refused_or_usable_by_the_hot_path(value: bytes) -> None:
    try:
        sub = decode_subscription(None, value)
    except SubscriptionError as exc:
        assert "\n" not in str(exc)
        return
    assert normalize_url(sub.url) == sub.url
    httpx.URL(sub.url).host  # noqa: B018 - the client reads it without raising
    for secret in sub.active_secrets(datetime.now(UTC)):
        secret.encode("utf-8")
    for moment in (sub.created_at, sub.updated_at, *(p.expires_at for p in sub.previous_secrets)):
        assert moment.utcoffset() is not None
    assert decode_subscription(None, sub.to_json()) == sub


def _invalid_count() -> float:
    return (
        metrics.REGISTRY.get_sample_value(
            "dispatcher_invalid_subscriptions_total", {"reason": "invalid"}
        )
        or 0.0
    )


def test_the_table_skips_an_undeliverable_record_counts_it_and_keeps_the_last_good_one() -> None:
    table = SubscriptionTable(Settings())
    before = _invalid_count()
    table._apply(b"wh_1", subscription_record("wh_1", "https://hooks.example.com/x"))
    table._apply(b"wh_1", subscription_record("wh_1", "https://hooks.example.com:99999/x"))
    table._apply(b"wh_2", subscription_record("wh_2", "https://☃_.example/hook"))
    table._apply(b"wh_3", subscription_record("wh_3", "HTTPS://hooks.example.com/three"))
    assert _invalid_count() - before == 2
    assert table.invalid_records == 2
    subs = {s.webhook_id: s.url for s in table.for_organization("org_1")}
    assert subs == {
        "wh_1": "https://hooks.example.com/x",
        "wh_3": "https://hooks.example.com/three",
    }


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=20) | st.none(), subscription_records | st.none())
def test_the_table_reader_survives_any_record(key: bytes | None, value: bytes | None) -> None:
    table = SubscriptionTable(Settings())
    table._apply(key, value)
    for sub in table.all():
        assert normalize_url(sub.url) == sub.url
        httpx.URL(sub.url).host  # noqa: B018 - the client reads it without raising
