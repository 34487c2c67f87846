"""Fakes for running the engine in-process: stage consumers, a producer, a table.

The engine under test is the real one; only its edges are replaced. A test plays
the group coordinator and the broker through the ``PartitionOwner`` protocol
(assign, messages, revoke, lost) and reads back what was paused, stored and
produced. Deliveries go to a :class:`FakeSender`, which answers with a function the
test writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from confluent_kafka import Message, TopicPartition

from dispatcher.core.consumer import PartitionOwner
from dispatcher.core.engine import Engine
from dispatcher.core.links import ClientLink
from dispatcher.metrics import REGISTRY
from dispatcher.models import Subscription
from dispatcher.settings import Settings
from tests.support import SEED_EVENT

Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


class FakeSender:
    """The engine's :class:`~dispatcher.outbound.sender.Sender`, answered by ``handler``.

    What the handler raises (``httpx.ConnectError``, say) is what a network failure
    raises from the real transport.
    """

    def __init__(self, handler: Handler) -> None:
        self.handler = handler

    async def post(self, url: str, headers: Mapping[str, str], body: bytes) -> httpx.Response:
        request = httpx.Request("POST", url, headers=dict(headers), content=body)
        response = await self.handler(request)
        response.request = request
        return response


class FakeConsumer:
    """One stage's consumer, driven by the test instead of a broker."""

    def __init__(
        self,
        settings: Settings,
        stage: str,
        topics: tuple[str, ...],
        group_id: str,
        owner: PartitionOwner,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.stage = stage
        self.topics = topics
        self.topic = topics[0]
        self.owner = owner
        self.started = False
        self.closed = False
        self.paused: set[int] = set()
        self.stored: dict[int, int] = {}
        self.failure: str | None = None
        self.link: ClientLink | None = None
        self.partitions_total: int | None = None
        self._next: dict[int, int] = {}

    @property
    def ready(self) -> bool:
        return self.started

    def start(self) -> None:
        self.started = True

    def pause(self, tp: TopicPartition) -> None:
        self.paused.add(tp.partition)

    def resume(self, tp: TopicPartition) -> None:
        self.paused.discard(tp.partition)

    def store(self, offsets: list[TopicPartition]) -> None:
        for tp in offsets:
            self.stored[tp.partition] = tp.offset

    def batch_done(self) -> None:
        pass

    def close(self, timeout_s: float = 30.0) -> None:
        self.closed = True

    # --- the test's side ------------------------------------------------------
    def assign(self, *partitions: int) -> None:
        self.owner.assigned(self, [TopicPartition(self.topic, p) for p in partitions])

    def feed(
        self, values: Sequence[bytes], partition: int = 0, headers: list[Any] | None = None
    ) -> None:
        """Hand a batch of messages to the engine, at the next offsets of ``partition``."""
        batch = []
        for value in values:
            offset = self._next.get(partition, 0)
            self._next[partition] = offset + 1
            batch.append(
                Message(
                    topic=self.topic,
                    partition=partition,
                    offset=offset,
                    key=None,
                    value=value,
                    headers=headers,
                )
            )
        self.owner.messages(self, batch)

    async def revoke(self, *partitions: int) -> list[TopicPartition]:
        return await self.owner.revoke(self, [TopicPartition(self.topic, p) for p in partitions])

    def lose(self, *partitions: int) -> None:
        self.owner.lost(self, [TopicPartition(self.topic, p) for p in partitions])


@dataclass
class Sent:
    topic: str
    value: bytes | None
    key: bytes | None
    headers: list[tuple[str, bytes]]

    def json(self) -> Any:
        return json.loads(self.value or b"null")

    def header(self, name: str) -> bytes | None:
        return dict(self.headers).get(name)


@dataclass
class FakeProducer:
    """Acknowledges every record at once and keeps it."""

    sent: list[Sent] = field(default_factory=list)
    unconfirmed: list[Sent] = field(default_factory=list)
    failure: str | None = None
    closed: bool = False

    async def send(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> None:
        await asyncio.sleep(0)
        self.sent.append(Sent(topic, value, key, list(headers)))

    def produce_nowait(self, topic: str, value: bytes, key: bytes) -> None:
        # Records nobody waits for (the attempts topic), apart from the hand-overs.
        self.unconfirmed.append(Sent(topic, value, key, []))

    def close(self, timeout_s: float = 30.0) -> None:
        self.closed = True

    def to(self, topic: str) -> list[Sent]:
        return [s for s in self.sent if s.topic == topic]


class FakeTable:
    """Subscriptions by id and organization."""

    def __init__(self, *subs: Subscription) -> None:
        self.subs = {s.webhook_id: s for s in subs}

    def get(self, webhook_id: str) -> Subscription | None:
        return self.subs.get(webhook_id)

    def for_organization(self, organization_id: str) -> tuple[Subscription, ...]:
        return tuple(s for s in self.subs.values() if s.organization_id == organization_id)


def subscription(webhook_id: str, url: str, org: str = "org_abc123") -> Subscription:
    now = datetime.now(UTC)
    return Subscription(
        webhook_id=webhook_id,
        organization_id=org,
        url=url,
        events=("visitor.identified",),
        secret="whsec_" + "A" * 32,
        enabled=True,
        plan="scale",
        created_at=now,
        updated_at=now,
    )


def event(session_id: str, org: str = "org_abc123") -> bytes:
    doc = dict(SEED_EVENT)
    doc["organization_id"] = org
    doc["session_id"] = session_id
    return json.dumps(doc).encode()


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "retry_delays_s": [60, 300],
        "http_port": 0,
        "drain_timeout_s": 2.0,
        "max_in_flight": 64,
        "max_in_flight_per_endpoint": 4,
        "endpoint_queue_size": 4,
        "partition_buffer_high": 20,
        "partition_buffer_low": 5,
    }
    values.update(overrides)
    return Settings(**values)


@dataclass
class Harness:
    engine: Engine
    producer: FakeProducer
    consumers: dict[str, FakeConsumer]

    @property
    def input(self) -> FakeConsumer:
        return self.consumers["input"]


@contextlib.asynccontextmanager
async def running(
    s: Settings, table: FakeTable, handler: Handler, shutdown: bool = True
) -> AsyncIterator[Harness]:
    """A started engine on the running loop, with fakes at its edges."""
    consumers: dict[str, FakeConsumer] = {}

    def factory(*args: Any) -> FakeConsumer:
        consumer = FakeConsumer(*args)
        consumers[consumer.stage] = consumer
        return consumer

    producer = FakeProducer()
    engine = Engine(s, table, FakeSender(handler), producer, consumer_factory=factory)
    engine.start()
    try:
        yield Harness(engine, producer, consumers)
    finally:
        if shutdown and not producer.closed:
            await engine.shutdown()


async def until(check: Callable[[], object], timeout_s: float = 5.0, what: str = "") -> None:
    """Wait on the loop until ``check()`` is truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(0.005)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0
