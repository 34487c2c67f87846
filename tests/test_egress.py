"""The egress guard: address decisions, the resolver and socket factory, the client end to end.

No test opens a connection to anything but 127.0.0.1: blocked ranges are tested
as decisions, or through an injected resolver whose answer is refused before any
connection, and :class:`Sockets` fails a test that tries anything else.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Iterator, Sequence
from typing import Any

import aiohttp
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatcher import __version__
from dispatcher.errors import EgressBlocked
from dispatcher.outbound.delivery import AttemptResult
from dispatcher.outbound.delivery import post as delivery_post
from dispatcher.outbound.egress import (
    REASONS,
    GuardedResolver,
    GuardedSockets,
    IPAddress,
    blocked_reason,
    system_resolver,
)
from dispatcher.outbound.transport import build_http_client
from dispatcher.settings import Settings, load_settings
from tests.receiver import HttpsReceiver, Reply
from tests.sockets import Sockets, eventually

ip = ipaddress.ip_address
LOOPBACK_NET = [ipaddress.ip_network("127.0.0.0/8")]


# --- decisions ---------------------------------------------------------------

DECISIONS = {
    "loopback": ["127.0.0.1", "127.5.5.5", "127.255.255.254", "::1"],
    "private": [
        "10.0.0.1",
        "10.255.255.255",
        "172.16.0.1",
        "172.31.255.254",
        "192.168.0.1",
        "192.168.255.255",
        "fd12::1",
        "fc00::1",
        "fec0::1",
    ],
    "link_local": ["169.254.0.1", "169.254.255.254", "fe80::1", "fe80::1%eth0"],
    "metadata": [
        "169.254.169.254",
        "169.254.170.2",
        "fd00:ec2::254",
        "100.100.100.200",
        "168.63.129.16",
    ],
    "shared": ["100.64.0.1", "100.127.255.254"],
    "unspecified": ["0.0.0.0", "0.1.2.3", "::"],
    "multicast": ["224.0.0.1", "239.255.255.250", "ff02::1", "ff0e::1"],
    "documentation": ["192.0.2.1", "198.51.100.7", "203.0.113.9", "2001:db8::1", "3fff::1"],
    "reserved": [
        "240.0.0.1",
        "255.255.255.255",
        "198.18.0.1",
        "192.0.0.8",
        "192.88.99.1",
        "2001::1",  # Teredo
        "::127.0.0.1",  # deprecated IPv4-compatible form
        "::ffff:0:7f00:1",  # IPv4-translated (SIIT)
        "100::1",  # discard-only
        "64:ff9b:1::a00:1",  # local-use NAT64, embedding not knowable
        "5f00::1",  # outside 2000::/3
    ],
}
# IPv4 carried in IPv6 is judged as the IPv4 address.
EMBEDDED = {
    "::ffff:127.0.0.1": "loopback",
    "::ffff:10.0.0.1": "private",
    "::ffff:169.254.169.254": "metadata",
    "::ffff:100.64.0.1": "shared",
    "64:ff9b::7f00:1": "loopback",  # NAT64 of 127.0.0.1
    "64:ff9b::a9fe:a9fe": "metadata",  # NAT64 of 169.254.169.254
    "2002:7f00:1::": "loopback",  # 6to4 of 127.0.0.1
    "2002:a00:1::1": "private",  # 6to4 of 10.0.0.1
    "2002:a9fe:a9fe::": "metadata",
}
PUBLIC = [
    "93.184.216.34",
    "8.8.8.8",
    "1.1.1.1",
    "172.15.255.255",
    "172.32.0.1",
    "100.63.255.255",
    "100.128.0.0",
    "169.253.255.255",
    "2606:4700::1",
    "2a00:1450:4001::1",
    "::ffff:93.184.216.34",
    "64:ff9b::5db8:d822",  # NAT64 of 93.184.216.34
    "2002:5db8:d822::1",  # 6to4 of 93.184.216.34
]


@pytest.mark.parametrize(
    ("address", "reason"),
    [(a, r) for r, addresses in DECISIONS.items() for a in addresses] + list(EMBEDDED.items()),
)
def test_blocked(address: str, reason: str) -> None:
    assert blocked_reason(ip(address), []) == reason


@pytest.mark.parametrize("address", PUBLIC)
def test_public_allowed(address: str) -> None:
    assert blocked_reason(ip(address), []) is None


def test_reasons_are_a_closed_set() -> None:
    assert {
        "loopback",
        "private",
        "shared",
        "link_local",
        "metadata",
        "unspecified",
        "multicast",
        "documentation",
        "reserved",
        "plain_http",
    } == REASONS
    assert set(DECISIONS) | {"plain_http"} == REASONS


def test_allowlist_lets_its_networks_through_only() -> None:
    assert blocked_reason(ip("127.0.0.1"), LOOPBACK_NET) is None
    assert blocked_reason(ip("127.8.9.10"), LOOPBACK_NET) is None
    assert blocked_reason(ip("::ffff:127.0.0.1"), LOOPBACK_NET) is None
    assert blocked_reason(ip("10.0.0.1"), LOOPBACK_NET) == "private"
    assert blocked_reason(ip("::1"), LOOPBACK_NET) == "loopback"
    assert blocked_reason(ip("169.254.169.254"), LOOPBACK_NET) == "metadata"


def test_allowlist_narrow_and_ipv6() -> None:
    allowed = [ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("::1/128")]
    assert blocked_reason(ip("10.1.2.3"), allowed) is None
    assert blocked_reason(ip("10.2.0.1"), allowed) == "private"
    assert blocked_reason(ip("::1"), allowed) is None
    assert blocked_reason(ip("127.0.0.1"), allowed) == "loopback"


@given(st.ip_addresses(v=4))
def test_ipv4_mapped_form_is_judged_as_ipv4(address: ipaddress.IPv4Address) -> None:
    mapped = ip(f"::ffff:{address}")
    nat64 = ipaddress.IPv6Address(b"\x00\x64\xff\x9b" + bytes(8) + address.packed)
    assert blocked_reason(mapped, []) == blocked_reason(address, [])
    assert blocked_reason(nat64, []) == blocked_reason(address, [])


@given(st.ip_addresses())
def test_every_decision_is_a_known_reason(address: IPAddress) -> None:
    assert blocked_reason(address, []) in REASONS | {None}


# --- the resolver and the socket factory, without the network -------------------


class FakeDNS:
    """A resolver answering from a table, counting lookups."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.lookups: list[str] = []

    async def __call__(self, host: str, port: int) -> Sequence[IPAddress]:
        self.lookups.append(host)
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [ip(a) for a in self.table[host]]


