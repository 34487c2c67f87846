"""Who is called and who is skipped, decided by the real engine in-process.

Which subscriptions an event fans out to, and which retries are dropped because
their subscription went away, are decisions of the engine alone: checked here
in milliseconds, with the fakes of tests/engine_fakes.py at its edges. The same
decisions end to end, with the real broker and ``dispatcher run``, are covered by
test_delivery.py (the seed event, the table followed live) and test_retries.py.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import httpx

from dispatcher.records import DeliveryRecord, Source, record_headers
from tests.engine_fakes import FakeTable, event, running, sample, settings, subscription, until
from tests.support import ROUTING_HEADERS

HOST = "https://hooks.example.com"
DEAD_LETTER = "webhooks.dead-letter"


def skipped(reason: str) -> float:
    return sample("dispatcher_skipped_deliveries_total", reason=reason)


class Webhooks:
    """Answers 200 to everything, noting which paths were called."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(request.url.path)
        return httpx.Response(200, stream=httpx.ByteStream(b"{}"))


def test_an_event_fans_out_only_to_matching_enabled_entitled_subscriptions() -> None:
    a = subscription("wh_a", f"{HOST}/a")
    table = FakeTable(
        a,
        subscription("wh_b", f"{HOST}/b"),
        subscription("wh_other_org", f"{HOST}/other-org", org="org_other"),
        a.model_copy(update={"webhook_id": "wh_disabled", "url": f"{HOST}/disabled"}).model_copy(
            update={"enabled": False}
        ),
        a.model_copy(
            update={
                "webhook_id": "wh_other_event",
                "url": f"{HOST}/other-event",
                "events": ("visitor.updated",),
            }
        ),
        a.model_copy(update={"webhook_id": "wh_growth", "url": f"{HOST}/growth", "plan": "growth"}),
    )
    webhooks = Webhooks()

    async def main() -> None:
        disabled, not_entitled = skipped("disabled"), skipped("not_entitled")
        async with running(settings(), table, webhooks) as h:
            h.input.assign(0)
            h.input.feed([event("s1"), event("s2", org="org_nobody")])
            await until(lambda: h.input.stored.get(0) == 2, what="both events handled")
            assert sorted(webhooks.paths) == ["/a", "/b"]
            # The disabled and the growth-plan webhooks are counted, each once; the
            # other organization's, the other event's and the lone event's are not.
            assert skipped("disabled") - disabled == 1
            assert skipped("not_entitled") - not_entitled == 1
            assert h.producer.sent == []

    asyncio.run(main())


def _retry(webhook_id: str) -> tuple[bytes, list[tuple[str, bytes]]]:
    """A record of the first retry stage, due now, after one failed attempt."""
    now = datetime.now(UTC)
    record = DeliveryRecord(
        delivery_id=f"msg_{webhook_id}",
        webhook_id=webhook_id,
        organization_id="org_abc123",
        event="visitor.identified",
        event_timestamp=now,
        body=event("retried").decode(),
        attempts_made=1,
        first_failure_at=now,
        source=Source(topic="visitor.identified", partition=0, offset=0),
    )
    return record.to_json(), list(record_headers(record, 0))


def test_a_retry_of_a_deleted_subscription_is_skipped_and_of_a_disabled_one_dead_lettered() -> None:
    off = subscription("wh_off", f"{HOST}/off").model_copy(update={"enabled": False})
    webhooks = Webhooks()
    config = settings()

    async def main() -> None:
        deleted, disabled = skipped("deleted"), skipped("disabled")
        async with running(config, FakeTable(off), webhooks) as h:
            stage = h.consumers["1m"]
            stage.assign(0)
            for webhook_id in ("wh_gone", "wh_off"):
                value, headers = _retry(webhook_id)
                stage.feed([value], headers=headers)
            await until(lambda: stage.stored.get(0) == 2, what="both retries handled")
            assert skipped("deleted") - deleted == 1
            # The disabled one's delivery is kept, replayable, with the reason: a
            # webhook re-enabled later can be given what it missed.
            assert skipped("disabled") - disabled == 0
            assert webhooks.paths == []
            [letter] = h.producer.sent
            assert letter.topic == config.dead_letter_topic
            record = DeliveryRecord.model_validate_json(letter.value or b"")
            assert record.webhook_id == "wh_off"
            assert record.dead_letter_reason == "webhook_disabled"
            assert record.attempts_made == 1
            assert h.engine.work.in_flight == 0

    asyncio.run(main())


