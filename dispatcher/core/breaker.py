"""The circuit breaker of one endpoint: pure decisions over its recent answers.

Closed, the breaker counts answers in a sliding window of ``window_s`` (ten
buckets). It opens when the window holds at least ``failure_threshold`` failures
*and* they are at least ``failure_ratio`` of the answers in it, *and*, if the
window holds answers to retries (deliveries that failed before), those retries
failed at that ratio too. The threshold is the minimum sample: a ratio over
three answers says little. The condition on retries is what keeps a flaky
endpoint from starving: one that refuses each delivery's first attempt and
accepts its retry fails half of its requests, and all of them while a backlog of
first attempts drains, yet it accepts every delivery it has seen before; a dead
endpoint fails its retries as well, and opens. An endpoint failing one request
in two at random stays closed under the default ratio of 0.7.

Open, it lets nothing through for ``cooldown_s``. Then it is half-open: up to
``probes`` requests go through and their answers decide. Retries are preferred:
first attempts may take at most half of the probes, so an endpoint that only
refuses first attempts is judged on the retries it accepts too. It closes once
``close_ratio`` of the probes have succeeded, and opens again for another
cool-down as soon as that can no longer be reached. A half-open circuit whose
probes have not all answered after another cool-down is judged on the answers
it has. The probes' answers start the closed circuit's window, so what they
showed is not forgotten the moment it closes.

Answers to requests started before the circuit opened, or while it was open,
say nothing about the present and are not counted.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from dispatcher import metrics

#: The window is counted in this many buckets: it slides by a tenth of its length.
BUCKETS = 10


class State(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Permit(Enum):
    """What the breaker says to one request."""

    GO = "go"  # closed: an ordinary request
    PROBE = "probe"  # half-open: a request whose answer decides
    REFUSE = "refuse"  # open: defer it


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    failure_threshold: int = 10
    failure_ratio: float = 0.7
    window_s: float = 60.0
    cooldown_s: float = 30.0
    probes: int = 10
    close_ratio: float = 0.5

    @property
    def successes_to_close(self) -> int:
        return max(1, math.ceil(self.close_ratio * self.probes))

    @property
    def first_attempt_probes(self) -> int:
        """Probes first attempts may take; the rest wait for retries."""
        return max(1, self.probes // 2)


class Breaker:
    """One endpoint's breaker; the caller says what each request was and how it ended."""

    __slots__ = (
        "_buckets",
        "_clock",
        "_failures",
        "_retries",
        "_retry_failures",
        "_total",
        "first_probes",
        "half_open_since",
        "open_until",
        "policy",
        "probe_failures",
        "probe_successes",
        "probes_started",
        "state",
        "verdict",
    )

    def __init__(self, policy: BreakerPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self.state = State.CLOSED
        #: (bucket start, answers, failures, retries, failed retries), oldest first.
        self._buckets: deque[list[float]] = deque()
        self._total = self._failures = self._retries = self._retry_failures = 0
        self.open_until = 0.0
        self.half_open_since = 0.0
        self.probes_started = 0
        self.first_probes = 0
        self.probe_successes = 0
        self.probe_failures = 0
        #: Why the state last changed, for the log line an operator reads.
        self.verdict = ""

    # --- the window -------------------------------------------------------
    def _slide(self, now: float) -> None:
        horizon = now - self.policy.window_s
        while self._buckets and self._buckets[0][0] <= horizon:
            _start, total, failures, retries, retry_failures = self._buckets.popleft()
            self._total -= int(total)
            self._failures -= int(failures)
            self._retries -= int(retries)
            self._retry_failures -= int(retry_failures)

    def _count(self, ok: bool, retry: bool, now: float) -> None:
        self._slide(now)
        width = self.policy.window_s / BUCKETS
        if not self._buckets or now - self._buckets[-1][0] >= width:
            self._buckets.append([now, 0, 0, 0, 0])
        bucket = self._buckets[-1]
        failed = 0 if ok else 1
        bucket[1] += 1
        bucket[2] += failed
        self._total += 1
        self._failures += failed
        if retry:
            bucket[3] += 1
            bucket[4] += failed
            self._retries += 1
            self._retry_failures += failed

    def _failing(self) -> bool:
        p = self.policy
        if self._failures < p.failure_threshold or self._failures < p.failure_ratio * self._total:
            return False
        return self._retry_failures >= p.failure_ratio * self._retries

    def window(self) -> tuple[int, int]:
        """(answers, failures) in the window now."""
        self._slide(self._clock())
        return self._total, self._failures

    @property
    def clean(self) -> bool:
        """Closed with an empty window: nothing worth remembering.

        Successes are worth it too: the retries a closed circuit has seen succeed
        are what keep it closed while first attempts fail.
        """
        return self.state is State.CLOSED and self.window()[0] == 0

    # --- decisions --------------------------------------------------------
    def permit(self, retry: bool) -> Permit:
        """May a request start now? ``retry``: the delivery has failed before."""
        if self.state is State.CLOSED:
            return Permit.GO
        now = self._clock()
        if self.state is State.OPEN:
            if now < self.open_until:
                return Permit.REFUSE
            self._half_open(now)
        elif now - self.half_open_since >= self.policy.cooldown_s and self._judge_late():
            return self.permit(retry)
        p = self.policy
        if self.probes_started >= p.probes:
            return Permit.REFUSE
        if not retry:
            if self.first_probes >= p.first_attempt_probes:
                return Permit.REFUSE
            self.first_probes += 1
        self.probes_started += 1
        return Permit.PROBE

    def record(self, ok: bool | None, permit: Permit, retry: bool) -> None:
        """A request that ``permit`` let through ended; ``ok`` is None when it was cancelled."""
        if permit is Permit.PROBE and self.state is State.HALF_OPEN:
            self._probe_answered(ok, retry)
        elif permit is Permit.GO and self.state is State.CLOSED and ok is not None:
            now = self._clock()
            self._count(ok, retry, now)
            if not ok and self._failing():
                self._open(now)

    def _probe_answered(self, ok: bool | None, retry: bool) -> None:
        if ok is None:
            # Says nothing: its place goes to another probe.
            self.probes_started -= 1
            if not retry:
                self.first_probes -= 1
            return
        if ok:
            self.probe_successes += 1
        else:
            self.probe_failures += 1
        self._count(ok, retry, self._clock())
        p = self.policy
        if self.probe_successes >= p.successes_to_close:
            self._close()
        elif self.probe_failures > p.probes - p.successes_to_close:
            self._open(self._clock())

    def _judge_late(self) -> bool:
        """A half-open circuit past another cool-down decides on what answered, if any."""
        answered = self.probe_successes + self.probe_failures
        if answered == 0:
            return False
        if self.probe_successes >= self.policy.close_ratio * answered:
            self._close()
        else:
            self._open(self._clock())
        return True

    # --- transitions ------------------------------------------------------
    def _open(self, now: float) -> None:
        if self.state is State.HALF_OPEN:
            answered = self.probe_successes + self.probe_failures
            self.verdict = f"{self.probe_failures} of {answered} probes failed"
        else:
            self.verdict = (
                f"{self._failures} of {self._total} requests in the window failed, "
                f"{self._retry_failures} of {self._retries} retries"
            )
        if self.state is State.CLOSED:
            metrics.CIRCUIT_OPEN.inc()
        self.state = State.OPEN
        self.open_until = now + self.policy.cooldown_s
        self._buckets.clear()
        self._total = self._failures = self._retries = self._retry_failures = 0
        metrics.CIRCUIT_TRANSITIONS.labels("open").inc()

    def _half_open(self, now: float) -> None:
        self.state = State.HALF_OPEN
        self.half_open_since = now
        self.probes_started = self.first_probes = 0
        self.probe_successes = self.probe_failures = 0
        metrics.CIRCUIT_TRANSITIONS.labels("half_open").inc()

    def _close(self) -> None:
        self.verdict = (
            f"{self.probe_successes} of {self.probe_successes + self.probe_failures} "
            "probes succeeded"
        )
        self.state = State.CLOSED
        metrics.CIRCUIT_OPEN.dec()
        metrics.CIRCUIT_TRANSITIONS.labels("closed").inc()
