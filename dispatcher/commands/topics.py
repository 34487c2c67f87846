"""``dispatcher topics ensure``: create the topics, or say what is wrong with them."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from dispatcher.catalog import load_catalog
from dispatcher.errors import ConfigError, KafkaSetupError
from dispatcher.kafka import client_error, common_config
from dispatcher.settings import Settings
from dispatcher.stages import retry_stages


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """A topic as the dispatcher needs it; ``configs`` are checked on existing topics."""

    name: str
    role: str
    partitions: int
    configs: dict[str, str] = field(default_factory=dict)


def topic_specs(settings: Settings) -> list[TopicSpec]:
    """Every topic the dispatcher reads or writes, with the configs it relies on."""
    longest_ms = max(settings.retry_delays_s) * 1000
    if 0 <= settings.retry_retention_ms <= longest_ms * 2:
        raise ConfigError(
            "DISPATCHER_RETRY_RETENTION_MS must be far longer than the longest retry delay "
            f"({longest_ms} ms); got {settings.retry_retention_ms}"
        )
    n = settings.topic_partitions

    def deleting(retention_ms: int) -> dict[str, str]:
        return {"cleanup.policy": "delete", "retention.ms": str(retention_ms)}

    inputs = dict.fromkeys(t.input_topic for t in load_catalog(settings))
    specs = [
        TopicSpec(topic, "input events", n, deleting(settings.input_retention_ms))
        for topic in inputs
    ]
    specs += [
        TopicSpec(
            settings.subscriptions_topic,
            "subscriptions table",
            n,
            {"cleanup.policy": "compact"},
        ),
    ]
    specs += [
        TopicSpec(
            stage.topic, f"retry after {stage.name}", n, deleting(settings.retry_retention_ms)
        )
        for stage in retry_stages(settings)
    ]
    specs += [
        TopicSpec(
            settings.dead_letter_topic,
            "dead letters",
            n,
            deleting(settings.dead_letter_retention_ms),
        ),
        TopicSpec(
            settings.invalid_topic, "invalid events", n, deleting(settings.invalid_retention_ms)
        ),
        TopicSpec(
            settings.attempts_topic,
            "delivery attempts",
            n,
            deleting(settings.attempts_retention_ms),
        ),
        TopicSpec(
            settings.organizations_topic,
            "organizations' plans",
            n,
            {"cleanup.policy": "compact"},
        ),
        TopicSpec(
            settings.idempotency_topic,
            "answers to keyed creates",
            n,
            # Compacted (one answer per key) and deleted after the TTL (older
            # answers are ignored by readers anyway; this bounds the topic).
            {
                "cleanup.policy": "compact,delete",
                "retention.ms": str(settings.api_idempotency_ttl_s * 1000),
            },
        ),
        TopicSpec(settings.health_topic, "webhooks' health", n, {"cleanup.policy": "compact"}),
        TopicSpec(
            settings.backlog_topic,
            "webhooks' backlogs",
            n,
            # One key per instance; deleted too, so stopped instances' keys go away.
            {
                "cleanup.policy": "compact,delete",
                "retention.ms": str(settings.backlog_retention_ms),
            },
        ),
        TopicSpec(
            settings.notifications_topic,
            "health events",
            n,
            deleting(settings.notifications_retention_ms),
        ),
    ]
    names = [spec.name for spec in specs]
    clash = sorted({name for name in names if names.count(name) > 1})
    if clash:
        raise ConfigError(f"a catalog input topic is also another dispatcher topic: {clash[0]}")
    return specs


@dataclass(slots=True)
class EnsureReport:
    created: list[str] = field(default_factory=list)
    ok: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def ensure_topics(settings: Settings, timeout_s: float = 30.0) -> EnsureReport:
    """Create missing topics and check the configuration of existing ones."""
    conf = common_config(settings)
    down: list[str] = []

    def on_error(err: KafkaError) -> None:
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            down.append(err.str())

    conf["error_cb"] = on_error
    try:
        admin = AdminClient(conf)
    except KafkaException as exc:
        raise client_error(exc, conf, "admin client") from None
    specs = topic_specs(settings)
    existing = _reach(admin, settings, min(timeout_s, 10.0), down)

    report = EnsureReport()
    missing = [s for s in specs if s.name not in existing]
    if missing:
        futures = admin.create_topics(
            [
                NewTopic(
                    s.name,
                    num_partitions=s.partitions,
                    replication_factor=settings.topic_replication_factor,
                    config=s.configs,
                )
                for s in missing
            ],
            request_timeout=timeout_s,
        )
        for name, future in futures.items():
            try:
                future.result()
                report.created.append(name)
            except KafkaException as exc:
                err = exc.args[0]
                if err.name() == "TOPIC_ALREADY_EXISTS":
                    report.ok.append(name)
                else:
                    report.problems.append(f"{name}: cannot create: {err.str()}")

    if report.created:
        _wait_for_leaders(admin, report, timeout_s)
    present = [s for s in specs if s.name in existing]
    if present:
        _check_existing(admin, present, existing, report, timeout_s)
    return report


#: How long every broker may refuse connections before `ensure` gives up: long
#: enough for a broker that is starting, short enough that a wrong address is one
#: clear line at once rather than after the whole timeout.
_ALL_DOWN_GRACE_S = 2.0


def _reach(
    admin: AdminClient, settings: Settings, timeout_s: float, down: list[str]
) -> dict[str, Any]:
    """The cluster's topics; one line naming the broker when it cannot be reached."""
    started = time.monotonic()
    while True:
        left = timeout_s - (time.monotonic() - started)
        try:
            return dict(admin.list_topics(timeout=max(min(left, 1.0), 0.1)).topics)
        except KafkaException as exc:
            admin.poll(0)  # serves the error callback
            given_up = down and time.monotonic() - started >= _ALL_DOWN_GRACE_S
            if left <= 1.0 or given_up:
                raise KafkaSetupError(
                    f"cannot reach Kafka at {settings.kafka_bootstrap_servers}: {exc.args[0]}"
                ) from None


