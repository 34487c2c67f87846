"""Scenarios 2 to 5 and 7: traffic less kind than ten hot endpoints, and memory.

2. Many origins: ``--origins`` webhooks (2,000), each on a receiver port of its
   own, events spread evenly over them: most deliveries need a TLS handshake. CPU
   per delivery against the hot-endpoint figure gives the cost of a handshake;
   afterwards the receiver's open connections show the idle pools being closed.
3. Slow endpoints: ``--slow-webhooks`` webhooks (500) on as many ports, each
   answering after ``--slow-ms`` (200 ms); once with the default in-flight limit
   and once raised to ``--slow-in-flight``. The rate is compared with what the
   limit allows, min(ceiling, in-flight / delay), the ceiling being the
   dispatcher's own rate to ten hot endpoints in this run.
4. Latency: events produced at half that ceiling for ``--latency-seconds`` to ten
   hot endpoints; percentiles of produce-to-receipt from the receiver's clock.
5. Large table: ``--table-size`` subscriptions (100,000) in the compacted topic;
   the time from start until the dispatcher is ready and its RSS then.
7. Memory: a backlog behind a stalled endpoint (see :meth:`Scenarios.memory`).
10. Neighbours: a slow organization next to a fast one (see :meth:`Scenarios.neighbours`).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from bench.harness import BenchError, Receiver
from bench.measure import deferrals, rate_window, wait_progress
from bench.profile import Profiler, summarize
from dispatcher.settings import Settings

DEFAULTS = Settings()

#: Events produced before the measured ones: connections opened, caches warm.
LATENCY_WARMUP_S = 3.0
#: Events to the fast webhook before the measured ones: its connections opened.
NEIGHBOURS_WARMUP = 20
#: Seconds waited for the receiver to see every idle connection closed.
IDLE_CLOSE_DEADLINE_S = 30.0


class Scenarios:
    """Mixed into :class:`bench.run.Bench`, which provides the receivers and processes."""

    args: Any
    receiver: Receiver

    # The helpers Bench provides.
    def namespace(self, **overrides: Any) -> Any: ...
    def dispatcher(self, ns: Any) -> Any: ...
    def drain(self, proc: Any, receiver: Receiver, prefix: str, n: int) -> dict[str, Any]: ...
    def wide_receiver(self) -> Receiver: ...
    def say(self, text: str) -> None: ...

    # --- 2. many origins ----------------------------------------------------------
    def many_origins(self, hot_cpu_ms: float | None) -> dict[str, Any]:
        origins, n = self.args.origins, self.args.origins_events
        rx = self.wide_receiver()
        rx.reset()
        self.say(f"many origins: {n} events over {origins} webhooks on {origins} origins")
        ns = self.namespace()
        try:
            subs = [(rx.url(i, f"/ok/m{i}"), f"org_m{i}", f"wh_m{i}") for i in range(origins)]
            ns.subscribe_many(subs)
            ns.publish(n, [org for _, org, _ in subs])
            with self.dispatcher(ns) as proc:
                proc.wait_ready()
                files_ready = proc.open_files()
                out = self.drain(proc, rx, "/ok/m", n)
                opened, open_now = rx.connections()
                out["files_after_drain"] = proc.open_files()
                t0 = time.monotonic()
                while rx.connections()[1] > 0:
                    if time.monotonic() - t0 > IDLE_CLOSE_DEADLINE_S:
                        break
                    time.sleep(0.25)
                idle_closed_s = time.monotonic() - t0
                _, still_open = rx.connections()
                out["files_when_idle"] = proc.open_files()
                out["files_when_ready"] = files_ready
        finally:
            ns.delete()
        delivered = out["arrived"] or 1
        out.update(
            {
                "topology": f"{origins} organizations x 1 subscription, {origins} origins",
                "connections_opened": opened,
                "connections_per_delivery": round(opened / delivered, 3),
                "open_after_drain": open_now,
                "open_after_idle": still_open,
                "seconds_until_idle_closed": round(idle_closed_s, 1),
            }
        )
        if hot_cpu_ms is not None and out["connections_per_delivery"] > 0:
            extra = out["cpu_ms_per_delivery"] - hot_cpu_ms
            out["handshake_cpu_ms"] = round(extra / out["connections_per_delivery"], 3)
        return out

    # --- 3. slow endpoints ------------------------------------------------------
    def slow(self, ceiling: float | None) -> dict[str, Any]:
        webhooks, n, delay_ms = self.args.slow_webhooks, self.args.slow_events, self.args.slow_ms
        runs = {}
        for label, limit in (
            ("default", None),
            ("raised", self.args.slow_in_flight),
        ):
            rx = self.wide_receiver()
            rx.reset()
            overrides = {} if limit is None else {"max_in_flight": limit}
            ns = self.namespace(**overrides)
            in_flight = int(ns.settings.max_in_flight)
            self.say(
                f"slow endpoints ({label}): {n} events over {webhooks} webhooks answering "
                f"after {delay_ms} ms, max_in_flight {in_flight}"
            )
            try:
                subs = [
                    (rx.url(i, f"/delay/{delay_ms}/s{i}"), f"org_s{i}", f"wh_s{i}")
                    for i in range(webhooks)
                ]
                ns.subscribe_many(subs)
                ns.publish(n, [org for _, org, _ in subs])
                with self.dispatcher(ns) as proc:
                    proc.wait_ready()
                    idle_rss = proc.memory_mb()["VmRSS"]
                    out = self.drain(proc, rx, "/delay/", n)
                    peak = proc.memory_mb()["VmHWM"]
            finally:
                ns.delete()
            allowed = in_flight / (delay_ms / 1000)
            bound = min(ceiling, allowed) if ceiling else allowed
            opened, _ = rx.connections()
            # The most seen in flight (the gauge, read every second or so).
            held = max(out["peak_in_flight_sampled"], 1.0)
            out.update(
                {
                    "max_in_flight": in_flight,
                    "in_flight_allows_per_s": round(allowed, 1),
                    "bound_per_s": round(bound, 1),
                    "ratio": round(out["per_s"] / bound, 3) if bound else None,
                    "rss_ready_mb": idle_rss,
                    "connections_per_delivery": round(opened / max(out["arrived"], 1), 3),
                    "peak_rss_mb": peak,
                    "kb_per_in_flight": round(1024 * (peak - idle_rss) / held, 1),
                }
            )
            runs[label] = out
        return {
            "topology": f"{webhooks} organizations x 1 subscription, {webhooks} origins, "
            f"{delay_ms} ms answers",
            "ceiling_per_s": ceiling,
            **runs,
        }

    # --- 4. latency -------------------------------------------------------------
    def latency(self, receiver: Receiver, endpoints: int, rate: float) -> dict[str, Any]:
        seconds = self.args.latency_seconds
        receiver.reset()
        self.say(f"latency: {rate:.0f} events/s for {seconds:g} s to {endpoints} endpoints")
        ns = self.namespace()
        try:
            names = [f"org_l{i}" for i in range(endpoints)]
            ns.subscribe_many(
                [(receiver.url(i, f"/lat/l{i}"), names[i], f"wh_l{i}") for i in range(endpoints)]
            )
            with self.dispatcher(ns) as proc:
                proc.wait_ready()
                sent = ns.publish_paced(rate, seconds, names, warmup_s=LATENCY_WARMUP_S)
                deadline = time.monotonic() + 60
                while receiver.count("/lat/") < sent and time.monotonic() < deadline:
                    time.sleep(0.2)
                sent -= int(rate * LATENCY_WARMUP_S)  # about as many in the warm-up
        finally:
            ns.delete()
        stats = receiver.latency()
        if stats.get("count", 0) < 0.99 * sent:
            raise BenchError(f"latency: {stats.get('count', 0)} of {sent} deliveries arrived")
        return {
            "topology": f"{endpoints} organizations x 1 subscription, {endpoints} endpoints",
            "rate_per_s": round(rate, 1),
            "events": sent,
            "warmup_s": LATENCY_WARMUP_S,
            **{k: round(v, 2) for k, v in stats.items()},
        }

    # --- 5. large table ------------------------------------------------------------
    def large_table(self, receiver: Receiver) -> dict[str, Any]:
        size = self.args.table_size
        self.say(f"large table: {size} subscriptions in the compacted topic")
        ns = self.namespace()
        try:
            t0 = time.monotonic()
            ns.subscribe_many(
                [
                    (receiver.url(i % 10, f"/ok/t{i}"), f"org_t{i // 4}", f"wh_t{i}")
                    for i in range(size)
                ]
            )
            written_s = time.monotonic() - t0
            with self.dispatcher(ns) as proc:
                t0 = time.monotonic()
                proc.wait_ready(timeout_s=300)
                ready_s = time.monotonic() - t0
                loaded = proc.metric("dispatcher_subscriptions_loaded")
                memory = proc.memory_mb()
        finally:
            ns.delete()
        if loaded < size:
            raise BenchError(f"large table: {loaded:.0f} of {size} subscriptions loaded")
        return {
            "subscriptions": size,
            "write_seconds": round(written_s, 1),
            "ready_seconds": round(ready_s, 2),
            "rss_mb": memory["VmRSS"],
            "peak_rss_mb": memory["VmHWM"],
        }

    # --- 7. memory --------------------------------------------------------------
    def memory(self) -> dict[str, Any]:
        n = self.args.memory_events
        delay = self.args.memory_retry_delay
        self.say(
            f"memory: {n}-event backlog, its one endpoint stalled, first retry after {delay} s"
        )
        self.receiver.reset()
        # The first retry stage reads the deferred deliveries back after its delay
        # and defers them again, for as long as the endpoint stalls: the phase lasts
        # until it has done so once, while the input backlog may still be draining.
        delays = [delay, *(d for d in DEFAULTS.retry_delays_s[1:] if d > delay)]
        ns = self.namespace(retry_delays_s=delays)
        try:
            ns.subscribe(self.receiver.url(0, "/stall/m0"), "org_mem", "wh_m0")
            ns.publish(n, ["org_mem"])
            first_stage = f"{ns.settings.retry_topic_prefix}{ns.stage_names[0]}"
            # Deliveries the stalled endpoint holds (started or queued), never deferred.
            held = DEFAULTS.max_in_flight_per_endpoint + DEFAULTS.endpoint_queue_size
            with self.dispatcher(ns) as proc:
                proc.wait_ready()
                t0 = time.monotonic()
                samples: list[float] = []
                deferred_once = 0.0

                def handled() -> float:
                    nonlocal deferred_once
                    samples.append(proc.memory_mb()["VmRSS"])
                    written = ns.records(first_stage)
                    if not deferred_once and written + held >= n:
                        deferred_once = time.monotonic() - t0
                    return written

                wait_progress(handled, 2 * (n - held), 900, "the backlog to be deferred twice")
                wall = time.monotonic() - t0
                extra = deferrals(proc)
                memory = proc.memory_mb()
                stalled_requests = self.receiver.count("/stall/")
                self.receiver.release()
        finally:
            ns.delete()
        return {
            "topology": "1 organization x 1 subscription, its endpoint stalled",
            "events": n,
            "retry_delays_s": delays,
            "input_deferred_after_s": round(deferred_once, 3),
            "wall_seconds": round(wall, 3),
            "stalled_requests": stalled_requests,
            **extra,
            "peak_rss_mb": memory["VmHWM"],
            "final_rss_mb": memory["VmRSS"],
            "rss_samples_mb": {
                "min": min(samples, default=0.0),
                "median": statistics.median(samples) if samples else 0.0,
                "max": max(samples, default=0.0),
            },
        }

    # --- 10. neighbours ---------------------------------------------------------
    def neighbours(self) -> dict[str, Any]:
        """A slow organization's webhook next to a fast one's, in the same partitions.

        One dispatcher; organization F's webhook answers at once, S's after
        ``--neighbours-slow-ms`` (2.5 s), on two ports. First F's
        ``--neighbours-events`` alone (the baseline), then as many again with S's
        ``--neighbours-slow-events`` spread evenly among them: each run of F's
        events followed by one of S's, the runs round-robin over the partitions,
        so every partition carries both, interleaved, the same layout as F alone.
        Each batch is published at once to the ready dispatcher, stamped with its
        produce time: F's rate from the receiver's clock (warm-up and tail shares
        left out, as everywhere), F's latency from produce to receipt (the batch's
        own queue included, the same in both); then the wait for all of S's, and
        whether any of them took a second attempt.
        """
        n, n_slow = self.args.neighbours_events, self.args.neighbours_slow_events
        delay_ms = self.args.neighbours_slow_ms
        rx = self.receiver
        rx.reset()
        self.say(
            f"neighbours: {n} events to a fast webhook alone, then {n} more with {n_slow} "
            f"to a webhook answering after {delay_ms} ms among them"
        )
        # F's events per S event; a run of them and one of S's share a partition.
        every = max(n // max(n_slow, 1), 1)
        mixed: list[str] = []
        for i in range(n):
            mixed.append("org_nf")
            if (i + 1) % every == 0 and len(mixed) - (i + 1) < n_slow:
                mixed.append("org_ns")
        mixed += ["org_ns"] * (n + n_slow - len(mixed))
        ns = self.namespace()
        slots = int(ns.settings.max_in_flight_per_endpoint)
        try:
            ns.subscribe_many(
                [
                    (rx.url(0, "/lat/nf"), "org_nf", "wh_nf"),
                    (rx.url(1, f"/delay/{delay_ms}/ns"), "org_ns", "wh_ns"),
                ]
            )
            with self.dispatcher(ns) as proc:
                proc.wait_ready()
                ns.publish_stamped(["org_nf"] * NEIGHBOURS_WARMUP, kind="warm")
                wait_progress(lambda: rx.count("/lat/nf"), NEIGHBOURS_WARMUP, 60, "warm-up")
                rx.reset()
                alone = self._fast_batch(ns, proc, ["org_nf"] * n, every + 1, "alone")
                rx.reset()
                t0 = time.monotonic()
                beside = self._fast_batch(ns, proc, mixed, every + 1, "beside")
                # S's deliveries take n_slow x delay / slots at best; three times that.
                bound = 60 + 3 * n_slow * delay_ms / 1000 / slots
                # Parked deliveries come back within the first retry stage's delay:
                # S may get nothing for that long and still get everything.
                quiet = ns.settings.retry_delays_s[0] + 30
                slow_got = wait_progress(
                    lambda: rx.count("/delay/"), n_slow, bound, "S's deliveries", quiet
                )
                slow_s = time.monotonic() - t0
                extra = deferrals(proc)
                later = rx.later_attempts("/delay/")
        finally:
            ns.delete()
        # The earliest S's last request can arrive: its slots busy all the time.
        earliest = max(n_slow - slots, 0) * delay_ms / 1000 / slots
        return {
            "topology": f"2 organizations x 1 subscription on 2 endpoints, one answering "
            f"after {delay_ms} ms, one of its events after every {every} of the other's "
            f"in each of {ns.settings.topic_partitions} partitions",
            "fast_events": n,
            "slow_events": n_slow,
            "fast_alone": alone,
            "fast_beside_slow": beside,
            "ratio": round(beside["per_s"] / alone["per_s"], 3) if alone["per_s"] else None,
            "p99_ratio": round(beside["p99_ms"] / alone["p99_ms"], 3)
            if alone.get("p99_ms") and beside.get("p99_ms")
            else None,
            "slow": {
                "delivered": slow_got,
                "complete": slow_got >= n_slow,
                "later_attempts": later,
                "last_request_s": round(slow_s, 1),
                "earliest_last_request_s": round(earliest, 1),
                **extra,
            },
        }

    def _fast_batch(
        self, ns: Any, proc: Any, orgs: list[str], group: int, label: str
    ) -> dict[str, Any]:
        """Publish one stamped event per item of ``orgs``; F's rate and latency figures.

        With ``--profile DIR``, py-spy records the dispatcher until F's last
        delivery, into ``DIR/neighbours-<label>.txt``.
        """
        fast = orgs.count("org_nf")
        profiler = raw = None
        if self.args.profile is not None:
            self.args.profile.mkdir(parents=True, exist_ok=True)
            raw = self.args.profile / f"neighbours-{label}.txt"
            profiler = Profiler(proc.proc.pid, raw)
        t0 = time.monotonic()
        ns.publish_stamped(orgs, group)
        got = wait_progress(lambda: self.receiver.count("/lat/nf"), fast, 300, "F's deliveries")
        wall = time.monotonic() - t0
        if profiler is not None:
            profiler.stop()
        w = rate_window(self.receiver, "/lat/nf", fast)
        stats = self.receiver.latency()
        return {
            "arrived": got,
            "per_s": round(w.rate, 1),
            "window_seconds": round(w.seconds, 3),
            "wall_seconds": round(wall, 3),
            "per_s_publish_to_last": round(fast / wall, 1) if wall else None,
            **{k: round(v, 2) for k, v in stats.items()},
            **({"profile": summarize(raw)} if raw is not None else {}),
        }
