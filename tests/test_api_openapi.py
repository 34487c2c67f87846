"""The OpenAPI document is valid and says what the API does: a schemathesis run of
every phase (stateful included) and every check, against the real ``dispatcher api``
on the real broker, finds no 5xx, no answer that breaks the document, no request
valid under it refused and none invalid under it accepted."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openapi_spec_validator import validate

from dispatcher.api.app import build_context, create_app
from dispatcher.settings import Settings
from tests.api_support import ORG, ApiProcess
from tests.support import REPO, Namespace, free_port


def built_document() -> dict[str, Any]:
    """The document as the code builds it (no Kafka needed to build it)."""
    return create_app(build_context(Settings()), start_readers=False).openapi()


@pytest.fixture(scope="module")
def live_api(broker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiProcess]:
    ns = Namespace()
    api = ApiProcess(ns, tmp_path_factory.mktemp("api") / "api.log").start()
    with api.admin() as http:
        assert http.put(f"/v1/organizations/{ORG}/plan", json={"plan": "scale"}).is_success
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


def test_every_v1_operation_declares_the_bearer_scheme() -> None:
    document = built_document()
    assert document["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "API key (bsk_...)",
        "description": document["components"]["securitySchemes"]["bearerAuth"]["description"],
    }
    for path, ops in document["paths"].items():
        for method, op in ops.items():
            assert path.startswith("/v1/"), path
            assert op["security"] == [{"bearerAuth": []}], (path, method)
            assert "WWW-Authenticate" in op["responses"]["401"]["headers"], (path, method)
            assert "Retry-After" in op["responses"]["503"]["headers"], (path, method)
            if method != "get":
                assert "403" in op["responses"], (path, method)


def test_statuses_headers_and_constraints_are_in_the_document() -> None:
    document = built_document()
    ops = {op["operationId"]: op for item in document["paths"].values() for op in item.values()}
    create = ops["createWebhook"]["responses"]
    assert {"200", "201", "409", "422"} <= set(create)
    for status in ("200", "201"):
        assert {"ETag", "Idempotent-Replayed"} <= set(create[status]["headers"])
        assert "getWebhook" in create[status]["links"]
    for name in ("updateWebhook", "enableWebhook", "disableWebhook", "rotateSecret"):
        assert "412" in ops[name]["responses"], name
        assert "ETag" in ops[name]["responses"]["200"]["headers"], name
    assert "412" in ops["deleteWebhook"]["responses"]
    assert "ETag" in ops["getWebhook"]["responses"]["200"]["headers"]
    assert "Retry-After" in ops["testWebhook"]["responses"]["429"]["headers"]

    schemas = document["components"]["schemas"]
    settings = Settings()
    assert schemas["PlanRequest"]["properties"]["plan"]["enum"] == settings.known_plans
    create_body = schemas["WebhookCreate"]["properties"]
    assert create_body["events"]["items"]["enum"] == ["visitor.identified"]
    url = re.compile(create_body["url"]["pattern"])
    for good in ("https://hooks.example.com/x?a=1", "https://127.0.0.1:8443/", "https://a.io"):
        assert url.fullmatch(good), good
    assert url.fullmatch("https://" + ".".join(["a" * 63] * 3) + ".io:1/")
    for bad in (
        "http://hooks.example.com/",
        "https://user@host.com/",
        "https://h.com/a b",
    ):
        assert not url.fullmatch(bad), bad
    patch_description = schemas["WebhookPatch"]["properties"]["description"]["anyOf"][0]
    text = re.compile(patch_description["pattern"])
    assert text.fullmatch("CRM sync: Ünïcode ✓") and not text.fullmatch("a\x1b[2J")
    assert not text.fullmatch("a\u202eb") and not text.fullmatch("a\nb")
    cursors = [
        p["schema"]["anyOf"][0]
        for item in document["paths"].values()
        for op in item.values()
        for p in op.get("parameters", [])
        if p["name"] == "cursor"
    ]
    assert len(cursors) == 2 and all(c["pattern"] == cursors[0]["pattern"] for c in cursors)


def test_the_document_follows_the_deployment() -> None:
    settings = Settings(allow_http=True, known_plans=["basic", "scale"], entitled_plans=["scale"])
    document = create_app(build_context(settings), start_readers=False).openapi()
    schemas = document["components"]["schemas"]
    assert schemas["PlanRequest"]["properties"]["plan"]["enum"] == ["basic", "scale"]
    url = re.compile(schemas["WebhookPatch"]["properties"]["url"]["anyOf"][0]["pattern"])
    assert url.fullmatch("http://hooks.example.com/x") and url.fullmatch("https://a.io/")
    assert not url.fullmatch("ftp://hooks.example.com/x")


SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
#: Statuses a request valid under the document may still get from the state it
#: meets: an id nobody made (404), no plan yet or a webhook disabled (409), a stale
#: If-Match (412), test sends all in flight (429), and a key the generator made up
#: (401: a document says how to send a key, not which keys exist). A refusal of the
#: request itself (400, 422) or a server error is a failure.
STATE_STATUSES = ["2xx", "401", "404", "409", "412", "429"]


def test_schemathesis_all_phases_find_no_server_error_and_no_valid_request_refused(
    live_api: ApiProcess, tmp_path: Path
) -> None:
    """Every phase, the stateful one included (it follows the document's links from a
    plan to a webhook to the operations on it), every check, against the real process."""
    document = httpx.get(live_api.url + "/openapi.json", timeout=10).json()
    (tmp_path / "served.json").write_text(json.dumps(document))
    # Endpoints the API accepts and that exist only here: a loopback address (this
    # deployment allows it) on a port nothing listens on. A generated host name
    # would be looked up in DNS, off this machine.
    closed = free_port()
    loopback = rf"^https://127\.0\.0\.1:{closed}/[a-z]{{0,8}}$"
    schemas = document["components"]["schemas"]
    schemas["WebhookCreate"]["properties"]["url"]["pattern"] = loopback
    schemas["WebhookPatch"]["properties"]["url"]["anyOf"][0]["pattern"] = loopback
    (tmp_path / "openapi.json").write_text(json.dumps(document))
    # The key through the document's security scheme, so the checks that leave it
    # out (and expect a 401) can.
    (tmp_path / "schemathesis.toml").write_text(
        f'[auth.openapi.bearerAuth]\nbearer = "{live_api.admin_key}"\n'
        f"[checks.positive_data_acceptance]\nexpected-statuses = {json.dumps(STATE_STATUSES)}\n"
        # Scenarios long enough to go from a new webhook through calls on it; requests
        # valid under the document only (the other phases send invalid ones too).
        "[phases.stateful]\nmax-steps = 20\n"
        # The document's own links only, none guessed.
        "[phases.stateful.inference]\nalgorithms = []\n"
        '[phases.stateful.generation]\nmax-examples = 60\nmode = "positive"\n'
        # Webhooks are made in the organization whose plan the fixture set (any
        # other has none: a 409), so that the links from them lead somewhere.
        '[[operations]]\ninclude-operation-id = "createWebhook"\n'
        f'parameters = {{ org = "{ORG}" }}\n'
    )
    run = subprocess.run(
        [
            str(SCHEMATHESIS),
            "--config-file",
            str(tmp_path / "schemathesis.toml"),
            "run",
            str(tmp_path / "openapi.json"),
            "--url",
            live_api.url,
            "--phases",
            "examples,coverage,fuzzing,stateful",
            "--checks",
            "all",
            "--mode",
            "all",
            "--max-examples",
            "8",
            "--seed",
            "20261206",
            "--workers",
            "1",
            "--request-timeout",
            "30",
            "--generation-database",
            "none",
            "--no-color",
        ],
        # Run from the test's directory: the tool keeps a cache where it runs.
        env={
            **os.environ,
            "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks",
            "SERVED_DOCUMENT": str(tmp_path / "served.json"),
            "PYTHONPATH": str(REPO),
        },
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-12000:]
    for phase in ("Examples", "Coverage", "Fuzzing", "Stateful"):
        assert f"✅  {phase} (in" in output, output[-4000:]
    # The stateful phase followed the document's links (plan, webhook, calls on it)
    # rather than only calling operations one by one.
    links = re.search(r"API Links:\s+(\d+) covered / (\d+) selected", output)
    assert links is not None and int(links.group(1)) >= 8, output[-4000:]


def test_log_has_no_traceback(live_api: ApiProcess) -> None:
    assert "Traceback" not in live_api.logs()
    assert Path(live_api.log_path).exists()
