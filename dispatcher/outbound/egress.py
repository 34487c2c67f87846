"""The egress guard: which addresses a delivery may connect to, checked on connect.

A subscription's URL is chosen by a customer, so a delivery must never reach the
dispatcher's own network: loopback, private ranges, link-local, cloud metadata.
Checking the URL when it is saved is not enough (DNS can change, or answer
differently next time), so the check is made where connections are opened
(:mod:`dispatcher.outbound.transport` plugs both parts into aiohttp's connector):

* :class:`GuardedResolver` resolves a name itself and hands the connector only
  the allowed addresses, in order; a name with none left is refused with
  :class:`EgressBlocked` before any socket exists.
* :class:`GuardedSockets` is the connector's socket factory: it judges the very
  address each socket is about to connect to, so a literal IP in a URL (which
  skips the resolver) or anything else that bypasses it is refused as well.

TLS still verifies, and sends SNI for, the URL's hostname: the connector passes
the URL's host as ``server_hostname``, never the connected address. Refusals
raise :class:`EgressBlocked`, a subclass of ``httpx.ConnectError`` that reaches
the caller of ``client.post`` as is, with ``.reason``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, get_args

from aiohttp.abc import AbstractResolver, ResolveResult

from dispatcher.errors import BlockReason, EgressBlocked, IPAddress

__all__ = [
    "REASONS",
    "BlockReason",
    "EgressBlocked",
    "GuardedResolver",
    "GuardedSockets",
    "IPAddress",
    "IPNetwork",
    "Resolver",
    "blocked_reason",
    "system_resolver",
]

IPNetwork = IPv4Network | IPv6Network
Resolver = Callable[[str, int], Awaitable[Sequence[IPAddress]]]

REASONS: frozenset[str] = frozenset(get_args(BlockReason))

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


class GuardedResolver(AbstractResolver):
    """An aiohttp resolver that answers with the allowed addresses of a name only.

    ``resolver`` (default :func:`system_resolver`) does the lookup; the addresses
    it returns are judged with :func:`blocked_reason` and the allowed ones kept in
    its order. When none is left, :class:`EgressBlocked` names the first refused
    one. Literal IPs never reach a resolver (aiohttp takes them as they are):
    :class:`GuardedSockets` judges those.
    """

    def __init__(
        self, allowed_networks: Sequence[IPNetwork] = (), resolver: Resolver | None = None
    ) -> None:
        self.allowed_networks = tuple(allowed_networks)
        self._resolve = resolver or system_resolver

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        allowed: list[ResolveResult] = []
        refused: tuple[IPAddress, BlockReason] | None = None
        for address in await self._resolve(host, port):
            reason = blocked_reason(address, self.allowed_networks)
            if reason is None:
                allowed.append(
                    {
                        "hostname": host,
                        "host": str(address),
                        "port": port,
                        "family": socket.AF_INET6 if address.version == 6 else socket.AF_INET,
                        "proto": socket.IPPROTO_TCP,
                        "flags": socket.AI_NUMERICHOST,
                    }
                )
            elif refused is None:
                refused = (address, reason)
        if allowed:
            return allowed
        if refused is None:
            # An OSError, so that aiohttp reports it as a failed lookup.
            raise OSError(f"{host} resolved to no address")
        raise EgressBlocked(refused[1], host, refused[0])

    async def close(self) -> None:
        """Nothing to release: lookups go through the event loop."""


#: ``(family, type, proto, canonname, sockaddr)``, as ``getaddrinfo`` returns them.
AddrInfo = tuple[int, int, int, str, tuple[Any, ...]]
SocketFactory = Callable[[AddrInfo], socket.socket]


def plain_socket(addr_info: AddrInfo) -> socket.socket:
    family, type_, proto, _, _ = addr_info
    return socket.socket(family=family, type=type_, proto=proto)


class GuardedSockets:
    """A socket factory for aiohttp's connector that refuses blocked addresses.

    Called with the exact address each new connection is about to be opened to,
    after any resolution, so it is the last word: a blocked address raises
    :class:`EgressBlocked` and no socket is created. ``inner`` makes the sockets
    of allowed addresses (tests record them through it).
    """

    def __init__(
        self, allowed_networks: Sequence[IPNetwork] = (), inner: SocketFactory | None = None
    ) -> None:
        self.allowed_networks = tuple(allowed_networks)
        self._inner = inner or plain_socket

    def __call__(self, addr_info: AddrInfo) -> socket.socket:
        address = ipaddress.ip_address(addr_info[4][0])
        reason = blocked_reason(address, self.allowed_networks)
        if reason is not None:
            raise EgressBlocked(reason, str(address), address)
        return self._inner(addr_info)