def resolve(resolver: GuardedResolver, host: str, port: int = 443) -> list[str]:
    return [r["host"] for r in asyncio.run(resolver.resolve(host, port))]


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (["10.0.0.5"], "private"),
        (["169.254.169.254"], "metadata"),
        (["127.0.0.1", "::1"], "loopback"),
        (["::ffff:169.254.169.254"], "metadata"),
    ],
)
def test_resolver_refuses_a_name_with_only_blocked_addresses(
    answer: list[str], reason: str
) -> None:
    dns = FakeDNS({"evil.example": answer})
    with pytest.raises(EgressBlocked) as info:
        resolve(GuardedResolver(resolver=dns), "evil.example")
    assert info.value.reason == reason
    assert info.value.address == ip(answer[0])
    assert info.value.host == "evil.example"
    assert dns.lookups == ["evil.example"]


def test_resolver_keeps_only_the_allowed_addresses_in_order() -> None:
    dns = FakeDNS({"mixed.example": ["10.0.0.5", "127.0.0.3", "169.254.169.254", "127.0.0.1"]})
    assert resolve(GuardedResolver(LOOPBACK_NET, dns), "mixed.example") == [
        "127.0.0.3",
        "127.0.0.1",
    ]


def test_resolver_name_without_address_is_a_failed_lookup() -> None:
    with pytest.raises(OSError, match="no address") as info:
        resolve(GuardedResolver(resolver=FakeDNS({"empty.example": []})), "empty.example")
    assert not isinstance(info.value, EgressBlocked)


def _addr_info(host: str, port: int = 443) -> Any:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return (family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))


@pytest.mark.parametrize("host", ["10.0.0.5", "169.254.169.254", "::1", "fd00:ec2::254"])
def test_socket_factory_refuses_a_blocked_address_before_making_a_socket(host: str) -> None:
    made = Sockets()
    with pytest.raises(EgressBlocked) as info:
        GuardedSockets(LOOPBACK_NET, made)(_addr_info(host))
    assert info.value.address == ip(host)
    assert made.connects == []


