"""``dispatcher dead-letter list|replay`` on the real broker, with a real dispatcher replaying."""

from __future__ import annotations

import io
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from dispatcher.commands.cli_deadletter import ProgressBar
from dispatcher.commands.deadletter import Filters, read
from dispatcher.records import (
    H_ATTEMPT,
    H_DUE_MS,
    H_REPLAY_OF,
    Attempt,
    DeliveryRecord,
    Source,
    header_value,
    record_headers,
)
from dispatcher.stages import retry_stages
from tests.cli_support import Cli, run_subprocess, wait_topics_ready
from tests.receiver import HttpsReceiver, Reply
from tests.support import BOOTSTRAP, SEED_EVENT, Namespace, wait_until

DAY1 = datetime(2025, 1, 1, tzinfo=UTC)


def dead_letter(
    ns: Namespace,
    webhook_id: str,
    organization_id: str,
    at: datetime,
    delivery_id: str | None = None,
) -> DeliveryRecord:
    """Write a dead letter as the dispatcher would, with a known time."""
    body = json.dumps({**SEED_EVENT, "organization_id": organization_id}, separators=(",", ":"))
    record = DeliveryRecord(
        delivery_id=delivery_id or f"msg_{uuid.uuid4().hex}",
        webhook_id=webhook_id,
        organization_id=organization_id,
        event="visitor.identified",
        event_timestamp=at - timedelta(minutes=40),
        body=body,
        attempts_made=4,
        first_failure_at=at - timedelta(minutes=36),
        source=Source(topic=ns.settings.input_topic, partition=0, offset=7),
        history=[
            Attempt(
                attempt=n,
                stage="input" if n == 1 else f"s{n}",
                at=at - timedelta(minutes=4 - n),
                duration_ms=12.5,
                status_code=500,
                error_class="http",
                error="HTTP 500",
                response_snippet="boom",
            )
            for n in range(1, 5)
        ],
        dead_lettered_at=at,
        dead_letter_reason="all 4 attempts failed",
    )
    producer = Producer({"bootstrap.servers": BOOTSTRAP, "enable.idempotence": True})
    producer.produce(
        ns.settings.dead_letter_topic,
        record.to_json(),
        record.delivery_id.encode(),
        headers=record_headers(record, 0),
    )
    assert producer.flush(30) == 0
    return record


def test_list_with_each_filter(cli: Cli, ns: Namespace) -> None:
    a = dead_letter(ns, "wh_a", "org_1", DAY1)
    b = dead_letter(ns, "wh_b", "org_1", DAY1 + timedelta(days=1))
    c = dead_letter(ns, "wh_c", "org_2", DAY1 + timedelta(days=2))

    def ids(*argv: str) -> list[str]:
        return [d["delivery_id"] for d in cli(ns, "dead-letter", "list", "--json", *argv).json()]

    assert ids() == [a.delivery_id, b.delivery_id, c.delivery_id]  # oldest first
    assert ids("--webhook", "wh_b") == [b.delivery_id]
    assert ids("--organization", "org_1") == [a.delivery_id, b.delivery_id]
    assert ids("--since", "2025-01-02T00:00:00Z") == [b.delivery_id, c.delivery_id]
    assert ids("--until", "2025-01-02") == [a.delivery_id]  # no zone: UTC; until excludes
    assert ids("--since", "2025-01-01T12:00+02:00", "--until", "2025-01-03") == [b.delivery_id]
    assert ids("--organization", "org_2", "--webhook", "wh_a") == []
    assert ids("--delivery", c.delivery_id, "--delivery", a.delivery_id) == [
        a.delivery_id,
        c.delivery_id,
    ]

    [plain] = cli(ns, "dead-letter", "list", "--json", "--webhook", "wh_a").json()
    assert "body" not in plain
    assert plain["attempts_made"] == 4 and len(plain["history"]) == 4
    assert plain["partition"] >= 0 and plain["offset"] >= 0 and plain["replayed_at"] is None
    [full] = cli(ns, "dead-letter", "list", "--json", "--with-body", "--webhook", "wh_a").json()
    assert full["body"] == a.body

    table = cli(ns, "dead-letter", "list", "--organization", "org_1")
    assert table.code == 0
    lines = table.out.splitlines()
    assert lines[0].split() == [
        "DELIVERY",
        "ID",
        "WEBHOOK",
        "ORGANIZATION",
        "DEAD-LETTERED",
        "AT",
        "ATTEMPTS",
        "LAST",
        "ERROR",
    ]
    row = [a.delivery_id, "wh_a", "org_1", "2025-01-01T00:00:00Z", "4", "http", "500"]
    assert lines[1].split() == row
    assert "2 dead letter(s)" in table.out


