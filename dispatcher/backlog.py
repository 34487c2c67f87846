"""Each webhook's backlog as the API shows it: snapshots the dispatcher instances write.

The backlog of a webhook lives in the memory of whichever ``dispatcher run``
instances hold its deliveries (queued for its slots, or parked in Kafka until
their turn): no topic holds it. So every instance writes, every
``DISPATCHER_BACKLOG_REPORT_EVERY_S``, a snapshot of its own non-zero backlogs to
a compacted topic, keyed by its instance id. Each instance is the only writer of
its key, so no two writers ever decide the same record; compaction keeps the last
snapshot of each. A snapshot holds at most :data:`SNAPSHOT_MAX_WEBHOOKS` webhooks,
the largest backlogs (``truncated`` says that more had one).

The API follows the topic (:class:`BacklogView`) and shows, per webhook, the sum
over the instances' *fresh* snapshots: one older than :data:`STALE_AFTER_REPORTS`
of its own reporting intervals is from an instance that stopped (or cannot reach
Kafka) and is left out, so a crashed instance's last word does not linger.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dispatcher.follow import Follower
from dispatcher.settings import Settings

log = logging.getLogger(__name__)

#: Webhooks one snapshot lists at most (the largest backlogs): bounds the record
#: (about 40 bytes each) and what the API holds per instance.
SNAPSHOT_MAX_WEBHOOKS: Final = 1000
#: A snapshot older than this many of its instance's reporting intervals is stale.
STALE_AFTER_REPORTS: Final = 3


class BacklogSnapshot(BaseModel):
    """One instance's backlogs at one moment (the value of its key in the topic)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    instance: str
    at: datetime
    #: The instance's reporting interval: the reader judges freshness by it.
    every_s: float = Field(gt=0)
    webhooks: dict[str, int]
    truncated: bool = False

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))

    @property
    def stale_at(self) -> datetime:
        return self.at + timedelta(seconds=STALE_AFTER_REPORTS * self.every_s)


def instance_id(settings: Settings) -> str:
    """This process's key in the backlog topic: its static group member id if set
    (stable across restarts, the chart's pod name), else host and process id."""
    return settings.group_instance_id or f"{socket.gethostname()}-{os.getpid()}"


def snapshot(
    instance: str, every_s: float, backlogs: dict[str, int], at: datetime | None = None
) -> BacklogSnapshot:
    """The snapshot of ``backlogs`` (webhook id to deliveries), zeros left out."""
    listed = sorted(((n, key) for key, n in backlogs.items() if n > 0), reverse=True)
    return BacklogSnapshot(
        instance=instance,
        at=at or datetime.now(UTC),
        every_s=every_s,
        webhooks={key: n for n, key in listed[:SNAPSHOT_MAX_WEBHOOKS]},
        truncated=len(listed) > SNAPSHOT_MAX_WEBHOOKS,
    )


@dataclass(frozen=True, slots=True)
class Backlog:
    """A webhook's backlog over every instance that reported lately."""

    deliveries: int
    #: The oldest of the fresh snapshots summed: the figure is at least this recent.
    as_of: datetime


class BacklogView(Follower):
    """The latest snapshot of every instance, read from the backlog topic."""

    name = "webhook backlog"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, [settings.backlog_topic])
        self._lock = threading.Lock()
        self._snapshots: dict[str, BacklogSnapshot] = {}

    def apply(
        self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None
    ) -> None:
        if key is None:
            return
        name = key.decode("utf-8", "replace")
        if value is None:  # a tombstone: the instance said it stopped
            with self._lock:
                self._snapshots.pop(name, None)
            return
        try:
            snap = BacklogSnapshot.model_validate_json(value)
        except ValidationError:
            # Not ours to refuse: a record the reader cannot use is skipped, said once.
            log.warning("backlog topic: unreadable snapshot at %s@%d", topic, offset)
            return
        with self._lock:
            self._snapshots[name] = snap

    def summary(self) -> dict[str, object]:
        return {"instances": len(self._snapshots)}

    def of(self, webhook_id: str, now: datetime | None = None) -> Backlog | None:
        """The webhook's backlog summed over the fresh snapshots; None when there is
        none (no instance reported lately, or this view has not caught up)."""
        if not self.caught_up:
            return None
        now = now or datetime.now(UTC)
        with self._lock:
            fresh = [s for s in self._snapshots.values() if s.stale_at > now]
        if not fresh:
            return None
        return Backlog(
            deliveries=sum(s.webhooks.get(webhook_id, 0) for s in fresh),
            as_of=min(s.at for s in fresh),
        )
