"""Offline checks of the Helm chart, the compose file and the image recipe.

Helm and the schemas are put under ``.tools/`` by ``scripts/check-chart.sh``, which
builds Helm from its Go module at a pinned version; CI runs it before the tests.
When they are missing these tests fail, naming the script: they never skip.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from dispatcher.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
#: Every test here needs helm and the schemas in .tools/; the fast lane
#: (``-m 'not kafka and not chart'``) leaves them out on a clone where
#: scripts/check-chart.sh has not run yet.
pytestmark = pytest.mark.chart

CHART = ROOT / "helm" / "webhook-dispatcher"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
CHECK_SCRIPT = ROOT / "scripts" / "check-chart.sh"
COMPOSE_FILE = ROOT / "docker-compose.yml"

# Settings the chart sets from its own structured values (Kafka connection and
# security, Secret- and ConfigMap-mounted files, the container port) rather than
# from the `config` map.
CHART_MANAGED_SETTINGS = {
    "kafka_bootstrap_servers",
    "kafka_security_protocol",
    "kafka_sasl_mechanism",
    "kafka_sasl_username",
    "kafka_sasl_password",
    "kafka_ssl_ca_location",
    "kafka_ssl_certificate_location",
    "kafka_ssl_key_location",
    "kafka_extra_config",
    "kafka_consumer_extra_config",
    "http_ca_file",
    "http_port",
    "group_instance_id",
    "session_timeout_s",
    # The API's port, keys (from a Secret), event catalog (from a ConfigMap) and
    # history store (on the API's volume).
    "api_port",
    "api_history_path",
    "api_keys",
    "api_keys_file",
    "event_catalog_file",
    # The writer's URL: set by the chart on the API replicas, never on the writer.
    "api_writer_url",
}

# Every metric the dispatcher exports; alerts and the dashboard may use no other.
KNOWN_METRICS = {
    "dispatcher_delivery_attempts_total",
    "dispatcher_attempt_duration_seconds",
    "dispatcher_end_to_end_latency_seconds",
    "dispatcher_retries_scheduled_total",
    "dispatcher_dead_letters_total",
    "dispatcher_deferrals_total",
    "dispatcher_webhook_deferrals_total",
    "dispatcher_circuit_open_endpoints",
    "dispatcher_in_flight_deliveries",
    "dispatcher_invalid_events_total",
    "dispatcher_subscriptions_loaded",
    "dispatcher_consumer_lag",
    "dispatcher_skipped_deliveries_total",
    "dispatcher_ready",
    "dispatcher_stuck_partitions",
    "dispatcher_internal_errors_total",
    "dispatcher_invalid_subscriptions_total",
    "dispatcher_produce_refused_total",
    "dispatcher_webhooks_auto_disabled_total",
    "dispatcher_health_write_failing",
}

OPTIONAL_TEMPLATES = {
    "servicemonitor.yaml": "ServiceMonitor",
    "pdb.yaml": "PodDisruptionBudget",
    "hpa.yaml": "HorizontalPodAutoscaler",
    "prometheusrule.yaml": "PrometheusRule",
    "grafana-dashboard.yaml": "ConfigMap",
    "topics-job.yaml": "Job",
}

REQUIRED = {"kafka": {"bootstrapServers": "kafka:9092"}}


# --- tools: the one place that finds what check-chart.sh provides -----------


def tool(relative: str) -> Path:
    """Path of a file under .tools/, failing the test with a remedy if it is absent."""
    path = ROOT / ".tools" / relative
    if not path.exists():
        pytest.fail(
            f"{path} is missing: run scripts/check-chart.sh first; it builds helm at its "
            "pinned version and fetches the schemas into .tools/",
            pytrace=False,
        )
    return path


def script_setting(name: str) -> str:
    """A pinned value of check-chart.sh, so the tests and the script agree."""
    match = re.search(rf'^{name}="([^"]+)"', CHECK_SCRIPT.read_text(), re.MULTILINE)
    assert match, f"{name} not found in {CHECK_SCRIPT}"
    return match.group(1)


RENDER_KUBE_VERSION = script_setting("RENDER_KUBE_VERSION")
VALIDATE_KUBE_VERSIONS = script_setting("VALIDATE_KUBE_VERSIONS").split(",")


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(tool("bin/helm")), *args], capture_output=True, text=True, timeout=120, check=False
    )


def render_result(*values: Path | dict[str, Any], tmp: Path) -> subprocess.CompletedProcess[str]:
    args = [
        "template",
        "ci",
        str(CHART),
        "--namespace",
        "ci",
        "--kube-version",
        RENDER_KUBE_VERSION,
    ]
    for index, value in enumerate(values):
        if isinstance(value, dict):
            path = tmp / f"values-{index}.yaml"
            path.write_text(yaml.safe_dump(value))
            value = path
        args += ["-f", str(value)]
    return helm(*args)


def render(*values: Path | dict[str, Any], tmp: Path) -> list[dict[str, Any]]:
    result = render_result(*values, tmp=tmp)
    assert result.returncode == 0, f"helm template failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@cache
def render_ci(path: Path) -> tuple[dict[str, Any], ...]:
    result = helm(
        "template", "ci", str(CHART), "--namespace", "ci",
        "--kube-version", RENDER_KUBE_VERSION, "-f", str(path),
    )  # fmt: skip
    assert result.returncode == 0, f"helm template with {path.name} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def one(docs: Any, kind: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def crd_schema(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The closed CRD schema check-chart.sh made for a Prometheus Operator kind."""
    group, _, version = doc["apiVersion"].rpartition("/")
    if group != "monitoring.coreos.com":
        return None
    path = tool(f"schemas/{group}_{version}_{doc['kind']}.json")
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def pod_specs(docs: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield doc["kind"], doc["spec"]["template"]["spec"]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in container["env"]}


