"""The delivery client's connections: kept alive per origin, capped, closed when idle.

Every socket is made through :class:`~tests.sockets.Sockets`, which counts the
connections opened and sees each one closed, so reuse, caps and clean-up are
checked on the wire against real HTTPS receivers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from dispatcher.outbound.delivery import post
from dispatcher.outbound.transport import DeliveryClient, build_http_client
from dispatcher.settings import Settings, load_settings
from tests.receiver import HttpsReceiver, Reply
from tests.sockets import Sockets, eventually


@pytest.fixture(scope="module")
def first() -> Iterator[HttpsReceiver]:
    with HttpsReceiver() as server:
        yield server


@pytest.fixture(scope="module")
def second(first: HttpsReceiver) -> Iterator[HttpsReceiver]:
    with HttpsReceiver(ca=first.ca) as server:
        yield server


@pytest.fixture(autouse=True)
def _clean(first: HttpsReceiver, second: HttpsReceiver) -> None:
    first.reset()
    second.reset()


@pytest.fixture
def wire() -> Sockets:
    return Sockets()


def config(receiver: HttpsReceiver, **overrides: object) -> Settings:
    return load_settings(
        http_ca_file=receiver.ca_file,
        allowed_networks=["127.0.0.0/8"],
        http_timeout_s=5.0,
        **overrides,
    )


def client(
    receiver: HttpsReceiver, wire: Sockets, per_origin: int = 64, keepalive_s: float = 4.0
) -> DeliveryClient:
    return build_http_client(
        config(receiver),
        sockets=wire,
        keepalive_expiry_s=keepalive_s,
        max_connections_per_origin=per_origin,
    )


def test_sequential_requests_share_one_connection(first: HttpsReceiver, wire: Sockets) -> None:
    async def run() -> list[int]:
        async with client(first, wire) as c:
            return [(await c.post(first.url("/seq"), content=b"{}")).status_code for _ in range(5)]

    assert asyncio.run(run()) == [200] * 5
    assert len(wire.made) == 1
    assert wire.closed == [True], "closing the client closes its idle connections"


def test_a_steady_load_never_opens_more_connections_than_requests_at_once(
    first: HttpsReceiver, wire: Sockets
) -> None:
    workers, each = 12, 15

    async def run() -> None:
        async with client(first, wire) as c:

            async def worker() -> None:
                for _ in range(each):
                    response = await c.post(first.url("/steady"), content=b"{}")
                    assert response.status_code == 200

            await asyncio.gather(*(worker() for _ in range(workers)))

    asyncio.run(run())
    assert len(first.requests_to("/steady")) == workers * each
    assert 1 <= len(wire.made) <= workers


def test_an_origin_is_capped_and_the_wait_for_a_place_is_bounded(
    first: HttpsReceiver, wire: Sockets
) -> None:
    first.respond("/held", Reply(200, delay_s=1.0))

    async def run() -> type[BaseException] | None:
        async with client(first, wire, per_origin=1) as c:
            held = asyncio.ensure_future(c.post(first.url("/held"), content=b"{}"))
            await asyncio.to_thread(first.wait_for_requests, 1, "/held")
            try:
                await c.post(first.url("/other"), content=b"{}", timeout=httpx.Timeout(5, pool=0.2))
            except httpx.TimeoutException as exc:
                return type(exc)
            finally:
                assert (await held).status_code == 200
            return None

    assert asyncio.run(run()) is httpx.ConnectTimeout
    assert len(wire.made) == 1
    assert first.requests_to("/other") == []


def test_other_origins_are_not_held_up_by_a_full_one(
    first: HttpsReceiver, second: HttpsReceiver, wire: Sockets
) -> None:
    first.respond("/held", Reply(200, delay_s=1.0))

    async def run() -> int:
        async with client(first, wire, per_origin=1) as c:
            held = asyncio.ensure_future(c.post(first.url("/held"), content=b"{}"))
            await asyncio.to_thread(first.wait_for_requests, 1, "/held")
            response = await c.post(
                second.url("/free"), content=b"{}", timeout=httpx.Timeout(5, pool=0.2)
            )
            assert (await held).status_code == 200
            return response.status_code

    assert asyncio.run(run()) == 200


def test_a_cancelled_request_gives_its_place_back(first: HttpsReceiver, wire: Sockets) -> None:
    first.respond("/slow", Reply(200, delay_s=2.0))

    async def run() -> int:
        async with client(first, wire, per_origin=1) as c:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await c.post(first.url("/slow"), content=b"{}")
            # With the only place leaked, this would wait out the pool timeout.
            response = await c.post(
                first.url("/after"), content=b"{}", timeout=httpx.Timeout(5, pool=1.0)
            )
            await eventually(lambda: wire.closed[0], 10, "the cancelled request's socket to close")
            return response.status_code

    assert asyncio.run(run()) == 200
    # The cancelled request's connection was mid-response: closed, not reused.
    assert len(wire.made) == 2


def test_a_connection_the_server_closes_is_not_reused(first: HttpsReceiver, wire: Sockets) -> None:
    first.respond("/bye", Reply(200, headers={"Connection": "close"}))

    async def run() -> list[int]:
        async with client(first, wire) as c:
            return [(await c.post(first.url("/bye"), content=b"{}")).status_code for _ in range(3)]

    assert asyncio.run(run()) == [200] * 3
    assert len(wire.made) == 3


def test_idle_connections_are_closed_after_the_keepalive_expiry(
    first: HttpsReceiver, second: HttpsReceiver, wire: Sockets
) -> None:
    async def run() -> None:
        async with client(first, wire, keepalive_s=0.3) as c:
            await c.post(first.url("/a"), content=b"{}")
            await c.post(second.url("/b"), content=b"{}")
            assert (wire.open_to(first.port), wire.open_to(second.port)) == (1, 1)
            # No further request: the pools close their idle sockets on their own.
            await eventually(lambda: all(wire.closed), 10, "the idle sockets to close")

    asyncio.run(run())
    assert wire.closed == [True, True]


def test_a_response_is_read_only_up_to_the_cap_and_its_connection_dropped(
    first: HttpsReceiver, wire: Sockets
) -> None:
    # 4 MB answered to a delivery: it keeps a snippet, never reads (or buffers)
    # the rest, and closes the connection rather than draining it.
    first.respond("/huge", Reply(500, body=b"x" * (4 << 20)))

    async def run() -> tuple[bool, int, str | None]:
        async with client(first, wire) as c:
            result = await post(c.transport, first.url("/huge"), b"{}", {}, 5.0, 16)
            await eventually(lambda: wire.closed == [True], 10, "the socket to close")
            after = await post(c.transport, first.url("/after"), b"{}", {}, 5.0, 16)
            assert after.ok
            return result.ok, result.status_code or 0, result.snippet

    assert asyncio.run(run()) == (False, 500, "x" * 16)
    assert len(wire.made) == 2


def test_the_delivery_client_keeps_no_cookies(first: HttpsReceiver, wire: Sockets) -> None:
    first.respond("/jar", Reply(200, headers={"Set-Cookie": "session=abc; Path=/"}))

    async def run() -> int:
        async with client(first, wire) as c:
            await c.post(first.url("/jar"), content=b"{}")
            await post(c.transport, first.url("/jar"), b"{}", {}, 5.0, 16)
            await c.post(first.url("/jar"), content=b"{}")
            return len(c.cookies.jar)

    assert asyncio.run(run()) == 0
    assert [r.header("cookie") for r in first.requests_to("/jar")] == [None, None, None]


def test_a_connection_in_use_when_the_client_closes_is_closed(
    first: HttpsReceiver, wire: Sockets
) -> None:
    async def run() -> None:
        c = client(first, wire)
        request = httpx.Request("POST", first.url("/late"), content=b"{}")
        response = await c.transport.handle_async_request(request)
        await c.aclose()
        await response.aclose()
        await eventually(lambda: wire.closed == [True], 10, "the socket to close")

    asyncio.run(run())
    assert len(first.requests_to("/late")) == 1
