"""Helpers of the load tests: numbered event streams and who received what.

A pair is one (event, subscription): the receiving path and the event's
``session_id``, unique per published event. The delivery id header names the
same pair, so both are checked to agree.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

from tests.receiver import HttpsReceiver, ReceivedRequest
from tests.support import BOOTSTRAP, SEED_EVENT, DispatcherProcess, Namespace, metric_value

Pair = tuple[str, str]


def make_event(session_id: str, org: str = "org_abc123") -> dict[str, Any]:
    doc = copy.deepcopy(SEED_EVENT)
    doc["organization_id"] = org
    doc["session_id"] = session_id
    return doc


def stream(prefix: str, start: int, count: int, org: str = "org_abc123") -> list[dict[str, Any]]:
    return [make_event(f"{prefix}-{i:05d}", org) for i in range(start, start + count)]


def publish_spread(ns: Namespace, events: list[dict[str, Any]]) -> None:
    """Publish round-robin over the input partitions, so every partition has work."""
    producer = Producer({"bootstrap.servers": BOOTSTRAP, "enable.idempotence": True})
    partitions = ns.settings.topic_partitions
    for i, event in enumerate(events):
        value = json.dumps(event).encode()
        producer.produce(ns.settings.input_topic, value, partition=i % partitions)
    assert producer.flush(30) == 0


def committed_events(ns: Namespace) -> int:
    """Input messages below the group's committed offsets, over all partitions."""
    consumer = Consumer({"bootstrap.servers": BOOTSTRAP, "group.id": ns.settings.group_id})
    try:
        topic = ns.settings.input_topic
        asked = [TopicPartition(topic, p) for p in range(ns.settings.topic_partitions)]
        return sum(max(tp.offset, 0) for tp in consumer.committed(asked, timeout=10))
    finally:
        consumer.close()


def route(request: ReceivedRequest) -> str:
    return request.path.split("?", 1)[0]


def session_of(request: ReceivedRequest) -> str:
    return str(json.loads(request.body)["session_id"])


@dataclass
class Tally:
    """Every delivery received so far, counted by pair."""

    counts: Counter[Pair]
    #: Requests cut off mid-body (the sender was killed): never a delivery.
    truncated: int = 0

    @classmethod
    def of(cls, receivers: Iterable[HttpsReceiver]) -> Tally:
        counts: Counter[Pair] = Counter()
        ids: dict[str, Pair] = {}
        truncated = 0
        for receiver in receivers:
            for request in receiver.requests:
                if len(request.body) != int(request.header("content-length") or -1):
                    truncated += 1
                    continue
                pair = (route(request), session_of(request))
                delivery_id = request.header("x-bullseye-delivery-id") or ""
                # A redelivery must carry the id of the first delivery of the same pair.
                assert ids.setdefault(delivery_id, pair) == pair, (delivery_id, pair)
                counts[pair] += 1
        return cls(counts, truncated)

    def missing(self, expected: Iterable[Pair]) -> list[Pair]:
        return [pair for pair in expected if self.counts[pair] == 0]

    @property
    def delivered(self) -> int:
        return len(self.counts)

    @property
    def duplicates(self) -> int:
        """Deliveries beyond the first of each pair."""
        return sum(n - 1 for n in self.counts.values())


def expected_pairs(paths: Iterable[str], events: Iterable[dict[str, Any]]) -> set[Pair]:
    sessions = [str(e["session_id"]) for e in events]
    return {(path, session) for path in paths for session in sessions}


def all_delivered(receivers: list[HttpsReceiver], expected: set[Pair]) -> bool:
    return not Tally.of(receivers).missing(expected)


def gauge(proc: DispatcherProcess, name: str, **labels: str) -> float:
    return metric_value(proc.metrics(), name, **labels)
