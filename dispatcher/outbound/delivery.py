"""One HTTP attempt of a delivery, and what its outcome means.

Success is any 2xx within the timeout; redirects are not followed. Everything
else is a failure with an ``error_class`` from a closed set (a metric label):
``http`` (non-2xx), ``timeout``, ``connection``, ``tls``, ``blocked`` (the
egress guard refused the address) and ``other``.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Final

import httpx

from dispatcher.errors import EgressBlocked
from dispatcher.metrics import status_class
from dispatcher.outbound.sender import Sender
from dispatcher.outbound.signing import signature_headers
from dispatcher.outbound.transport import USER_AGENT

H_DELIVERY_ID: Final = "X-Bullseye-Delivery-Id"
H_ATTEMPT: Final = "X-Bullseye-Attempt"
H_TEST: Final = "X-Bullseye-Test"

#: A success body is read (so the connection can be reused) up to this size.
_MAX_DRAIN_BYTES: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """What one POST came to."""

    ok: bool
    duration_s: float
    status_code: int | None = None
    error_class: str = "none"
    error: str | None = None
    snippet: str | None = None
    retry_after_s: float | None = None

    @property
    def status_label(self) -> str:
        """The metric's ``status_class``: ``2xx``..``5xx`` or the error class."""
        if self.status_code is not None:
            return status_class(self.status_code)
        return self.error_class


def build_headers(
    delivery_id: str, attempt: int, body: bytes, secrets: list[str], test: bool = False
) -> dict[str, str]:
    """Headers of one attempt; signatures are stamped now, with the current secrets."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        H_DELIVERY_ID: delivery_id,
        H_ATTEMPT: str(attempt),
    }
    if test:
        headers[H_TEST] = "true"
    headers.update(signature_headers(delivery_id, int(time.time()), body, secrets))
    return headers


async def post(
    sender: Sender,
    url: str,
    body: bytes,
    headers: dict[str, str],
    timeout_s: float,
    snippet_bytes: int,
) -> AttemptResult:
    """POST once; never raises for anything the endpoint or the network does."""
    started = time.perf_counter()
    try:
        # The whole attempt, slow-drip answers included, is bounded by the timeout.
        async with asyncio.timeout(timeout_s):
            response = await sender.post(url, headers, body)
            try:
                code = response.status_code
                ok = 200 <= code < 300
                limit = _MAX_DRAIN_BYTES if ok else max(snippet_bytes, 1)
                data = await _read_some(response, limit)
            finally:
                await response.aclose()
        retry_after = None if ok else parse_retry_after(response.headers.get("retry-after"))
        return AttemptResult(
            ok=ok,
            duration_s=time.perf_counter() - started,
            status_code=code,
            error_class="none" if ok else "http",
            error=None if ok else f"HTTP {code}",
            snippet=data[:snippet_bytes].decode("utf-8", "replace"),
            retry_after_s=retry_after,
        )
    except TimeoutError:
        return _failure(started, "timeout", f"no answer within {timeout_s:g} s")
    except EgressBlocked as exc:
        return _failure(started, "blocked", str(exc))
    except httpx.TimeoutException:
        return _failure(started, "timeout", f"no answer within {timeout_s:g} s")
    except httpx.TransportError as exc:
        return _failure(started, _transport_class(exc), _describe(exc))
    except httpx.HTTPError as exc:
        return _failure(started, "other", _describe(exc))


async def _read_some(response: httpx.Response, limit: int) -> bytes:
    """Up to about ``limit`` bytes of the body, as they come; the rest is never read."""
    chunks: list[bytes] = []
    size = 0
    stream = response.stream
    assert isinstance(stream, httpx.AsyncByteStream)
    async for chunk in stream:
        chunks.append(chunk)
        size += len(chunk)
        if size >= limit:
            break  # the rest is not wanted; closing drops this connection
    return b"".join(chunks)


def _failure(started: float, error_class: str, error: str) -> AttemptResult:
    return AttemptResult(
        ok=False,
        duration_s=time.perf_counter() - started,
        error_class=error_class,
        error=error[:300],
    )


def _transport_class(exc: BaseException) -> str:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError | ssl.CertificateError):
            return "tls"
        seen = seen.__cause__ or seen.__context__
    # Not the message: aiohttp's connect errors all say "ssl:..." of the connection.
    return "connection"


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    # The transport's own message is often generic ("All connection attempts
    # failed"); the operating system's error underneath says what happened.
    seen: BaseException | None = exc
    while seen is not None:
        # An SSLError's errno is an OpenSSL code, not the operating system's.
        if isinstance(seen, OSError) and seen.errno and not isinstance(seen, ssl.SSLError):
            reason = os.strerror(seen.errno)
            if reason not in text:
                text = f"{text} ({reason})"
            break
        seen = seen.__cause__ or seen.__context__
    return f"{type(exc).__name__}: {text}"


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    wait = (when - (now or datetime.now(UTC))).total_seconds()
    return max(wait, 0.0)
