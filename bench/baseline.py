"""The yardsticks: bare POST loops, as fast as each HTTP engine delivers webhooks.

``concurrency`` workers per endpoint, each POSTing the same bytes (TLS verified
against the receiver's CA, HTTP/1.1) in a loop until ``total`` requests have been
answered. No Kafka, no signing, no bookkeeping: whatever the dispatcher does
beyond the loop over its own engine is its overhead. The kinds:

* ``httpx_one_pool``: stock httpx, its default transport (one ``httpcore`` pool);
* ``httpx_pool_per_endpoint``: stock httpx, an ``httpcore`` transport mounted per
  origin, the fastest stock httpx gets at this concurrency;
* ``httpx_aiohttp``: stock httpx over the ``httpx-aiohttp`` package's transport;
* ``dispatcher``: ``client.post`` on the dispatcher's own client
  (:func:`dispatcher.outbound.transport.build_http_client`);
* ``dispatcher_direct``: the dispatcher's own attempt function
  (:func:`dispatcher.outbound.delivery.post`) over its client, what every delivery runs;
* ``aiohttp``: a bare aiohttp session, the ceiling for Python on the machine.

``loop`` is ``asyncio`` or ``uvloop``. Run as ``python -m bench.baseline '<json>'``;
prints one JSON line of results.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

KINDS = (
    "httpx_one_pool",
    "httpx_pool_per_endpoint",
    "httpx_aiohttp",
    "dispatcher",
    "dispatcher_direct",
    "aiohttp",
)
HEADERS = {"Content-Type": "application/json"}

Post = Callable[[str], Awaitable[bool]]


def _settings(urls: list[str], concurrency: int, ca_file: str) -> Any:
    from dispatcher.settings import Settings

    return Settings(
        allowed_networks=["127.0.0.0/8"],
        http_ca_file=ca_file,
        max_in_flight=len(urls) * concurrency,
        max_in_flight_per_endpoint=concurrency,
    )


def httpx_client(kind: str, urls: list[str], concurrency: int, ca_file: str) -> httpx.AsyncClient:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    if kind == "httpx_one_pool":
        slots = len(urls) * concurrency
        limits = httpx.Limits(max_connections=slots, max_keepalive_connections=slots)
        return httpx.AsyncClient(verify=context, limits=limits, timeout=30)
    if kind == "httpx_pool_per_endpoint":
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        mounts: dict[str, httpx.AsyncBaseTransport | None] = {
            str(httpx.URL(url).copy_with(path="/")).rstrip("/"): httpx.AsyncHTTPTransport(
                verify=context, limits=limits
            )
            for url in urls
        }
        return httpx.AsyncClient(mounts=mounts, timeout=30)
    if kind == "httpx_aiohttp":
        from httpx_aiohttp import AiohttpTransport

        limits = httpx.Limits(max_connections=len(urls) * concurrency)
        return httpx.AsyncClient(
            transport=AiohttpTransport(verify=context, limits=limits), timeout=30
        )
    if kind == "dispatcher":
        from dispatcher.outbound.transport import build_http_client

        return build_http_client(_settings(urls, concurrency, ca_file))
    raise ValueError(f"unknown baseline {kind!r}")


async def run(
    kind: str, urls: list[str], body: bytes, concurrency: int, total: int, ca_file: str
) -> dict[str, Any]:
    started = 0
    failures = 0
    async with _poster(kind, urls, body, concurrency, ca_file) as post:

        async def worker(url: str) -> None:
            nonlocal started, failures
            while started < total:
                started += 1
                if not await post(url):
                    failures += 1

        t0, cpu0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(url) for url in urls for _ in range(concurrency)))
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"requests": started, "failures": failures, "seconds": elapsed, "cpu_seconds": cpu}


class _poster:
    """``async with _poster(...) as post``: a POST function over the kind's client."""

    def __init__(
        self, kind: str, urls: list[str], body: bytes, concurrency: int, ca_file: str
    ) -> None:
        self.kind, self.urls, self.body = kind, urls, body
        self.concurrency, self.ca_file = concurrency, ca_file
        self._close: Callable[[], Awaitable[Any]] | None = None

    async def __aenter__(self) -> Post:
        body = self.body
        if self.kind == "aiohttp":
            import aiohttp

            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
            connector = aiohttp.TCPConnector(ssl=context, limit=0, limit_per_host=self.concurrency)
            session = aiohttp.ClientSession(connector=connector)
            self._close = session.close

            async def post_aiohttp(url: str) -> bool:
                async with session.post(url, data=body, headers=HEADERS) as response:
                    await response.read()
                    return 200 <= response.status < 300

            return post_aiohttp
        if self.kind == "dispatcher_direct":
            from dispatcher.outbound.delivery import post
            from dispatcher.outbound.transport import build_transport

            sender = build_transport(_settings(self.urls, self.concurrency, self.ca_file))
            self._close = sender.aclose

            async def post_direct(url: str) -> bool:
                result = await post(sender, url, body, HEADERS, 30.0, 256)
                return result.ok

            return post_direct
        client = httpx_client(self.kind, self.urls, self.concurrency, self.ca_file)
        self._close = client.aclose

        async def post_httpx(url: str) -> bool:
            response = await client.post(url, content=body, headers=HEADERS)
            return 200 <= response.status_code < 300

        return post_httpx

    async def __aexit__(self, *exc: object) -> None:
        if self._close is not None:
            await self._close()


def main() -> int:
    args = json.loads(sys.argv[1])
    coro = run(
        args["kind"],
        args["urls"],
        bytes.fromhex(args["body_hex"]),
        int(args["concurrency"]),
        int(args["total"]),
        args["ca_file"],
    )
    if args.get("loop", "asyncio") == "uvloop":
        import uvloop

        result = uvloop.run(coro)
    else:
        result = asyncio.run(coro)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
