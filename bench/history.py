"""The history phase: ``dispatcher api`` folding, restarting and answering over a large history.

Writes ``--history-attempts`` attempt records (one delivery in ten failing four
times and dead-lettered, so 1.3 records per delivery, spread over 13 days and
``--history-webhooks`` webhooks of one organization, with a body and signed
headers like the dispatcher's) straight to the phase's attempts topic, then:

- starts the API on an empty store and times it to ready (the rebuild): fold
  rate from its own log line, resident memory, disk bytes per attempt;
- restarts it on the same file and times it to ready again;
- runs ``--history-clients`` concurrent clients (each a list of one webhook's
  newest deliveries or one delivery's detail, at random) for
  ``--history-load-s`` seconds, with a prober asking ``/healthz`` on the API's
  port every 50 ms meanwhile: p50/p99 of each, and the API's CPU per request.
  The clients are ``bench/loadgen`` (Go, built by ``scripts/bench.sh``): a Python
  client would take more of the two cores than the API it measures.
"""

from __future__ import annotations

import random
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Producer

from bench.harness import (
    BOOTSTRAP,
    REPO,
    BenchError,
    Namespace,
    free_port,
    memory_mb,
    process_cpu_s,
    wait_for,
)
from bench.measure import say
from dispatcher.api.auth import hash_key, new_key

ORG = "org_bench"
HEADERS = {
    "Content-Type": "application/json",
    "User-Agent": "Bullseye-Webhooks/1.0",
    "X-Bullseye-Event": "visitor.identified",
    "X-Bullseye-Attempt": "1",
    "webhook-timestamp": "1767225600",
    "X-Bullseye-Signature": "9f" * 32,
    "webhook-signature": "v1,K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN/H/pI4=",
}
BODY = (
    '{"event":"visitor.identified","organization_id":"org_bench","session_id":"SESSION",'
    '"timestamp":"2026-01-01T00:00:00Z","visitor":{"email":"someone@example.com",'
    '"company":"Example Corp","domain":"example.com","industry":"Software",'
    '"employees":"51-200","country":"DE","pages_viewed":7}}'
)
_CAUGHT_UP = re.compile(r"caught up: (\d+) records folded in ([\d.]+) s")


def _record(n: int, webhooks: int, span_s: int, now: datetime, attempt: int) -> bytes:
    at = now - timedelta(seconds=(n * 7919) % span_s) + timedelta(minutes=5 * (attempt - 1))
    failing = n % 10 == 0
    doc: dict[str, Any] = {
        "kind": "attempt",
        "delivery_id": f"d{n:09d}",
        "webhook_id": f"wh_{n % webhooks:06d}",
        "organization_id": ORG,
        "event": "visitor.identified",
        "session_id": f"sess_{n:09d}",
        "event_timestamp": at,
        "source": {"topic": "in", "partition": n % 12, "offset": n},
        "attempt": attempt,
        "stage": "input" if attempt == 1 else f"retry-{attempt - 1}",
        "at": at,
        "duration_ms": 20.0 + (n % 200),
        "ok": not failing,
        "status_code": 500 if failing else 200,
        "error_class": "http" if failing else "none",
    }
    if failing:
        doc["response_snippet"] = "upstream unavailable"
        if attempt < 4:
            doc["next_retry_at"] = at + timedelta(minutes=5)
    doc["dead_lettered"] = failing and attempt == 4
    doc["request_headers"] = {**HEADERS, "webhook-id": doc["delivery_id"]}
    if attempt == 1:
        doc["body"] = BODY.replace("SESSION", doc["session_id"])
    return orjson.dumps(doc, option=orjson.OPT_UTC_Z)


def produce(ns: Namespace, attempts: int, webhooks: int) -> int:
    """Write the records; how many deliveries they make."""
    producer = Producer({"bootstrap.servers": BOOTSTRAP, "linger.ms": 50, "batch.size": 1 << 20})
    now = datetime.now(UTC)
    span_s = 13 * 86_400
    written = n = 0
    while written < attempts:
        for attempt in range(1, 5 if n % 10 == 0 else 2):
            value = _record(n, webhooks, span_s, now, attempt)
            key = f"d{n:09d}".encode()
            while True:
                try:
                    producer.produce(ns.settings.attempts_topic, value, key)
                    break
                except BufferError:
                    producer.poll(0.1)
            written += 1
        n += 1
        if n % 10_000 == 0:
            producer.poll(0)
    if producer.flush(300) != 0:
        raise BenchError("the attempt records were not acknowledged by Kafka")
    return n


