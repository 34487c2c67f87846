"""A slow webhook next to a fast one in the same partitions, end to end.

Real broker, real ``dispatcher run``, one real HTTPS receiver: organization S's
webhook answers every request after 2.5 s, organization F's at once, and their
events alternate in every input partition. S's backlog beyond its slots and
queue is parked in Kafka (deferral reason ``endpoint_slow``, no attempt spent),
so F keeps its pace and latency while S still gets every delivery, each on its
first attempt, its slots busy all the time; a ``kill -9`` mid-run loses nothing.

F's pace is measured from the first publish to its last delivery, its latency
from each event's publish to its first receipt, F alone and next to S taken in
turn; the ratio of the two paces and the p99 are each the best of ``TRIALS``
(the machine is shared). Every run is published by one producer, made once: F
alone takes about 0.15 s, and a new idempotent producer's start (0.5 s, at times
1 s, before its first record goes) would be most of what is measured.
"""

from __future__ import annotations

import functools
import json
import time
from typing import Any

import pytest
from confluent_kafka import Producer

from tests.receiver import HttpsReceiver, ReceivedRequest, Reply
from tests.streams import Tally, expected_pairs, gauge, session_of, stream
from tests.support import BOOTSTRAP, DispatcherProcess, Namespace, wait_until

PER_ORG = 300
#: Timing on a shared machine is noisy: each of F's figures is the best of this
#: many trials, F alone and F next to a cold slow webhook taken in turn.
TRIALS = 3
#: F's pace next to S against F alone, the best of ``TRIALS`` (see the assertion).
MIN_PACE_RATIO = 0.5
SLOW_S = 2.5
#: S's slots: 300 deliveries at 2.5 s take 15 s through 50 of them.
SLOTS = 50
SETTINGS: dict[str, Any] = {
    "topic_partitions": 3,
    "max_in_flight_per_endpoint": SLOTS,
    # Half of it for slow or not yet measured webhooks' queues: S's backlog is more
    # than that, so part of it is parked in Kafka.
    "max_in_flight": 256,
    # Parked deliveries are paced within the first stage's delay: one long enough
    # that they come back on their turn, not because the stage made them.
    "retry_delays_s": [30, 60],
    "http_timeout_s": 10.0,
}


@functools.cache
def shared_producer() -> Producer:
    """One idempotent producer for every run: a new one spends about 0.5 s, at times
    1 s, getting its producer id before its first record goes, which F's pace
    would count, and which made it vary by as much from one run to the next."""
    return Producer({"bootstrap.servers": BOOTSTRAP, "enable.idempotence": True, "linger.ms": 5})


def publish(ns: Namespace, events: list[dict[str, Any]]) -> dict[str, float]:
    """Publish round-robin over the partitions; the time each session was published."""
    producer = shared_producer()
    partitions = ns.settings.topic_partitions
    sent: dict[str, float] = {}
    for i, event in enumerate(events):
        sent[event["session_id"]] = time.time()
        producer.produce(
            ns.settings.input_topic, json.dumps(event).encode(), partition=i % partitions
        )
    assert producer.flush(30) == 0
    return sent


