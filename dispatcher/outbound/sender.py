"""What a delivery attempt sends through: one POST, its answer's body left unread.

The dispatcher sends through :class:`~dispatcher.outbound.transport.GuardedTransport`
(aiohttp behind the egress guard); in-process tests of the engine send through a
fake that answers from a function. :func:`~dispatcher.outbound.delivery.post`
turns what either gives back, or raises, into an attempt's result.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import httpx


class Sender(Protocol):
    """Sends one request and gives back the response with its body unread."""

    async def post(self, url: str, headers: Mapping[str, str], body: bytes) -> httpx.Response:
        """POST ``body`` to ``url`` with exactly ``headers`` (plus ``Host`` and
        ``Content-Length``). The caller reads as much of the body as it wants and
        closes the response; network failures raise ``httpx.TransportError``."""
        ...
