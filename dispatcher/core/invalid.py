"""Writing an unusable input message to the invalid-events topic, so it ends recorded.

The record keeps the input's value and key byte for byte, with headers naming the
reason, a one-line detail and the source position. The invalid-events topic
should take records as large as the input topic does (``topics ensure`` cannot
know the input's limit, so the README asks for it); if it does not, what does
not fit is dropped rather than the whole record: first the value, then the key,
each noted in a ``dispatcher-invalid-dropped`` header with its size, and the
source position still says where the bytes are while the input topic keeps them.
"""

from __future__ import annotations

import logging
from typing import Final

from confluent_kafka import Message

from dispatcher.core.producer import RecordSink
from dispatcher.errors import ProduceRefused
from dispatcher.records import H_SOURCE

log = logging.getLogger(__name__)

H_INVALID_REASON: Final = "dispatcher-invalid-reason"
H_INVALID_DETAIL: Final = "dispatcher-invalid-detail"
H_INVALID_DROPPED: Final = "dispatcher-invalid-dropped"

Headers = list[tuple[str, bytes]]


def invalid_headers(msg: Message, reason: str, detail: str) -> Headers:
    return [
        (H_INVALID_REASON, reason.encode("utf-8", "replace")),
        (H_INVALID_DETAIL, detail.encode("utf-8", "replace")[:1000]),
        (H_SOURCE, f"{msg.topic()}/{msg.partition()}/{msg.offset()}".encode()),
    ]


async def write_invalid(
    producer: RecordSink,
    topic: str,
    label: str,
    value: bytes | None,
    key: bytes | None,
    headers: Headers,
) -> str | None:
    """Land the record, dropping what does not fit; None, or why the topic refused it."""
    tries: list[tuple[bytes | None, bytes | None, Headers]] = [(value, key, headers)]
    if value is not None:
        headers = [*headers, _dropped("value", value)]
        tries.append((None, key, headers))
    if key is not None:
        tries.append((None, None, [*headers, _dropped("key", key)]))
    refused = None
    for value_sent, key_sent, headers_sent in tries:
        try:
            await producer.send(topic, value_sent, key_sent, headers_sent)
            return None
        except ProduceRefused as exc:
            log.error("%s refused: %s", label, exc)
            refused = f"a write to {topic} was refused: {exc.name}"
            if not exc.too_large:
                break  # a topic or ACL to fix
    return refused


def _dropped(what: str, data: bytes) -> tuple[str, bytes]:
    return H_INVALID_DROPPED, f"{what} of {len(data)} bytes: too large for the topic".encode()
