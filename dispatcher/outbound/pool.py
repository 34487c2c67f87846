"""Keep-alive HTTP/1.1 connections for the deliveries, pooled per origin.

``httpcore``'s own pool (1.0) rescans every connection it holds on each request
and response, partly quadratically, and hands a connection that is assigned to a
request but not yet used to the next request too; the loser retries, and under
load a request can wait many seconds, up to its timeout, for a connection that was
free all along. Deliveries need little of it: HTTP/1.1 only, and the engine
already caps the requests per endpoint. So each origin here keeps a stack of idle
connections: a request takes the most recently used one that has not expired, or
opens a new one, and gives it back when its response is closed. Everything used of
``httpcore`` is its public API: :class:`httpcore.AsyncHTTPConnection` and its
state methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable

import httpcore

_Key = tuple[bytes, bytes, int]


class _Origin:
    """One origin's idle connections, and a cap on those in use."""

    __slots__ = ("idle", "in_use", "slots")

    def __init__(self, max_connections: int) -> None:
        self.idle: list[httpcore.AsyncHTTPConnection] = []
        self.in_use = 0
        self.slots = asyncio.Semaphore(max_connections)

    def take_idle(
        self,
    ) -> tuple[httpcore.AsyncHTTPConnection | None, list[httpcore.AsyncHTTPConnection]]:
        """The freshest usable idle connection, and the stale ones met on the way."""
        stale: list[httpcore.AsyncHTTPConnection] = []
        while self.idle:
            conn = self.idle.pop()
            if conn.is_available() and not conn.has_expired():
                return conn, stale
            stale.append(conn)
        return None, stale


class ConnectionPools:
    """HTTP/1.1 connections per origin; at most ``max_connections`` in use per origin."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext,
        network_backend: httpcore.AsyncNetworkBackend,
        max_connections: int,
        keepalive_expiry_s: float,
    ) -> None:
        self._ssl_context = ssl_context
        self._backend = network_backend
        self._max_connections = max_connections
        self._keepalive_expiry_s = keepalive_expiry_s
        self._origins: dict[_Key, _Origin] = {}
        self._closed = False
        self._next_sweep = time.monotonic() + keepalive_expiry_s

    def _connect(self, origin: httpcore.Origin) -> httpcore.AsyncHTTPConnection:
        return httpcore.AsyncHTTPConnection(
            origin,
            ssl_context=self._ssl_context,
            keepalive_expiry=self._keepalive_expiry_s,
            http1=True,
            http2=False,
            network_backend=self._backend,
        )

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        """Send ``request`` on an idle or a new connection of its origin."""
        await self._sweep()
        origin = request.url.origin
        key = (origin.scheme, origin.host, origin.port)
        pool = self._origins.get(key)
        if pool is None:
            pool = self._origins[key] = _Origin(self._max_connections)
        if pool.slots.locked():
            timeouts = request.extensions.get("timeout", {})
            try:
                async with asyncio.timeout(timeouts.get("pool")):
                    await pool.slots.acquire()
            except TimeoutError:
                raise httpcore.PoolTimeout("no connection free within the pool timeout") from None
        else:
            await pool.slots.acquire()  # a free place: taken without waiting
        pool.in_use += 1
        try:
            while True:
                conn, stale = pool.take_idle()
                await _close(stale)
                if conn is None:
                    conn = self._connect(origin)
                try:
                    response = await conn.handle_async_request(request)
                    break
                except httpcore.ConnectionNotAvailable:
                    await _close([conn])  # closed under us since it was put back
                    continue
                except BaseException:
                    # httpcore left it idle (reusable) or closed.
                    if conn.is_available():
                        pool.idle.append(conn)
                    raise
        except BaseException:
            pool.in_use -= 1
            pool.slots.release()
            raise

        async def release() -> None:
            pool.in_use -= 1
            pool.slots.release()
            if conn.is_available():
                if self._closed:
                    await _close([conn])
                else:
                    pool.idle.append(conn)

        if not isinstance(response.stream, AsyncIterable):
            raise TypeError("httpcore returned a synchronous response stream")
        return httpcore.Response(
            status=response.status,
            headers=response.headers,
            content=_Released(response.stream, release),
            extensions=response.extensions,
        )

    async def _sweep(self) -> None:
        """Close connections idle past their keep-alive, and forget origins left empty.

        An origin that is no longer called would otherwise keep its sockets open.
        """
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + self._keepalive_expiry_s
        closing: list[httpcore.AsyncHTTPConnection] = []
        for key, pool in list(self._origins.items()):
            fresh = [c for c in pool.idle if c.is_available() and not c.has_expired()]
            closing.extend(c for c in pool.idle if c not in fresh)
            pool.idle[:] = fresh
            if not fresh and pool.in_use == 0:
                del self._origins[key]
        await _close(closing)

    async def aclose(self) -> None:
        """Close every idle connection; those in use close with their responses."""
        self._closed = True
        closing = [c for pool in self._origins.values() for c in pool.idle]
        self._origins.clear()
        await _close(closing)


class _Released(AsyncIterable[bytes]):
    """A response body that gives its connection back once closed."""

    def __init__(
        self, stream: AsyncIterable[bytes], release: Callable[[], Awaitable[None]]
    ) -> None:
        self._stream = stream
        self._release: Callable[[], Awaitable[None]] | None = release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._stream:
                yield chunk
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        release, self._release = self._release, None
        if release is None:
            return
        try:
            aclose = getattr(self._stream, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            await release()


async def _close(connections: list[httpcore.AsyncHTTPConnection]) -> None:
    for conn in connections:
        # Already broken: nothing is left to close cleanly.
        with contextlib.suppress(OSError, httpcore.NetworkError):
            await conn.aclose()
