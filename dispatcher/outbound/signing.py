"""Signatures on outgoing webhooks, and the matching checks a receiver makes.

Two schemes are sent side by side:

* ``X-Bullseye-Signature``: lowercase hex HMAC-SHA256 of the raw body, keyed on the
  secret's UTF-8 bytes (the whole string, any ``whsec_`` prefix included). This is
  what the customer documentation promises.
* Standard Webhooks (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``):
  HMAC-SHA256 over ``id.timestamp.body``, which adds replay protection. Its key is
  derived the way that spec's libraries derive it (:func:`standard_webhooks_key`),
  so a receiver can verify with any of them.

Standard library only, so the receiver helpers can be copied into a customer's
code base or used by the test receiver without pulling in the dispatcher.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import secrets as _secrets
import time
from collections.abc import Mapping, Sequence

__all__ = [
    "HEADER_BULLSEYE_SIGNATURE",
    "HEADER_WEBHOOK_ID",
    "HEADER_WEBHOOK_SIGNATURE",
    "HEADER_WEBHOOK_TIMESTAMP",
    "SECRET_PREFIX",
    "SignatureVerificationError",
    "bullseye_signature",
    "generate_secret",
    "signature_headers",
    "standard_webhooks_key",
    "standard_webhooks_signature",
    "verify_bullseye",
    "verify_standard_webhook",
]

HEADER_BULLSEYE_SIGNATURE = "X-Bullseye-Signature"
HEADER_WEBHOOK_ID = "webhook-id"
HEADER_WEBHOOK_TIMESTAMP = "webhook-timestamp"
HEADER_WEBHOOK_SIGNATURE = "webhook-signature"

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
DEFAULT_TOLERANCE_S = 300

_SIGNATURE_VERSION = "v1"


class SignatureVerificationError(ValueError):
    """A webhook failed verification; ``reason`` is one of a closed set.

    Reasons: ``missing_header``, ``invalid_timestamp``, ``timestamp_too_old``,
    ``timestamp_too_new``, ``no_matching_signature``.
    """

    def __init__(self, reason: str, message: str | None = None) -> None:
        super().__init__(message or reason)
        self.reason = reason


def bullseye_signature(secret: str, body: bytes) -> str:
    """Return the ``X-Bullseye-Signature`` value: lowercase hex HMAC-SHA256 of ``body``.

    The key is the UTF-8 encoding of the whole secret, prefix included.
    """
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def standard_webhooks_key(secret: str) -> bytes:
    """Return the Standard Webhooks HMAC key of ``secret``.

    For ``whsec_<base64>`` that is the decoded bytes after the prefix (missing
    ``=`` padding tolerated, as the spec's libraries do); for any other secret,
    including a ``whsec_`` one whose rest is not valid base64, its UTF-8 bytes.
    """
    if secret.startswith(SECRET_PREFIX):
        encoded = secret[len(SECRET_PREFIX) :]
        try:
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except ValueError:  # binascii.Error, or non-ASCII text
            key = b""
        if key:
            return key
    return secret.encode("utf-8")


def standard_webhooks_signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """Return one ``webhook-signature`` entry: ``v1,<base64 HMAC-SHA256>``.

    The signed message is ``f"{msg_id}.{timestamp}."`` followed by the raw body.
    """
    digest = _standard_digest(_cached_key(secret), msg_id, timestamp, body)
    return f"{_SIGNATURE_VERSION},{base64.b64encode(digest).decode('ascii')}"


# Every delivery to a subscription signs with the same few secrets.
_cached_key = functools.lru_cache(maxsize=4096)(standard_webhooks_key)


def signature_headers(
    delivery_id: str, timestamp: int, body: bytes, secrets: Sequence[str]
) -> dict[str, str]:
    """Return the signing headers of one attempt.

    ``secrets`` are the active secrets, newest first; empty strings count as no
    secret. ``webhook-id`` and ``webhook-timestamp`` are always present. With at
    least one secret, ``X-Bullseye-Signature`` is keyed on the newest and
    ``webhook-signature`` carries one ``v1,...`` entry per secret, space-separated,
    so a receiver still holding an older secret keeps verifying during a rotation.
    """
    headers = {HEADER_WEBHOOK_ID: delivery_id, HEADER_WEBHOOK_TIMESTAMP: str(timestamp)}
    active = [secret for secret in secrets if secret]
    if active:
        headers[HEADER_BULLSEYE_SIGNATURE] = bullseye_signature(active[0], body)
        headers[HEADER_WEBHOOK_SIGNATURE] = " ".join(
            standard_webhooks_signature(secret, delivery_id, timestamp, body) for secret in active
        )
    return headers


def generate_secret() -> str:
    """Return a new secret: ``whsec_`` and the standard base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(_secrets.token_bytes(SECRET_BYTES)).decode("ascii")


def verify_bullseye(secret: str | Sequence[str], body: bytes, signature: str) -> bool:
    """Tell whether ``signature`` is the ``X-Bullseye-Signature`` of ``body``.

    ``secret`` may be a list: the header carries one signature, made with the
    newest secret, so a receiver rotating secrets accepts both its new and its old
    secret until the rotation is over. Empty secrets never match. Each is compared
    in constant time; surrounding whitespace and hex case are ignored.
    """
    candidates = [secret] if isinstance(secret, str) else list(secret)
    given = signature.strip().lower().encode("utf-8")
    matched = False
    for key in candidates:
        expected = bullseye_signature(key, body).encode("ascii")
        # Every candidate is checked, so the time taken does not tell which matched.
        matched |= bool(key) and hmac.compare_digest(expected, given)
    return matched


def verify_standard_webhook(
    secret: str,
    body: bytes,
    headers: Mapping[str, str],
    tolerance_s: int = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> None:
    """Verify the Standard Webhooks headers of a received request.

    Header names are matched case-insensitively. ``webhook-signature`` may hold
    several space-separated entries; one valid ``v1`` entry is enough. The
    timestamp must lie within ``tolerance_s`` of ``now`` (default: the clock).

    Raises :class:`SignatureVerificationError` with the reason otherwise.
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    msg_id = lowered.get(HEADER_WEBHOOK_ID)
    stamp = lowered.get(HEADER_WEBHOOK_TIMESTAMP)
    signatures = lowered.get(HEADER_WEBHOOK_SIGNATURE)
    if not (msg_id and stamp and signatures):
        missing = [
            name
            for name, value in (
                (HEADER_WEBHOOK_ID, msg_id),
                (HEADER_WEBHOOK_TIMESTAMP, stamp),
                (HEADER_WEBHOOK_SIGNATURE, signatures),
            )
            if not value
        ]
        raise SignatureVerificationError("missing_header", f"missing header(s): {missing}")

    stamp = stamp.strip()
    # int() alone would also take "+5", "1_000" or non-ASCII digits.
    if not (stamp.isascii() and stamp.isdigit()):
        raise SignatureVerificationError(
            "invalid_timestamp", f"{HEADER_WEBHOOK_TIMESTAMP} is not a number of seconds"
        )
    timestamp = int(stamp)
    current = time.time() if now is None else now
    if timestamp < current - tolerance_s:
        raise SignatureVerificationError("timestamp_too_old", "message timestamp too old")
    if timestamp > current + tolerance_s:
        raise SignatureVerificationError("timestamp_too_new", "message timestamp too new")

    expected = _standard_digest(standard_webhooks_key(secret), msg_id, timestamp, body)
    for entry in signatures.split():
        version, _, encoded = entry.partition(",")
        if version != _SIGNATURE_VERSION:
            continue
        try:
            candidate = base64.b64decode(encoded, validate=True)
        except ValueError:  # binascii.Error, or non-ASCII text
            continue
        if hmac.compare_digest(expected, candidate):
            return
    raise SignatureVerificationError("no_matching_signature", "no matching signature found")


def _standard_digest(key: bytes, msg_id: str, timestamp: int, body: bytes) -> bytes:
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode(), hashlib.sha256)
    mac.update(body)  # not concatenated: the body is not copied
    return mac.digest()
