"""Test sends of the API (``POST .../webhooks/{id}/test``): on the event loop, bounded.

A test send waits on a customer's endpoint, which may never answer. So it runs as
a coroutine on the API's event loop, through one pooled client built like the
dispatcher's (the same guarded transport, signer and egress guard): a hanging
endpoint holds a slot, never a thread, and the loop keeps answering everyone else.

Slots are bounded per organization and in all. Beyond either bound a send is
refused at once (429, ``Retry-After``) rather than queued: a queued send would
only wait while its caller's own request timed out, and one organization must not
take every slot. Each send ends within ``DISPATCHER_API_TEST_SEND_TIMEOUT_S``, so
``Retry-After`` says when a slot is free at the latest.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from dispatcher.commands.sendtest import SendTestReport, send_test_with
from dispatcher.errors import Problem
from dispatcher.models import Subscription
from dispatcher.outbound.transport import DeliveryClient, build_http_client
from dispatcher.settings import Settings


class SampleSends:
    """The test sends in flight, per organization and in all; only the event loop uses it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.timeout_s = settings.api_test_send_timeout_s
        self.per_organization = settings.api_test_sends_per_organization
        self.limit = settings.api_test_sends_max
        self.in_flight = 0
        self._by_organization: dict[str, int] = {}
        # Built now, not on the first send: loading the CA bundles takes tens of
        # milliseconds of CPU, which would be the event loop's. (Its aiohttp session
        # is made on first use, on the loop, as it must be.)
        self._client: DeliveryClient = build_http_client(settings)

    def of(self, organization_id: str) -> int:
        """How many of the organization's test sends are in flight."""
        return self._by_organization.get(organization_id, 0)

    async def send(
        self, sub: Subscription, started: Callable[[], None] | None = None
    ) -> SendTestReport:
        """Send the sample to ``sub``'s endpoint, or refuse with a 429 when no slot is free.

        ``started`` is called once the send has its slot, before anything goes out.
        """
        org = sub.organization_id
        self._take(org)
        try:
            if started is not None:
                started()
            return await send_test_with(self._client, self.settings, sub, self.timeout_s)
        finally:
            self._release(org)

    async def close(self) -> None:
        await self._client.aclose()

    def _take(self, org: str) -> None:
        # Checked and taken with no await in between: the loop runs one handler at a time.
        if self.of(org) >= self.per_organization:
            raise self._refusal(
                f"this organization already has {self.per_organization} test sends in flight"
            )
        if self.in_flight >= self.limit:
            raise self._refusal(f"{self.limit} test sends are in flight; the API takes no more")
        self._by_organization[org] = self.of(org) + 1
        self.in_flight += 1

    def _release(self, org: str) -> None:
        self.in_flight -= 1
        left = self.of(org) - 1
        if left:
            self._by_organization[org] = left
        else:  # no entry kept for an organization with nothing in flight
            self._by_organization.pop(org, None)

    def _refusal(self, why: str) -> Problem:
        wait_s = max(1, math.ceil(self.timeout_s))
        return Problem(
            429,
            "too-many-test-sends",
            "Too many test sends",
            f"{why}; each ends within {self.timeout_s:g} s, retry after {wait_s} s",
            headers={"Retry-After": str(wait_s)},
        )
