"""Supervision: a polling thread that dies is noticed, named, and fails the engine.

The real :class:`StageConsumer` and :class:`AsyncProducer` run their real threads
here; only the librdkafka client under them is swapped for one that breaks. End
to end, the one fault the broker can be made to deal a client from outside is
fencing (a second member with the same ``group.instance.id``).
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from dispatcher.core.consumer import StageConsumer
from dispatcher.core.producer import AsyncProducer
from tests.engine_fakes import sample, settings
from tests.receiver import HttpsReceiver
from tests.streams import make_event
from tests.support import free_port


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


def test_dispatcher_run_exits_1_naming_the_stage_whose_consumer_is_fenced(
    ns_factory: Any, receiver: HttpsReceiver, run_dispatcher: Any
) -> None:
    """A fault from outside: a second instance with the same group.instance.id.

    The broker fences the first instance's consumers; librdkafka reports that as
    a fatal error, after which a consumer would poll on and consume nothing. The
    first ``dispatcher run`` must say which polling thread died and exit 1.
    """
    ns = ns_factory(
        group_instance_id="twin-0", session_timeout_s=10, kafka_consumer_extra_config={}
    )
    ns.subscribe(receiver.url("/twin"))
    first = run_dispatcher(ns)
    second = run_dispatcher(ns, wait_ready=False, http_port=free_port())
    assert first.proc is not None
    rc = first.proc.wait(90)
    logs = first.logs()
    assert rc == 1, logs[-3000:]
    died = re.findall(r"the consumer thread of stage (\S+) died", logs)
    assert died and set(died) <= {"input", "2s", "4s", "6s"}, logs[-3000:]
    assert "fenced" in logs
    # The instance that fenced it goes on, and delivers.
    second.wait_ready(60)
    ns.publish(make_event("after-the-twin"))
    receiver.wait_for_requests(1, path="/twin", timeout_s=60)


class LostClient:
    """A client whose rebalance callbacks are driven by the test."""

    def incremental_assign(self, partitions: list[TopicPartition]) -> None: ...

    def incremental_unassign(self, partitions: list[TopicPartition]) -> None: ...


def fatal(reason: str) -> KafkaException:
    return KafkaException(KafkaError(KafkaError._FATAL, reason, fatal=True))


@pytest.mark.parametrize(
    ("instance_id", "broker_away", "expected"),
    [
        # A static member's session lost to an outage: its own stale commit fenced it.
        ("static-0", True, True),
        # The broker stayed reachable: another instance took the id; stay fatal.
        ("static-0", False, False),
        # Dynamic members are never fenced by an instance id.
        (None, True, False),
    ],
)
def test_only_a_fencing_right_after_a_session_lost_to_an_outage_gets_a_new_client(
    instance_id: str | None, broker_away: bool, expected: bool
) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        conf = settings(group_instance_id=instance_id)
        consumer = StageConsumer(conf, "input", ("visitor.identified",), "g", Owner(), loop)
        client = LostClient()
        consumer._consumer = client  # type: ignore[assignment]
        if broker_away:
            consumer.link.broker_down()
        # librdkafka calls on_lost on the polling thread, which waits for the loop.
        await asyncio.to_thread(consumer._on_lost, client, [])  # type: ignore[arg-type]
        assert consumer._self_fenced(fatal("Static consumer fenced")) is expected
        # Once assigned again, a fencing is another instance's doing.
        consumer._on_assign(client, [])  # type: ignore[arg-type]
        assert consumer._self_fenced(fatal("Static consumer fenced")) is False

    asyncio.run(main())
