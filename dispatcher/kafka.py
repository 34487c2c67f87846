"""librdkafka configuration and the topic names that follow from the settings."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaException, Producer

from dispatcher.errors import KafkaSetupError
from dispatcher.settings import Settings

INPUT_STAGE = "input"

#: Where librdkafka's own log lines go; None leaves them on stderr as plain text,
#: which suits the one-shot commands but not the service's JSON logs.
_client_logger: logging.Logger | None = None


def send_client_logs_to(logger: logging.Logger | None) -> None:
    """Route the log lines of every Kafka client created from now on through ``logger``."""
    global _client_logger
    _client_logger = logger


def stage_name(delay_s: int) -> str:
    """A short name for a delay: 60 -> ``1m``, 1800 -> ``30m``, 7200 -> ``2h``, 5 -> ``5s``."""
    if delay_s % 3600 == 0:
        return f"{delay_s // 3600}h"
    if delay_s % 60 == 0:
        return f"{delay_s // 60}m"
    return f"{delay_s}s"


@dataclass(frozen=True, slots=True)
class RetryStage:
    """One delay topic: deliveries wait there until ``delay_s`` after they failed."""

    index: int
    name: str
    topic: str
    delay_s: int


def retry_stages(settings: Settings) -> list[RetryStage]:
    """The retry stages in order; their topic names derive from the delays."""
    return [
        RetryStage(i, stage_name(d), f"{settings.retry_topic_prefix}{stage_name(d)}", d)
        for i, d in enumerate(settings.retry_delays_s)
    ]


def common_config(settings: Settings) -> dict[str, Any]:
    """Connection and security properties shared by every client."""
    conf: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        "client.id": "webhook-dispatcher",
    }
    optional = {
        "security.protocol": settings.kafka_security_protocol,
        "sasl.mechanism": settings.kafka_sasl_mechanism,
        "sasl.username": settings.kafka_sasl_username,
        "sasl.password": settings.kafka_sasl_password,
        "ssl.ca.location": settings.kafka_ssl_ca_location,
        "ssl.certificate.location": settings.kafka_ssl_certificate_location,
        "ssl.key.location": settings.kafka_ssl_key_location,
    }
    conf.update({k: v for k, v in optional.items() if v})
    conf.update(settings.kafka_extra_config)
    if _client_logger is not None:
        conf["logger"] = _client_logger
    return conf


def producer_config(settings: Settings) -> dict[str, Any]:
    """An idempotent producer: acks=all, no duplicates or reordering on retry."""
    conf = common_config(settings)
    conf.update(
        {
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": "lz4",
        }
    )
    # Operators may tune batching, never weaken durability.
    for key, value in settings.kafka_extra_config.items():
        if key not in ("enable.idempotence", "acks"):
            conf[key] = value
    return conf


def consumer_config(settings: Settings, group_id: str) -> dict[str, Any]:
    """A group consumer that stores offsets only for finished work."""
    conf = common_config(settings)
    conf.update(
        {
            "group.id": group_id,
            "enable.auto.commit": True,
            # Stored offsets reach the broker within 0.2 s: what a kill -9 leaves
            # uncommitted (and a restart sends again) stays near the in-flight window.
            # librdkafka commits only when a stored offset moved.
            "auto.commit.interval.ms": 200,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "cooperative-sticky",
            "enable.partition.eof": False,
            # Bounds librdkafka's prefetch so memory follows the in-flight limits.
            # 2 MB fetches still feed a stage thousands of records a second; with
            # 8 MB each, a 100,000-event backlog behind a stalled endpoint peaked
            # at 230-265 MB RSS instead of 180-190 MB (bench/, memory phase).
            "queued.max.messages.kbytes": 2048,
            "fetch.max.bytes": 2 * 1024 * 1024,
            "session.timeout.ms": settings.session_timeout_s * 1000,
        }
    )
    if settings.group_instance_id:
        # Static membership: a member rejoining under the same id gets its
        # partitions back without a rebalance, instead of waiting for the session
        # of its dead predecessor to time out. Each stage has its own group, so
        # one id serves all of them.
        conf["group.instance.id"] = settings.group_instance_id
    conf.update(settings.kafka_extra_config)
    conf.update(settings.kafka_consumer_extra_config)
    return conf


def table_consumer_config(settings: Settings) -> dict[str, Any]:
    """A private reader of a whole topic: unique group, never commits."""
    conf = common_config(settings)
    conf.update(
        {
            "group.id": f"{settings.group_id}.reader.{uuid.uuid4().hex[:12]}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
        }
    )
    conf.update(settings.kafka_extra_config)
    return conf


def make_producer(settings: Settings) -> Producer:
    try:
        return Producer(producer_config(settings))
    except KafkaException as exc:
        raise KafkaSetupError(f"cannot create a Kafka producer: {exc}") from None


def make_consumer(settings: Settings, group_id: str) -> Consumer:
    try:
        return Consumer(consumer_config(settings, group_id))
    except KafkaException as exc:
        raise KafkaSetupError(f"cannot create a Kafka consumer: {exc}") from None


def flush_or_fail(producer: Producer, timeout_s: float, what: str) -> None:
    """Flush, and fail loudly if anything is still unsent."""
    left = producer.flush(timeout_s)
    if left:
        raise KafkaSetupError(
            f"{left} {what} record(s) not acknowledged by Kafka within {timeout_s:.0f} s; "
            f"check DISPATCHER_KAFKA_BOOTSTRAP_SERVERS ({producer_bootstrap_hint(producer)})"
        )


def producer_bootstrap_hint(producer: Producer) -> str:
    try:
        meta = producer.list_topics(timeout=1)
        return f"{len(meta.brokers)} broker(s) reachable"
    except KafkaException:
        return "no broker reachable"
