"""Signing vectors, interoperability with the official library, and verifier failures."""

from __future__ import annotations

import base64
import hashlib
import hmac
import subprocess
import sys
import time
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from dispatcher.outbound.signing import (
    SignatureVerificationError,
    bullseye_signature,
    generate_secret,
    signature_headers,
    standard_webhooks_key,
    standard_webhooks_signature,
    verify_bullseye,
    verify_standard_webhook,
)

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OLD_SECRET = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"

# The customer documentation's example payload, compact JSON, as sent on the wire.
SEED_BODY = (
    b'{"event":"visitor.identified","timestamp":"2025-01-15T10:30:00Z",'
    b'"organization_id":"org_abc123","session_id":"sess_xyz789",'
    b'"visitor":{"email":"jane.smith@acme.com","first_name":"Jane","last_name":"Smith",'
    b'"job_title":"VP of Marketing","linkedin_url":"https://linkedin.com/in/janesmith",'
    b'"location":"San Francisco, CA"},'
    b'"company":{"name":"Acme Corp","industry":"Technology","employee_count":500,'
    b'"location":"San Francisco, CA"},'
    b'"session":{"landing_page":"/pricing","pages_visited":["/","/features","/pricing"],'
    b'"utm_source":"google","utm_medium":"cpc","referrer":"https://google.com",'
    b'"device_type":"desktop"}}'
)
SEED_ID = "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W"
SEED_TS = 1674087231

# Computed once with `openssl dgst -sha256 -hmac ...` on the exact bytes above.
SEED_BULLSEYE = "e65ad055c95acca8772e471705f0ecfc0214740f189f19164ae1103b30ed4203"
SEED_STANDARD = "v1,ZLEFO6f5SFRY4sq5jzcCz4xj72mZ3b9RXY8BFItIQDQ="


def _hmac_hex(key: bytes, message: bytes) -> str:
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def _hmac_b64(key: bytes, message: bytes) -> str:
    return base64.b64encode(hmac.new(key, message, hashlib.sha256).digest()).decode()


# --- fixed vectors ---------------------------------------------------------


def test_seed_vectors_computed_by_hand() -> None:
    assert len(SEED_BODY) == 604
    assert bullseye_signature(SECRET, SEED_BODY) == SEED_BULLSEYE
    assert standard_webhooks_signature(SECRET, SEED_ID, SEED_TS, SEED_BODY) == SEED_STANDARD


def test_standard_webhooks_spec_example() -> None:
    # The example published with the Standard Webhooks specification.
    signature = standard_webhooks_signature(
        SECRET, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}'
    )
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_bullseye_keys_on_the_whole_secret_string() -> None:
    body = b'{"a":1}'
    assert bullseye_signature(SECRET, body) == _hmac_hex(SECRET.encode(), body)
    assert bullseye_signature("plain-secret", body) == _hmac_hex(b"plain-secret", body)
    assert bullseye_signature("clé", body) == _hmac_hex("clé".encode(), body)
    assert bullseye_signature(SECRET, body) == bullseye_signature(SECRET, body).lower()


def test_standard_key_decodes_whsec_secrets() -> None:
    assert standard_webhooks_key(SECRET) == base64.b64decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    assert len(standard_webhooks_key(SECRET)) == 24


def test_standard_key_tolerates_missing_padding() -> None:
    raw = b"sixteen byte key"
    unpadded = base64.b64encode(raw).decode().rstrip("=")
    assert standard_webhooks_key("whsec_" + unpadded) == raw


@pytest.mark.parametrize(
    "secret",
    ["plain-secret", "whsec_", "whsec_not base64!", "WHSEC_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
)
def test_standard_key_of_other_secrets_is_utf8(secret: str) -> None:
    assert standard_webhooks_key(secret) == secret.encode()


def test_standard_signature_matches_direct_hmac() -> None:
    body = b'{"x":"y"}'
    key = base64.b64decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    expected = "v1," + _hmac_b64(key, b"dlv_1.1700000000." + body)
    assert standard_webhooks_signature(SECRET, "dlv_1", 1700000000, body) == expected
    plain = "v1," + _hmac_b64(b"plain", b"dlv_1.1700000000." + body)
    assert standard_webhooks_signature("plain", "dlv_1", 1700000000, body) == plain


# --- headers ---------------------------------------------------------------


def test_headers_with_one_secret() -> None:
    headers = signature_headers(SEED_ID, SEED_TS, SEED_BODY, [SECRET])
    assert headers == {
        "webhook-id": SEED_ID,
        "webhook-timestamp": str(SEED_TS),
        "X-Bullseye-Signature": SEED_BULLSEYE,
        "webhook-signature": SEED_STANDARD,
    }


def test_headers_during_rotation_sign_with_every_secret_newest_first() -> None:
    headers = signature_headers("dlv_9", 1700000000, b"{}", [SECRET, OLD_SECRET])
    assert headers["X-Bullseye-Signature"] == bullseye_signature(SECRET, b"{}")
    assert headers["webhook-signature"].split(" ") == [
        standard_webhooks_signature(SECRET, "dlv_9", 1700000000, b"{}"),
        standard_webhooks_signature(OLD_SECRET, "dlv_9", 1700000000, b"{}"),
    ]


@pytest.mark.parametrize("secrets", [[], [""]])
def test_headers_without_secret_carry_no_signature(secrets: list[str]) -> None:
    headers = signature_headers("dlv_1", 1700000000, b"{}", secrets)
    assert headers == {"webhook-id": "dlv_1", "webhook-timestamp": "1700000000"}


def test_generate_secret_shape() -> None:
    secret = generate_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret[6:], validate=True)) == 32
    assert standard_webhooks_key(secret) == base64.b64decode(secret[6:])
    assert generate_secret() != secret


