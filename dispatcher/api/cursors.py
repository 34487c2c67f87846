"""Opaque page cursors: the sort key of a page's last item, packed and encoded.

A cursor is a signed 64-bit number (a time) and an id, in unpadded base64url. It
says nothing the page did not show, and no position or count. Any string of the
documented format is a position in the order (before or after everything, at
worst), so a well-formed cursor is never refused: only one that is not base64url
of at least a number and one byte is.
"""

from __future__ import annotations

import base64
import binascii
import struct

from dispatcher.api.problems import field_problem

_KEY = struct.Struct(">q")

#: The format of a cursor in the OpenAPI document: unpadded base64url of at least
#: 9 bytes (a length of 4n+1 characters is not base64).
PATTERN = r"^(?:[A-Za-z0-9_-]{4})*(?:[A-Za-z0-9_-]{2,3})?$"
MIN_LENGTH = 12
MAX_LENGTH = 256


def encode(number: int, key: str) -> str:
    raw = _KEY.pack(number) + key.encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(cursor: str, path: str = "query.cursor") -> tuple[int, str]:
    """The (number, id) a cursor holds; a 422 naming ``path`` when it holds none."""
    try:
        if not cursor.isascii():
            raise ValueError(cursor)
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        (number,) = _KEY.unpack_from(raw)
    except (binascii.Error, ValueError, struct.error):
        raise field_problem(path, "not a cursor from a previous page") from None
    key = raw[_KEY.size :].decode("utf-8", "replace")
    if not key:
        raise field_problem(path, "not a cursor from a previous page")
    return number, key
