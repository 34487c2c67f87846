"""The subscriptions table: the compacted topic read whole into memory, then followed.

A :class:`~dispatcher.follow.Follower` (the one reader of compacted topics, like
Kafka Streams' GlobalKTable): it reads the topic from the beginning to the end
noted at start-up (only then is the table *caught up* and may events be
dispatched), keeps applying changes afterwards, and waits for a missing topic
or an unreachable broker instead of failing. Here is what a record does: the
table by webhook id and by organization. One reader thread writes; the event
loop only reads, and every read is a single dict lookup of an immutable tuple,
so no lock is needed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from dispatcher import metrics
from dispatcher.errors import SubscriptionError
from dispatcher.follow import Follower
from dispatcher.models import Subscription, decode_subscription
from dispatcher.settings import Settings

log = logging.getLogger(__name__)


class SubscriptionTable(Follower):
    """Subscriptions by webhook id and by organization, following the topic live."""

    name = "subscriptions table"

    def __init__(
        self,
        settings: Settings,
        on_change: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(settings, (settings.subscriptions_topic,))
        self._by_id: dict[str, Subscription] = {}
        self._by_org: dict[str, tuple[Subscription, ...]] = {}
        # Written by the reader thread only; ``_by_org`` is rebuilt from it per
        # organization so an update costs the size of one organization.
        self._members: dict[str, dict[str, Subscription]] = {}
        self._on_change = on_change
        self.invalid_records = 0
        #: Webhook ids whose latest record was ignored, with why (``delete`` can clear them).
        self.ignored: dict[str, str] = {}

    # --- reads (any thread) -------------------------------------------------
    def get(self, webhook_id: str) -> Subscription | None:
        return self._by_id.get(webhook_id)

    def for_organization(self, organization_id: str) -> tuple[Subscription, ...]:
        return self._by_org.get(organization_id, ())

    def all(self) -> list[Subscription]:
        return list(self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)

    def summary(self) -> dict[str, object]:
        return {"subscriptions": len(self._by_id)}

    # --- lifecycle ----------------------------------------------------------
    def start(self) -> None:
        """Start following the topic in a background thread, waiting there for it.

        A pod started before ``dispatcher topics ensure`` ran, or while Kafka is
        unreachable, stays alive and not ready, saying why through
        :attr:`waiting_for` (see :meth:`Follower.start_when_available`).
        """
        self.start_when_available()

    # --- applying records (the reader thread) --------------------------------
    def apply(
        self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None
    ) -> None:
        self._apply(key, value)

    def _apply(self, key: bytes | None, value: bytes | None) -> None:
        if key is None:
            self._ignore("no_key", "subscription record without a key ignored")
            return
        webhook_id = key.decode("utf-8", "replace")
        sub: Subscription | None = None
        if value is not None:
            try:
                sub = decode_subscription(key, value)
            except SubscriptionError as exc:
                self._ignore_record(webhook_id, str(exc))
                return
            except Exception as exc:  # whatever a record holds, the reader keeps going
                self._ignore_record(webhook_id, f"{type(exc).__name__}: {exc}")
                return
        self.ignored.pop(webhook_id, None)
        # Replace in place (never pop then add) so a concurrent reader never sees
        # a live subscription missing for an instant.
        old = self._by_id.get(webhook_id)
        if sub is not None:
            self._by_id[webhook_id] = sub
        else:
            self._by_id.pop(webhook_id, None)
        if old is not None and (sub is None or old.organization_id != sub.organization_id):
            self._members.get(old.organization_id, {}).pop(webhook_id, None)
            self._reindex(old.organization_id)
        if sub is not None:
            self._members.setdefault(sub.organization_id, {})[webhook_id] = sub
            self._reindex(sub.organization_id)
        if self._on_change is not None:
            self._on_change(len(self._by_id))

    def _ignore_record(self, webhook_id: str, why: str) -> None:
        self.ignored[webhook_id] = why
        self._ignore("invalid", f"subscription record {webhook_id!r} ignored: {why}")

    def _ignore(self, reason: str, message: str) -> None:
        """A record that would fail in the hot path: count it, say why, keep what was there.

        A subscription whose new version is unusable keeps its last good version,
        so one bad write never silently stops an endpoint that worked.
        """
        self.invalid_records += 1
        metrics.INVALID_SUBSCRIPTIONS.labels(reason).inc()
        log.warning("%s", message[:1000].encode("utf-8", "backslashreplace").decode())

    def _reindex(self, organization_id: str) -> None:
        members = self._members.get(organization_id)
        if members:
            self._by_org[organization_id] = tuple(members.values())
        else:
            self._members.pop(organization_id, None)
            self._by_org.pop(organization_id, None)
