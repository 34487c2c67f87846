"""The delivery client: httpx's API over aiohttp's connector, behind the egress guard.

The delivery code is written against ``httpx``; what sends the bytes underneath
is aiohttp (its C HTTP parser, its per-origin keep-alive pools), measured in the
benchmark at about twice the rate of httpx's own ``httpcore`` for a third less
CPU per request. :class:`GuardedTransport` is that engine as an httpx transport:

* every new connection goes through the egress guard: names are resolved by
  :class:`~dispatcher.outbound.egress.GuardedResolver`, and the address each socket
  connects to is judged by :class:`~dispatcher.outbound.egress.GuardedSockets`;
* TLS always verifies the URL's hostname (and sends it as SNI);
* redirects are never followed, responses are never decompressed, no cookies are
  kept, no proxy or ``~/.netrc`` from the environment is used;
* connections are kept alive per origin (scheme, host, port), at most
  ``max_connections_per_origin`` of them in use, closed once idle for
  ``keepalive_expiry_s``; an origin without connections left is forgotten;
* a response body is only read as far as the caller reads it: closing it early
  drops its connection instead of draining the rest;
* aiohttp's errors become httpx's (``ConnectError``, ``ReadTimeout``...) with the
  original as ``__cause__``; :class:`~dispatcher.errors.EgressBlocked` passes as is.
"""

from __future__ import annotations

import ipaddress
import ssl
import sys
from collections.abc import AsyncIterator, Mapping
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any, Final

import aiohttp
import certifi
import httpx
import yarl

from dispatcher import __version__
from dispatcher.errors import ConfigError, EgressBlocked
from dispatcher.outbound.egress import GuardedResolver, GuardedSockets, Resolver, SocketFactory
from dispatcher.settings import Settings

__all__ = ["DeliveryClient", "GuardedTransport", "build_http_client", "build_ssl_context"]

#: The ``User-Agent`` of every request the dispatcher sends.
USER_AGENT: Final = f"webhook-dispatcher/{__version__}"
# Below the 5 s idle timeout of Node.js, a common receiver, so that a pooled
# connection is seldom reused just as the server closes it.
KEEPALIVE_EXPIRY_S = 4.0
_CLEANUP_CLOSED = sys.version_info < (3, 12, 8)
#: Parsed URLs kept for reuse (one per subscription URL in use); dropped wholesale when full.
_URL_CACHE_SIZE = 10_000

# aiohttp's errors and the httpx error each becomes; the first match wins, so the
# more specific classes come first.
_ERRORS: tuple[tuple[type[BaseException], type[httpx.TransportError]], ...] = (
    (aiohttp.ConnectionTimeoutError, httpx.ConnectTimeout),
    (aiohttp.SocketTimeoutError, httpx.ReadTimeout),
    (aiohttp.ServerTimeoutError, httpx.ReadTimeout),
    (aiohttp.ClientConnectorError, httpx.ConnectError),
    (aiohttp.ClientSSLError, httpx.ConnectError),
    (aiohttp.ServerDisconnectedError, httpx.RemoteProtocolError),
    (aiohttp.ClientResponseError, httpx.RemoteProtocolError),
    (aiohttp.ClientPayloadError, httpx.ReadError),
    (aiohttp.InvalidURL, httpx.UnsupportedProtocol),
    (aiohttp.ClientOSError, httpx.NetworkError),
    (aiohttp.ClientError, httpx.NetworkError),
    (TimeoutError, httpx.TimeoutException),
)


def _translated(exc: Exception) -> Exception:
    """The httpx error an aiohttp error becomes, or ``exc`` itself.

    (EgressBlocked, from the resolver or the socket factory, is httpx's already.)
    """
    if isinstance(exc, aiohttp.ClientError | TimeoutError):
        for kind, mapped in _ERRORS:
            if isinstance(exc, kind):
                return mapped(str(exc) or type(exc).__name__)
    return exc


class _Body(httpx.AsyncByteStream):
    """A response body read from aiohttp as it arrives; closing it frees the connection."""

    __slots__ = ("_response",)

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except Exception as exc:
            error = _translated(exc)
            if error is exc:
                raise
            raise error from exc

    async def aclose(self) -> None:
        response = self._response
        if response.content.at_eof():
            response.release()  # read to the end: the connection is reusable
        else:
            response.close()  # the rest is not wanted: the connection is dropped


