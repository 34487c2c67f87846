"""What every route needs: settings, the Kafka-backed state, keys, the catalog.

Routes are ``async``: reads answer from memory on the event loop, and so do
``/healthz`` and ``/readyz``. What blocks (a write produced and read back, a
history record fetched by position, the DNS lookups of the address guard) runs
through :meth:`ApiContext.blocking`, on threads of the API's own, so it never
holds the event loop nor queues in front of a read or a probe.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

from fastapi import Request

from dispatcher.api.auth import KeyRing
from dispatcher.api.historyfold import HistoryFolder
from dispatcher.api.historystore import HistoryReads
from dispatcher.api.sample_sends import SampleSends
from dispatcher.api.store import Store
from dispatcher.backlog import BacklogView
from dispatcher.catalog import EventType
from dispatcher.config_writer import ConfigWriter
from dispatcher.errors import Problem
from dispatcher.health_writer import HealthWriter
from dispatcher.settings import Settings

P = ParamSpec("P")
T = TypeVar("T")

#: Threads for blocking work. Writes wait for Kafka (up to DISPATCHER_API_WRITE_TIMEOUT_S
#: each when it is slow), so a handful of threads is enough for a dashboard's writes;
#: more requests wait their turn here, never in front of a read.
BLOCKING_THREADS = 16


def _blocking_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(BLOCKING_THREADS, thread_name_prefix="api-blocking")


@dataclass(slots=True)
class ApiContext:
    settings: Settings
    store: Store
    #: Folds the attempts topic into the history store (its one writer).
    history: HistoryFolder
    #: Reads the history store, on threads of its own.
    reads: HistoryReads
    keys: KeyRing
    catalog: list[EventType]
    sample_sends: SampleSends
    #: The dispatcher instances' backlog snapshots (the webhooks' ``backlog`` field).
    #: Not part of readiness: until it has read them, the field is null.
    backlog: BacklogView
    #: Where blocking work runs (see :meth:`blocking`).
    pool: ThreadPoolExecutor = field(default_factory=_blocking_pool)
    #: The one writer, in the process that holds the role; None in a replica that
    #: forwards changes to DISPATCHER_API_WRITER_URL.
    writer: ConfigWriter | None = None
    #: The writer's fold of webhook health (started once it holds the role).
    health: HealthWriter | None = None
    #: Why the readers have not started (a missing topic, no broker), or None.
    waiting_for: str | None = "starting"

    def ready(self) -> tuple[bool, str]:
        """From memory only: the probes must answer whatever Kafka or the disk do."""
        if self.waiting_for is not None:
            return False, self.waiting_for
        for part, name in ((self.store, "webhooks"), (self.history, "delivery history")):
            if part.failure is not None:
                return False, f"{name} reader stopped: {part.failure}"
            if not part.caught_up:
                return False, f"{name} not caught up yet"
        if self.writer is not None and not self.writer.takeovers:
            return False, "not holding the writer role yet"
        if self.writer is not None:
            if self.health is None or not self.health.positioned.is_set():
                return False, "webhook health not reading the attempts yet"
            if self.health.failure is not None:
                return False, f"webhook health stopped: {self.health.failure}"
        return True, "ok"

    async def blocking(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` on the API's blocking threads; the loop stays free."""
        call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self.pool, call)


async def context(request: Request) -> ApiContext:
    """Dependency: the context, once the state has caught up (503 before); memory only,
    so on the event loop rather than a hop through the worker threads."""
    ctx: ApiContext = request.app.state.ctx
    ok, why = ctx.ready()
    if not ok:
        raise Problem(503, "not-ready", "Not ready", why, headers={"Retry-After": "2"})
    return ctx
