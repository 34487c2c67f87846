"""A webhook's rate limit: when its next delivery may start, and this instance's share.

A webhook with ``rate_limit_per_s`` set has its deliveries' *starts* spaced at
least ``1 / rate`` apart on each instance (:class:`StartSpacing`): a token bucket
of one token, so no burst, and in any window of ``w`` seconds (half-open) one
instance starts at most ``ceil(rate x w)`` of them. A start made late (the event
loop was busy) does not let the next one start early: the spacing never
shortens, so the rate reached is at most the limit, and at most what a late
start lost below it.

Across instances each one takes a share of the limit (:func:`partition_share`):
the fraction of the partitions it consumes, over every stage topic. Each
partition is consumed by exactly one instance at a time, so the shares add up to
one and the instances together start at most the limit a second, plus at most
one start per instance in any window (each one's first). A webhook's events
reach an instance in proportion to its partitions when the input's keys spread
them (deliveries parked or retried go to the retry topics keyed by delivery id,
which spreads them anyway), so each share is used; where they do not (all of a
webhook's traffic in one input partition), what exceeds the local share is
parked and comes back spread over the retry topics' partitions, to every
instance. The limit is an upper bound, never exceeded by more than that
tolerance; the rate reached may fall short of it while the shares move
(a rebalance) or when a backlog is too small to reach every instance.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable


class StartSpacing:
    """Spaces one webhook's starts on this instance at least ``1 / per_s`` apart."""

    __slots__ = ("_clock", "next_at", "per_s")

    def __init__(self, per_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not per_s > 0 or math.isinf(per_s):
            raise ValueError(f"a rate limit is a positive number, not {per_s!r}")
        self.per_s = per_s
        self._clock = clock
        #: When the next start may be made (clock seconds).
        self.next_at = -math.inf

    def wait(self) -> float:
        """Seconds until a start may be made; 0 when one may be made now."""
        return max(0.0, self.next_at - self._clock())

    @property
    def ready(self) -> bool:
        return self._clock() >= self.next_at

    def take(self) -> None:
        """A start is made now (whether or not it was :attr:`ready`: probes, say)."""
        self.next_at = max(self.next_at, self._clock()) + 1 / self.per_s

    def set_rate(self, per_s: float) -> None:
        """A new limit; the spacing after the last start follows it at once."""
        if per_s == self.per_s:
            return
        if not per_s > 0 or math.isinf(per_s):
            raise ValueError(f"a rate limit is a positive number, not {per_s!r}")
        if self.next_at != -math.inf:
            self.next_at += 1 / per_s - 1 / self.per_s
        self.per_s = per_s


def partition_share(owned: int, totals: Iterable[int | None]) -> float:
    """The fraction of a webhook's limit this instance takes.

    ``owned``: the partitions it consumes now, over every stage; ``totals``: each
    stage's partition count (None while not known yet). Until every count is known,
    or while it owns none, it takes the whole limit: alone, that is exact; among
    others, for the first seconds after a start, it is the tolerance.
    """
    counts = list(totals)
    if owned <= 0 or not counts or any(n is None for n in counts):
        return 1.0
    total = sum(n for n in counts if n is not None)
    if total <= 0:
        return 1.0
    return min(1.0, owned / total)