def test_socket_factory_makes_sockets_for_allowed_addresses() -> None:
    made = Sockets()
    sock = GuardedSockets(LOOPBACK_NET, made)(_addr_info("127.0.0.9", 8443))
    sock.close()
    assert made.connects == [("127.0.0.9", 8443)]


def test_system_resolver_answers_literals_and_localhost() -> None:
    assert asyncio.run(system_resolver("127.0.0.1", 443)) == [ip("127.0.0.1")]
    addresses = asyncio.run(system_resolver("localhost", 443))
    assert addresses
    assert all(a.is_loopback for a in addresses)
    assert len(set(addresses)) == len(addresses)


# --- the client, against a real HTTPS receiver on 127.0.0.1 ----------------------


@pytest.fixture(scope="module")
def endpoint() -> Iterator[HttpsReceiver]:
    with HttpsReceiver(hostnames=("localhost", "webhooks.example", "127.0.0.1")) as server:
        yield server


@pytest.fixture(autouse=True)
def _clean(endpoint: HttpsReceiver) -> None:
    endpoint.reset()


@pytest.fixture
def sockets() -> Sockets:
    return Sockets()


DNS = FakeDNS(
    {
        "localhost": ["127.0.0.1"],
        "webhooks.example": ["127.0.0.1"],
        "other.example": ["127.0.0.1"],
        "internal.example": ["10.0.0.5"],
        "metadata.example": ["169.254.169.254"],
    }
)


def settings(endpoint: HttpsReceiver, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"http_ca_file": endpoint.ca_file, "http_timeout_s": 5.0}
    values.update(overrides)
    return load_settings(**values)


async def post(
    config: Settings, url: str, sockets: Sockets, body: bytes = b'{"ok":true}'
) -> httpx.Response:
    async with build_http_client(config, DNS, sockets=sockets) as client:
        return await client.post(url, content=body, headers={"Content-Type": "application/json"})


def test_post_succeeds_with_loopback_allowlisted(endpoint: HttpsReceiver, sockets: Sockets) -> None:
    config = settings(endpoint, allowed_networks=["127.0.0.0/8"])
    response = asyncio.run(post(config, endpoint.url("/hook?x=1"), sockets, b'{"n":1}'))
    assert response.status_code == 200
    [seen] = endpoint.wait_for_requests(1, path="/hook")
    assert (seen.method, seen.path, seen.body) == ("POST", "/hook?x=1", b'{"n":1}')
    assert seen.header("user-agent") == f"webhook-dispatcher/{__version__}"
    assert seen.header("content-type") == "application/json"
    assert seen.sni == "localhost"
    assert sockets.connects == [("127.0.0.1", endpoint.port)]


def test_post_to_loopback_blocked_by_default(endpoint: HttpsReceiver, sockets: Sockets) -> None:
    with pytest.raises(EgressBlocked) as info:
        asyncio.run(post(settings(endpoint), endpoint.url("/hook"), sockets))
    assert info.value.reason == "loopback"
    assert info.value.address == ip("127.0.0.1")
    assert isinstance(info.value, httpx.ConnectError)
    assert info.value.request.url == endpoint.url("/hook")
    assert sockets.connects == []
    assert endpoint.requests == []


@pytest.mark.parametrize(
    ("host", "reason"), [("internal.example", "private"), ("metadata.example", "metadata")]
)
def test_post_to_name_resolving_inside_is_blocked(
    host: str, reason: str, endpoint: HttpsReceiver, sockets: Sockets
) -> None:
    config = settings(endpoint, allowed_networks=["127.0.0.0/8"])
    with pytest.raises(EgressBlocked) as info:
        asyncio.run(post(config, f"https://{host}/hook", sockets))
    assert info.value.reason == reason
    assert sockets.connects == []


def test_literal_ip_url_is_checked(endpoint: HttpsReceiver, sockets: Sockets) -> None:
    url = endpoint.url("/ip", hostname="127.0.0.1")
    with pytest.raises(EgressBlocked):
        asyncio.run(post(settings(endpoint), url, sockets))
    assert sockets.connects == []
    config = settings(endpoint, allowed_networks=["127.0.0.1/32"])
    assert asyncio.run(post(config, url, sockets)).status_code == 200
    assert endpoint.requests_to("/ip")[0].sni is None  # no SNI for an IP address


