"""The engine in-process: bookkeeping, isolation, slow lanes, backpressure, deferral,
supervision.

Fake consumers and a fake producer stand at its edges (tests/engine_fakes.py);
the test plays the broker through the ``PartitionOwner`` protocol. Each test
runs in milliseconds; the same behaviour against the real broker and real HTTPS
receivers is covered by test_isolation.py, test_slow_endpoint.py, test_crash.py and
test_retries.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from dispatcher.core import deliveries
from dispatcher.core.deliveries import ENDPOINT_UNAVAILABLE, DeliveryRunner
from dispatcher.core.invalid import H_INVALID_REASON
from dispatcher.core.loop_lag import LoopLag
from dispatcher.records import DeliveryRecord, Source
from tests.engine_fakes import (
    FakeTable,
    Handler,
    Harness,
    event,
    running,
    sample,
    settings,
    subscription,
    until,
)

A = "https://hooks.example.com/a"
B = "https://hooks.example.com/b"  # the same origin as A: another webhook, same host
STAGE_1 = "webhooks.retry.1m"
STAGE_2 = "webhooks.retry.5m"
HOST = "https://hooks.example.com"
SLOTS = 8


def reply(status: int) -> httpx.Response:
    # A streamed body, as from the network: the delivery reads it raw.
    return httpx.Response(status, stream=httpx.ByteStream(b"{}"))


def ok(_request: httpx.Request) -> httpx.Response:
    return reply(200)


def gated(gate: asyncio.Event, seen: list[httpx.Request] | None = None) -> Handler:
    """A webhook that answers once ``gate`` is set, noting each request in ``seen``."""

    async def handler(request: httpx.Request) -> httpx.Response:
        await gate.wait()
        if seen is not None:
            seen.append(request)
        return ok(request)

    return handler


def sessions(requests: list[httpx.Request]) -> list[str]:
    return [json.loads(r.content)["session_id"] for r in requests]


def idle(h: Harness) -> bool:
    return h.engine.work.in_flight == 0


def test_every_event_delivered_committed_and_nothing_left_in_flight() -> None:
    seen: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return ok(request)

    async def main() -> None:
        table = FakeTable(subscription("wh_a", A), subscription("wh_b", B))
        async with running(settings(), table, handler) as h:
            h.input.assign(0)
            h.input.feed([event(f"s{i}") for i in range(50)])
            await until(lambda: h.input.stored.get(0) == 50, what="offset 50 stored")
            assert idle(h)
            assert len(seen) == 100
            assert h.producer.sent == []
            # Every attempt is recorded once in the attempts topic, as a success.
            records = [r.json() for r in h.producer.unconfirmed]
            assert len(records) == 100
            assert all(r["ok"] and r["attempt"] == 1 for r in records)
            assert {r["webhook_id"] for r in records} == {"wh_a", "wh_b"}

    asyncio.run(main())


def test_an_unexpected_exception_in_a_delivery_is_a_failed_internal_attempt() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/a":
            raise RuntimeError("nobody foresaw this")
        return ok(request)

    async def main() -> None:
        before = sample("dispatcher_internal_errors_total", where="attempt")
        table = FakeTable(subscription("wh_a", A), subscription("wh_b", B))
        async with running(settings(), table, handler) as h:
            h.input.assign(0)
            h.input.feed([event("s1"), event("s2")])
            await until(lambda: h.input.stored.get(0) == 2, what="both offsets stored")
            assert idle(h)
            retries = [
                DeliveryRecord.model_validate_json(s.value or b"") for s in h.producer.to(STAGE_1)
            ]
            assert len(retries) == 2
            for record in retries:
                assert record.webhook_id == "wh_a"
                assert record.attempts_made == 1
                assert record.history[0].error_class == "internal"
                assert "RuntimeError" in (record.history[0].error or "")
        assert sample("dispatcher_internal_errors_total", where="attempt") == before + 2

    asyncio.run(main())


@pytest.mark.parametrize("url", ["https://h.example/a\x01b", "https://\u2603_.example/hook"])
def test_a_url_the_http_client_rejects_stops_no_one_else(url: str) -> None:
    seen: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return ok(request)

    async def main() -> None:
        # As if it had got past validation: the engine must hold whatever it is given.
        bad = subscription("wh_bad", A, org="org_bad").model_copy(update={"url": url})
        table = FakeTable(bad, subscription("wh_good", B, org="org_good"))
        s = settings(max_in_flight=8)
        async with running(s, table, handler) as h:
            h.input.assign(0)
            mixed = [
                event(f"{org}{i}", org=f"org_{org}") for i in range(40) for org in ("bad", "good")
            ]
            h.input.feed(mixed)
            await until(lambda: h.input.stored.get(0) == 80, what="every offset stored")
            assert len(seen) == 40 and {r.url.path for r in seen} == {"/b"}
            records = [DeliveryRecord.model_validate_json(x.value or b"") for x in h.producer.sent]
            # Failed attempts (retried later) until the circuit opened, then deferrals.
            assert len(records) == 40 and {r.webhook_id for r in records} == {"wh_bad"}
            attempted = [r for r in records if r.attempts_made]
            assert attempted and all(r.history[0].error_class == "internal" for r in attempted)
            assert idle(h)

    asyncio.run(main())


def test_an_exception_while_fanning_out_sends_the_message_to_the_invalid_topic() -> None:
    class Exploding(FakeTable):
        def for_organization(self, organization_id: str) -> tuple:  # type: ignore[type-arg]
            if organization_id == "org_poison":
                raise RecursionError("deep")
            return super().for_organization(organization_id)

    async def main() -> None:
        table = Exploding(subscription("wh_a", A))
        async with running(settings(), table, ok_async) as h:
            h.input.assign(0)
            h.input.feed([event("s1"), event("p", org="org_poison"), event("s2")])
            await until(lambda: h.input.stored.get(0) == 3, what="the partition to move on")
            invalid = h.producer.to("webhooks.invalid")
            assert len(invalid) == 1
            assert invalid[0].header(H_INVALID_REASON) == b"internal"
            assert json.loads(invalid[0].value or b"")["session_id"] == "p"
            assert idle(h)

    asyncio.run(main())


async def ok_async(request: httpx.Request) -> httpx.Response:
    return ok(request)


def test_an_exception_escaping_the_pump_fails_the_engine() -> None:
    async def main() -> None:
        before = sample("dispatcher_internal_errors_total", where="pump")
        async with running(settings(), FakeTable(subscription("wh_a", A)), ok_async) as h:

            def broken(_delivery: object) -> None:
                raise KeyError("bookkeeping bug")

            h.engine.runner.submit = broken  # type: ignore[method-assign]
            assert h.engine.failure is None
            h.input.assign(0)
            h.input.feed([event("s1")])
            assert h.engine.failure is not None and "pump" in h.engine.failure
        assert sample("dispatcher_internal_errors_total", where="pump") == before + 1

    asyncio.run(main())


def test_an_exception_in_the_supervision_tick_fails_the_engine() -> None:
    async def main() -> None:
        async with running(settings(), FakeTable(), ok_async) as h:

            def broken() -> None:
                raise ValueError("stall check bug")

            h.engine.runner.check_endpoints = broken  # type: ignore[method-assign]
            await until(lambda: h.engine.failure, what="the engine to fail")
            assert "supervision tick" in (h.engine.failure or "")

    asyncio.run(main())


def test_a_dead_consumer_or_producer_thread_fails_the_engine() -> None:
    async def main() -> None:
        async with running(settings(), FakeTable(), ok_async) as h:
            assert h.engine.ready and h.engine.failure is None
            h.consumers["5m"].failure = "the consumer thread of stage 5m died"
            assert h.engine.failure == "the consumer thread of stage 5m died"
            h.consumers["5m"].failure = None
            h.producer.failure = "the producer poll thread died"
            assert h.engine.failure == "the producer poll thread died"

    asyncio.run(main())


def test_a_lost_partition_gives_back_every_count_even_of_tasks_not_started() -> None:
    gate = asyncio.Event()
    handler = gated(gate)

    async def main() -> None:
        s = settings(max_in_flight_per_endpoint=2, endpoint_queue_size=100)
        async with running(s, FakeTable(subscription("wh_a", A)), handler) as h:
            h.input.assign(0)
            h.input.feed([event(f"s{i}") for i in range(10)])
            await until(lambda: h.engine.work.in_flight == 10, what="all ten in flight")
            h.input.lose(0)
            await until(lambda: idle(h), what="in-flight back to 0")
            assert h.input.stored == {}
            ep = h.engine.runner.endpoints.get("wh_a")
            assert ep is None or (ep.active == 0 and not ep.queue)

    asyncio.run(main())


def test_revoke_waits_for_in_flight_work_and_returns_the_position() -> None:
    gate = asyncio.Event()
    handler = gated(gate)

    async def main() -> None:
        async with running(settings(), FakeTable(subscription("wh_a", A)), handler) as h:
            h.input.assign(0, 1)
            h.input.feed([event("s1"), event("s2")], partition=1)
            await until(lambda: h.engine.work.in_flight == 2, what="two in flight")
            asyncio.get_running_loop().call_later(0.05, gate.set)
            offsets = await h.input.revoke(1)
            assert [(tp.partition, tp.offset) for tp in offsets] == [(1, 2)]
            assert idle(h)

    asyncio.run(main())


def test_shutdown_drains_in_flight_deliveries_then_closes() -> None:
    gate = asyncio.Event()
    handler = gated(gate)

    async def main() -> None:
        async with running(settings(), FakeTable(subscription("wh_a", A)), handler) as h:
            h.input.assign(0)
            h.input.feed([event("s1"), event("s2"), event("s3")])
            await until(lambda: h.engine.work.in_flight == 3, what="three in flight")
            asyncio.get_running_loop().call_later(0.05, gate.set)
            await h.engine.shutdown()
            assert h.input.stored == {0: 3}
            assert h.producer.closed and h.input.closed
            assert idle(h)

    asyncio.run(main())


@pytest.mark.parametrize("queue", [4, 0])
def test_a_busy_webhook_within_its_queue_wait_pauses_its_partition_instead_of_deferring(
    queue: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = asyncio.Event()
    keep = asyncio.Event()
    seen: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        await (keep if json.loads(request.content)["session_id"] == "keep" else gate).wait()
        seen.append(request)
        return ok(request)

    # Hold limits far longer than the test: the webhook is busy, never judged slow.
    monkeypatch.setattr(deliveries, "HOLD_MAX_S", 600.0)

    async def main() -> None:
        s = settings(endpoint_stall_s=60, endpoint_queue_size=queue, endpoint_queue_wait_s=600)
        taken = 4 + max(queue, 1)  # the slots, and the queue up to its bound (one at least)
        async with running(s, FakeTable(subscription("wh_a", A)), handler) as h:
            h.input.assign(0)
            # An answer to a request sent after its first answer measures it (a webhook
            # not measured yet may queue more, see the next tests), and one request
            # held open keeps it from going idle.
            gate.set()
            h.input.feed([event("keep"), event("first")])
            await until(lambda: len(seen) == 1, what="the first answer")
            h.input.feed([event("second")])
            await until(lambda: len(seen) == 2, what="the measuring answer")
            gate.clear()
            h.input.feed([event(f"s{i:03d}") for i in range(10)])
            # 4 running + a full queue: then the partition waits for the webhook...
            await until(lambda: h.engine.work.in_flight == taken, what="slots and queue taken")
            ps = h.engine.partitions[("visitor.identified", 0)]
            assert h.engine.backpressure.waits_for(ps) == {"wh_a"} and len(ps.buffer) == 10 - (
                taken - 1
            )
            assert 0 not in h.input.paused
            # ... and what comes in meanwhile fills its buffer until it is paused.
            h.input.feed([event(f"s{i:03d}") for i in range(10, 40)])
            await until(lambda: 0 in h.input.paused, what="the partition to be paused")
            assert h.engine.work.in_flight == taken
            assert h.producer.sent == []
            gate.set()
            keep.set()
            await until(lambda: h.input.stored.get(0) == 43, what="every offset stored")
            assert len(set(sessions(seen))) == 43
            assert h.producer.sent == [], "a busy but answering webhook was deferred"
            assert 0 not in h.input.paused

    asyncio.run(main())


def records_to(h: Harness, topic: str) -> list[DeliveryRecord]:
    return [DeliveryRecord.model_validate_json(x.value or b"") for x in h.producer.to(topic)]


def test_a_slow_webhook_parks_its_overflow_in_kafka_and_its_neighbour_keeps_the_partition() -> None:
    """S answers nothing yet (slower than its queue wait), F at once, in one partition."""
    gate = asyncio.Event()
    seen_s: list[httpx.Request] = []
    seen_f: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/a":
            await gate.wait()
            seen_s.append(request)
        else:
            seen_f.append(request)
        return ok(request)

    async def main() -> None:
        # The default queue wait (2 s): S has no measure yet, so it is its full
        # queue holding the partition past HOLD_MAX_S that says it is slow.
        # Slow or unmeasured endpoints' queues may hold half of 24 in-flight places.
        s = settings(endpoint_stall_s=60, partition_buffer_high=100, max_in_flight=24)
        table = FakeTable(
            subscription("wh_s", A, org="org_s"), subscription("wh_f", B, org="org_f")
        )
        before = sample("dispatcher_deferrals_total", reason="endpoint_slow")
        async with running(s, table, handler) as h:
            h.input.assign(0)
            # Interleaved: S, F, S, F, ... in the same partition.
            h.input.feed(
                [event(f"{org}{i:03d}", org=f"org_{org}") for i in range(30) for org in "sf"]
            )
            started = time.monotonic()
            await until(lambda: len(seen_f) == 30, what="every delivery of the healthy webhook")
            assert time.monotonic() - started < 1.0, "the partition waited for the slow webhook"
            assert seen_s == [], "the slow webhook answered: the test proves nothing"
            # S: 4 in its slots, its queue (up to the bound, more while the lanes'
            # half of the in-flight places has room), and the rest parked without
            # an attempt. The lanes' half counts the slots and queues of webhooks
            # not measured yet: F's too, for its first milliseconds, so S's queue
            # may stop short of its bound (S 4 + 3, F 4 + 1 of 12).
            lane = h.engine.runner.endpoints["wh_s"].queue
            await until(
                lambda: len(h.producer.to(STAGE_1)) == 30 - 4 - len(lane),
                what="the parked deliveries",
            )
            queued = len(lane)
            assert 3 <= queued <= 12, queued
            parked = records_to(h, STAGE_1)
            assert {r.webhook_id for r in parked} == {"wh_s"}
            assert all(r.attempts_made == 0 and r.deferrals == 1 for r in parked)
            assert all(x.header("dispatcher-attempt") == b"0" for x in h.producer.to(STAGE_1))
            after = sample("dispatcher_deferrals_total", reason="endpoint_slow")
            assert after - before == 30 - 4 - queued
            # Paced to the webhook's rate, never later than the stage's delay.
            dues = [int(x.header("dispatcher-due-ms") or 0) for x in h.producer.to(STAGE_1)]
            now = datetime.now(UTC).timestamp() * 1000
            assert dues == sorted(dues)
            assert all(now < due <= now + 60_000 for due in dues), (now, dues)
            assert h.engine.work.in_flight == 4 + queued
            # The partition was never paused, and its offsets stop at S's first waiting one.
            assert 0 not in h.input.paused
            assert h.input.stored.get(0, 0) == 0
            ps = h.engine.partitions[("visitor.identified", 0)]
            assert h.engine.backpressure.waits_for(ps) == set() and not ps.buffer
            await until(
                lambda: sample("dispatcher_endpoint_backlog", webhook_id="wh_s") >= 4,
                what="the backlog metric",
            )
            assert sample("dispatcher_endpoint_backlog", webhook_id="wh_f") == 0

            # S answers: what waited here is delivered and the partition committed.
            gate.set()
            await until(lambda: h.input.stored.get(0) == 60, what="every offset stored")
            assert len(seen_s) == 4 + queued
            # The parked ones come back through the stage (all at once here, so some
            # find the queue full and are parked again), each with its first attempt.
            stage = h.consumers["1m"]
            stage.assign(0)
            fed = 0
            while len(seen_s) < 30:
                parked_now = h.producer.to(STAGE_1)
                assert fed < len(parked_now), "nothing left to come back, yet S is short"
                values = [x.value or b"" for x in parked_now[fed:]]
                stage.feed(values, headers=[("dispatcher-due-ms", b"0")])
                fed = len(parked_now)
                await until(lambda n=fed: stage.stored.get(0) == n, what="a round handled")
            assert sorted(sessions(seen_s)) == [f"s{i:03d}" for i in range(30)]
            attempts = [json.loads(x.value) for x in h.producer.unconfirmed]
            s_attempts = [a["attempt"] for a in attempts if a["webhook_id"] == "wh_s"]
            assert s_attempts == [1] * 30, "waiting spent an attempt"

    asyncio.run(main())


def test_a_healthy_webhook_whose_first_answers_pay_for_a_cold_start_is_not_parked() -> None:
    """Right after a restart, with a backlog: three 20 ms webhooks on one host, whose
    first answers (one per slot, each on a new connection) take 0.6 s."""
    served: Counter[str] = Counter()

    async def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        served[path] += 1
        await asyncio.sleep(0.6 if served[path] <= SLOTS else 0.02)
        return ok(request)

    async def main() -> None:
        # As in test_crash.py: the slots and queues of three webhooks take more than
        # the in-flight places, so no queue fills and the lanes' share is spent.
        s = settings(
            endpoint_stall_s=60,
            max_in_flight=128,
            max_in_flight_per_endpoint=SLOTS,
            endpoint_queue_size=64,
            partition_buffer_high=40,
            partition_buffer_low=10,
        )
        paths = ("a", "b", "c")
        table = FakeTable(*(subscription(f"wh_{p}", f"{HOST}/{p}", org=f"org_{p}") for p in paths))
        before = sample("dispatcher_deferrals_total", reason="endpoint_slow")
        async with running(s, table, handler) as h:
            h.input.assign(0, 1, 2)
            for partition in range(3):
                h.input.feed(
                    [
                        event(f"{p}{partition}-{i:03d}", org=f"org_{p}")
                        for i in range(60)
                        for p in paths
                    ],
                    partition=partition,
                )
            await until(
                lambda: all(h.input.stored.get(p) == 180 for p in range(3)),
                timeout_s=20,
                what="every offset stored",
            )
            # Queued 8 to 1 against its slots, a 0.6 s answer would be a 4.5 s wait:
            # slow, were those answers its pace. The next ones show it is not.
            deferred = sample("dispatcher_deferrals_total", reason="endpoint_slow") - before
            assert deferred == 0, f"a healthy webhook had {deferred:g} deliveries parked"
            assert h.producer.sent == []
            assert served == {f"/{p}": 180 for p in paths}

    asyncio.run(main())


class FixedLag(LoopLag):
    """A loop lag that says what the test chose, whatever the tick measures."""

    def __init__(self, lagging: bool) -> None:
        super().__init__()
        self._lagging = lagging

    @property
    def lagging(self) -> bool:
        return self._lagging


@pytest.mark.parametrize("lagging", [False, True], ids=["punctual_loop", "lagging_loop"])
def test_while_the_event_loop_lags_a_webhook_measured_slow_is_not_parked(lagging: bool) -> None:
    """A webhook whose answers measure 0.2 s: a queue of 4 is 0.2 s of its work, more
    than the 0.1 s queue wait, so it is slow and its overflow is parked; unless the
    loop lags, when the measure says more about this process than about it."""
    served: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.2)
        served.append(request)
        return ok(request)

    async def main() -> None:
        s = settings(endpoint_stall_s=60, endpoint_queue_wait_s=0.1, partition_buffer_high=100)
        table = FakeTable(subscription("wh_a", A))
        before = sample("dispatcher_deferrals_total", reason="endpoint_slow")
        async with running(s, table, handler) as h:
            h.engine.runner.loop_lag = FixedLag(lagging)
            h.input.assign(0)
            h.input.feed([event(f"warm{i}") for i in range(8)])
            await until(
                lambda: (
                    "wh_a" in h.engine.runner.endpoints
                    and h.engine.runner.endpoints["wh_a"].measured
                ),
                what="the webhook measured",
            )
            h.input.feed([event(f"s{i:03d}") for i in range(24)])
            if not lagging:
                await until(lambda: h.producer.to(STAGE_1), what="a parked delivery")
                parked = sample("dispatcher_deferrals_total", reason="endpoint_slow") - before
                assert parked > 0
                assert {r.webhook_id for r in records_to(h, STAGE_1)} == {"wh_a"}
                return
            await until(lambda: h.input.stored.get(0) == 32, what="every offset stored")
            assert sample("dispatcher_deferrals_total", reason="endpoint_slow") == before
            assert h.producer.sent == [], "a delivery was parked while the loop lagged"
            assert len(served) == 32

    asyncio.run(main())


def test_the_engine_measures_its_event_loop_lag_and_gets_over_it() -> None:
    async def main() -> None:
        async with running(settings(), FakeTable(), ok) as h:
            lag = h.engine.loop_lag
            # Its supervision tick is asleep once it has measured a first sleep.
            await until(lambda: lag.measures >= 1, what="a first tick")
            assert not lag.lagging
            # The loop is held, as a starved process's is: the tick wakes late.
            time.sleep(0.4)  # the lag under test, not a wait for anything
            await until(lambda: lag.lagging, what="the lag noticed")
            assert sample("dispatcher_event_loop_lag_seconds") > 0.1
            # Punctual ticks again: the smoothed lag falls below the bound.
            await until(lambda: not lag.lagging, what="the lag gone")
            assert sample("dispatcher_event_loop_lag_seconds") <= 0.1

    asyncio.run(main())


def test_new_deliveries_queue_behind_parked_ones_and_returning_ones_go_first() -> None:
    keep, first, rest = asyncio.Event(), asyncio.Event(), asyncio.Event()
    seen: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        session = json.loads(request.content)["session_id"]
        if session.startswith("warm"):
            await asyncio.sleep(0.2)  # measured: 4 slots at 0.2 s, 20 a second
        else:
            await {"keep": keep, "s000": first}.get(session, rest).wait()
        seen.append(request)
        return ok(request)

    async def main() -> None:
        # A queue of 4 is 0.2 s of its work, more than the queue wait: it is slow.
        s = settings(endpoint_stall_s=60, endpoint_queue_wait_s=0.1)
        async with running(s, FakeTable(subscription("wh_a", A)), handler) as h:
            h.input.assign(0)
            h.input.feed([event("keep"), event("warm")])
            await until(lambda: len(seen) == 1, what="the first answer")
            # Sent after its first answer, so it measures the webhook, not its start.
            h.input.feed([event("warm-again")])
            await until(lambda: len(seen) == 2, what="the measuring answer")
            ep = h.engine.runner.endpoints["wh_a"]
            h.input.feed([event(f"s{i:03d}") for i in range(9)])
            # 3 free slots, a queue of 4, and the last two parked.
            await until(lambda: len(h.producer.to(STAGE_1)) == 2, what="the first parkings")
            assert len(ep.queue) == 4
            # One answer: a queued delivery takes the slot, the queue has room (3 of 4) ...
            first.set()
            await until(lambda: len(ep.queue) == 3, what="a queued delivery started")
            # ... yet a new delivery goes behind the parked ones, not into that room ...
            h.input.feed([event("s009")])
            await until(lambda: len(h.producer.to(STAGE_1)) == 3, what="the new one parked")
            assert records_to(h, STAGE_1)[2].delivery_id not in {
                r.delivery_id for r in records_to(h, STAGE_1)[:2]
            }
            # ... while a parked one, coming back, takes it.
            stage = h.consumers["1m"]
            stage.assign(0)
            back = h.producer.to(STAGE_1)[0]
            stage.feed([back.value or b""], headers=[("dispatcher-due-ms", b"0")])
            await until(lambda: len(ep.queue) == 4, what="the returning one queued")
            assert len(h.producer.to(STAGE_1)) == 3
            rest.set()
            keep.set()
            await until(lambda: stage.stored.get(0) == 1, what="the returning one delivered")
            session = json.loads(back.json()["body"])["session_id"]
            assert session in sessions(seen)
            assert len(seen) == 3 + 7 + 1

    asyncio.run(main())


def test_a_stalled_webhook_is_deferred_and_its_neighbour_on_the_same_host_is_served() -> None:
    seen: list[httpx.Request] = []
    hang = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/a":
            await hang.wait()
        seen.append(request)
        return ok(request)

    async def main() -> None:
        s = settings(endpoint_stall_s=0.1, http_timeout_s=60)
        table = FakeTable(subscription("wh_a", A), subscription("wh_b", B))
        async with running(s, table, handler) as h:
            h.input.assign(0)
            h.input.feed([event(f"s{i:03d}") for i in range(60)])
            await until(lambda: len(seen) == 60, what="every event at the healthy webhook")
            await until(
                lambda: len(h.producer.to(STAGE_1)) == 56, what="the stalled one's deferrals"
            )
            records = [
                DeliveryRecord.model_validate_json(x.value or b"") for x in h.producer.to(STAGE_1)
            ]
            assert {r.webhook_id for r in records} == {"wh_a"}
            assert all(r.attempts_made == 0 and r.deferrals == 1 for r in records)
            assert all(x.header("dispatcher-attempt") == b"0" for x in h.producer.to(STAGE_1))
            # Only the four stuck in the stalled webhook's slots hold the partition back.
            assert h.input.stored.get(0, 0) == 0
            assert h.engine.work.in_flight == 4
            hang.set()
            await until(lambda: h.input.stored.get(0) == 60, what="the partition to move on")

    asyncio.run(main())


async def dead_webhook(_request: httpx.Request) -> httpx.Response:
    return reply(503)


@contextlib.asynccontextmanager
async def dead_webhook_with_open_circuit() -> AsyncIterator[Harness]:
    """An engine whose one webhook answers 503 and whose circuit one failure opened."""
    s = settings(circuit_failure_threshold=1, circuit_cooldown_s=600)
    async with running(s, FakeTable(subscription("wh_a", A)), dead_webhook) as h:
        h.input.assign(0)
        h.input.feed([event("opens-the-circuit")])
        await until(lambda: len(h.producer.to(STAGE_1)) == 1, what="the failed attempt")
        yield h


def _retry_message(first_deferred: datetime) -> bytes:
    record = DeliveryRecord(
        delivery_id="msg_old",
        webhook_id="wh_a",
        organization_id="org_abc123",
        event="visitor.identified",
        event_timestamp=first_deferred,
        body=event("old").decode(),
        attempts_made=0,
        deferrals=40,
        first_deferred_at=first_deferred,
        source=Source(topic="visitor.identified", partition=0, offset=0),
    )
    return record.to_json()


@pytest.mark.parametrize("age_h", [71, 73])
def test_a_delivery_deferred_past_the_age_limit_is_dead_lettered(age_h: int) -> None:
    async def main() -> None:
        async with dead_webhook_with_open_circuit() as h:
            stage = h.consumers["1m"]
            stage.assign(0)
            first = datetime.now(UTC) - timedelta(hours=age_h)
            stage.feed([_retry_message(first)], headers=[("dispatcher-due-ms", b"0")])
            await until(lambda: stage.stored.get(0) == 1, what="the retry record to be handled")
            dead = h.producer.to("webhooks.dead-letter")
            if age_h > 72:
                assert len(dead) == 1
                record = DeliveryRecord.model_validate_json(dead[0].value or b"")
                assert record.dead_letter_reason == ENDPOINT_UNAVAILABLE
                assert record.delivery_id == "msg_old"
                # Deferred, never attempted: no attempt spent on it, none in its history.
                assert record.attempts_made == 0 and record.history == []
                assert record.first_deferred_at == first and record.dead_lettered_at is not None
            else:
                assert dead == []
                # Deferred once more by the open circuit: paced, in the last stage.
                deferred = [
                    DeliveryRecord.model_validate_json(x.value or b"")
                    for x in h.producer.to(STAGE_2)
                ]
                assert deferred[-1].delivery_id == "msg_old"
                assert deferred[-1].deferrals == 41
                assert deferred[-1].first_deferred_at == first

    asyncio.run(main())


def test_a_partition_that_does_not_move_is_reported_stuck_then_clears() -> None:
    gate = asyncio.Event()
    handler = gated(gate)

    async def main() -> None:
        s = settings(stuck_partition_after_s=0.2, endpoint_stall_s=60)
        async with running(s, FakeTable(subscription("wh_a", A)), handler) as h:
            h.input.assign(0, 1)
            h.input.feed([event("s1")], partition=1)
            await until(lambda: h.engine.stuck, what="the partition to be reported stuck")
            assert h.engine.stuck[0].startswith("visitor.identified/1 for ")
            assert sample("dispatcher_stuck_partitions") == 1
            gate.set()
            await until(lambda: not h.engine.stuck, what="the report to clear")
            assert sample("dispatcher_stuck_partitions") == 0

    asyncio.run(main())


def test_a_second_copy_of_a_hop_is_skipped_and_a_fresh_chain_is_not() -> None:
    """A crash can leave one hop written twice; only the first copy goes on."""

    async def main() -> None:
        async with dead_webhook_with_open_circuit() as h:
            before = sample("dispatcher_skipped_deliveries_total", reason="duplicate_copy")
            stage = h.consumers["1m"]
            stage.assign(0)
            copy = _retry_message(datetime.now(UTC) - timedelta(hours=1))
            replayed = DeliveryRecord.model_validate_json(copy)
            replayed.deferrals = 0
            replayed.first_deferred_at = None
            due = [("dispatcher-due-ms", b"0")]
            # The copy twice, then a replayed record (a fresh chain) twice.
            stage.feed([copy, copy, replayed.to_json(), replayed.to_json()], headers=due)
            await until(lambda: stage.stored.get(0) == 4, what="all four handled")
            # Repeated deferrals of the open circuit wait in the last stage.
            sent = h.producer.to(STAGE_1)[1:] + h.producer.to(STAGE_2)
            deferred = [DeliveryRecord.model_validate_json(x.value or b"") for x in sent]
            assert sorted(r.deferrals for r in deferred) == [1, 1, 41]
            skipped = sample("dispatcher_skipped_deliveries_total", reason="duplicate_copy")
            assert skipped - before == 1

    asyncio.run(main())


def test_an_open_circuit_paces_what_it_defers_again_and_counts_it_per_webhook() -> None:
    """Deliveries deferred before come due 1 / DISPATCHER_CIRCUIT_DEFERRALS_PER_S apart."""

    async def main() -> None:
        async with dead_webhook_with_open_circuit() as h:
            before = sample(
                "dispatcher_webhook_deferrals_total", webhook_id="wh_a", reason="circuit_open"
            )
            stage = h.consumers["1m"]
            stage.assign(0)
            now = datetime.now(UTC)
            backlog = []
            for i in range(20):
                record = DeliveryRecord.model_validate_json(_retry_message(now))
                record.delivery_id = f"msg_{i}"
                record.deferrals = 1
                backlog.append(record.to_json())
            sent_at_ms = now.timestamp() * 1000
            stage.feed(backlog, headers=[("dispatcher-due-ms", b"0")])
            await until(lambda: stage.stored.get(0) == 20, what="the backlog handled")
            ids = {f"msg_{i}".encode() for i in range(20)}
            again = [s for s in h.producer.sent if s.key in ids]
            assert len(again) == 20
            dues = sorted(int(dict(s.headers)["dispatcher-due-ms"]) for s in again)
            spacing = [b - a for a, b in itertools.pairwise(dues)]
            assert min(spacing) >= 99  # 10 a second, the default
            assert dues[0] >= sent_at_ms + 60_000  # never sooner than the usual delay
            # They wait in the last stage, never past its delay.
            assert {s.topic for s in again} == {STAGE_2}
            assert dues[-1] <= sent_at_ms + 300_000 + 5_000
            after = sample(
                "dispatcher_webhook_deferrals_total", webhook_id="wh_a", reason="circuit_open"
            )
            assert after - before == 20

    asyncio.run(main())


def only_f_answers() -> tuple[asyncio.Event, Counter[str], Handler]:
    """A handler that answers ``/f`` at once and every other path once the gate is
    set, and counts the answers per path."""
    gate = asyncio.Event()
    seen: Counter[str] = Counter()

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path != "/f":
            await gate.wait()
        seen[request.url.path] += 1
        return ok(request)

    return gate, seen, handler


async def measure_f(h: Harness, seen: Counter[str]) -> None:
    """F (organization ``org_f``) measured: an answer to a request sent after its
    first answer. Its bursts then take nothing of the lanes' half. Clears ``seen``."""
    h.input.feed([event("f-warm0", org="org_f")])
    await until(lambda: seen["/f"] == 1, what="F's first answer")
    h.input.feed([event("f-warm1", org="org_f")])
    await until(lambda: seen["/f"] == 2, what="F's measuring answer")
    seen.clear()


