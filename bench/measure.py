"""Waiting for a phase to finish, and the figures read off the receiver and the process."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.harness import BenchError, Receiver, Window
from bench.process import Dispatcher, metric_in
from bench.profile import Profiler

#: Shares of the deliveries left out of a rate: start-up, and the uneven drain at the end.
WARMUP = 0.10
TAIL = 0.05
#: Give up waiting when no delivery arrived for this long.
NO_PROGRESS_S = 20.0

Progress = Callable[[], float]


def say(text: str) -> None:
    print(f"bench: {text}", flush=True)


def wait_progress(
    done: Progress, target: float, deadline_s: float, what: str, stall_s: float = NO_PROGRESS_S
) -> float:
    """Wait until ``done()`` reaches ``target``, or stops moving for ``stall_s``; returns
    the last value."""
    start = last_move = time.monotonic()
    last = done()
    while last < target:
        now = time.monotonic()
        if now - start > deadline_s:
            raise BenchError(f"{what}: only {last:g} of {target:g} after {deadline_s:g} s")
        if now - last_move > stall_s:
            say(f"{what}: stopped at {last:g} of {target:g} (no progress for {stall_s:g} s)")
            return last
        time.sleep(0.25)
        value = done()
        if value != last:
            last, last_move = value, time.monotonic()
    return last


class Sampled:
    """A figure read at most every ``every_s`` (scraping /metrics costs the dispatcher CPU)."""

    def __init__(self, read: Progress, every_s: float) -> None:
        self._read = read
        self._every_s = every_s
        self._at = -every_s
        self._value = 0.0

    def __call__(self) -> float:
        now = time.monotonic()
        if now - self._at >= self._every_s:
            self._value, self._at = self._read(), now
        return self._value


def rate_window(receiver: Receiver, prefix: str, expected: int) -> Window:
    return receiver.window(prefix, int(expected * WARMUP), int(expected * TAIL))


def window_dict(w: Window) -> dict[str, Any]:
    return {
        "arrived": w.count,
        "measured": w.used,
        "seconds": round(w.seconds, 3),
        "per_s": round(w.rate, 1),
    }


def deferrals(proc: Dispatcher) -> dict[str, float]:
    return {
        "deferred": proc.metric("dispatcher_deferrals_total"),
        "attempts_failed": proc.metric("dispatcher_delivery_attempts_total", outcome="failure"),
    }


def drain(
    proc: Dispatcher, receiver: Receiver, prefix: str, n: int, profile: Path | None = None
) -> dict[str, Any]:
    """Wait for a ready dispatcher to deliver (or defer) ``n``; rate, CPU, memory.

    The rate is the receiver's, over the deliveries under ``prefix``; the CPU time
    is the process's own over the whole drain. With ``profile``, py-spy records
    the drain into that file.
    """
    profiler = Profiler(proc.proc.pid, profile) if profile is not None else None
    t0, cpu0 = time.monotonic(), proc.cpu_s()
    peak_in_flight = 0.0

    def deferred_now() -> float:
        nonlocal peak_in_flight
        text = proc.metrics()
        in_flight = metric_in(text, "dispatcher_in_flight_deliveries")
        peak_in_flight = max(peak_in_flight, in_flight)
        return metric_in(text, "dispatcher_deferrals_total")

    deferred = Sampled(deferred_now, 1.0)

    def done() -> float:
        # A deferred delivery comes back only after the first retry delay.
        return receiver.count(prefix) + deferred()

    wait_progress(done, n, 900, f"deliveries under {prefix}")
    wall, cpu = time.monotonic() - t0, proc.cpu_s() - cpu0
    if profiler is not None:
        profiler.stop()
    return {
        **window_dict(rate_window(receiver, prefix, n)),
        "wall_seconds": round(wall, 3),
        "cpu_ms_per_delivery": round(1000 * cpu / n, 3),
        **deferrals(proc),
        "peak_in_flight_sampled": peak_in_flight,
        "rss_mb": proc.memory_mb(),
    }
