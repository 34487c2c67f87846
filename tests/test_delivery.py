"""The delivery path end to end: real broker, real dispatcher process, real HTTPS receiver.

Which subscriptions an event fans out to is the engine's decision, checked
in-process in test_engine_decisions.py.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
from typing import Any

from tests.receiver import HttpsReceiver
from tests.support import SEED_EVENT, Namespace, wait_until

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
BODY_KEYS = ["event", "timestamp", "organization_id", "session_id", "visitor", "company", "session"]


def event(org: str = "org_abc123", **changes: Any) -> dict[str, Any]:
    doc = copy.deepcopy(SEED_EVENT)
    doc["organization_id"] = org
    doc.update(changes)
    return doc


def test_seed_event_arrives_signed_and_byte_identical(
    ns: Namespace, receiver: HttpsReceiver, run_dispatcher: Any
) -> None:
    signed = ns.subscribe(receiver.url("/signed"), secret=SECRET)
    unsigned = ns.subscribe(receiver.url("/unsigned"))
    run_dispatcher(ns)
    ns.publish(SEED_EVENT)

    [got] = receiver.wait_for_requests(1, path="/signed", timeout_s=30)
    [plain] = receiver.wait_for_requests(1, path="/unsigned", timeout_s=30)

    # The receiver checks the signature independently, over the raw bytes it got.
    expected = hmac.new(SECRET.encode(), got.body, hashlib.sha256).hexdigest()
    assert got.header("x-bullseye-signature") == expected
    assert got.header("content-type") == "application/json"
    assert got.header(
        "user-agent",
    ).startswith("webhook-dispatcher/")
    assert got.header("x-bullseye-attempt") == "1"
    assert got.header("x-bullseye-delivery-id") == got.header("webhook-id")
    # The body is the seed example: exactly its keys, in order, and its values.
    body = json.loads(got.body)
    assert list(body) == BODY_KEYS
    assert body == SEED_EVENT
    # Both endpoints got the very same bytes; no secret means no signature at all.
    assert plain.body == got.body
    assert plain.header("x-bullseye-signature") is None
    assert plain.header("webhook-signature") is None
    assert signed.webhook_id != unsigned.webhook_id


def test_table_is_loaded_before_the_first_event_and_followed_live(
    ns: Namespace, receiver: HttpsReceiver, run_dispatcher: Any
) -> None:
    # Many subscriptions written before start-up: all honoured for the very first event.
    early = [ns.subscribe(receiver.url(f"/early/{i}")) for i in range(20)]
    ns.publish(event(session_id="first"))
    run_dispatcher(ns)
    for sub in early:
        path = sub.url.split(str(receiver.port), 1)[1]
        receiver.wait_for_requests(1, path=path, timeout_s=30)

    # One added while running is honoured for later events.
    late = ns.subscribe(receiver.url("/late"))
    wait_until(lambda: _deliver_probe(ns, receiver, "/late"), 30, "the late subscription")

    # A tombstone stops deliveries to it.
    ns.delete(late.webhook_id)
    marker = ns.subscribe(receiver.url("/marker"))
    wait_until(lambda: _deliver_probe(ns, receiver, "/marker"), 30, "the marker subscription")
    before = len(receiver.requests_to("/late"))
    ns.publish(event(session_id="after-delete"))
    wait_until(
        lambda: any(
            json.loads(r.body)["session_id"] == "after-delete"
            for r in receiver.requests_to("/marker")
        ),
        30,
        "the event after the delete to reach the marker",
    )
    assert len(receiver.requests_to("/late")) == before
    assert marker.webhook_id


def _deliver_probe(ns: Namespace, receiver: HttpsReceiver, path: str) -> bool:
    """Publish a probe event and report whether ``path`` has received anything yet."""
    if receiver.requests_to(path):
        return True
    ns.publish(event(session_id=f"probe-{path}"))
    try:
        receiver.wait_for_requests(1, path=path, timeout_s=2)
    except TimeoutError:
        return False
    return True