def test_a_burst_to_a_webhook_being_judged_never_holds_its_neighbour_and_its_excess_is_parked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """S, not measured yet and answering nothing, and F, in one partition.

    S's slots and queue reach the lanes' half of the in-flight places (12 of 24):
    S is then judged, and while it is, its burst waits in the quarter beyond the
    half instead of holding the partition, so F's deliveries go on. The verdict
    (no answer within ``HOLD_MAX_S`` while F answered) parks, without an attempt,
    what S holds beyond the half.
    """
    gate, seen, handler = only_f_answers()

    # Long enough that the first part of the test is over before the verdict.
    monkeypatch.setattr(deliveries, "HOLD_MAX_S", 1.0)

    async def main() -> None:
        s = settings(endpoint_stall_s=60, max_in_flight=24, partition_buffer_high=200)
        table = FakeTable(
            *(subscription(f"wh_{p}", f"{HOST}/{p}", org=f"org_{p}") for p in ("s", "f"))
        )
        async with running(s, table, handler) as h:
            h.input.assign(0)
            await measure_f(h, seen)
            # 16 of S's: 4 in its slots and 12 queued, past the half (12) and within
            # three quarters (18), with one of F's after each.
            started = time.monotonic()
            h.input.feed([event(f"{o}{i:03d}", org=f"org_{o}") for i in range(16) for o in "sf"])
            await until(lambda: seen["/f"] == 16, what="F's deliveries while S is judged")
            ep = h.engine.runner.endpoints["wh_s"]
            ps = h.engine.partitions[("visitor.identified", 0)]
            # Before the verdict: nothing parked, the partition never held.
            assert time.monotonic() - started < 1.0, "the verdict came first: proves nothing"
            assert h.producer.to(STAGE_1) == [] and ep.active + len(ep.queue) == 16
            assert h.engine.backpressure.waits_for(ps) == set() and 0 not in h.input.paused
            # The verdict: what is beyond the half goes to Kafka, without an attempt.
            await until(lambda: h.producer.to(STAGE_1), what="S's excess parked")
            assert ep.overloaded_by_hold() and ep.active + len(ep.queue) == 12
            parked = records_to(h, STAGE_1)
            assert len(parked) == 4 and {r.webhook_id for r in parked} == {"wh_s"}
            assert all(r.attempts_made == 0 for r in parked)
            # The newest were parked: the queue keeps the oldest, in order.
            assert [json.loads(r.body)["session_id"] for r in parked] == [
                f"s{i:03d}" for i in range(12, 16)
            ]
            gate.set()
            await until(lambda: h.engine.work.in_flight == 0, what="S's slots and queue answered")
            assert seen["/s"] == 12

    asyncio.run(main())