# --- interoperability with the official library -----------------------------


def test_official_library_verifies_our_headers() -> None:
    now = int(time.time())
    headers = signature_headers("dlv_abc", now, SEED_BODY, [SECRET])
    assert Webhook(SECRET).verify(SEED_BODY, headers)["session_id"] == "sess_xyz789"


def test_official_library_verifies_each_secret_during_rotation() -> None:
    now = int(time.time())
    headers = signature_headers("dlv_abc", now, SEED_BODY, [SECRET, OLD_SECRET])
    Webhook(SECRET).verify(SEED_BODY, headers, json_parse=False)
    Webhook(OLD_SECRET).verify(SEED_BODY, headers, json_parse=False)
    with pytest.raises(WebhookVerificationError):
        Webhook(generate_secret()).verify(SEED_BODY, headers, json_parse=False)


def test_our_verifier_accepts_official_library_signatures() -> None:
    now = int(time.time())
    wh = Webhook(SECRET)
    signature = wh.sign("msg_1", datetime.fromtimestamp(now, tz=UTC), '{"k":1}')
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(now), "webhook-signature": signature}
    verify_standard_webhook(SECRET, b'{"k":1}', headers)


@given(body=st.text(max_size=200).map(str.encode))
def test_official_library_agrees_on_any_body(body: bytes) -> None:
    secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
    now = int(time.time())
    headers = signature_headers("dlv_h", now, body, [secret])
    Webhook(secret).verify(body, headers, json_parse=False)
    verify_standard_webhook(secret, body, headers)


# --- verify_bullseye -------------------------------------------------------


def test_verify_bullseye_accepts_the_right_signature() -> None:
    assert verify_bullseye(SECRET, SEED_BODY, SEED_BULLSEYE)
    assert verify_bullseye(SECRET, SEED_BODY, SEED_BULLSEYE.upper() + "\n")


@pytest.mark.parametrize(
    ("secret", "body", "signature"),
    [
        (OLD_SECRET, SEED_BODY, SEED_BULLSEYE),  # wrong secret
        (SECRET, SEED_BODY + b" ", SEED_BULLSEYE),  # body altered
        (SECRET, SEED_BODY, SEED_BULLSEYE[:-1]),  # truncated
        (SECRET, SEED_BODY, ""),  # empty
        (SECRET, SEED_BODY, "é" * 64),  # not even ASCII
    ],
)
def test_verify_bullseye_rejects(secret: str, body: bytes, signature: str) -> None:
    assert not verify_bullseye(secret, body, signature)


# --- verify_standard_webhook: one test per way of failing --------------------

NOW = 1_700_000_000


def _headers(secret: str = SECRET, ts: int = NOW, body: bytes = SEED_BODY) -> dict[str, str]:
    return signature_headers("dlv_1", ts, body, [secret])


def test_verify_standard_accepts_case_insensitive_headers() -> None:
    headers = {name.upper(): value for name, value in _headers().items()}
    verify_standard_webhook(SECRET, SEED_BODY, headers, now=NOW)


def test_verify_standard_accepts_any_of_several_signatures() -> None:
    headers = signature_headers("dlv_1", NOW, SEED_BODY, [generate_secret(), SECRET])
    headers["webhook-signature"] = "v2,ignored " + headers["webhook-signature"] + " junk"
    verify_standard_webhook(SECRET, SEED_BODY, headers, now=NOW)


def test_verify_standard_accepts_within_tolerance() -> None:
    verify_standard_webhook(SECRET, SEED_BODY, _headers(ts=NOW - 300), now=NOW)
    verify_standard_webhook(SECRET, SEED_BODY, _headers(ts=NOW + 300), now=NOW)


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_verify_standard_missing_header(missing: str) -> None:
    headers = _headers()
    del headers[missing]
    with pytest.raises(SignatureVerificationError) as info:
        verify_standard_webhook(SECRET, SEED_BODY, headers, now=NOW)
    assert info.value.reason == "missing_header"
    assert missing in str(info.value)


