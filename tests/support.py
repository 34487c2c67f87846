"""Shared helpers of the integration tests: namespaces, processes, waiting.

Every test gets topics and consumer groups of its own (a random prefix), so the
tests share one real broker without seeing each other's records.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource

from dispatcher.commands.subscriptions import write
from dispatcher.commands.topics import ensure_topics, topic_specs
from dispatcher.kafka import table_consumer_config
from dispatcher.models import Subscription
from dispatcher.settings import Settings
from dispatcher.stages import retry_stages

BOOTSTRAP = os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092")
SEED_EVENT: dict[str, Any] = json.loads(
    (Path(__file__).parent / "data" / "seed-event.json").read_text()
)
REPO = Path(__file__).resolve().parent.parent

T = TypeVar("T")


def wait_until(check: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.05) -> T:
    """Poll ``check`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


def most_in_any_window(times: list[float], window_s: float) -> int:
    """The largest number of ``times`` in any half-open window [t, t + window_s)."""
    times = sorted(times)
    most = j = 0
    for i, t in enumerate(times):
        while times[j] <= t - window_s:
            j += 1
        most = max(most, i - j + 1)
    return most


#: What a retry record carries besides its JSON value, each exactly once.
ROUTING_HEADERS = frozenset(
    {
        "dispatcher-due-ms",
        "dispatcher-attempt",
        "dispatcher-delivery-id",
        "dispatcher-webhook-id",
        "dispatcher-source",
        "dispatcher-first-failure-ms",
        "dispatcher-last-error",
    }
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def namespace_settings(**overrides: Any) -> dict[str, Any]:
    """Setting values for one test: its own topics and groups on the shared broker."""
    ns = f"t{uuid.uuid4().hex[:10]}"
    values: dict[str, Any] = {
        "kafka_bootstrap_servers": BOOTSTRAP,
        "group_id": f"{ns}.dispatcher",
        "input_topic": f"{ns}.visitor.identified",
        "subscriptions_topic": f"{ns}.webhooks.subscriptions",
        "retry_topic_prefix": f"{ns}.webhooks.retry.",
        "dead_letter_topic": f"{ns}.webhooks.dead-letter",
        "invalid_topic": f"{ns}.webhooks.invalid",
        "attempts_topic": f"{ns}.webhooks.attempts",
        "organizations_topic": f"{ns}.webhooks.organizations",
        "idempotency_topic": f"{ns}.webhooks.idempotency",
        "health_topic": f"{ns}.webhooks.health",
        "notifications_topic": f"{ns}.webhooks.notifications",
        "backlog_topic": f"{ns}.webhooks.backlog",
        "topic_partitions": 3,
        "retry_delays_s": [2, 4, 6],
        "retry_retention_ms": 3_600_000,
        "allowed_networks": ["127.0.0.0/8", "::1/128"],
        "http_timeout_s": 5.0,
        "http_port": free_port(),
        "drain_timeout_s": 10.0,
        "log_level": "INFO",
        # The broker's minimum: a killed instance's partitions move on quickly.
        "kafka_consumer_extra_config": {
            "session.timeout.ms": "6000",
            "heartbeat.interval.ms": "1000",
        },
    }
    values.update(overrides)
    return values


def to_env(values: dict[str, Any]) -> dict[str, str]:
    env = {}
    for key, value in values.items():
        if isinstance(value, list | dict):
            env[f"DISPATCHER_{key.upper()}"] = json.dumps(value)
        else:
            env[f"DISPATCHER_{key.upper()}"] = str(value)
    return env


def wait_for_leaders(settings: Settings, timeout_s: float = 30.0) -> None:
    """Wait until every partition of the settings' topics has a leader.

    Right after creation a broker can still answer NOT_LEADER_FOR_PARTITION, and a
    test acting at that instant would fail for reasons that are not its own.
    """
    topics = [
        settings.input_topic,
        settings.subscriptions_topic,
        settings.dead_letter_topic,
        settings.invalid_topic,
        *(stage.topic for stage in retry_stages(settings)),
    ]
    consumer = Consumer(table_consumer_config(settings))

    def ready() -> bool:
        try:
            meta = consumer.list_topics(timeout=5)
            for topic in topics:
                for p in meta.topics[topic].partitions:
                    consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=5)
        except (KafkaException, KeyError):
            return False
        return True

    try:
        wait_until(ready, timeout_s, "the topics to have leaders", interval_s=0.2)
    finally:
        consumer.close()


class Namespace:
    """One test's settings, topics and helpers to write and read them."""

    def __init__(self, **overrides: Any) -> None:
        self.values = namespace_settings(**overrides)
        self.settings = Settings(**self.values)
        report = ensure_topics(self.settings)
        assert not report.problems, report.problems
        wait_for_leaders(self.settings)
        self.bootstrap = self.settings.kafka_bootstrap_servers
        self._producer = Producer({"bootstrap.servers": self.bootstrap, "enable.idempotence": True})

    def drop_topics(self) -> None:
        """Delete this namespace's topics (best effort, at the end of a test)."""
        self.drop(self.settings)

    @staticmethod
    def drop(settings: Settings) -> None:
        """Delete the topics of ``settings`` (best effort)."""
        admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
        topics = [spec.name for spec in topic_specs(settings)]
        for future in admin.delete_topics(topics, operation_timeout=10).values():
            with contextlib.suppress(KafkaException):
                future.result(timeout=15)

    def env(self, **extra: Any) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
        base.update(to_env({**self.values, **extra}))
        return base

    def subscribe(
        self,
        url: str,
        *,
        organization_id: str = "org_abc123",
        webhook_id: str | None = None,
        secret: str | None = None,
        events: Iterable[str] = ("visitor.identified",),
        enabled: bool = True,
        plan: str = "scale",
    ) -> Subscription:
        now = datetime.now(UTC)
        sub = Subscription(
            webhook_id=webhook_id or f"wh_{uuid.uuid4().hex[:12]}",
            organization_id=organization_id,
            url=url,
            events=tuple(events),
            secret=secret,
            enabled=enabled,
            plan=plan,
            created_at=now,
            updated_at=now,
        )
        write(self.settings, sub.webhook_id, sub)
        return sub

    def delete(self, webhook_id: str) -> None:
        write(self.settings, webhook_id, None)

    def publish(self, *events: dict[str, Any] | bytes, key: bytes | None = None) -> None:
        for event in events:
            value = event if isinstance(event, bytes) else json.dumps(event).encode()
            self._producer.produce(self.settings.input_topic, value, key)
        assert self._producer.flush(30) == 0

    def read_all(self, topic: str, timeout_s: float = 10.0) -> list[Any]:
        """Every record of ``topic`` now (all partitions, from the beginning)."""
        consumer = Consumer(table_consumer_config(self.settings))
        try:
            meta = consumer.list_topics(topic, timeout=10).topics[topic]
            ends = {}
            parts = []
            for p in meta.partitions:
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                if high > low:
                    ends[p] = high
                    parts.append(TopicPartition(topic, p, low))
            if not parts:
                return []
            consumer.assign(parts)
            out = []
            deadline = time.monotonic() + timeout_s
            while ends and time.monotonic() < deadline:
                for msg in consumer.consume(500, timeout=0.2):
                    # The end of a partition is its EOF event: a transaction's commit
                    # marker takes the last offset and is never delivered as a record.
                    if msg.error():
                        eof = msg.error().code() == KafkaError._PARTITION_EOF
                        if eof and msg.offset() >= ends.get(msg.partition(), 0):
                            ends.pop(msg.partition(), None)
                        continue
                    out.append(msg)
                    if msg.offset() + 1 >= ends.get(msg.partition(), 0):
                        ends.pop(msg.partition(), None)
            assert not ends, f"could not read {topic} to its end"
            return out
        finally:
            consumer.close()


class DispatcherProcess:
    """``dispatcher run`` as a real child process, with its logs kept in a file."""

    def __init__(self, ns: Namespace, log_path: Path, **extra: Any) -> None:
        self.ns = ns
        self.log_path = log_path
        self.port = int(extra.pop("http_port", ns.values["http_port"]))
        self._env = ns.env(http_port=self.port, **extra)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True) -> DispatcherProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dispatcher.commands.cli", "run"],
            env=self._env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        log.close()
        if wait_ready:
            self.wait_ready()
        return self

    def readyz(self) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError as exc:
            return 0, str(exc)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"dispatcher exited early:\n{self.logs()[-3000:]}")
            return self.readyz()[0] == 200

        wait_until(ready, timeout_s, "the dispatcher to be ready")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def terminate(self, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            total += float(value)
    return total


def limit_record_size(topic: str, max_bytes: int) -> None:
    """Set the topic's ``max.message.bytes``: the broker then refuses larger records."""
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    entry = ConfigEntry(
        "max.message.bytes", str(max_bytes), incremental_operation=AlterConfigOpType.SET
    )
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic, incremental_configs=[entry])
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(timeout=30)

    # The controller answers once the change is committed; the broker applies it to
    # the topic a moment later, from the metadata log. Until its own view shows it,
    # a record it should refuse may still be taken.
    def applied() -> bool:
        asked = ConfigResource(ConfigResource.Type.TOPIC, topic)
        for future in admin.describe_configs([asked]).values():
            entries = future.result(timeout=30)
            if entries["max.message.bytes"].value != str(max_bytes):
                return False
        return True

    wait_until(applied, 30, f"max.message.bytes={max_bytes} on {topic}", interval_s=0.05)