def test_hostname_is_verified_and_sent_as_sni_while_connecting_by_ip(
    endpoint: HttpsReceiver, sockets: Sockets
) -> None:
    config = settings(endpoint, allowed_networks=["127.0.0.0/8"])
    url = endpoint.url("/named", hostname="webhooks.example")
    assert asyncio.run(post(config, url, sockets)).status_code == 200
    [seen] = endpoint.requests_to("/named")
    assert seen.sni == "webhooks.example"
    assert seen.header("host") == f"webhooks.example:{endpoint.port}"
    assert sockets.connects == [("127.0.0.1", endpoint.port)]


def test_certificate_for_another_name_is_refused(endpoint: HttpsReceiver, sockets: Sockets) -> None:
    # The certificate also names 127.0.0.1: were the connected address verified
    # instead of the URL's host, this would pass.
    config = settings(endpoint, allowed_networks=["127.0.0.0/8"])
    url = endpoint.url("/other", hostname="other.example")
    with pytest.raises(httpx.ConnectError) as info:
        asyncio.run(post(config, url, sockets))
    assert not isinstance(info.value, EgressBlocked)
    assert _caused_by(info.value, ssl.SSLCertVerificationError)
    assert endpoint.requests == []


def test_tls_is_verified_without_the_extra_ca(endpoint: HttpsReceiver, sockets: Sockets) -> None:
    config = settings(endpoint, allowed_networks=["127.0.0.0/8"], http_ca_file=None)
    with pytest.raises(httpx.ConnectError) as info:
        asyncio.run(post(config, endpoint.url("/untrusted"), sockets))
    assert _caused_by(info.value, ssl.SSLCertVerificationError)
    assert endpoint.requests == []


def test_redirect_is_not_followed(endpoint: HttpsReceiver, sockets: Sockets) -> None:
    target = endpoint.url("/elsewhere")
    endpoint.respond("/moved", Reply(302, headers={"Location": target}))
    config = settings(endpoint, allowed_networks=["127.0.0.0/8"])
    response = asyncio.run(post(config, endpoint.url("/moved"), sockets))
    assert response.status_code == 302
    assert response.headers["location"] == target
    assert [r.path for r in endpoint.requests] == ["/moved"]


def test_plain_http_refused_unless_allowed(sockets: Sockets) -> None:
    with HttpsReceiver(tls=False) as plain:
        url = plain.url("/plain", hostname="127.0.0.1")
        config = load_settings(allowed_networks=["127.0.0.0/8"])
        with pytest.raises(EgressBlocked) as info:
            asyncio.run(post(config, url, sockets))
        assert info.value.reason == "plain_http"
        assert info.value.address is None
        assert "http" in str(info.value)
        assert sockets.connects == []

        allowed = load_settings(allowed_networks=["127.0.0.0/8"], allow_http=True)
        assert asyncio.run(post(allowed, url, sockets)).status_code == 200
        assert [r.path for r in plain.requests] == ["/plain"]

        # Allowing HTTP does not lift the address check.
        with pytest.raises(EgressBlocked) as info:
            asyncio.run(post(load_settings(allow_http=True), url, sockets))
        assert info.value.reason == "loopback"


def test_connection_refused_is_a_plain_connect_error(sockets: Sockets) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = load_settings(allowed_networks=["127.0.0.0/8"])
    with pytest.raises(httpx.ConnectError) as info:
        asyncio.run(post(config, f"https://127.0.0.1:{port}/", sockets))
    assert not isinstance(info.value, EgressBlocked)
    assert isinstance(info.value.__cause__, aiohttp.ClientConnectorError)


def test_the_next_allowed_address_is_tried_when_one_refuses(
    endpoint: HttpsReceiver, sockets: Sockets
) -> None:
    # Nothing listens on 127.0.0.2; the private address between is never tried.
    dns = FakeDNS({"webhooks.example": ["127.0.0.2", "10.0.0.1", "127.0.0.1"]})
    config = settings(endpoint, allowed_networks=["127.0.0.0/8"])

    async def send() -> int:
        async with build_http_client(config, dns, sockets=sockets) as client:
            url = endpoint.url("/fallback", hostname="webhooks.example")
            return (await client.post(url, content=b"{}")).status_code

    assert asyncio.run(send()) == 200
    assert sockets.connects == [("127.0.0.2", endpoint.port), ("127.0.0.1", endpoint.port)]


