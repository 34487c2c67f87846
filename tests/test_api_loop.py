"""The API keeps its event loop free: every route and dependency is ``async`` (FastAPI
would run a plain function on the thread pool a probe could wait behind), and the
test-send bounds count slots taken and given back, against a real socket."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import pytest
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from dispatcher.api.app import build_context, create_app
from dispatcher.api.sample_sends import SampleSends
from dispatcher.errors import Problem
from dispatcher.models import Subscription
from dispatcher.settings import Settings

NOW = datetime(2026, 1, 1, 12, tzinfo=UTC)


def calls(dependant: Dependant) -> list[object]:
    found: list[object] = [dependant.call]
    for sub in dependant.dependencies:
        found += calls(sub)
    return found


def routes(items: Sequence[object]) -> Iterator[object]:
    """Every route, those of included routers too."""
    for item in items:
        inner = getattr(item, "original_router", None)
        if inner is not None:
            yield from routes(inner.routes)
        else:
            yield item


def test_every_route_and_dependency_runs_on_the_event_loop() -> None:
    app = create_app(build_context(Settings()), start_readers=False)
    seen = set()
    for route in routes(app.routes):
        endpoint = getattr(route, "endpoint", None)
        assert endpoint is not None, route
        assert inspect.iscoroutinefunction(endpoint), f"{route}: plain def runs on the pool"
        if isinstance(route, APIRoute):
            for call in calls(route.dependant):
                # A callable object (the bearer scheme's) counts by its __call__, as
                # FastAPI decides where to run it.
                method = getattr(call, "__call__", None)  # noqa: B004
                assert inspect.iscoroutinefunction(call) or inspect.iscoroutinefunction(method), (
                    f"{route.path}: {call}"
                )
        seen.add(getattr(route, "path", ""))
    assert {"/healthz", "/readyz", "/v1/organizations/{org}/webhooks/{webhook_id}/test"} <= seen


@asynccontextmanager
async def silent_endpoint() -> AsyncIterator[int]:
    """A real TCP endpoint that accepts and reads, and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read(65536)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


def sub(org: str, port: int) -> Subscription:
    return Subscription(
        webhook_id=f"wh_{org}",
        organization_id=org,
        url=f"http://127.0.0.1:{port}/hook",
        events=("visitor.identified",),
        enabled=True,
        plan="scale",
        created_at=NOW,
        updated_at=NOW,
    )


async def until(check: object, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def test_test_sends_are_bounded_per_organization_and_in_all() -> None:
    settings = Settings(
        allow_http=True,
        allowed_networks=["127.0.0.0/8"],
        api_test_send_timeout_s=0.5,
        api_test_sends_per_organization=2,
        api_test_sends_max=3,
    )

    async def scenario() -> None:
        sends = SampleSends(settings)
        async with silent_endpoint() as port:
            a1 = asyncio.create_task(sends.send(sub("org_a", port)))
            a2 = asyncio.create_task(sends.send(sub("org_a", port)))
            await until(lambda: sends.of("org_a") == 2)
            with pytest.raises(Problem) as own:
                await sends.send(sub("org_a", port))
            assert own.value.status == 429 and own.value.kind == "too-many-test-sends"
            assert own.value.headers == {"Retry-After": "1"}
            assert "already has 2 test sends in flight" in str(own.value.detail)
            b1 = asyncio.create_task(sends.send(sub("org_b", port)))
            await until(lambda: sends.in_flight == 3)
            with pytest.raises(Problem) as all_:
                await sends.send(sub("org_c", port))
            assert "3 test sends are in flight" in str(all_.value.detail)
            assert sends.of("org_c") == 0  # a refusal takes nothing
            reports = await asyncio.gather(a1, a2, b1)
            assert [r.result.error_class for r in reports] == ["timeout"] * 3
            assert all(r.reason.endswith("no answer within 0.5 s") for r in reports)
            # Every slot is given back, and a cancelled send gives its own back too.
            assert sends.in_flight == 0 and sends.of("org_a") == sends.of("org_b") == 0
            gone = asyncio.create_task(sends.send(sub("org_a", port)))
            await until(lambda: sends.in_flight == 1)
            gone.cancel()
            with pytest.raises(asyncio.CancelledError):
                await gone
            assert sends.in_flight == 0 and sends.of("org_a") == 0
        await sends.close()

    asyncio.run(scenario())
