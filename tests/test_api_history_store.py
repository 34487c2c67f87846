"""The history store through a real ``dispatcher api``: whole retention, restarts, kill -9.

Attempt records are crafted here, with times spread over days, and written
straight to the attempts topic, in shuffled order over many partitions so that
read order is never time order.
"""

from __future__ import annotations

import random
import signal
import sqlite3
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from confluent_kafka import Producer

from dispatcher.attempts import AttemptRecord
from dispatcher.stages import retry_stages
from tests.api_support import HISTORY_INDEXES, ORG, ApiProcess, history_indexes
from tests.receiver import HttpsReceiver
from tests.support import DispatcherProcess, Namespace, wait_until

NOW = datetime.now(UTC).replace(microsecond=0)


def attempt(
    webhook_id: str, delivery_id: str, at: datetime, attempt: int = 1, **extra: Any
) -> AttemptRecord:
    return AttemptRecord.model_validate(
        {
            "delivery_id": delivery_id,
            "webhook_id": webhook_id,
            "organization_id": ORG,
            "event": "visitor.identified",
            "session_id": f"sess_{delivery_id}",
            "event_timestamp": at,
            "source": {"topic": "in", "partition": 0, "offset": 1},
            "attempt": attempt,
            "stage": "input" if attempt == 1 else f"retry-{attempt - 1}",
            "at": at,
            "duration_ms": 12.5,
            "ok": extra.pop("ok", True),
            "status_code": extra.pop("status_code", 200),
            "request_headers": {"webhook-signature": "v1,c2lnbmF0dXJlLWJ5dGVz"},
            "body": '{"session_id": "x"}' if attempt == 1 else None,
            **extra,
        }
    )


def failed_delivery(webhook_id: str, delivery_id: str, at: datetime) -> list[AttemptRecord]:
    """Four failed attempts, the last dead-lettered."""
    return [
        attempt(
            webhook_id,
            delivery_id,
            at + timedelta(minutes=5 * n),
            n,
            ok=False,
            status_code=500,
            error_class="http",
            dead_lettered=n == 4,
            next_retry_at=None if n == 4 else at + timedelta(minutes=5 * n + 5),
        )
        for n in range(1, 5)
    ]


def publish(ns: Namespace, records: list[AttemptRecord]) -> None:
    producer = Producer({"bootstrap.servers": ns.bootstrap, "linger.ms": 20})
    for r in records:
        while True:
            try:
                producer.produce(ns.settings.attempts_topic, r.to_json(), r.delivery_id.encode())
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    assert producer.flush(60) == 0


def all_pages(http: httpx.Client, webhook_id: str, **params: Any) -> list[dict[str, Any]]:
    url = f"/v1/organizations/{ORG}/webhooks/{webhook_id}/deliveries"
    out: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = {"limit": 500, **params, **({"cursor": cursor} if cursor else {})}
        r = http.get(url, params=query)
        assert r.status_code == 200, r.text
        page = r.json()
        out += page["data"]
        cursor = page["next_cursor"]
        if cursor is None:
            return out


def newest_first(rows: list[dict[str, Any]]) -> bool:
    keys = [(datetime.fromisoformat(d["created_at"]), d["id"]) for d in rows]
    return keys == sorted(keys, reverse=True)