def interleaved(
    prefix: str, slow_org: str = "org_slow0"
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    slow = stream(f"{prefix}-s", 0, PER_ORG, org=slow_org)
    fast = stream(f"{prefix}-f", 0, PER_ORG, org="org_fast")
    return slow, [e for pair in zip(slow, fast, strict=True) for e in pair]


def firsts(requests: list[ReceivedRequest], sessions: set[str]) -> dict[str, float]:
    """When each of ``sessions`` was first received."""
    out: dict[str, float] = {}
    for r in requests:
        session = session_of(r)
        if session in sessions and session not in out:
            out[session] = r.received_at
    return out


def fast_run(
    receiver: HttpsReceiver, ns: Namespace, events: list[dict[str, Any]]
) -> tuple[float, float]:
    """Publish ``events``; F's rate (deliveries/s from the first publish) and p99 latency."""
    fast = {e["session_id"] for e in events if e["organization_id"] == "org_fast"}
    started = time.time()
    sent = publish(ns, events)

    def done() -> dict[str, float] | None:
        got = firsts(receiver.requests_to("/fast"), fast)
        return got if len(got) == len(fast) else None

    got = wait_until(done, 60, "every delivery to F")
    latencies = sorted(got[s] - sent[s] for s in fast)
    rate = len(fast) / (max(got.values()) - started)
    p99 = latencies[int(0.99 * (len(latencies) - 1))]
    return rate, p99


def warm_then_f_alone(
    receiver: HttpsReceiver, ns: Namespace, warmers: list[str], slots: int = SLOTS
) -> tuple[float, float]:
    """Warm connections for the slow webhooks' ``slots`` and F's (TLS handshakes are
    not measured), through webhooks of their own at ``/NAME`` (organization
    ``org_NAME``) whose answers take a moment, so a burst to them opens as many
    connections as a slow webhook will use; then F's pace and p99 alone
    (:func:`fast_run`)."""
    warm = [e for name in warmers for e in stream(name, 0, slots, org=f"org_{name}")]
    fast_run(receiver, ns, stream("warm-f", 0, SLOTS, org="org_fast") + warm)
    wait_until(
        lambda: sum(len(receiver.requests_to(f"/{name}")) for name in warmers) == len(warm),
        30,
        "the warm-up answered",
    )
    return fast_run(receiver, ns, stream("alone", 0, PER_ORG, org="org_fast"))


def setup(ns_factory: Any, receiver: HttpsReceiver) -> Namespace:
    ns: Namespace = ns_factory(**SETTINGS)
    receiver.respond("/slow", Reply(200, delay_s=SLOW_S))
    receiver.respond("/fast", Reply(200))
    # One slow organization per trial (each met cold), one URL.
    for n in range(TRIALS):
        ns.subscribe(receiver.url("/slow"), organization_id=f"org_slow{n}")
    ns.subscribe(receiver.url("/fast"), organization_id="org_fast")
    return ns


def assert_slow_all_first_attempts(receiver: HttpsReceiver, slow: list[dict[str, Any]]) -> None:
    wanted = expected_pairs(["/slow"], slow)
    wait_until(
        lambda: not Tally.of([receiver]).missing(wanted), 120, "every delivery to the slow one"
    )
    attempts = {r.header("x-bullseye-attempt") for r in receiver.requests_to("/slow")}
    assert attempts == {"1"}, f"waiting spent an attempt: {attempts}"


@pytest.mark.alone
def test_a_slow_webhook_keeps_neither_pace_nor_latency_from_its_neighbour(
    ns_factory: Any, receiver: HttpsReceiver, run_dispatcher: Any
) -> None:
    ns = setup(ns_factory, receiver)
    proc: DispatcherProcess = run_dispatcher(ns)
    alone: list[tuple[float, float]] = []
    mixed: list[tuple[float, float]] = []
    warm: list[dict[str, Any]] = []
    for n in range(TRIALS):
        # Warm the origin's connections up for both (TLS handshakes are not what is
        # measured; kept-alive connections close when idle), then F alone, then F
        # next to S, met cold, in the same partitions.
        warm_slow = stream(f"warm{n}-s", 0, SLOTS, org=f"org_slow{n}")
        warm += warm_slow
        fast_run(receiver, ns, stream(f"warm{n}-f", 0, SLOTS, org="org_fast") + warm_slow)
        expected = len(warm) + n * PER_ORG
        wait_until(
            lambda: (
                len(receiver.requests_to("/slow")) == expected  # noqa: B023 (awaited here)
                and gauge(proc, "dispatcher_in_flight_deliveries") == 0
            ),
            30,
            "the warm-up answered",
        )
        alone.append(fast_run(receiver, ns, stream(f"alone{n}", 0, PER_ORG, org="org_fast")))
        slow, events = interleaved(f"mixed{n}", f"org_slow{n}")
        mixed.append(fast_run(receiver, ns, events))
        wanted = {e["session_id"] for e in slow}

        def this_trial(wanted: set[str] = wanted) -> list[ReceivedRequest]:
            return [r for r in receiver.requests_to("/slow") if session_of(r) in wanted]

        # S has not got far meanwhile: F's pace is not S's having been served first.
        assert len(this_trial()) < PER_ORG
        assert_slow_all_first_attempts(receiver, warm + slow)
        # Every slot busy: S took (nearly) all it could, SLOTS at a time.
        requests = this_trial()
        span = max(r.received_at for r in requests) - min(r.received_at for r in requests)
        assert span <= PER_ORG / SLOTS * SLOW_S * 2, span
        print(
            f"\n[slow neighbour] trial {n}: F alone {alone[-1][0]:.0f}/s"
            f" p99 {alone[-1][1] * 1000:.0f} ms; with S {mixed[-1][0]:.0f}/s"
            f" p99 {mixed[-1][1] * 1000:.0f} ms; S's 300 in {span:.1f} s"
        )
    # Each trial's F next to S against F alone just before it, in the same state of
    # the machine: the best of these ratios, and the best p99 next to S.
    ratio = max(m[0] / a[0] for m, a in zip(mixed, alone, strict=True))
    p99 = min(p for _, p in mixed)
    # Held behind S, as before lanes, F needed 36 s for its 300: a ratio near 0.005
    # and a p99 of S's 2.5 s, here. With lanes, on this 2-core machine, F kept
    # 0.63-0.92 of its pace per trial (best of three 0.91 and 0.92 in two runs), p99
    # 0.15-0.18 s: the rest is the work S's events bring into F's partitions (read,
    # parsed, queued, parked) on two cores shared with the broker. The bound is
    # below that range, so that it tells isolation from none without flapping; the
    # p99 tells it too.
    assert ratio >= MIN_PACE_RATIO, (mixed, alone)
    assert p99 <= 1.0, mixed
    parked = gauge(proc, "dispatcher_deferrals_total", reason="endpoint_slow")
    assert parked > 0, "nothing was parked: the test proves nothing"
    assert gauge(proc, "dispatcher_deferrals_total") == parked
    assert Tally.of([receiver]).duplicates == 0


def test_a_slow_webhook_next_to_a_fast_one_loses_nothing_across_kill_9(
    ns_factory: Any, receiver: HttpsReceiver, run_dispatcher: Any
) -> None:
    ns = setup(ns_factory, receiver)
    proc: DispatcherProcess = run_dispatcher(ns)
    slow, mixed = interleaved("kill")
    publish(ns, mixed)
    # Killed once S is well under way: some of it in slots, some queued, some parked.
    wait_until(
        lambda: (
            gauge(proc, "dispatcher_deferrals_total", reason="endpoint_slow") > 0
            and len(receiver.requests_to("/slow")) >= 2 * SLOTS
        ),
        60,
        "parked deliveries and two rounds of slots",
    )
    proc.kill()
    run_dispatcher(ns)
    fast = [e for e in mixed if e["organization_id"] == "org_fast"]
    wanted = expected_pairs(["/fast"], fast)
    wait_until(lambda: not Tally.of([receiver]).missing(wanted), 60, "every delivery to F")
    assert_slow_all_first_attempts(receiver, slow)
    tally = Tally.of([receiver])
    print(f"\n[slow neighbour, kill -9] duplicates {tally.duplicates} of {2 * PER_ORG}")
    # At least once: the uncommitted window behind S's queue is read again after the
    # kill, so its deliveries, F's too, may come twice; a delivery of S that was
    # parked and back in a slot at the kill also comes from its stage record: three
    # times at most, never more.
    assert max(tally.counts.values()) <= 3, tally.counts.most_common(3)


#: The long variant: S answers just within an HTTP timeout of 30 s.
LONG_S = 29.0
#: S's slots in the long variant: two rounds of them take S's events, about a minute.
LONG_SLOTS = 100
#: S's events: its slots and queue up to the lanes' half of the in-flight places
#: (128, slots counted), and some parked beyond.
LONG_PER_ORG = 200
#: F's pace next to that S against F alone, one trial (see the assertion).
LONG_MIN_PACE_RATIO = 0.25


@pytest.mark.alone
def test_a_webhook_answering_after_29_s_keeps_neither_pace_nor_latency_from_its_neighbour(
    ns_factory: Any, receiver: HttpsReceiver, run_dispatcher: Any
) -> None:
    """One trial; a second such S, met while the first fills its slots and the lanes'
    half, is the next test."""
    # S's requests run 29 s: within the HTTP timeout, and not taken for a stall.
    ns: Namespace = ns_factory(
        **{
            **SETTINGS,
            "http_timeout_s": 45.0,
            "endpoint_stall_s": 60.0,
            "max_in_flight_per_endpoint": LONG_SLOTS,
        }
    )
    receiver.respond("/slow", Reply(200, delay_s=LONG_S))
    receiver.respond("/fast", Reply(200))
    # Answers after a moment: a burst to it opens as many connections as S will use.
    receiver.respond("/warm", Reply(200, delay_s=0.5))
    ns.subscribe(receiver.url("/slow"), organization_id="org_long")
    ns.subscribe(receiver.url("/fast"), organization_id="org_fast")
    ns.subscribe(receiver.url("/warm"), organization_id="org_warm")
    proc: DispatcherProcess = run_dispatcher(ns)
    alone = warm_then_f_alone(receiver, ns, ["warm"], LONG_SLOTS)
    slow = stream("long-s", 0, LONG_PER_ORG, org="org_long")
    fast = stream("long-f", 0, PER_ORG, org="org_fast")
    # Interleaved in the same partitions: two of S's for every three of F's.
    events = [
        e
        for i in range(0, PER_ORG, 3)
        for e in slow[i * 2 // 3 : (i + 3) * 2 // 3] + fast[i : i + 3]
    ]
    assert len(events) == LONG_PER_ORG + PER_ORG
    mixed = fast_run(receiver, ns, events)
    # No answer from S yet: F's pace was not S's having been served first.
    assert len(receiver.requests_to("/slow")) <= LONG_SLOTS
    parked = gauge(proc, "dispatcher_deferrals_total", reason="endpoint_slow")
    assert parked > 0, "nothing was parked: the test proves nothing"
    # Two rounds of S's slots, and the parked ones back within the stage's delay.
    wanted = expected_pairs(["/slow"], slow)
    wait_until(lambda: not Tally.of([receiver]).missing(wanted), 6 * LONG_S, "every delivery to S")
    attempts = {r.header("x-bullseye-attempt") for r in receiver.requests_to("/slow")}
    assert attempts == {"1"}, f"waiting spent an attempt: {attempts}"
    ratio = mixed[0] / alone[0]
    print(
        f"\n[29 s neighbour] F alone {alone[0]:.0f}/s p99 {alone[1] * 1000:.0f} ms;"
        f" with S {mixed[0]:.0f}/s p99 {mixed[1] * 1000:.0f} ms (ratio {ratio:.2f});"
        f" parked {parked:g}"
    )
    # One trial, so a lower bound than the 2.5 s variant's best of three: 0.37-0.50 in
    # three runs on this machine with S's 100 slots (each a request started in F's
    # run), p99 0.25-0.31 s; 0.38-0.70 with 50; held behind S, F's p99 would be 29 s.
    assert ratio >= LONG_MIN_PACE_RATIO, (mixed, alone)
    assert mixed[1] <= 1.0, mixed
    assert gauge(proc, "dispatcher_deferrals_total") == gauge(
        proc, "dispatcher_deferrals_total", reason="endpoint_slow"
    )
    assert Tally.of([receiver]).duplicates == 0


#: Two slow webhooks met one after the other: each answers after this long, more
#: than F's runs next to them take, so F's pace is not theirs having answered.
PAIR_S = 10.0
#: Each one's events: its slots, more than the lanes' half of the in-flight places
#: (128) and some parked beyond, however that half is counted: four rounds of its
#: slots.
PAIR_PER_ORG = 200
#: F's pace next to S1 and S2 against F alone (see the assertion).
PAIR_MIN_PACE_RATIO = 0.25


@pytest.mark.alone
def test_a_second_slow_webhook_met_while_the_first_fills_its_lane_keeps_nothing_from_f(
    ns_factory: Any, receiver: HttpsReceiver, run_dispatcher: Any
) -> None:
    """S1 answers after 10 s and has its slots and the lanes' half of the in-flight
    places (its overflow parked) when S2, as slow, comes: F is held up by neither,
    S1 and S2 get every delivery on its first attempt. One trial, about 50 s."""
    ns: Namespace = ns_factory(**{**SETTINGS, "http_timeout_s": 30.0, "endpoint_stall_s": 60.0})
    receiver.respond("/fast", Reply(200))
    hooks: dict[int, str] = {}
    for n in (1, 2):
        receiver.respond(f"/slow{n}", Reply(200, delay_s=PAIR_S))
        # Answers after a moment: a burst to it opens as many connections as S will use.
        receiver.respond(f"/warm{n}", Reply(200, delay_s=0.5))
        hooks[n] = ns.subscribe(
            receiver.url(f"/slow{n}"), organization_id=f"org_slow{n}"
        ).webhook_id
        ns.subscribe(receiver.url(f"/warm{n}"), organization_id=f"org_warm{n}")
    ns.subscribe(receiver.url("/fast"), organization_id="org_fast")
    proc: DispatcherProcess = run_dispatcher(ns)
    alone = warm_then_f_alone(receiver, ns, ["warm1", "warm2"])
    slow = {n: stream(f"pair-s{n}", 0, PAIR_PER_ORG, org=f"org_slow{n}") for n in (1, 2)}
    # S1 next to some of F's, in the same partitions, until its lane is full and its
    # overflow parked.
    first_f = stream("pair-f1", 0, PAIR_PER_ORG, org="org_fast")
    publish(ns, [e for pair in zip(slow[1], first_f, strict=True) for e in pair])

    def parked(n: int) -> float:
        return gauge(
            proc,
            "dispatcher_webhook_deferrals_total",
            webhook_id=hooks[n],
            reason="endpoint_slow",
        )

    wait_until(lambda: parked(1) > 0, 30, "S1's overflow parked")
    # Then S2 and F, one of S2's for every two of F's, in the same partitions.
    fast = stream("pair-f2", 0, PER_ORG, org="org_fast")
    events = [e for i in range(PAIR_PER_ORG) for e in (slow[2][i], *fast[2 * i : 2 * i + 2])]
    mixed = fast_run(receiver, ns, events)
    ratio = mixed[0] / alone[0]
    print(
        f"\n[two slow neighbours] F alone {alone[0]:.0f}/s p99 {alone[1] * 1000:.0f} ms;"
        f" with S1 and S2 {mixed[0]:.0f}/s p99 {mixed[1] * 1000:.0f} ms (ratio {ratio:.2f});"
        f" parked by then {parked(1):g} of S1, {parked(2):g} of S2"
    )
    # No answer from S1 or S2 yet: F's pace was not theirs having answered.
    for n in (1, 2):
        assert len(receiver.requests_to(f"/slow{n}")) <= SLOTS, n
    # S2's overflow is parked once the hold has judged its full queue (the test
    # proves nothing otherwise); its requests meanwhile still wait for their answers.
    wait_until(lambda: parked(2) > 0, 5, "S2's overflow parked")
    wanted = expected_pairs(["/slow1"], slow[1]) | expected_pairs(["/slow2"], slow[2])
    wait_until(lambda: not Tally.of([receiver]).missing(wanted), 90, "every delivery to S1 and S2")
    attempts = {
        r.header("x-bullseye-attempt") for n in (1, 2) for r in receiver.requests_to(f"/slow{n}")
    }
    assert attempts == {"1"}, f"waiting spent an attempt: {attempts}"
    print(f"[two slow neighbours] parked in all {parked(1):g} of S1, {parked(2):g} of S2")
    # Before the lanes' half counted S1's slots, S2's slots and queue took the
    # places S1's lane left, and F waited for S1's answers (here F's run outlasted
    # S1's first 10 s, failing the check above; p99 27-56 s in the 29 s variant).
    # Now S1's lane and S2's slots and queue leave F about 14 of the 256 places,
    # which can bound its pace when it runs fast alone (0.57-1.30 in four runs,
    # p99 0.13-0.28 s next to S1 and S2): the bound of the one-trial 29 s
    # variant, which still tells isolation from none; held behind S1, F's p99
    # would be S1's 10 s.
    assert ratio >= PAIR_MIN_PACE_RATIO, (mixed, alone)
    # One trial, not the best of three: on a loaded machine F alone may miss the
    # second itself (1.11 s once); waiting for S1 would cost its 10 s.
    assert mixed[1] <= max(1.0, alone[1] + 0.5), (mixed, alone)
    assert gauge(proc, "dispatcher_deferrals_total") == gauge(
        proc, "dispatcher_deferrals_total", reason="endpoint_slow"
    )
    assert Tally.of([receiver]).duplicates == 0
