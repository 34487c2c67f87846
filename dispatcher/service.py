"""``dispatcher run``: wire the table, the engine and the health port together."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal

from dispatcher import kafka, metrics
from dispatcher.engine import Engine
from dispatcher.errors import KafkaSetupError
from dispatcher.health import Health, HealthServer
from dispatcher.logs import KAFKA_CLIENT_LOGGER
from dispatcher.producer import AsyncProducer
from dispatcher.settings import Settings
from dispatcher.table import SubscriptionTable
from dispatcher.transport import build_http_client

log = logging.getLogger(__name__)


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or ``stop`` is set), then drain and commit.

    Raises :class:`KafkaSetupError` after a clean shutdown if the subscriptions
    table stopped following its topic: dispatching on a stale table would call
    deleted or disabled endpoints, so the process exits and is restarted.
    """
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    kafka.send_client_logs_to(logging.getLogger(KAFKA_CLIENT_LOGGER))
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Not possible off the main thread (an embedding caller then sets ``stop``).
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    table = SubscriptionTable(settings, on_change=metrics.SUBSCRIPTIONS_LOADED.set)
    engine: Engine | None = None

    def is_ready() -> tuple[bool, str]:
        if table.failure is not None:
            return False, f"subscriptions table failed: {table.failure}"
        if table.waiting_for is not None:
            return False, f"subscriptions table waiting: {table.waiting_for}"
        if not table.caught_up:
            return False, "subscriptions table is still loading"
        if engine is None or not engine.ready:
            return False, "joining the consumer groups"
        if stop.is_set():
            return False, "shutting down"
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
    client = build_http_client(settings)
    producer = AsyncProducer(settings, loop)
    try:
        if not stop.is_set():
            engine = Engine(settings, table, client, producer)
            engine.start()
            log.info("dispatching", extra={"subscriptions": len(table)})
            while not stop.is_set():
                health.beat()
                metrics.READY.set(1 if is_ready()[0] else 0)
                if table.failure is not None:
                    log.error("subscriptions table stopped following its topic; shutting down")
                    break
                await asyncio.wait({stopped}, timeout=1.0)
            metrics.READY.set(0)
            log.info("stopping: draining in-flight deliveries")
            await engine.shutdown()
        else:
            producer.close()
    finally:
        await client.aclose()
        table.stop()
        if server is not None:
            server.stop()
    if table.failure is not None:
        raise KafkaSetupError(f"subscriptions table failed: {table.failure}")
    log.info("stopped")
