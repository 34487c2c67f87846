"""Bearer API keys: named, read-only or read-write, kept only as SHA-256 hashes.

Keys come from ``DISPATCHER_API_KEYS`` and/or the file ``DISPATCHER_API_KEYS_FILE``
(a mounted Kubernetes Secret), both JSON lists of ``{"name", "sha256",
"access"}``. A presented key is hashed and compared with every known hash in
constant time, so neither the answer nor its timing says which part was wrong.
Every change is logged as one JSON line naming the key, never the key itself.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dispatcher.errors import ConfigError, Problem
from dispatcher.settings import Settings

audit_log = logging.getLogger("dispatcher.api.audit")

KEY_PREFIX = "bsk_"
Access = Literal["read", "read-write"]


class KeyEntry(BaseModel):
    """One configured key: its name, the hex SHA-256 of the key, and what it may do."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    access: Access


@dataclass(frozen=True, slots=True)
class Caller:
    """The key a request was made with."""

    name: str
    access: Access

    @property
    def can_write(self) -> bool:
        return self.access == "read-write"


def new_key() -> str:
    """A fresh random key (shown once; only its hash is configured)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_keys(settings: Settings) -> list[KeyEntry]:
    """The configured keys; a bad entry stops start-up with one line (no hash quoted)."""
    raw: list[object] = list(settings.api_keys)
    if settings.api_keys_file:
        path = Path(settings.api_keys_file)
        try:
            loaded = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"DISPATCHER_API_KEYS_FILE: cannot read {path}: {exc}") from None
        if not isinstance(loaded, list):
            raise ConfigError(f"DISPATCHER_API_KEYS_FILE: {path} must hold a JSON list")
        raw.extend(loaded)
    keys = []
    for index, item in enumerate(raw):
        try:
            keys.append(KeyEntry.model_validate(item))
        except ValidationError as exc:
            fields = ", ".join(str(e["loc"][0]) for e in exc.errors() if e.get("loc"))
            raise ConfigError(
                f"API key #{index + 1}: invalid {fields or 'entry'} "
                "(expected name, sha256 as 64 hex digits, access read or read-write)"
            ) from None
    names = [k.name for k in keys]
    if len(set(names)) != len(names):
        raise ConfigError("API keys: every key needs a distinct name")
    return keys


# The scheme name is case-insensitive (RFC 9110, 11.1): "bearer" and "BEARER" are
# "Bearer" too. The key itself is compared exactly.
_BEARER = re.compile(r"^[Bb][Ee][Aa][Rr][Ee][Rr] +([\x21-\x7e]{1,256})$")

#: The security scheme every ``/v1`` operation declares in the OpenAPI document
#: (through the dependencies below), so a generated client sends the key. It checks
#: nothing itself (``auto_error=False``): :class:`KeyRing` does.
BEARER = HTTPBearer(
    scheme_name="bearerAuth",
    bearerFormat="API key (bsk_...)",
    description="An API key: `Authorization: Bearer <key>`. A read key may call the GET "
    "operations; every change needs a read-write key.",
    auto_error=False,
)
Declared = Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]


class KeyRing:
    """Answers who a request's bearer key belongs to."""

    def __init__(self, keys: list[KeyEntry]) -> None:
        self._keys = [(bytes.fromhex(k.sha256), Caller(k.name, k.access)) for k in keys]

    @property
    def count(self) -> int:
        return len(self._keys)

    def identify(self, authorization: str | None) -> Caller | None:
        match = _BEARER.match(authorization or "")
        if match is None:
            return None
        digest = hashlib.sha256(match.group(1).encode()).digest()
        found = None
        for known, caller in self._keys:  # no early exit: the time is the same for every key
            if hmac.compare_digest(known, digest):
                found = caller
        return found


def _unauthorized() -> Problem:
    return Problem(
        401,
        "unauthorized",
        "Unauthorized",
        "a valid API key is required (Authorization: Bearer <key>)",
        headers={"WWW-Authenticate": "Bearer"},
    )


def _caller(request: Request) -> Caller:
    ring: KeyRing = request.app.state.keys
    caller = ring.identify(request.headers.get("authorization"))
    if caller is None:
        raise _unauthorized()
    return caller


# The dependencies are ``async`` (they only hash and compare in memory): FastAPI
# would run plain functions on its thread pool.
async def reader(request: Request, _: Declared) -> Caller:
    """Dependency: any valid key."""
    return _caller(request)


async def writer(request: Request, _: Declared) -> Caller:
    """Dependency: a read-write key."""
    caller = _caller(request)
    if not caller.can_write:
        raise Problem(403, "forbidden", "Forbidden", "this API key may only read")
    return caller


def audit(caller: Caller, action: str, organization_id: str, webhook_id: str | None = None) -> None:
    """One JSON line per change: who (the key's name), what, on what."""
    audit_log.info(
        "api change: %s",
        action,
        extra={
            "api_key": caller.name,
            "action": action,
            "organization_id": organization_id,
            "webhook_id": webhook_id,
        },
    )
