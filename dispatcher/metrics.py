"""Prometheus metrics. Labels come from small closed sets: never a URL or a delivery id.

Two exceptions name webhooks, both bounded: ``dispatcher_webhook_deferrals_total``,
at most ``metrics_webhook_series`` of them per process (see :func:`webhook_deferred`),
and ``dispatcher_endpoint_backlog``, the ten webhooks with the largest backlogs.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

#: Attempt durations: from a fast loopback answer up to the 30 s default timeout.
ATTEMPT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60)
#: End-to-end latency spans the retry schedule (1 min, 5 min, 30 min by default).
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)

DELIVERY_ATTEMPTS = Counter(
    "dispatcher_delivery_attempts",
    "HTTP delivery attempts by stage, outcome (success, failure) and status class.",
    ["stage", "outcome", "status_class"],
    registry=REGISTRY,
)
ATTEMPT_DURATION = Histogram(
    "dispatcher_attempt_duration_seconds",
    "Duration of one HTTP delivery attempt.",
    ["stage"],
    buckets=ATTEMPT_BUCKETS,
    registry=REGISTRY,
)
END_TO_END_LATENCY = Histogram(
    "dispatcher_end_to_end_latency_seconds",
    "From the event's timestamp to its successful delivery.",
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
RETRIES_SCHEDULED = Counter(
    "dispatcher_retries_scheduled",
    "Deliveries written to a retry topic after a failed attempt, by target stage.",
    ["stage"],
    registry=REGISTRY,
)
DEAD_LETTERS = Counter(
    "dispatcher_dead_letters",
    "Deliveries written to the dead-letter topic, by the stage of their last attempt.",
    ["stage"],
    registry=REGISTRY,
)
DEFERRALS = Counter(
    "dispatcher_deferrals",
    "Deliveries handed to a retry topic without an attempt (endpoint_slow, endpoint_stalled, "
    "circuit_open, rate_limited).",
    ["reason"],
    registry=REGISTRY,
)
WEBHOOK_DEFERRALS = Counter(
    "dispatcher_webhook_deferrals",
    "Deferrals by webhook and reason, for at most DISPATCHER_METRICS_WEBHOOK_SERIES webhooks "
    'per process (the first ones deferred); the others count under webhook_id="other".',
    ["webhook_id", "reason"],
    registry=REGISTRY,
)
#: The label of every webhook beyond the series limit.
OTHER_WEBHOOKS = "other"
ENDPOINT_BACKLOG = Gauge(
    "dispatcher_endpoint_backlog",
    "Deliveries waiting for one webhook: in its queue, plus an estimate of those parked in "
    "Kafka for it being slow; only the webhooks with the 10 largest backlogs.",
    ["webhook_id"],
    registry=REGISTRY,
)
RATE_LIMIT_WAITS = Counter(
    "dispatcher_rate_limit_waits",
    "Deliveries that could not start at once for their webhook's rate limit (they waited "
    'in its queue, or were parked in Kafka: dispatcher_deferrals_total{reason="rate_limited"}).',
    registry=REGISTRY,
)
RATE_LIMIT_SHARE = Gauge(
    "dispatcher_rate_limit_share",
    "Fraction of each webhook's rate limit this instance takes: its share of the partitions "
    "of every stage (1 while it does not know them all).",
    registry=REGISTRY,
)
EVENT_LOOP_LAG = Gauge(
    "dispatcher_event_loop_lag_seconds",
    "How late the event loop wakes from the supervision tick's sleep, smoothed; beyond "
    "0.1 s the process is starved and endpoints are not judged slow from their answer times.",
    registry=REGISTRY,
)
CIRCUIT_OPEN = Gauge(
    "dispatcher_circuit_open_endpoints",
    "Endpoints (webhooks) whose circuit breaker is open or half-open.",
    registry=REGISTRY,
)
CIRCUIT_TRANSITIONS = Counter(
    "dispatcher_circuit_transitions",
    "Circuit breaker state changes, by the new state (open, half_open, closed).",
    ["state"],
    registry=REGISTRY,
)
IN_FLIGHT = Gauge(
    "dispatcher_in_flight_deliveries",
    "Deliveries running or waiting for an endpoint slot.",
    registry=REGISTRY,
)
INVALID_EVENTS = Counter(
    "dispatcher_invalid_events",
    "Input messages written to the invalid-events topic, by reason.",
    ["reason"],
    registry=REGISTRY,
)
INVALID_SUBSCRIPTIONS = Counter(
    "dispatcher_invalid_subscriptions",
    "Subscription records ignored when read, by reason (no_key, invalid).",
    ["reason"],
    registry=REGISTRY,
)
SKIPPED = Counter(
    "dispatcher_skipped_deliveries",
    "Deliveries not made on purpose, by reason (disabled, deleted, not_entitled, ...).",
    ["reason"],
    registry=REGISTRY,
)
SUBSCRIPTIONS_LOADED = Gauge(
    "dispatcher_subscriptions_loaded",
    "Subscriptions in the in-memory table.",
    registry=REGISTRY,
)
CONSUMER_LAG = Gauge(
    "dispatcher_consumer_lag",
    "Messages between the group's committed offset and the end of each assigned partition.",
    ["topic", "partition"],
    registry=REGISTRY,
)
INTERNAL_ERRORS = Counter(
    "dispatcher_internal_errors",
    "Unexpected exceptions, by where they were caught (attempt, fan_out, task, pump, tick, "
    "thread).",
    ["where"],
    registry=REGISTRY,
)
PRODUCE_REFUSED = Counter(
    "dispatcher_produce_refused",
    "Records the broker or the client refused for good (too large, not authorized, invalid), "
    "by topic and Kafka error name.",
    ["topic", "error"],
    registry=REGISTRY,
)
STUCK_PARTITIONS = Gauge(
    "dispatcher_stuck_partitions",
    "Assigned partitions whose committable offset has not moved for longer than "
    "DISPATCHER_STUCK_PARTITION_AFTER_S while messages are pending.",
    registry=REGISTRY,
)
READY = Gauge(
    "dispatcher_ready",
    "1 when the subscriptions table has caught up and partitions are assigned.",
    registry=REGISTRY,
)

# --- the writer's fold of webhook health (``dispatcher api`` holding the writer role) ---
NOTIFICATIONS = Counter(
    "dispatcher_notifications",
    "Health events committed to the notifications topic, by type.",
    ["type"],
    registry=REGISTRY,
)
WEBHOOKS_AUTO_DISABLED = Counter(
    "dispatcher_webhooks_auto_disabled",
    "Webhooks the writer disabled for failing without a success.",
    registry=REGISTRY,
)
HEALTH_WRITE_FAILURES = Counter(
    "dispatcher_health_write_failures",
    "Transactions of health, notifications and auto-disables that Kafka did not take.",
    registry=REGISTRY,
)
HEALTH_WRITE_FAILING = Gauge(
    "dispatcher_health_write_failing",
    "1 while the last transaction of health and notifications failed (none written since).",
    registry=REGISTRY,
)
HEALTH_FOLDED = Counter(
    "dispatcher_health_attempts_folded",
    "Attempt records folded into webhook health (the decision committed, or nothing to change).",
    registry=REGISTRY,
)
NOTIFICATION_TYPES = (
    "webhook.failing",
    "webhook.recovered",
    "webhook.disabled",
    "webhook.dead_letters",
)


def health_counters_from_zero() -> None:
    """The writer's counters at 0 from the start (see :func:`counters_from_zero`)."""
    for kind in NOTIFICATION_TYPES:
        NOTIFICATIONS.labels(kind)
    HEALTH_WRITE_FAILING.set(0)


