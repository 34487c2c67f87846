"""Operator settings, read from ``DISPATCHER_*`` environment variables.

Every field here is documented in the README's settings table; a test keeps the
two in step. A bad value stops start-up with one line naming the variable
(:func:`load_settings`), never a traceback.
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from dispatcher.errors import ConfigError

ENV_PREFIX = "DISPATCHER_"
_KAFKA_NAME = re.compile(r"[a-zA-Z0-9._-]+")


#: Settings whose values may hold credentials: never quoted in an error.
SECRET_SETTINGS = frozenset(
    {"kafka_sasl_password", "kafka_extra_config", "kafka_consumer_extra_config"}
)


def _json(text: str, what: str) -> Any:
    """Decode a JSON setting; any failure (nesting too deep included) is a ValueError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"not a valid JSON {what}: nested too deeply") from None
    except ValueError as exc:
        raise ValueError(f"not a valid JSON {what}: {exc}") from None


def _split_list(value: Any) -> Any:
    """Accept a JSON list or a comma-separated string from the environment."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return _json(text, "list")
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """All settings of the dispatcher; field names map to ``DISPATCHER_<NAME>``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", frozen=True, validate_default=True
    )

    # --- Kafka connection -------------------------------------------------
    kafka_bootstrap_servers: str = Field(
        "127.0.0.1:9092", description="Kafka bootstrap servers, comma-separated."
    )
    kafka_security_protocol: str | None = Field(
        None, description="librdkafka `security.protocol` (PLAINTEXT, SSL, SASL_SSL, ...)."
    )
    kafka_sasl_mechanism: str | None = Field(
        None, description="librdkafka `sasl.mechanism` (PLAIN, SCRAM-SHA-512, ...)."
    )
    kafka_sasl_username: str | None = Field(None, description="SASL user name.")
    kafka_sasl_password: str | None = Field(None, description="SASL password.")
    kafka_ssl_ca_location: str | None = Field(
        None, description="CA bundle file for the Kafka brokers' TLS certificates."
    )
    kafka_ssl_certificate_location: str | None = Field(
        None, description="Client certificate file for mutual TLS to Kafka."
    )
    kafka_ssl_key_location: str | None = Field(
        None, description="Client private key file for mutual TLS to Kafka."
    )
    kafka_extra_config: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description="Extra librdkafka properties as a JSON object, passed through as is.",
    )
    kafka_consumer_extra_config: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description="Extra librdkafka properties for the group consumers only, as JSON.",
    )
    group_id: str = Field(
        "webhook-dispatcher",
        description="Consumer group id; each retry stage uses `<group_id>.<stage>`. "
        "A new group id starts at the earliest retained input offset, re-delivering up to "
        "the input retention (7 d) of events: see `dispatcher group start-at-end`.",
    )
    group_instance_id: str | None = Field(
        None,
        description="Static group membership: this instance's `group.instance.id`, stable "
        "across restarts (the chart uses the pod name), so a restarted instance takes its "
        "partitions back at once. Unset: dynamic membership.",
    )
    # 6 s is the broker's default minimum; above 300 s librdkafka would refuse it
    # unless max.poll.interval.ms (300 s) were raised too. 10 s, not librdkafka's
    # 45 s: a dynamic member whose broker was away for longer than its session
    # rejoins under a new member id, and the broker holds that rebalance until the
    # old id's session, restarted when the broker came back, has expired: the
    # session timeout is the wait before deliveries resume (README, "Broker outages").
    session_timeout_s: int = Field(
        10,
        ge=6,
        le=300,
        description="Kafka group session timeout: how long the partitions of a member "
        "that stopped answering wait for it before the group rebalances; with dynamic "
        "membership, also about how long deliveries wait after a broker outage longer "
        "than it.",
    )

    # --- Topics -----------------------------------------------------------
    input_topic: str = Field(
        "visitor.identified",
        description="Topic of incoming `visitor.identified` events when no event catalog "
        "file is set (the catalog names each type's input topic).",
    )
    subscriptions_topic: str = Field(
        "webhooks.subscriptions", description="Compacted topic holding the subscriptions."
    )
    retry_topic_prefix: str = Field(
        "webhooks.retry.", description="Prefix of the retry topics (`<prefix>1m`, ...)."
    )
    retry_delays_s: Annotated[list[int], NoDecode] = Field(
        default_factory=lambda: [60, 300, 1800],
        description="Delay of each retry stage in seconds; one retry topic per delay.",
    )
    dead_letter_topic: str = Field(
        "webhooks.dead-letter", description="Topic of deliveries that failed every attempt."
    )
    invalid_topic: str = Field(
        "webhooks.invalid", description="Topic of input messages that are not valid events."
    )
    topic_partitions: int = Field(
        12, ge=1, le=10000, description="Partitions of each topic that `topics ensure` creates."
    )
    topic_replication_factor: int = Field(
        -1, ge=-1, le=32, description="Replication factor for new topics; -1 = broker default."
    )
    input_retention_ms: int = Field(
        7 * 86_400_000, ge=-1, description="`retention.ms` of the input topic."
    )
    retry_retention_ms: int = Field(
        7 * 86_400_000, ge=-1, description="`retention.ms` of the retry topics."
    )
    dead_letter_retention_ms: int = Field(
        90 * 86_400_000, ge=-1, description="`retention.ms` of the dead-letter topic."
    )
    invalid_retention_ms: int = Field(
        30 * 86_400_000, ge=-1, description="`retention.ms` of the invalid-events topic."
    )

    # --- Delivery ---------------------------------------------------------
    http_timeout_s: float = Field(
        30.0, gt=0, le=300, description="Timeout of one delivery attempt, in seconds."
    )
    http_ca_file: str | None = Field(
        None, description="Extra CA bundle (PEM) trusted for endpoint certificates."
    )
    allow_http: bool = Field(
        False, description="Allow plain `http://` endpoints (local development and tests only)."
    )
    allowed_networks: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="CIDR networks endpoints may resolve to although private or loopback.",
    )
    entitled_plans: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["scale", "enterprise"],
        description="Plans whose organizations get webhooks (case-insensitive).",
    )
    secret_rotation_grace_s: int = Field(
        86_400, ge=0, description="How long a rotated-out secret keeps signing, in seconds."
    )
    max_retry_after_s: int = Field(
        1800,
        ge=0,
        description="Longest `Retry-After` honoured, in seconds. Above the last retry delay, "
        "such a delivery holds back the retries behind it in its partition.",
    )
    response_snippet_bytes: int = Field(
        256, ge=0, le=65536, description="Bytes of a failed response kept in the attempt history."
    )

    # --- Engine -----------------------------------------------------------
    event_loop: Literal["uvloop", "asyncio"] = Field(
        "uvloop",
        description="Event loop of `dispatcher run`: uvloop (faster) or Python's own asyncio.",
    )
    max_in_flight: int = Field(
        512, ge=1, description="Deliveries running or queued at once, across all endpoints."
    )
    max_in_flight_per_endpoint: int = Field(
        16, ge=1, description="Concurrent requests to one endpoint (one webhook)."
    )
    max_in_flight_per_origin: int = Field(
        256,
        ge=1,
        description="Concurrent requests to one origin (scheme, host, port) over all the "
        "webhooks there; they share its keep-alive connections.",
    )
    endpoint_queue_size: int = Field(
        64,
        ge=0,
        description="Deliveries waiting in memory for one endpoint's slots; beyond them a "
        "slow endpoint's deliveries are parked in Kafka (`endpoint_slow`), a busy one's "
        "partitions wait (are paused).",
    )
    endpoint_queue_wait_s: float = Field(
        2.0,
        ge=0,
        description="A fast endpoint may queue as many deliveries as it completes in this "
        "many seconds (more than DISPATCHER_ENDPOINT_QUEUE_SIZE); 0 = fixed size. An "
        "endpoint whose full queue holds more than this much of its work is slow.",
    )
    endpoint_stall_s: float = Field(
        10.0,
        gt=0,
        description="An endpoint with requests in flight and no answer for this long is "
        "stalled: its waiting and new deliveries are deferred until it answers again.",
    )
    deferral_max_age_s: int = Field(
        259_200,
        ge=1,
        description="A delivery still deferred this many seconds after its first attempt "
        "or deferral is dead-lettered with reason `endpoint_unavailable`.",
    )
    stuck_partition_after_s: float = Field(
        300.0,
        gt=0,
        description="A partition whose committable offset has not moved for this long while "
        "messages are pending is reported stuck (`/readyz`, metric, alert).",
    )
    partition_buffer_high: int = Field(
        1000, ge=1, description="Buffered messages of one partition at which it is paused."
    )
    partition_buffer_low: int = Field(
        250, ge=0, description="Buffered messages of a paused partition at which it resumes."
    )
    circuit_failure_threshold: int = Field(
        10,
        ge=1,
        description="Failed requests an endpoint's circuit window must hold (with "
        "DISPATCHER_CIRCUIT_FAILURE_RATIO) before the circuit opens: the minimum sample.",
    )
    circuit_failure_ratio: float = Field(
        0.7,
        gt=0,
        le=1,
        description="Share of the requests in the window, and of the retries among them if "
        "any, that failed at which the circuit opens (an endpoint failing one request in two, "
        "or only first attempts, stays closed).",
    )
    circuit_window_s: float = Field(
        60.0,
        gt=0,
        description="Length of the sliding window of answers the circuit is judged on.",
    )
    circuit_cooldown_s: float = Field(
        30.0,
        gt=0,
        description="Seconds an open circuit defers every delivery before it turns "
        "half-open and lets probes through.",
    )
    circuit_half_open_probes: int = Field(
        10,
        ge=1,
        description="Requests a half-open circuit lets through to judge the endpoint; first "
        "attempts may take at most half of them, retries the rest.",
    )
    circuit_close_ratio: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Share of a half-open circuit's probes that must succeed to close it; "
        "once that cannot be reached it opens again.",
    )
    circuit_deferrals_per_s: float = Field(
        10.0,
        gt=0,
        description="Repeated deferrals of one webhook with an open circuit come due at most "
        "this often per second and instance (while its backlog fits within the longest retry "
        "delay): the bound on records re-read for it.",
    )
    metrics_webhook_series: int = Field(
        50,
        ge=0,
        description="Webhooks with a series of their own in `dispatcher_webhook_deferrals_total` "
        '(the first ones deferred); the rest count under `webhook_id="other"`.',
    )
    backlog_report_every_s: float = Field(
        5.0,
        ge=0.5,
        le=3600,
        description="How often each instance writes its webhooks' backlogs to the backlog "
        "topic (the API's `backlog` field); a snapshot older than three intervals is stale.",
    )
    max_event_bytes: int = Field(
        1_048_576, ge=1024, description="Largest input message accepted, in bytes."
    )
    drain_timeout_s: float = Field(
        20.0, gt=0, description="On SIGTERM or revoke, time allowed to finish in-flight work."
    )

    # --- Management API and delivery history --------------------------------
    attempts_topic: str = Field(
        "webhooks.attempts", description="Topic of every attempt's outcome (delivery history)."
    )
    attempts_retention_ms: int = Field(
        14 * 86_400_000, ge=-1, description="`retention.ms` of the attempts topic."
    )
    organizations_topic: str = Field(
        "webhooks.organizations", description="Compacted topic of organizations' plans."
    )
    idempotency_topic: str = Field(
        "webhooks.idempotency",
        description="Compacted topic of the answers to keyed creates (`Idempotency-Key`), "
        "kept DISPATCHER_API_IDEMPOTENCY_TTL_S.",
    )
    health_topic: str = Field(
        "webhooks.health",
        description="Compacted topic of each webhook's health (failures, episode) and of the "
        "writer's position in the attempts topic, written by the API's writer.",
    )
    notifications_topic: str = Field(
        "webhooks.notifications",
        description="Topic of the health events (`webhook.failing`, `webhook.recovered`, "
        "`webhook.disabled`, `webhook.dead_letters`), keyed by webhook id, written by the "
        "API's writer.",
    )
    backlog_topic: str = Field(
        "webhooks.backlog",
        description="Compacted topic of each `dispatcher run` instance's latest snapshot of "
        "its webhooks' backlogs, keyed by instance; the API shows their sum per webhook.",
    )
    backlog_retention_ms: int = Field(
        86_400_000,
        ge=-1,
        description="`retention.ms` of the backlog topic (compacted and deleted): stopped "
        "instances' last snapshots go after this long.",
    )
    notifications_retention_ms: int = Field(
        30 * 86_400_000, ge=-1, description="`retention.ms` of the notifications topic."
    )
    notify_after_failures: int = Field(
        10,
        ge=1,
        description="Consecutive failed attempts of a webhook (no success between them, "
        "whatever delivery they belong to) after which `webhook.failing` is sent.",
    )
    notify_after_failing_s: float = Field(
        3600.0,
        ge=0,
        description="Seconds a webhook may fail without a success (however few its attempts) "
        "before `webhook.failing` is sent anyway; 0 = by count only.",
    )
    auto_disable_after_s: float = Field(
        432_000.0,
        ge=0,
        description="Seconds a webhook may fail without a single success before the writer "
        'disables it (`disabled_reason: "failing"`); 0 = never.',
    )
    dead_letter_digest_s: float = Field(
        3600.0,
        ge=0,
        description="Period of the `webhook.dead_letters` digest: one per webhook and period "
        "with any delivery dead-lettered (after its last attempt, or without one); 0 = no digests.",
    )
    health_check_every_s: float = Field(
        5.0,
        gt=0,
        description="How often the writer looks for webhooks whose failing time passed a limit.",
    )
    writer_transactional_id: str = Field(
        "",
        description="`transactional.id` of the one writer of the subscriptions, organizations "
        "and idempotency topics; a new writer fences the previous one. "
        "Empty: `<group_id>.config-writer`.",
    )
    known_plans: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["free", "starter", "growth", "scale", "enterprise"],
        description="Plans an organization may be set to through the API (case-insensitive).",
    )
    event_catalog_file: str | None = Field(
        None,
        description="JSON file listing the event types (name, description, schema_file, "
        "input_topic); the dispatcher reads every input topic it names. "
        "Unset = `visitor.identified` only, on DISPATCHER_INPUT_TOPIC.",
    )
    api_host: str = Field("0.0.0.0", description="Address of `dispatcher api`.")
    api_port: int = Field(8090, ge=1, le=65535, description="Port of `dispatcher api`.")
    api_keys: Annotated[list[dict[str, str]], NoDecode] = Field(
        default_factory=list,
        description='API keys as JSON: `[{"name", "sha256", "access": "read"|'
        '"read-write"}]` (hashes, never keys).',
    )
    api_keys_file: str | None = Field(
        None, description="File holding more API keys in the same JSON form (a mounted Secret)."
    )
    api_max_body_bytes: int = Field(
        65_536, ge=1024, le=10_485_760, description="Largest API request body, in bytes."
    )
    api_write_timeout_s: float = Field(
        15.0, gt=0, le=300, description="How long an API write waits to be read back."
    )
    api_test_send_timeout_s: float = Field(
        10.0,
        gt=0,
        le=300,
        description="Timeout of an API test send (`POST .../webhooks/{id}/test`), in seconds.",
    )
    api_test_sends_per_organization: int = Field(
        5,
        ge=1,
        le=1000,
        description="API test sends one organization may have in flight; more are a 429.",
    )
    api_test_sends_max: int = Field(
        50,
        ge=1,
        le=10_000,
        description="API test sends in flight in one API process, all organizations; "
        "more are a 429.",
    )
    api_writer_url: str | None = Field(
        None,
        description="Base URL of the writer `dispatcher api` (the chart's writer Service): this "
        "replica serves reads and forwards every change there. Unset: this process is the "
        "writer.",
    )
    api_idempotency_ttl_s: int = Field(
        86_400, ge=60, description="How long an `Idempotency-Key` answer is replayed."
    )
    api_history_path: str = Field(
        "dispatcher-history.sqlite3",
        min_length=1,
        description="SQLite file of the API's delivery history store (on a persistent "
        "volume: a restart resumes from it; a new or empty file is rebuilt from the "
        "attempts topic).",
    )
    api_history_readers: int = Field(
        4, ge=1, le=64, description="Threads (each with its own connection) reading history."
    )
    api_history_backlog_tx: int = Field(
        200_000,
        ge=1,
        le=10_000_000,
        description="Attempt records one history store transaction takes at most while a "
        "backlog is folded (a rebuild): larger folds faster, holds more in the WAL.",
    )

    # --- Operations -------------------------------------------------------
    http_host: str = Field("0.0.0.0", description="Address of the metrics and health server.")
    http_port: int = Field(
        8080, ge=0, le=65535, description="Port of `/metrics`, `/healthz`, `/readyz`; 0 = off."
    )
    log_level: str = Field("INFO", description="Log level: DEBUG, INFO, WARNING or ERROR.")

    @field_validator(
        "retry_delays_s", "allowed_networks", "entitled_plans", "known_plans", mode="before"
    )
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("kafka_extra_config", "kafka_consumer_extra_config", mode="before")
    @classmethod
    def _extra(cls, value: Any) -> Any:
        if isinstance(value, str):
            return _json(value, "object") if value.strip() else {}
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return json.loads(value) if value.strip() else []
        return value

    @field_validator("retry_delays_s")
    @classmethod
    def _delays(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("at least one retry delay is needed")
        if any(d <= 0 for d in value):
            raise ValueError("every retry delay must be a positive number of seconds")
        if len(set(value)) != len(value):
            raise ValueError("retry delays must be distinct (each names its own topic)")
        return value

    @field_validator("allowed_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for net in value:
            ipaddress.ip_network(net, strict=False)
        return value

    @field_validator("entitled_plans", "known_plans")
    @classmethod
    def _plans(cls, value: list[str]) -> list[str]:
        return [plan.strip().lower() for plan in value]

    @field_validator("group_instance_id")
    @classmethod
    def _instance_id(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        # Kafka's rule for group.instance.id (as for topic names).
        if len(value) > 249 or not _KAFKA_NAME.fullmatch(value):
            raise ValueError("must be 1 to 249 of the characters a-z A-Z 0-9 . _ -")
        return value

    @field_validator("api_writer_url")
    @classmethod
    def _writer_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL such as http://writer:8090")
        return value.strip().rstrip("/")

    @field_validator("writer_transactional_id")
    @classmethod
    def _transactional_id(cls, value: str) -> str:
        if not value.strip():
            return ""
        if len(value) > 249 or not _KAFKA_NAME.fullmatch(value):
            raise ValueError("must be 1 to 249 of the characters a-z A-Z 0-9 . _ -")
        return value

    @property
    def config_writer_id(self) -> str:
        """The fixed ``transactional.id`` every holder of the writer role uses."""
        return self.writer_transactional_id or f"{self.group_id}.config-writer"

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
        return level

    @model_validator(mode="after")
    def _marks(self) -> Settings:
        if self.partition_buffer_low >= self.partition_buffer_high:
            raise ValueError(
                "DISPATCHER_PARTITION_BUFFER_LOW must be below DISPATCHER_PARTITION_BUFFER_HIGH"
            )
        return self


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment, turning validation errors into one line.

    Raises :class:`ConfigError` whose message names the environment variable.
    """
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None
    except (json.JSONDecodeError, ValueError) as exc:
        raise ConfigError(f"invalid setting: {exc}") from None


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem: ``DISPATCHER_X: message (got 'value')``."""
    parts = []
    for err in exc.errors():
        loc = err.get("loc") or ()
        name = f"{ENV_PREFIX}{str(loc[0]).upper()}" if loc else "settings"
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        got = err.get("input")
        secret = bool(loc) and str(loc[0]) in SECRET_SETTINGS
        shown = "" if isinstance(got, dict | list) or secret else f" (got {_short(got)})"
        parts.append(f"{name}: {msg}{shown}")
    return "invalid setting: " + "; ".join(parts)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
