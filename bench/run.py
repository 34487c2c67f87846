"""The benchmark: throughput against plain httpx, isolation from a stalled endpoint, memory.

Run with ``bash scripts/bench.sh [flags]`` (which builds the receiver and makes
sure the broker is up). Every phase gets topics and consumer groups of its own
on the local broker, pre-filled with a backlog before the dispatcher starts, and
deletes them afterwards. Rates come from the receiver's clock: arrivals between
the end of a warm-up share and the start of a tail share of the deliveries.

1. Throughput: ``--orgs`` organizations with one subscription each, every one on
   a receiver port of its own (a distinct endpoint), events spread evenly over
   them. The dispatcher drains the backlog; the baseline is a plain httpx loop
   with the same concurrency (endpoints x per-endpoint limit), TLS, body size
   and receiver. Ratio = dispatcher rate / baseline rate.
2. Isolation: one organization, ten subscriptions on ten ports; run once with all
   ten answering, once with the tenth stalled (it never answers). Ratio = the
   nine healthy endpoints' rate stalled / their rate unstalled.
3. Memory: a ``--memory-events`` backlog for one organization whose one endpoint
   is stalled, so that every event is consumed and deferred to the first retry
   stage as fast as the dispatcher can, and read back and deferred again once the
   stage's delay (shortened to ``--memory-retry-delay``) has passed; its peak RSS
   (VmHWM) once all of them have been deferred twice.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import engines
from bench.harness import (
    REPO,
    BenchError,
    Certificates,
    Dispatcher,
    Namespace,
    Receiver,
    Window,
    event,
    load_average,
    machine,
)
from bench.profile import Profiler, summarize
from dispatcher.models import parse_event
from dispatcher.settings import Settings

DEFAULTS = Settings()
ENDPOINTS = 10
#: Shares of the deliveries left out of a rate: start-up, and the uneven drain at the end.
WARMUP = 0.10
TAIL = 0.05
#: Give up waiting when no delivery arrived for this long.
NO_PROGRESS_S = 20.0

Progress = Callable[[], float]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--receiver", type=Path, required=True, help="the built Go receiver")
    p.add_argument("--events", type=int, default=20_000, help="throughput backlog (events)")
    p.add_argument("--orgs", type=int, default=ENDPOINTS, help="organizations (= endpoints)")
    p.add_argument(
        "--isolation-events",
        type=int,
        default=2_000,
        help="isolation backlog (events; each fans out to ten deliveries)",
    )
    p.add_argument("--memory-events", type=int, default=100_000, help="memory backlog (events)")
    p.add_argument(
        "--memory-retry-delay",
        type=int,
        default=20,
        help="first retry delay (s) in the memory phase, which lasts until it has passed",
    )
    p.add_argument("--partitions", type=int, default=12, help="partitions of every topic")
    p.add_argument(
        "--repeat", type=int, default=1, help="measure throughput and isolation this many times"
    )
    p.add_argument(
        "--only",
        choices=["engines", "throughput", "isolation", "memory"],
        action="append",
        help="run only these phases (repeatable)",
    )
    p.add_argument(
        "--engine-requests", type=int, default=10_000, help="POSTs of each bare engine loop"
    )
    p.add_argument(
        "--legacy-tree",
        type=Path,
        help="a source tree with an earlier dispatcher package whose engine is measured too",
    )
    p.add_argument(
        "--profile",
        type=Path,
        help="record the dispatcher with py-spy in the throughput phase, into DIR",
    )
    p.add_argument(
        "--set",
        metavar="NAME=VALUE",
        action="append",
        default=[],
        help="a dispatcher setting for every phase, e.g. partition_buffer_high=200",
    )
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results.json")
    args = p.parse_args(argv)
    overrides: dict[str, Any] = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or name not in Settings.model_fields:
            p.error(f"--set wants NAME=VALUE with a setting name, got {item!r}")
        overrides[name] = json.loads(value) if value[:1] in "[{" else value
    args.set = overrides
    if args.orgs > ENDPOINTS or args.orgs < 1:
        p.error(f"--orgs must be 1..{ENDPOINTS}")
    return args


def say(text: str) -> None:
    print(f"bench: {text}", flush=True)


def wait_progress(done: Progress, target: float, deadline_s: float, what: str) -> float:
    """Wait until ``done()`` reaches ``target``, or stops moving; returns the last value."""
    start = last_move = time.monotonic()
    last = done()
    while last < target:
        now = time.monotonic()
        if now - start > deadline_s:
            raise BenchError(f"{what}: only {last:g} of {target:g} after {deadline_s:g} s")
        if now - last_move > NO_PROGRESS_S:
            say(f"{what}: stopped at {last:g} of {target:g} (no progress for {NO_PROGRESS_S:g} s)")
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


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.certs = Certificates(tmp)
        self.receiver = Receiver(args.receiver, self.certs, ENDPOINTS)
        self.runs = 0
        # Kept after the run (and replaced by the next one) for a look at failures.
        self.logs = REPO / "bench" / ".build" / "logs"
        shutil.rmtree(self.logs, ignore_errors=True)
        self.logs.mkdir(parents=True)

    def close(self) -> None:
        self.receiver.close()

    def namespace(self, **overrides: Any) -> Namespace:
        values = {**overrides, **self.args.set}
        return Namespace(self.certs.ca_file, self.args.partitions, **values)

    def dispatcher(self, ns: Namespace) -> Dispatcher:
        self.runs += 1
        return Dispatcher(ns, self.logs / f"dispatcher-{self.runs}.log")

    def deferrals(self, proc: Dispatcher) -> dict[str, float]:
        return {
            "deferred": proc.metric("dispatcher_deferrals_total"),
            "attempts_failed": proc.metric("dispatcher_delivery_attempts_total", outcome="failure"),
        }

    # --- 0. engines --------------------------------------------------------------
    def engines(self) -> list[dict[str, Any]]:
        body = parse_event(json.dumps(event("sess_00000000", "org_00")).encode(), 1 << 20).body
        return engines.compare(
            self.receiver,
            self.certs.ca_file,
            body,
            ENDPOINTS,
            DEFAULTS.max_in_flight_per_endpoint,
            self.args.engine_requests,
            self.args.legacy_tree,
            say,
        )

    # --- 1. throughput ----------------------------------------------------------
    def throughput(self) -> dict[str, Any]:
        n, orgs = self.args.events, self.args.orgs
        per_endpoint = DEFAULTS.max_in_flight_per_endpoint
        concurrency = min(DEFAULTS.max_in_flight, orgs * per_endpoint)

        body = parse_event(json.dumps(event("sess_00000000", "org_00")).encode(), 1 << 20).body
        loop = str(self.args.set.get("event_loop", DEFAULTS.event_loop))
        # The same engine and client as the dispatcher's, on the same event loop;
        # bare aiohttp, the ceiling; and stock httpx.
        kinds = {
            "same_engine": ("dispatcher_direct", loop),
            "ceiling": ("aiohttp", loop),
            "httpx": ("httpx_pool_per_endpoint", "asyncio"),
        }
        baselines = {}
        for name, (kind, on) in kinds.items():
            say(f"throughput: baseline {kind} on {on}, {n} POSTs, {orgs} x {per_endpoint}")
            baselines[name] = engines.bare_loop(
                self.receiver, self.certs.ca_file, kind, body, orgs, per_endpoint, n, loop=on
            )
        self.receiver.reset()

        say(f"throughput: dispatcher, {n}-event backlog, {orgs} organizations")
        ns = self.namespace()
        try:
            names = [f"org_{i:02d}" for i in range(orgs)]
            for i, org in enumerate(names):
                ns.subscribe(self.receiver.url(i, f"/ok/t{i}"), org, f"wh_t{i}")
            ns.publish(n, names)
            with self.dispatcher(ns) as proc:
                proc.wait_ready()
                profiler = None
                if self.args.profile is not None:
                    self.args.profile.mkdir(parents=True, exist_ok=True)
                    raw = self.args.profile / f"throughput-{self.runs}.txt"
                    profiler = Profiler(proc.proc.pid, raw)
                t0, cpu0 = time.monotonic(), proc.cpu_s()

                deferred = Sampled(lambda: proc.metric("dispatcher_deferrals_total"), 2.0)

                def done() -> float:
                    # A deferred delivery comes back only after the first retry delay.
                    return self.receiver.count("/ok/t") + deferred()

                wait_progress(done, n, 600, "throughput deliveries")
                wall, cpu = time.monotonic() - t0, proc.cpu_s() - cpu0
                if profiler is not None:
                    profiler.stop()
                extra = self.deferrals(proc)
                memory = proc.memory_mb()
            disp = rate_window(self.receiver, "/ok/t", n)
        finally:
            ns.delete()
        out: dict[str, Any] = {
            "topology": f"{orgs} organizations x 1 subscription, {orgs} endpoints",
            "concurrency": concurrency,
            "body_bytes": len(body),
            "baseline": baselines,
            "dispatcher": {
                **window_dict(disp),
                "wall_seconds": round(wall, 3),
                "cpu_ms_per_delivery": round(1000 * cpu / n, 3),
                **extra,
                "rss_mb": memory,
            },
            "ratio_same_engine": _ratio(disp.rate, baselines["same_engine"]["per_s"]),
            "ratio_ceiling": _ratio(disp.rate, baselines["ceiling"]["per_s"]),
            "ratio_httpx": _ratio(disp.rate, baselines["httpx"]["per_s"]),
        }
        if self.args.profile is not None:
            out["profile"] = summarize(self.args.profile / f"throughput-{self.runs}.txt")
        return out

    # --- 2. isolation -----------------------------------------------------------
    def isolation_run(self, stalled: bool) -> dict[str, Any]:
        n = self.args.isolation_events
        healthy = ENDPOINTS - 1
        self.receiver.reset()
        ns = self.namespace()
        try:
            for i in range(healthy):
                ns.subscribe(self.receiver.url(i, f"/ok/h{i}"), "org_iso", f"wh_h{i}")
            last = "/stall/x" if stalled else "/ok/x"
            ns.subscribe(self.receiver.url(healthy, f"{last}{healthy}"), "org_iso", "wh_x")
            ns.publish(n, ["org_iso"])
            with self.dispatcher(ns) as proc:
                proc.wait_ready()
                t0 = time.monotonic()
                got = wait_progress(
                    lambda: self.receiver.count("/ok/h"),
                    n * healthy,
                    600,
                    "healthy deliveries",
                )
                wall = time.monotonic() - t0
                extra = self.deferrals(proc)
                stalled_requests = self.receiver.count("/stall/")
                memory = proc.memory_mb()
                # Answered, so that the dispatcher's shutdown need not wait them out.
                self.receiver.release()
            w = rate_window(self.receiver, "/ok/h", n * healthy)
        finally:
            ns.delete()
        return {
            **window_dict(w),
            "expected": n * healthy,
            "complete": got >= n * healthy,
            "wall_seconds": round(wall, 3),
            "stalled_requests": stalled_requests,
            **extra,
            "rss_mb": memory,
        }

    def isolation(self) -> dict[str, Any]:
        say(f"isolation: {self.args.isolation_events} events x 10 endpoints, none stalled")
        free = self.isolation_run(stalled=False)
        say(f"isolation: {self.args.isolation_events} events x 10 endpoints, one stalled")
        stuck = self.isolation_run(stalled=True)
        return {
            "topology": "1 organization x 10 subscriptions, 10 endpoints; 9 measured",
            "unstalled": free,
            "stalled": stuck,
            "ratio": round(stuck["per_s"] / free["per_s"], 3) if free["per_s"] else None,
        }

    # --- 3. memory --------------------------------------------------------------
    def memory(self) -> dict[str, Any]:
        n = self.args.memory_events
        delay = self.args.memory_retry_delay
        say(f"memory: {n}-event backlog, its one endpoint stalled, first retry after {delay} s")
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
                extra = self.deferrals(proc)
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


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def table(results: dict[str, Any]) -> str:
    rows: list[tuple[str, str, str]] = []
    for e in results.get("engines", []):
        rows.append(
            (
                f"engines: {e['kind']} on {e['loop']}",
                f"{e['per_s']:.0f} req/s",
                f"{e['cpu_ms_per_request']:.3f} CPU ms each",
            )
        )
    for i, t in enumerate(results.get("throughput", []), 1):
        for name, title in (
            ("same_engine", "bare loop, same engine and client"),
            ("ceiling", "bare aiohttp loop (ceiling)"),
            ("httpx", "stock httpx loop, a pool per endpoint"),
        ):
            b = t["baseline"][name]
            rows.append(
                (
                    f"throughput #{i}: {title}",
                    f"{b['per_s']:.0f} req/s",
                    f"{b['cpu_ms_per_request']:.3f} CPU ms each",
                )
            )
        d = t["dispatcher"]
        rows += [
            (
                f"throughput #{i}: dispatcher",
                f"{d['per_s']:.0f} /s",
                f"{d['cpu_ms_per_delivery']:.3f} CPU ms each, {d['deferred']:.0f} deferred",
            ),
            (
                f"throughput #{i}: ratio to the same engine",
                f"{t['ratio_same_engine']:.3f}",
                "target >= 0.85",
            ),
            (
                f"throughput #{i}: ratio to the ceiling",
                f"{t['ratio_ceiling']:.3f}",
                "target >= 0.3",
            ),
            (f"throughput #{i}: ratio to stock httpx", f"{t['ratio_httpx']:.3f}", ""),
        ]
    for i, s in enumerate(results.get("isolation", []), 1):
        rows += [
            (f"isolation #{i}: 9 healthy, none stalled", f"{s['unstalled']['per_s']:.0f} /s", ""),
            (
                f"isolation #{i}: 9 healthy, 1 stalled",
                f"{s['stalled']['per_s']:.0f} /s",
                f"deferred {s['stalled']['deferred']:.0f}",
            ),
            (f"isolation #{i}: ratio", f"{s['ratio']:.3f}", "target >= 0.9"),
        ]
    if "memory" in results:
        m = results["memory"]
        rows.append(
            (
                f"memory: peak RSS, {m['events']} backlog + stall, {m['wall_seconds']:.0f} s",
                f"{m['peak_rss_mb']:.0f} MB",
                "target <= 250 MB",
            )
        )
    width = max(len(r[0]) for r in rows) if rows else 0
    value_w = max(len(r[1]) for r in rows) if rows else 0
    return "\n".join(f"  {a:<{width}}  {b:>{value_w}}  {c}" for a, b, c in rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    phases = args.only or ["engines", "throughput", "isolation", "memory"]
    results: dict[str, Any] = {
        "machine": machine(),
        "load_average_before": load_average(),
        "settings": {
            "events": args.events,
            "orgs": args.orgs,
            "isolation_events": args.isolation_events,
            "memory_events": args.memory_events,
            "partitions": args.partitions,
            "max_in_flight": DEFAULTS.max_in_flight,
            "max_in_flight_per_endpoint": DEFAULTS.max_in_flight_per_endpoint,
            "endpoint_queue_size": DEFAULTS.endpoint_queue_size,
            "warmup_share": WARMUP,
            "tail_share": TAIL,
        },
    }
    m = results["machine"]
    say(
        f"machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['ram_gib']} GiB RAM, "
        f"load {results['load_average_before']}"
    )
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dispatcher-bench-") as tmp:
        bench = Bench(args, Path(tmp))
        try:
            if "engines" in phases:
                results["engines"] = bench.engines()
            for _ in range(args.repeat):
                if "throughput" in phases:
                    results.setdefault("throughput", []).append(bench.throughput())
                if "isolation" in phases:
                    results.setdefault("isolation", []).append(bench.isolation())
            if "memory" in phases:
                results["memory"] = bench.memory()
        except BenchError as exc:
            print(f"bench: error: {exc}", file=sys.stderr)
            return 1
        finally:
            bench.close()
    results["load_average_after"] = load_average()
    results["seconds"] = round(time.monotonic() - started, 1)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(
        f"Machine: {m['cpus']} CPUs, {m['cpu_model']}, {m['ram_gib']} GiB RAM; "
        f"load average {results['load_average_before']} before, "
        f"{results['load_average_after']} after"
    )
    print(table(results))
    for t in results.get("throughput", []):
        if "profile" in t:
            print("\nWhere the dispatcher's time went (py-spy, samples holding the GIL):")
            for name, pct in t["profile"]["components"][:15]:
                print(f"  {pct:5.1f}%  {name}")
    print(f"\n{results['seconds']:.0f} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
