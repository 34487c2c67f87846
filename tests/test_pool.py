"""The delivery client's connection pools (one per origin) and what it keeps between requests.

Every socket goes through :class:`Tracked`, which counts the connections opened
and sees each one closed, so reuse, caps and clean-up are checked on the wire.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx
import pytest

from dispatcher.outbound.egress import (
    GuardedBackend,
    GuardedTransport,
    build_http_client,
    build_ssl_context,
)
from dispatcher.settings import load_settings
from tests.receiver import HttpsReceiver, Reply

LOOPBACK = [ipaddress.ip_network("127.0.0.0/8")]


@dataclass
class Connection:
    port: int
    closed: bool = False


class _Stream(httpcore.AsyncNetworkStream):
    def __init__(self, inner: httpcore.AsyncNetworkStream, conn: Connection) -> None:
        self._inner = inner
        self._conn = conn

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        self._conn.closed = True
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: Any,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        tls = await self._inner.start_tls(ssl_context, server_hostname, timeout)
        return _Stream(tls, self._conn)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class Tracked(httpcore.AsyncNetworkBackend):
    """Real loopback sockets, each one recorded with whether it was closed."""

    def __init__(self) -> None:
        self.connections: list[Connection] = []
        self._real = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        assert host == "127.0.0.1", f"test tried to connect to {host}"
        stream = await self._real.connect_tcp(host, port, timeout=timeout)
        conn = Connection(port)
        self.connections.append(conn)
        return _Stream(stream, conn)

    async def sleep(self, seconds: float) -> None:
        await self._real.sleep(seconds)

    def open_to(self, port: int) -> int:
        return sum(1 for c in self.connections if c.port == port and not c.closed)


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
def wire() -> Tracked:
    return Tracked()


def transport(
    receiver: HttpsReceiver, wire: Tracked, max_connections: int = 64, keepalive_s: float = 4.0
) -> GuardedTransport:
    return GuardedTransport(
        ssl_context=build_ssl_context(receiver.ca_file),
        backend=GuardedBackend(allowed_networks=LOOPBACK, inner=wire),
        max_connections=max_connections,
        keepalive_expiry_s=keepalive_s,
    )


def client(
    receiver: HttpsReceiver, wire: Tracked, max_connections: int = 64, keepalive_s: float = 4.0
) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=transport(receiver, wire, max_connections, keepalive_s), timeout=5.0
    )


def test_sequential_requests_share_one_connection(first: HttpsReceiver, wire: Tracked) -> None:
    async def run() -> list[int]:
        async with client(first, wire) as c:
            return [(await c.post(first.url("/seq"), content=b"{}")).status_code for _ in range(5)]

    assert asyncio.run(run()) == [200] * 5
    assert len(wire.connections) == 1
    assert wire.connections[0].closed, "closing the client closes its idle connections"


def test_a_steady_load_never_opens_more_connections_than_requests_at_once(
    first: HttpsReceiver, wire: Tracked
) -> None:
    # A connection is never handed to two waiting requests, so none of them has
    # to go back and open another: the pool holds exactly as many as ever ran at once.
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
    assert len(wire.connections) == workers


def test_an_origin_is_capped_and_the_pool_timeout_applies(
    first: HttpsReceiver, wire: Tracked
) -> None:
    first.respond("/held", Reply(200, delay_s=1.0))

    async def run() -> type[BaseException] | None:
        async with client(first, wire, max_connections=1) as c:
            held = asyncio.ensure_future(c.post(first.url("/held"), content=b"{}"))
            await asyncio.sleep(0.2)
            try:
                await c.post(first.url("/other"), content=b"{}", timeout=httpx.Timeout(5, pool=0.2))
            except httpx.PoolTimeout as exc:
                return type(exc)
            finally:
                assert (await held).status_code == 200
            return None

    assert asyncio.run(run()) is httpx.PoolTimeout
    assert len(wire.connections) == 1
    assert first.requests_to("/other") == []


def test_a_cancelled_request_gives_its_place_back(first: HttpsReceiver, wire: Tracked) -> None:
    first.respond("/slow", Reply(200, delay_s=2.0))

    async def run() -> int:
        async with client(first, wire, max_connections=1) as c:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await c.post(first.url("/slow"), content=b"{}")
            # With the only place leaked, this would wait out the pool timeout.
            response = await c.post(
                first.url("/after"), content=b"{}", timeout=httpx.Timeout(5, pool=1.0)
            )
            return response.status_code

    assert asyncio.run(run()) == 200
    # The cancelled request's connection was mid-response: closed, not reused.
    assert len(wire.connections) == 2
    assert wire.connections[0].closed


def test_a_connection_the_server_closes_is_not_reused(first: HttpsReceiver, wire: Tracked) -> None:
    first.respond("/bye", Reply(200, headers={"Connection": "close"}))

    async def run() -> list[int]:
        async with client(first, wire) as c:
            return [(await c.post(first.url("/bye"), content=b"{}")).status_code for _ in range(3)]

    assert asyncio.run(run()) == [200] * 3
    assert len(wire.connections) == 3


def test_idle_connections_of_an_origin_no_longer_called_are_closed(
    first: HttpsReceiver, second: HttpsReceiver, wire: Tracked
) -> None:
    async def run() -> tuple[int, int]:
        async with client(first, wire, keepalive_s=0.3) as c:
            await c.post(first.url("/a"), content=b"{}")
            assert wire.open_to(first.port) == 1
            await asyncio.sleep(0.8)
            # Any later request sweeps the pools; the first origin's socket expired.
            await c.post(second.url("/b"), content=b"{}")
            return wire.open_to(first.port), wire.open_to(second.port)

    assert asyncio.run(run()) == (0, 1)
    assert all(c.closed for c in wire.connections)


def test_work_per_request_does_not_grow_with_the_connections_held(
    first: HttpsReceiver, wire: Tracked, monkeypatch: pytest.MonkeyPatch
) -> None:
    # httpcore's own pool checks every connection it holds (partly quadratically) on
    # each request and response; with hundreds of endpoints' connections in one pool
    # that was most of the dispatcher's CPU time.
    first.respond("/wide", Reply(200, delay_s=0.3))
    checks = 0
    real = httpcore.AsyncHTTPConnection.has_expired

    def counted(self: httpcore.AsyncHTTPConnection) -> bool:
        nonlocal checks
        checks += 1
        return real(self)

    monkeypatch.setattr(httpcore.AsyncHTTPConnection, "has_expired", counted)
    held, sequential = 30, 20

    async def run() -> None:
        nonlocal checks
        async with client(first, wire) as c:
            await asyncio.gather(*(c.post(first.url("/wide"), content=b"{}") for _ in range(held)))
            checks = 0
            for _ in range(sequential):
                assert (await c.post(first.url("/narrow"), content=b"{}")).status_code == 200

    asyncio.run(run())
    assert len(wire.connections) == held
    # One look at the connection taken; a sweep may add one per idle connection.
    assert checks <= sequential + held, checks


def test_the_delivery_client_keeps_no_cookies(first: HttpsReceiver, wire: Tracked) -> None:
    first.respond("/jar", Reply(200, headers={"Set-Cookie": "session=abc; Path=/"}))
    config = load_settings(http_ca_file=first.ca_file, allowed_networks=["127.0.0.0/8"])

    async def run() -> int:
        async with build_http_client(config, network_backend=wire) as c:
            await c.post(first.url("/jar"), content=b"{}")
            await c.post(first.url("/jar"), content=b"{}")
            return len(c.cookies.jar)

    assert asyncio.run(run()) == 0
    assert [r.header("cookie") for r in first.requests_to("/jar")] == [None, None]


def test_a_connection_given_back_after_the_client_closed_is_closed(
    first: HttpsReceiver, wire: Tracked
) -> None:
    async def run() -> None:
        t = transport(first, wire)
        request = httpx.Request("POST", first.url("/late"), content=b"{}")
        response = await t.handle_async_request(request)
        # Read to the end, so the connection is reusable, but not yet given back.
        assert isinstance(response.stream, httpx.AsyncByteStream)
        assert [chunk async for chunk in response.stream] == []
        await t.aclose()
        assert not wire.connections[0].closed, "still held by its response"
        await response.aclose()

    asyncio.run(run())
    assert [c.closed for c in wire.connections] == [True]
