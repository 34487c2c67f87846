"""The yardsticks: an httpx POST loop, as fast as Python can deliver webhooks.

One ``httpx.AsyncClient`` trusting the receiver's CA (TLS verified, HTTP/1.1),
``concurrency`` workers per endpoint, each POSTing the same bytes in a loop until
``total`` requests have been answered. No Kafka, no signing, no bookkeeping:
whatever the dispatcher does beyond this is its overhead. The client comes in
three kinds:

* ``one_pool``: plain httpx, its default transport (one ``httpcore`` pool);
* ``pool_per_endpoint``: plain httpx with a transport mounted per origin, the
  fastest stock httpx gets at this concurrency;
* ``dispatcher``: httpx over the dispatcher's own transport
  (:func:`dispatcher.outbound.egress.build_http_client`), so that the dispatcher's rate
  divided by this one is the cost of everything but HTTP.

Run as ``python -m bench.baseline '<json>'``; prints one JSON line of results.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
import time
from typing import Any

import httpx

from dispatcher.outbound.egress import build_http_client
from dispatcher.settings import Settings

KINDS = ("one_pool", "pool_per_endpoint", "dispatcher")


def make_client(kind: str, urls: list[str], concurrency: int, ca_file: str) -> httpx.AsyncClient:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    if kind == "one_pool":
        slots = len(urls) * concurrency
        limits = httpx.Limits(max_connections=slots, max_keepalive_connections=slots)
        return httpx.AsyncClient(verify=context, limits=limits, timeout=30)
    if kind == "pool_per_endpoint":
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        mounts: dict[str, httpx.AsyncBaseTransport | None] = {
            str(httpx.URL(url).copy_with(path="/")).rstrip("/"): httpx.AsyncHTTPTransport(
                verify=context, limits=limits
            )
            for url in urls
        }
        return httpx.AsyncClient(mounts=mounts, timeout=30)
    if kind == "dispatcher":
        settings = Settings(
            allowed_networks=["127.0.0.0/8"],
            http_ca_file=ca_file,
            max_in_flight=len(urls) * concurrency,
        )
        return build_http_client(settings)
    raise ValueError(f"unknown baseline {kind!r}")


async def run(
    kind: str, urls: list[str], body: bytes, concurrency: int, total: int, ca_file: str
) -> dict[str, Any]:
    started = 0
    failures = 0
    headers = {"Content-Type": "application/json"}
    async with make_client(kind, urls, concurrency, ca_file) as client:

        async def worker(url: str) -> None:
            nonlocal started, failures
            while started < total:
                started += 1
                response = await client.post(url, content=body, headers=headers)
                if not 200 <= response.status_code < 300:
                    failures += 1

        t0, cpu0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(url) for url in urls for _ in range(concurrency)))
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"requests": started, "failures": failures, "seconds": elapsed, "cpu_seconds": cpu}


def main() -> int:
    args = json.loads(sys.argv[1])
    result = asyncio.run(
        run(
            args["kind"],
            args["urls"],
            bytes.fromhex(args["body_hex"]),
            int(args["concurrency"]),
            int(args["total"]),
            args["ca_file"],
        )
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
