"""Wire models: the input event and the subscription record.

Both agree with the JSON Schemas under ``schemas/`` (a test checks the pair on
the same valid and invalid documents). The retry/dead-letter record lives in
:mod:`dispatcher.records`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dispatcher import jsonio
from dispatcher.errors import InvalidEvent, JSONError, NumberError, SubscriptionError
from dispatcher.outbound.urls import normalize_url

#: The top-level keys of a delivered body, in the order they are sent.
BODY_KEYS: Final = (
    "event",
    "timestamp",
    "organization_id",
    "session_id",
    "visitor",
    "company",
    "session",
)

EVENT_NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
IDENTIFIER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}$")
#: Highest rate limit a webhook may have (deliveries a second); beyond it the
#: concurrency slots are the only limit that matters.
MAX_RATE_LIMIT_PER_S: Final = 10_000

#: Text shown to people (a webhook's description): no C0 or C1 control character
#: (NUL, ESC, CR, LF...), no line or paragraph separator and no bidirectional
#: embedding, override or isolate, any of which could rewrite what a terminal or a
#: page shows around it.
TEXT_PATTERN = r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]*$"
_TEXT = re.compile(TEXT_PATTERN)
_TEXT_CHAR = re.compile(TEXT_PATTERN[1:-2])  # one allowed character


def check_text(value: str) -> None:
    """ValueError when ``value`` holds a character :data:`TEXT_PATTERN` excludes."""
    if not _TEXT.fullmatch(value):  # fullmatch: `$` alone would let a final LF through
        bad = next(ch for ch in value if not _TEXT_CHAR.fullmatch(ch))
        raise ValueError(
            f"must not hold control characters or bidirectional overrides (found U+{ord(bad):04X})"
        )


def parse_timestamp(value: str) -> datetime:
    """Parse an ISO 8601 timestamp that carries a time zone."""
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError("timestamp needs a time zone (use Z for UTC)")
    return as_utc(parsed)


def as_utc(value: datetime) -> datetime:
    """``value`` in UTC (a naive one taken as UTC); ValueError when UTC cannot hold it.

    0001-01-01T00:00:00+01:00 is a valid ISO 8601 time whose UTC form falls before
    year 1: ``astimezone`` raises OverflowError, which validators would not catch.
    """
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("time is out of range once converted to UTC") from None


def format_timestamp(value: datetime) -> str:
    """ISO 8601 in UTC with a ``Z`` suffix, as the customer documentation shows."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


class _Open(BaseModel):
    """An inner object: known fields typed, unknown fields passed through."""

    model_config = ConfigDict(extra="allow", strict=True)


class Visitor(_Open):
    email: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    job_title: str | None = None
    linkedin_url: str | None = None
    location: str | None = None


class Company(_Open):
    name: str | None = None
    industry: str | None = None
    employee_count: int | None = Field(None, ge=0)
    location: str | None = None


class Session(_Open):
    landing_page: str | None = None
    pages_visited: list[str] | None = None
    utm_source: str | None = None
    utm_medium: str | None = None
    referrer: str | None = None
    device_type: str | None = None


class Event(BaseModel):
    """A ``visitor.identified`` event as upstream publishes it."""

    model_config = ConfigDict(extra="allow", strict=True)

    event: str = Field(pattern=EVENT_NAME.pattern, max_length=128)
    timestamp: str
    organization_id: str = Field(min_length=1, max_length=128)
    session_id: str = Field(min_length=1, max_length=256)
    visitor: Visitor
    company: Company
    session: Session

    @field_validator("timestamp")
    @classmethod
    def _timestamp(cls, value: str) -> str:
        parse_timestamp(value)
        return value

    @property
    def occurred_at(self) -> datetime:
        return parse_timestamp(self.timestamp)


class ParsedEvent:
    """A validated event with its body serialized once for every delivery of it."""

    __slots__ = ("body", "event", "occurred_at", "organization_id")

    def __init__(self, event: str, organization_id: str, occurred_at: datetime, body: bytes):
        self.event = event
        self.organization_id = organization_id
        self.occurred_at = occurred_at
        self.body = body


def _body_of(raw: Mapping[str, Any], occurred_at: datetime) -> bytes:
    # Built from the raw JSON, not the model, so unknown inner fields reach the
    # customer untouched; only the documented top-level keys are sent.
    # jsonio writes JSON only: NaN and Infinity were refused on the way in.
    doc = {key: raw[key] for key in BODY_KEYS}
    doc["timestamp"] = format_timestamp(occurred_at)
    return jsonio.dumps(doc)


#: Deepest nesting of objects and arrays accepted in an event. Real events nest
#: two or three levels; the limit keeps every later step (validation, encoding,
#: the customer's own parser) far from any recursion limit.
MAX_EVENT_DEPTH: Final = 32


def parse_event(value: bytes | None, max_bytes: int) -> ParsedEvent:
    """Validate a ``visitor.identified`` message; raise :class:`InvalidEvent` saying why
    it is not one.

    For bodies the dispatcher builds itself (test sends, the benchmark); the engine
    reads input through :meth:`dispatcher.catalog.Catalog.parse`, which also turns an
    unforeseen error into an invalid event.
    """
    return event_of_model(decode_event(value, max_bytes))


