"""The catalog of event types: what the dashboard offers and what the dispatcher reads.

Configuration, not code: ``DISPATCHER_EVENT_CATALOG_FILE`` names a JSON list of
``{"name", "description", "schema_file", "input_topic"}`` (a schema file path is
relative to the catalog file). Without it, the catalog is the one event shipped,
``visitor.identified``, with the schema of the model the dispatcher validates by.

The API lists the catalog; the dispatcher consumes every entry's input topic and
checks each event against its type (:class:`Catalog`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jsonschema import validators
from jsonschema.exceptions import SchemaError, best_match
from jsonschema.protocols import Validator
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dispatcher.errors import ConfigError, InvalidEvent
from dispatcher.models import (
    EVENT_NAME,
    Event,
    ParsedEvent,
    decode_event,
    event_of_model,
    parse_timestamp,
)
from dispatcher.settings import Settings

#: The event type shipped with the dispatcher; it keeps its pydantic model.
SHIPPED = "visitor.identified"


class EventType(BaseModel):
    """One event type a webhook can subscribe to."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=EVENT_NAME.pattern, examples=["visitor.identified"])
    description: str
    input_topic: str
    schema_: dict[str, Any] = Field(alias="schema", description="JSON Schema of the event.")


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=EVENT_NAME.pattern)
    description: str = Field(min_length=1, max_length=1000)
    schema_file: str
    input_topic: str = Field(min_length=1, max_length=249)


def load_catalog(settings: Settings) -> list[EventType]:
    """The configured event types; a bad catalog stops start-up with one line."""
    if not settings.event_catalog_file:
        return [
            EventType(
                name=SHIPPED,
                description="A website visitor was identified as a person at a company.",
                input_topic=settings.input_topic,
                schema=Event.model_json_schema(),
            )
        ]
    path = Path(settings.event_catalog_file)
    try:
        entries = [_Entry.model_validate(e) for e in json.loads(path.read_text())]
        names = [e.name for e in entries]
        if not names:
            raise ValueError("the catalog lists no event type")
        if len(set(names)) != len(names):
            raise ValueError("an event type is listed twice")
        types = []
        for e in entries:
            schema = json.loads((path.parent / e.schema_file).read_text())
            try:
                validators.validator_for(schema).check_schema(schema)
            except SchemaError as exc:
                raise ValueError(f"{e.schema_file} is not a JSON Schema: {exc.message}") from None
            types.append(
                EventType(
                    name=e.name,
                    description=e.description,
                    input_topic=e.input_topic,
                    schema=schema,
                )
            )
        return types
    except (OSError, ValueError, TypeError, ValidationError) as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"DISPATCHER_EVENT_CATALOG_FILE: {path}: {first}") from None


@dataclass(frozen=True)
class _Kind:
    name: str
    #: The compiled schema, or None for the shipped type (checked by its model).
    validator: Validator | None


class Catalog:
    """Checks input events against their types; built once, used for every message.

    An event's ``event`` names its type when the catalog lists that name;
    otherwise it is checked as the type of the topic it came from (the shipped
    type's model then applies its own rules, as it always has), and a type
    checked by a JSON Schema refuses a name that is not its own.
    """

    def __init__(self, types: list[EventType], max_bytes: int) -> None:
        self.types = types
        self.max_bytes = max_bytes
        self._by_name: dict[str, _Kind] = {}
        self._by_topic: dict[str, _Kind] = {}
        for t in types:
            validator = None
            if t.name != SHIPPED:
                validator = validators.validator_for(t.schema_)(t.schema_)
            kind = _Kind(t.name, validator)
            self._by_name[t.name] = kind
            self._by_topic.setdefault(t.input_topic, kind)

    @classmethod
    def load(cls, settings: Settings) -> Catalog:
        return cls(load_catalog(settings), settings.max_event_bytes)

    @property
    def input_topics(self) -> tuple[str, ...]:
        """Every input topic, each once, in catalog order."""
        return tuple(self._by_topic)

    def parse(self, value: bytes | None, topic: str, time_ms: int) -> ParsedEvent:
        """Validate an input message; raise :class:`InvalidEvent` saying why it is not one.

        ``time_ms`` (the message's time) stands in for an event without a ``timestamp``.
        """
        try:
            raw = decode_event(value, self.max_bytes)
            name = raw.get("event")
            kind = self._by_name.get(name) if isinstance(name, str) else None
            if kind is None:
                kind = self._by_topic.get(topic)
                if kind is None:
                    raise InvalidEvent("invalid_event", f"{topic} is not a catalog input topic")
                if kind.validator is not None:
                    raise InvalidEvent(
                        "invalid_event",
                        f"event {name!r} is not in the catalog (topic {topic} carries {kind.name})",
                    )
            if kind.validator is None:
                return event_of_model(raw)
            return _event_of_schema(raw, kind.name, kind.validator, time_ms)
        except InvalidEvent:
            raise
        except Exception as exc:  # unforeseen: still set aside, never stop the partition
            raise InvalidEvent(
                "invalid_event", f"cannot be read: {type(exc).__name__}: {exc}"
            ) from None


def _event_of_schema(
    raw: dict[str, Any], name: str, validator: Validator, time_ms: int
) -> ParsedEvent:
    error = best_match(validator.iter_errors(raw))
    if error is not None:
        where = ".".join(str(p) for p in error.absolute_path) or "value"
        raise InvalidEvent("invalid_event", f"{where}: {error.message}")
    # The envelope every delivery needs, whatever the type's schema says.
    org = raw.get("organization_id")
    if not isinstance(org, str) or not 1 <= len(org) <= 128:
        raise InvalidEvent("invalid_event", "organization_id: a string of 1-128 characters")
    stamp = raw.get("timestamp")
    if stamp is None:
        occurred_at = datetime.fromtimestamp(max(time_ms, 0) / 1000, UTC)
    elif isinstance(stamp, str):
        try:
            occurred_at = parse_timestamp(stamp)
        except ValueError as exc:
            raise InvalidEvent("invalid_event", f"timestamp: {exc}") from None
    else:
        raise InvalidEvent("invalid_event", "timestamp: an ISO 8601 string")
    # Sent as published (compact), the same bytes on every attempt.
    text = json.dumps(raw, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    try:
        body = text.encode()
    except UnicodeEncodeError:
        raise InvalidEvent(
            "invalid_event", "text holds a lone surrogate (\\ud800-\\udfff)"
        ) from None
    return ParsedEvent(name, org, occurred_at, body)