def _wait_for_leaders(admin: AdminClient, report: EnsureReport, timeout_s: float) -> None:
    """Return once every partition of the created topics has a leader.

    Right after creation a broker can still answer "Not leader for partition" to a
    write; a ``subscriptions put`` right after ``topics ensure`` must not.
    """
    deadline = time.monotonic() + timeout_s
    waiting = set(report.created)
    while waiting:
        try:
            topics = admin.list_topics(timeout=5).topics
        except KafkaException:
            topics = {}
        for name in list(waiting):
            meta = topics.get(name)
            if meta is None or meta.error is not None or not meta.partitions:
                continue
            if all(p.leader >= 0 and p.error is None for p in meta.partitions.values()):
                waiting.discard(name)
        if not waiting:
            return
        if time.monotonic() > deadline:
            for name in sorted(waiting):
                report.problems.append(
                    f"{name}: created, but its partitions have no leader after {timeout_s:.0f} s"
                )
            return
        time.sleep(0.1)


def _check_existing(
    admin: AdminClient,
    specs: list[TopicSpec],
    existing: Mapping[str, object],
    report: EnsureReport,
    timeout_s: float,
) -> None:
    resources = [ConfigResource(ConfigResource.Type.TOPIC, s.name) for s in specs]
    futures = admin.describe_configs(resources, request_timeout=timeout_s)
    by_name = {res.name: fut for res, fut in futures.items()}
    for spec in specs:
        try:
            actual = by_name[spec.name].result()
        except KafkaException as exc:
            report.problems.append(f"{spec.name}: cannot read its configuration: {exc.args[0]}")
            continue
        wrong = []
        for key, wanted in spec.configs.items():
            have = actual[key].value if key in actual else None
            if have != wanted:
                wrong.append(f"{key}={have} (expected {wanted})")
        if wrong:
            report.problems.append(
                f"{spec.name} ({spec.role}): "
                + ", ".join(wrong)
                + "; fix the topic with kafka-configs --alter, or change the settings"
            )
        else:
            report.ok.append(spec.name)
        meta = existing[spec.name]
        partitions = len(getattr(meta, "partitions", {}))
        if partitions != spec.partitions:
            report.notes.append(
                f"{spec.name} has {partitions} partitions "
                f"(DISPATCHER_TOPIC_PARTITIONS is {spec.partitions}); left as it is"
            )
