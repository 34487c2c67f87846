"""Delivery history through ``dispatcher api``, with ``dispatcher run`` delivering for real."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

import httpx

from dispatcher.attempts import AttemptRecord
from tests.api_support import ORG, ApiProcess
from tests.receiver import HttpsReceiver, Reply
from tests.support import SEED_EVENT, DispatcherProcess, Namespace, metric_value, wait_until


def event(session_id: str) -> dict[str, Any]:
    doc = copy.deepcopy(SEED_EVENT)
    doc["organization_id"] = ORG
    doc["session_id"] = session_id
    return doc


def create(http: httpx.Client, url: str) -> dict[str, Any]:
    assert http.put(f"/v1/organizations/{ORG}/plan", json={"plan": "scale"}).status_code == 200
    made = http.post(f"/v1/organizations/{ORG}/webhooks", json={"url": url})
    assert made.status_code == 201, made.text
    return dict(made.json())


def deliveries(http: httpx.Client, webhook_id: str, **params: str) -> list[dict[str, Any]]:
    r = http.get(f"/v1/organizations/{ORG}/webhooks/{webhook_id}/deliveries", params=params)
    assert r.status_code == 200, r.text
    return list(r.json()["data"])


def test_history_of_a_success_a_failure_and_a_resend(
    ns: Namespace,
    run_api: Callable[..., ApiProcess],
    run_dispatcher: Callable[..., DispatcherProcess],
    receiver: HttpsReceiver,
) -> None:
    dispatcher = run_dispatcher(ns)
    api = run_api(ns)
    http = api.admin()
    good = create(http, receiver.url("/good"))
    bad = create(http, receiver.url("/bad"))
    secrets = [good["secret"], bad["secret"]]
    receiver.respond("/bad", Reply(500, body=b"database down"))
    # The API answers once it has read its change back; the dispatcher's table reads
    # it on its own time: an event published before would find no webhook.
    wait_until(
        lambda: metric_value(dispatcher.metrics(), "dispatcher_subscriptions_loaded") == 2,
        30,
        "the dispatcher to load both webhooks",
    )

    ns.publish(event("sess_one"))
    # The delivery and its attempt appear through the API.
    found = wait_until(
        lambda: deliveries(http, good["id"], status="succeeded"), 30, "the good delivery"
    )
    assert [d["session_id"] for d in found] == ["sess_one"]
    got = receiver.wait_for_requests(1, path="/good")[0]
    one = http.get(
        f"/v1/organizations/{ORG}/webhooks/{good['id']}/deliveries/{found[0]['id']}"
    ).json()
    assert one["status"] == "succeeded" and one["attempts"] == 1
    assert one["body"].encode() == got.body
    sent = one["attempt_details"][0]["request_headers"]
    # Signatures masked: enough to match against the receiver's logs, not to test
    # a guessed secret offline.
    assert sent["X-Bullseye-Signature"] == "…" + got.header("x-bullseye-signature")[-4:]
    signature = got.header("webhook-signature")
    assert sent["webhook-signature"] == "v1,…" + signature[-4:]
    assert signature[-4:] not in ("", sent["webhook-signature"])
    assert sent["webhook-id"] == got.header("webhook-id")
    assert one["attempt_details"][0]["status_code"] == 200

    # The failing endpoint: attempts, next-retry times, then the dead letter.
    failing = wait_until(
        lambda: deliveries(http, bad["id"], status="failing"), 30, "a failing delivery"
    )
    assert failing[0]["next_retry_at"] is not None
    assert failing[0]["last_status_code"] == 500
    delivery_id = failing[0]["id"]
    detail_url = f"/v1/organizations/{ORG}/webhooks/{bad['id']}/deliveries/{delivery_id}"

    def two_attempts() -> dict[str, Any] | None:
        detail = dict(http.get(detail_url).json())
        return detail if detail["attempts"] >= 2 else None

    detail = wait_until(two_attempts, 30, "a second attempt")
    first, second = detail["attempt_details"][:2]
    assert first["response_snippet"] == "database down"
    retry_at = datetime.fromisoformat(first["next_retry_at"])
    assert datetime.fromisoformat(second["at"]) >= retry_at  # not before it was due
    assert second["attempt"] == 2 and second["request_headers"]["X-Bullseye-Attempt"] == "2"

    dead = wait_until(
        lambda: deliveries(http, bad["id"], status="dead_lettered"), 60, "the dead letter"
    )
    assert dead[0]["id"] == delivery_id and dead[0]["attempts"] == 4
    summary = http.get(f"/v1/organizations/{ORG}/webhooks/{bad['id']}/summary").json()
    assert summary["failing_now"] is True and summary["failures_24h"] == 4
    assert summary["last_error"]["status_code"] == 500
    assert summary["latency_ms"]["p50"] is not None
    healthy = http.get(f"/v1/organizations/{ORG}/webhooks/{good['id']}/summary").json()
    assert healthy["failing_now"] is False and healthy["successes_24h"] == 1

    # Fixed endpoint, resend: same delivery id and body, a fresh attempt budget.
    receiver.respond("/bad", Reply(200))
    resent = http.post(f"{detail_url}/resend")
    assert resent.status_code == 202, resent.text
    # Read-your-writes: the next read shows it asked for, or already delivered.
    assert http.get(detail_url).json()["status"] in ("pending", "succeeded")
    wait_until(lambda: deliveries(http, bad["id"], status="succeeded"), 30, "the resent delivery")
    bad_requests = receiver.requests_to("/bad")
    assert len(bad_requests) == 5
    assert {r.header("x-bullseye-delivery-id") for r in bad_requests} == {delivery_id}
    assert len({r.body for r in bad_requests}) == 1
    assert bad_requests[-1].header("x-bullseye-attempt") == "1"
    final = http.get(detail_url).json()
    kinds = [(a["kind"], a["attempt"]) for a in final["attempt_details"]]
    assert kinds == [
        ("attempt", 1),
        ("attempt", 2),
        ("attempt", 3),
        ("attempt", 4),
        ("resend", 0),
        ("attempt", 1),
    ]
    assert final["attempt_details"][4]["requested_by"] == "admin"

    # Filters and pagination.
    ns.publish(event("sess_two"), event("sess_three"))
    wait_until(lambda: len(deliveries(http, good["id"])) == 3, 30, "three deliveries")
    assert [d["session_id"] for d in deliveries(http, good["id"], session_id="sess_two")] == [
        "sess_two"
    ]
    page1 = http.get(
        f"/v1/organizations/{ORG}/webhooks/{good['id']}/deliveries", params={"limit": 2}
    ).json()
    assert len(page1["data"]) == 2 and page1["next_cursor"]
    page2 = http.get(
        f"/v1/organizations/{ORG}/webhooks/{good['id']}/deliveries",
        params={"limit": 2, "cursor": page1["next_cursor"]},
    ).json()
    assert [d["session_id"] for d in page2["data"]] == ["sess_one"]
    assert page2["next_cursor"] is None
    future = deliveries(http, good["id"], since="2999-01-01T00:00:00Z")
    assert future == []
    assert (
        http.get(
            f"/v1/organizations/{ORG}/webhooks/{good['id']}/deliveries", params={"cursor": "!!"}
        ).status_code
        == 422
    )

    # Another organization sees none of it.
    other = f"/v1/organizations/org_other/webhooks/{bad['id']}/deliveries"
    assert http.get(other).status_code == 404
    assert http.get(f"{other}/{delivery_id}").status_code == 404

    # No secret anywhere in the attempts topic.
    records = ns.read_all(ns.settings.attempts_topic)
    assert len(records) >= 10
    for record in records:
        AttemptRecord.model_validate_json(record.value())
        for secret in secrets:
            assert secret.encode() not in record.value()
            assert secret.removeprefix("whsec_").encode() not in record.value()
    assert json.loads(records[0].value())["request_headers"]
    http.close()
