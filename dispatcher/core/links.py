"""What each Kafka client last said about its broker connections and its group, kept in memory.

``/readyz`` must answer at once, whatever the broker does, so it never asks a
client anything: it reads what librdkafka last reported. Every client the
service runs (the stage consumers and the producer) reports its statistics once
a second (``statistics.interval.ms``) from the thread that polls it; a
:class:`ClientLink` keeps the few facts readiness needs from them:

* whether any broker connection is up, and since when none is;
* for a group consumer, whether it is a member with an assignment (librdkafka's
  ``join_state`` ``steady``), and since when it is not;
* when the client last reported at all: a polling thread blocked or gone stops
  the reports, which says as much as a broken connection.

Attributes are plain values replaced whole, written by one thread and read by
another: no lock is needed under the GIL, and a reader never waits.
"""

from __future__ import annotations

import logging
import time
import weakref
from datetime import UTC, datetime
from typing import Any

import orjson

log = logging.getLogger(__name__)

#: librdkafka's statistics period: how stale what /readyz says may be.
STATS_INTERVAL_MS = 1000
#: Reports missing for this long mean the client is not being polled.
SILENT_AFTER_S = 10.0
#: A rebalance leaves ``steady`` for a moment; only a longer absence is worth a 503.
NOT_MEMBER_AFTER_S = 5.0

#: Every client link of this process, to compare one client with the others.
_LINKS: weakref.WeakSet[ClientLink] = weakref.WeakSet()


def _clock(monotonic_at: float) -> str:
    """A monotonic instant as UTC wall-clock time, for the operator reading /readyz."""
    wall = time.time() - (time.monotonic() - monotonic_at)
    return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ClientLink:
    """The connection and membership state of one client, from its statistics."""

    def __init__(self, name: str, group: str | None = None) -> None:
        #: Names the client in reasons: "stage input", "the producer".
        self.name = name
        #: The consumer group, or None for a producer.
        self.group = group
        self.reported_at: float | None = None
        #: Since when no broker connection is up (None: one is, or nothing known yet).
        self.down_since: float | None = None
        #: Since when the consumer is not a steady member of its group.
        self.outside_since: float | None = None
        self.join_state = ""
        self.group_state = ""
        #: When a report last said no broker connection was up.
        self.down_at: float | None = None
        #: Since when a broker connection is up (None: none is).
        self.up_since: float | None = None
        self.created_at = time.monotonic()
        _LINKS.add(self)

    def config(self) -> dict[str, Any]:
        """The client properties that make librdkafka report to this link."""
        return {"statistics.interval.ms": STATS_INTERVAL_MS, "stats_cb": self.on_stats}

    def on_stats(self, text: str) -> None:
        """librdkafka's statistics (JSON), on the thread polling the client."""
        try:
            stats = orjson.loads(text)
        except orjson.JSONDecodeError:
            return
        now = time.monotonic()
        brokers = stats.get("brokers") or {}
        up = any(b.get("state") == "UP" for b in brokers.values())
        if up:
            if self.up_since is None:
                self.up_since = now
            self.down_since = None
        else:
            self.up_since = None
            self.down_at = now
            if self.down_since is None:
                self.down_since = now
        cgrp = stats.get("cgrp")
        if self.group is not None and isinstance(cgrp, dict):
            self.join_state = str(cgrp.get("join_state", ""))
            self.group_state = str(cgrp.get("state", ""))
            member = cgrp.get("state") == "up" and self.join_state == "steady"
            if member:
                self.outside_since = None
            elif self.outside_since is None:
                self.outside_since = now
        self.reported_at = now

    def cut_off(self, now: float, after_s: float) -> bool:
        """Outside its group, no broker reached for ``after_s``, while another client has
        reached one for as long.

        The broker is back, yet this client has not found it again: librdkafka
        has, now and then, left a consumer that lost its session in that state.
        Outside its group it holds no partitions, so a new client costs nothing.
        """
        down = self.down_since
        if down is None or now - down < after_s or self.outside_since is None:
            return False
        return any(
            other is not self
            and other.up_since is not None
            and now - other.up_since >= after_s
            and other.reported_at is not None
            and now - other.reported_at < SILENT_AFTER_S
            for other in list(_LINKS)
        )

    def broker_down(self) -> None:
        """All brokers down, reported as an error before the next statistics."""
        now = time.monotonic()
        self.down_at = now
        if self.down_since is None:
            self.down_since = now

    def down_within(self, seconds: float) -> bool:
        """Whether no broker was reachable at some point in the last ``seconds``."""
        return self.down_at is not None and time.monotonic() - self.down_at <= seconds

    def problem(self, now: float | None = None) -> str | None:
        """Why this client cannot consume or produce now, or None; reads memory only."""
        now = time.monotonic() if now is None else now
        last = self.reported_at
        since = self.created_at if last is None else last
        if now - since > SILENT_AFTER_S:
            return f"{self.name}: no report from its Kafka client for {now - since:.0f} s"
        if last is None:
            return None
        down = self.down_since
        if down is not None:
            return (
                f"broker unreachable since {_clock(down)} ({self.name}, {now - down:.0f} s"
                + (f"; group state {self.group_state}" if self.group else "")
                + ")"
            )
        outside = self.outside_since
        if outside is not None and now - outside >= NOT_MEMBER_AFTER_S:
            return (
                f"{self.name}: not a member of the group {self.group} since {_clock(outside)} "
                f"({now - outside:.0f} s; group state {self.group_state or 'unknown'}, "
                f"join state {self.join_state or 'unknown'})"
            )
        return None


def first_problem(links: list[ClientLink]) -> str | None:
    """The first reason among ``links`` why the service cannot consume or produce."""
    now = time.monotonic()
    for link in links:
        why = link.problem(now)
        if why is not None:
            return why
    return None
