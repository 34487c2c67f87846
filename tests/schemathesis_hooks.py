"""Schemathesis hooks for the run against ``dispatcher api`` (tests/test_api_openapi.py).

An ``Idempotency-Key`` names one request: sent again with another body it is refused
(422), as documented. A schema cannot say "unique", and the generator repeats small
values across cases, so each call that carries a key gets a fresh one here.
"""

from __future__ import annotations

import uuid
from typing import Any

import schemathesis


@schemathesis.hook
def before_call(context: schemathesis.HookContext, case: schemathesis.Case, kwargs: Any) -> None:
    headers = case.headers or {}
    for name in list(headers):
        if name.lower() == "idempotency-key":
            headers[name] = f"key-{uuid.uuid4().hex}"
