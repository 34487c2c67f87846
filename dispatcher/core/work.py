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
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from dispatcher import metrics
from dispatcher.core.partitions import Slot

log = logging.getLogger(__name__)


class Ticket:
    """One unit of work of one message; ends once (finished or released)."""

    __slots__ = ("ended", "label", "slot")

    def __init__(self, slot: Slot, label: str) -> None:
        self.slot = slot
        self.label = label  # a delivery id or a message position, for the logs
        self.ended = False


class Work:
    """Counts tickets per message and globally; calls back when a message is finished."""

    def __init__(self, on_finished: Callable[[Slot], None], on_freed: Callable[[], None]) -> None:
        self.in_flight = 0
        #: The last write refused for good, whose message now waits for a restart.
        self.refused: str | None = None
        self._on_finished = on_finished
        self._on_freed = on_freed
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
        self._on_freed()

    def release(self, ticket: Ticket) -> None:
        """Give back the in-flight place; the message stays unfinished."""
        if ticket.ended:
            return
        ticket.ended = True
        self._add(-1)
        self._on_freed()

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

    def _done_with(self, slot: Slot) -> None:
        slot.remaining -= 1
        if slot.remaining == 0:
            self._on_finished(slot)

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
