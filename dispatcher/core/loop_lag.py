"""How late the event loop runs what is due: this process's own slowness.

Every latency the dispatcher measures is taken on its event loop, so when the
process is starved of CPU (a fraction of a core, a noisy neighbour) a 50 ms
answer is seen seconds late and every endpoint looks slow. The supervision tick
sleeps a known time; how much longer it took to wake is the loop's lag, which
tells such a measure apart from a slow endpoint.
"""

from __future__ import annotations

from dispatcher import metrics

#: Beyond this lag the loop, not the endpoints, is the bottleneck: answers are
#: measured late by as much, and an endpoint judged slow for it would be parked
#: in Kafka for a delay stage while it could take its deliveries as fast as this
#: process sends them. A healthy loop wakes within milliseconds; 100 ms is a
#: starved one, and about the latency of a healthy endpoint's answer.
LOOP_LAG_MAX_S = 0.1
#: Per measure, the smoothed lag keeps this fraction of the one before: it rises
#: at once with a late wake-up and falls over a few ticks, so one punctual tick
#: in a starved spell does not bring back the verdicts at once.
LOOP_LAG_KEEP = 0.5


class LoopLag:
    """The event loop's lag, smoothed, as measured by a sleep's overshoot."""

    def __init__(self) -> None:
        #: Seconds the loop runs what is due late (smoothed).
        self.seconds = 0.0
        #: Sleeps measured so far.
        self.measures = 0

    def observe(self, slept_s: float, asked_s: float) -> None:
        """A sleep of ``asked_s`` took ``slept_s`` on the loop's clock."""
        overshoot = max(0.0, slept_s - asked_s)
        self.seconds = max(overshoot, self.seconds * LOOP_LAG_KEEP)
        self.measures += 1
        metrics.EVENT_LOOP_LAG.set(self.seconds)

    @property
    def lagging(self) -> bool:
        return self.seconds > LOOP_LAG_MAX_S
