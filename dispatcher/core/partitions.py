"""The state of one assigned partition, and of one message taken from it."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from enum import Enum
from typing import Final

from confluent_kafka import Message, TopicPartition

from dispatcher.core.consumer import StageFeed
from dispatcher.core.offsets import OffsetTracker
from dispatcher.stages import RetryStage

#: Hops remembered per retry partition to skip copies of; a copy is written
#: within a restart of the original, so it follows it closely in the partition.
HOPS_REMEMBERED: Final = 50_000


def now_ms() -> int:
    return int(time.time() * 1000)


class Phase(Enum):
    """Where a partition is in its assignment; it only ever moves down this list."""

    #: Assigned: its messages are taken and new work starts.
    ACTIVE = "active"
    #: Being revoked (or shutting down): no new work starts, what runs may still
    #: finish and its offsets count.
    DRAINING = "draining"
    #: Given up: completions no longer move its offsets.
    REVOKED = "revoked"


class PartitionState:
    """One assigned partition of one stage."""

    __slots__ = (
        "buffer",
        "consumer",
        "hops",
        "paused",
        "phase",
        "progress_at",
        "queued",
        "stage",
        "tasks",
        "timer",
        "tp",
        "tracker",
    )

    def __init__(self, consumer: StageFeed, tp: TopicPartition, stage: RetryStage | None):
        self.consumer = consumer
        self.tp = TopicPartition(tp.topic, tp.partition)
        self.stage = stage  # None for the input stage
        self.tracker = OffsetTracker()
        self.buffer: deque[Message] = deque()
        self.paused = False
        self.queued = False  # in the pump's run queue
        self.phase = Phase.ACTIVE
        self.tasks: set[asyncio.Task[None]] = set()
        self.timer: asyncio.TimerHandle | None = None
        #: Hops of retry records read here, newest last (see :meth:`seen_before`).
        self.hops: OrderedDict[int, None] = OrderedDict()
        #: When the committable offset last moved, or work became pending (monotonic s).
        self.progress_at = time.monotonic()

    def seen_before(self, hop: int) -> bool:
        """Whether a record of this hop was read here already; remembers it if not."""
        if hop in self.hops:
            return True
        self.hops[hop] = None
        if len(self.hops) > HOPS_REMEMBERED:
            self.hops.popitem(last=False)
        return False


@dataclass(slots=True, eq=False)
class Slot:
    """One consumed message, finished when ``remaining`` deliveries reach zero."""

    part: PartitionState
    offset: int
    remaining: int = 0


def position_of(msg: Message) -> tuple[str, int, int]:
    """Topic, partition and offset of a consumed (never an error) message."""
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    assert topic is not None and partition is not None and offset is not None
    return topic, partition, offset