# --- rendering and validation --------------------------------------------------


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_ci_values_lint_render_and_validate(values: Path) -> None:
    lint = helm(
        "lint", "--strict", "--kube-version", RENDER_KUBE_VERSION, str(CHART), "-f", str(values)
    )
    assert lint.returncode == 0, f"helm lint failed:\n{lint.stdout}{lint.stderr}"
    docs = render_ci(values)
    assert docs, "nothing rendered"
    for doc in docs:
        schema = crd_schema(doc)
        if schema is not None:
            jsonschema.Draft4Validator(schema).validate(doc)
        else:
            for version in VALIDATE_KUBE_VERSIONS:
                kubernetes_validate.validate(doc, version, strict=True)


def test_ci_files_cover_every_optional_template() -> None:
    assert (CHART / "ci" / "default-values.yaml") in CI_VALUES
    default_kinds = {doc["kind"] for doc in render_ci(CHART / "ci" / "default-values.yaml")}
    for template, kind in OPTIONAL_TEMPLATES.items():
        assert kind not in default_kinds, f"{template} must be off by default"
        sources = [p.name for p in CI_VALUES if kind in {d["kind"] for d in render_ci(p)}]
        assert sources, f"no ci/*-values.yaml enables {template}"


def test_default_values_render_only_the_core_objects() -> None:
    kinds = sorted(doc["kind"] for doc in render_ci(CHART / "ci" / "default-values.yaml"))
    assert kinds == ["Deployment", "Service", "ServiceAccount"]