def store_counts(path: Path) -> tuple[int, int, int]:
    """Deliveries, attempt rows, and the attempts the deliveries count, from the file."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM deliveries), (SELECT count(*) FROM attempts), "
            "(SELECT coalesce(sum(attempts), 0) FROM deliveries)"
        ).fetchone()
        return int(row[0]), int(row[1]), int(row[2])
    finally:
        conn.close()


def test_every_delivery_of_13_days_is_listable_and_findable_across_restarts(
    ns_factory: Callable[..., Namespace], run_api: Callable[..., ApiProcess]
) -> None:
    ns = ns_factory(topic_partitions=12)
    hook = ns.subscribe("https://127.0.0.1:9/hook", organization_id=ORG).webhook_id
    rng = random.Random(17)
    span_s = 13 * 86_400
    records: list[AttemptRecord] = []
    dead: set[str] = set()
    for n in range(20_000):
        at = NOW - timedelta(seconds=rng.randrange(span_s)) - timedelta(hours=1)
        delivery_id = f"d{n:05d}"
        if n % 50 == 0:
            dead.add(delivery_id)
            records += failed_delivery(hook, delivery_id, at)
        else:
            records.append(attempt(hook, delivery_id, at))
    old_one = attempt(hook, "d_twelve_days", NOW - timedelta(days=12, hours=3))
    records.append(old_one)
    rng.shuffle(records)  # read order is not time order
    publish(ns, records)

    api = run_api(ns)
    http = api.admin()
    listed = all_pages(http, hook)
    assert len(listed) == 20_001
    assert len({d["id"] for d in listed}) == 20_001
    assert newest_first(listed)

    found = all_pages(http, hook, session_id="sess_d_twelve_days")
    assert [d["id"] for d in found] == ["d_twelve_days"]
    assert datetime.fromisoformat(found[0]["created_at"]) == old_one.at

    dead_listed = all_pages(http, hook, status="dead_lettered")
    assert {d["id"] for d in dead_listed} == dead
    assert all(d["attempts"] == 4 and d["last_status_code"] == 500 for d in dead_listed)
    assert newest_first(dead_listed)

    one = http.get(f"/v1/organizations/{ORG}/webhooks/{hook}/deliveries/{min(dead)}").json()
    assert [a["attempt"] for a in one["attempt_details"]] == [1, 2, 3, 4]
    assert one["attempt_details"][0]["request_headers"]["webhook-signature"] == "v1,…dGVz"
    assert one["body"] == '{"session_id": "x"}'

    hourly = http.get(f"/v1/organizations/{ORG}/webhooks/{hook}/summary/hourly").json()
    assert sum(h["successes"] + h["failures"] for h in hourly["data"]) == len(records)
    assert sum(h["failures"] for h in hourly["data"]) == 4 * len(dead)

    # A restart resumes from the file: nothing folded again, same order.
    before = store_counts(api.history_path)
    api.stop()
    api.start()
    http = api.admin()
    assert store_counts(api.history_path) == before == (20_001, len(records), len(records))
    again = all_pages(http, hook)
    assert [d["id"] for d in again] == [d["id"] for d in listed]


def test_kill_9_while_folding_loses_and_doubles_nothing(
    ns_factory: Callable[..., Namespace], run_api: Callable[..., ApiProcess]
) -> None:
    ns = ns_factory(topic_partitions=6)
    hook = ns.subscribe("https://127.0.0.1:9/hook", organization_id=ORG).webhook_id
    records: list[AttemptRecord] = []
    # Several fold transactions' worth: one transaction takes up to 20,000 records
    # (a batch) here, far fewer than a rebuild's default.
    for n in range(30_000):
        at = NOW - timedelta(seconds=20 * n)  # all within retention
        if n % 3 == 0:
            records += failed_delivery(hook, f"k{n:05d}", at)
        else:
            records.append(attempt(hook, f"k{n:05d}", at))
    publish(ns, records)

    api = run_api(ns, wait_ready=False, api_history_backlog_tx=1)
    assert api.proc is not None

    def mid_fold() -> bool:
        if not api.history_path.exists():
            return False
        try:
            _, rows, _ = store_counts(api.history_path)
        except sqlite3.OperationalError:  # schema not created yet
            return False
        assert rows < len(records), "folded everything before it could be killed"
        return rows > 0

    wait_until(mid_fold, 60, "folding to be under way", interval_s=0.01)
    api.proc.send_signal(signal.SIGKILL)
    api.proc.wait(10)
    partial = store_counts(api.history_path)
    assert partial[1] < len(records)
    # A rebuild goes without its secondary indexes until it has caught up.
    assert history_indexes(api.history_path) == set()

    api.start()
    assert store_counts(api.history_path) == (30_000, len(records), len(records))
    assert history_indexes(api.history_path) == HISTORY_INDEXES
    listed = all_pages(api.admin(), hook)
    assert len(listed) == 30_000 and newest_first(listed)
    assert sum(d["attempts"] for d in listed) == len(records)


def test_rows_past_retention_are_deleted(
    ns: Namespace, run_api: Callable[..., ApiProcess], tmp_path: Path
) -> None:
    hook = ns.subscribe("https://127.0.0.1:9/hook", organization_id=ORG).webhook_id
    old = [attempt(hook, f"old{n}", NOW - timedelta(days=5, minutes=n)) for n in range(30)]
    fresh = [attempt(hook, f"new{n}", NOW - timedelta(minutes=n)) for n in range(20)]
    publish(ns, old + fresh)
    path = tmp_path / "kept.sqlite3"

    api = run_api(ns, api_history_path=str(path))
    assert len(all_pages(api.admin(), hook)) == 50
    api.stop()

    # The same file, now with 3 days of retention: the older rows go, in the background.
    shorter = run_api(ns, api_history_path=str(path), attempts_retention_ms=3 * 86_400_000)
    http = shorter.admin()
    wait_until(lambda: len(all_pages(http, hook)) == 20, 30, "rows past retention to go")
    assert {d["id"] for d in all_pages(http, hook)} == {r.delivery_id for r in fresh}
    assert store_counts(path) == (20, 20, 20)


def test_recover_resends_every_failure_since_a_time_once(
    ns: Namespace,
    run_api: Callable[..., ApiProcess],
    run_dispatcher: Callable[..., DispatcherProcess],
    receiver: HttpsReceiver,
) -> None:
    hook = ns.subscribe(receiver.url("/fixed"), organization_id=ORG).webhook_id
    recent = [f"r{n}" for n in range(3)]
    records = [r for d in recent for r in failed_delivery(hook, d, NOW - timedelta(hours=2))]
    records += failed_delivery(hook, "too_old", NOW - timedelta(days=3))
    records.append(attempt(hook, "fine", NOW - timedelta(hours=1)))
    publish(ns, records)
    run_dispatcher(ns)
    api = run_api(ns)
    http = api.admin()
    url = f"/v1/organizations/{ORG}/webhooks/{hook}/recover"
    since = (NOW - timedelta(days=1)).isoformat()

    first = http.post(url, json={"since": since})
    assert first.status_code == 202, first.text
    assert first.json() == {"queued": 3, "more": False}
    # Queued ones are pending: asking again queues nothing twice.
    assert http.post(url, json={"since": since}).json() == {"queued": 0, "more": False}
    assert http.post(url, json={"since": "yesterday"}).status_code == 422
    assert api.viewer().post(url, json={"since": since}).status_code == 403

    got = receiver.wait_for_requests(3, path="/fixed")
    assert sorted(r.header("x-bullseye-delivery-id") for r in got) == recent
    assert all(r.body == b'{"session_id": "x"}' for r in got)
    succeeded = wait_until(
        lambda: {d["id"] for d in all_pages(http, hook, status="succeeded")} >= set(recent),
        30,
        "the recovered deliveries to succeed",
    )
    assert succeeded
    still = all_pages(http, hook, status="dead_lettered")
    assert [d["id"] for d in still] == ["too_old"]
    detail = http.get(f"/v1/organizations/{ORG}/webhooks/{hook}/deliveries/r0").json()
    kinds = [(a["kind"], a["requested_by"]) for a in detail["attempt_details"]]
    assert kinds[4] == ("resend", "admin") and kinds[-1] == ("attempt", None)
    assert len(receiver.requests_to("/fixed")) == 3


def test_recover_asked_of_two_replicas_at_once_queues_each_delivery_once(
    ns: Namespace, run_api: Callable[..., ApiProcess], receiver: HttpsReceiver
) -> None:
    """Each replica's store says the failures are not pending; the writer, which both
    recovers go to, queues each one once."""
    hook = ns.subscribe(receiver.url("/fixed"), organization_id=ORG).webhook_id
    failed = [f"f{n}" for n in range(20)]
    publish(ns, [r for d in failed for r in failed_delivery(hook, d, NOW - timedelta(hours=2))])
    writer = run_api(ns)
    follower = run_api(ns, same_keys_as=writer, api_writer_url=writer.url)
    url = f"/v1/organizations/{ORG}/webhooks/{hook}/recover"
    since = {"since": (NOW - timedelta(days=1)).isoformat()}
    barrier = threading.Barrier(2)
    answers: list[httpx.Response] = []

    def ask(api: ApiProcess) -> None:
        with api.admin() as http:
            barrier.wait()
            answers.append(http.post(url, json=since))

    threads = [threading.Thread(target=ask, args=(api,)) for api in (writer, follower)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [a.status_code for a in answers] == [202, 202], [a.text for a in answers]
    assert sorted(a.json()["queued"] for a in answers) == [0, len(failed)]
    queued = [m.key().decode() for m in ns.read_all(retry_stages(ns.settings)[0].topic)]
    assert sorted(queued) == sorted(failed)
