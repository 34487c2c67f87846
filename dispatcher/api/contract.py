"""The parts of the OpenAPI document that depend on the deployment.

The plans an organization can be set to (``DISPATCHER_KNOWN_PLANS``), the events a
webhook can subscribe to (the event catalog) and whether plain HTTP endpoints are
accepted (``DISPATCHER_ALLOW_HTTP``) are settings, so the request models cannot
name them. They are written into the document once, when the application is
built, so that a request valid under the served document is one this deployment
accepts, and a client generated from it offers exactly these values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dispatcher.api.models import URL_PATTERN
from dispatcher.settings import Settings


def complete(document: dict[str, Any], settings: Settings, events: Sequence[str]) -> None:
    """Write the deployment's plans, events and URL schemes into ``document``."""
    schemas = document["components"]["schemas"]
    for name in ("WebhookCreate", "WebhookPatch", "RotateRequest"):
        for field in schemas[name]["properties"].values():
            _into_branches(field)
    schemas["PlanRequest"]["properties"]["plan"]["enum"] = list(settings.known_plans)
    for name in ("WebhookCreate", "WebhookPatch"):
        fields = schemas[name]["properties"]
        for array in _arrays(fields["events"]):
            array["items"]["enum"] = list(events)
        if settings.allow_http:
            for text in _strings(fields["url"]):
                text["pattern"] = URL_PATTERN.replace("^https://", "^https?://", 1)


#: Which type of value a keyword constrains.
_APPLIES_TO = {"pattern": "string", "items": "array"}


def _into_branches(field: dict[str, Any]) -> None:
    """Move a constraint an optional field's model states beside ``anyOf`` into the
    branch it constrains (``pattern`` into the string, ``items`` into the array),
    where generators and readers of the document look for it."""
    for keyword, kind in _APPLIES_TO.items():
        if "anyOf" not in field or keyword not in field:
            continue
        value = field.pop(keyword)
        for branch in field["anyOf"]:
            if branch.get("type") == kind:
                branch[keyword] = {**branch.get(keyword, {}), **value} if kind == "array" else value


def _arrays(field: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in [field, *field.get("anyOf", [])] if s.get("type") == "array"]


def _strings(field: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in [field, *field.get("anyOf", [])] if "pattern" in s]
