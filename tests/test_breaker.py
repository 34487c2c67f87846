"""The circuit breaker's decisions and the pacing of deferrals: pure logic, injected clock."""

from __future__ import annotations

import random

import pytest

from dispatcher import metrics
from dispatcher.core.breaker import Breaker, BreakerPolicy, Permit, State
from dispatcher.core.routing import paced_deferral
from dispatcher.stages import RetryStage

POLICY = BreakerPolicy(
    failure_threshold=10,
    failure_ratio=0.7,
    window_s=60.0,
    cooldown_s=30.0,
    probes=10,
    close_ratio=0.5,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def answer(b: Breaker, ok: bool, retry: bool = False) -> Permit:
    permit = b.permit(retry)
    if permit is not Permit.REFUSE:
        b.record(ok, permit, retry)
    return permit


def opened(clock: Clock, policy: BreakerPolicy = POLICY) -> Breaker:
    b = Breaker(policy, clock)
    for _ in range(policy.failure_threshold):
        answer(b, False)
    assert b.state is State.OPEN
    return b


def test_failures_below_the_threshold_never_open_whatever_the_ratio() -> None:
    b = Breaker(POLICY, Clock())
    for _ in range(9):
        assert answer(b, False) is Permit.GO
    assert b.state is State.CLOSED
    assert answer(b, False) is Permit.GO
    assert b.state is State.OPEN


def test_an_endpoint_failing_one_request_in_two_stays_closed() -> None:
    clock = Clock()
    b = Breaker(POLICY, clock)
    for i in range(10_000):
        clock.now += 0.01
        answer(b, ok=i % 2 == 1)  # every first attempt fails, every retry succeeds
    assert b.state is State.CLOSED
    # Between 54 and 60 s of answers at 100 a second (the window slides by buckets).
    total, failures = b.window()
    assert 5400 <= total <= 6000 and abs(total - 2 * failures) <= 1


def test_random_half_failures_stay_closed() -> None:
    clock = Clock()
    b = Breaker(POLICY, clock)
    rng = random.Random(19)
    for _ in range(20_000):
        clock.now += 0.05
        answer(b, ok=rng.random() < 0.5)
    assert b.state is State.CLOSED


def test_first_attempts_failing_while_retries_succeed_never_open_it() -> None:
    """A backlog of first attempts drains after a close: its retries carry the verdict."""
    clock = Clock()
    b = opened(clock)
    clock.now += 31
    for _ in range(5):
        answer(b, False, retry=False)
    for _ in range(5):
        answer(b, True, retry=True)
    assert b.state is State.CLOSED
    # Two hundred first attempts fail before any of their retries is due.
    for _ in range(200):
        clock.now += 0.01
        assert answer(b, False, retry=False) is Permit.GO
    assert b.state is State.CLOSED
    for _ in range(200):
        clock.now += 0.01
        answer(b, False, retry=False)
        answer(b, True, retry=True)
    assert b.state is State.CLOSED


def test_failing_retries_open_it() -> None:
    clock = Clock()
    b = Breaker(POLICY, clock)
    for _ in range(3):
        answer(b, True, retry=True)
    for _ in range(10):
        answer(b, False, retry=False)
    assert b.state is State.CLOSED  # its retries still succeed
    for _ in range(6):
        answer(b, False, retry=True)
    assert b.state is State.CLOSED  # 6 of 9 retries failed: 67 %
    answer(b, False, retry=True)
    assert b.state is State.OPEN  # 7 of 10


def test_the_ratio_opens_it_once_the_threshold_is_met() -> None:
    clock = Clock()
    b = Breaker(POLICY, clock)
    for _ in range(5):
        answer(b, True)
    # 10 failures against 5 successes: 67 %, under the 70 % ratio.
    for _ in range(10):
        answer(b, False)
    assert b.state is State.CLOSED
    answer(b, False)  # 11 of 16: 69 %
    assert b.state is State.CLOSED
    answer(b, False)  # 12 of 17: 71 %
    assert b.state is State.OPEN
    assert b.open_until == clock.now + 30.0


def test_old_answers_slide_out_of_the_window() -> None:
    clock = Clock()
    b = Breaker(POLICY, clock)
    for _ in range(9):
        answer(b, False)
    clock.now += 61
    assert b.window() == (0, 0)
    assert answer(b, False) is Permit.GO
    assert b.state is State.CLOSED
    assert b.clean is False


def test_an_open_circuit_refuses_until_the_cooldown_then_admits_several_probes() -> None:
    clock = Clock()
    b = opened(clock)
    clock.now += 29.9
    assert b.permit(retry=True) is Permit.REFUSE
    clock.now += 0.2
    permits = [b.permit(retry=True) for _ in range(12)]
    assert permits == [Permit.PROBE] * 10 + [Permit.REFUSE] * 2
    assert b.state is State.HALF_OPEN


def test_first_attempts_take_at_most_half_the_probes_retries_the_rest() -> None:
    clock = Clock()
    b = opened(clock)
    clock.now += 31
    firsts = [b.permit(retry=False) for _ in range(7)]
    assert firsts == [Permit.PROBE] * 5 + [Permit.REFUSE] * 2
    assert [b.permit(retry=True) for _ in range(6)] == [Permit.PROBE] * 5 + [Permit.REFUSE]


def test_an_endpoint_refusing_first_attempts_closes_on_its_retries() -> None:
    clock = Clock()
    b = opened(clock)
    clock.now += 31
    for _ in range(5):
        answer(b, False, retry=False)
    assert b.state is State.HALF_OPEN
    for _ in range(4):
        answer(b, True, retry=True)
    assert b.state is State.HALF_OPEN
    answer(b, True, retry=True)
    assert b.state is State.CLOSED
    assert answer(b, False) is Permit.GO
    assert b.window() == (11, 6)  # the probes' answers started the window


def test_probes_that_can_no_longer_reach_the_close_ratio_reopen_it() -> None:
    clock = Clock()
    b = opened(clock)
    clock.now += 31
    for _ in range(4):
        answer(b, True, retry=True)
    for _ in range(5):
        answer(b, False, retry=True)
    assert b.state is State.HALF_OPEN  # 4 of 9 so far: 5 of 10 is still possible
    answer(b, False, retry=True)
    assert b.state is State.OPEN
    assert b.open_until == clock.now + 30.0
    assert b.permit(retry=True) is Permit.REFUSE


def test_a_cancelled_probe_gives_its_place_back() -> None:
    clock = Clock()
    b = opened(clock, BreakerPolicy(failure_threshold=1, probes=1, cooldown_s=30.0))
    clock.now += 31
    assert b.permit(retry=False) is Permit.PROBE
    assert b.permit(retry=False) is Permit.REFUSE
    b.record(None, Permit.PROBE, retry=False)
    assert b.state is State.HALF_OPEN
    assert b.permit(retry=False) is Permit.PROBE


def test_a_half_open_circuit_decides_on_what_answered_after_another_cooldown() -> None:
    clock = Clock()
    b = opened(clock)
    clock.now += 31
    answer(b, True, retry=True)
    answer(b, True, retry=True)
    answer(b, False, retry=False)
    assert b.state is State.HALF_OPEN
    clock.now += 30
    assert b.permit(retry=False) is Permit.GO  # 2 of 3 succeeded: closed
    assert b.state is State.CLOSED


def test_answers_to_requests_started_in_another_state_are_not_counted() -> None:
    clock = Clock()
    b = Breaker(BreakerPolicy(failure_threshold=2, cooldown_s=30.0, probes=2), clock)
    started = [b.permit(retry=False) for _ in range(4)]
    assert started == [Permit.GO] * 4
    b.record(False, Permit.GO, retry=False)
    b.record(False, Permit.GO, retry=False)
    assert b.state is State.OPEN
    b.record(True, Permit.GO, retry=False)  # started while closed, answered while open
    assert b.state is State.OPEN
    clock.now += 31
    assert b.permit(retry=True) is Permit.PROBE
    b.record(False, Permit.GO, retry=False)  # the last of the old ones, while half-open
    assert (b.probe_successes, b.probe_failures) == (0, 0)


# --- pacing of deferrals -------------------------------------------------------------

STAGES = [
    RetryStage(0, "1m", "r.1m", 60),
    RetryStage(1, "5m", "r.5m", 300),
    RetryStage(2, "30m", "r.30m", 1800),
]


@pytest.mark.parametrize(
    ("attempts", "not_before_s", "wait_s"),
    [
        (0, 0, 60),  # no backlog: the usual delay
        (0, 45, 60),  # never sooner than the usual delay
        (0, 200, 200),  # the slot
        (2, 100, 300),  # a retry's usual delay is longer
        (0, 9000, 1800),  # past the longest delay: the longest delay
    ],
)
def test_a_paced_deferral_waits_for_its_slot_in_the_last_stage(
    attempts: int, not_before_s: int, wait_s: int
) -> None:
    now = 1_000_000
    hop = paced_deferral(attempts, STAGES, now, now + not_before_s * 1000)
    # One stage for every paced hop: two copies of one (a crash) meet in one partition.
    assert hop.stage is STAGES[-1]
    assert hop.due_ms == now + wait_s * 1000


def test_a_window_of_successes_is_kept_until_it_has_slid_empty() -> None:
    clock = Clock()
    b = Breaker(POLICY, clock)
    answer(b, True, retry=True)
    assert not b.clean  # the retries it accepted are what keep it closed later
    clock.now += 61
    assert b.clean


# --- the per-webhook deferral counter ------------------------------------------------


def test_deferrals_count_per_webhook_up_to_the_series_limit_then_as_other() -> None:
    run = f"wh_{random.Random().getrandbits(32):08x}"
    ids = [f"{run}_{i}" for i in range(3)]

    def count(webhook_id: str) -> float:
        labels = {"webhook_id": webhook_id, "reason": "circuit_open"}
        return metrics.REGISTRY.get_sample_value("dispatcher_webhook_deferrals_total", labels) or 0

    other_before = count(metrics.OTHER_WEBHOOKS)
    limit = len(metrics._DEFERRED_WEBHOOKS) + 2  # room for two more in this process
    for webhook_id in ids * 2:
        metrics.webhook_deferred(webhook_id, "circuit_open", limit)
    assert [count(w) for w in ids] == [2, 2, 0]
    assert count(metrics.OTHER_WEBHOOKS) - other_before == 2