class Api:
    """``dispatcher api`` as a child process on a given history file."""

    def __init__(self, ns: Namespace, log: Path, store: Path, key: str) -> None:
        self.port = free_port()
        self.log = log
        self.env = {
            **ns.env(),
            "DISPATCHER_API_PORT": str(self.port),
            "DISPATCHER_HTTP_PORT": "0",
            "DISPATCHER_API_HISTORY_PATH": str(store),
            "DISPATCHER_API_KEYS": orjson.dumps(
                [{"name": "bench", "sha256": hash_key(key), "access": "read"}]
            ).decode(),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start it; seconds until /readyz answered 200."""
        started = time.monotonic()
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dispatcher.commands.cli", "api"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise BenchError(f"dispatcher api exited:\n{self.log.read_text()[-3000:]}")
            try:
                url = f"http://127.0.0.1:{self.port}/readyz"
                with urllib.request.urlopen(url, timeout=2) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        wait_for(ready, 3600, "the API to be ready", every_s=0.05)
        return time.monotonic() - started

    def memory_mb(self) -> dict[str, float]:
        assert self.proc is not None
        return memory_mb(self.proc.pid)

    def fold(self) -> tuple[int, float] | None:
        """Records folded and seconds, from the last "caught up" log line."""
        found = _CAUGHT_UP.findall(self.log.read_text(errors="replace"))
        return (int(found[-1][0]), float(found[-1][1])) if found else None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q / 100 * len(values)))] * 1000, 1)


def _load(
    loadgen: Path,
    api: Api,
    key: str,
    clients: int,
    seconds: float,
    deliveries: int,
    webhooks: int,
) -> dict[str, Any]:
    """Run the Go load generator (``bench/loadgen``) against the API."""
    rng = random.Random(clients)
    paths = []
    for _ in range(20_000):
        n = rng.randrange(deliveries)
        path = f"/v1/organizations/{ORG}/webhooks/wh_{n % webhooks:06d}/deliveries"
        paths.append(path if rng.random() < 0.5 else f"{path}/d{n:09d}")
    done = subprocess.run(
        [
            str(loadgen),
            f"-base=http://127.0.0.1:{api.port}",
            f"-key={key}",
            f"-clients={clients}",
            f"-seconds={seconds}",
        ],
        input="\n".join(paths).encode(),
        capture_output=True,
        timeout=seconds + 120,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"loadgen failed: {done.stderr.decode(errors='replace')[-2000:]}")
    got = orjson.loads(done.stdout)
    out: dict[str, Any] = {"clients": clients, "seconds": seconds, "errors": got["errors"]}
    for kind, values in got["times"].items():
        out[kind] = {
            "requests": len(values),
            "per_s": round(len(values) / seconds, 1),
            "p50_ms": _pct(values, 50),
            "p99_ms": _pct(values, 99),
        }
    return out


def run(args: Any, tmp: Path, ca_file: Path) -> dict[str, Any]:
    prefix = f"benchhist{uuid.uuid4().hex[:8]}"
    ns = Namespace(
        ca_file,
        args.partitions,
        attempts_topic=f"{prefix}.webhooks.attempts",
        organizations_topic=f"{prefix}.webhooks.organizations",
    )
    api: Api | None = None
    try:
        webhooks = args.history_webhooks
        say(f"history: {webhooks} webhooks, {args.history_attempts} attempt records")
        ns.subscribe_many(
            [(f"https://127.0.0.1:9/h{i}", ORG, f"wh_{i:06d}") for i in range(webhooks)]
        )
        started = time.monotonic()
        deliveries = produce(ns, args.history_attempts, webhooks)
        say(f"history: written in {time.monotonic() - started:.0f} s; rebuilding the store")
        store = tmp / "history.sqlite3"
        key = new_key()
        api = Api(ns, tmp / "history-api.log", store, key)
        rebuild_s = api.start()
        assert api.proc is not None
        rebuild_cpu_s = process_cpu_s(api.proc.pid)
        folded = api.fold()
        rebuilt_memory = api.memory_mb()
        disk = sum(p.stat().st_size for p in tmp.glob("history.sqlite3*"))
        api.stop()
        say(f"history: rebuilt in {rebuild_s:.1f} s; restarting on the same file")
        restart_s = api.start()
        out: dict[str, Any] = {
            "attempts": args.history_attempts,
            "deliveries": deliveries,
            "webhooks": webhooks,
            "rebuild_ready_s": round(rebuild_s, 2),
            "fold_per_s": round(folded[0] / folded[1]) if folded and folded[1] else None,
            # CPU of the whole process up to ready, per attempt folded.
            "rebuild_cpu_us_per_attempt": round(rebuild_cpu_s * 1e6 / args.history_attempts, 1),
            "rebuilt_rss_mb": rebuilt_memory,
            "disk_bytes": disk,
            "disk_bytes_per_attempt": round(disk / args.history_attempts),
            "restart_ready_s": round(restart_s, 2),
            "restart_rss_mb": api.memory_mb(),
            "load": [],
        }
        for clients in args.history_clients:
            say(f"history: {clients} clients for {args.history_load_s:g} s")
            assert api.proc is not None
            cpu_before = process_cpu_s(api.proc.pid)
            loadgen = args.receiver.parent / "loadgen"
            result = _load(loadgen, api, key, clients, args.history_load_s, deliveries, webhooks)
            served = result["list"]["requests"] + result["detail"]["requests"]
            # The API's own CPU per request: comparable across machines and loads,
            # unlike latencies on a shared machine.
            cpu_s = process_cpu_s(api.proc.pid) - cpu_before
            result["api_cpu_ms_per_request"] = round(cpu_s * 1000 / served, 2) if served else None
            result["rss_mb"] = api.memory_mb()
            out["load"].append(result)
        return out
    finally:
        if api is not None:
            api.stop()
        ns.delete()
