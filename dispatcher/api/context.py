"""What every route needs: settings, the Kafka-backed state, keys, the catalog."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from dispatcher.api.auth import KeyRing
from dispatcher.api.history import HistoryIndex, HistoryReader
from dispatcher.api.problems import Problem
from dispatcher.api.store import Store
from dispatcher.catalog import EventType
from dispatcher.config_writer import ConfigWriter
from dispatcher.settings import Settings


@dataclass(slots=True)
class ApiContext:
    settings: Settings
    store: Store
    index: HistoryIndex
    history: HistoryReader
    keys: KeyRing
    catalog: list[EventType]
    #: The one writer, in the process that holds the role; None in a replica that
    #: forwards changes to DISPATCHER_API_WRITER_URL.
    writer: ConfigWriter | None = None
    #: Why the readers have not started (a missing topic, no broker), or None.
    waiting_for: str | None = "starting"

    def ready(self) -> tuple[bool, str]:
        if self.waiting_for is not None:
            return False, self.waiting_for
        for part, name in ((self.store, "webhooks"), (self.history, "delivery history")):
            if part.failure is not None:
                return False, f"{name} reader stopped: {part.failure}"
            if not part.caught_up:
                return False, f"{name} not caught up yet"
        if self.writer is not None and not self.writer.takeovers:
            return False, "not holding the writer role yet"
        return True, "ok"


def context(request: Request) -> ApiContext:
    """Dependency: the context, once the state has caught up (503 before)."""
    ctx: ApiContext = request.app.state.ctx
    ok, why = ctx.ready()
    if not ok:
        raise Problem(503, "not-ready", "Not ready", why, headers={"Retry-After": "2"})
    return ctx