@pytest.mark.parametrize(
    ("typo", "values"),
    [
        ("replicaCuont", {"replicaCuont": 3}),
        ("drain_timout_s", {"config": {"drain_timout_s": 5}}),
        ("mechansim", {"kafka": {"sasl": {"mechansim": "PLAIN"}}}),
        ("intervall", {"serviceMonitor": {"enabled": True, "intervall": "15s"}}),
        ("treshold", {"prometheusRule": {"rules": {"consumerLag": {"treshold": 5}}}}),
    ],
)
def test_schema_rejects_misspelt_values(typo: str, values: dict[str, Any], tmp_path: Path) -> None:
    result = render_result(REQUIRED, values, tmp=tmp_path)
    assert result.returncode != 0, f"misspelt {typo!r} was accepted"
    assert typo in result.stderr, f"the error does not name {typo!r}:\n{result.stderr}"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({}, "kafka.bootstrapServers is required"),
        (
            {"kafka": {"securityProtocol": "SASL_SSL", "sasl": {"mechanism": "PLAIN"}}},
            "kafka.sasl.existingSecret",
        ),
        ({"kafka": {"tls": {"existingSecret": "kafka-tls"}}}, "kafka.securityProtocol SSL"),
        ({"config": {"partition_buffer_low": 2000}}, "partition_buffer_low must be below"),
        ({"podDisruptionBudget": {"enabled": True, "minAvailable": 1}}, "exactly one"),
    ],
)
def test_inconsistent_values_fail_with_a_message(
    values: dict[str, Any], message: str, tmp_path: Path
) -> None:
    base = {} if not values else REQUIRED
    result = render_result(base, values, tmp=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


# --- what the rendered objects must say ----------------------------------------


@pytest.mark.parametrize("drain_s", [20.0, 45.5, 0.2, 300])
def test_termination_grace_period_exceeds_drain_timeout(drain_s: float, tmp_path: Path) -> None:
    docs = render(REQUIRED, {"config": {"drain_timeout_s": drain_s}}, tmp=tmp_path)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    grace = pod["terminationGracePeriodSeconds"]
    assert isinstance(grace, int)
    assert grace > drain_s
    assert grace == math.ceil(drain_s) + 10
    env = env_of(pod["containers"][0])
    assert float(env["DISPATCHER_DRAIN_TIMEOUT_S"]["value"]) == drain_s


def test_default_grace_period_is_drain_plus_margin() -> None:
    docs = render_ci(CHART / "ci" / "default-values.yaml")
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 30


def selectors(docs: Any) -> Iterator[tuple[str, dict[str, str]]]:
    for doc in docs:
        kind, spec = doc["kind"], doc.get("spec", {})
        if kind in ("Deployment", "StatefulSet"):
            yield kind, spec["selector"]["matchLabels"]
            for constraint in spec["template"]["spec"].get("topologySpreadConstraints", []):
                yield "topologySpreadConstraint", constraint["labelSelector"]["matchLabels"]
        elif kind == "Service":
            yield kind, spec["selector"]
        elif kind in ("PodDisruptionBudget", "ServiceMonitor"):
            yield kind, spec["selector"]["matchLabels"]


def test_selectors_never_carry_a_version(tmp_path: Path) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    versions = {str(chart["version"]), str(chart["appVersion"])}
    seen = set()
    for path in CI_VALUES:
        for kind, labels in selectors(render_ci(path)):
            seen.add(kind)
            assert "helm.sh/chart" not in labels and "app.kubernetes.io/version" not in labels
            for value in labels.values():
                assert not any(version in value for version in versions), (kind, labels)
    assert {"Deployment", "Service", "PodDisruptionBudget", "ServiceMonitor"} <= seen
    # An upgrade of the image must leave every selector as it was (they are immutable).
    base = CHART / "ci" / "pdb-values.yaml"
    before = dict(selectors(render_ci(base)))
    after = dict(selectors(render(base, {"image": {"tag": "9.9.9"}}, tmp=tmp_path)))
    assert before == after


def test_pods_are_hardened() -> None:
    checked = set()
    for path in CI_VALUES:
        for kind, pod in pod_specs(render_ci(path)):
            checked.add(kind)
            assert pod["automountServiceAccountToken"] is False
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            tmp_volumes = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
            for container in pod["containers"]:
                context = container["securityContext"]
                assert context["readOnlyRootFilesystem"] is True
                assert context["allowPrivilegeEscalation"] is False
                assert context["runAsNonRoot"] is True
                assert context["capabilities"] == {"drop": ["ALL"]}
                mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
                assert mounts.get("/tmp") in tmp_volumes
    assert checked == {"Deployment", "StatefulSet", "Job"}


def test_probes_and_port() -> None:
    pod = one(render_ci(CHART / "ci" / "default-values.yaml"), "Deployment")["spec"]["template"]
    container = pod["spec"]["containers"][0]
    port = container["ports"][0]
    assert port["name"] == "http"
    assert env_of(container)["DISPATCHER_HTTP_PORT"]["value"] == str(port["containerPort"])
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["args"] == ["run"]
    assert container["resources"]["requests"] and container["resources"]["limits"]


def test_kafka_credentials_and_ca_come_from_existing_secrets() -> None:
    docs = render_ci(CHART / "ci" / "kafka-sasl-tls-values.yaml")
    assert not [doc for doc in docs if doc["kind"] == "Secret"], "the chart must not hold secrets"
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    env = env_of(pod["containers"][0])
    for name, key in (
        ("DISPATCHER_KAFKA_SASL_USERNAME", "user"),
        ("DISPATCHER_KAFKA_SASL_PASSWORD", "pass"),
    ):
        assert "value" not in env[name]
        assert env[name]["valueFrom"]["secretKeyRef"] == {
            "name": "dispatcher-kafka-credentials",
            "key": key,
        }
    volume = next(v for v in pod["volumes"] if "secret" in v)
    assert volume["secret"]["secretName"] == "dispatcher-kafka-tls"
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"])
    assert mount["readOnly"] is True
    files = {item["path"]: item["key"] for item in volume["secret"]["items"]}
    assert files == {"ca.crt": "ca.crt", "client.crt": "tls.crt", "client.key": "tls.key"}
    for name, file in (
        ("DISPATCHER_KAFKA_SSL_CA_LOCATION", "ca.crt"),
        ("DISPATCHER_KAFKA_SSL_CERTIFICATE_LOCATION", "client.crt"),
        ("DISPATCHER_KAFKA_SSL_KEY_LOCATION", "client.key"),
    ):
        assert env[name]["value"] == f"{mount['mountPath']}/{file}"
    assert env["DISPATCHER_KAFKA_SECURITY_PROTOCOL"]["value"] == "SASL_SSL"


def test_static_membership_takes_the_pod_name_by_default() -> None:
    pod = one(render_ci(CHART / "ci" / "default-values.yaml"), "Deployment")["spec"]["template"]
    env = env_of(pod["spec"]["containers"][0])
    assert env["DISPATCHER_GROUP_INSTANCE_ID"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.name"}
    }
    assert env["DISPATCHER_SESSION_TIMEOUT_S"]["value"] == "30"
    # The topics Job joins no consumer group: it gets neither.
    job = one(render_ci(CHART / "ci" / "topics-job-values.yaml"), "Job")["spec"]["template"]
    job_env = env_of(job["spec"]["containers"][0])
    assert "DISPATCHER_GROUP_INSTANCE_ID" not in job_env
    assert "DISPATCHER_SESSION_TIMEOUT_S" not in job_env


def test_static_membership_can_be_turned_off() -> None:
    docs = render_ci(CHART / "ci" / "dynamic-membership-values.yaml")
    env = env_of(one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0])
    assert "DISPATCHER_GROUP_INSTANCE_ID" not in env
    assert env["DISPATCHER_SESSION_TIMEOUT_S"]["value"] == "45"