def test_every_allowed_address_refusing_is_a_connect_error(sockets: Sockets) -> None:
    dns = FakeDNS({"two.example": ["127.0.0.2", "127.0.0.3"]})
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = load_settings(allowed_networks=["127.0.0.0/8"])

    async def send() -> None:
        async with build_http_client(config, dns, sockets=sockets) as client:
            await client.post(f"https://two.example:{port}/", content=b"{}")

    with pytest.raises(httpx.ConnectError) as info:
        asyncio.run(send())
    assert not isinstance(info.value, EgressBlocked)
    # Both tried, in order (aiohttp may try the last one twice), and nothing else.
    assert sockets.connects[:2] == [("127.0.0.2", port), ("127.0.0.3", port)]
    assert set(sockets.connects) == {("127.0.0.2", port), ("127.0.0.3", port)}


def test_an_unknown_name_is_a_connect_error(sockets: Sockets) -> None:
    async def send() -> None:
        config = load_settings(allowed_networks=["127.0.0.0/8"])
        async with build_http_client(config, DNS, sockets=sockets) as client:
            await client.post("https://nowhere.example/", content=b"{}")

    with pytest.raises(httpx.ConnectError, match=r"nowhere\.example") as info:
        asyncio.run(send())
    assert not isinstance(info.value, EgressBlocked)
    assert sockets.connects == []


def test_connect_timeout_covers_name_resolution(sockets: Sockets) -> None:
    async def stalled(host: str, port: int) -> Sequence[IPAddress]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send() -> None:
        config = load_settings(http_timeout_s=0.1)
        async with build_http_client(config, stalled, sockets=sockets) as client:
            await client.post("https://slow-dns.example/", content=b"{}")

    with pytest.raises(httpx.ConnectTimeout):
        asyncio.run(send())
    assert sockets.connects == []


def test_read_timeout_is_translated_and_drops_the_connection(
    endpoint: HttpsReceiver, sockets: Sockets
) -> None:
    endpoint.respond("/slow", Reply(200, delay_s=1.0))
    config = settings(endpoint, allowed_networks=["127.0.0.0/8"], http_timeout_s=0.2)

    async def send() -> type[BaseException]:
        async with build_http_client(config, DNS, sockets=sockets) as client:
            try:
                await client.post(endpoint.url("/slow"), content=b"{}")
            except httpx.HTTPError as exc:
                # Closed, never given back to the pool (its answer may still come).
                await eventually(lambda: all(sockets.closed), 10, "the socket to close")
                return type(exc)
        raise AssertionError("the slow answer was awaited past the read timeout")

    assert asyncio.run(send()) is httpx.ReadTimeout
    assert len(endpoint.wait_for_requests(1, path="/slow")) == 1
    assert sockets.closed == [True]


def test_connections_are_reused_and_checked_once_each(
    endpoint: HttpsReceiver, sockets: Sockets
) -> None:
    config = settings(endpoint, allowed_networks=["127.0.0.0/8"])

    async def three_posts() -> list[int]:
        async with build_http_client(config, DNS, sockets=sockets) as client:
            codes = []
            for host in ("localhost", "localhost", "webhooks.example"):
                response = await client.post(endpoint.url("/reuse", hostname=host), content=b"{}")
                codes.append(response.status_code)
            return codes

    assert asyncio.run(three_posts()) == [200, 200, 200]
    assert sockets.connects == [("127.0.0.1", endpoint.port)] * 2
    assert len(endpoint.requests_to("/reuse")) == 3


def test_client_configuration(endpoint: HttpsReceiver) -> None:
    config = settings(endpoint, http_timeout_s=7.5, max_in_flight=3)

    async def inspect() -> None:
        async with build_http_client(config) as client:
            assert client.follow_redirects is False
            assert client.timeout == httpx.Timeout(7.5)
            assert client.headers["user-agent"] == f"webhook-dispatcher/{__version__}"
            assert client.trust_env is False

    asyncio.run(inspect())


