"""``dispatcher run``: wire the table, the engine and the health port together."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal

from dispatcher import kafka, metrics
from dispatcher.catalog import Catalog
from dispatcher.core.engine import Engine
from dispatcher.core.health import Health, HealthServer
from dispatcher.core.producer import AsyncProducer
from dispatcher.core.table import SubscriptionTable
from dispatcher.errors import EngineFailure, KafkaSetupError
from dispatcher.logs import KAFKA_CLIENT_LOGGER
from dispatcher.outbound.transport import build_transport
from dispatcher.settings import Settings

#: The cyclic collector's thresholds while dispatching (Python's are 700, 10, 10).
#: Every delivery in flight is many container objects (the request, its headers,
#: the connection's buffers, the task) living as long as the endpoint takes to
#: answer, so at Python's thresholds they reach the older generations and each
#: collection walks all of them, to find nothing: in none of the benchmark phases
#: measured (hot, slow, latency, isolation, memory) did the collector free a
#: single object. With 512 deliveries in flight to endpoints
#: answering in 200 ms, collections took a fifth of the process's CPU, a third at
#: 2,048 (a full collection 160 ms, a pause of every delivery). Young collections
#: 14 times less often, older ones 70 and 350 times: 2 % and 15 % there, each
#: young collection a few milliseconds. Cyclic garbage (a failure's traceback
#: kept somewhere) is still collected, later.
GC_THRESHOLDS = (10_000, 50, 50)

log = logging.getLogger(__name__)


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or ``stop`` is set), then drain and commit.

    Raises :class:`KafkaSetupError` after a clean shutdown if the subscriptions
    table stopped following its topic: dispatching on a stale table would call
    deleted or disabled endpoints, so the process exits and is restarted. Raises
    :class:`EngineFailure` likewise when the pump or a polling thread died.
    """
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    catalog = Catalog.load(settings)  # a bad catalog stops start-up with one line
    kafka.send_client_logs_to(logging.getLogger(KAFKA_CLIENT_LOGGER))
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Not possible off the main thread (an embedding caller then sets ``stop``).
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    table = SubscriptionTable(settings, on_change=metrics.SUBSCRIPTIONS_LOADED.set)
    engine: Engine | None = None
    failure: str | None = None

    def is_ready() -> tuple[bool, str]:
        if table.failure is not None:
            return False, f"subscriptions table failed: {table.failure}"
        if table.waiting_for is not None:
            return False, f"subscriptions table waiting: {table.waiting_for}"
        if not table.caught_up:
            return False, "subscriptions table is still loading"
        if engine is None or not engine.ready:
            return False, "joining the consumer groups"
        if engine.failure is not None:
            return False, engine.failure
        if stop.is_set():
            return False, "shutting down"
        # What the clients last reported, read from memory: a probe never waits on
        # a broker that is away.
        disconnected = engine.disconnected or producer.link.problem()
        if disconnected is not None:
            return False, disconnected
        if engine.refused is not None:
            return False, f"{engine.refused}; fix the topic or its ACLs, then restart"
        if engine.stuck:
            return False, "partitions not moving while work is pending: " + ", ".join(engine.stuck)
        return True, "ok"

    health = Health(is_ready)
    server = (
        HealthServer(settings.http_host, settings.http_port, health) if settings.http_port else None
    )
    if server is not None:
        server.start()
        log.info("health and metrics on port %d", server.port)

    table.start()
    stopped = asyncio.ensure_future(stop.wait())
    # No event is dispatched before the table holds every subscription that existed
    # at start-up; until then /readyz says so.
    while not table.caught_up and not stop.is_set() and table.failure is None:
        health.beat()
        await asyncio.wait({stopped}, timeout=0.1)
    if table.failure is not None:
        stop.set()
    # What start-up built (the table above all) lives as long as the process: out
    # of the collector's sight, a full collection no longer walks it. With 100,000
    # subscriptions one took 80 ms, a pause of every delivery; frozen, none.
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    sender = build_transport(settings)
    producer = AsyncProducer(settings, loop)
    try:
        if not stop.is_set():
            engine = Engine(settings, table, sender, producer, catalog=catalog)
            engine.start()
            log.info("dispatching", extra={"subscriptions": len(table)})
            while not stop.is_set():
                health.beat()
                metrics.READY.set(1 if is_ready()[0] else 0)
                if table.failure is not None:
                    log.error("subscriptions table stopped following its topic; shutting down")
                    break
                if engine.failure is not None:
                    failure = engine.failure
                    log.error("%s; shutting down", failure)
                    break
                await asyncio.wait({stopped}, timeout=1.0)
            metrics.READY.set(0)
            log.info("stopping: draining in-flight deliveries")
            await engine.shutdown()
        else:
            producer.close()
    finally:
        await sender.aclose()
        table.stop()
        if server is not None:
            server.stop()
    if table.failure is not None:
        raise KafkaSetupError(f"subscriptions table failed: {table.failure}")
    if failure is not None:
        raise EngineFailure(failure)
    log.info("stopped")
