"""``dispatcher send-test``: one sample delivery to one endpoint, right now.

The sample is the customer documentation's example event with the
subscription's organization and the current time, serialized and signed exactly
like a real delivery (both signature schemes, every active secret), marked
``X-Bullseye-Test: true``, and sent through the same guarded HTTP client, so a
success here means real deliveries will get through too. The sample is sent even
to a subscription the dispatcher would not call (disabled, say, to test it before
enabling it); the report then says why real events are not sent, by the same
policy fan-out applies.
"""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from dispatcher.core.fanout import SKIP_REASONS, CallPolicy
from dispatcher.models import Subscription, format_timestamp, parse_event
from dispatcher.outbound.delivery import AttemptResult, build_headers, post
from dispatcher.outbound.transport import DeliveryClient, build_http_client
from dispatcher.settings import Settings

#: How much of the endpoint's answer is shown to the operator.
RESPONSE_SHOWN_BYTES: Final = 200

#: The example payload of the customer documentation.
SAMPLE_EVENT: Final[dict[str, Any]] = {
    "event": "visitor.identified",
    "timestamp": "2025-01-15T10:30:00Z",
    "organization_id": "org_abc123",
    "session_id": "sess_xyz789",
    "visitor": {
        "email": "jane.smith@acme.com",
        "first_name": "Jane",
        "last_name": "Smith",
        "job_title": "VP of Marketing",
        "linkedin_url": "https://linkedin.com/in/janesmith",
        "location": "San Francisco, CA",
    },
    "company": {
        "name": "Acme Corp",
        "industry": "Technology",
        "employee_count": 500,
        "location": "San Francisco, CA",
    },
    "session": {
        "landing_page": "/pricing",
        "pages_visited": ["/", "/features", "/pricing"],
        "utm_source": "google",
        "utm_medium": "cpc",
        "referrer": "https://google.com",
        "device_type": "desktop",
    },
}

_REASONS: Final = {
    "timeout": "the endpoint did not answer in time",
    "connection": "could not connect",
    "tls": "the TLS handshake failed",
    "blocked": "refused by the egress policy (DISPATCHER_ALLOWED_NETWORKS lists exceptions)",
}


@dataclass(frozen=True, slots=True)
class SendTestReport:
    """What the test delivery came to."""

    delivery_id: str
    url: str
    result: AttemptResult
    #: Why the dispatcher does not send real events to this subscription, if it does not.
    not_called: str | None = None

    @property
    def response(self) -> str | None:
        """The start of the endpoint's answer, printable on one line."""
        if self.result.snippet is None:
            return None
        return "".join(
            ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")
            for ch in self.result.snippet
        )

    @property
    def reason(self) -> str:
        """One line saying what happened."""
        result = self.result
        if result.status_code is not None:
            verdict = "accepted" if result.ok else "refused"
            return f"the endpoint answered HTTP {result.status_code} ({verdict})"
        label = _REASONS.get(result.error_class, "the request failed")
        return f"{label}: {result.error}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "webhook_url": self.url,
            "delivery_id": self.delivery_id,
            "ok": self.result.ok,
            "status_code": self.result.status_code,
            "duration_ms": round(self.result.duration_s * 1000, 1),
            "error_class": None if self.result.ok else self.result.error_class,
            "reason": self.reason,
            "response": self.result.snippet,
            "real_events_skipped": self.not_called,
        }


def sample_body(organization_id: str, now: datetime) -> bytes:
    """The sample event's body, serialized the way every real delivery is."""
    doc = copy.deepcopy(SAMPLE_EVENT)
    doc["organization_id"] = organization_id
    doc["timestamp"] = format_timestamp(now)
    return parse_event(json.dumps(doc).encode(), max_bytes=1 << 20).body


def send_test(settings: Settings, sub: Subscription, now: datetime | None = None) -> SendTestReport:
    """POST the sample to ``sub``'s endpoint once; never raises for what the endpoint does.

    For the command line: a client of its own, for this one send. The API sends
    through :func:`send_test_with` on its event loop, with a shared client.
    """
    return asyncio.run(_send_once(settings, sub, now))


async def send_test_with(
    client: DeliveryClient,
    settings: Settings,
    sub: Subscription,
    timeout_s: float,
    now: datetime | None = None,
) -> SendTestReport:
    """POST the sample through ``client``, the whole exchange bounded by ``timeout_s``."""
    now = now or datetime.now(UTC)
    body = sample_body(sub.organization_id, now)
    delivery_id = f"test_{uuid.uuid4().hex}"
    headers = build_headers(delivery_id, 1, body, sub.active_secrets(now), test=True)
    result = await post(client.transport, sub.url, body, headers, timeout_s, RESPONSE_SHOWN_BYTES)
    refusal = CallPolicy.of(settings).refusal(sub)
    not_called = None if refusal is None else SKIP_REASONS[refusal]
    return SendTestReport(delivery_id, sub.url, result, not_called)


async def _send_once(settings: Settings, sub: Subscription, now: datetime | None) -> SendTestReport:
    async with build_http_client(settings) as client:
        return await send_test_with(client, settings, sub, settings.http_timeout_s, now)
