"""Every exception the dispatcher defines, in one place.

    DispatcherError          what the command line reports in one line (exit code)
    ├── ConfigError          a setting or command-line value is wrong (exit 2)
    ├── KafkaSetupError      topics missing or misconfigured, broker unreachable (exit 1)
    │   ├── WriteTimeout     a configuration write acknowledged, not read back in time
    │   ├── NotApplied       a configuration change not applied; retrying is safe
    │   └── OutcomeUnknown   a configuration commit sent, its outcome unknown
    ├── EngineFailure        the dispatch pump or a polling thread died (exit 1)
    └── SubscriptionError    a subscription record or command input is invalid (exit 2)
        └── Refusal          a change refused by the rules; nothing was written

    ValueError               input that cannot be used, the message says why
    ├── InvalidEvent         an input message that cannot be dispatched
    ├── InvalidUrl           a webhook URL that cannot be delivered to
    ├── JSONError            not JSON that can be delivered
    │   └── NumberError      a number no receiver can read back

    httpx.ConnectError
    └── EgressBlocked        a request the egress policy refused before connecting

    Exception
    ├── Unusable             a message the engine sends to the invalid-events topic
    ├── ProduceRefused       a record the broker refused for good
    ├── Problem              an API error answer (application/problem+json)
    ├── Fenced               another configuration writer took the role
    └── Unanswered           a configuration commit whose answer says nothing

Errors of dependencies (confluent-kafka, httpx, pydantic) are translated into these
at the boundary so the command line can print one clear line instead of a traceback.

One lives elsewhere on purpose: ``SignatureVerificationError``, in
:mod:`dispatcher.outbound.signing`, whose helpers receivers import without the
dispatcher's dependencies (this module needs httpx).
"""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv4Address, IPv6Address
from typing import Literal, Protocol

import httpx

IPAddress = IPv4Address | IPv6Address

#: Why an input message is invalid: a metric label and a header of its record.
InvalidReason = Literal["too_large", "not_json", "invalid_event"]

#: Why the egress policy refuses an address (a metric label).
BlockReason = Literal[
    "loopback",  # 127.0.0.0/8, ::1
    "private",  # RFC 1918, IPv6 unique-local fc00::/7 and old site-local fec0::/10
    "shared",  # 100.64.0.0/10, carrier-grade NAT
    "link_local",  # 169.254.0.0/16, fe80::/10
    "metadata",  # cloud instance-metadata endpoints
    "unspecified",  # 0.0.0.0/8, ::
    "multicast",  # 224.0.0.0/4, ff00::/8
    "documentation",  # TEST-NETs, 2001:db8::/32, 3fff::/20
    "reserved",  # everything else not globally routable
    "plain_http",  # an http:// URL while DISPATCHER_ALLOW_HTTP is off
]

#: Why a configuration change was refused.
RefusalKind = Literal[
    "invalid",  # bad input; ``field`` names it
    "not-found",  # no such webhook (or another organization's)
    "plan-unset",  # the organization has no plan yet
    "plan-not-entitled",  # the plan has no webhooks
    "stale",  # If-Match names a version that is no longer current
    "conflict",  # the input is valid but the state in force refuses it; ``field`` names it
]


# --- reported by the command line -----------------------------------------------------
class DispatcherError(Exception):
    """Root of every error the dispatcher raises on purpose."""

    exit_code = 1


class ConfigError(DispatcherError):
    """A setting or command-line value is invalid."""

    exit_code = 2


class KafkaSetupError(DispatcherError):
    """The broker is unreachable or a topic is missing or wrongly configured."""


class WriteTimeout(KafkaSetupError):
    """A write was acknowledged but not read back in time."""


class NotApplied(KafkaSetupError):
    """The change was not applied (aborted, or never sent); retrying it is safe."""


class OutcomeUnknown(KafkaSetupError):
    """The commit was sent but not confirmed, and could not be read back."""


class EngineFailure(DispatcherError):
    """The engine cannot go on: its pump or a polling thread died; the process exits."""


class SubscriptionError(DispatcherError):
    """A subscription is invalid, unknown or not allowed."""

    exit_code = 2


class Refusal(SubscriptionError):
    """A change refused by the rules; nothing was written."""

    def __init__(self, message: str, kind: RefusalKind = "invalid", field: str | None = None):
        super().__init__(message)
        self.kind: RefusalKind = kind
        self.field = field


# --- input that cannot be used --------------------------------------------------------
class InvalidEvent(ValueError):
    """An input message that cannot be dispatched; ``reason`` is a metric label."""

    def __init__(self, reason: InvalidReason, detail: str):
        # The detail goes into a log line and a Kafka header: one line, encodable.
        detail = " ".join(detail.split())[:500]
        detail = detail.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(detail)
        self.reason: InvalidReason = reason
        self.detail = detail


class InvalidUrl(ValueError):
    """The URL cannot be delivered to; the message says why, in one line."""


class JSONError(ValueError):
    """Not JSON that can be delivered; the message says why."""


class NumberError(JSONError):
    """JSON whose number no receiver can read back: NaN, Infinity, out of a double's range."""


# --- outbound HTTP ----------------------------------------------------------------------
class EgressBlocked(httpx.ConnectError):
    """A request refused by the egress policy before any connection was opened.

    ``reason`` is one of :data:`~dispatcher.outbound.egress.REASONS`; ``address`` is
    the refused address (the first one, when a name resolved to several, all
    refused), or ``None`` for ``plain_http``; ``host`` is the URL's host.
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


# --- the engine -------------------------------------------------------------------------
class Unusable(Exception):
    """A message that cannot be dispatched: it goes to the invalid-events topic."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class ProduceRefused(Exception):
    """A record the broker (or the client) refused for good; retrying cannot help.

    ``too_large``: refused for its size, so a smaller record may pass.
    """

    def __init__(self, topic: str, code: int, name: str, detail: str, too_large: bool) -> None:
        super().__init__(f"{topic}: {name}: {detail}")
        self.topic = topic
        self.code = code
        self.name = name
        self.too_large = too_large


# --- the API ----------------------------------------------------------------------------
class FieldProblem(Protocol):
    """One invalid input of a request (the API's ``FieldError`` model is one)."""

    @property
    def path(self) -> str: ...

    @property
    def message(self) -> str: ...


class Problem(Exception):
    """An error answer; ``kind`` is the last part of its ``type`` URI."""

    def __init__(
        self,
        status: int,
        kind: str,
        title: str,
        detail: str | None = None,
        errors: Sequence[FieldProblem] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail or title)
        self.status = status
        self.kind = kind
        self.title = title
        self.detail = detail
        self.errors = errors
        self.headers = headers


# --- the configuration writer's own control flow ----------------------------------------
class Fenced(Exception):
    """Another producer with the same transactional.id took the role."""


class Unanswered(Exception):
    """The commit's outcome is not known from its answer."""
