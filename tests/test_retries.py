"""Retry topics and the dead-letter topic, end to end.

Real broker, real ``dispatcher run`` processes, real HTTPS receivers, and retry
delays of a few seconds. Every retry's arrival is held against the due time its
record carried (``dispatcher-due-ms``): it may be late, never early (beyond
``SLACK_MS`` of clock granularity). How late is collected across the module and
summed up at its end (shown with ``pytest -s``, and as junit-xml properties).
Dropping the retry of a deleted or disabled subscription, and the headers each hop
is written with, are the engine's decisions, checked in-process in
test_engine_decisions.py.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import signal
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
from confluent_kafka import Consumer, Message, TopicPartition
from confluent_kafka.admin import AdminClient

from dispatcher.records import H_ATTEMPT, H_DELIVERY_ID, H_DUE_MS
from dispatcher.stages import RetryStage, retry_stages
from tests.receiver import HttpsReceiver, ReceivedRequest, Reply
from tests.support import (
    BOOTSTRAP,
    REPO,
    ROUTING_HEADERS,
    SEED_EVENT,
    DispatcherProcess,
    Namespace,
    free_port,
    metric_value,
    wait_until,
)

SECRET = "whsec_c2VjcmV0LW5ldmVyLWluLWEtcmVjb3Jk"
#: Clock granularity allowed in the "not early" direction only.
SLACK_MS = 50.0
SLACK_S = SLACK_MS / 1000
RECORD_SCHEMA = json.loads((REPO / "schemas" / "delivery-record.schema.json").read_text())
#: Deadlines are generous: the machine is shared; the checks are about order and timing.
SETTLE_S = 90.0

StartDispatcher = Callable[..., DispatcherProcess]
#: Many failing subscriptions share one receiver, one endpoint: keep its circuit
#: closed, or deliveries would be deferred instead of attempted.
NO_BREAKER = {"circuit_failure_threshold": 1000}


# --- the lateness of retries ---------------------------------------------------------


@dataclass(frozen=True)
class Try:
    """One attempt as seen from outside: which delivery, which attempt, when it started."""

    delivery_id: str
    attempt: int
    at_ms: float


@dataclass
class LatenessLog:
    """Milliseconds from each retry's due time to its arrival, for the whole module."""

    samples: list[float] = field(default_factory=list)

    def summary(self) -> str:
        if not self.samples:
            return "retry lateness: no samples"
        return (
            f"retry lateness over {len(self.samples)} retries: "
            f"median {statistics.median(self.samples):.1f} ms, "
            f"worst {max(self.samples):.1f} ms, best {min(self.samples):.1f} ms"
        )


@pytest.fixture(scope="module")
def lateness_log(record_testsuite_property: Callable[[str, object], None]) -> Iterator[LatenessLog]:
    log = LatenessLog()
    yield log
    print(f"\n{log.summary()}")
    if log.samples:
        record_testsuite_property("retry_lateness_median_ms", round(statistics.median(log.samples)))
        record_testsuite_property("retry_lateness_worst_ms", round(max(log.samples)))


@dataclass
class RetryClock:
    """Checks that retries came at or after their due time, and logs how late."""

    log: LatenessLog
    record_property: Callable[[str, object], None]

    def check(self, ns: Namespace, tries: Iterable[Try]) -> list[float]:
        dues = due_times(ns)
        late: list[float] = []
        shown: list[str] = []
        for t in sorted(tries, key=lambda t: t.at_ms):
            if t.attempt == 1:
                continue
            due = dues.get((t.delivery_id, t.attempt - 1))
            assert due is not None, f"no retry record led to attempt {t.attempt} of {t.delivery_id}"
            lateness = t.at_ms - due
            assert lateness >= -SLACK_MS, (
                f"attempt {t.attempt} of {t.delivery_id} came {-lateness:.0f} ms before it was due"
            )
            late.append(lateness)
            shown.append(f"{t.delivery_id[-6:]}#{t.attempt} {lateness:.1f}")
        assert late, "no retry to measure"
        self.log.samples.extend(late)
        self.record_property("retry_lateness_ms", [round(x, 1) for x in late])
        print(f"\nretry lateness (ms), by delivery#attempt: {', '.join(shown)}")
        return late


