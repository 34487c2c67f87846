"""The OpenAPI document is valid, and a property-based run generated from it finds no
5xx and no answer that breaks the document, against the real ``dispatcher api``."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from openapi_spec_validator import validate
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from dispatcher.api.app import build_context, create_app
from dispatcher.settings import Settings
from tests.api_support import ApiProcess
from tests.support import Namespace


def built_document() -> dict[str, Any]:
    """The document as the code builds it (no Kafka needed to build it)."""
    return create_app(build_context(Settings()), start_readers=False).openapi()


schema = schemathesis.openapi.from_dict(built_document())
# Both valid and invalid input: the API must answer client mistakes with a 4xx.
schema.config.generation.update(modes=list(schemathesis.GenerationMode))


@pytest.fixture(scope="module")
def live_api(broker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiProcess]:
    ns = Namespace()
    api = ApiProcess(ns, tmp_path_factory.mktemp("api") / "api.log").start()
    with api.admin() as http:
        assert http.put("/v1/organizations/org_abc123/plan", json={"plan": "scale"}).is_success
    yield api
    api.stop()
    ns.drop_topics()


def test_document_is_valid_openapi_and_served_as_built(live_api: ApiProcess) -> None:
    served = httpx.get(live_api.url + "/openapi.json", timeout=10).json()
    validate(served)
    assert served == built_document()
    every = {(path, method) for path, ops in served["paths"].items() for method in ops}
    assert ("/v1/organizations/{org}/webhooks/{webhook_id}/deliveries", "get") in every
    assert ("/v1/organizations/{org}/plan", "put") in every
    for path, ops in served["paths"].items():
        for method, op in ops.items():
            assert "application/problem+json" in op["responses"]["422"]["content"], (path, method)


def test_docs_page_is_self_contained_and_lists_every_route(live_api: ApiProcess) -> None:
    served = httpx.get(live_api.url + "/openapi.json", timeout=10).json()
    page = httpx.get(live_api.url + "/docs", timeout=10)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    html = page.text
    # Nothing is fetched from elsewhere: no script, stylesheet or image, and no
    # absolute URL anywhere (an offline cluster could not load it).
    assert not re.search(r"<(script|link|img|iframe)\b", html, re.IGNORECASE)
    assert not re.search(r"(https?:)?//[\w.-]+\.\w", html), "an external URL"
    assert not re.search(r"@import|url\(", html)
    for target in re.findall(r'(?:href|src)="([^"]*)"', html):
        assert target.startswith("#") or target == "openapi.json", target
    headings = set(re.findall(r'<span class="method">(\w+)</span> ([^<]+)</h3>', html))
    every = {(method.upper(), path) for path, ops in served["paths"].items() for method in ops}
    assert every and headings == every
    for path, ops in served["paths"].items():
        for op in ops.values():
            assert f"<strong>{op['summary']}</strong>" in html, path
    for name in served["components"]["schemas"]:
        assert f'id="schema-{name}"' in html, name
    assert "Authorization: Bearer &lt;API key&gt;" in html


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_no_server_error_and_answers_match_the_document(
    case: schemathesis.Case, live_api: ApiProcess
) -> None:
    case.call_and_validate(
        base_url=live_api.url,
        headers={"Authorization": f"Bearer {live_api.admin_key}"},
        checks=[
            not_a_server_error,
            response_schema_conformance,
            content_type_conformance,
            status_code_conformance,
        ],
        timeout=30,
    )


def test_log_has_no_traceback(live_api: ApiProcess) -> None:
    assert "Traceback" not in live_api.logs()
    assert Path(live_api.log_path).exists()
