"""Supervision: a polling thread that dies is noticed, named, and fails the engine.

The real :class:`StageConsumer` and :class:`AsyncProducer` run their real threads
here; only the librdkafka client under them is swapped for one that breaks, as no
broker can be made to break a client on purpose.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from confluent_kafka import TopicPartition

from dispatcher.core.consumer import StageConsumer
from dispatcher.core.producer import AsyncProducer
from tests.engine_fakes import sample, settings


class BreakingClient:
    """A Kafka client whose polling raises what nobody foresaw."""

    def __init__(self) -> None:
        self.closed = False

    def subscribe(self, topics: list[str], **callbacks: Any) -> None:
        pass

    def consume(self, num_messages: int, timeout: float) -> list[Any]:
        raise RuntimeError("librdkafka handed back garbage")

    def poll(self, timeout: float) -> int:
        raise RuntimeError("librdkafka handed back garbage")

    def flush(self, timeout: float) -> int:
        return 0

    def close(self) -> None:
        self.closed = True


class Owner:
    def assigned(self, consumer: Any, partitions: list[TopicPartition]) -> None: ...

    def messages(self, consumer: Any, batch: list[Any]) -> None: ...

    async def revoke(self, consumer: Any, partitions: list[TopicPartition]) -> list[Any]:
        return []

    def lost(self, consumer: Any, partitions: list[TopicPartition]) -> None: ...


def wait_for(check: Any, timeout_s: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
    return value


def test_a_dying_stage_consumer_thread_reports_which_stage() -> None:
    async def main() -> None:
        before = sample("dispatcher_internal_errors_total", where="thread")
        loop = asyncio.get_running_loop()
        consumer = StageConsumer(settings(), "5m", ("webhooks.retry.5m",), "g.5m", Owner(), loop)
        client = BreakingClient()
        consumer._consumer = client  # type: ignore[assignment]
        assert consumer.failure is None
        consumer.start()
        failure = await asyncio.to_thread(wait_for, lambda: consumer.failure)
        assert "consumer thread of stage 5m died" in failure
        assert "librdkafka handed back garbage" in failure
        # The thread records its failure before it closes the client: wait for both.
        assert await asyncio.to_thread(wait_for, lambda: client.closed)
        assert sample("dispatcher_internal_errors_total", where="thread") == before + 1
        consumer.close()

    asyncio.run(main())


def test_a_stopped_consumer_is_no_failure() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        consumer = StageConsumer(settings(), "input", ("visitor.identified",), "g", Owner(), loop)
        consumer.start()
        await asyncio.to_thread(consumer.close, 10)
        assert consumer.failure is None

    asyncio.run(main())


def test_a_dying_producer_poll_thread_is_reported() -> None:
    async def main() -> None:
        producer = AsyncProducer(settings(), asyncio.get_running_loop())
        assert producer.failure is None
        real = producer._producer
        producer._producer = BreakingClient()  # type: ignore[assignment]
        failure = await asyncio.to_thread(wait_for, lambda: producer.failure)
        assert failure.startswith("the producer poll thread died")
        producer.close(1)
        real.flush(1)

    asyncio.run(main())
