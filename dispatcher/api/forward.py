"""A replica that is not the writer: reads are served here, changes go to the writer.

Every change of the configuration (create, change, enable, disable, rotate,
delete, set the plan), and a recover, is sent as it came, the caller's
credentials included, to ``DISPATCHER_API_WRITER_URL``, and the writer's answer
is returned as it is. The
writer says where it wrote the change; this replica waits to have read past that
before answering, so a read here right after sees the change (read-your-writes).

What a 503 from here means: the writer could not be reached, so nothing was sent
and nothing applied (retry); or the request was sent and no answer came, and the
outcome is unknown (the problem document says so).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

import httpx
from fastapi import Request, Response

from dispatcher.api.context import ApiContext
from dispatcher.api.problems import respond
from dispatcher.api.webhooks import POSITION_HEADER
from dispatcher.errors import Problem

log = logging.getLogger(__name__)

#: What goes to the writer: every configuration change, and recover, which must
#: not queue a delivery twice when two replicas are asked at once (the writer runs
#: one at a time; see ``api/deliveries.py``).
_CHANGE_PATH = re.compile(
    r"^/v1/organizations/[^/]+/"
    r"(plan|webhooks(/[^/]+(/(enable|disable|rotate-secret|recover))?)?)$"
)
_CHANGE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_SENT = ("authorization", "content-type", "idempotency-key", "if-match")
_RETURNED = (
    "content-type",
    "etag",
    "idempotent-replayed",
    "retry-after",
    "www-authenticate",
    "allow",
)


def is_change(request: Request) -> bool:
    return request.method in _CHANGE_METHODS and bool(_CHANGE_PATH.match(request.url.path))


class Forwarder:
    """Sends changes to the writer over one keep-alive client."""

    def __init__(self, ctx: ApiContext, writer_url: str) -> None:
        self.ctx = ctx
        self.writer_url = writer_url
        timeout = ctx.settings.api_write_timeout_s
        self.client = httpx.AsyncClient(
            base_url=writer_url,
            # The writer may take its whole write timeout, and a read-back after an
            # unanswered commit, before it answers.
            timeout=httpx.Timeout(timeout * 2 + 10, connect=3.0),
        )

    async def close(self) -> None:
        await self.client.aclose()

    async def __call__(self, request: Request) -> Response:
        body = await request.body()
        headers = {name: request.headers[name] for name in _SENT if name in request.headers}
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        try:
            answer = await self.client.request(
                request.method, target, content=body, headers=headers
            )
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            log.warning("the writer at %s is unreachable: %s", self.writer_url, exc)
            return respond(
                Problem(
                    503,
                    "writer-unreachable",
                    "Writer unreachable",
                    "the change was not sent to the writer and not applied; retry it",
                    headers={"Retry-After": "2"},
                ),
                request.url.path,
            )
        except httpx.HTTPError as exc:
            log.warning("no answer from the writer at %s: %s", self.writer_url, exc)
            return respond(
                Problem(
                    503,
                    "outcome-unknown",
                    "Outcome unknown",
                    "the change was sent to the writer and no answer came: it may or may not "
                    "have been applied. Read the webhook back, or retry a create with the same "
                    "Idempotency-Key, which returns the real outcome",
                    headers={"Retry-After": "5"},
                ),
                request.url.path,
            )
        position = answer.headers.get(POSITION_HEADER)
        if position:
            await asyncio.to_thread(self._read_past, position)
        returned = {k: answer.headers[k] for k in _RETURNED if k in answer.headers}
        return Response(answer.content, status_code=answer.status_code, headers=returned)

    def _read_past(self, position: str) -> None:
        deadline = time.monotonic() + self.ctx.settings.api_write_timeout_s
        for part in position.split(","):
            topic, partition, offset = part.rsplit(":", 2)
            if not self.ctx.store.wait_past(topic, int(partition), int(offset), deadline):
                # Applied by the writer all the same; only this replica's view lags.
                log.warning("a forwarded change was not read back in time")
                return