@pytest.mark.parametrize(
    ("argv", "code", "needle"),
    [
        (["list", "--since", "yesterday"], 2, "--since: 'yesterday' is not an ISO 8601 time"),
        (["list", "--since", "2025-01-02", "--until", "2025-01-01"], 2, "before --until"),
        (["list", "--with-body"], 2, "--with-body goes with --json"),
        (["replay"], 2, "choose what to replay"),
        (["replay", "--bogus"], 2, "unrecognized arguments"),
        ([], 2, "choose an action"),
    ],
    ids=["bad time", "empty window", "body without json", "replay all unasked", "bad flag", "none"],
)
def test_refusals(cli: Cli, shared_ns: Namespace, argv: list[str], code: int, needle: str) -> None:
    cli(shared_ns, "dead-letter", *argv).assert_one_line_error(code, needle)


def test_missing_topic(cli: Cli, shared_ns: Namespace) -> None:
    result = cli(shared_ns, "dead-letter", "list", dead_letter_topic="no.such.dead.letters")
    result.assert_one_line_error(1, "topic no.such.dead.letters does not exist")


def test_replay_writes_fresh_records_and_markers(cli: Cli, ns: Namespace) -> None:
    ns.subscribe("https://127.0.0.1:9/a", webhook_id="wh_a", organization_id="org_1")
    ns.subscribe("https://127.0.0.1:9/b", webhook_id="wh_b", organization_id="org_1", enabled=False)
    first = dead_letter(ns, "wh_a", "org_1", DAY1)
    # The same delivery dead-lettered twice (at-least-once writing): sent once only.
    again = dead_letter(ns, "wh_a", "org_1", DAY1 + timedelta(hours=1), first.delivery_id)
    disabled = dead_letter(ns, "wh_b", "org_1", DAY1)
    deleted = dead_letter(ns, "wh_gone", "org_1", DAY1)
    stage = retry_stages(ns.settings)[0]

    dry = cli(ns, "dead-letter", "replay", "--all", "--dry-run")
    assert dry.code == 0, dry.err
    assert "would replay 1 dead letter(s)" in dry.out and first.delivery_id in dry.out
    assert ns.read_all(stage.topic) == []

    before = datetime.now(UTC)
    done = cli(ns, "dead-letter", "replay", "--organization", "org_1", "--json").json()
    assert done["replayed"] == [first.delivery_id]
    assert done["merged_duplicates"] == 1
    assert done["skipped"] == {
        "subscription disabled": [disabled.delivery_id],
        "subscription deleted": [deleted.delivery_id],
    }
    assert done["retry_topic"] == stage.topic

    [msg] = ns.read_all(stage.topic)
    replayed = DeliveryRecord.model_validate_json(msg.value())
    assert replayed.delivery_id == first.delivery_id and replayed.body == again.body
    assert replayed.attempts_made == 0 and replayed.history == [] and replayed.deferrals == 0
    assert replayed.dead_lettered_at is None and replayed.first_failure_at is None
    assert replayed.source == first.source
    assert msg.key() == first.delivery_id.encode()
    headers = msg.headers()
    assert header_value(headers, H_ATTEMPT) == b"0"
    due_ms = int(header_value(headers, H_DUE_MS) or b"-1")
    assert before.timestamp() * 1000 - 1000 <= due_ms <= datetime.now(UTC).timestamp() * 1000

    letters = {(d.partition, d.offset): d for d in read(ns.settings, Filters()).letters}
    marked = {d.record.delivery_id for d in letters.values() if d.replayed is not None}
    assert marked == {first.delivery_id}
    assert sum(d.replayed is not None for d in letters.values()) == 2
    newest = max(
        (d for d in letters.values() if d.record.delivery_id == first.delivery_id),
        key=lambda d: d.offset,
    )
    assert header_value(headers, H_REPLAY_OF) == newest.position.encode()

    # Listing hides what was replayed unless asked.
    shown = [d["delivery_id"] for d in cli(ns, "dead-letter", "list", "--json").json()]
    assert sorted(shown) == sorted([disabled.delivery_id, deleted.delivery_id])
    everything = cli(ns, "dead-letter", "list", "--json", "--include-replayed").json()
    assert len(everything) == 4
    assert sum(d["replayed_at"] is not None and d["replayed"] for d in everything) == 2
    table = cli(ns, "dead-letter", "list", "--include-replayed").out
    assert "REPLAYED AT" in table

    second = cli(ns, "dead-letter", "replay", "--organization", "org_1")
    assert second.code == 0, second.err
    assert "replayed 0 dead letter(s)" in second.out and "2 already replayed" in second.out
    assert len(ns.read_all(stage.topic)) == 1


