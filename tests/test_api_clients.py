"""Clients generated from the served ``/openapi.json`` build and work.

A dashboard team generates its client from the document rather than writing one:
a Python client (openapi-python-client) must generate without a warning and drive
the real API (plan, create, the idempotent replay, list, rotate), and TypeScript
types (openapi-typescript) must compile under ``tsc --strict``, and refuse a body
of the wrong type, which shows the types really bind.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from tests.api_support import ORG, ApiProcess
from tests.support import REPO, Namespace

NODE_TOOLS = REPO / "tests" / "clients" / "node_modules" / ".bin"
VENV_BIN = Path(sys.executable).parent


@pytest.fixture
def api(ns: Namespace, run_api: Any) -> ApiProcess:
    started: ApiProcess = run_api(ns)
    return started


def served_document(api: ApiProcess, into: Path) -> Path:
    document = httpx.get(api.url + "/openapi.json", timeout=10).raise_for_status().json()
    path = into / "openapi.json"
    path.write_text(json.dumps(document))
    return path


@pytest.fixture
def generated_client(api: ApiProcess, tmp_path: Path) -> Iterator[ModuleType]:
    """The Python client generated from the served document, importable for this test."""
    package = f"bullseye_client_{uuid.uuid4().hex[:8]}"
    done = subprocess.run(
        [
            str(VENV_BIN / "openapi-python-client"),
            "generate",
            "--path",
            str(served_document(api, tmp_path)),
            "--output-path",
            str(tmp_path / package),
            "--meta",
            "none",
            "--fail-on-warning",
        ],
        # The generator formats its output with ruff, found on PATH.
        env={**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"the client did not generate:\n{done.stdout}{done.stderr}"
    sys.path.insert(0, str(tmp_path))
    try:
        yield importlib.import_module(package)
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
            del sys.modules[name]


def test_generated_python_client_drives_the_api(
    generated_client: ModuleType, api: ApiProcess
) -> None:
    name = generated_client.__name__

    def op(tag: str, operation: str) -> Any:
        return importlib.import_module(f"{name}.api.{tag}.{operation}")

    models = importlib.import_module(f"{name}.models")
    with generated_client.AuthenticatedClient(base_url=api.url, token=api.admin_key) as client:
        drive(client, models, op)


def drive(client: Any, models: ModuleType, op: Any) -> None:

    plan = op("organizations", "set_plan").sync_detailed(
        ORG, client=client, body=models.PlanRequest(plan=models.PlanRequestPlan("scale"))
    )
    assert plan.status_code == 200, plan.content

    create = op("webhooks", "create_webhook")
    body = models.WebhookCreate(url="https://127.0.0.1:9/hook")
    key = f"key-{uuid.uuid4().hex}"
    first = create.sync_detailed(ORG, client=client, body=body, idempotency_key=key)
    assert first.status_code == 201, first.content
    made = first.parsed
    assert isinstance(made, models.Webhook)
    assert made.secret.startswith("whsec_")

    replay = create.sync_detailed(ORG, client=client, body=body, idempotency_key=key)
    assert replay.status_code in (200, 201), replay.content
    assert replay.headers.get("idempotent-replayed") == "true"
    assert isinstance(replay.parsed, models.Webhook)
    assert replay.parsed.id == made.id

    listed = op("webhooks", "list_webhooks").sync(ORG, client=client)
    assert isinstance(listed, models.WebhookList)
    assert [w.id for w in listed.data] == [made.id]

    rotated = op("webhooks", "rotate_secret").sync(
        ORG, made.id, client=client, body=models.RotateRequest()
    )
    assert isinstance(rotated, models.Webhook)
    assert rotated.secret.startswith("whsec_") and rotated.secret != made.secret
    assert len(rotated.previous_secrets_until) == 1


TYPED_USE = """\
import type { components, operations, paths } from "./api";

type Webhook = components["schemas"]["Webhook"];
type CreateBody = operations["createWebhook"]["requestBody"]["content"]["application/json"];
type Created = operations["createWebhook"]["responses"][201]["content"]["application/json"];
type Replayed = operations["createWebhook"]["responses"][200]["content"]["application/json"];
type Page = operations["listWebhooks"]["responses"][200]["content"]["application/json"];
export type ListWebhooks = paths["/v1/organizations/{org}/webhooks"]["get"];

export function newWebhook(url: string): CreateBody {
  return { url, events: ["visitor.identified"] };
}

export function secretOf(answer: Created | Replayed): string | null {
  return answer.secret ?? null;
}

export function ids(page: Page): string[] {
  return page.data.map((w: Webhook) => w.id);
}
"""

MISTYPED_USE = """\
import type { operations } from "./api";

type CreateBody = operations["createWebhook"]["requestBody"]["content"]["application/json"];

export const wrong: CreateBody = { url: 42 };
"""


def test_generated_typescript_types_compile_strictly(api: ApiProcess, tmp_path: Path) -> None:
    assert (NODE_TOOLS / "tsc").exists(), (
        "the TypeScript tools are missing: `bash scripts/test.sh` installs them, "
        "or run `npm ci --prefix tests/clients`"
    )
    document = served_document(api, tmp_path)
    generate = subprocess.run(
        [
            str(NODE_TOOLS / "openapi-typescript"),
            str(document),
            "-o",
            str(tmp_path / "api.d.ts"),
            # A field with a default may be left out of a request body.
            "--default-non-nullable=false",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert generate.returncode == 0, generate.stdout + generate.stderr

    def tsc(source: str, name: str) -> subprocess.CompletedProcess[str]:
        (tmp_path / name).write_text(source)
        return subprocess.run(
            [
                str(NODE_TOOLS / "tsc"),
                "--strict",
                "--noEmit",
                "--target",
                "es2022",
                "--module",
                "es2022",
                "--moduleResolution",
                "bundler",
                str(tmp_path / name),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    good = tsc(TYPED_USE, "use.ts")
    assert good.returncode == 0, good.stdout + good.stderr
    bad = tsc(MISTYPED_USE, "wrong.ts")
    assert bad.returncode != 0
    assert "TS2322" in bad.stdout, bad.stdout
