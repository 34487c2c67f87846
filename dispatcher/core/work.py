"""The one owner of the work bookkeeping: what each message still waits for, what is in flight.

Every piece of work taken from a message (an attempt, a deferral, a hand-over to
the next topic, an invalid-event write) holds a :class:`Ticket`. A ticket counts
once in the global in-flight number and once in its message's ``remaining``;
it ends exactly once, either *finished* (its result is final or durably written,
so the message may be committed past it) or *released* (it was cancelled,
abandoned or crashed: the in-flight place is given back, the message stays
unfinished and is delivered again by whoever reads the partition next).

A ticket whose write the broker refuses for good (:meth:`Work.refuse`) is
released, and :attr:`Work.refused` says so until a restart: the service is then
not ready, since that message will not move on by itself.

Nothing else changes these counts. Every ticket's coroutine runs as a task
started by :meth:`Work.start`, whose completion (normal, failed, or cancelled
before it even began) releases a ticket that did not finish, so no exception
can leak a count.

A finished message moves its partition's committable position here, at once
(a revoke reads it right after the partition's tasks end); the partitions it
moved wait in :meth:`Work.take_moved` for the engine to store. Every ended
ticket sets the engine's wake event: a place is free, and the engine's one
settling task stores positions and takes more work.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Coroutine
from typing import Any

from dispatcher import metrics
from dispatcher.core.partitions import PartitionState, Phase, Slot

log = logging.getLogger(__name__)


class Ticket:
    """One unit of work of one message; ends once (finished or released)."""

    __slots__ = ("ended", "label", "slot")

    def __init__(self, slot: Slot, label: str) -> None:
        self.slot = slot
        self.label = label  # a delivery id or a message position, for the logs
        self.ended = False


class Work:
    """Counts tickets per message and globally; moves the offsets of finished messages."""

    def __init__(self, wake: asyncio.Event) -> None:
        self.in_flight = 0
        #: The last write refused for good, whose message now waits for a restart.
        self.refused: str | None = None
        self._wake = wake
        #: Partitions whose committable position moved since :meth:`take_moved`.
        self._moved: set[PartitionState] = set()
        # Read when scraped, not set on every change: two gauge writes (a lock each)
        # per delivery otherwise.
        metrics.IN_FLIGHT.set_function(lambda: self.in_flight)

    def message(self, slot: Slot) -> _Fanning:
        """Hold ``slot`` open while it fans out, so it is finished only once all is counted."""
        return _Fanning(self, slot)

    def open(self, slot: Slot, label: str) -> Ticket:
        slot.remaining += 1
        self._add(1)
        return Ticket(slot, label)

    def finish(self, ticket: Ticket) -> None:
        """The ticket's result is final or durably written: its message may move on."""
        if ticket.ended:
            return
        ticket.ended = True
        self._add(-1)
        self._done_with(ticket.slot)
        self._wake.set()

    def release(self, ticket: Ticket) -> None:
        """Give back the in-flight place; the message stays unfinished."""
        if ticket.ended:
            return
        ticket.ended = True
        self._add(-1)
        self._wake.set()

    def refuse(self, ticket: Ticket, why: str) -> None:
        """A write no retry can fix: release the ticket and turn the service not ready."""
        self.refused = why
        self.release(ticket)

    def start(self, ticket: Ticket, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run one ticket's work as a task, kept in its partition's tasks until it ends
        (a revoke or the shutdown waits for those)."""
        task = asyncio.get_running_loop().create_task(coro)
        ticket.slot.part.tasks.add(task)
        # One done callback, not one per duty: each is a turn of the event loop on
        # every delivery. It runs even for a task cancelled before its first step,
        # which never enters its own ``finally``.
        task.add_done_callback(functools.partial(self._ended, ticket))
        return task

    def _ended(self, ticket: Ticket, task: asyncio.Task[None]) -> None:
        """A ticket's task is done: forget it, log what escaped it, release the ticket."""
        ticket.slot.part.tasks.discard(task)
        if not task.cancelled():
            exc = task.exception()
            if isinstance(exc, Exception):
                # Whatever escapes a ticket's work is logged once and counted, never
                # lost silently.
                metrics.INTERNAL_ERRORS.labels("task").inc()
                log.error(
                    "unexpected error in %s; its message will be read again",
                    ticket.label,
                    exc_info=exc,
                )
        self.release(ticket)

    def take_moved(self) -> set[PartitionState]:
        """The partitions whose committable position moved since the last call."""
        moved, self._moved = self._moved, set()
        return moved

    def _done_with(self, slot: Slot) -> None:
        slot.remaining -= 1
        if slot.remaining:
            return
        part = slot.part
        # A revoked partition's offsets are another member's now.
        if part.phase is not Phase.REVOKED and part.tracker.finished(slot.offset):
            part.progress_at = time.monotonic()
            self._moved.add(part)
            self._wake.set()

    def _add(self, n: int) -> None:
        self.in_flight += n


class _Fanning:
    """:meth:`Work.message`'s context: a class rather than a generator, as it is
    entered for every message."""

    __slots__ = ("_slot", "_work")

    def __init__(self, work: Work, slot: Slot) -> None:
        self._work = work
        self._slot = slot

    def __enter__(self) -> None:
        self._slot.remaining += 1

    def __exit__(self, *_exc: object) -> None:
        self._work._done_with(self._slot)