def test_replay_skips_what_the_dispatcher_would_not_call(cli: Cli, ns: Namespace) -> None:
    """Replay applies fan-out's policy: a plain http:// URL is skipped like a disabled one."""
    ns.subscribe("https://127.0.0.1:9/ok", webhook_id="wh_ok", organization_id="org_p")
    ns.subscribe("http://127.0.0.1:9/plain", webhook_id="wh_plain", organization_id="org_p")
    ns.subscribe(
        "https://127.0.0.1:9/f", webhook_id="wh_free", organization_id="org_p", plan="free"
    )
    ok = dead_letter(ns, "wh_ok", "org_p", DAY1)
    plain = dead_letter(ns, "wh_plain", "org_p", DAY1)
    free = dead_letter(ns, "wh_free", "org_p", DAY1)

    done = cli(ns, "dead-letter", "replay", "--organization", "org_p", "--json").json()
    assert done["replayed"] == [ok.delivery_id]
    assert done["skipped"] == {
        "URL is not https:// and DISPATCHER_ALLOW_HTTP is off": [plain.delivery_id],
        "plan not entitled": [free.delivery_id],
    }
    [msg] = ns.read_all(retry_stages(ns.settings)[0].topic)
    assert msg.key() == ok.delivery_id.encode()

    # The same dead letter is replayed once plain http is allowed (it was left unmarked).
    again = cli(ns, "dead-letter", "replay", "--webhook", "wh_plain", "--json", allow_http=True)
    assert again.json()["replayed"] == [plain.delivery_id]


def all_retries_processed(ns: Namespace) -> bool:
    """Every retry stage's group has committed up to the end of its topic."""
    for stage in retry_stages(ns.settings):
        consumer = Consumer(
            {
                "bootstrap.servers": BOOTSTRAP,
                "group.id": f"{ns.settings.group_id}.{stage.name}",
                "enable.auto.commit": False,
            }
        )
        try:
            meta = consumer.list_topics(stage.topic, timeout=10).topics[stage.topic]
            parts = [TopicPartition(stage.topic, p) for p in meta.partitions]
            for tp in consumer.committed(parts, timeout=10):
                _low, high = consumer.get_watermark_offsets(tp, timeout=10)
                if high > 0 and tp.offset < high:
                    return False
        finally:
            consumer.close()
    return True


