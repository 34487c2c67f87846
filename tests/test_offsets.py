"""Pure logic of the engine: the offset tracker, failure routing and endpoint admission.

The circuit breaker's own decisions are in test_breaker.py.

No broker and no HTTP here: these are the decisions the integration tests rely on,
checked over many inputs (the tracker with hypothesis) and with an injected clock
(the circuit breaker).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.core.breaker import BreakerPolicy
from dispatcher.core.endpoints import Admission, Endpoint
from dispatcher.core.offsets import OffsetTracker
from dispatcher.core.routing import after_failure, for_deferral
from dispatcher.stages import RetryStage

# --- OffsetTracker -------------------------------------------------------------

#: Increasing offsets with gaps (compaction, transaction markers), as a partition yields.
offset_runs = st.lists(st.integers(0, 10_000), min_size=1, max_size=60, unique=True).map(sorted)


def _expected_position(received: list[int], finished: set[int]) -> int | None:
    if not received:
        return None
    unfinished = [o for o in received if o not in finished]
    return min(unfinished) if unfinished else received[-1] + 1


@given(offsets=offset_runs, data=st.data())
@settings(max_examples=300, deadline=None)
def test_position_is_the_lowest_unfinished_offset_whatever_the_order(
    offsets: list[int], data: st.DataObject
) -> None:
    tracker = OffsetTracker()
    received: list[int] = []
    finished: set[int] = set()
    previous: int | None = None
    to_receive = list(offsets)
    while to_receive or len(finished) < len(received):
        open_ = [o for o in received if o not in finished]
        # Receiving and finishing interleave at random, as fetches and deliveries do.
        if to_receive and (not open_ or data.draw(st.booleans(), label="receive")):
            offset = to_receive.pop(0)
            tracker.received(offset)
            received.append(offset)
            moved = None
        else:
            offset = data.draw(st.sampled_from(open_), label="finish")
            moved = tracker.finished(offset)
            finished.add(offset)
        position = tracker.position
        assert position is not None
        assert position == _expected_position(received, finished)
        if previous is not None:
            assert position >= previous, "the position went back"
            if moved is not None:
                # finished() says True exactly when the position moved.
                assert moved == (position > previous)
        assert all(position <= o for o in received if o not in finished), "passed unfinished"
        previous = position
    assert tracker.position == offsets[-1] + 1


@given(offsets=offset_runs, data=st.data())
@settings(max_examples=100, deadline=None)
def test_a_repeated_completion_changes_nothing(offsets: list[int], data: st.DataObject) -> None:
    tracker = OffsetTracker()
    for offset in offsets:
        tracker.received(offset)
    order = data.draw(st.permutations(offsets), label="order")
    for offset in order:
        tracker.finished(offset)
        before = tracker.position
        assert tracker.finished(offset) is False
        assert tracker.position == before
    assert tracker.position == offsets[-1] + 1


@given(offsets=offset_runs, data=st.data())
@settings(max_examples=100, deadline=None)
def test_duplicate_or_out_of_order_received_is_rejected(
    offsets: list[int], data: st.DataObject
) -> None:
    tracker = OffsetTracker()
    for offset in offsets:
        tracker.received(offset)
    stale = data.draw(st.integers(-1, offsets[-1]), label="stale")
    with pytest.raises(ValueError):
        tracker.received(stale)
    # The rejected offset left no trace: finishing everything gets past the last one.
    for offset in offsets:
        tracker.finished(offset)
    assert tracker.position == offsets[-1] + 1


def test_nothing_received_means_nothing_to_commit() -> None:
    tracker = OffsetTracker()
    assert tracker.position is None
    assert tracker.finished(5) is False
    assert tracker.position is None


def test_gaps_are_skipped_once_the_offsets_around_them_finish() -> None:
    tracker = OffsetTracker()
    for offset in (3, 7, 8, 20):
        tracker.received(offset)
    assert tracker.position == 3
    assert tracker.finished(8) is False
    assert tracker.finished(7) is False
    assert tracker.position == 3
    assert tracker.finished(3) is True
    assert tracker.position == 20  # 4..6 and 9..19 were never received
    assert tracker.finished(20) is True
    assert tracker.position == 21


# --- routing -------------------------------------------------------------------

STAGES = [
    RetryStage(0, "1m", "retry.1m", 60),
    RetryStage(1, "5m", "retry.5m", 300),
    RetryStage(2, "30m", "retry.30m", 1800),
]
NOW = 1_700_000_000_000


@pytest.mark.parametrize(("attempts", "stage"), [(1, 0), (2, 1), (3, 2)])
def test_a_failed_attempt_goes_to_the_stage_of_its_number(attempts: int, stage: int) -> None:
    hop = after_failure(attempts, STAGES, NOW)
    assert hop.stage is STAGES[stage]
    assert hop.due_ms == NOW + STAGES[stage].delay_s * 1000


def test_after_the_last_stage_comes_the_dead_letter_topic() -> None:
    hop = after_failure(len(STAGES) + 1, STAGES, NOW)
    assert hop.stage is None
    # A Retry-After does not buy an attempt beyond the schedule.
    assert after_failure(len(STAGES) + 1, STAGES, NOW, retry_after_s=10).stage is None


def test_a_short_retry_after_does_not_shorten_the_delay() -> None:
    hop = after_failure(1, STAGES, NOW, retry_after_s=5)
    assert hop.stage is STAGES[0]
    assert hop.due_ms == NOW + 60_000


def test_a_long_retry_after_waits_in_the_first_stage_long_enough() -> None:
    hop = after_failure(1, STAGES, NOW, retry_after_s=120)
    # 1m is too short to keep its topic ordered by due time; 5m is the first that holds it.
    assert hop.stage is STAGES[1]
    assert hop.due_ms == NOW + 120_000
    exact = after_failure(1, STAGES, NOW, retry_after_s=300)
    assert exact.stage is STAGES[1]
    assert exact.due_ms == NOW + 300_000


def test_a_retry_after_beyond_every_stage_waits_in_the_last_and_is_capped() -> None:
    hop = after_failure(2, STAGES, NOW, retry_after_s=7200, max_retry_after_s=3600)
    assert hop.stage is STAGES[-1]
    assert hop.due_ms == NOW + 3_600_000
    uncapped = after_failure(1, STAGES, NOW, retry_after_s=2500, max_retry_after_s=86_400)
    assert uncapped.stage is STAGES[-1]
    assert uncapped.due_ms == NOW + 2_500_000


def test_a_retry_after_never_moves_a_delivery_to_an_earlier_stage() -> None:
    hop = after_failure(3, STAGES, NOW, retry_after_s=120)
    assert hop.stage is STAGES[2]
    assert hop.due_ms == NOW + 1_800_000


@pytest.mark.parametrize(("attempts", "stage"), [(0, 0), (1, 0), (2, 1), (3, 2), (4, 2), (9, 2)])
def test_a_deferral_waits_in_its_current_stage_and_is_never_dead_lettered(
    attempts: int, stage: int
) -> None:
    hop = for_deferral(attempts, STAGES, NOW)
    assert hop.stage is STAGES[stage]
    assert hop.due_ms == NOW + STAGES[stage].delay_s * 1000


# --- Endpoint ------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _endpoint(clock: Clock, limit: int = 2, queue: int = 2, threshold: int = 3) -> Endpoint[str]:
    policy = BreakerPolicy(failure_threshold=threshold, cooldown_s=30.0, probes=1)
    return Endpoint(limit, queue, policy, clock=clock)


def test_slots_then_queue_and_a_full_queue_asks_for_backpressure_not_deferral() -> None:
    ep = _endpoint(Clock())
    assert [ep.admit(x) for x in "abcde"] == [
        Admission.START,
        Admission.START,
        Admission.QUEUED,
        Admission.QUEUED,
        Admission.QUEUED,
    ]
    assert ep.full
    assert ep.active == 2 and list(ep.queue) == ["c", "d", "e"]
    assert ep.release(True) == "c"
    assert ep.full
    assert ep.release(True) == "d"
    assert not ep.full
    assert ep.release(True) == "e"
    assert ep.release(True) is None
    assert ep.release(True) is None
    assert ep.active == 0 and ep.idle


def test_a_zero_queue_is_full_with_its_first_item_and_free_once_it_started() -> None:
    ep = _endpoint(Clock(), limit=1, queue=0)
    assert ep.admit("a") is Admission.START
    assert not ep.full
    assert ep.admit("b") is Admission.QUEUED
    assert ep.full
    assert ep.release(True) == "b"
    assert not ep.full


def test_first_answers_measure_an_endpoint_only_once_nothing_later_came_in_as_long() -> None:
    """Requests sent before an endpoint's first answer paid for its start."""
    clock = Clock()
    ep = _endpoint(clock, limit=4, queue=64)
    for x in "abcd":
        ep.admit(x)
    clock.now += 0.6
    for _ in range(4):
        ep.observe(0.6)  # new connections, a busy process: 0.6 s
        ep.release(True)
    assert not ep.measured and ep.latency is None and ep.cold_latency == pytest.approx(0.6)
    assert ep.answered_since(clock.now - 0.1)
    # The next ones, sent after that first answer, take 20 ms: that is its pace.
    clock.now += 0.03
    ep.observe(0.02)
    assert ep.measured and ep.latency == pytest.approx(0.02)
    # A first answer that arrives late does not move it.
    ep.observe(0.7)
    assert ep.latency == pytest.approx(0.02)

    # Another one whose next requests run as long as its first answers took, with
    # no answer: its first answers were its pace, not its start.
    slow = _endpoint(clock, limit=4, queue=64)
    slow.admit("a")
    clock.now += 2.5
    slow.observe(2.5)
    assert not slow.measured
    clock.now += 2.4
    assert not slow.measured
    clock.now += 0.1
    assert slow.measured and slow.known_latency() == pytest.approx(2.5)


