"""The benchmark: every scenario of the README's performance table, each with its baseline.

Run with ``bash scripts/bench.sh [flags]`` (which builds the receiver and makes
sure the broker is up); ``--smoke`` runs every phase at a tiny size, for CI.
Every phase gets topics and consumer groups of its own on the local broker,
pre-filled before the dispatcher starts, and deletes them afterwards. Rates come
from the receiver's clock (arrivals between the end of a warm-up share and the
start of a tail share of the deliveries); CPU time from the processes' own.

0. Engines: bare POST loops over each HTTP engine (``bench/engines.py``).
1. Throughput: ``--orgs`` organizations with one subscription each, each on a
   receiver port of its own, events spread evenly over them, drained by the
   dispatcher; baselines: a bare loop over the same engine and client with the
   same concurrency (endpoints x per-endpoint limit), bare aiohttp (the ceiling),
   stock httpx.
2.-5. Many origins, slow endpoints, latency, a large table (``bench/scenarios.py``).
6. Isolation: one organization, ten subscriptions on ten ports; once all ten
   answering, once with the tenth stalled: the nine healthy endpoints' rate with
   the stall over their rate without. The same-host variant puts all ten
   webhooks on one origin (one host and port), paths apart.
7. Memory: a ``--memory-events`` backlog for one organization whose one endpoint
   is stalled, so that every event is consumed and deferred to the first retry
   stage, and read back and deferred again once the stage's delay (shortened to
   ``--memory-retry-delay``) has passed; its peak RSS (VmHWM) once all of them
   have been deferred twice.
8. History: ``dispatcher api`` over ``--history-attempts`` attempt records: the
   store's rebuild and fold rate, restart, memory, disk, and list, detail and
   ``/healthz`` latencies under concurrent clients (``bench/history.py``).
9. Writes: PATCH latency at the API's writer and through a replica that forwards
   the change to it (``bench/writes.py``).
10. Neighbours: organization S's webhook answering after ``--neighbours-slow-ms``
   (2.5 s), F's at once, S's events spread among F's in the same partitions: F's
   rate and latency next to S over F alone in the same run, and S's completion
   (``bench/scenarios.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import engines, history
from bench.harness import (
    REPO,
    BenchError,
    Certificates,
    Namespace,
    Receiver,
    event,
    load_average,
    machine,
)
from bench.measure import TAIL, WARMUP, deferrals, drain, rate_window, say, wait_progress
from bench.process import Dispatcher
from bench.profile import summarize
from bench.report import print_report
from bench.scenarios import Scenarios
from bench.writes import write_latency
from dispatcher.models import parse_event
from dispatcher.settings import Settings

DEFAULTS = Settings()
ENDPOINTS = 10
PHASES = (
    "engines",
    "throughput",
    "origins",
    "slow",
    "latency",
    "table",
    "isolation",
    "memory",
    "history",
    "writes",
    "neighbours",
)
#: Every size at once for CI: each phase runs, none measures anything worth reading.
SMOKE = {
    "events": 400,
    "engine_requests": 400,
    "origins": 20,
    "origins_events": 60,
    "slow_webhooks": 10,
    "slow_events": 60,
    "slow_in_flight": 64,
    "latency_seconds": 2.0,
    "table_size": 500,
    "isolation_events": 40,
    "memory_events": 1000,
    "memory_retry_delay": 5,
    "partitions": 3,
    "history_attempts": 3000,
    "history_webhooks": 50,
    "history_clients": [5],
    "history_load_s": 2.0,
    "write_count": 20,
    "neighbours_events": 40,
    "neighbours_slow_events": 10,
    "neighbours_slow_ms": 500,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--receiver", type=Path, required=True, help="the built Go receiver")
    p.add_argument("--smoke", action="store_true", help="every phase at a tiny size (CI)")
    p.add_argument("--only", choices=PHASES, action="append", help="run only these phases")
    p.add_argument("--engine-requests", type=int, default=10_000, help="POSTs per bare loop")
    p.add_argument(
        "--legacy-tree",
        type=Path,
        help="a source tree with an earlier dispatcher package whose engine is measured too",
    )
    p.add_argument("--events", type=int, default=20_000, help="throughput backlog (events)")
    p.add_argument("--orgs", type=int, default=ENDPOINTS, help="organizations (= endpoints)")
    p.add_argument("--origins", type=int, default=2_000, help="webhooks on distinct origins")
    p.add_argument("--origins-events", type=int, default=6_000, help="events over them")
    p.add_argument("--slow-webhooks", type=int, default=500, help="slow webhooks (origins)")
    p.add_argument("--slow-events", type=int, default=20_000, help="events over them")
    p.add_argument("--slow-ms", type=int, default=200, help="their answers' delay (ms)")
    p.add_argument("--slow-in-flight", type=int, default=2_048, help="the raised max_in_flight")
    p.add_argument("--latency-seconds", type=float, default=20.0, help="paced production time")
    p.add_argument("--latency-rate", type=float, help="events/s (default: half the ceiling)")
    p.add_argument("--table-size", type=int, default=100_000, help="subscriptions")
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
    p.add_argument(
        "--history-attempts", type=int, default=1_000_000, help="attempt records (history)"
    )
    p.add_argument("--history-webhooks", type=int, default=10_000, help="webhooks (history)")
    p.add_argument(
        "--history-clients",
        type=int,
        action="append",
        help="concurrent API clients, once per value (history; default 50 and 200)",
    )
    p.add_argument("--history-load-s", type=float, default=20.0, help="seconds of each load")
    p.add_argument("--partitions", type=int, default=12, help="partitions of every topic")
    p.add_argument(
        "--profile",
        type=Path,
        help="record the dispatcher with py-spy in the throughput and neighbours phases, into DIR",
    )
    p.add_argument(
        "--set",
        metavar="NAME=VALUE",
        action="append",
        default=[],
        help="a dispatcher setting for every phase, e.g. partition_buffer_high=200",
    )
    p.add_argument(
        "--write-count", type=int, default=300, help="PATCHes at each API process (writes)"
    )
    p.add_argument(
        "--neighbours-events",
        type=int,
        default=10_000,
        help="the fast organization's events in the neighbours phase (alone, then beside S)",
    )
    p.add_argument(
        "--neighbours-slow-events",
        type=int,
        default=500,
        help="the slow organization's events, spread among the fast one's",
    )
    p.add_argument(
        "--neighbours-slow-ms", type=int, default=2_500, help="the slow webhook's answer time"
    )
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results.json")
    args = p.parse_args(argv)
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
    overrides: dict[str, Any] = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or name not in Settings.model_fields:
            p.error(f"--set wants NAME=VALUE with a setting name, got {item!r}")
        overrides[name] = json.loads(value) if value[:1] in "[{" else value
    args.set = overrides
    args.history_clients = args.history_clients or [50, 200]
    if args.orgs > ENDPOINTS or args.orgs < 1:
        p.error(f"--orgs must be 1..{ENDPOINTS}")
    return args


def command(argv: list[str]) -> str:
    """The bench.sh command line that ran these flags (the receiver's path left out)."""
    shown = [a for i, a in enumerate(argv) if "--receiver" not in (a, argv[i - 1] if i else "")]
    return " ".join(["bash scripts/bench.sh", *shown])


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


class Bench(Scenarios):
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.certs = Certificates(tmp)
        self.receiver = Receiver(args.receiver, self.certs, ENDPOINTS)
        self._wide: Receiver | None = None
        self.runs = 0
        # Kept after the run (and replaced by the next one) for a look at failures.
        self.logs = REPO / "bench" / ".build" / "logs"
        for old in self.logs.glob("dispatcher-*.log"):
            old.unlink()
        self.logs.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        self.receiver.close()
        if self._wide is not None:
            self._wide.close()

    def say(self, text: str) -> None:
        say(text)

    def writes(self) -> dict[str, Any]:
        count = self.args.write_count
        self.say(f"writes: {count} PATCHes at the API writer, {count} through a replica")
        ns = self.namespace()
        try:
            return write_latency(ns, self.logs, self.receiver.url(0, "/ok/w"), count)
        finally:
            ns.delete()

    def wide_receiver(self) -> Receiver:
        """A receiver with a port per origin of the many-origins and slow phases."""
        if self._wide is None:
            ports = max(self.args.origins, self.args.slow_webhooks)
            self._wide = Receiver(self.args.receiver, self.certs, ports)
        return self._wide

    def namespace(self, **overrides: Any) -> Namespace:
        values = {**overrides, **self.args.set}
        return Namespace(self.certs.ca_file, self.args.partitions, **values)

    def dispatcher(self, ns: Namespace) -> Dispatcher:
        self.runs += 1
        return Dispatcher(ns, self.logs / f"dispatcher-{self.runs}.log")

    def drain(self, proc: Dispatcher, receiver: Receiver, prefix: str, n: int) -> dict[str, Any]:
        return drain(proc, receiver, prefix, n)

    def body(self) -> bytes:
        return parse_event(json.dumps(event("sess_00000000", "org_00")).encode(), 1 << 20).body

    # --- 0. engines --------------------------------------------------------------
    def engines(self) -> list[dict[str, Any]]:
        return engines.compare(
            self.receiver,
            self.certs.ca_file,
            self.body(),
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
        loop = str(self.args.set.get("event_loop", DEFAULTS.event_loop))
        body = self.body()
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
        profile = None
        if self.args.profile is not None:
            self.args.profile.mkdir(parents=True, exist_ok=True)
            profile = self.args.profile / "throughput.txt"
        ns = self.namespace()
        try:
            names = [f"org_{i:02d}" for i in range(orgs)]
            ns.subscribe_many(
                [
                    (self.receiver.url(i, f"/ok/t{i}"), org, f"wh_t{i}")
                    for i, org in enumerate(names)
                ]
            )
            ns.publish(n, names)
            with self.dispatcher(ns) as proc:
                proc.wait_ready()
                disp = drain(proc, self.receiver, "/ok/t", n, profile)
        finally:
            ns.delete()
        out: dict[str, Any] = {
            "topology": f"{orgs} organizations x 1 subscription, {orgs} endpoints",
            "concurrency": min(DEFAULTS.max_in_flight, orgs * per_endpoint),
            "body_bytes": len(body),
            "baseline": baselines,
            "dispatcher": disp,
            "ratio_same_engine": _ratio(disp["per_s"], baselines["same_engine"]["per_s"]),
            "ratio_ceiling": _ratio(disp["per_s"], baselines["ceiling"]["per_s"]),
            "ratio_httpx": _ratio(disp["per_s"], baselines["httpx"]["per_s"]),
        }
        if profile is not None:
            out["profile"] = summarize(profile)
        return out

    # --- 6. isolation -----------------------------------------------------------
    def isolation_run(self, stalled: bool, same_host: bool) -> dict[str, Any]:
        n = self.args.isolation_events
        healthy = ENDPOINTS - 1
        self.receiver.reset()

        def url(i: int, path: str) -> str:
            return self.receiver.url(0 if same_host else i, path)

        ns = self.namespace()
        try:
            subs = [(url(i, f"/ok/h{i}"), "org_iso", f"wh_h{i}") for i in range(healthy)]
            last = "/stall/x" if stalled else "/ok/x"
            subs.append((url(healthy, f"{last}{healthy}"), "org_iso", "wh_x"))
            ns.subscribe_many(subs)
            ns.publish(n, ["org_iso"])
            with self.dispatcher(ns) as proc:
                proc.wait_ready()
                t0 = time.monotonic()
                got = wait_progress(
                    lambda: self.receiver.count("/ok/h"), n * healthy, 600, "healthy deliveries"
                )
                wall = time.monotonic() - t0
                extra = deferrals(proc)
                stalled_requests = self.receiver.count("/stall/")
                memory = proc.memory_mb()
                # Answered, so that the dispatcher's shutdown need not wait them out.
                self.receiver.release()
            w = rate_window(self.receiver, "/ok/h", n * healthy)
        finally:
            ns.delete()
        return {
            "arrived": w.count,
            "per_s": round(w.rate, 1),
            "expected": n * healthy,
            "complete": got >= n * healthy,
            "wall_seconds": round(wall, 3),
            "stalled_requests": stalled_requests,
            **extra,
            "rss_mb": memory,
        }

    def isolation(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        n = self.args.isolation_events
        for variant, same_host in (("endpoints", False), ("same_host", True)):
            where = "one origin" if same_host else "10 endpoints"
            say(f"isolation ({variant}): {n} events x 10 webhooks on {where}, none stalled")
            free = self.isolation_run(stalled=False, same_host=same_host)
            say(f"isolation ({variant}): {n} events x 10 webhooks on {where}, one stalled")
            stuck = self.isolation_run(stalled=True, same_host=same_host)
            out[variant] = {
                "topology": f"1 organization x 10 subscriptions on {where}; 9 measured",
                "unstalled": free,
                "stalled": stuck,
                "ratio": _ratio(stuck["per_s"], free["per_s"]),
            }
        return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    phases = args.only or list(PHASES)
    results: dict[str, Any] = {
        "command": " ".join(
            ["bash scripts/bench.sh", *(argv if argv is not None else sys.argv[3:])]
        ),
        "machine": machine(),
        "load_average_before": load_average(),
        "settings": {
            **{k: v for k, v in vars(args).items() if k not in ("receiver", "out", "set")},
            "set": args.set,
            "max_in_flight": DEFAULTS.max_in_flight,
            "max_in_flight_per_endpoint": DEFAULTS.max_in_flight_per_endpoint,
            "event_loop": DEFAULTS.event_loop,
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
            if "throughput" in phases:
                results["throughput"] = bench.throughput()
            hot = results.get("throughput", {}).get("dispatcher", {})
            ceiling = hot.get("per_s")
            if "origins" in phases:
                results["origins"] = bench.many_origins(hot.get("cpu_ms_per_delivery"))
            if "slow" in phases:
                results["slow"] = bench.slow(ceiling)
            if "latency" in phases:
                rate = args.latency_rate or (ceiling / 2 if ceiling else 500.0)
                results["latency"] = bench.latency(bench.receiver, ENDPOINTS, rate)
            if "table" in phases:
                results["table"] = bench.large_table(bench.receiver)
            if "isolation" in phases:
                results["isolation"] = bench.isolation()
            if "memory" in phases:
                results["memory"] = bench.memory()
            if "history" in phases:
                results["history"] = history.run(args, bench.tmp, bench.certs.ca_file)
            if "writes" in phases:
                results["writes"] = bench.writes()
            if "neighbours" in phases:
                results["neighbours"] = bench.neighbours()
        except BenchError as exc:
            print(f"bench: error: {exc}", file=sys.stderr)
            return 1
        finally:
            bench.close()
    results["load_average_after"] = load_average()
    results["seconds"] = round(time.monotonic() - started, 1)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print_report(results)
    print(f"\n{results['seconds']:.0f} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