def test_a_webhook_met_cold_by_a_starved_process_is_not_judged_slow() -> None:
    """S, not measured yet, answers every request after 20 ms: healthy. Its burst
    starts its judging, and then the process is starved: F's first request while S
    is judged holds the loop for three times ``HOLD_MAX_S`` (a CPU hog on a shared
    core). F answered meanwhile and S's answers are due but not read yet when the
    verdict's call runs, late: it gives no verdict, and S, once read, keeps every
    delivery; none is parked."""
    seen: Counter[str] = Counter()
    starved: list[bool] = []
    runner: list[DeliveryRunner] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/s":
            await asyncio.sleep(0.02)
        elif runner and runner[0]._judging and not starved:
            starved.append(True)
            time.sleep(3 * deliveries.HOLD_MAX_S)  # the loop gets no CPU meanwhile
        seen[request.url.path] += 1
        return ok(request)

    async def main() -> None:
        s = settings(endpoint_stall_s=60, max_in_flight=24, partition_buffer_high=200)
        table = FakeTable(
            *(subscription(f"wh_{p}", f"{HOST}/{p}", org=f"org_{p}") for p in ("s", "f"))
        )
        async with running(s, table, handler) as h:
            runner.append(h.engine.runner)
            h.input.assign(0)
            await measure_f(h, seen)
            h.input.feed([event(f"{o}{i:03d}", org=f"org_{o}") for i in range(16) for o in "sf"])
            await until(lambda: seen["/f"] == 16, what="F's deliveries")
            await until(lambda: h.engine.work.in_flight == 0, what="S's deliveries answered")
            assert starved, "S was never judged: the test proves nothing"
            assert h.producer.to(STAGE_1) == [], "a healthy webhook was parked"
            assert seen["/s"] == 16
            assert not h.engine.runner.endpoints["wh_s"].overloaded_by_hold()
            assert h.engine.runner._judging == {}

    asyncio.run(main())


