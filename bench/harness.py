"""The benchmark's moving parts: the Go receiver, Kafka topics, the dispatcher process.

Nothing here is a test helper: it favours few, large batches (one producer for a
whole backlog) and reads figures from the receiver's own clock, so the
orchestrating process can stay idle while a rate is being measured.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import trustme
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from dispatcher.commands.subscriptions import write
from dispatcher.commands.topics import ensure_topics, topic_specs
from dispatcher.models import Subscription
from dispatcher.outbound.signing import generate_secret
from dispatcher.settings import Settings
from dispatcher.stages import retry_stages

REPO = Path(__file__).resolve().parent.parent
SEED_EVENT: dict[str, Any] = json.loads((REPO / "tests" / "data" / "seed-event.json").read_text())
BOOTSTRAP = os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092")

T = TypeVar("T")


class BenchError(RuntimeError):
    """A phase could not be measured (a deadline passed, a process died)."""


def wait_for(check: Callable[[], T], timeout_s: float, what: str, every_s: float = 0.2) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(every_s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the machine ---------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "ram_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def process_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    # utime and stime are the 14th and 15th fields; the first two precede ")".
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_mb(pid: int) -> dict[str, float]:
    """Peak (VmHWM) and current (VmRSS) resident memory of a process, in MB."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = round(int(rest.split()[0]) / 1024, 1)
    return out


# --- the receiver --------------------------------------------------------------


class Certificates:
    """A private CA and a ``localhost`` / 127.0.0.1 certificate, as PEM files."""

    def __init__(self, directory: Path) -> None:
        ca = trustme.CA()
        cert = ca.issue_cert("localhost", "127.0.0.1")
        self.ca_file = directory / "ca.pem"
        self.cert_file = directory / "cert.pem"
        self.key_file = directory / "key.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        cert.cert_chain_pems[0].write_to_path(str(self.cert_file))
        for extra in cert.cert_chain_pems[1:]:
            extra.write_to_path(str(self.cert_file), append=True)
        cert.private_key_pem.write_to_path(str(self.key_file))


@dataclass(frozen=True)
class Window:
    """Arrivals under a path prefix, warm-up and tail dropped, and their rate."""

    count: int
    used: int
    seconds: float
    rate: float


