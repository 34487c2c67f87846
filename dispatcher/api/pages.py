"""A page of deliveries as JSON, built straight from the store's rows.

A list answers up to 500 deliveries: a pydantic model per delivery, validated
and then serialized again, cost about 4 microseconds each on the event loop,
three quarters of a page's answer. The bytes here are those of
:class:`~dispatcher.api.models.DeliveryPage`'s serialization (a unit test
compares them), which stays the documented response model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from starlette.responses import Response

from dispatcher.api.historystore import DeliveryRow, from_ms


def summary_fields(row: DeliveryRow) -> dict[str, Any]:
    """A delivery's summary, in the order of ``DeliverySummary``'s fields."""
    return {
        "id": row.delivery_id,
        "event": row.event,
        "session_id": row.session_id,
        "status": row.status,
        "created_at": from_ms(row.created_ms),
        "last_attempt_at": None if row.attempt_ms is None else from_ms(row.attempt_ms),
        "attempts": row.attempts,
        "last_status_code": row.last_status_code,
        # The class of the latest attempt's failure; none once it succeeded.
        "last_error_class": None if row.last_ok is not False else row.last_error_class,
        "next_retry_at": None
        if row.next_retry_ms is None or row.status != "failing"
        else from_ms(row.next_retry_ms),
    }


def page_json(rows: Sequence[DeliveryRow], next_cursor: str | None) -> bytes:
    page = {"data": [summary_fields(row) for row in rows], "next_cursor": next_cursor}
    return orjson.dumps(page, option=orjson.OPT_UTC_Z)


class JsonBytes(Response):
    """JSON already encoded: nothing validates or serializes it again."""

    media_type = "application/json"
