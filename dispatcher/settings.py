"""Operator settings, read from ``DISPATCHER_*`` environment variables.

Every field here is documented in the README's settings table; a test keeps the
two in step. A bad value stops start-up with one line naming the variable
(:func:`load_settings`), never a traceback.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from dispatcher.errors import ConfigError

ENV_PREFIX = "DISPATCHER_"


def _split_list(value: Any) -> Any:
    """Accept a JSON list or a comma-separated string from the environment."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
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
        description="Consumer group id; each retry stage uses `<group_id>.<stage>`.",
    )

    # --- Topics -----------------------------------------------------------
    input_topic: str = Field("visitor.identified", description="Topic of incoming events.")
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
        16, ge=1, description="Concurrent requests to one endpoint (webhook URL)."
    )
    endpoint_queue_size: int = Field(
        64, ge=0, description="Deliveries waiting for one endpoint before more are deferred."
    )
    endpoint_queue_wait_s: float = Field(
        2.0,
        ge=0,
        description="A fast endpoint may queue as many deliveries as it completes in this "
        "many seconds (more than DISPATCHER_ENDPOINT_QUEUE_SIZE); 0 = fixed size.",
    )
    partition_buffer_high: int = Field(
        1000, ge=1, description="Buffered messages of one partition at which it is paused."
    )
    partition_buffer_low: int = Field(
        250, ge=0, description="Buffered messages of a paused partition at which it resumes."
    )
    circuit_failure_threshold: int = Field(
        10, ge=1, description="Consecutive failures that open an endpoint's circuit."
    )
    circuit_cooldown_s: float = Field(
        30.0, gt=0, description="Seconds an open circuit defers deliveries before a probe."
    )
    max_event_bytes: int = Field(
        1_048_576, ge=1024, description="Largest input message accepted, in bytes."
    )
    drain_timeout_s: float = Field(
        20.0, gt=0, description="On SIGTERM or revoke, time allowed to finish in-flight work."
    )

    # --- Operations -------------------------------------------------------
    http_host: str = Field("0.0.0.0", description="Address of the metrics and health server.")
    http_port: int = Field(
        8080, ge=0, le=65535, description="Port of `/metrics`, `/healthz`, `/readyz`; 0 = off."
    )
    log_level: str = Field("INFO", description="Log level: DEBUG, INFO, WARNING or ERROR.")

    @field_validator("retry_delays_s", "allowed_networks", "entitled_plans", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("kafka_extra_config", "kafka_consumer_extra_config", mode="before")
    @classmethod
    def _extra(cls, value: Any) -> Any:
        if isinstance(value, str):
            return json.loads(value) if value.strip() else {}
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

    @field_validator("entitled_plans")
    @classmethod
    def _plans(cls, value: list[str]) -> list[str]:
        return [plan.strip().lower() for plan in value]

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
        shown = "" if isinstance(got, dict) or "PASSWORD" in name else f" (got {got!r})"
        parts.append(f"{name}: {msg}{shown}")
    return "invalid setting: " + "; ".join(parts)