class Receiver:
    """The Go receiver (``bench/receiver``) as a child process."""

    def __init__(self, binary: Path, certs: Certificates, ports: int) -> None:
        self._proc = subprocess.Popen(
            [
                str(binary),
                "-cert",
                str(certs.cert_file),
                "-key",
                str(certs.key_file),
                "-ports",
                str(ports),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._proc.stdout is not None
        first = self._proc.stdout.readline()
        if not first:
            raise BenchError("the receiver exited before listening")
        info = json.loads(first)
        self.ports: list[int] = info["ports"]
        self._control = f"http://127.0.0.1:{info['control']}"

    @property
    def pid(self) -> int:
        return self._proc.pid

    def url(self, index: int, path: str) -> str:
        return f"https://127.0.0.1:{self.ports[index]}{path}"

    def _call(self, method: str, path: str) -> Any:
        req = urllib.request.Request(self._control + path, method=method)
        with urllib.request.urlopen(req, timeout=30) as r:
            body = r.read()
        return json.loads(body) if body else None

    def counts(self) -> dict[str, int]:
        return dict(self._call("GET", "/count")["paths"])

    def count(self, prefix: str) -> int:
        return sum(n for path, n in self.counts().items() if path.startswith(prefix))

    def later_attempts(self, prefix: str) -> int:
        """Requests under ``prefix`` that were not their delivery's first attempt."""
        later = self._call("GET", "/count").get("later_attempts") or {}
        return sum(int(n) for path, n in later.items() if path.startswith(prefix))

    def window(self, prefix: str, skip: int, tail: int) -> Window:
        data = self._call("GET", f"/window?prefix={prefix}&skip={skip}&tail={tail}")
        return Window(
            int(data["count"]), int(data["used"]), float(data["seconds"]), float(data["rate"])
        )

    def connections(self) -> tuple[int, int]:
        """TLS connections opened since the last reset, and those open now."""
        data = self._call("GET", "/count")
        return int(data["conns_opened"]), int(data["conns_open"])

    def latency(self) -> dict[str, float]:
        """Produce-to-receipt latencies of the deliveries under ``/lat/`` (ms)."""
        return {k: float(v) for k, v in self._call("GET", "/latency").items()}

    def reset(self) -> None:
        self._call("POST", "/reset")

    def release(self) -> None:
        self._call("POST", "/release")

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)


# --- Kafka -----------------------------------------------------------------------


def event(session_id: str, org: str) -> dict[str, Any]:
    doc = copy.deepcopy(SEED_EVENT)
    doc["organization_id"] = org
    doc["session_id"] = session_id
    return doc


class Namespace:
    """One phase's topics and consumer groups on the shared broker, deleted at the end."""

    def __init__(self, ca_file: Path, partitions: int, **overrides: Any) -> None:
        prefix = f"bench{uuid.uuid4().hex[:8]}"
        # The product's defaults, except what a loopback benchmark must change: the
        # address allowlist, the receiver's CA, topic names, partitions, the port.
        self.values: dict[str, Any] = {
            "kafka_bootstrap_servers": BOOTSTRAP,
            "group_id": f"{prefix}.dispatcher",
            "input_topic": f"{prefix}.visitor.identified",
            "subscriptions_topic": f"{prefix}.webhooks.subscriptions",
            "retry_topic_prefix": f"{prefix}.webhooks.retry.",
            "dead_letter_topic": f"{prefix}.webhooks.dead-letter",
            "invalid_topic": f"{prefix}.webhooks.invalid",
            "attempts_topic": f"{prefix}.webhooks.attempts",
            "organizations_topic": f"{prefix}.webhooks.organizations",
            "idempotency_topic": f"{prefix}.webhooks.idempotency",
            "health_topic": f"{prefix}.webhooks.health",
            "notifications_topic": f"{prefix}.webhooks.notifications",
            "backlog_topic": f"{prefix}.webhooks.backlog",
            "topic_partitions": partitions,
            "allowed_networks": ["127.0.0.0/8"],
            "http_ca_file": str(ca_file),
            "http_port": free_port(),
            **overrides,
        }
        self.settings = Settings(**self.values)
        self._reader: Consumer | None = None
        report = ensure_topics(self.settings)
        if report.problems:
            raise BenchError(f"topics: {report.problems}")

    @property
    def stage_names(self) -> list[str]:
        return [stage.name for stage in retry_stages(self.settings)]

    def records(self, topic: str) -> int:
        """Records written to ``topic`` so far (the sum of its partitions' end offsets)."""
        if self._reader is None:
            self._reader = Consumer(
                {"bootstrap.servers": BOOTSTRAP, "group.id": f"{self.values['group_id']}.bench"}
            )
        meta = self._reader.list_topics(topic, timeout=10).topics[topic]
        total = 0
        for p in meta.partitions:
            low, high = self._reader.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            total += high - low
        return total

    def subscribe(self, url: str, org: str, webhook_id: str) -> None:
        stamp = datetime.now(UTC)
        sub = Subscription(
            webhook_id=webhook_id,
            organization_id=org,
            url=url,
            events=("visitor.identified",),
            secret=generate_secret(),
            plan="scale",
            created_at=stamp,
            updated_at=stamp,
        )
        write(self.settings, webhook_id, sub)

    def subscribe_many(self, subs: list[tuple[str, str, str]]) -> None:
        """Subscriptions ``(url, organization, webhook id)``, written by one producer."""
        stamp = datetime.now(UTC)
        template = Subscription(
            webhook_id="WEBHOOK",
            organization_id="ORGANIZATION",
            url="https://URL.example/",
            events=("visitor.identified",),
            secret=generate_secret(),
            plan="scale",
            created_at=stamp,
            updated_at=stamp,
        ).to_json()
        producer = Producer({"bootstrap.servers": BOOTSTRAP, "linger.ms": 20})
        for url, org, webhook_id in subs:
            value = (
                template.replace(b"https://URL.example/", url.encode())
                .replace(b"ORGANIZATION", org.encode())
                .replace(b"WEBHOOK", webhook_id.encode())
            )
            self._produce(producer, self.settings.subscriptions_topic, value, webhook_id.encode())
        if producer.flush(120) != 0:
            raise BenchError("the subscriptions were not acknowledged by Kafka")

    @staticmethod
    def _produce(producer: Producer, topic: str, value: bytes, key: bytes) -> None:
        while True:
            try:
                producer.produce(topic, value, key)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)

    def publish_paced(
        self, rate: float, seconds: float, orgs: list[str], warmup_s: float = 0.0
    ) -> int:
        """Events at ``rate`` a second for ``warmup_s + seconds``, stamped with their produce time.

        The session id is ``lat_<unix ns>_<n>``, read by the receiver under ``/lat/``
        (``warm_...`` during the warm-up, which it does not count). Returns how many
        were produced.
        """
        producer = Producer(
            {"bootstrap.servers": BOOTSTRAP, "linger.ms": 1, "compression.type": "lz4"}
        )
        template = json.dumps(event("SESSION", "ORG"))
        start = time.monotonic()
        sent = 0
        while (elapsed := time.monotonic() - start) < warmup_s + seconds:
            due = int(elapsed * rate)
            kind = "lat" if elapsed >= warmup_s else "warm"
            while sent < due:
                session = f"{kind}_{time.time_ns()}_{sent}"
                value = template.replace("SESSION", session).replace("ORG", orgs[sent % len(orgs)])
                self._produce(producer, self.settings.input_topic, value.encode(), session.encode())
                sent += 1
            producer.poll(0)
            time.sleep(0.002)
        if producer.flush(60) != 0:
            raise BenchError("the paced events were not acknowledged by Kafka")
        return sent

    def publish_stamped(self, orgs: list[str], group: int = 1, kind: str = "lat") -> None:
        """One event per item of ``orgs`` (its organization), at once, stamped with its
        produce time.

        Each run of ``group`` consecutive events goes to one partition, the runs
        round-robin over the partitions: a sequence that mixes organizations within
        each run puts them interleaved in every partition. Session ids are
        ``<kind>_<unix ns>_<n>``, as in :meth:`publish_paced`.
        """
        producer = Producer(
            {"bootstrap.servers": BOOTSTRAP, "linger.ms": 5, "compression.type": "lz4"}
        )
        template = json.dumps(event("SESSION", "ORG"))
        partitions = int(self.settings.topic_partitions)
        for i, org in enumerate(orgs):
            session = f"{kind}_{time.time_ns()}_{i}"
            text = template.replace("SESSION", session).replace("ORG", org)
            value, key = text.encode(), session.encode()
            partition = (i // group) % partitions
            while True:
                try:
                    producer.produce(self.settings.input_topic, value, key, partition=partition)
                    break
                except BufferError:
                    producer.poll(0.05)
            producer.poll(0)
        if producer.flush(60) != 0:
            raise BenchError("the stamped events were not acknowledged by Kafka")

    def publish(self, count: int, orgs: list[str]) -> None:
        """``count`` events, organizations taken in turn, keyed by session."""
        producer = Producer(
            {"bootstrap.servers": BOOTSTRAP, "linger.ms": 20, "compression.type": "lz4"}
        )
        template = json.dumps(event("SESSION", "ORG"))
        for i in range(count):
            session = f"sess_{i:08d}"
            value = template.replace("SESSION", session).replace("ORG", orgs[i % len(orgs)])
            while True:
                try:
                    producer.produce(self.settings.input_topic, value.encode(), session.encode())
                    break
                except BufferError:
                    producer.poll(0.05)
            producer.poll(0)
        if producer.flush(60) != 0:
            raise BenchError("the backlog was not acknowledged by Kafka")

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
        for key, value in self.values.items():
            text = json.dumps(value) if isinstance(value, list | dict) else str(value)
            env[f"DISPATCHER_{key.upper()}"] = text
        return env

    def delete(self) -> None:
        if self._reader is not None:
            self._reader.close()
        names = [spec.name for spec in topic_specs(self.settings)]
        admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
        for future in admin.delete_topics(names, operation_timeout=30).values():
            try:
                future.result(30)
            except Exception as exc:  # a leftover topic is untidy, not a failed benchmark
                print(f"bench: could not delete a topic: {exc}", file=sys.stderr)
