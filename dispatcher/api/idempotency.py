"""``Idempotency-Key`` on create: a retried request creates one webhook.

Two layers. The answer to a key is remembered for ``DISPATCHER_API_IDEMPOTENCY_TTL_S``
and replayed as it was (the generated secret included, so a client whose first
answer was lost still learns it). And the webhook id is derived from the
organization, the API key's name and the idempotency key, so even a retry that
reaches another replica, or this one after a restart, finds the webhook the
first request made instead of making a second one.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Stored:
    fingerprint: str
    status: int
    body: dict[str, Any]
    expires_at: float


def webhook_id_for(organization_id: str, key_name: str, idempotency_key: str) -> str:
    digest = hashlib.sha256(f"{organization_id}\0{key_name}\0{idempotency_key}".encode())
    return f"wh_{digest.hexdigest()[:20]}"


def fingerprint(payload: dict[str, Any]) -> str:
    return hashlib.sha256(repr(sorted(payload.items())).encode()).hexdigest()


class IdempotencyCache:
    """Answers by (organization, key name, Idempotency-Key); one request per key at a time."""

    def __init__(self, ttl_s: float, max_entries: int = 100_000) -> None:
        self._ttl_s = ttl_s
        self._max = max_entries
        self._entries: dict[tuple[str, str, str], Stored] = {}
        self._locks: dict[tuple[str, str, str], threading.Lock] = {}
        self._guard = threading.Lock()

    def lock(self, key: tuple[str, str, str]) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def get(self, key: tuple[str, str, str]) -> Stored | None:
        stored = self._entries.get(key)
        if stored is not None and stored.expires_at < time.monotonic():
            self._entries.pop(key, None)
            return None
        return stored

    def put(self, key: tuple[str, str, str], fp: str, status: int, body: dict[str, Any]) -> None:
        with self._guard:
            now = time.monotonic()
            if len(self._entries) >= self._max:
                for old in [k for k, v in self._entries.items() if v.expires_at < now]:
                    self._entries.pop(old, None)
                    self._locks.pop(old, None)
            if len(self._entries) < self._max:
                self._entries[key] = Stored(fp, status, body, now + self._ttl_s)