@pytest.fixture
def clock(lateness_log: LatenessLog, record_property: Callable[[str, object], None]) -> RetryClock:
    return RetryClock(lateness_log, record_property)


def tries_of(requests: Iterable[ReceivedRequest]) -> list[Try]:
    return [Try(delivery_id_of(r), attempt_of(r), r.received_at * 1000) for r in requests]


def attempt_of(request: ReceivedRequest) -> int:
    return int(request.header("x-bullseye-attempt") or 0)


def delivery_id_of(request: ReceivedRequest) -> str:
    return request.header("x-bullseye-delivery-id") or ""


# --- reading what the dispatcher wrote ----------------------------------------------


def headers_of(msg: Message) -> list[tuple[str, bytes]]:
    raw = msg.headers() or []
    pairs = list(raw.items()) if isinstance(raw, dict) else list(raw)
    return [(k, v if isinstance(v, bytes) else b"") for k, v in pairs]


def header(msg: Message, name: str) -> str:
    values = [v for k, v in headers_of(msg) if k == name]
    assert len(values) == 1, f"header {name}: {values}"
    return values[0].decode()


def stage_records(ns: Namespace, stage: RetryStage) -> list[Message]:
    return ns.read_all(stage.topic)


def due_times(ns: Namespace) -> dict[tuple[str, int], int]:
    """Due time (epoch ms) of every retry record, by (delivery id, attempts made)."""
    dues: dict[tuple[str, int], int] = {}
    for stage in retry_stages(ns.settings):
        for msg in stage_records(ns, stage):
            key = (header(msg, H_DELIVERY_ID), int(header(msg, H_ATTEMPT)))
            assert key not in dues, f"two retry records for attempt {key[1]} of {key[0]}"
            dues[key] = int(header(msg, H_DUE_MS))
    return dues


def dead_letters(ns: Namespace, count: int) -> list[Message]:
    def enough() -> list[Message]:
        found = ns.read_all(ns.settings.dead_letter_topic)
        return found if len(found) >= count else []

    return wait_until(
        enough,
        SETTLE_S,
        f"{count} dead-letter record(s)",
        interval_s=0.5,
    )


def committed_to_end(group: str, topic: str) -> bool:
    """Whether ``group`` committed every partition of ``topic`` up to its end."""
    consumer = Consumer(
        {"bootstrap.servers": BOOTSTRAP, "group.id": group, "enable.auto.commit": False}
    )
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        tps = [TopicPartition(topic, p) for p in meta.partitions]
        for tp in consumer.committed(tps, timeout=10):
            low, high = consumer.get_watermark_offsets(tp, timeout=10)
            if high > low and tp.offset < high:
                return False
        return True
    finally:
        consumer.close()


def everything_committed(ns: Namespace) -> bool:
    """Input and every retry stage finished: their groups committed up to the end."""
    s = ns.settings
    if not committed_to_end(s.group_id, s.input_topic):
        return False
    return all(
        committed_to_end(f"{s.group_id}.{stage.name}", stage.topic) for stage in retry_stages(s)
    )


def wait_settled(ns: Namespace, proc: DispatcherProcess) -> None:
    """Wait until nothing is in flight and every offset is committed: no attempt is left."""
    wait_until(
        lambda: (
            metric_value(proc.metrics(), "dispatcher_in_flight_deliveries") == 0
            and everything_committed(ns)
        ),
        SETTLE_S,
        "every delivery to finish and every offset to be committed",
        interval_s=0.5,
    )


def assigned_partitions(proc: DispatcherProcess, stage: str) -> list[list[int]]:
    """Every assignment of ``stage`` this process logged, in order."""
    found = []
    prefix = f"stage {stage} assigned "
    for line in proc.logs().splitlines():
        try:
            message = json.loads(line).get("message", "")
        except json.JSONDecodeError:
            continue
        if message.startswith(prefix):
            rest = message.removeprefix(prefix)
            found.append([] if rest == "nothing" else json.loads(rest))
    return found


def assert_not_due_yet(due_ms: int, event: str) -> None:
    """The scenario needs retries still waiting after ``event``; say how much time was left."""
    margin_s = due_ms / 1000 - time.time()
    print(f"\n{margin_s:.1f} s before the first retry was due, after {event}")
    assert margin_s > 0, f"the retries came due before {event}: the delays are too short"


