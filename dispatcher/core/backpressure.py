"""Which partitions wait for which endpoints' full queues, and since when.

A message whose delivery finds its endpoint's queue full makes its partition
wait: the pump takes nothing more from it until that endpoint has room again or
is judged slow (then what does not fit is parked in Kafka instead). A partition
may wait for several endpoints at once; it goes on once it waits for none. This
is the one record of it: the pump asks :meth:`Backpressure.holds`, the delivery
runner holds and releases, and a partition that waits for nothing any more waits
in :meth:`Backpressure.take_resumed` for the pump (the wake event says so).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from dispatcher.core.partitions import PartitionState


class Backpressure:
    """Partitions waiting per endpoint (webhook id), and endpoints per partition."""

    def __init__(self, wake: asyncio.Event) -> None:
        self._wake = wake
        #: Partitions that no longer wait for any endpoint, since :meth:`take_resumed`.
        self._resumed: list[PartitionState] = []
        self._parts: dict[str, set[PartitionState]] = {}
        self._endpoints: dict[PartitionState, set[str]] = {}
        self._since: dict[str, float] = {}

    def hold(self, key: str, part: PartitionState) -> float | None:
        """Make ``part`` wait for endpoint ``key``; when ``key`` held no one before,
        the time it starts holding (monotonic s), else None."""
        started = None
        if key not in self._parts:
            started = self._since[key] = time.monotonic()
        self._parts.setdefault(key, set()).add(part)
        self._endpoints.setdefault(part, set()).add(key)
        return started

    def holds(self, part: PartitionState) -> bool:
        """Whether ``part`` waits for some endpoint."""
        return part in self._endpoints

    def waits_for(self, part: PartitionState) -> set[str]:
        """The endpoints ``part`` waits for."""
        return set(self._endpoints.get(part, ()))

    def holding(self, key: str) -> bool:
        """Whether endpoint ``key`` holds some partition."""
        return key in self._parts

    def since(self, key: str) -> float | None:
        """Since when endpoint ``key`` holds partitions (monotonic s), or None."""
        return self._since.get(key)

    def release(self, key: str) -> None:
        """Endpoint ``key`` has room: what waited only for it goes on."""
        self._since.pop(key, None)
        for part in self._parts.pop(key, ()):
            keys = self._endpoints.get(part)
            if keys is None:
                continue
            keys.discard(key)
            if not keys:
                del self._endpoints[part]
                self._resumed.append(part)
                self._wake.set()

    def take_resumed(self) -> list[PartitionState]:
        """The partitions that went on since the last call."""
        resumed, self._resumed = self._resumed, []
        return resumed

    def forget(self, parts: Iterable[PartitionState]) -> None:
        """Partitions given up (revoked, lost): they wait for nothing any more."""
        for part in parts:
            for key in self._endpoints.pop(part, ()):
                waiting = self._parts.get(key)
                if waiting is None:
                    continue
                waiting.discard(part)
                if not waiting:
                    del self._parts[key]
                    self._since.pop(key, None)
