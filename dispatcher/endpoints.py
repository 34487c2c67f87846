"""Per-endpoint isolation: concurrency slots, a bounded wait queue, a circuit breaker.

An endpoint is a URL's origin (scheme, host, port). A slow or dead endpoint can
hold only its own slots and queue; whatever does not fit is deferred to the
retry path by the caller, so nothing else waits on it.

The queue is bounded by how long its last item would wait, not only by a count:
an endpoint that completes 2,000 requests a second may queue 2,000 x
``queue_wait_s`` deliveries, one that completes none keeps ``queue_size``. Until
its rate has been measured over one window an endpoint is trusted; once
measured, what exceeds the bound is handed back (:meth:`Endpoint.excess`) so a
burst sent to an endpoint that turned out to be stalled does not stay queued.
"""

from __future__ import annotations

import functools
import time
from collections import deque
from collections.abc import Callable
from enum import Enum
from typing import Generic, TypeVar
from urllib.parse import urlsplit

from dispatcher import metrics

T = TypeVar("T")

#: Completions are counted over windows of this length to estimate the rate.
RATE_WINDOW_S = 1.0


@functools.lru_cache(maxsize=4096)  # called for every delivery; URLs repeat
def endpoint_key(url: str) -> str:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}"


class Admission(Enum):
    START = "start"
    QUEUED = "queued"
    BUSY = "endpoint_busy"
    CIRCUIT_OPEN = "circuit_open"


class Endpoint(Generic[T]):
    """Slots, queue and breaker of one endpoint; items are opaque to it."""

    __slots__ = (
        "_clock",
        "_window_count",
        "_window_start",
        "active",
        "cooldown_s",
        "failures",
        "limit",
        "open_until",
        "probing",
        "queue",
        "queue_size",
        "queue_wait_s",
        "rate",
        "threshold",
    )

    def __init__(
        self,
        limit: int,
        queue_size: int,
        threshold: int,
        cooldown_s: float,
        clock: Callable[[], float] = time.monotonic,
        queue_wait_s: float = 0.0,
    ) -> None:
        self.limit = limit
        self.queue_size = queue_size
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.active = 0
        self.queue: deque[T] = deque()
        self.failures = 0
        self.open_until: float | None = None
        self.probing = False
        self._clock = clock
        self.queue_wait_s = queue_wait_s
        #: Completions per second over the last full window; None until measured.
        self.rate: float | None = None
        self._window_start = clock()
        self._window_count = 0

    def admit(self, item: T) -> Admission:
        """Take ``item`` now, queue it, or say why it must be deferred."""
        if self.open_until is not None:
            if self._clock() < self.open_until or self.probing:
                return Admission.CIRCUIT_OPEN
            # Cool-down over: let exactly one probe through (half-open).
            self.probing = True
            metrics.CIRCUIT_TRANSITIONS.labels("half_open").inc()
            self.active += 1
            return Admission.START
        if self.active < self.limit:
            self.active += 1
            return Admission.START
        if len(self.queue) < self.queue_bound():
            self.queue.append(item)
            return Admission.QUEUED
        return Admission.BUSY

    def queue_bound(self) -> float:
        """How many deliveries may wait here now (see the module docstring)."""
        self._roll_window()
        if self.rate is None:
            return float("inf") if self.queue_wait_s > 0 else self.queue_size
        return max(self.queue_size, self.rate * self.queue_wait_s)

    def excess(self) -> list[T]:
        """Queued items beyond the bound (newest first out), to be deferred."""
        bound = self.queue_bound()
        out: list[T] = []
        while len(self.queue) > bound:
            out.append(self.queue.pop())
        return out

    def _roll_window(self) -> None:
        now = self._clock()
        elapsed = now - self._window_start
        if elapsed >= RATE_WINDOW_S:
            # Only a saturated window says how fast the endpoint is; an unsaturated
            # one (or idle time) says nothing, and the endpoint is trusted again.
            self.rate = self._window_count / elapsed if self.queue else None
            self._window_start = now
            self._window_count = 0

    def release(self, ok: bool | None) -> T | None:
        """A running delivery ended; returns the next queued item to start, if any.

        ``ok`` is None for a cancelled delivery, which says nothing about the endpoint.
        """
        self.active -= 1
        self._window_count += 1
        if ok is not None:
            self._record(ok)
        elif self.probing:
            self.probing = False
        if self.open_until is not None:
            return None
        if self.queue and self.active < self.limit:
            self.active += 1
            return self.queue.popleft()
        return None

    def drain_queue(self) -> list[T]:
        """Everything waiting (to defer it when the circuit opens or work is revoked)."""
        items = list(self.queue)
        self.queue.clear()
        return items

    def _record(self, ok: bool) -> None:
        if ok:
            self.failures = 0
            if self.open_until is not None:
                self.open_until = None
                self.probing = False
                metrics.CIRCUIT_OPEN.dec()
                metrics.CIRCUIT_TRANSITIONS.labels("closed").inc()
            return
        self.failures += 1
        if self.open_until is not None:
            if self.probing:  # the probe failed: stay open for another cool-down
                self.probing = False
                self.open_until = self._clock() + self.cooldown_s
                metrics.CIRCUIT_TRANSITIONS.labels("open").inc()
            return
        if self.failures >= self.threshold:
            self.open_until = self._clock() + self.cooldown_s
            metrics.CIRCUIT_OPEN.inc()
            metrics.CIRCUIT_TRANSITIONS.labels("open").inc()

    @property
    def idle(self) -> bool:
        return self.active == 0 and not self.queue and self.open_until is None