def decode_event(value: bytes | None, max_bytes: int) -> dict[str, Any]:
    """The JSON object of an input message, within the size and nesting limits."""
    if value is None:
        raise InvalidEvent("invalid_event", "message has no value (a tombstone)")
    if len(value) > max_bytes:
        raise InvalidEvent("too_large", f"message is {len(value)} bytes, limit is {max_bytes}")
    try:
        raw = jsonio.loads(value)
    except NumberError as exc:
        raise InvalidEvent("invalid_event", f"unusable number: {exc}") from None
    except JSONError as exc:
        raise InvalidEvent("not_json", f"not JSON: {exc}") from None
    except RecursionError:
        raise InvalidEvent(
            "invalid_event", f"nested deeper than {MAX_EVENT_DEPTH} levels"
        ) from None
    except ValueError as exc:  # an integer of more digits than Python converts
        raise InvalidEvent("invalid_event", f"unusable number: {exc}") from None
    if not isinstance(raw, dict):
        raise InvalidEvent("invalid_event", "the JSON value is not an object")
    # Nesting needs an opening bracket per level: counting them (fast, in C) spares
    # the walk for nearly every event.
    openers = value.count(b"{") + value.count(b"[")
    if openers > MAX_EVENT_DEPTH and _depth(raw) > MAX_EVENT_DEPTH:
        raise InvalidEvent("invalid_event", f"nested deeper than {MAX_EVENT_DEPTH} levels")
    return raw


def event_of_model(raw: dict[str, Any]) -> ParsedEvent:
    """A ``visitor.identified`` event checked by its model (the shipped type)."""
    try:
        event = Event.model_validate(raw)
    except ValidationError as exc:
        raise InvalidEvent("invalid_event", short_errors(exc)) from None
    try:
        occurred_at = event.occurred_at
        return ParsedEvent(
            event.event, event.organization_id, occurred_at, _body_of(raw, occurred_at)
        )
    except JSONError as exc:  # a lone surrogate escape in a text, say
        raise InvalidEvent("invalid_event", f"cannot be written as JSON: {exc}") from None


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_EVENT_DEPTH:
            return deepest
        stack.extend((child, level + 1) for child in children)
    return deepest


def short_errors(exc: ValidationError) -> str:
    """Pydantic's errors as one line: ``field.path: message; ...``."""
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ())) or "value"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


class PreviousSecret(BaseModel):
    """A rotated-out secret that still signs until ``expires_at``."""

    model_config = ConfigDict(extra="forbid")

    secret: str = Field(min_length=8, max_length=256)
    expires_at: datetime

    _utc = field_validator("expires_at")(as_utc)


class Subscription(BaseModel):
    """One webhook endpoint of an organization (value of the subscriptions topic)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    webhook_id: str = Field(pattern=IDENTIFIER.pattern)
    organization_id: str = Field(min_length=1, max_length=128)
    url: str = Field(min_length=1, max_length=2048)
    events: tuple[str, ...] = Field(min_length=1)
    secret: str | None = Field(None, min_length=8, max_length=256)
    previous_secrets: tuple[PreviousSecret, ...] = ()
    enabled: bool = True
    description: str | None = Field(None, max_length=500)
    plan: str = Field(min_length=1, max_length=64)
    created_at: datetime
    updated_at: datetime
    #: Incremented by every change the writer makes; the API's ETag. 0: written
    #: before versions existed.
    version: int = Field(0, ge=0)
    #: Why it is disabled: "failing" (the writer disabled it, see
    #: :mod:`dispatcher.health`) or "manual"; None while enabled.
    disabled_reason: Literal["failing", "manual"] | None = None
    disabled_at: datetime | None = None
    #: Most deliveries started per second, across every dispatcher instance; None:
    #: only the concurrency slots limit it.
    rate_limit_per_s: float | None = Field(
        None, gt=0, le=MAX_RATE_LIMIT_PER_S, allow_inf_nan=False, strict=True
    )

    _url = field_validator("url")(normalize_url)
    # Times in UTC, so comparing them with now can never fail in the hot path.
    _utc = field_validator("created_at", "updated_at")(as_utc)

    @field_validator("disabled_at")
    @classmethod
    def _disabled_utc(cls, value: datetime | None) -> datetime | None:
        return None if value is None else as_utc(value)

    @field_validator("events")
    @classmethod
    def _events(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if not EVENT_NAME.match(name):
                raise ValueError(f"{name!r} is not an event name like visitor.identified")
        return value

    @field_validator("plan")
    @classmethod
    def _plan(cls, value: str) -> str:
        return value.strip().lower()

    def active_secrets(self, now: datetime) -> list[str]:
        """Secrets that sign a delivery made at ``now``, newest first."""
        found = [self.secret] if self.secret else []
        found.extend(p.secret for p in self.previous_secrets if p.expires_at > now)
        return found

    def to_json(self) -> bytes:
        # Fields left unset are not written, so a record that uses none of the newer
        # fields is what earlier versions wrote, and they still read it during a
        # rolling upgrade (they forbid unknown fields). A record of an enabled webhook
        # without a limit reads in any version.
        unset = {
            name
            for name in ("description", "disabled_reason", "disabled_at", "rate_limit_per_s")
            if getattr(self, name) is None
        }
        return self.model_dump_json(exclude_none=False, exclude=unset).encode()


def decode_subscription(key: bytes | None, value: bytes) -> Subscription:
    """Parse a subscriptions-topic record; the key must equal the webhook id."""
    try:
        sub = Subscription.model_validate_json(value)
    except ValidationError as exc:
        raise SubscriptionError(f"invalid subscription record: {short_errors(exc)}") from None
    if key is not None and key.decode("utf-8", "replace") != sub.webhook_id:
        raise SubscriptionError(
            f"record key {key!r} differs from its webhook_id {sub.webhook_id!r}"
        )
    return sub


def require_https(url: str, allow_http: bool) -> None:
    """Refuse plain HTTP unless the operator allowed it."""
    if urlsplit(url).scheme != "https" and not allow_http:
        raise SubscriptionError(
            f"endpoint URL must be https:// (got {url!r}); "
            "plain HTTP needs DISPATCHER_ALLOW_HTTP=true, for development only"
        )
