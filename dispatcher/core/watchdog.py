"""The progress watchdog: partitions whose committable offset stands still while work waits.

A partition is *pending* when messages taken from it are unfinished, or its
buffered head is due. Its clock restarts whenever its committable offset moves
(the engine sets ``progress_at``) or nothing is pending; pending for longer than
``stuck_partition_after_s`` without a move, it is reported stuck: in the
``dispatcher_stuck_partitions`` metric, ``/readyz`` and one warning.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from dispatcher import metrics
from dispatcher.core.partitions import PartitionState, now_ms
from dispatcher.records import due_ms_of
from dispatcher.settings import Settings

log = logging.getLogger(__name__)


def stuck_partitions(
    partitions: Iterable[PartitionState], settings: Settings, before: int = 0
) -> list[str]:
    """Check every partition; the stuck ones as ``topic/partition for N s``.

    ``before`` is how many were stuck at the last check: a warning is logged only
    when more are.
    """
    now = time.monotonic()
    wall = now_ms()
    after = settings.stuck_partition_after_s
    stuck = []
    for ps in partitions:
        if not pending(ps, wall):
            ps.progress_at = now
        elif now - ps.progress_at > after:
            was = ps.progress_at
            stuck.append(f"{ps.tp.topic}/{ps.tp.partition} for {now - was:.0f} s")
    if len(stuck) > before:
        log.warning("partitions not moving while work is pending: %s", ", ".join(stuck))
    metrics.STUCK_PARTITIONS.set(len(stuck))
    return stuck


def pending(ps: PartitionState, now_ms: int) -> bool:
    """Work taken from the partition and unfinished, or a buffered head that is due."""
    if ps.tracker.unfinished > len(ps.buffer):
        return True
    if not ps.buffer:
        return False
    return ps.stage is None or due_ms_of(ps.buffer[0].headers()) <= now_ms
