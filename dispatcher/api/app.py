"""The API application: routes, errors, limits, metrics and the Kafka-backed state.

``/healthz``, ``/readyz``, ``/openapi.json`` and the docs page (``/docs``, rendered
here from the OpenAPI document, with no external asset) need no key (they hold
no data); everything under ``/v1`` does.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import HTMLResponse, PlainTextResponse
from fastapi.routing import APIRoute
from prometheus_client import Counter, Histogram
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dispatcher import __version__
from dispatcher.api import contract, deliveries, docs_page, problems, webhooks
from dispatcher.api.auth import KeyRing, load_keys
from dispatcher.api.context import ApiContext
from dispatcher.api.forward import Forwarder, is_change
from dispatcher.api.historyfold import HistoryFolder
from dispatcher.api.historystore import HistoryReads, HistoryStore
from dispatcher.api.sample_sends import SampleSends
from dispatcher.api.store import Store
from dispatcher.api.webhooks import RETRY_AFTER_HEADER, problem
from dispatcher.backlog import BacklogView
from dispatcher.catalog import load_catalog
from dispatcher.config_writer import ConfigWriter
from dispatcher.core.health import Health
from dispatcher.errors import KafkaSetupError, Problem
from dispatcher.health_writer import HealthWriter
from dispatcher.metrics import REGISTRY
from dispatcher.settings import Settings

log = logging.getLogger(__name__)

API_REQUESTS = Counter(
    "dispatcher_api_requests_total",
    "API requests by route template, method and status code.",
    ["route", "method", "status"],
    registry=REGISTRY,
)
API_LATENCY = Histogram(
    "dispatcher_api_request_duration_seconds",
    "API request duration by route template.",
    ["route"],
    registry=REGISTRY,
)

#: The answers every operation can give (a route adds its own: 403 for a change,
#: 409, 412, 429...).
PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: problem(
        "No valid API key",
        headers={
            "WWW-Authenticate": {
                "description": "`Bearer`: the scheme to authenticate with",
                "schema": {"type": "string"},
            }
        },
    ),
    404: problem("Not found (another organization's webhook too)"),
    413: problem("Body too large"),
    422: problem("Invalid input, with field paths"),
    503: problem(
        "Not ready, the writer unreachable, or the change not applied (retry); where "
        "the outcome is unknown the problem's type ends in outcome-unknown",
        headers=RETRY_AFTER_HEADER,
    ),
}


class BodyLimit:
    """Refuse a body over the limit with 413, before any of it reaches a route.

    A declared length is checked at once; a chunked body is read here (up to the
    limit) and handed on whole, since a route's own read would turn the refusal
    into a parse error.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit() or int(declared) > self.max_bytes:
                await self._refuse(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        seen = 0
        while True:
            message = await receive()
            messages.append(message)
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            if message["type"] != "http.request" or not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        problem = Problem(413, "too-large", "Body too large", f"limit is {self.max_bytes} bytes")
        await problems.respond(problem, scope.get("path"))(scope, receive, send)


class Measure:
    """Count and time every request by route template, status code and method.

    A plain ASGI middleware: Starlette's ``BaseHTTPMiddleware`` runs each request
    through a task group and memory streams, several trips through the event loop
    per request, and each trip puts a request behind every other one in a burst.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # unless an answer starts: what the server sends for an escaped error

        async def noting(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, noting)
        finally:
            # The router writes the matched route into this same scope.
            # A change a replica sent on to the writer is timed there by its route.
            template = (
                "forwarded"
                if scope.get("forwarded")
                else getattr(scope.get("route"), "path", "unmatched")
            )
            API_REQUESTS.labels(template, scope["method"], str(status)).inc()
            API_LATENCY.labels(template).observe(time.perf_counter() - started)


class Probes:
    """``GET /healthz`` and ``GET /readyz`` answered before anything else runs for them.

    A probe needs no routing, key, body limit or metrics: answered here, from
    memory, it costs the event loop a few microseconds instead of a whole request's
    handling, so under load it waits for the loop's next turn only. (The routes
    below answer the same for other methods and document them.)
    """

    def __init__(self, app: ASGIApp, health: Health) -> None:
        self.app = app
        self.health = health

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            path = scope["path"]
            if path == "/healthz":
                ok, why = self.health.alive()
            elif path == "/readyz":
                ok, why = self.health.ready()
            else:
                await self.app(scope, receive, send)
                return
            body = (why + "\n").encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200 if ok else 503,
                    "headers": [
                        (b"content-type", b"text/plain; charset=utf-8"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def create_app(ctx: ApiContext, start_readers: bool = True) -> FastAPI:
    """The application over ``ctx``; its Kafka readers start with the server."""

    forwarder = Forwarder(ctx, ctx.settings.api_writer_url) if ctx.settings.api_writer_url else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # What start-up made (modules, models, the app) lives as long as the process:
        # kept out of the collector's full passes, which would otherwise walk all of it
        # on the event loop, in the middle of someone's request.
        gc.freeze()
        beat = asyncio.create_task(_heartbeat(health))
        starting = asyncio.create_task(_start_readers(ctx)) if start_readers else None
        try:
            yield
        finally:
            beat.cancel()
            await ctx.sample_sends.close()
            if forwarder is not None:
                await forwarder.close()
            if starting is not None:
                starting.cancel()
                if ctx.health is not None:
                    await asyncio.to_thread(ctx.health.stop)
                if ctx.writer is not None:
                    await asyncio.to_thread(ctx.writer.close)
                await asyncio.to_thread(ctx.history.stop)
                await asyncio.to_thread(ctx.store.stop)
                await asyncio.to_thread(ctx.backlog.stop)
            await asyncio.to_thread(ctx.reads.close)
            ctx.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="Bullseye webhooks API",
        version=__version__,
        description="Manage an organization's webhooks and see every delivery's history. "
        "Authenticate with `Authorization: Bearer <API key>`.",
        lifespan=lifespan,
        responses=PROBLEM_RESPONSES,
        generate_unique_id_function=operation_id,
        # Swagger UI and ReDoc load their assets from a CDN, out of reach of an
        # offline cluster: /docs is a self-contained page instead.
        docs_url=None,
        redoc_url=None,
    )
    health = Health(ctx.ready)
    app.state.health = health
    app.state.ctx = ctx
    app.state.keys = ctx.keys
    problems.install(app)
    app.include_router(webhooks.router)
    app.include_router(deliveries.router)

    # The probes answer from memory, on the event loop: no thread pool, no Kafka.
    # Liveness is the loop's heartbeat; readiness, the readers' state as they left it.
    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> PlainTextResponse:
        ok, why = health.alive()
        return PlainTextResponse(why + "\n", status_code=200 if ok else 503)

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> PlainTextResponse:
        ok, why = health.ready()
        return PlainTextResponse(why + "\n", status_code=200 if ok else 503)

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(app.state.docs_page)

    if forwarder is not None:

        @app.middleware("http")
        async def forward(request: Request, call_next: Any) -> Response:
            if is_change(request):
                request.scope["forwarded"] = True
                return await forwarder(request)
            response: Response = await call_next(request)
            return response

    # Each path with the methods its routes serve, for the Allow header of a 405.
    app.state.routes = [
        (route.path_regex, set(route.methods or ()))
        for route in [*app.router.routes, *webhooks.router.routes, *deliveries.router.routes]
        if isinstance(route, Route)
    ]
    app.add_middleware(Measure)
    app.add_middleware(BodyLimit, max_bytes=ctx.settings.api_max_body_bytes)
    # Outermost of ours: the probes skip the body limit, the metrics and the router.
    app.add_middleware(Probes, health=health)
    # The document (FastAPI keeps it once built) and the page, built now: the first
    # /openapi.json or /docs would otherwise spend most of a second of CPU on the
    # event loop, in front of every other request. They never change.
    contract.complete(app.openapi(), ctx.settings, [e.name for e in ctx.catalog])
    app.state.docs_page = docs_page.render(app.openapi())
    return app


# Route functions whose names read poorly as client method names.
_OPERATION_NAMES = {
    "event_types": "listEventTypes",
    "put_plan": "setPlan",
    "webhook_summary": "getWebhookSummary",
    "webhook_hourly_summary": "getWebhookHourlySummary",
}


def operation_id(route: APIRoute) -> str:
    """The operationId of a route: its function's name in camelCase (``createWebhook``).

    Client generators name their methods after it, so it must read well and never
    change with the path (FastAPI's default joins the name, path and method).
    """
    head, *rest = _OPERATION_NAMES.get(route.name, route.name).split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def build_context(settings: Settings) -> ApiContext:
    history = HistoryStore(settings.api_history_path, settings.attempts_topic)
    store = Store(settings)
    return ApiContext(
        settings=settings,
        store=store,
        history=HistoryFolder(settings, history),
        reads=HistoryReads(history, settings.api_history_readers),
        keys=KeyRing(load_keys(settings)),
        catalog=load_catalog(settings),
        sample_sends=SampleSends(settings),
        backlog=BacklogView(settings),
        # No writer URL: this process is the writer (a single API, the chart's writer).
        writer=None if settings.api_writer_url else ConfigWriter(settings, store),
    )


async def _heartbeat(health: Health) -> None:
    while True:
        health.beat()
        await asyncio.sleep(1.0)


async def _start_readers(ctx: ApiContext, every_s: float = 2.0) -> None:
    """Start the readers, waiting (alive, not ready, saying why) for missing topics.

    Like the dispatcher, a pod started before ``dispatcher topics ensure`` ran, or
    while Kafka is unreachable, waits instead of crash-looping.
    """
    # Waits for its topic in a thread of its own; readiness does not wait for it.
    ctx.backlog.start_when_available()
    for part in (ctx.store, ctx.history):
        while True:
            try:
                await asyncio.to_thread(part.start)
                break
            except KafkaSetupError as exc:
                if ctx.waiting_for != str(exc):
                    log.warning("API waiting: %s", exc)
                ctx.waiting_for = str(exc)
                await asyncio.sleep(every_s)
    ctx.waiting_for = None
    while ctx.writer is not None:
        try:
            await asyncio.to_thread(ctx.writer.take_role)
            ctx.waiting_for = None
            # The holder of the role folds webhook health, through the same producer.
            ctx.health = HealthWriter(ctx.settings, ctx.store, ctx.writer)
            ctx.health.start()
            return
        except KafkaSetupError as exc:
            if ctx.waiting_for != str(exc):
                log.warning("API waiting: %s", exc)
            ctx.waiting_for = str(exc)  # /readyz says why
            await asyncio.sleep(every_s)
