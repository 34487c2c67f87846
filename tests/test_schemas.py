"""The JSON Schemas under schemas/ and the pydantic models agree, on good and bad input."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from dispatcher.errors import InvalidEvent
from dispatcher.models import Subscription, parse_event
from dispatcher.records import DeliveryRecord
from tests.support import SEED_EVENT

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"


def schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / name).read_text())


def event_valid_for_both(doc: Any) -> tuple[bool, bool]:
    by_schema = jsonschema.Draft202012Validator(schema("visitor-identified.schema.json"))
    schema_ok = by_schema.is_valid(doc)
    try:
        parse_event(json.dumps(doc).encode(), 1_000_000)
        model_ok = True
    except InvalidEvent:
        model_ok = False
    return schema_ok, model_ok


def test_seed_example_is_valid_for_schema_and_model() -> None:
    assert event_valid_for_both(SEED_EVENT) == (True, True)


def _without(key: str) -> dict[str, Any]:
    doc = copy.deepcopy(SEED_EVENT)
    del doc[key]
    return doc


def _with(path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(SEED_EVENT)
    *parents, last = path.split(".")
    target = doc
    for part in parents:
        target = target[part]
    target[last] = value
    return doc


INVALID_EVENTS = {
    "missing event": _without("event"),
    "missing timestamp": _without("timestamp"),
    "missing organization_id": _without("organization_id"),
    "missing session_id": _without("session_id"),
    "missing visitor": _without("visitor"),
    "missing company": _without("company"),
    "missing session": _without("session"),
    "event not a name": _with("event", "Visitor Identified"),
    "timestamp not a date": _with("timestamp", "yesterday"),
    "timestamp without zone": _with("timestamp", "2025-01-15T10:30:00"),
    "empty organization": _with("organization_id", ""),
    "organization a number": _with("organization_id", 42),
    "visitor not an object": _with("visitor", "jane"),
    "employee_count a string": _with("company.employee_count", "500"),
    "employee_count negative": _with("company.employee_count", -1),
    "pages_visited not a list": _with("session.pages_visited", "/pricing"),
    "email a number": _with("visitor.email", 7),
}


@pytest.mark.parametrize("name", sorted(INVALID_EVENTS))
def test_invalid_event_variants_fail_schema_and_model(name: str) -> None:
    assert event_valid_for_both(INVALID_EVENTS[name]) == (False, False)


@pytest.mark.parametrize(
    "doc",
    [
        _with("visitor.email", None),
        _with("company", {}),
        _with("session.pages_visited", None),
        _with("visitor.favourite_colour", "green"),
        _with("timestamp", "2025-01-15T12:30:00+02:00"),
    ],
    ids=["null inner field", "empty inner object", "null list", "extra inner field", "offset"],
)
def test_unknown_or_null_inner_fields_are_accepted_by_both(doc: dict[str, Any]) -> None:
    assert event_valid_for_both(doc) == (True, True)


def test_body_keeps_inner_extras_drops_top_level_extras_and_normalises_time() -> None:
    doc = _with("visitor.favourite_colour", "green")
    doc["internal_routing"] = "x"
    doc["timestamp"] = "2025-01-15T12:30:00+02:00"
    body = json.loads(parse_event(json.dumps(doc).encode(), 1_000_000).body)
    assert body["visitor"]["favourite_colour"] == "green"
    assert "internal_routing" not in body
    assert body["timestamp"] == "2025-01-15T10:30:00Z"


def _subscription_doc() -> dict[str, Any]:
    now = datetime.now(UTC).isoformat()
    return {
        "webhook_id": "wh_1",
        "organization_id": "org_abc123",
        "url": "https://hooks.example.com/bullseye",
        "events": ["visitor.identified"],
        "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "previous_secrets": [],
        "enabled": True,
        "plan": "scale",
        "created_at": now,
        "updated_at": now,
    }


def subscription_valid_for_both(doc: dict[str, Any]) -> tuple[bool, bool]:
    validator = jsonschema.Draft202012Validator(
        schema("subscription.schema.json"), format_checker=jsonschema.FormatChecker()
    )
    try:
        Subscription.model_validate_json(json.dumps(doc))
        model_ok = True
    except ValueError:
        model_ok = False
    return validator.is_valid(doc), model_ok


def test_subscription_record_agrees() -> None:
    doc = _subscription_doc()
    assert subscription_valid_for_both(doc) == (True, True)
    for key, value in {
        "url": "ftp://hooks.example.com",
        "events": [],
        "secret": "short",
        "webhook_id": "has space",
        "unexpected": 1,
    }.items():
        bad = dict(doc, **{key: value})
        assert subscription_valid_for_both(bad) == (False, False), key
    for key in ("organization_id", "url", "events", "plan"):
        bad = dict(doc)
        del bad[key]
        assert subscription_valid_for_both(bad) == (False, False), key


def test_subscription_rate_limit_agrees() -> None:
    doc = _subscription_doc()
    for good in (5, 0.5, None, 10_000):
        assert subscription_valid_for_both(dict(doc, rate_limit_per_s=good)) == (True, True), good
    for bad in (0, -1, 10_001, "5", True):
        assert subscription_valid_for_both(dict(doc, rate_limit_per_s=bad)) == (False, False), bad


def test_record_without_rate_limit_is_what_earlier_versions_wrote() -> None:
    """Unset, the field is not written: a reader that forbids unknown fields (the
    version before it) still reads the record during a rolling upgrade."""
    sub = Subscription.model_validate_json(json.dumps(_subscription_doc()))
    assert "rate_limit_per_s" not in json.loads(sub.to_json())
    limited = sub.model_copy(update={"rate_limit_per_s": 5.0})
    written = json.loads(limited.to_json())
    assert written["rate_limit_per_s"] == 5.0
    assert Subscription.model_validate_json(limited.to_json()).rate_limit_per_s == 5.0


def test_delivery_record_model_output_matches_schema() -> None:
    record = DeliveryRecord(
        delivery_id="msg_1",
        webhook_id="wh_1",
        organization_id="org_abc123",
        event="visitor.identified",
        event_timestamp=datetime.now(UTC),
        body=json.dumps(SEED_EVENT),
        attempts_made=0,
        source={"topic": "visitor.identified", "partition": 0, "offset": 5},  # type: ignore[arg-type]
    )
    validator = jsonschema.Draft202012Validator(schema("delivery-record.schema.json"))
    validator.validate(json.loads(record.to_json()))
    bad = json.loads(record.to_json())
    bad["secret"] = "whsec_x"
    assert not validator.is_valid(bad)
    with pytest.raises(ValueError):
        DeliveryRecord.model_validate(bad)


def test_attempt_record_model_output_matches_schema() -> None:
    from dispatcher.attempts import AttemptRecord

    record = AttemptRecord(
        delivery_id="msg_1",
        webhook_id="wh_1",
        organization_id="org_abc123",
        event="visitor.identified",
        session_id="sess_1",
        event_timestamp=datetime.now(UTC),
        source={"topic": "visitor.identified", "partition": 0, "offset": 5},  # type: ignore[arg-type]
        attempt=1,
        stage="input",
        at=datetime.now(UTC),
        duration_ms=12.5,
        status_code=500,
        error_class="http",
        response_snippet="oops",
        next_retry_at=datetime.now(UTC),
        circuit="open",
        request_headers={"X-Bullseye-Signature": "ab12"},
        body=json.dumps(SEED_EVENT),
    )
    validator = jsonschema.Draft202012Validator(
        schema("attempt-record.schema.json"), format_checker=jsonschema.FormatChecker()
    )
    validator.validate(json.loads(record.to_json()))
    # A record of an earlier release, without the circuit, still reads.
    older = json.loads(record.to_json())
    del older["circuit"]
    validator.validate(older)
    assert AttemptRecord.model_validate(older).circuit is None
    for key, value in {"secret": "whsec_x", "circuit": "ajar"}.items():
        bad = dict(json.loads(record.to_json()), **{key: value})
        assert not validator.is_valid(bad), key
        with pytest.raises(ValueError):
            AttemptRecord.model_validate(bad)


def test_attempt_records_as_the_dispatcher_writes_them_match_the_schema() -> None:
    from types import SimpleNamespace

    from dispatcher.attempts import AttemptRecord, attempt_json, session_of
    from dispatcher.core.attempt_log import attempt_doc
    from dispatcher.core.breaker import State
    from dispatcher.core.routing import NextHop
    from dispatcher.models import parse_event
    from dispatcher.outbound.delivery import AttemptResult, build_headers
    from dispatcher.records import Source
    from dispatcher.stages import RetryStage

    body = parse_event(json.dumps(SEED_EVENT).encode(), 1 << 20).body
    assert session_of(body) == SEED_EVENT["session_id"]
    assert session_of(b'{"event":"x","session_id":"a\\"b"}') == 'a"b'
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    delivery = SimpleNamespace(
        delivery_id="msg_1",
        sub=SimpleNamespace(webhook_id="wh_1", organization_id="org_abc123"),
        event="visitor.identified",
        body=body,
        event_time=datetime.now(UTC),
        source=Source(topic="visitor.identified", partition=0, offset=5),
        stage="1m",
    )
    validator = jsonschema.Draft202012Validator(
        schema("attempt-record.schema.json"), format_checker=jsonschema.FormatChecker()
    )
    failed = AttemptResult(ok=False, duration_s=0.5, error_class="timeout", error="timed out")
    http_500 = AttemptResult(
        ok=False,
        duration_s=0.000012,
        status_code=500,
        error_class="http",
        error="HTTP 500",
        snippet='é \u2028 "quoted" \x00\x7f </tag> \\',
    )
    circuits = {1: State.CLOSED, 2: State.OPEN, 3: State.HALF_OPEN, 4: None}
    for attempt, result, hop in (
        (1, AttemptResult(ok=True, duration_s=0.01, status_code=200, snippet=""), None),
        (2, failed, NextHop(RetryStage(1, "5m", "t", 300), 1_790_000_000_000)),
        (3, http_500, NextHop(RetryStage(2, "30m", "t", 1800), 1_790_000_000_123)),
        (4, failed, NextHop(None, 0)),
    ):
        headers = build_headers("msg_1", attempt, body, [secret])
        circuit = circuits[attempt]
        record = attempt_doc(delivery, attempt, headers, result, hop, circuit=circuit)  # type: ignore[arg-type]
        out = attempt_json(record)
        # The same bytes as the model writes for the validated record.
        assert out == AttemptRecord.model_validate(record).to_json()
        doc = json.loads(out)
        validator.validate(doc)
        assert secret.encode() not in out and secret[6:].encode() not in out
        assert doc["request_headers"]["X-Bullseye-Attempt"] == str(attempt)
        assert ("body" in doc) == (attempt == 1)
        assert doc["dead_lettered"] == (attempt == 4)
        assert ("next_retry_at" in doc) == (attempt in (2, 3))
        assert doc.get("circuit") == (None if circuit is None else circuit.value)


def test_attempt_records_leave_out_credential_headers_whatever_was_recorded_before() -> None:
    from types import SimpleNamespace

    from dispatcher.attempts import session_of
    from dispatcher.core.attempt_log import attempt_doc
    from dispatcher.outbound.delivery import AttemptResult, build_headers
    from dispatcher.records import Source

    # A lone surrogate escape, which orjson refuses, is still read back.
    assert session_of(b'{"event":"x","session_id":"a\\ud800"}') == "a\ud800"
    assert session_of(b'{"event":"x","session_id":"a"') == "a"
    assert session_of(b'{"event":"x"}') is None
    delivery = SimpleNamespace(
        delivery_id="msg_1",
        sub=SimpleNamespace(webhook_id="wh_1", organization_id="org_abc123"),
        event="visitor.identified",
        body=b"{}",
        event_time=datetime.now(UTC),
        source=Source(topic="visitor.identified", partition=0, offset=5),
        stage="1m",
    )
    result = AttemptResult(ok=True, duration_s=0.01, status_code=200)
    plain = build_headers("msg_1", 1, b"{}", ["s3cret"])
    for _ in range(2):  # the second time, the names' verdict is remembered
        doc = attempt_doc(delivery, 1, plain, result, None)  # type: ignore[arg-type]
        assert doc["request_headers"] == plain and doc["request_headers"] is not plain
        for name in ("Authorization", "cookie", "Proxy-Authorization"):
            headers = {**plain, name: "Bearer s3cret"}
            doc = attempt_doc(delivery, 1, headers, result, None)  # type: ignore[arg-type]
            assert doc["request_headers"] == plain


def test_notification_model_output_matches_schema() -> None:
    from dispatcher.webhook_health import Notification, notice_id

    at = datetime.now(UTC)
    notice = Notification(
        id=notice_id("webhook.disabled", "wh_1", at),
        type="webhook.disabled",
        webhook_id="wh_1",
        organization_id="org_abc123",
        at=at,
        consecutive_failures=12,
        failing_since=at,
        last_error="http 500",
        circuit_open_since=at,
        reason="failing",
    )
    validator = jsonschema.Draft202012Validator(
        schema("notification.schema.json"), format_checker=jsonschema.FormatChecker()
    )
    validator.validate(json.loads(notice.to_json()))
    validator.validate(json.loads(notice.model_copy(update={"circuit_open_since": None}).to_json()))
    for key, value in {
        "type": "webhook.gone",
        "id": "x",
        "extra": 1,
        "circuit_open_since": "yesterday",
    }.items():
        bad = dict(json.loads(notice.to_json()), **{key: value})
        assert not validator.is_valid(bad), key
        with pytest.raises(ValueError):
            Notification.model_validate(bad)


def test_disabled_subscription_record_agrees_and_an_enabled_one_omits_the_fields() -> None:
    doc = _subscription_doc()
    off = dict(doc, enabled=False, disabled_reason="failing", disabled_at="2026-01-01T00:00:00Z")
    assert subscription_valid_for_both(off) == (True, True)
    assert subscription_valid_for_both(dict(off, disabled_reason="bored")) == (False, False)
    # An enabled webhook's record is what earlier versions wrote (they forbid unknown keys).
    written = json.loads(Subscription.model_validate(doc).to_json())
    assert "disabled_reason" not in written and "disabled_at" not in written


def test_backlog_snapshot_model_output_matches_schema() -> None:
    from dispatcher.backlog import BacklogSnapshot, snapshot

    snap = snapshot("dispatcher-0", 5.0, {"wh_1": 12, "wh_2": 0, "wh_3": 1})
    validator = jsonschema.Draft202012Validator(
        schema("backlog-snapshot.schema.json"), format_checker=jsonschema.FormatChecker()
    )
    doc = json.loads(snap.to_json())
    validator.validate(doc)
    assert doc["webhooks"] == {"wh_1": 12, "wh_3": 1}
    for bad in (
        {k: v for k, v in doc.items() if k != "every_s"},
        dict(doc, every_s=0),
        dict(doc, at="yesterday"),
    ):
        assert not validator.is_valid(bad), bad
        with pytest.raises(ValueError):
            BacklogSnapshot.model_validate(bad)
