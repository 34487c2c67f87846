"""`dispatcher topics ensure` against the real broker."""

from __future__ import annotations

import subprocess
import sys

from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from dispatcher.commands.topics import ensure_topics, topic_specs
from dispatcher.settings import Settings
from tests.support import BOOTSTRAP, Namespace, namespace_settings, to_env


def ensure(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dispatcher.commands.cli", "topics", "ensure"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def base_env(values: dict[str, object]) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    env.update(to_env(values))
    return env


def test_ensure_creates_everything_then_is_idempotent(broker: str) -> None:
    values = namespace_settings()
    env = base_env(values)
    first = ensure(env)
    assert first.returncode == 0, first.stderr
    created = [line.split()[1] for line in first.stdout.splitlines() if line.startswith("created")]
    # input, subscriptions, 3 retry stages, dead letter, invalid, attempts, organizations,
    # idempotency, health, notifications, backlog
    assert len(created) == 13
    second = ensure(env)
    assert second.returncode == 0, second.stderr
    assert "created" not in second.stdout
    assert sorted(line.split()[1] for line in second.stdout.splitlines()) == sorted(created)

    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    sub_topic = str(values["subscriptions_topic"])
    resource = ConfigResource(ConfigResource.Type.TOPIC, sub_topic)
    configs = admin.describe_configs([resource])[resource].result()
    assert configs["cleanup.policy"].value == "compact"
    retry = f"{values['retry_topic_prefix']}2s"
    resource = ConfigResource(ConfigResource.Type.TOPIC, retry)
    configs = admin.describe_configs([resource])[resource].result()
    assert configs["retention.ms"].value == str(values["retry_retention_ms"])
    resource = ConfigResource(ConfigResource.Type.TOPIC, str(values["attempts_topic"]))
    configs = admin.describe_configs([resource])[resource].result()
    assert configs["cleanup.policy"].value == "delete"
    assert configs["retention.ms"].value == str(14 * 86_400_000)
    resource = ConfigResource(ConfigResource.Type.TOPIC, str(values["organizations_topic"]))
    configs = admin.describe_configs([resource])[resource].result()
    assert configs["cleanup.policy"].value == "compact"
    resource = ConfigResource(ConfigResource.Type.TOPIC, str(values["idempotency_topic"]))
    configs = admin.describe_configs([resource])[resource].result()
    assert configs["cleanup.policy"].value == "compact,delete"
    assert configs["retention.ms"].value == str(86_400 * 1000)
    resource = ConfigResource(ConfigResource.Type.TOPIC, str(values["health_topic"]))
    configs = admin.describe_configs([resource])[resource].result()
    assert configs["cleanup.policy"].value == "compact"
    resource = ConfigResource(ConfigResource.Type.TOPIC, str(values["notifications_topic"]))
    configs = admin.describe_configs([resource])[resource].result()
    assert configs["cleanup.policy"].value == "delete"
    assert configs["retention.ms"].value == str(30 * 86_400_000)
    resource = ConfigResource(ConfigResource.Type.TOPIC, str(values["backlog_topic"]))
    configs = admin.describe_configs([resource])[resource].result()
    assert configs["cleanup.policy"].value == "compact,delete"
    assert configs["retention.ms"].value == str(86_400_000)


def test_ensure_reports_a_non_compacted_subscriptions_topic(broker: str) -> None:
    values = namespace_settings()
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    topic = str(values["subscriptions_topic"])
    futures = admin.create_topics(
        [
            NewTopic(
                topic, num_partitions=1, replication_factor=1, config={"cleanup.policy": "delete"}
            )
        ]
    )
    futures[topic].result()
    done = ensure(base_env(values))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert topic in done.stderr and "cleanup.policy=delete (expected compact)" in done.stderr


def test_ensure_with_unreachable_broker_is_one_clear_line() -> None:
    values = namespace_settings(kafka_bootstrap_servers="127.0.0.1:1")
    env = base_env(values)
    env["DISPATCHER_KAFKA_EXTRA_CONFIG"] = '{"socket.connection.setup.timeout.ms": "1000"}'
    done = subprocess.run(
        [sys.executable, "-m", "dispatcher.commands.cli", "topics", "ensure"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert "cannot reach Kafka at 127.0.0.1:1" in done.stderr


def test_namespace_helper_uses_real_topics(broker: str) -> None:
    ns = Namespace()
    assert ns.read_all(ns.settings.input_topic) == []


def test_ensure_returns_once_every_created_partition_has_a_leader(broker: str) -> None:
    settings = Settings(**namespace_settings())
    report = ensure_topics(settings)
    try:
        assert not report.problems, report.problems
        assert report.created == [spec.name for spec in topic_specs(settings)]
        # Asked right away, with a client of its own: no created partition lacks a leader.
        meta = AdminClient({"bootstrap.servers": BOOTSTRAP}).list_topics(timeout=10)
        for name in report.created:
            partitions = meta.topics[name].partitions
            assert len(partitions) == settings.topic_partitions
            assert all(p.leader >= 0 and p.error is None for p in partitions.values()), name
    finally:
        Namespace.drop(settings)