def test_retry_headers_are_written_afresh_on_every_hop() -> None:
    answers = iter([500, 502, 204])
    seen: list[httpx.Request] = []

    async def webhook(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(next(answers), stream=httpx.ByteStream(b"{}"))

    def due_now(headers: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        # Read back at once instead of after the stage's delay; all else as written.
        return [(k, b"0" if k == "dispatcher-due-ms" else v) for k, v in headers]

    async def main() -> None:
        table = FakeTable(subscription("wh_a", f"{HOST}/twice"))
        async with running(settings(), table, webhook) as h:
            h.input.assign(0)
            h.input.feed([event("s1")])
            first, second = h.consumers["1m"], h.consumers["5m"]
            first.assign(0)
            second.assign(0)
            await until(lambda: len(h.producer.to(first.topic)) == 1, what="the first hop")
            [hop1] = h.producer.to(first.topic)
            first.feed([hop1.value or b""], headers=due_now(hop1.headers))
            await until(lambda: len(h.producer.to(second.topic)) == 1, what="the second hop")
            [hop2] = h.producer.to(second.topic)
            second.feed([hop2.value or b""], headers=due_now(hop2.headers))
            await until(lambda: second.stored.get(0) == 1, what="the third attempt")

            for hop in (hop1, hop2):
                names = [k for k, _ in hop.headers]
                assert sorted(names) == sorted(ROUTING_HEADERS), names
            assert hop1.header("dispatcher-attempt") == b"1"
            assert hop2.header("dispatcher-attempt") == b"2"
            assert hop2.header("dispatcher-last-error") == b"http 502"
            first_failure = hop1.header("dispatcher-first-failure-ms")
            assert first_failure is not None
            assert hop2.header("dispatcher-first-failure-ms") == first_failure
            due1, due2 = (int(hop.header("dispatcher-due-ms") or 0) for hop in (hop1, hop2))
            assert due2 > due1
            attempts = [r.headers["x-bullseye-attempt"] for r in seen]
            assert attempts == ["1", "2", "3"]
            assert len({r.headers["x-bullseye-delivery-id"] for r in seen}) == 1
            assert h.producer.to(DEAD_LETTER) == []

    asyncio.run(main())


def test_the_last_finished_ticket_moves_its_partitions_position_and_wakes_the_engine() -> None:
    from confluent_kafka import TopicPartition

    from dispatcher.core.partitions import PartitionState, Slot
    from dispatcher.core.work import Work

    async def main() -> None:
        wake = asyncio.Event()
        work = Work(wake)
        part = PartitionState(None, TopicPartition("t", 0), None)  # type: ignore[arg-type]
        part.tracker.received(7)
        slot = Slot(part, 7)
        with work.message(slot):
            first, second = work.open(slot, "d1"), work.open(slot, "d2")
        work.finish(first)
        assert wake.is_set() and not work.take_moved()  # a place is free; d2 still runs
        wake.clear()
        work.finish(second)
        assert wake.is_set() and work.take_moved() == {part}
        assert part.tracker.position == 8 and work.in_flight == 0
        assert not work.take_moved()  # taken once

    asyncio.run(main())


def test_a_ticket_whose_work_fails_or_is_cancelled_is_released_logged_and_never_finished() -> None:
    from confluent_kafka import TopicPartition

    from dispatcher import metrics
    from dispatcher.core.partitions import PartitionState, Slot
    from dispatcher.core.work import Work

    async def boom() -> None:
        raise RuntimeError("nobody foresaw this")

    async def never() -> None:
        await asyncio.Event().wait()

    async def main() -> None:
        work = Work(asyncio.Event())
        part = PartitionState(None, TopicPartition("t", 0), None)  # type: ignore[arg-type]
        slot = Slot(part, 7)
        before = sample("dispatcher_internal_errors_total", where="task")
        with work.message(slot):
            failing = work.start(work.open(slot, "d1"), boom())
            cancelled_ticket = work.open(slot, "d2")
            cancelled = work.start(cancelled_ticket, never())
            cancelled.cancel()  # before its first step: its own code never runs
        assert work.in_flight == 2 and len(part.tasks) == 2
        await asyncio.wait({failing, cancelled})
        await until(lambda: work.in_flight == 0, what="both tickets released")
        assert not part.tasks
        # The message waits for a redelivery: its offset did not move.
        assert slot.remaining == 2 and not work.take_moved()
        assert sample("dispatcher_internal_errors_total", where="task") == before + 1
        assert metrics.REGISTRY.get_sample_value("dispatcher_in_flight_deliveries") == 0
        # A ticket ends once: finishing a released one changes nothing.
        work.finish(cancelled_ticket)
        assert work.in_flight == 0 and slot.remaining == 2 and not work.take_moved()

    asyncio.run(main())