def _all_retried(ns: Namespace, stage: RetryStage, count: int) -> list[Message]:
    found = stage_records(ns, stage)
    return found if len(found) == count else []


def subscribe_paths(
    ns: Namespace, receiver: HttpsReceiver, paths: Iterable[str], *replies: Reply
) -> dict[str, str]:
    """One subscription per path, each with its own scripted replies; path -> webhook id."""
    out = {}
    for path in paths:
        receiver.respond(path, *replies)
        out[path] = ns.subscribe(receiver.url(path)).webhook_id
    return out


# --- the tests ----------------------------------------------------------------------


def test_third_attempt_is_on_time_with_the_same_bytes_and_delivery_id(
    ns: Namespace, receiver: HttpsReceiver, run_dispatcher: StartDispatcher, clock: RetryClock
) -> None:
    receiver.respond("/flaky", Reply(500), Reply(500), Reply(200))
    ns.subscribe(receiver.url("/flaky"), secret=SECRET)
    proc = run_dispatcher(ns)
    ns.publish(SEED_EVENT)

    reqs = receiver.wait_for_requests(3, path="/flaky", timeout_s=SETTLE_S)
    assert [attempt_of(r) for r in reqs] == [1, 2, 3]
    ids = {r.header("x-bullseye-delivery-id") for r in reqs}
    assert len(ids) == 1 and None not in ids
    assert {r.header("webhook-id") for r in reqs} == ids
    assert {r.body for r in reqs} == {reqs[0].body}
    assert json.loads(reqs[0].body) == SEED_EVENT
    for r in reqs:
        expected = hmac.new(SECRET.encode(), r.body, hashlib.sha256).hexdigest()
        assert r.header("x-bullseye-signature") == expected
    # Each retry waits its stage's delay after the failure before it, at least.
    delays = ns.settings.retry_delays_s
    for before, after, delay_s in zip(reqs, reqs[1:], delays, strict=False):
        assert after.received_at >= before.received_at + delay_s - SLACK_S
    clock.check(ns, tries_of(reqs))

    wait_settled(ns, proc)
    assert len(receiver.requests_to("/flaky")) == 3
    assert not ns.read_all(ns.settings.dead_letter_topic)


