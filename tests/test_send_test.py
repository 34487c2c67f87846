"""``dispatcher send-test``: one signed sample delivery to a real HTTPS receiver."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from datetime import UTC, datetime, timedelta

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from dispatcher.commands.sendtest import SAMPLE_EVENT, sample_body
from dispatcher.commands.subscriptions import write
from dispatcher.models import PreviousSecret
from dispatcher.outbound.signing import generate_secret
from tests.cli_support import Cli, make_inprocess, run_subprocess, wait_topics_ready
from tests.receiver import HttpsReceiver, Reply
from tests.support import SEED_EVENT, Namespace, free_port

BODY_KEYS = ["event", "timestamp", "organization_id", "session_id", "visitor", "company", "session"]


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    return make_inprocess(monkeypatch, capsys)


@pytest.fixture
def ns(ns: Namespace) -> Namespace:
    return wait_topics_ready(ns)


def test_sample_is_the_documented_example() -> None:
    assert SAMPLE_EVENT == SEED_EVENT
    now = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
    body = json.loads(sample_body("org_42", now))
    assert list(body) == BODY_KEYS
    assert body == {**SEED_EVENT, "organization_id": "org_42", "timestamp": "2026-03-04T05:06:07Z"}


def test_send_test_to_a_live_endpoint(ns: Namespace, receiver: HttpsReceiver) -> None:
    secret = generate_secret()
    sub = ns.subscribe(receiver.url("/hook"), organization_id="org_live", secret=secret)
    answer = b"accepted:" + b"x" * 400
    receiver.respond("/hook", Reply(200, body=answer))
    started = time.time()

    result = run_subprocess(ns, "send-test", sub.webhook_id)

    assert result.code == 0, result.err
    assert "HTTP 200 in " in result.out
    [response_line] = [line for line in result.out.splitlines() if line.startswith("response: ")]
    assert response_line == "response: " + answer[:200].decode()
    [got] = receiver.requests_to("/hook")
    assert got.header("x-bullseye-test") == "true"
    assert got.header("x-bullseye-attempt") == "1"
    assert got.header("x-bullseye-delivery-id") == got.header("webhook-id")
    assert got.header("x-bullseye-delivery-id") in result.out
    # Verifiable exactly like a real delivery: both schemes, with the official library.
    Webhook(secret).verify(got.body, dict(got.headers))
    with pytest.raises(WebhookVerificationError):
        Webhook(generate_secret()).verify(got.body, dict(got.headers))
    expected = hmac.new(secret.encode(), got.body, hashlib.sha256).hexdigest()
    assert got.header("x-bullseye-signature") == expected
    body = json.loads(got.body)
    assert list(body) == BODY_KEYS
    assert body["organization_id"] == "org_live"
    assert body["event"] == "visitor.identified"
    sent_at = datetime.fromisoformat(body["timestamp"]).timestamp()
    assert started - 5 <= sent_at <= time.time() + 5
    assert body["visitor"] == SEED_EVENT["visitor"]


def test_send_test_signs_with_every_active_secret(
    cli: Cli, ns: Namespace, receiver: HttpsReceiver
) -> None:
    old, new = generate_secret(), generate_secret()
    sub = ns.subscribe(receiver.url("/rotating"), secret=new)
    expires = datetime.now(UTC) + timedelta(hours=1)
    rotating = sub.model_copy(
        update={"previous_secrets": (PreviousSecret(secret=old, expires_at=expires),)}
    )
    write(ns.settings, sub.webhook_id, rotating)

    result = cli(ns, "send-test", sub.webhook_id, "--json")

    assert result.json()["ok"] is True and result.json()["status_code"] == 200
    [got] = receiver.requests_to("/rotating")
    assert len(got.header("webhook-signature").split()) == 2
    Webhook(old).verify(got.body, dict(got.headers))
    Webhook(new).verify(got.body, dict(got.headers))
    assert old not in result.out + result.err and new not in result.out + result.err


def test_send_test_to_a_closed_port(ns: Namespace) -> None:
    sub = ns.subscribe(f"https://127.0.0.1:{free_port()}/gone", secret=generate_secret())
    result = run_subprocess(ns, "send-test", sub.webhook_id)
    result.assert_one_line_error(1, "could not connect", "Connection refused")
    assert "no answer" in result.out


def test_send_test_reports_a_refusing_endpoint(
    cli: Cli, ns: Namespace, receiver: HttpsReceiver
) -> None:
    sub = ns.subscribe(receiver.url("/down"))
    receiver.respond("/down", Reply(503, body=b"down for maintenance\r\n"))
    result = cli(ns, "send-test", sub.webhook_id)
    result.assert_one_line_error(1, "answered HTTP 503")
    assert "HTTP 503 in " in result.out
    assert "response: down for maintenance\\r\\n" in result.out
    assert len(receiver.requests_to("/down")) == 1


def test_send_test_times_out(cli: Cli, ns: Namespace, receiver: HttpsReceiver) -> None:
    sub = ns.subscribe(receiver.url("/slow"))
    receiver.respond("/slow", Reply(200, delay_s=10))
    result = cli(ns, "send-test", sub.webhook_id, http_timeout_s=1)
    result.assert_one_line_error(1, "did not answer in time", "1 s")


def test_send_test_goes_through_the_address_guard(
    cli: Cli, ns: Namespace, receiver: HttpsReceiver
) -> None:
    sub = ns.subscribe(receiver.url("/private"))
    result = cli(ns, "send-test", sub.webhook_id, "--json", allowed_networks=[])
    assert result.code == 1
    report = json.loads(result.out)
    assert report["ok"] is False and report["error_class"] == "blocked"
    assert "egress policy" in report["reason"] and "loopback" in report["reason"]
    assert receiver.requests == []


def test_send_test_to_a_disabled_subscription_warns_and_sends(
    cli: Cli, ns: Namespace, receiver: HttpsReceiver
) -> None:
    sub = ns.subscribe(receiver.url("/off"), enabled=False)
    result = cli(ns, "send-test", sub.webhook_id)
    assert result.code == 0, result.err
    assert "dispatcher: warning:" in result.err and "disabled" in result.err
    assert len(receiver.requests_to("/off")) == 1


def test_send_test_names_why_real_events_are_not_sent(
    cli: Cli, ns: Namespace, receiver: HttpsReceiver
) -> None:
    """send-test reports fan-out's policy: here, a plan without webhooks."""
    sub = ns.subscribe(receiver.url("/free"), plan="free")
    result = cli(ns, "send-test", sub.webhook_id, "--json")
    assert result.code == 0, result.err
    assert "plan not entitled: real events are not sent to it" in result.err
    assert json.loads(result.out)["real_events_skipped"] == "plan not entitled"
    assert len(receiver.requests_to("/free")) == 1


def test_send_test_to_a_plain_http_url_is_refused(cli: Cli, ns: Namespace) -> None:
    sub = ns.subscribe(f"http://127.0.0.1:{free_port()}/plain")
    result = cli(ns, "send-test", sub.webhook_id, "--json")
    assert result.code == 1
    assert "URL is not https://" in result.err and "real events are not sent" in result.err
    report = json.loads(result.out)
    assert report["error_class"] == "blocked" and report["ok"] is False
    assert report["real_events_skipped"] == "URL is not https:// and DISPATCHER_ALLOW_HTTP is off"
