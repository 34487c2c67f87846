"""Operating it: metrics, a real Prometheus scrape, health and readiness, logs, secrets.

One dispatcher run (module fixture ``run``) makes real deliveries of every kind
(successes, 500s, a timeout, a dead letter, a deferral, an invalid event) at
DEBUG level; the tests below then read its ``/metrics``, its logs, the records it
wrote and the management commands' output.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import logging
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from prometheus_client.parser import text_string_to_metric_families

from dispatcher.commands.subscriptions import write
from dispatcher.commands.topics import ensure_topics
from dispatcher.logs import RepeatFilter
from dispatcher.models import Subscription
from dispatcher.settings import Settings
from dispatcher.stages import retry_stages
from tests.receiver import HttpsReceiver, Reply
from tests.support import (
    BOOTSTRAP,
    REPO,
    SEED_EVENT,
    DispatcherProcess,
    Namespace,
    free_port,
    metric_value,
    wait_until,
)

#: A recognisable secret: its full form, its base64 payload and the decoded bytes
#: (the Standard Webhooks HMAC key) must never show up outside the subscriptions topic.
CANARY = b"obs-canary-5d1e9f0b"
SECRET = "whsec_" + base64.b64encode(CANARY).decode()
MARKERS = (SECRET, SECRET.removeprefix("whsec_"), CANARY.decode())

LOG_KEYS = {"time", "level", "logger", "message"}
#: Loggers whose every line is about one delivery.
DELIVERY_LOGGERS = {"dispatcher.core.deliveries"}


def event(org: str, **changes: Any) -> dict[str, Any]:
    doc = copy.deepcopy(SEED_EVENT)
    doc["organization_id"] = org
    doc["timestamp"] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    doc["session_id"] = f"s_{uuid.uuid4().hex[:8]}"
    doc.update(changes)
    return doc


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of a log as a JSON object with the four base keys; fail on any other."""
    lines = []
    for raw in text.splitlines():
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:
            raise AssertionError(f"log line is not JSON: {raw!r}") from None
        assert isinstance(line, dict), raw
        assert line.keys() >= LOG_KEYS, f"log line lacks {LOG_KEYS - line.keys()}: {raw}"
        assert line["level"] in {"debug", "info", "warning", "error", "critical"}, raw
        datetime.fromisoformat(line["time"])
        lines.append(line)
    return lines


