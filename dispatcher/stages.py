"""The stages of the pipeline and the names of their retry topics.

Pure values derived from the settings, kept apart from the Kafka client code so
that routing and partition logic can use them without importing confluent-kafka.
"""

from __future__ import annotations

from dataclasses import dataclass

from dispatcher.settings import Settings

INPUT_STAGE = "input"


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
