"""The catalog of event types: what the dashboard offers under "select events".

Configuration, not code: ``DISPATCHER_EVENT_CATALOG_FILE`` names a JSON list of
``{"name", "description", "schema_file", "input_topic"}`` (a schema file path is
relative to the catalog file). Without it, the catalog is the one event shipped,
``visitor.identified``, with the schema of the model the dispatcher validates by.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dispatcher.errors import ConfigError
from dispatcher.models import EVENT_NAME, Event
from dispatcher.settings import Settings


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
    input_topic: str = Field(min_length=1)


def load_catalog(settings: Settings) -> list[EventType]:
    """The configured event types; a bad catalog stops start-up with one line."""
    if not settings.event_catalog_file:
        return [
            EventType(
                name="visitor.identified",
                description="A website visitor was identified as a person at a company.",
                input_topic=settings.input_topic,
                schema=Event.model_json_schema(),
            )
        ]
    path = Path(settings.event_catalog_file)
    try:
        entries = [_Entry.model_validate(e) for e in json.loads(path.read_text())]
        return [
            EventType(
                name=e.name,
                description=e.description,
                input_topic=e.input_topic,
                schema=json.loads((path.parent / e.schema_file).read_text()),
            )
            for e in entries
        ]
    except (OSError, ValueError, TypeError, ValidationError) as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"DISPATCHER_EVENT_CATALOG_FILE: {path}: {first}") from None
