"""The outbound HTTP client, guarded against server-side request forgery.

A subscription's URL is chosen by a customer, so a delivery must never reach the
dispatcher's own network: loopback, private ranges, link-local, cloud metadata.
Checking the URL when it is saved is not enough (DNS can change, or answer
differently next time), so the check is made here, on the very address each new
connection is opened to:

* :class:`GuardedBackend`, an ``httpcore`` network backend, resolves the host
  itself, judges every address with :func:`blocked_reason`, and connects by IP to
  an allowed one. TLS still verifies, and sends SNI for, the URL's hostname:
  ``httpcore`` passes the origin host to ``start_tls``, not the connected address.
* :class:`GuardedTransport`, an ``httpx`` transport over per-origin connection
  pools that use that backend, refuses plain ``http://`` unless allowed. ``httpx``'s
  own ``AsyncHTTPTransport`` takes no network backend, so this one is built on the
  public ``httpcore`` API instead of swapping a private attribute.

Refusals raise :class:`EgressBlocked`, a subclass of ``httpx.ConnectError`` that
reaches the caller of ``client.post`` as is, with ``.reason``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Sequence,
)
from http.cookiejar import CookieJar, DefaultCookiePolicy
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Literal, get_args

import certifi
import httpcore
import httpx

from dispatcher import __version__
from dispatcher.errors import ConfigError
from dispatcher.outbound.pool import ConnectionPools
from dispatcher.settings import Settings

__all__ = [
    "REASONS",
    "BlockReason",
    "EgressBlocked",
    "GuardedBackend",
    "GuardedTransport",
    "IPAddress",
    "IPNetwork",
    "Resolver",
    "blocked_reason",
    "build_http_client",
    "build_ssl_context",
    "system_resolver",
]

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network
Resolver = Callable[[str, int], Awaitable[Sequence[IPAddress]]]

BlockReason = Literal[
    "loopback",  # 127.0.0.0/8, ::1
    "private",  # RFC 1918, IPv6 unique-local fc00::/7 and old site-local fec0::/10
    "shared",  # 100.64.0.0/10, carrier-grade NAT
    "link_local",  # 169.254.0.0/16, fe80::/10
    "metadata",  # cloud instance-metadata endpoints (_METADATA)
    "unspecified",  # 0.0.0.0/8, ::
    "multicast",  # 224.0.0.0/4, ff00::/8
    "documentation",  # TEST-NETs, 2001:db8::/32, 3fff::/20
    "reserved",  # everything else not globally routable
    "plain_http",  # an http:// URL while DISPATCHER_ALLOW_HTTP is off
]
REASONS: frozenset[str] = frozenset(get_args(BlockReason))

USER_AGENT = f"webhook-dispatcher/{__version__}"
# Below the 5 s idle timeout of Node.js, a common receiver, so that a pooled
# connection is seldom reused just as the server closes it.
KEEPALIVE_EXPIRY_S = 4.0

_METADATA: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(text)
    for text in (
        "169.254.169.254",  # AWS, GCP, Azure, Oracle, DigitalOcean, OpenStack
        "169.254.170.2",  # AWS ECS task metadata and credentials
        "fd00:ec2::254",  # AWS instance metadata over IPv6
        "100.100.100.200",  # Alibaba Cloud
        "168.63.129.16",  # Azure WireServer: a public address, but the platform's own
    )
)

_RANGE_TABLE: tuple[tuple[str, BlockReason], ...] = (
    ("0.0.0.0/8", "unspecified"),
    ("127.0.0.0/8", "loopback"),
    ("10.0.0.0/8", "private"),
    ("172.16.0.0/12", "private"),
    ("192.168.0.0/16", "private"),
    ("100.64.0.0/10", "shared"),
    ("169.254.0.0/16", "link_local"),
    ("192.0.0.0/24", "reserved"),
    ("192.0.2.0/24", "documentation"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("192.88.99.0/24", "reserved"),
    ("198.18.0.0/15", "reserved"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("fc00::/7", "private"),
    ("fec0::/10", "private"),
    ("fe80::/10", "link_local"),
    ("ff00::/8", "multicast"),
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"),
    ("2001::/23", "reserved"),
)
_RANGES = tuple((ipaddress.ip_network(net), reason) for net, reason in _RANGE_TABLE)
# Only 2000::/3 is global unicast; the rest of IPv6 is unassigned or special.
_GLOBAL_UNICAST_V6 = IPv6Network("2000::/3")
_NAT64 = IPv6Network("64:ff9b::/96")


class EgressBlocked(httpx.ConnectError):
    """A request refused by the egress policy before any connection was opened.

    ``reason`` is one of :data:`REASONS`; ``address`` is the refused address (the
    first one, when a name resolved to several, all refused), or ``None`` for
    ``plain_http``; ``host`` is the URL's host.
    """

    def __init__(self, reason: BlockReason, host: str, address: IPAddress | None = None) -> None:
        if reason == "plain_http":
            message = f"refused plain http:// request to {host}: endpoints must use https://"
        elif address is None:
            message = f"refused connection to {host}: {reason}"
        else:
            message = f"refused connection to {host} ({address}): {reason} address"
        super().__init__(message)
        self.reason: BlockReason = reason
        self.host = host
        self.address = address


def _views(address: IPAddress) -> list[IPAddress]:
    """The address itself, then the IPv4 address it carries, if any."""
    if isinstance(address, IPv4Address):
        return [address]
    if address.scope_id is not None:
        address = IPv6Address(address.packed)
    embedded = address.ipv4_mapped or address.sixtofour
    if embedded is None and address in _NAT64:
        embedded = IPv4Address(address.packed[-4:])
    return [address] if embedded is None else [address, embedded]


def blocked_reason(address: IPAddress, allowed: Sequence[IPNetwork] = ()) -> BlockReason | None:
    """Return why ``address`` must not be connected to, or ``None`` when it may be.

    IPv6 forms that carry an IPv4 address (``::ffff:a.b.c.d``, NAT64
    ``64:ff9b::/96``, 6to4 ``2002::/16``) are judged as that IPv4 address. An
    address in one of the ``allowed`` networks, in either form, is always allowed.
    Metadata endpoints are reported as ``metadata`` although they also lie in
    link-local or private ranges.
    """
    views = _views(address)
    if any(view in network for view in views for network in allowed):
        return None
    judged = views[-1]
    if judged in _METADATA:
        return "metadata"
    for network, reason in _RANGES:
        if judged in network:
            return reason
    if isinstance(judged, IPv6Address) and judged not in _GLOBAL_UNICAST_V6:
        return "reserved"
    return None


async def system_resolver(host: str, port: int) -> list[IPAddress]:
    """Resolve ``host`` with the event loop's ``getaddrinfo``; addresses in its order."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    addresses: list[IPAddress] = []
    for family, _, _, _, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6) or not isinstance(sockaddr[0], str):
            continue
        address = ipaddress.ip_address(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise httpcore.ConnectTimeout("connect timed out")
    return left


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """An ``httpcore`` network backend that only connects to allowed addresses.

    ``connect_tcp`` resolves the host with ``resolver`` (a literal IP is taken as
    is), refuses with :class:`EgressBlocked` when every address is blocked, and
    otherwise asks ``inner`` to connect to the allowed addresses by IP, in order,
    until one answers, all within the connect timeout.
    """

    def __init__(
        self,
        allowed_networks: Sequence[IPNetwork] = (),
        resolver: Resolver | None = None,
        inner: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        self.allowed_networks = tuple(allowed_networks)
        self._resolve = resolver or system_resolver
        self._inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        deadline = None if timeout is None else time.monotonic() + timeout
        candidates = await self._addresses(host, port, timeout)
        allowed: list[IPAddress] = []
        refused: tuple[IPAddress, BlockReason] | None = None
        for address in candidates:
            reason = blocked_reason(address, self.allowed_networks)
            if reason is None:
                allowed.append(address)
            elif refused is None:
                refused = (address, reason)
        if not allowed:
            if refused is None:
                raise httpcore.ConnectError(f"{host} resolved to no address")
            raise EgressBlocked(refused[1], host, refused[0])

        error: httpcore.ConnectError | None = None
        for address in allowed:
            try:
                return await self._inner.connect_tcp(
                    str(address),
                    port,
                    timeout=_remaining(deadline),
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except httpcore.ConnectError as exc:  # timeouts propagate: the deadline is shared
                error = exc
        assert error is not None
        raise error

    async def _addresses(self, host: str, port: int, timeout: float | None) -> list[IPAddress]:
        try:
            return [ipaddress.ip_address(host)]
        except ValueError:
            pass
        try:
            async with asyncio.timeout(timeout):
                return list(await self._resolve(host, port))
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from None
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


# httpcore's exceptions become httpx's of the same name; the most specific class
# in the raised exception's MRO wins (ConnectTimeout before TimeoutException).
_TRANSLATED: dict[type[Exception], type[httpx.TransportError]] = {
    getattr(httpcore, name): getattr(httpx, name)
    for name in (
        *("TimeoutException", "ConnectTimeout", "ReadTimeout", "WriteTimeout", "PoolTimeout"),
        *("NetworkError", "ConnectError", "ReadError", "WriteError", "ProxyError"),
        *("UnsupportedProtocol", "ProtocolError", "LocalProtocolError", "RemoteProtocolError"),
    )
}


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        for cls in type(exc).__mro__:
            if cls in _TRANSLATED:
                raise _TRANSLATED[cls](str(exc)) from exc
        raise


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, stream: AsyncIterable[bytes]) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _translated():
            async for chunk in self._stream:
                yield chunk

    async def aclose(self) -> None:
        aclose = getattr(self._stream, "aclose", None)
        if aclose is not None:
            with _translated():
                await aclose()


class GuardedTransport(httpx.AsyncBaseTransport):
    """An HTTP/1.1 ``httpx`` transport whose connections go through :class:`GuardedBackend`.

    Plain ``http://`` requests raise :class:`EgressBlocked` (``plain_http``) unless
    ``allow_http``. There is no proxy support: a proxy would resolve the name
    itself, out of reach of the address check. Connections are pooled per origin
    (:class:`~dispatcher.outbound.pool.ConnectionPools`), up to ``max_connections`` in use
    for each; the caller's in-flight limits bound the sum.
    """

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext,
        backend: GuardedBackend,
        allow_http: bool = False,
        max_connections: int = 100,
        keepalive_expiry_s: float = KEEPALIVE_EXPIRY_S,
    ) -> None:
        self.backend = backend
        self._allow_http = allow_http
        self._pools = ConnectionPools(
            ssl_context=ssl_context,
            network_backend=backend,
            max_connections=max_connections,
            keepalive_expiry_s=keepalive_expiry_s,
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` through the guarded pool, translating httpcore's errors."""
        if request.url.scheme == "http" and not self._allow_http:
            raise EgressBlocked("plain_http", request.url.host)
        if not isinstance(request.stream, httpx.AsyncByteStream):
            raise TypeError("GuardedTransport needs an async request body")
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with _translated():
            response = await self._pools.handle_async_request(core_request)
        if not isinstance(response.stream, AsyncIterable):
            raise TypeError("httpcore returned a synchronous response stream")
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_ResponseStream(response.stream),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        """Close every pooled connection."""
        with _translated():
            await self._pools.aclose()


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


def build_http_client(
    settings: Settings,
    resolver: Resolver | None = None,
    *,
    network_backend: httpcore.AsyncNetworkBackend | None = None,
) -> httpx.AsyncClient:
    """The one pooled client that delivers webhooks.

    Redirects are not followed, TLS is always verified, plain HTTP only with
    ``settings.allow_http``, and every new connection goes through the address
    check with ``settings.allowed_networks``. ``resolver`` and ``network_backend``
    (what opens the sockets) replace the system's, for tests.

    ``settings.http_timeout_s`` bounds each phase (connect, write, read, pool
    wait); a deadline for a whole attempt is the caller's to set.
    """
    backend = GuardedBackend(
        allowed_networks=[ipaddress.ip_network(n, strict=False) for n in settings.allowed_networks],
        resolver=resolver,
        inner=network_backend,
    )
    transport = GuardedTransport(
        ssl_context=build_ssl_context(settings.http_ca_file),
        backend=backend,
        allow_http=settings.allow_http,
        # Per origin: every webhook on one host shares this cap and its connections.
        max_connections=settings.max_in_flight_per_origin,
    )
    return httpx.AsyncClient(
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