#: Why a subscription record is skipped (``dispatcher_invalid_subscriptions``).
INVALID_SUBSCRIPTION_REASONS = ("no_key", "invalid")


def counters_from_zero(stages: Iterable[str]) -> None:
    """Export the counters the chart's alerts take ``increase()`` of at 0 from the start.

    Prometheus sees a counter grow only between samples it holds: a labelled child
    made by its first event is first scraped at 1, its increase reads 0, and the
    first dead letter of a stage (or the first invalid subscription record) after a
    start would never fire an alert.
    """
    for stage in stages:
        DEAD_LETTERS.labels(stage)
    for reason in INVALID_SUBSCRIPTION_REASONS:
        INVALID_SUBSCRIPTIONS.labels(reason)


def status_class(status_code: int) -> str:
    """``2xx`` .. ``5xx``; anything outside 100-599 is ``other``."""
    return f"{status_code // 100}xx" if 100 <= status_code <= 599 else "other"


#: Labelled children of the per-attempt metrics, bound once per label set:
#: ``labels()`` validates and joins its arguments on every call, which showed in
#: profiles of the hot path. The label sets are small and closed (stages, outcomes,
#: status classes), so the caches stay small.
_ATTEMPT_CHILDREN: dict[tuple[str, str, str], Counter] = {}
_DURATION_CHILDREN: dict[str, Histogram] = {}


def attempt_counted(stage: str, outcome: str, status: str) -> None:
    """Count one delivery attempt (``dispatcher_delivery_attempts``)."""
    key = (stage, outcome, status)
    child = _ATTEMPT_CHILDREN.get(key)
    if child is None:
        child = _ATTEMPT_CHILDREN[key] = DELIVERY_ATTEMPTS.labels(stage, outcome, status)
    child.inc()


def attempt_duration(stage: str, seconds: float) -> None:
    """Observe one attempt's duration (``dispatcher_attempt_duration_seconds``)."""
    child = _DURATION_CHILDREN.get(stage)
    if child is None:
        child = _DURATION_CHILDREN[stage] = ATTEMPT_DURATION.labels(stage)
    child.observe(seconds)


#: Webhook ids with a series of their own in ``dispatcher_webhook_deferrals_total``.
_DEFERRED_WEBHOOKS: set[str] = set()


def webhook_deferred(webhook_id: str, reason: str, max_series: int) -> None:
    """Count one deferral of ``webhook_id``; past ``max_series`` webhooks, under ``other``.

    The first webhooks deferred keep their series for the life of the process: a
    counter that came and went would reset under the feet of ``rate()``. Deferrals
    are what a failing or stalled webhook causes, so the first ones are usually the
    ones an operator is looking for, and the total stays exact.
    """
    label = webhook_id
    if webhook_id not in _DEFERRED_WEBHOOKS:
        if len(_DEFERRED_WEBHOOKS) < max_series:
            _DEFERRED_WEBHOOKS.add(webhook_id)
        else:
            label = OTHER_WEBHOOKS
    WEBHOOK_DEFERRALS.labels(label, reason).inc()