@pytest.mark.parametrize("seconds", [5, 301, "30"])
def test_session_timeout_outside_the_brokers_bounds_is_refused(
    seconds: object, tmp_path: Path
) -> None:
    result = render_result(REQUIRED, {"kafka": {"sessionTimeoutSeconds": seconds}}, tmp=tmp_path)
    assert result.returncode != 0
    assert "sessionTimeoutSeconds" in result.stderr, result.stderr


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_notes_render(values: Path, tmp_path: Path) -> None:
    # `helm template` skips NOTES.txt; render it through tpl from a copy of the chart.
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    (chart / "templates" / "NOTES.txt").rename(chart / "NOTES.txt")
    (chart / "templates" / "notes.yaml").write_text(
        'notes: {{ tpl (.Files.Get "NOTES.txt") . | toJson }}\n'
    )
    result = helm(
        "template", "ci", str(chart), "--namespace", "ci", "--kube-version", RENDER_KUBE_VERSION,
        "-f", str(values), "--show-only", "templates/notes.yaml",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    notes = yaml.safe_load(result.stdout)["notes"]
    assert "ci-webhook-dispatcher" in notes
    assert "terminationGracePeriodSeconds is" in notes
    assert "<no value>" not in notes


# --- the chart's settings are the dispatcher's settings ----------------------------


def test_config_values_mirror_the_settings() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())["config"]
    schema = json.loads((CHART / "values.schema.json").read_text())
    fields = Settings.model_fields
    missing = set(fields) - CHART_MANAGED_SETTINGS - set(values)
    assert not missing, f"settings with no value in the chart's config: {sorted(missing)}"
    unknown = set(values) - set(fields)
    assert not unknown, f"config keys that are no setting: {sorted(unknown)}"
    assert set(schema["properties"]["config"]["properties"]) == set(values)
    for name, value in values.items():
        default = fields[name].get_default(call_default_factory=True)
        assert value == default, f"config.{name} is {value!r}, the dispatcher's default {default!r}"


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_rendered_environment_is_accepted_by_the_settings(
    values: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dispatcher = [
        d
        for d in render_ci(values)
        if d["metadata"]["labels"].get("app.kubernetes.io/component") not in ("api", "api-writer")
    ]
    pod = one(dispatcher, "Deployment")["spec"]["template"]["spec"]
    env = env_of(pod["containers"][0])
    for name in env:
        assert name.startswith("DISPATCHER_")
        assert name.removeprefix("DISPATCHER_").lower() in Settings.model_fields, name
    for name in list(os.environ):
        if name.startswith("DISPATCHER_"):
            monkeypatch.delenv(name)
    for name, entry in env.items():
        monkeypatch.setenv(name, entry.get("value", "from-a-secret"))
    settings = load_settings()
    config = yaml.safe_load(values.read_text()).get("config", {})
    for key, expected in config.items():
        assert getattr(settings, key) == expected, key


# --- values.yaml and its schema -----------------------------------------------


def test_every_value_is_documented() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = [
        f"{number}: {line.strip()}"
        for number, line in enumerate(lines, start=1)
        if re.match(r"^\s*(- )?[A-Za-z0-9_.-]+:", line)
        and not lines[number - 2].strip().removeprefix("- ").startswith("##")
    ]
    assert not undocumented, "keys without a ## comment right above:\n" + "\n".join(undocumented)


def test_schema_is_closed_at_every_level() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    open_objects: list[str] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object":
                if "properties" in node and node.get("additionalProperties") is not False:
                    open_objects.append(where)
                # A map with free keys (labels, annotations) must still type its values.
                if "properties" not in node and not isinstance(
                    node.get("additionalProperties"), dict
                ):
                    open_objects.append(where)
            for key, value in node.items():
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{where}/{index}")

    walk(schema, "#")
    assert not open_objects, f"objects open to unknown keys: {open_objects}"
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(yaml.safe_load((CHART / "values.yaml").read_text()))


# --- alerts and dashboard -------------------------------------------------------


def metric_names(text: str) -> set[str]:
    names = set(re.findall(r"\bdispatcher_[a-z_]+", text))
    return {re.sub(r"_(bucket|sum|count)$", "", name) for name in names}


def test_alerts_use_known_metrics_and_cover_the_failure_modes() -> None:
    rule = one(render_ci(CHART / "ci" / "prometheusrule-values.yaml"), "PrometheusRule")
    rules = [r for group in rule["spec"]["groups"] for r in group["rules"]]
    for item in rules:
        assert metric_names(item["expr"]) <= KNOWN_METRICS, item["expr"]
        assert metric_names(item["expr"]), item["expr"]
        assert item["labels"]["severity"]
    for group in rule["spec"]["groups"]:
        # The API writer's rules select its own scrape job, the others the dispatchers'.
        job = (
            "ci-webhook-dispatcher-api-writer"
            if group["name"].endswith("-writer")
            else ("ci-webhook-dispatcher")
        )
        for item in group["rules"]:
            assert f'job="{job}"' in item["expr"], item["expr"]
    alerts = {r["alert"] for r in rules}
    # The ci file turns notReady off; the defaults have all eight.
    assert alerts == {
        "WebhookDispatcherDeadLetters",
        "WebhookDispatcherInvalidSubscriptions",
        "WebhookDispatcherConsumerLagHigh",
        "WebhookDispatcherFailureRatioHigh",
        "WebhookDispatcherPartitionStuck",
        "WebhookDispatcherWebhooksAutoDisabled",
        "WebhookDispatcherNotificationsNotWritten",
    }


def test_all_alerts_by_default(tmp_path: Path) -> None:
    docs = render(REQUIRED, {"prometheusRule": {"enabled": True}}, tmp=tmp_path)
    rules = [r for g in one(docs, "PrometheusRule")["spec"]["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} == {
        "WebhookDispatcherDeadLetters",
        "WebhookDispatcherInvalidSubscriptions",
        "WebhookDispatcherConsumerLagHigh",
        "WebhookDispatcherFailureRatioHigh",
        "WebhookDispatcherPartitionStuck",
        "WebhookDispatcherNotReady",
        "WebhookDispatcherWebhooksAutoDisabled",
        "WebhookDispatcherNotificationsNotWritten",
    }
    lag = next(r for r in rules if r["alert"] == "WebhookDispatcherConsumerLagHigh")
    # Every input topic (an event catalog may name several); retry topics lag on purpose.
    assert r'topic!~"webhooks\\.retry\\..*"' in lag["expr"]
    invalid = next(r for r in rules if r["alert"] == "WebhookDispatcherInvalidSubscriptions")
    # Every pod counts the same records: the max over pods, not the sum.
    assert invalid["expr"].startswith("max by (namespace, job, reason) (")
    assert "increase(dispatcher_invalid_subscriptions_total{" in invalid["expr"]
    assert invalid["expr"].endswith("[15m])\n) > 0")


def test_dashboard_is_json_using_known_metrics() -> None:
    config_map = one(render_ci(CHART / "ci" / "dashboard-values.yaml"), "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    (text,) = config_map["data"].values()
    dashboard = json.loads(text)
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = set().union(*(metric_names(expr) for expr in exprs))
    assert used <= KNOWN_METRICS
    assert len(used) >= 10, f"the dashboard shows few metrics: {sorted(used)}"


# --- docker-compose.yml -----------------------------------------------------------


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())  # type: ignore[no-any-return]


def test_compose_file_matches_the_compose_specification() -> None:
    schema = json.loads(tool("schemas/compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(compose())
    ]
    assert not errors, "\n".join(errors)


def test_compose_services_are_wired_in_order() -> None:
    services = compose()["services"]
    assert re.fullmatch(r"apache/kafka:4\.1\.\d+", services["kafka"]["image"])
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", services["prometheus"]["image"])
    assert services["topics"]["command"] == ["topics", "ensure"]
    assert services["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert services["dispatcher"]["command"] == ["run"]
    assert (
        services["dispatcher"]["depends_on"]["topics"]["condition"]
        == "service_completed_successfully"
    )
    assert services["receiver"]["entrypoint"] == ["python", "-m", "dispatcher.sample_receiver"]
    options = services["receiver"]["command"][::2]
    assert options == ["--host", "--port", "--cert", "--key", "--secret-file"]
    # The secret is a file written by the one-shot `certs`, never an argument.
    secret_file = services["receiver"]["command"][-1]
    assert secret_file.startswith("/receiver-secret/")
    assert "/receiver-secret" in services["certs"]["command"][0]
    assert "receiver-secret:/receiver-secret:ro" in services["receiver"]["volumes"]
    assert "whsec_" not in json.dumps(services["receiver"])
    env = services["dispatcher"]["environment"]
    assert env["DISPATCHER_KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert (
        services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://kafka:9092"
    )
    grace = int(services["dispatcher"]["stop_grace_period"].removesuffix("s"))
    assert grace > Settings.model_fields["drain_timeout_s"].get_default()


def test_compose_runs_the_api_with_a_hashed_key() -> None:
    api = compose()["services"]["api"]
    assert api["command"] == ["api"]
    assert api["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    port = Settings.model_fields["api_port"].get_default()
    assert api["ports"] == [f"127.0.0.1:{port}:{port}"]
    env = api["environment"]
    assert env["DISPATCHER_KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    (entry,) = json.loads(env["DISPATCHER_API_KEYS"])
    assert entry["access"] == "read-write"
    # Only the hash is configured; it is the hash of the demo key the README names.
    demo_key = re.search(r"Bearer (bsk_[\w-]+)", COMPOSE_FILE.read_text())
    assert demo_key is not None
    assert entry["sha256"] == hashlib.sha256(demo_key.group(1).encode()).hexdigest()
    assert demo_key.group(1) not in json.dumps(api)
    assert demo_key.group(1) in (ROOT / "README.md").read_text()


def test_compose_keeps_traffic_inside_its_network() -> None:
    spec = compose()
    assert spec["networks"]["demo"]["internal"] is True
    for name, service in spec["services"].items():
        assert "network_mode" not in service, name
        assert "demo" in service["networks"], name
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())["scrape_configs"]
    (target,) = [sd for job in scrape for sd in job.get("dns_sd_configs", [])]
    assert target["names"] == ["dispatcher"]
    assert target["port"] == Settings.model_fields["http_port"].get_default()


# --- Dockerfile ------------------------------------------------------------------


def test_dockerfile_final_stage() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", text, flags=re.MULTILINE)
    final = stages[-1]
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, re.MULTILINE)
    assert final.startswith("${PYTHON_IMAGE}\n")
    assert "COPY --from=builder /opt/venv /opt/venv" in final
    assert re.search(r"^USER [1-9][0-9]*:[1-9][0-9]*$", final, re.MULTILINE)
    assert re.search(r"^EXPOSE 8080$", final, re.MULTILINE)
    assert re.search(r'^ENTRYPOINT \["dispatcher"\]$', final, re.MULTILINE)
    assert re.search(r'^CMD \["run"\]$', final, re.MULTILINE)
    assert re.search(r'CMD \["dispatcher", "check"\]', final)
    assert not re.search(r"\b(gcc|build-essential|apt-get install)\b", final)
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignored[ignored.index("*")] == "*", "the build context must be an allow-list"
