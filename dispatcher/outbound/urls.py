"""Webhook URL rules: a URL is accepted only if it can actually be delivered to.

The dispatcher reads a URL with two parsers: httpx's (which sends the request)
and :func:`urllib.parse.urlsplit` (which names the endpoint for its slots and
breaker). A URL that one of them refuses, or that they read differently, would
fail at delivery time, once per event, for as long as the subscription exists.
So every rule either parser or the resolver would enforce later is checked here
once, when the subscription is saved and again when the dispatcher reads it.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final
from urllib.parse import urlsplit

import httpx

from dispatcher.errors import InvalidUrl

SCHEMES: Final = ("https", "http")
#: One DNS label once IDNA-encoded: what resolvers accept (underscores occur in real names).
_LABEL = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")
_MAX_HOST = 253


def normalize_url(value: str) -> str:
    """The URL as it will be stored, or :class:`InvalidUrl` saying why it cannot be.

    Surrounding whitespace is dropped and the scheme lower-cased (``HTTPS://`` is
    https); nothing else is rewritten, so the stored URL is the one the operator
    gave.
    """
    url = value.strip()
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SCHEMES:
        raise InvalidUrl("URL must start with https://")
    url = scheme.lower() + sep + rest
    bad = next((ch for ch in url if ch.isspace() or not ch.isprintable()), None)
    if bad is not None:
        raise InvalidUrl(f"URL holds a space or control character ({bad!r})")
    try:
        parsed = httpx.URL(url)
        # Read as the client will: ``host`` decodes IDNA and can fail on its own.
        client_host, port = parsed.host, parsed.port
    except (httpx.InvalidURL, UnicodeError, ValueError) as exc:
        raise InvalidUrl(f"URL is not valid: {_first_line(exc)}") from None
    try:
        split = urlsplit(url)
        split_port = split.port
    except ValueError as exc:
        raise InvalidUrl(f"URL is not valid: {exc}") from None
    if split.username is not None or split.password is not None:
        raise InvalidUrl("URL must not carry credentials")
    if port is not None and not 1 <= port <= 65535:
        raise InvalidUrl(f"URL port {port} is outside 1-65535")
    host = parsed.raw_host.decode("ascii", "replace")
    if not host:
        raise InvalidUrl("URL has no host")
    # Both parsers must name the same endpoint, or the breaker and the egress
    # guard would look at another host than the one the request goes to.
    default = 443 if parsed.scheme == "https" else 80
    if (split.hostname or "") != client_host or (split_port or default) != (port or default):
        raise InvalidUrl("URL is ambiguous: its host or port reads differently to HTTP clients")
    _check_host(host)
    return url


def _check_host(host: str) -> None:
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    name = host.removesuffix(".")
    if len(name) > _MAX_HOST:
        raise InvalidUrl(f"URL host is longer than {_MAX_HOST} characters")
    for label in name.split("."):
        if not _LABEL.match(label):
            raise InvalidUrl(f"URL host {host!r} is not a valid domain name")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]