def test_an_endpoint_with_requests_and_no_answer_for_the_stall_time_is_stalled() -> None:
    clock = Clock()
    ep = Endpoint[str](1, 4, BreakerPolicy(), clock=clock, stall_s=5.0)
    clock.now += 100  # idle time does not count
    assert ep.admit("a") is Admission.START
    assert ep.admit("b") is Admission.QUEUED
    clock.now += 4.9
    assert not ep.stalled
    clock.now += 0.2
    assert ep.stalled
    assert ep.admit("c") is Admission.STALLED
    # A slow answer is progress: the endpoint is no longer stalled.
    assert ep.release(False) == "b"
    assert not ep.stalled
    assert ep.admit("d") is Admission.QUEUED


def test_no_queued_item_starts_while_the_circuit_is_open() -> None:
    clock = Clock()
    ep = _endpoint(clock, limit=1, queue=2, threshold=1)
    assert ep.admit("a") is Admission.START
    assert ep.admit("b") is Admission.QUEUED
    assert ep.release(False) is None  # opened: "b" must be deferred by the caller
    assert not ep.closed and not ep.idle
    assert ep.drain_queue() == ["b"]
    assert not ep.queue
    assert ep.admit("c") is Admission.CIRCUIT_OPEN


def test_a_half_open_endpoint_admits_probes_only_into_free_slots() -> None:
    clock = Clock()
    ep = _endpoint(clock, limit=1, queue=2, threshold=1)
    ep.admit("a")
    ep.release(False)
    clock.now += 31
    assert ep.admit("probe", retry=True) is Admission.PROBE
    # The one slot is taken: the next is deferred, not queued, and takes no probe.
    assert ep.admit("second", retry=True) is Admission.CIRCUIT_OPEN
    assert ep.breaker.probes_started == 1
    assert ep.release(True, probe=True, retry=True) is None
    assert ep.closed
