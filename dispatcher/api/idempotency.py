"""``Idempotency-Key`` on create: a retried request creates one webhook.

The one writer records the answer to a keyed create (the request's fingerprint,
the status and the whole body, the generated secret included) in the compacted
idempotency topic, in the same transaction as the webhook itself. Every replica
reads that topic, so a retry anywhere, or after a restart, is answered exactly as
the first request was, for ``DISPATCHER_API_IDEMPOTENCY_TTL_S``; another body with
the same key is refused. The webhook id is derived from the key too, so a create
whose answer expired still finds the webhook it made.
"""

from __future__ import annotations

import hashlib
from typing import Any


def webhook_id_for(organization_id: str, key_name: str, idempotency_key: str) -> str:
    digest = hashlib.sha256(f"{organization_id}\0{key_name}\0{idempotency_key}".encode())
    return f"wh_{digest.hexdigest()[:20]}"


def fingerprint(payload: dict[str, Any]) -> str:
    return hashlib.sha256(repr(sorted(payload.items())).encode()).hexdigest()