@pytest.mark.parametrize("stamp", ["soon", "1.7e9", "+1700000000", "1_700_000_000", ""])
def test_verify_standard_invalid_timestamp(stamp: str) -> None:
    headers = _headers() | {"webhook-timestamp": stamp}
    with pytest.raises(SignatureVerificationError) as info:
        verify_standard_webhook(SECRET, SEED_BODY, headers, now=NOW)
    assert info.value.reason == ("missing_header" if not stamp else "invalid_timestamp")


def test_verify_standard_timestamp_too_old() -> None:
    with pytest.raises(SignatureVerificationError) as info:
        verify_standard_webhook(SECRET, SEED_BODY, _headers(ts=NOW - 301), now=NOW)
    assert info.value.reason == "timestamp_too_old"


def test_verify_standard_timestamp_too_new() -> None:
    with pytest.raises(SignatureVerificationError) as info:
        verify_standard_webhook(SECRET, SEED_BODY, _headers(ts=NOW + 301), now=NOW)
    assert info.value.reason == "timestamp_too_new"


def test_verify_standard_custom_tolerance() -> None:
    headers = _headers(ts=NOW - 61)
    verify_standard_webhook(SECRET, SEED_BODY, headers, now=NOW)
    with pytest.raises(SignatureVerificationError):
        verify_standard_webhook(SECRET, SEED_BODY, headers, tolerance_s=60, now=NOW)


def test_verify_standard_wrong_secret() -> None:
    with pytest.raises(SignatureVerificationError) as info:
        verify_standard_webhook(OLD_SECRET, SEED_BODY, _headers(), now=NOW)
    assert info.value.reason == "no_matching_signature"


def test_verify_standard_tampered_body() -> None:
    with pytest.raises(SignatureVerificationError) as info:
        verify_standard_webhook(SECRET, SEED_BODY + b"\n", _headers(), now=NOW)
    assert info.value.reason == "no_matching_signature"


def test_verify_standard_timestamp_is_signed() -> None:
    headers = _headers() | {"webhook-timestamp": str(NOW + 1)}
    with pytest.raises(SignatureVerificationError) as info:
        verify_standard_webhook(SECRET, SEED_BODY, headers, now=NOW)
    assert info.value.reason == "no_matching_signature"


@pytest.mark.parametrize("signature", ["v1,", "v1,%%%", "garbage", "v2," + "A" * 44])
def test_verify_standard_malformed_signature(signature: str) -> None:
    headers = _headers() | {"webhook-signature": signature}
    with pytest.raises(SignatureVerificationError) as info:
        verify_standard_webhook(SECRET, SEED_BODY, headers, now=NOW)
    assert info.value.reason == "no_matching_signature"


def test_verification_error_is_a_value_error() -> None:
    assert issubclass(SignatureVerificationError, ValueError)


# --- verify_bullseye with a list of secrets (rotation) -------------------------


def test_bullseye_header_is_signed_with_the_newest_secret_only() -> None:
    headers = signature_headers("dlv_1", NOW, SEED_BODY, [SECRET, OLD_SECRET])
    signature = headers["X-Bullseye-Signature"]
    assert signature == bullseye_signature(SECRET, SEED_BODY)
    assert not verify_bullseye(OLD_SECRET, SEED_BODY, signature)


@pytest.mark.parametrize(
    "secrets",
    [[SECRET, OLD_SECRET], [OLD_SECRET, SECRET], (SECRET,), ["", SECRET]],
    ids=["new first", "old first", "tuple", "with a blank"],
)
def test_verify_bullseye_accepts_a_list_holding_the_signing_secret(secrets: list[str]) -> None:
    assert verify_bullseye(secrets, SEED_BODY, SEED_BULLSEYE)


@pytest.mark.parametrize(
    ("secrets", "signature"),
    [
        ([OLD_SECRET], SEED_BULLSEYE),  # only the old secret: the header was signed with the new
        ([], SEED_BULLSEYE),  # nothing to check with
        (["", OLD_SECRET], bullseye_signature("", SEED_BODY)),  # a blank secret never matches
        ([SECRET, OLD_SECRET], SEED_BULLSEYE[:-1]),  # truncated
    ],
    ids=["old only", "empty list", "blank secret", "truncated"],
)
def test_verify_bullseye_list_rejects(secrets: list[str], signature: str) -> None:
    assert not verify_bullseye(secrets, SEED_BODY, signature)


def test_the_receiver_helpers_import_nothing_but_the_standard_library() -> None:
    # Receivers import them without the dispatcher's dependencies installed.
    code = (
        "import sys; before = set(sys.modules); import dispatcher.outbound.signing;"
        "new = {m.split('.')[0] for m in set(sys.modules) - before};"
        "print(sorted(new - sys.stdlib_module_names - {'dispatcher'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