class GuardedTransport(httpx.AsyncBaseTransport):
    """An HTTP/1.1 ``httpx`` transport over one aiohttp session; see the module doc.

    The session is made on first use, on the running event loop. ``sockets``
    replaces the factory that creates allowed sockets (tests record them).
    It is the dispatcher's :class:`~dispatcher.outbound.sender.Sender`: deliveries,
    which need none of a client's per-request work (building a request, merging
    defaults, cookies, auth, redirects, hooks), :meth:`post` straight to it, each
    phase (connect, read, pool wait) bounded by ``timeout_s``.
    """

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext,
        resolver: GuardedResolver,
        sockets: GuardedSockets,
        allow_http: bool = False,
        max_connections: int = 0,
        max_connections_per_origin: int = 100,
        keepalive_expiry_s: float = KEEPALIVE_EXPIRY_S,
        timeout_s: float = 30.0,
    ) -> None:
        self._ssl_context = ssl_context
        self._resolver = resolver
        self._sockets = sockets
        self._allow_http = allow_http
        self._max_connections = max_connections
        self._per_origin = max_connections_per_origin
        self._keepalive_s = keepalive_expiry_s
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[tuple[Any, ...], aiohttp.ClientTimeout] = {}
        self._targets: dict[tuple[str, bool], yarl.URL] = {}
        self._closed = False
        self._phases: dict[str, float | None] = httpx.Timeout(timeout_s).as_dict()

    def _target(self, text: str, encoded: bool) -> yarl.URL:
        """The URL parsed once (subscription URLs repeat), percent-encoded if not yet."""
        key = (text, encoded)
        target = self._targets.get(key)
        if target is None:
            if len(self._targets) >= _URL_CACHE_SIZE:
                self._targets.clear()
            target = self._targets[key] = yarl.URL(text, encoded=encoded)
        return target

    @property
    def session(self) -> aiohttp.ClientSession:
        """The aiohttp session underneath (made now if it was not yet)."""
        if self._session is None:
            if self._closed:
                raise RuntimeError("the transport is closed")
            connector = aiohttp.TCPConnector(
                ssl=self._ssl_context,
                resolver=self._resolver,
                socket_factory=self._sockets,
                limit=self._max_connections,
                limit_per_host=self._per_origin,
                keepalive_timeout=self._keepalive_s,
                # Addresses are tried one after the other, in the resolver's order.
                happy_eyeballs_delay=None,
                # A TLS connection dropped mid-exchange (a timeout) waits for the
                # peer's close_notify, up to 30 s; the connector aborts those every
                # 2 s and on close. Newer Pythons do this themselves (and aiohttp
                # then warns that the option is ignored).
                enable_cleanup_closed=_CLEANUP_CLOSED,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                trust_env=False,
                # httpx has set the headers a request needs; aiohttp adds no others.
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
            )
        return self._session

    def _timeout(self, phases: dict[str, float | None]) -> aiohttp.ClientTimeout:
        key = (phases.get("connect"), phases.get("read"), phases.get("pool"))
        timeout = self._timeouts.get(key)
        if timeout is None:
            connect, read, pool = key
            # aiohttp's ``connect`` covers the wait for a pooled place, name
            # resolution and the new connection; ``sock_connect`` the last alone.
            timeout = aiohttp.ClientTimeout(
                total=None, connect=pool, sock_connect=connect, sock_read=read
            )
            self._timeouts[key] = timeout
        return timeout

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` on a pooled or new connection of its origin."""
        data: Any
        try:
            data = request.content or None
            headers = request.headers.multi_items()
        except httpx.RequestNotRead:  # a streamed body: aiohttp sends it chunked
            data = request.stream
            headers = [(k, v) for k, v in request.headers.multi_items() if k != "transfer-encoding"]
        # httpx has already percent-encoded the URL.
        target = self._target(str(request.url), encoded=True)
        timeout = request.extensions.get("timeout", {})
        return await self._send(request.method, target, headers, data, timeout)

    async def send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | None,
        timeout: dict[str, float | None],
    ) -> httpx.Response:
        """What :meth:`handle_async_request` does, from a URL, headers and body as given.

        Nothing is added to ``headers`` but ``Host`` and ``Content-Length``; the
        ``timeout`` phases are httpx's (``connect``, ``read``, ``pool``).
        """
        return await self._send(method, self._target(url, encoded=False), headers, body, timeout)

    async def post(self, url: str, headers: Mapping[str, str], body: bytes) -> httpx.Response:
        """A delivery's POST (the :class:`~dispatcher.outbound.sender.Sender` method)."""
        return await self._send(
            "POST", self._target(url, encoded=False), headers, body, self._phases
        )

    async def _send(
        self,
        method: str,
        target: yarl.URL,
        headers: Any,
        data: Any,
        timeout: dict[str, float | None],
    ) -> httpx.Response:
        if target.scheme == "http" and not self._allow_http:
            raise EgressBlocked("plain_http", target.host or "")
        if target.scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {target.scheme!r}")
        try:
            response = await self.session.request(
                method,
                target,
                headers=headers,
                data=data,
                allow_redirects=False,
                timeout=self._timeout(timeout),
            )
        except Exception as exc:
            error = _translated(exc)
            if error is exc:
                raise
            raise error from exc
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=_Body(response),
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        """Close every connection, idle or in use."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()


class DeliveryClient(httpx.AsyncClient):
    """An ``httpx.AsyncClient`` over the guarded transport, with the transport at hand.

    ``client.post`` and friends work as on any client; deliveries go to
    :attr:`transport`, the :class:`~dispatcher.outbound.sender.Sender`
    (:func:`dispatcher.outbound.delivery.post`).
    """

    def __init__(self, *, transport: GuardedTransport, **kwargs: Any) -> None:
        super().__init__(transport=transport, **kwargs)
        self.transport = transport


def build_ssl_context(ca_file: str | None = None) -> ssl.SSLContext:
    """A verifying TLS client context: system CAs, certifi's, and ``ca_file`` if given."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    # Slim container images often ship without a system CA bundle.
    context.load_verify_locations(cafile=certifi.where())
    if ca_file:
        try:
            context.load_verify_locations(cafile=ca_file)
        except OSError as exc:  # missing, unreadable, or not PEM (ssl.SSLError)
            reason = getattr(exc, "reason", None) or exc.strerror or exc
            raise ConfigError(f"DISPATCHER_HTTP_CA_FILE: cannot load {ca_file}: {reason}") from None
    return context


def build_transport(
    settings: Settings,
    resolver: Resolver | None = None,
    *,
    sockets: SocketFactory | None = None,
    keepalive_expiry_s: float = KEEPALIVE_EXPIRY_S,
    max_connections_per_origin: int | None = None,
) -> GuardedTransport:
    """The guarded transport configured from ``settings`` (see :func:`build_http_client`)."""
    allowed = [ipaddress.ip_network(n, strict=False) for n in settings.allowed_networks]
    return GuardedTransport(
        ssl_context=build_ssl_context(settings.http_ca_file),
        resolver=GuardedResolver(allowed, resolver),
        sockets=GuardedSockets(allowed, sockets),
        allow_http=settings.allow_http,
        max_connections=settings.max_in_flight,
        # Per origin: every webhook on one host shares this cap and its connections.
        max_connections_per_origin=max_connections_per_origin or settings.max_in_flight_per_origin,
        keepalive_expiry_s=keepalive_expiry_s,
        timeout_s=settings.http_timeout_s,
    )


def build_http_client(
    settings: Settings,
    resolver: Resolver | None = None,
    *,
    sockets: SocketFactory | None = None,
    keepalive_expiry_s: float = KEEPALIVE_EXPIRY_S,
    max_connections_per_origin: int | None = None,
) -> DeliveryClient:
    """The one pooled client that delivers webhooks.

    Redirects are not followed, TLS is always verified, plain HTTP only with
    ``settings.allow_http``, and every new connection goes through the address
    check with ``settings.allowed_networks``. ``resolver`` and ``sockets`` (what
    creates an allowed socket) replace the system's, for tests.

    ``settings.http_timeout_s`` bounds each phase (connect, read, pool wait); a
    deadline for a whole attempt is the caller's to set.
    """
    transport = build_transport(
        settings,
        resolver,
        sockets=sockets,
        keepalive_expiry_s=keepalive_expiry_s,
        max_connections_per_origin=max_connections_per_origin,
    )
    return DeliveryClient(
        transport=transport,
        timeout=httpx.Timeout(settings.http_timeout_s),
        follow_redirects=False,
        headers={"User-Agent": USER_AGENT},
        # No proxies from the environment (they would resolve names past the
        # check) and no credentials from ~/.netrc.
        trust_env=False,
        # Cookies an endpoint sets are neither kept nor sent back: the jar would
        # grow with every endpoint that sets one, for the life of the process.
        cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
    )
