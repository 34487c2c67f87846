"""librdkafka configuration and the topic names that follow from the settings."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer

from dispatcher.errors import ConfigError, DispatcherError, KafkaSetupError
from dispatcher.settings import Settings

PRODUCER_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
#: The longest wait between two attempts to reach a broker that went away.
RECONNECT_BACKOFF_MAX_MS = 1000

#: Where librdkafka's own log lines go; None leaves them on stderr as plain text,
#: which suits the one-shot commands but not the service's JSON logs.
_client_logger: logging.Logger | None = None


def send_client_logs_to(logger: logging.Logger | None) -> None:
    """Route the log lines of every Kafka client created from now on through ``logger``."""
    global _client_logger
    _client_logger = logger


def common_config(settings: Settings) -> dict[str, Any]:
    """Connection and security properties shared by every client."""
    conf: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        "client.id": "webhook-dispatcher",
        # librdkafka doubles the wait between attempts to reach a broker up to this
        # (10 s by default): a broker back from an outage was then reached up to
        # 10 s late by each client, and a group consumer that had lost its session
        # in the meantime rejoined later still. 1 s costs one connection attempt
        # a second per client while the broker is away.
        "reconnect.backoff.max.ms": RECONNECT_BACKOFF_MAX_MS,
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
            # The client's own limit (1,000,000 bytes by default) is below the
            # broker's (1 MiB + 12): an input message the broker accepted must be
            # writable, headers added, to the invalid-events topic; the broker's
            # limit is the one that counts.
            "message.max.bytes": PRODUCER_MAX_MESSAGE_BYTES,
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
    # librdkafka's default, set after the operator's properties so it cannot be
    # weakened: a change of the configuration topics is seen whole or not at all.
    conf["isolation.level"] = "read_committed"
    return conf


def writer_producer_config(settings: Settings) -> dict[str, Any]:
    """The transactional producer of the one configuration writer.

    Every holder of the role uses the same ``transactional.id``: the
    ``init_transactions`` of a new holder aborts what the previous one left open
    and fences it (its next commit fails), so two processes can never both write.
    """
    conf = producer_config(settings)
    conf["transactional.id"] = settings.config_writer_id
    # Far above any one change (a few records), far below the broker's limit:
    # an open transaction holds every read_committed reader back until it ends.
    conf["transaction.timeout.ms"] = 30_000
    conf["linger.ms"] = 0
    return conf


def make_producer(settings: Settings, extra: dict[str, Any] | None = None) -> Producer:
    """A producer; ``extra`` adds properties (callbacks) after the settings'."""
    conf = producer_config(settings)
    conf.update(extra or {})
    return make_producer_from(conf)


def make_producer_from(conf: dict[str, Any]) -> Producer:
    """A producer from a configuration; one line for one librdkafka refused."""
    try:
        return Producer(conf)
    except KafkaException as exc:
        raise client_error(exc, conf, "producer") from None


def make_consumer(
    settings: Settings, group_id: str, extra: dict[str, Any] | None = None
) -> Consumer:
    """A group consumer; ``extra`` adds properties (callbacks) after the settings'."""
    conf = consumer_config(settings, group_id)
    conf.update(extra or {})
    try:
        return Consumer(conf)
    except KafkaException as exc:
        raise client_error(exc, conf, "consumer") from None


def close_aside(client: Consumer | Producer, name: str) -> threading.Thread:
    """Close a client given up on, on a thread of its own (its close may wait on the
    broker). What it raises then (fenced by its successor, say) helps nobody: dropped."""

    def close() -> None:
        with contextlib.suppress(KafkaException):
            client.close()

    thread = threading.Thread(target=close, name=name, daemon=True)
    thread.start()
    return thread


def make_table_consumer(settings: Settings) -> Consumer:
    conf = table_consumer_config(settings)
    try:
        return Consumer(conf)
    except KafkaException as exc:
        raise client_error(exc, conf, "consumer") from None


def check_client_config(settings: Settings) -> None:
    """Create (and drop) each kind of client once, so a bad property fails in one line now.

    librdkafka checks its properties only when a client is created; the service
    creates some of its clients in background threads, where a bad one would
    surface late and wrapped.
    """
    make_producer(settings)
    make_consumer(settings, settings.group_id).close()
    make_table_consumer(settings).close()


def client_error(exc: KafkaException, conf: dict[str, Any], what: str) -> DispatcherError:
    """One line for a client librdkafka refused to create; credentials never quoted.

    An invalid argument (unknown property, bad value, unreadable certificate
    file) is a setting to fix (exit 2); anything else is the environment (exit 1).
    """
    err = exc.args[0] if exc.args else None
    text = err.str() if isinstance(err, KafkaError) else str(exc)
    for key, value in conf.items():
        if _is_secret(key) and isinstance(value, str) and value:
            text = text.replace(value, "***")
    missing = [
        f"{key} file {value} does not exist"
        for key, value in conf.items()
        if key.endswith(".location") and isinstance(value, str) and not os.path.exists(value)
    ]
    message = f"cannot create a Kafka {what}: {'; '.join(missing) or text}"
    if isinstance(err, KafkaError) and err.code() == KafkaError._INVALID_ARG:
        return ConfigError(
            f"{message} (check DISPATCHER_KAFKA_* settings and DISPATCHER_KAFKA_EXTRA_CONFIG)"
        )
    return KafkaSetupError(message)


def _is_secret(key: str) -> bool:
    return any(word in key for word in ("password", "secret", "sasl.oauthbearer", ".pem"))


def check_topic(
    client: Consumer | Producer, settings: Settings, topic: str, timeout_s: float
) -> Any:
    """The topic's metadata, or one line saying the broker or the topic is missing."""
    try:
        meta = client.list_topics(topic, timeout=timeout_s)
    except KafkaException as exc:
        raise KafkaSetupError(
            f"cannot reach Kafka at {settings.kafka_bootstrap_servers}: {describe(exc)}"
        ) from None
    tmeta = meta.topics.get(topic)
    error = None if tmeta is None else tmeta.error
    if error is not None and error.code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
        raise KafkaSetupError(f"cannot read topic {topic}: {error.str()}")
    if tmeta is None or error is not None or not tmeta.partitions:
        raise KafkaSetupError(f"topic {topic} does not exist; run `dispatcher topics ensure` first")
    return tmeta


def describe(exc: KafkaException) -> str:
    err = exc.args[0] if exc.args else None
    return err.str() if isinstance(err, KafkaError) else str(exc)


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One record to produce."""

    topic: str
    value: bytes | None
    key: bytes | None
    headers: list[tuple[str, str | bytes | None]] = field(default_factory=list)


def produce_confirmed(
    producer: Producer, records: Sequence[Outgoing], timeout_s: float, what: str
) -> dict[int, str]:
    """Produce and wait for every delivery report; the failed ones' errors by index.

    A record the client refuses outright (too large, say) counts as failed; a
    report that does not arrive within ``timeout_s`` fails the whole call.
    """
    errors: dict[int, str] = {}

    def reporter(index: int) -> Callable[[KafkaError | None, Message], None]:
        def report(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                errors[index] = err.str()

        return report

    for index, out in enumerate(records):
        while True:
            try:
                producer.produce(
                    out.topic, out.value, out.key, headers=out.headers, on_delivery=reporter(index)
                )
                break
            except BufferError:
                producer.poll(0.1)  # local queue full: let some go first
            except KafkaException as exc:
                errors[index] = describe(exc)
                break
    flush_or_fail(producer, timeout_s, what)
    return errors


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