def test_pool_is_capped_per_origin(endpoint: HttpsReceiver, sockets: Sockets) -> None:
    endpoint.respond("/held", Reply(200, delay_s=0.2))
    config = settings(endpoint, allowed_networks=["127.0.0.0/8"], max_in_flight_per_origin=2)

    async def burst() -> None:
        async with build_http_client(config, DNS, sockets=sockets) as client:
            url = endpoint.url("/held")
            await asyncio.gather(*(client.post(url, content=b"{}") for _ in range(4)))

    asyncio.run(burst())
    assert len(sockets.connects) == 2
    assert len(endpoint.requests_to("/held")) == 4


# --- the test receiver itself ----------------------------------------------------


def test_receiver_scripts_replies_in_order(endpoint: HttpsReceiver, sockets: Sockets) -> None:
    endpoint.respond("/flaky", Reply(503, retry_after="7", body=b"busy"), Reply(204))
    config = settings(endpoint, allowed_networks=["127.0.0.0/8"])

    async def three() -> list[httpx.Response]:
        async with build_http_client(config, DNS, sockets=sockets) as client:
            return [await client.post(endpoint.url("/flaky"), content=b"{}") for _ in range(3)]

    first, second, third = asyncio.run(three())
    assert (first.status_code, first.headers["retry-after"], first.content) == (503, "7", b"busy")
    assert second.status_code == third.status_code == 204


def test_receiver_reads_chunked_bodies(endpoint: HttpsReceiver, sockets: Sockets) -> None:
    config = settings(endpoint, allowed_networks=["127.0.0.0/8"])

    async def chunks() -> Any:
        yield b'{"a":'
        yield b"1}"

    async def send() -> None:
        async with build_http_client(config, DNS, sockets=sockets) as client:
            await client.post(endpoint.url("/chunked"), content=chunks())

    asyncio.run(send())
    [seen] = endpoint.requests_to("/chunked")
    assert seen.body == b'{"a":1}'
    assert seen.header("transfer-encoding") == "chunked"


def test_receiver_wait_times_out_with_a_report(endpoint: HttpsReceiver) -> None:
    with pytest.raises(TimeoutError, match="wanted 1 request"):
        endpoint.wait_for_requests(1, path="/never", timeout_s=0.05)


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


# --- the delivery path, which sends through the transport directly -------------------


@pytest.mark.parametrize(
    ("url", "error_class", "reason"),
    [
        ("https://internal.example/hook", "blocked", "private"),
        ("https://127.0.0.1:9/hook", "blocked", "loopback"),
        ("http://webhooks.example/hook", "blocked", "plain http://"),
        ("https://nowhere.example/hook", "connection", "cannot connect"),
    ],
)
def test_a_delivery_attempt_goes_through_the_guard_too(
    url: str, error_class: str, reason: str, endpoint: HttpsReceiver, sockets: Sockets
) -> None:
    async def attempt() -> AttemptResult:
        async with build_http_client(settings(endpoint), DNS, sockets=sockets) as client:
            return await delivery_post(client.transport, url, b"{}", {}, 5.0, 64)

    result = asyncio.run(attempt())
    assert (result.ok, result.error_class) == (False, error_class)
    assert reason in (result.error or "").lower()
    assert sockets.connects == []


def test_a_delivery_attempt_sends_the_bytes_and_headers_as_given(
    endpoint: HttpsReceiver, sockets: Sockets
) -> None:
    config = settings(endpoint, allowed_networks=["127.0.0.0/8"])
    headers = {"Content-Type": "application/json", "X-Test": "1"}

    async def attempt() -> AttemptResult:
        async with build_http_client(config, DNS, sockets=sockets) as client:
            url = endpoint.url("/direct?q=a%20b", hostname="webhooks.example")
            return await delivery_post(client.transport, url, b'{"a":1}', headers, 5.0, 64)

    assert asyncio.run(attempt()).status_code == 200
    [seen] = endpoint.requests_to("/direct")
    assert (seen.path, seen.body, seen.sni) == ("/direct?q=a%20b", b'{"a":1}', "webhooks.example")
    assert seen.header("x-test") == "1"
    assert seen.header("content-length") == "7"
    assert seen.header("host") == f"webhooks.example:{endpoint.port}"
    assert seen.header("cookie") is None
