"""The chart's API objects (api.enabled): StatefulSet, Service, Ingress, NetworkPolicy,
ServiceMonitor; rendered by the pinned Helm that scripts/check-chart.sh provides."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from dispatcher.settings import load_settings
from tests.test_chart import CHART, REQUIRED, env_of, render, render_ci, render_result

# Rendered by the pinned Helm in .tools/, as tests/test_chart.py is.
pytestmark = pytest.mark.chart

API_VALUES = CHART / "ci" / "api-values.yaml"


def api_objects() -> dict[str, dict[str, Any]]:
    return {
        doc["kind"]: doc
        for doc in render_ci(API_VALUES)
        if doc["metadata"]["labels"].get("app.kubernetes.io/component") == "api"
        or doc["metadata"]["name"].endswith("-api")
    }


def test_api_objects_render_with_keys_from_the_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    objects = api_objects()
    assert set(objects) == {"StatefulSet", "Service", "Ingress", "NetworkPolicy", "ServiceMonitor"}
    pod = objects["StatefulSet"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"] == ["api"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "api": 8090,
        "http": 8080,
    }
    keys = next(v for v in pod["volumes"] if v["name"] == "api-keys")
    assert keys["secret"]["secretName"] == "webhooks-api-keys"
    env = env_of(container)
    assert env["DISPATCHER_API_KEYS_FILE"]["value"] == "/etc/dispatcher/api-keys/keys.json"
    assert "DISPATCHER_API_KEYS" not in env  # never inline
    for name in list(os.environ):
        if name.startswith("DISPATCHER_"):
            monkeypatch.delenv(name)
    for name, entry in env.items():
        monkeypatch.setenv(name, entry["value"])
    settings = load_settings()
    assert settings.api_port == 8090
    assert settings.api_history_path == "/var/lib/dispatcher/history/history.sqlite3"
    assert settings.event_catalog_file == "/etc/dispatcher/event-catalog/catalog.json"
    selector = objects["Service"]["spec"]["selector"]
    assert selector["app.kubernetes.io/component"] == "api"
    assert objects["StatefulSet"]["spec"]["selector"]["matchLabels"] == selector
    paths = objects["Ingress"]["spec"]["rules"][0]["http"]["paths"]
    assert {p["backend"]["service"]["port"]["name"] for p in paths} == {"api"}
    assert "/metrics" not in {p["path"] for p in paths}
    assert objects["ServiceMonitor"]["spec"]["endpoints"][0]["port"] == "http"


def test_api_needs_a_keys_secret(tmp_path: Path) -> None:
    result = render_result(REQUIRED, {"api": {"enabled": True}}, tmp=tmp_path)
    assert result.returncode != 0 and "api.keys.existingSecret is required" in result.stderr


def test_api_is_off_by_default(tmp_path: Path) -> None:
    docs = render(REQUIRED, tmp=tmp_path)
    assert not [d for d in docs if d["metadata"]["name"].endswith("-api")]


def test_dispatcher_and_topics_job_read_the_api_event_catalog(tmp_path: Path) -> None:
    # The dispatcher consumes every catalog input topic and the Job creates them.
    docs = render(API_VALUES, {"topicsJob": {"enabled": True}}, tmp=tmp_path)
    pods = [
        (doc["metadata"]["name"], doc["spec"]["template"]["spec"])
        for doc in docs
        if doc["kind"] in ("Deployment", "StatefulSet", "Job")
    ]
    # The API replicas, the API writer, the dispatcher, the Job.
    assert len(pods) == 4, [name for name, _pod in pods]
    for name, pod in pods:
        container = pod["containers"][0]
        file = env_of(container)["DISPATCHER_EVENT_CATALOG_FILE"]["value"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert file == f"{mounts['event-catalog']}/catalog.json", name
        volume = next(v for v in pod["volumes"] if v["name"] == "event-catalog")
        assert volume["configMap"]["name"] == "webhooks-event-catalog", name


def test_api_keeps_its_history_store_on_a_claim_per_pod_or_an_empty_dir(tmp_path: Path) -> None:
    sts = api_objects()["StatefulSet"]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "history"
    assert claim["spec"]["resources"]["requests"]["storage"] == "10Gi"
    pod = sts["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["history"] == "/var/lib/dispatcher/history"
    assert "history" not in {v["name"] for v in pod["volumes"]}  # the claim provides it

    docs = render(API_VALUES, {"api": {"history": {"volume": "emptyDir"}}}, tmp=tmp_path)
    both = [d for d in docs if d["kind"] == "StatefulSet"]  # the replicas and the writer
    assert len(both) == 2
    for sts in both:
        assert "volumeClaimTemplates" not in sts["spec"]
        volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
        assert volumes["history"]["emptyDir"] == {"sizeLimit": "10Gi"}
    bad = render_result(API_VALUES, {"api": {"history": {"volume": "hostPath"}}}, tmp=tmp_path)
    assert bad.returncode != 0


def test_api_writer_is_one_pod_behind_its_own_service_with_its_history_claim() -> None:
    docs = render_ci(API_VALUES)
    writer = {
        doc["kind"]: doc
        for doc in docs
        if doc["metadata"]["labels"].get("app.kubernetes.io/component") == "api-writer"
    }
    assert set(writer) == {"StatefulSet", "Service", "NetworkPolicy", "ServiceMonitor"}
    deployment = writer["StatefulSet"]
    assert deployment["spec"]["replicas"] == 1
    # A StatefulSet of one pod deletes the old pod before it starts the new one.
    assert deployment["spec"]["updateStrategy"] == {"type": "RollingUpdate"}
    assert "podManagementPolicy" not in deployment["spec"]  # OrderedReady
    (claim,) = deployment["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "history"
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["api"]
    assert "DISPATCHER_API_WRITER_URL" not in env_of(container)  # it is the writer
    selector = writer["Service"]["spec"]["selector"]
    assert deployment["spec"]["selector"]["matchLabels"] == selector
    assert selector["app.kubernetes.io/component"] == "api-writer"
    service = writer["Service"]["metadata"]["name"]
    namespace = writer["Service"]["metadata"]["namespace"]

    replicas = api_objects()["StatefulSet"]
    url = env_of(replicas["spec"]["template"]["spec"]["containers"][0])
    assert url["DISPATCHER_API_WRITER_URL"]["value"] == f"http://{service}.{namespace}.svc:8090"
    assert replicas["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    # Only the API replicas may call the writer's API port.
    allowed = writer["NetworkPolicy"]["spec"]["ingress"][0]["from"][0]["podSelector"]
    assert allowed["matchLabels"]["app.kubernetes.io/component"] == "api"
