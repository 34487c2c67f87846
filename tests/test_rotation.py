"""Secret rotation seen by a receiver that verifies with the official Standard Webhooks library.

Real deliveries from a running dispatcher, before, during and after the grace
period of ``dispatcher subscriptions rotate-secret``.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import itertools
import time
from datetime import datetime
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests.cli_support import run_subprocess, wait_topics_ready
from tests.receiver import HttpsReceiver, ReceivedRequest
from tests.support import SEED_EVENT, Namespace, wait_until

GRACE_S = 6
_probes = itertools.count()


@pytest.fixture
def ns(ns: Namespace) -> Namespace:
    return wait_topics_ready(ns)


def bullseye(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def signatures(request: ReceivedRequest) -> list[str]:
    return (request.header("webhook-signature") or "").split()


def only(request: ReceivedRequest, signature: str) -> dict[str, str]:
    """The request's headers with a single ``webhook-signature`` entry."""
    return {**request.headers, "webhook-signature": signature}


def deliver(ns: Namespace, receiver: HttpsReceiver, want: int) -> ReceivedRequest | None:
    """Publish one event; return its delivery if it carries ``want`` signatures."""
    session = f"rotation-{next(_probes)}"
    ns.publish({**copy.deepcopy(SEED_EVENT), "session_id": session})

    def arrived() -> ReceivedRequest | None:
        for request in receiver.requests_to("/hook"):
            if f'"session_id":"{session}"' in request.body.decode():
                return request
        return None

    request = wait_until(arrived, 30, f"the delivery of {session}")
    return request if len(signatures(request)) == want else None


def test_rotation_seen_by_the_standard_webhooks_library(
    ns: Namespace, receiver: HttpsReceiver, run_dispatcher: Any
) -> None:
    created = run_subprocess(
        ns,
        "subscriptions",
        "put",
        "--organization",
        SEED_EVENT["organization_id"],
        "--url",
        receiver.url("/hook"),
        "--plan",
        "enterprise",
        "--json",
    )
    old = created.json()["new_secret"]
    webhook_id = created.json()["webhook_id"]
    run_dispatcher(ns)

    # Before: one signature, from the only secret.
    before = deliver(ns, receiver, want=1)
    assert before is not None
    Webhook(old).verify(before.body, dict(before.headers))
    assert before.header("x-bullseye-signature") == bullseye(old, before.body)

    rotated = run_subprocess(
        ns, "subscriptions", "rotate-secret", webhook_id, "--json", secret_rotation_grace_s=GRACE_S
    )
    new = rotated.json()["new_secret"]
    [until] = rotated.json()["previous_secrets_until"]
    expires_at = datetime.fromisoformat(until).timestamp()
    assert new != old

    # During: the dispatcher follows the table live; two signatures, newest first.
    during = wait_until(
        lambda: deliver(ns, receiver, want=2), GRACE_S, "a delivery signed with both secrets"
    )
    assert time.time() < expires_at
    Webhook(new).verify(during.body, dict(during.headers))
    Webhook(old).verify(during.body, dict(during.headers))
    first, second = signatures(during)
    Webhook(new).verify(during.body, only(during, first))
    Webhook(old).verify(during.body, only(during, second))
    with pytest.raises(WebhookVerificationError):
        Webhook(old).verify(during.body, only(during, first))
    assert during.header("x-bullseye-signature") == bullseye(new, during.body)

    # After the grace period: only the new secret signs.
    wait_until(lambda: time.time() > expires_at, GRACE_S + 5, "the end of the grace period")
    after = wait_until(
        lambda: deliver(ns, receiver, want=1), 30, "a delivery signed with one secret"
    )
    Webhook(new).verify(after.body, dict(after.headers))
    with pytest.raises(WebhookVerificationError):
        Webhook(old).verify(after.body, dict(after.headers))
    assert after.header("x-bullseye-signature") == bullseye(new, after.body)
