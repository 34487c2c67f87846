"""What every route needs: settings, the Kafka-backed state, keys, the catalog."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from dispatcher.api.auth import KeyRing
from dispatcher.api.historyfold import HistoryFolder
from dispatcher.api.historystore import HistoryReads
from dispatcher.api.idempotency import IdempotencyCache
from dispatcher.api.problems import Problem
from dispatcher.api.store import Store
from dispatcher.catalog import EventType
from dispatcher.settings import Settings


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
    idempotency: IdempotencyCache
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
        return True, "ok"


async def context(request: Request) -> ApiContext:
    """Dependency: the context, once the state has caught up (503 before); memory only,
    so on the event loop rather than a hop through the worker threads."""
    ctx: ApiContext = request.app.state.ctx
    ok, why = ctx.ready()
    if not ok:
        raise Problem(503, "not-ready", "Not ready", why, headers={"Retry-After": "2"})
    return ctx