def assert_no_secret(what: str, data: bytes | str) -> None:
    blob = data.encode() if isinstance(data, str) else data
    for marker in MARKERS:
        assert marker.encode() not in blob, f"the webhook secret appears in {what}"


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dispatcher.commands.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def families(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples by name, parsed by prometheus_client (so the exposition must be valid)."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


# --- the scripted run -----------------------------------------------------------


@dataclass
class Run:
    ns: Namespace
    receiver: HttpsReceiver
    proc: DispatcherProcess
    subs: dict[str, Subscription]
    metrics: str = ""
    logs: str = ""
    deferrals: int = 0
    records: dict[str, list[Any]] = field(default_factory=dict)


#: Expected attempts by (stage, outcome, status_class); the retry stages are 2s and 3s.
EXPECTED_ATTEMPTS = {
    # 3 to /ok, 4 to /busy started at once; /flaky and /dead answer 500; /slow times out.
    ("input", "success", "2xx"): 7,
    ("input", "failure", "5xx"): 2,
    ("input", "failure", "timeout"): 1,
    # /flaky and /slow succeed on retry, as does the deferred fifth /busy delivery.
    ("2s", "success", "2xx"): 3,
    ("2s", "failure", "5xx"): 1,
    ("3s", "failure", "5xx"): 1,
}
SUCCESSES = 10


@pytest.fixture(scope="module")
def run(broker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    tmp = tmp_path_factory.mktemp("observability")
    with HttpsReceiver() as receiver:
        ns = Namespace(
            http_ca_file=receiver.ca_file,
            retry_delays_s=[2, 3],
            http_timeout_s=2.5,
            # Four at once per endpoint: a fifth concurrent delivery to one endpoint
            # waits, and once the endpoint has answered nothing for 0.5 s it is
            # deferred to the first retry stage.
            max_in_flight_per_endpoint=4,
            endpoint_queue_size=0,
            endpoint_queue_wait_s=0,
            endpoint_stall_s=0.5,
            circuit_failure_threshold=50,
            log_level="DEBUG",
        )
        subs = {
            name: ns.subscribe(
                receiver.url(f"/{name}"), organization_id=f"org_{name}", secret=SECRET
            )
            for name in ("ok", "flaky", "slow", "dead")
        }
        # Another origin (same server, named by address): its own endpoint limits.
        subs["busy"] = ns.subscribe(
            receiver.url("/busy", hostname="127.0.0.1"), organization_id="org_busy", secret=SECRET
        )
        _write_invalid_subscriptions(ns)
        receiver.respond("/flaky", Reply(500, body=b"try later"), Reply(200))
        receiver.respond("/slow", Reply(200, delay_s=5), Reply(200))
        receiver.respond("/dead", Reply(500, body=b"down"))
        receiver.respond("/busy", *[Reply(200, delay_s=1.5)] * 4, Reply(200))

        proc = DispatcherProcess(ns, tmp / "dispatcher.log")
        try:
            proc.start()
            ns.publish(*[event("org_ok") for _ in range(3)])
            # Finished, not only received: they must not hold the endpoint's slots.
            wait_until(
                lambda: metric_value(proc.metrics(), "dispatcher_delivery_attempts_total") == 3,
                30,
                "the first three deliveries",
            )
            ns.publish(event("org_flaky"), event("org_slow"), event("org_dead"))
            # One partition, one batch: all five reach the endpoint limit together.
            ns.publish(*[event("org_busy") for _ in range(5)], key=b"busy")
            ns.publish(b"{not json")

            def settled() -> bool:
                text = proc.metrics()
                return (
                    metric_value(text, "dispatcher_delivery_attempts_total")
                    >= sum(EXPECTED_ATTEMPTS.values())
                    and metric_value(text, "dispatcher_dead_letters_total") >= 1
                    and metric_value(text, "dispatcher_invalid_events_total") >= 1
                    and metric_value(text, "dispatcher_in_flight_deliveries") == 0
                )

            wait_until(settled, 90, "every delivery to succeed or be dead-lettered")
            stages = retry_stages(ns.settings)
            topics = [ns.settings.input_topic, *(s.topic for s in stages)]
            topics += [ns.settings.dead_letter_topic, ns.settings.invalid_topic]
            result = Run(ns, receiver, proc, subs)
            result.records = {t: ns.read_all(t) for t in topics}

            def caught_up() -> str:
                # The consumers report lag every 5 s: wait for a report after the last write.
                text = proc.metrics()
                lags = [
                    value
                    for labels, value in families(text).get("dispatcher_consumer_lag", [])
                    if labels["topic"] in topics
                ]
                return text if len(lags) == 3 * len(stages) + 3 and not any(lags) else ""

            result.metrics = wait_until(caught_up, 60, "the consumer lag to be 0 everywhere")
            yield result
        finally:
            proc.stop()


def _write_invalid_subscriptions(ns: Namespace) -> None:
    """Records the table must ignore, and whose rejection must not be logged with the secret."""
    now = datetime.now(UTC).isoformat()
    bad_url = {
        "webhook_id": "wh_badurl",
        "organization_id": "org_bad",
        "url": "ftp://example.com/hook",
        "events": ["visitor.identified"],
        "secret": SECRET,
        "plan": "scale",
        "created_at": now,
        "updated_at": now,
    }
    producer = Producer({"bootstrap.servers": BOOTSTRAP})
    producer.produce(ns.settings.subscriptions_topic, json.dumps(bad_url).encode(), b"wh_badurl")
    truncated = json.dumps({**bad_url, "webhook_id": "wh_truncated"})[:-20].encode()
    producer.produce(ns.settings.subscriptions_topic, truncated, b"wh_truncated")
    assert producer.flush(30) == 0


# --- metrics -------------------------------------------------------------------


def test_metrics_count_every_kind_of_delivery(run: Run) -> None:
    text = run.metrics
    for (stage, outcome, status), count in EXPECTED_ATTEMPTS.items():
        got = metric_value(
            text,
            "dispatcher_delivery_attempts_total",
            stage=stage,
            outcome=outcome,
            status_class=status,
        )
        assert got == count, f"attempts {stage}/{outcome}/{status}: {got} != {count}"
    assert metric_value(text, "dispatcher_delivery_attempts_total") == sum(
        EXPECTED_ATTEMPTS.values()
    )
    # One duration observed per attempt, per stage.
    for stage in ("input", "2s", "3s"):
        attempts = sum(n for (s, _o, _c), n in EXPECTED_ATTEMPTS.items() if s == stage)
        got = metric_value(text, "dispatcher_attempt_duration_seconds_count", stage=stage)
        assert got == attempts, f"durations of stage {stage}: {got} != {attempts}"
    # One end-to-end latency per success; events were stamped just before publishing.
    assert metric_value(text, "dispatcher_end_to_end_latency_seconds_count") == SUCCESSES
    assert metric_value(text, "dispatcher_end_to_end_latency_seconds_sum") < SUCCESSES * 60
    # Failures of the input stage go to 2s (flaky, slow, dead); dead's 2s failure to 3s.
    assert metric_value(text, "dispatcher_retries_scheduled_total", stage="2s") == 3
    assert metric_value(text, "dispatcher_retries_scheduled_total", stage="3s") == 1
    assert metric_value(text, "dispatcher_retries_scheduled_total") == 4
    assert metric_value(text, "dispatcher_dead_letters_total", stage="3s") == 1
    assert metric_value(text, "dispatcher_dead_letters_total") == 1
    assert metric_value(text, "dispatcher_invalid_events_total", reason="not_json") == 1
    # Five valid subscriptions; the two invalid records are not loaded.
    assert metric_value(text, "dispatcher_subscriptions_loaded") == 5
    assert metric_value(text, "dispatcher_in_flight_deliveries") == 0
    assert metric_value(text, "dispatcher_ready") == 1


def test_deferral_is_counted_and_matches_the_retry_topic(run: Run) -> None:
    deferred = metric_value(run.metrics, "dispatcher_deferrals_total", reason="endpoint_stalled")
    assert deferred >= 1
    assert metric_value(run.metrics, "dispatcher_deferrals_total") == deferred
    # Each deferral is one record in the first retry stage spending no attempt.
    first = retry_stages(run.ns.settings)[0].topic
    records = [json.loads(m.value()) for m in run.records[first]]
    assert sum(1 for r in records if r["attempts_made"] == 0 and r["deferrals"] >= 1) == deferred
    assert {r["webhook_id"] for r in records if r["attempts_made"] == 0} == {
        run.subs["busy"].webhook_id
    }
    # The deferred delivery was then made once, from the retry stage.
    assert len(run.receiver.requests_to("/busy")) == 5


def test_consumer_lag_reported_for_every_assigned_partition(run: Run) -> None:
    samples = families(run.metrics)["dispatcher_consumer_lag"]
    input_topic = run.ns.settings.input_topic
    by_partition = {
        labels["partition"]: value for labels, value in samples if labels["topic"] == input_topic
    }
    # All three partitions, including those that never held a message for this group.
    assert by_partition == {"0": 0.0, "1": 0.0, "2": 0.0}
    assert run.records[input_topic], "the input topic is not empty"


def input_lag(proc: DispatcherProcess) -> dict[str, float]:
    """This process's ``dispatcher_consumer_lag`` of the input topic, by partition."""
    topic = proc.ns.settings.input_topic
    samples = families(proc.metrics()).get("dispatcher_consumer_lag", [])
    return {labels["partition"]: value for labels, value in samples if labels["topic"] == topic}


def test_lag_series_follow_the_partition_assignment(
    ns: Namespace, receiver: HttpsReceiver, run_dispatcher: Any
) -> None:
    ns.subscribe(receiver.url("/hook"), organization_id="org_lag")
    first = run_dispatcher(ns)
    ns.publish(*[event("org_lag") for _ in range(6)])
    receiver.wait_for_requests(6, path="/hook", timeout_s=30)
    wait_until(
        lambda: input_lag(first) == {"0": 0, "1": 0, "2": 0}, 30, "lag 0 on all three partitions"
    )

    # A second instance takes some partitions: the first stops reporting those.
    second = run_dispatcher(ns, http_port=free_port())

    def split() -> bool:
        mine, theirs = input_lag(first), input_lag(second)
        both = set(mine) | set(theirs)
        # Nothing new to read: the taken-over partitions have no position yet, and
        # their lag comes from the committed offsets (0 after an orderly handover).
        return (
            bool(mine and theirs)
            and not set(mine) & set(theirs)
            and both == {"0", "1", "2"}
            and not any([*mine.values(), *theirs.values()])
        )

    wait_until(split, 90, "the lag series to split between the two instances")
    # It leaves: the first reports all three again.
    assert second.terminate() == 0
    wait_until(
        lambda: input_lag(first) == {"0": 0, "1": 0, "2": 0},
        60,
        "the first to report every partition again",
    )


#: The one family that names webhooks, in a bounded number of series (the first
#: DISPATCHER_METRICS_WEBHOOK_SERIES webhooks deferred, then "other").
PER_WEBHOOK = ("dispatcher_webhook_deferrals_total", "dispatcher_webhook_deferrals_created")


def test_metric_labels_are_bounded(run: Run) -> None:
    webhook_ids = [s.webhook_id for s in run.subs.values()]
    for name, samples in families(run.metrics).items():
        if not name.startswith("dispatcher_"):
            continue
        for labels, _value in samples:
            for key, value in labels.items():
                assert "/" not in value and "http" not in value, f"{name} has a URL label"
                assert not value.startswith("msg_"), name
                if name in PER_WEBHOOK and key == "webhook_id":
                    assert value in webhook_ids or value == "other", name
                else:
                    assert value not in webhook_ids, name
    # The deferred webhook (the busy one, stalled at its endpoint limit) has its series.
    deferred = {labels["webhook_id"] for labels, _ in families(run.metrics)[PER_WEBHOOK[0]]}
    assert deferred == {run.subs["busy"].webhook_id}
    assert_no_secret("the metrics", run.metrics)


# --- logs ----------------------------------------------------------------------


def test_every_log_line_is_json_and_delivery_lines_carry_the_id(run: Run) -> None:
    lines = json_lines(run.proc.logs())
    assert any(line["level"] == "debug" for line in lines), "DEBUG level not honoured"
    for line in lines:
        if line["logger"] in DELIVERY_LOGGERS:
            assert str(line.get("delivery_id", "")).startswith("msg_"), line
    # DEBUG shows one "delivered" line per success, with the id the endpoint saw.
    delivered = [line for line in lines if line["message"] == "delivered"]
    assert len(delivered) == SUCCESSES
    sent_ids = {
        r.header("x-bullseye-delivery-id")
        for path in ("/ok", "/flaky", "/slow", "/busy")
        for r in run.receiver.requests_to(path)
    }
    assert {line["delivery_id"] for line in delivered} == sent_ids
    # The dead letter is a warning naming its delivery.
    [dead_request, *_] = run.receiver.requests_to("/dead")
    dead = [line for line in lines if line["message"].startswith("dead-lettered")]
    assert [(d["level"], d["delivery_id"]) for d in dead] == [
        ("warning", dead_request.header("x-bullseye-delivery-id"))
    ]
    # The deferral is a DEBUG line with its id, and counted in an INFO line per interval.
    assert any(line["message"] == "deferred (endpoint_stalled)" for line in lines)

    def summary() -> list[dict[str, Any]]:
        return [
            line
            for line in json_lines(run.proc.logs())
            if line["level"] == "info" and line["message"].startswith("deferred 1 deliveries in ")
        ]

    [line] = wait_until(summary, 20, "the deferral summary line")
    assert line["message"].endswith("(1 endpoint_stalled)"), line
    # The invalid event is logged too.
    assert any(line["level"] == "warning" and "not_json" in line["message"] for line in lines)


def test_the_secret_is_never_logged_written_or_shown(run: Run) -> None:
    # It was in use: the endpoint got a signature made with it.
    [got, *_] = run.receiver.requests_to("/ok")
    expected = hmac.new(SECRET.encode(), got.body, hashlib.sha256).hexdigest()
    assert got.header("x-bullseye-signature") == expected
    subscriptions = run.ns.read_all(run.ns.settings.subscriptions_topic)
    assert any(SECRET.encode() in (m.value() or b"") for m in subscriptions)

    logs = run.proc.logs()
    # The invalid subscription records (both holding the secret) were reported.
    assert "wh_badurl" in logs and "wh_truncated" in logs
    assert_no_secret("the logs", logs)
    assert_no_secret("the metrics", run.proc.metrics())
    for topic, messages in run.records.items():
        for m in messages:
            assert_no_secret(f"a record key in {topic}", m.key() or b"")
            assert_no_secret(f"a record value in {topic}", m.value() or b"")
            for name, value in m.headers() or []:
                assert_no_secret(f"a record header in {topic}", name.encode() + (value or b""))
    assert len(run.records[run.ns.settings.dead_letter_topic]) == 1
    assert len(run.records[run.ns.settings.invalid_topic]) == 1

    env = run.ns.env()
    busy = run.subs["busy"].webhook_id
    for args in (("list",), ("list", "--json"), ("get", busy), ("get", busy, "--json")):
        done = cli(env, "subscriptions", *args)
        assert done.returncode == 0, done.stderr
        assert busy in done.stdout
        assert_no_secret(f"`dispatcher subscriptions {' '.join(args)}`", done.stdout + done.stderr)


# --- a real Prometheus server ---------------------------------------------------


def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail(
            "the `prometheus` server is not installed; `.ci/run` installs it "
            "(Debian package `prometheus`)"
        )
    return binary


class PrometheusServer:
    """``/usr/bin/prometheus`` on a free loopback port, scraping one target every second."""

    def __init__(self, binary: str, tmp: Path, target_port: int) -> None:
        self.port = free_port()
        config = tmp / "prometheus.yml"
        config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  scrape_timeout: 1s\n"
            "  evaluation_interval: 1s\n"
            "scrape_configs:\n"
            "  - job_name: dispatcher\n"
            "    static_configs:\n"
            f"      - targets: ['127.0.0.1:{target_port}']\n"
        )
        self.log_path = tmp / "prometheus.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=tmp,
            )
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 60) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited:\n{self.log_path.read_text()[-3000:]}")
            return get(f"{self.url}/-/ready")[0] == 200

        wait_until(ready, timeout_s, "Prometheus to be ready", interval_s=0.2)

    def query(self, promql: str) -> list[Any]:
        status, body = get(f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}")
        assert status == 200, body
        answer = json.loads(body)
        assert answer["status"] == "success", answer
        result: list[Any] = answer["data"]["result"]
        return result

    def scalar(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def test_prometheus_scrapes_the_delivery_count(
    ns: Namespace, receiver: HttpsReceiver, run_dispatcher: Any, tmp_path: Path
) -> None:
    binary = prometheus_binary()
    ns.subscribe(receiver.url("/hook"), organization_id="org_prom")
    proc = run_dispatcher(ns)
    ns.publish(*[event("org_prom") for _ in range(4)])
    receiver.wait_for_requests(4, path="/hook", timeout_s=30)

    prometheus = PrometheusServer(binary, tmp_path, proc.port)
    try:
        prometheus.wait_ready()
        promql = 'sum(dispatcher_delivery_attempts_total{outcome="success"})'
        wait_until(
            lambda: prometheus.scalar(promql) == 4,
            60,
            "Prometheus to report 4 successful deliveries",
            interval_s=0.5,
        )
        assert prometheus.scalar('up{job="dispatcher"}') == 1
        assert prometheus.scalar("dispatcher_ready") == 1
        assert prometheus.scalar("sum(dispatcher_end_to_end_latency_seconds_count)") == 4
    finally:
        prometheus.stop()
    assert prometheus.proc.returncode == 0


# --- readiness, liveness, `dispatcher check`, log level -------------------------


def test_not_ready_until_the_subscriptions_topic_exists_and_is_read(
    ns: Namespace, receiver: HttpsReceiver, run_dispatcher: Any
) -> None:
    topic = f"{ns.settings.subscriptions_topic}.late"
    late = Settings(**{**ns.values, "subscriptions_topic": topic})
    proc = run_dispatcher(ns, wait_ready=False, subscriptions_topic=topic, log_level="WARNING")
    base = f"http://127.0.0.1:{proc.port}"
    env = ns.env(subscriptions_topic=topic, http_port=proc.port)

    # Alive from the start, and not ready, saying why.
    wait_until(lambda: get(f"{base}/healthz")[0] == 200, 30, "/healthz to answer")

    def missing_topic_reported() -> str:
        status, body = get(f"{base}/readyz")
        return body if status == 503 and "does not exist" in body else ""

    why = wait_until(missing_topic_reported, 30, "/readyz to report the missing topic")
    assert topic in why and "dispatcher topics ensure" in why
    done = cli(env, "check")
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith("not ready:") and done.stderr.count("\n") == 1
    assert "does not exist" in done.stderr
    assert cli(env, "check", "--live").returncode == 0
    assert metric_value(proc.metrics(), "dispatcher_ready") == 0
    assert proc.proc.poll() is None, "the dispatcher exited instead of waiting"

    # The operator creates the topic: the table loads it and the dispatcher gets ready.
    assert not ensure_topics(late).problems
    now = datetime.now(UTC)
    sub = Subscription(
        webhook_id="wh_late",
        organization_id="org_late",
        url=receiver.url("/late"),
        events=("visitor.identified",),
        plan="scale",
        created_at=now,
        updated_at=now,
    )
    write(late, sub.webhook_id, sub)
    ns.publish(event("org_late"))
    proc.wait_ready(60)
    assert get(f"{base}/readyz") == (200, "ok\n")
    assert get(f"{base}/healthz") == (200, "ok\n")
    receiver.wait_for_requests(1, path="/late", timeout_s=30)
    done = cli(env, "check")
    assert (done.returncode, done.stdout, done.stderr) == (0, "ok\n", "")
    wait_until(
        lambda: metric_value(proc.metrics(), "dispatcher_ready") == 1, 10, "dispatcher_ready 1"
    )

    # Nobody listening: not reachable, exit 1, one line.
    done = cli(ns.env(http_port=free_port()), "check")
    assert done.returncode == 1
    assert done.stderr.startswith("not reachable:") and done.stderr.count("\n") == 1

    assert proc.terminate() == 0
    # WARNING level: the wait was reported once, clearly; no info or debug lines.
    lines = json_lines(proc.logs())
    waiting = [line for line in lines if "does not exist" in line["message"]]
    assert len(waiting) == 1
    assert waiting[0]["level"] == "warning" and topic in waiting[0]["message"]
    assert {line["level"] for line in lines} <= {"warning", "error"}


def test_unreachable_broker_is_reported_not_fatal_and_logged_as_json(
    ns: Namespace, run_dispatcher: Any
) -> None:
    proc = run_dispatcher(ns, wait_ready=False, kafka_bootstrap_servers=f"127.0.0.1:{free_port()}")
    base = f"http://127.0.0.1:{proc.port}"
    wait_until(lambda: get(f"{base}/healthz")[0] == 200, 30, "/healthz to answer")
    wait_until(
        lambda: (r := get(f"{base}/readyz"))[0] == 503 and "cannot reach Kafka" in r[1],
        60,
        "/readyz to report the unreachable broker",
    )
    # librdkafka's own complaints arrive as JSON lines of their own logger.
    wait_until(lambda: '"logger": "librdkafka"' in proc.logs(), 60, "librdkafka's log lines")
    assert get(f"{base}/healthz")[0] == 200
    assert proc.terminate() == 0
    lines = json_lines(proc.logs())
    kafka_lines = [line["message"] for line in lines if line["logger"] == "librdkafka"]
    # Not the flood of identical connection errors librdkafka emits while a broker is down.
    assert len(kafka_lines) == len(set(kafka_lines))
    assert any(
        line["level"] == "warning" and "cannot reach Kafka" in line["message"] for line in lines
    )


def test_repeat_filter_lets_one_identical_line_through_per_window() -> None:
    now = [0.0]
    repeat = RepeatFilter(10.0, clock=lambda: now[0])

    def passes(message: str, level: int = logging.ERROR) -> bool:
        record = logging.LogRecord("librdkafka", level, __file__, 1, message, None, None)
        return repeat.filter(record)

    assert passes("connect failed")
    assert not passes("connect failed")
    assert passes("connect failed", logging.WARNING)
    assert passes("another line")
    now[0] = 9.9
    assert not passes("connect failed")
    now[0] = 10.0
    assert passes("connect failed")


def test_health_port_in_use_ends_with_one_json_line(ns: Namespace, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = DispatcherProcess(
            ns, tmp_path / "dispatcher.log", http_port=port, http_host="127.0.0.1"
        )
        proc.start(wait_ready=False)
        assert proc.proc is not None
        assert proc.proc.wait(60) == 2
    [line] = json_lines(proc.logs())
    assert line["level"] == "error"
    assert f"cannot listen on 127.0.0.1:{port}" in line["message"]
    assert "DISPATCHER_HTTP_PORT" in line["message"]