def test_replay_delivers_once_the_endpoint_is_healthy(
    cli: Cli, ns_factory: Any, receiver: HttpsReceiver, run_dispatcher: Any
) -> None:
    # Two retries of 1 and 2 s: three attempts; one breaker for both paths, kept closed.
    ns = wait_topics_ready(ns_factory(retry_delays_s=[1, 2], circuit_failure_threshold=1000))
    ns.subscribe(receiver.url("/a"), webhook_id="wh_a", organization_id="org_1")
    ns.subscribe(receiver.url("/b"), webhook_id="wh_b", organization_id="org_2")
    receiver.respond("/a", Reply(500))
    receiver.respond("/b", Reply(503))
    run_dispatcher(ns)
    for org, session in (("org_1", "s1"), ("org_1", "s2"), ("org_2", "s3")):
        ns.publish({**SEED_EVENT, "organization_id": org, "session_id": session})

    def letters(**filters: Any) -> list[Any]:
        return read(ns.settings, Filters(**filters), keep_body=True).letters

    def replay(*argv: str) -> str:
        result = cli(ns, "dead-letter", "replay", *argv)
        assert result.code == 0, result.err
        return result.out

    wait_until(lambda: len(letters()) == 3, 60, "three dead letters")
    assert len(receiver.requests_to("/a")) == 6 and len(receiver.requests_to("/b")) == 3
    dead_a = {d.record.delivery_id: d.record.body for d in letters(webhook_id="wh_a")}

    listed = run_subprocess(ns, "dead-letter", "list", "--json")
    assert sorted(d["webhook_id"] for d in listed.json()) == ["wh_a", "wh_a", "wh_b"]
    assert all(d["attempts_made"] == 3 for d in listed.json())

    # The endpoint is fixed: a replay delivers each dead letter once, as attempt 1.
    receiver.respond("/a", Reply(200))
    replayed = run_subprocess(ns, "dead-letter", "replay", "--webhook", "wh_a")
    assert replayed.code == 0, replayed.err
    assert "replayed 2 dead letter(s)" in replayed.out
    got = receiver.wait_for_requests(8, path="/a", timeout_s=30)[6:]
    assert {r.header("webhook-id"): r.body.decode() for r in got} == dead_a
    assert [r.header("x-bullseye-attempt") for r in got] == ["1", "1"]

    again = run_subprocess(ns, "dead-letter", "replay", "--webhook", "wh_a")
    assert again.code == 0 and "replayed 0 dead letter(s)" in again.out, again.out

    # Replayed while still failing: dead-lettered anew, at a new offset, and replayable.
    [old_b] = letters(webhook_id="wh_b")
    assert "replayed 1 dead letter(s)" in replay("--organization", "org_2")
    wait_until(lambda: len(letters(webhook_id="wh_b")) == 2, 60, "wh_b dead-lettered again")
    assert len(receiver.requests_to("/b")) == 6
    [new_b] = cli(ns, "dead-letter", "list", "--json").json()
    assert new_b["delivery_id"] == old_b.record.delivery_id
    assert (new_b["partition"], new_b["offset"]) != (old_b.partition, old_b.offset)
    assert new_b["attempts_made"] == 3 and new_b["replayed_at"] is None

    receiver.respond("/b", Reply(200))
    assert "replayed 1 dead letter(s)" in replay("--all")
    [delivered_b] = receiver.wait_for_requests(7, path="/b", timeout_s=30)[6:]
    assert delivered_b.header("webhook-id") == old_b.record.delivery_id

    # The same replays once more: nothing is sent, even after everything was processed.
    for argv in (["--all"], ["--webhook", "wh_a"], ["--organization", "org_2"]):
        assert "replayed 0 dead letter(s)" in replay(*argv)
    wait_until(lambda: all_retries_processed(ns), 60, "the retry stages to commit everything")
    assert len(receiver.requests_to("/a")) == 8
    assert len(receiver.requests_to("/b")) == 7
    assert cli(ns, "dead-letter", "list", "--json").json() == []


def test_progress_bar_only_for_big_replays_or_a_terminal() -> None:
    quiet = io.StringIO()
    small = ProgressBar(quiet, min_records=10)
    small.update(5, 5)
    small.finish()
    assert quiet.getvalue() == ""

    shown = io.StringIO()
    big = ProgressBar(shown, min_records=10)
    big.update(11, 11)
    big.finish()
    assert shown.getvalue() == "\rreplaying 11/11 (100%)\n"