def test_always_failing_endpoints_are_dead_lettered_after_four_attempts(
    ns_factory: Callable[..., Namespace],
    receiver: HttpsReceiver,
    run_dispatcher: StartDispatcher,
    clock: RetryClock,
) -> None:
    ns = ns_factory(http_timeout_s=1.0, response_snippet_bytes=32, **NO_BREAKER)
    error_body = b"upstream exploded: " + b"x" * 300
    receiver.respond("/down", Reply(500, body=error_body))
    # Stalls past the 1 s timeout on every attempt.
    receiver.respond("/stall", Reply(200, delay_s=3.0))
    down = ns.subscribe(receiver.url("/down"), secret=SECRET)
    stall = ns.subscribe(receiver.url("/stall"), secret=SECRET)
    closed = ns.subscribe(f"https://127.0.0.1:{free_port()}/closed", secret=SECRET)
    proc = run_dispatcher(ns)
    ns.publish(SEED_EVENT)

    dead = dead_letters(ns, 3)
    wait_settled(ns, proc)
    assert len(ns.read_all(ns.settings.dead_letter_topic)) == 3
    for path in ("/down", "/stall"):
        reqs = receiver.requests_to(path)
        assert [attempt_of(r) for r in reqs] == [1, 2, 3, 4], path
        assert len({r.body for r in reqs}) == 1
        assert len({delivery_id_of(r) for r in reqs}) == 1

    stage_names = ["input", *(s.name for s in retry_stages(ns.settings))]
    validator = jsonschema.Draft202012Validator(
        RECORD_SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    records: dict[str, dict[str, Any]] = {}
    for msg in dead:
        raw = msg.value() or b""
        _assert_no_secret(msg, raw)
        doc = json.loads(raw)
        validator.validate(doc)
        assert (msg.key() or b"").decode() == doc["delivery_id"]
        counts = Counter(k for k, _ in headers_of(msg))
        assert set(counts) >= ROUTING_HEADERS and max(counts.values()) == 1, counts
        records[doc["webhook_id"]] = doc
    assert set(records) == {down.webhook_id, stall.webhook_id, closed.webhook_id}
    for msg in (m for s in retry_stages(ns.settings) for m in stage_records(ns, s)):
        _assert_no_secret(msg, msg.value() or b"")

    expected_class = {down.webhook_id: "http", stall.webhook_id: "timeout"}
    expected_class[closed.webhook_id] = "connection"
    sent_body = receiver.requests_to("/down")[0].body
    tries = []
    for webhook_id, doc in records.items():
        history = doc["history"]
        assert doc["attempts_made"] == 4
        assert doc["body"].encode() == sent_body
        assert doc["dead_lettered_at"] and doc["dead_letter_reason"]
        assert [h["attempt"] for h in history] == [1, 2, 3, 4]
        assert [h["stage"] for h in history] == stage_names
        assert {h["error_class"] for h in history} == {expected_class[webhook_id]}
        for h in history:
            assert h["duration_ms"] >= 0
            assert h["error"] and len(h["error"]) <= 300
            tries.append(
                Try(
                    doc["delivery_id"],
                    h["attempt"],
                    datetime.fromisoformat(h["at"]).timestamp() * 1000 - h["duration_ms"],
                )
            )
        if webhook_id == down.webhook_id:
            assert {h["status_code"] for h in history} == {500}
            # The snippet is the start of the answer, cut to response_snippet_bytes.
            assert {h["response_snippet"] for h in history} == {error_body[:32].decode()}
        else:
            assert {h["status_code"] for h in history} == {None}
        if webhook_id == stall.webhook_id:
            # The timeout bounded each attempt (1 s), well before the 3 s stall ended.
            assert all(900 <= h["duration_ms"] < 2500 for h in history)
    # Arrival times at the receiver, and the dispatcher's own start times for the
    # closed port, against the due time each retry record carried.
    clock.check(ns, tries_of(receiver.requests_to("/down") + receiver.requests_to("/stall")))
    clock.check(
        ns, [t for t in tries if t.delivery_id == records[closed.webhook_id]["delivery_id"]]
    )
    text = proc.metrics()
    assert metric_value(text, "dispatcher_dead_letters_total") == 3


def _assert_no_secret(msg: Message, raw: bytes) -> None:
    needles = [SECRET.encode(), SECRET.removeprefix("whsec_").encode()]
    blobs = [raw, msg.key() or b"", *(v for _, v in headers_of(msg))]
    for needle in needles:
        assert not any(needle in blob for blob in blobs), "a secret travelled in a record"


def test_retry_after_delays_the_retry_without_spending_an_attempt(
    ns: Namespace, receiver: HttpsReceiver, run_dispatcher: StartDispatcher, clock: RetryClock
) -> None:
    stages = retry_stages(ns.settings)
    wait_s = 5
    assert stages[0].delay_s < wait_s <= stages[-1].delay_s
    receiver.respond("/busy", Reply(503, retry_after=str(wait_s)), Reply(200))
    ns.subscribe(receiver.url("/busy"))
    proc = run_dispatcher(ns)
    ns.publish(SEED_EVENT)

    first, second = receiver.wait_for_requests(2, path="/busy", timeout_s=SETTLE_S)
    assert second.received_at >= first.received_at + wait_s - SLACK_S
    assert [attempt_of(first), attempt_of(second)] == [1, 2]
    assert delivery_id_of(first) == delivery_id_of(second)
    # It waited in the first stage whose delay covers the wait, not in the first stage.
    later = next(s for s in stages if s.delay_s >= wait_s)
    assert not stage_records(ns, stages[0])
    [record] = stage_records(ns, later)
    assert header(record, H_ATTEMPT) == "1"
    assert int(header(record, H_DUE_MS)) >= first.received_at * 1000 + wait_s * 1000
    clock.check(ns, tries_of([first, second]))
    wait_settled(ns, proc)
    assert len(receiver.requests_to("/busy")) == 2


def test_pending_retries_survive_kill_9(
    ns_factory: Callable[..., Namespace],
    receiver: HttpsReceiver,
    run_dispatcher: StartDispatcher,
    clock: RetryClock,
) -> None:
    # Long enough to kill, restart and rejoin (the dead member's session expires
    # after 6 s) before the retries come due.
    ns = ns_factory(retry_delays_s=[14, 20, 30], **NO_BREAKER)
    paths = [f"/k{i}" for i in range(6)]
    subscribe_paths(ns, receiver, paths, Reply(500), Reply(200))
    first = run_dispatcher(ns)
    ns.publish(SEED_EVENT)
    for path in paths:
        receiver.wait_for_requests(1, path=path, timeout_s=SETTLE_S)
    stage = retry_stages(ns.settings)[0]
    pending = wait_until(
        lambda: _all_retried(ns, stage, len(paths)),
        SETTLE_S,
        "every failed delivery to reach the retry topic",
        interval_s=0.2,
    )
    # The input offset is committed (no attempt 1 would be repeated); the retries are not.
    wait_until(
        lambda: committed_to_end(ns.settings.group_id, ns.settings.input_topic),
        SETTLE_S,
        "the input offset to be committed",
        interval_s=0.2,
    )
    earliest_due = min(int(header(m, H_DUE_MS)) for m in pending)
    first.kill()
    killed_at = time.time()

    # Ready means every stage's consumer has joined the group again.
    second = run_dispatcher(ns, http_port=free_port())
    assert_not_due_yet(earliest_due, "the restart")
    reqs = []
    for path in paths:
        got = receiver.wait_for_requests(2, path=path, timeout_s=SETTLE_S)
        assert [attempt_of(r) for r in got] == [1, 2], path
        assert got[1].received_at > killed_at
        reqs.extend(got)
    clock.check(ns, tries_of(reqs))
    wait_settled(ns, second)
    assert all(len(receiver.requests_to(p)) == 2 for p in paths)


def test_a_retry_cut_short_by_kill_9_is_attempted_again(
    ns_factory: Callable[..., Namespace],
    receiver: HttpsReceiver,
    run_dispatcher: StartDispatcher,
    clock: RetryClock,
) -> None:
    # The retry's offset may be committed only once its outcome is durable: a
    # dispatcher killed while the attempt hangs must leave the record to be read again.
    ns = ns_factory(http_timeout_s=60.0)
    receiver.respond("/hang", Reply(500), Reply(200, delay_s=120.0), Reply(200))
    ns.subscribe(receiver.url("/hang"))
    first = run_dispatcher(ns)
    ns.publish(SEED_EVENT)
    receiver.wait_for_requests(2, path="/hang", timeout_s=SETTLE_S)
    stage = retry_stages(ns.settings)[0]
    # Give a wrongly early commit of the retry offset time to happen (auto-commit runs
    # every second); the check itself waits on nothing.
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        assert not committed_to_end(f"{ns.settings.group_id}.{stage.name}", stage.topic), (
            "the retry's offset was committed while its attempt was still running"
        )
    first.kill()
    killed_at = time.time()

    second = run_dispatcher(ns, http_port=free_port())
    reqs = receiver.wait_for_requests(3, path="/hang", timeout_s=SETTLE_S)
    assert [attempt_of(r) for r in reqs] == [1, 2, 2]
    assert reqs[2].received_at > killed_at
    assert len({delivery_id_of(r) for r in reqs}) == 1
    # The repeat comes whenever the restarted instance gets to it: not a lateness sample.
    clock.check(ns, tries_of(reqs[:2]))
    wait_settled(ns, second)
    assert len(receiver.requests_to("/hang")) == 3
    assert not ns.read_all(ns.settings.dead_letter_topic)


@pytest.mark.parametrize("stopped", ["first", "second"])
def test_paused_retry_partitions_fire_after_a_rebalance(
    stopped: str,
    ns_factory: Callable[..., Namespace],
    receiver: HttpsReceiver,
    run_dispatcher: StartDispatcher,
    clock: RetryClock,
) -> None:
    ns = ns_factory(retry_delays_s=[14, 20, 30], **NO_BREAKER)
    stage = retry_stages(ns.settings)[0]
    # Twelve deliveries keyed by their ids spread over the three retry partitions
    # (all in one by chance: 1 run in 177,147).
    paths = [f"/r{i}" for i in range(12)]
    subscribe_paths(ns, receiver, paths, Reply(500), Reply(200))
    a = run_dispatcher(ns)
    ns.publish(SEED_EVENT)
    pending = wait_until(
        lambda: _all_retried(ns, stage, len(paths)),
        SETTLE_S,
        "every failed delivery to reach the retry topic",
        interval_s=0.2,
    )
    assert len({m.partition() for m in pending}) >= 2, "all in one partition: nothing would move"
    earliest_due = min(int(header(m, H_DUE_MS)) for m in pending)
    wait_until(lambda: assigned_partitions(a, stage.name), SETTLE_S, "A to be assigned")

    # B joins: some retry partitions, paused on A until due, move to B.
    b = run_dispatcher(ns, http_port=free_port())
    wait_until(
        lambda: any(assigned_partitions(b, stage.name)),
        SETTLE_S,
        "B to take over retry partitions",
        interval_s=0.2,
    )
    goes, stays = (a, b) if stopped == "first" else (b, a)
    seen = len(assigned_partitions(stays, stage.name))
    assert goes.terminate() == 0
    # The survivor takes the stopped one's partitions (A: partitions it once paused).
    wait_until(
        lambda: any(assigned_partitions(stays, stage.name)[seen:]),
        SETTLE_S,
        "the partitions of the stopped instance to move",
        interval_s=0.2,
    )
    assert_not_due_yet(earliest_due, "the rebalances")

    reqs = []
    for path in paths:
        got = receiver.wait_for_requests(2, path=path, timeout_s=SETTLE_S)
        assert [attempt_of(r) for r in got] == [1, 2], path
        reqs.extend(got)
    clock.check(ns, tries_of(reqs))
    wait_settled(ns, stays)
    assert all(len(receiver.requests_to(p)) == 2 for p in paths)


def test_retries_fire_after_a_frozen_instance_lost_its_partitions(
    ns_factory: Callable[..., Namespace],
    receiver: HttpsReceiver,
    run_dispatcher: StartDispatcher,
    clock: RetryClock,
) -> None:
    # A process frozen past its session timeout (a long GC pause, a stalled node)
    # finds its assignment lost when it wakes, rejoins, and is given the very
    # partitions it had paused until their records were due.
    ns = ns_factory(retry_delays_s=[14, 20, 30], **NO_BREAKER)
    stage = retry_stages(ns.settings)[0]
    paths = [f"/f{i}" for i in range(9)]
    subscribe_paths(ns, receiver, paths, Reply(500), Reply(200))
    proc = run_dispatcher(ns)
    ns.publish(SEED_EVENT)
    pending = wait_until(
        lambda: _all_retried(ns, stage, len(paths)),
        SETTLE_S,
        "every failed delivery to reach the retry topic",
        interval_s=0.2,
    )
    earliest_due = min(int(header(m, H_DUE_MS)) for m in pending)
    wait_until(
        lambda: committed_to_end(ns.settings.group_id, ns.settings.input_topic),
        SETTLE_S,
        "the input offset to be committed",
        interval_s=0.2,
    )
    assert proc.proc is not None
    proc.proc.send_signal(signal.SIGSTOP)
    try:
        groups = [f"{ns.settings.group_id}.{s.name}" for s in retry_stages(ns.settings)]
        wait_until(
            lambda: all(group_members(g) == 0 for g in groups),
            SETTLE_S,
            "the group coordinator to drop the frozen member",
            interval_s=0.5,
        )
    finally:
        proc.proc.send_signal(signal.SIGCONT)
    wait_until(
        lambda: f"stage {stage.name} lost" in proc.logs(), SETTLE_S, "the assignment to be lost"
    )
    wait_until(
        lambda: len(assigned_partitions(proc, stage.name)) >= 2, SETTLE_S, "a new assignment"
    )
    assert_not_due_yet(earliest_due, "the rejoin")

    reqs = []
    for path in paths:
        got = receiver.wait_for_requests(2, path=path, timeout_s=SETTLE_S)
        assert [attempt_of(r) for r in got] == [1, 2], path
        reqs.extend(got)
    clock.check(ns, tries_of(reqs))
    wait_settled(ns, proc)
    assert all(len(receiver.requests_to(p)) == 2 for p in paths)


def group_members(group: str) -> int:
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    description = admin.describe_consumer_groups([group])[group].result(timeout=10)
    return len(description.members)
