"""Per-endpoint isolation: concurrency slots, a wait queue (its lane), a circuit breaker.

The breaker's decisions are in :mod:`dispatcher.core.breaker`; this module asks it
before starting a request and tells it how each one ended.

An endpoint is one webhook (a subscription id): two webhooks on the same host
have separate slots, queues and breakers, so one customer's stalled, failing or
slow URL never slows or trips another's. What they share is per origin, in the
HTTP client: the keep-alive connections and a cap on concurrent requests.

A delivery that finds every slot taken waits in the endpoint's queue, the
in-memory part of its lane. What happens once the queue is *full* depends on how
long its last item would wait (:meth:`Endpoint.expected_wait`): up to
``queue_wait_s`` the endpoint is merely busy and the caller makes the partitions
feeding it wait (backpressure, they are paused) for a moment at most; beyond
that, or once it held them longer than that moment (:meth:`Endpoint.held`), it is *slow*
(:attr:`Endpoint.slow`) and the caller parks what does not fit in Kafka instead,
so the partitions go on for every other webhook. An endpoint that is *stalled*
(requests in flight and no answer for ``stall_s``) or whose circuit is open has
all its deliveries deferred to the retry path.

The queue bound follows how long its last item would wait, not only a count: an
endpoint that completes 2,000 requests a second may queue 2,000 x
``queue_wait_s`` deliveries, one that completes none (or is not measured yet)
keeps ``queue_size``.

A webhook with a rate limit (:meth:`Endpoint.set_rate_limit`) starts a delivery
only when its :class:`~dispatcher.core.ratelimit.StartSpacing` allows it; what
waits for that waits in the queue, whose bound is then what the limit lets start
in ``queue_wait_s`` (at least one), and the caller starts it when its time comes
(:meth:`Endpoint.take_next`). The limit counts as the endpoint's rate: beyond
that bound it is slow, and what does not fit is parked in Kafka, never held in
front of the partitions.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from enum import Enum
from typing import Generic, TypeVar

from dispatcher.core.breaker import Breaker, BreakerPolicy, Permit, State
from dispatcher.core.ratelimit import StartSpacing

T = TypeVar("T")

#: Completions are counted over windows of this length to estimate the rate.
RATE_WINDOW_S = 1.0
#: Weight of the newest attempt duration in the endpoint's latency average.
LATENCY_WEIGHT = 0.2


class Admission(Enum):
    START = "start"
    #: Start it as one of a half-open circuit's probes.
    PROBE = "probe"
    QUEUED = "queued"
    STALLED = "endpoint_stalled"
    CIRCUIT_OPEN = "circuit_open"


class Endpoint(Generic[T]):
    """Slots, queue and breaker of one endpoint; items are opaque to it."""

    __slots__ = (
        "_answered_at",
        "_clock",
        "_first_answer_at",
        "_last_progress",
        "_window_count",
        "_window_start",
        "active",
        "breaker",
        "cold_latency",
        "deferral_slot",
        "held_until",
        "in_lane",
        "latency",
        "limit",
        "pacer",
        "parked_until",
        "queue",
        "queue_size",
        "queue_wait_s",
        "rate",
        "rate_limit",
        "stall_s",
    )

    def __init__(
        self,
        limit: int,
        queue_size: int,
        policy: BreakerPolicy,
        clock: Callable[[], float] = time.monotonic,
        queue_wait_s: float = 0.0,
        stall_s: float = float("inf"),
    ) -> None:
        self.limit = limit
        self.queue_size = queue_size
        self.active = 0
        self.queue: deque[T] = deque()
        self.breaker = Breaker(policy, clock)
        #: When the next deferral of this endpoint may come due (see ``deliveries``).
        self.deferral_slot = 0.0
        self._clock = clock
        self.queue_wait_s = queue_wait_s
        #: Completions per second over the last full window; None until measured.
        self.rate: float | None = None
        self._window_start = clock()
        self._window_count = 0
        self.stall_s = stall_s
        #: When a request last completed, or started on an idle endpoint.
        self._last_progress = clock()
        #: Moving average of the durations of attempts that started after its first
        #: answer (s); None until one completed: until then it is not measured.
        self.latency: float | None = None
        #: The same of attempts that started before its first answer (s), None before
        #: one. They paid for the start, not only for the endpoint: new connections
        #: and their TLS handshakes, a process busy reading its backlog after a
        #: restart. A healthy 50 ms webhook's first answers took 0.4 s so, on a
        #: loaded machine, and taken for its pace at once they had it parked as
        #: slow; they are taken for it only when nothing better came in as long
        #: (see :attr:`measured`).
        self.cold_latency: float | None = None
        #: When it first answered, and last did (clock s); None and -inf before that.
        self._first_answer_at: float | None = None
        self._answered_at = float("-inf")
        #: When the last delivery parked in Kafka for being slow gets its turn (clock s);
        #: until then new deliveries queue behind it, in Kafka too.
        self.parked_until = 0.0
        #: Whether its busy slots are in the lanes' count since that was last
        #: recounted (kept by ``deliveries.DeliveryRunner``).
        self.in_lane = False
        #: Until when it counts as slow for having held its partitions too long
        #: (see :meth:`held`), whatever its measures say.
        self.held_until = 0.0
        #: Its share of the webhook's rate limit, if it has one.
        self.rate_limit: StartSpacing | None = None
        #: The caller's timer that starts the next queued delivery when the rate
        #: limit allows (opaque here: the endpoint only keeps it).
        self.pacer: object | None = None

    def set_rate_limit(self, per_s: float | None) -> None:
        """Starts a second this instance may make now (its share of the limit); None: no limit."""
        if per_s is None:
            self.rate_limit = None
        elif self.rate_limit is None:
            self.rate_limit = StartSpacing(per_s, self._clock)
        else:
            self.rate_limit.set_rate(per_s)

    def _spaced(self) -> bool:
        """The rate limit, if any, allows a start now."""
        return self.rate_limit is None or self.rate_limit.ready

    def next_start_in(self) -> float:
        """Seconds until the rate limit allows the next start (0: now, or no limit)."""
        return 0.0 if self.rate_limit is None else self.rate_limit.wait()

    def admit(self, item: T, retry: bool = False) -> Admission:
        """Take ``item`` now, queue it, or say why it must be deferred.

        ``retry``: the delivery has failed before (a half-open circuit prefers those).
        """
        if self.breaker.state is not State.CLOSED:
            # Probes keep to the rate limit too; one that may not start now is
            # deferred like any other the circuit does not let through.
            if self.active >= self.limit or not self._spaced():
                return Admission.CIRCUIT_OPEN
            permit = self.breaker.permit(retry)
            if permit is Permit.REFUSE:
                return Admission.CIRCUIT_OPEN
            self._start()
            return Admission.START if permit is Permit.GO else Admission.PROBE
        if self.stalled:
            return Admission.STALLED
        # With a rate limit, deliveries may wait while slots are free: a new one
        # goes behind them.
        ahead = self.rate_limit is not None and bool(self.queue)
        if self.active < self.limit and not ahead and self._spaced():
            self._start()
            return Admission.START
        self.queue.append(item)
        return Admission.QUEUED

    def _start(self) -> None:
        if self.active == 0:
            self._last_progress = self._clock()
        self.active += 1
        if self.rate_limit is not None:
            self.rate_limit.take()

    def take_next(self) -> T | None:
        """The next queued delivery, started, if a slot is free and the rate limit allows."""
        if not self.queue or not self.closed or self.active >= self.limit or not self._spaced():
            return None
        self._start()
        return self.queue.popleft()

    @property
    def closed(self) -> bool:
        return self.breaker.state is State.CLOSED

    @property
    def stalled(self) -> bool:
        """Requests in flight, none answered for ``stall_s``."""
        return self.active > 0 and self._clock() - self._last_progress >= self.stall_s

    @property
    def full(self) -> bool:
        """The queue reached its bound: whoever feeds this endpoint should wait.

        An empty queue is never full, so a zero bound still lets partitions go on
        once what waited has started.
        """
        return bool(self.queue) and len(self.queue) >= self.queue_bound()

    def queue_bound(self) -> float:
        """How many deliveries may wait here now (see the module docstring)."""
        self._roll_window()
        if self.rate is None:
            # Not measured yet: the partitions wait early, which costs nothing but
            # keeps a stalled endpoint from taking the global in-flight places.
            bound = float(self.queue_size)
        else:
            bound = max(self.queue_size, self.rate * self.queue_wait_s)
        if self.rate_limit is not None:
            # What the limit starts in ``queue_wait_s``: more would only wait here.
            bound = min(bound, max(1.0, self.rate_limit.per_s * self.queue_wait_s))
        return bound

    def observe(self, duration_s: float) -> None:
        """One attempt's duration, for :meth:`service_rate` before a window measured it.

        An attempt that started before the endpoint's first answer goes into
        ``cold_latency``, any later one into ``latency`` (see both).
        """
        now = self._clock()
        if self._first_answer_at is None:
            self._first_answer_at = now
        self._answered_at = now
        if now - duration_s < self._first_answer_at:
            self.cold_latency = _average(self.cold_latency, duration_s)
        else:
            self.latency = _average(self.latency, duration_s)

    @property
    def measured(self) -> bool:
        """Its pace is known: an attempt started after its first answer has completed,
        or, with none yet, those attempts have run as long as the first ones took
        (then what made those slow was not the start)."""
        if self.latency is not None:
            return True
        if self.cold_latency is None or self._first_answer_at is None:
            return False
        return self._clock() - self._first_answer_at >= self.cold_latency

    def known_latency(self) -> float | None:
        """Its answers' average duration; only its first answers' while it has no other."""
        return self.cold_latency if self.latency is None else self.latency

    def service_rate(self) -> float:
        """Deliveries a second this endpoint takes; ``inf`` while nothing says otherwise.

        The larger of two measures. A saturated window's count, exact for an
        endpoint that answers many times a window, but zero for one whose answers
        take longer than a window. And Little's law over the slots: ``limit``
        requests per average duration, where a request still running without any
        answer counts for at least as long as it has run (twice that before the
        endpoint's first answer), so one that has not answered yet is not taken for
        a fast one.
        """
        self._roll_window()
        known = self.known_latency()
        latency = known or 0.0
        if self.active:
            running = self._clock() - self._last_progress
            # With no answer yet, the best guess for a request that has run for t is
            # that it runs about as long again.
            latency = max(latency, running if known is not None else 2 * running)
        little = self.limit / latency if latency > 0 else float("inf")
        if self.rate is not None:
            return max(self.rate, little, 1e-3)
        return little

    def start_rate(self) -> float:
        """Deliveries a second it starts: :meth:`service_rate`, within the rate limit."""
        rate = self.service_rate()
        return rate if self.rate_limit is None else min(rate, self.rate_limit.per_s)

    def expected_wait(self, extra: int = 0) -> float:
        """Seconds the last queued delivery (and ``extra`` more) would wait for a slot."""
        waiting = len(self.queue) + extra
        return waiting / self.start_rate() if waiting else 0.0

    def overloaded(self) -> bool:
        """Its queue holds more than ``queue_wait_s`` of its work, or it held its
        partitions too long lately."""
        return self._clock() < self.held_until or self.expected_wait() > self.queue_wait_s

    def overloaded_by_hold(self) -> bool:
        """Judged slow for holding its partitions too long lately (see :meth:`held`)."""
        return self._clock() < self.held_until

    @property
    def slow(self) -> bool:
        """Its queue is full and it is :meth:`overloaded`.

        What does not fit then waits in Kafka rather than in front of the
        partitions (see the module docstring).
        """
        return self.full and self.overloaded()

    def answered_since(self, when: float) -> bool:
        """Whether a request completed after ``when`` (clock seconds)."""
        return self._answered_at > when

    def held(self, for_s: float) -> None:
        """Its full queue held partitions too long: count it as slow for ``for_s``.

        Before its first answers an endpoint has no measure, and waiting for one
        would hold every partition that feeds it for as long as its slowest request.
        """
        self.held_until = self._clock() + for_s

    def _roll_window(self) -> None:
        now = self._clock()
        elapsed = now - self._window_start
        if elapsed >= RATE_WINDOW_S:
            # Only a saturated window says how fast the endpoint is; an unsaturated
            # one (or idle time) says nothing, and the endpoint is trusted again.
            self.rate = self._window_count / elapsed if self.queue else None
            self._window_start = now
            self._window_count = 0

    def release(self, ok: bool | None, probe: bool = False, retry: bool = False) -> T | None:
        """A running delivery ended; returns the next queued item to start, if any.

        ``ok`` is None for a cancelled delivery, which says nothing about the endpoint;
        ``probe`` and ``retry`` say how it was admitted.
        """
        self.active -= 1
        self._window_count += 1
        self._last_progress = self._clock()
        self.breaker.record(ok, Permit.PROBE if probe else Permit.GO, retry)
        if not self.closed:
            return None
        return self.take_next()

    def drain_queue(self) -> list[T]:
        """Everything waiting (to defer it when the circuit opens or the endpoint stalls)."""
        items = list(self.queue)
        self.queue.clear()
        return items

    @property
    def idle(self) -> bool:
        """Nothing running or waiting, and nothing to remember (a rate limit's spacing)."""
        return self.active == 0 and not self.queue and self.closed and self._spaced()


def _average(mean: float | None, sample: float) -> float:
    """``mean`` moved towards ``sample`` by ``LATENCY_WEIGHT``; ``sample`` if no mean yet."""
    return sample if mean is None else mean + LATENCY_WEIGHT * (sample - mean)