def test_a_second_slow_webhook_met_while_the_first_fills_its_lane_is_parked_too() -> None:
    """S1 and S2 (two organizations) answer nothing yet, F at once, in one partition.

    S1's slots and queue, not measured yet, hold the lanes' half of the in-flight
    places when S2 comes. S2's slots and queue, not measured either, must not take
    the rest: they did while the half counted only queues (S1 4 + 12, S2 4 + 4 of 24
    places), and F waited for S1's answers. Counting S1's slots in the half leaves
    room for S2's slots and queue and for F; what S2's full queue does not hold is
    parked once the hold judges it.
    """
    gate, seen, handler = only_f_answers()

    def interleaved(slow: str, first: int) -> list[bytes]:
        return [
            event(f"{org}{i:03d}", org=f"org_{org}")
            for i in range(first, first + 30)
            for org in (slow, "f")
        ]

    async def main() -> None:
        # 4 slots and a queue of 4 each; the lanes' half is 12 of 24 places.
        s = settings(endpoint_stall_s=60, max_in_flight=24, partition_buffer_high=200)
        table = FakeTable(
            *(subscription(f"wh_{p}", f"{HOST}/{p}", org=f"org_{p}") for p in ("s1", "s2", "f"))
        )
        async with running(s, table, handler) as h:
            h.input.assign(0)
            await measure_f(h, seen)
            h.input.feed(interleaved("s1", 0))
            await until(lambda: seen["/f"] == 30, what="F's deliveries next to S1")
            # S1's check: its slots and queue are counted, the rest parked.
            await until(lambda: h.producer.to(STAGE_1), what="S1's overflow parked")
            h.engine.runner.check_endpoints()
            assert h.engine.runner.slow_queued >= 12 // 2, "S1's lane holds too little"
            h.input.feed(interleaved("s2", 30))
            started = time.monotonic()
            await until(lambda: seen["/f"] == 60, what="F's deliveries next to S1 and S2")
            assert time.monotonic() - started < 1.0, "F waited for the slow webhooks"
            assert seen["/s1"] == seen["/s2"] == 0, "a slow webhook answered: proves nothing"
            parked = Counter(r.webhook_id for r in records_to(h, STAGE_1))
            assert parked["wh_s2"] > 0 and parked["wh_f"] == 0, parked
            # F keeps places: S1's lane within the half (one more may queue before
            # the hold judges it), S2's slots and its queue of 4.
            runner = h.engine.runner

            def lanes() -> int:
                return sum(len(ep.queue) + ep.active for ep in runner.endpoints.values())

            await until(lambda: h.engine.work.in_flight == lanes(), what="the last parkings")
            assert lanes() <= 12 + 1 + 4 + 4, lanes()
            gate.set()
            await until(lambda: h.engine.work.in_flight == 0, what="the slots and queues answered")
            parked = Counter(r.webhook_id for r in records_to(h, STAGE_1))
            assert seen["/s1"] + seen["/s2"] + parked["wh_s1"] + parked["wh_s2"] == 60
            assert all(r.attempts_made == 0 for r in records_to(h, STAGE_1))

    asyncio.run(main())
