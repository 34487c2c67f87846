"""One writer, two real ``dispatcher api`` processes: concurrent changes cannot be lost.

A writer (no writer URL) and a follower (``DISPATCHER_API_WRITER_URL`` = the
writer) on the real broker. Each race sends two changes at the same moment, one to
each process, several times, and checks what is in force afterwards, as every
reader (the other replica, the dispatcher's table) sees it.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from confluent_kafka import KafkaException

from dispatcher.commands.subscriptions import get as get_subscription
from dispatcher.commands.subscriptions import list_all
from dispatcher.config_state import ConfigView
from dispatcher.config_writer import ConfigWriter
from dispatcher.errors import SubscriptionError
from dispatcher.kafka import make_producer_from, writer_producer_config
from tests.api_support import ORG, ApiProcess
from tests.brokers import PrivateBroker
from tests.cli_support import run_subprocess
from tests.receiver import HttpsReceiver
from tests.support import Namespace, wait_until

HOOKS = f"/v1/organizations/{ORG}/webhooks"
ROUNDS = 4


@pytest.fixture
def pair(ns: Namespace, run_api: Callable[..., ApiProcess]) -> tuple[ApiProcess, ApiProcess]:
    writer = run_api(ns)
    follower = run_api(ns, same_keys_as=writer, api_writer_url=writer.url)
    with follower.admin() as http:  # through the follower: forwarded
        assert http.put(f"/v1/organizations/{ORG}/plan", json={"plan": "scale"}).status_code == 200
    return writer, follower


def at_once(*calls: Callable[[], Any]) -> list[Any]:
    """Run the calls in threads released together; their answers in call order."""
    barrier = threading.Barrier(len(calls))
    answers: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        answers[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return answers


def settled(http: httpx.Client, path: str, status: int, version: int = 0) -> httpx.Response:
    """The replica's answer once it has read up to the change expected.

    A replica answers reads from what it has read so far: it sees its own changes
    at once (it waits to read them back), another replica's a few milliseconds
    later. Anything else within the deadline is a failure.
    """

    def shown() -> httpx.Response | None:
        got = http.get(path)
        if got.status_code != status:
            return None
        if version and got.json()["version"] < version:
            return None
        return got

    return wait_until(shown, 10, f"{path} to answer {status} at version {version} or later")


def create(api: ApiProcess, receiver: HttpsReceiver, **fields: Any) -> dict[str, Any]:
    with api.admin() as http:
        made = http.post(HOOKS, json={"url": receiver.url("/hook"), **fields})
    assert made.status_code == 201, made.text
    return dict(made.json())


def test_delete_racing_patch_stays_deleted(
    ns: Namespace, pair: tuple[ApiProcess, ApiProcess], receiver: HttpsReceiver
) -> None:
    writer, follower = pair
    w, f = writer.admin(), follower.admin()
    for _ in range(ROUNDS):
        hook = create(writer, receiver)
        one = f"{HOOKS}/{hook['id']}"
        deleted, patched = at_once(
            lambda one=one: w.delete(one),
            lambda one=one: f.patch(one, json={"description": "racing"}),
        )
        assert deleted.status_code == 204, deleted.text
        assert patched.status_code in (200, 404), patched.text  # before, or after the delete
        assert w.get(one).status_code == 404  # the writer answered the delete: gone
        settled(f, one, 404)
        assert w.get(one).status_code == 404  # and it stays gone
        with pytest.raises(SubscriptionError):  # the dispatcher's table agrees
            get_subscription(ns.settings, hook["id"])
    assert f.get(HOOKS).json() == {"data": [], "next_cursor": None}


def test_rotate_racing_rotate_leaves_the_last_answered_secret(
    ns: Namespace, pair: tuple[ApiProcess, ApiProcess], receiver: HttpsReceiver
) -> None:
    writer, follower = pair
    w, f = writer.admin(), follower.admin()
    for _ in range(ROUNDS):
        hook = create(writer, receiver)
        one = f"{HOOKS}/{hook['id']}/rotate-secret"
        a, b = at_once(lambda one=one: w.post(one), lambda one=one: f.post(one))
        assert a.status_code == b.status_code == 200, (a.text, b.text)
        # Applied one after the other: two versions, and the later one's secret signs.
        versions = sorted([a.json()["version"], b.json()["version"]])
        assert versions == [2, 3]
        last = max((a, b), key=lambda r: int(r.json()["version"]))
        first = min((a, b), key=lambda r: int(r.json()["version"]))
        sub = get_subscription(ns.settings, hook["id"])
        assert sub.secret == last.json()["secret"]
        # The earlier answer's secret still signs for the grace period: nobody holds a
        # secret that never signs.
        assert first.json()["secret"] in sub.active_secrets(sub.updated_at)
        assert last.headers["etag"] == '"3"'


def test_patch_racing_rotate_keeps_both(
    ns: Namespace, pair: tuple[ApiProcess, ApiProcess], receiver: HttpsReceiver
) -> None:
    writer, follower = pair
    w, f = writer.admin(), follower.admin()
    for n in range(ROUNDS):
        hook = create(writer, receiver)
        one = f"{HOOKS}/{hook['id']}"
        new_url = receiver.url(f"/moved{n}")
        patched, rotated = at_once(
            lambda one=one, new_url=new_url: f.patch(one, json={"url": new_url}),
            lambda one=one: w.post(f"{one}/rotate-secret"),
        )
        assert patched.status_code == rotated.status_code == 200
        sub = get_subscription(ns.settings, hook["id"])
        assert sub.url == new_url  # the PATCH stands
        assert sub.secret == rotated.json()["secret"]  # and so does the rotation
        assert sub.version == 3


def test_disable_racing_patch_stays_disabled(
    ns: Namespace, pair: tuple[ApiProcess, ApiProcess], receiver: HttpsReceiver
) -> None:
    writer, follower = pair
    w, f = writer.admin(), follower.admin()
    for n in range(ROUNDS):
        hook = create(writer, receiver)
        one = f"{HOOKS}/{hook['id']}"
        disabled, patched = at_once(
            lambda one=one: w.post(f"{one}/disable"),
            lambda one=one, n=n: f.patch(one, json={"description": f"note {n}"}),
        )
        assert disabled.status_code == patched.status_code == 200
        for http in (w, f):
            shown = settled(http, one, 200, version=3).json()
            assert shown["enabled"] is False and shown["description"] == f"note {n}"
            assert shown["version"] == 3
        assert get_subscription(ns.settings, hook["id"]).enabled is False


def test_one_idempotency_key_on_two_replicas_at_once(
    ns: Namespace, pair: tuple[ApiProcess, ApiProcess], receiver: HttpsReceiver
) -> None:
    writer, follower = pair
    w, f = writer.admin(), follower.admin()
    body = {"url": receiver.url("/hook")}
    for n in range(ROUNDS):
        key = {"Idempotency-Key": f"create-{n}"}
        a, b = at_once(
            lambda key=key: w.post(HOOKS, json=body, headers=key),
            lambda key=key: f.post(HOOKS, json=body, headers=key),
        )
        assert a.status_code == b.status_code == 201, (a.text, b.text)
        assert a.json() == b.json()  # same id, same secret
        assert {a.headers.get("idempotent-replayed"), b.headers.get("idempotent-replayed")} == {
            None,
            "true",
        }
        assert get_subscription(ns.settings, a.json()["id"]).secret == a.json()["secret"]
        other = f.post(HOOKS, json={"url": receiver.url("/other")}, headers=key)
        assert other.status_code == 422  # another body with the key, on any replica
    assert len(list_all(ns.settings, ORG)) == ROUNDS


def test_if_match_refuses_a_stale_change_on_every_replica(
    pair: tuple[ApiProcess, ApiProcess], receiver: HttpsReceiver
) -> None:
    writer, follower = pair
    w, f = writer.admin(), follower.admin()
    hook = create(follower, receiver)
    one = f"{HOOKS}/{hook['id']}"
    got = f.get(one)
    etag = got.headers["etag"]
    assert etag == '"1"' and got.json()["version"] == 1
    changed = f.patch(one, json={"description": "first"}, headers={"If-Match": etag})
    assert changed.status_code == 200 and changed.headers["etag"] == '"2"'
    for http in (w, f):
        for method, path, payload in (
            ("PATCH", one, {"description": "stale"}),
            ("POST", f"{one}/rotate-secret", None),
            ("POST", f"{one}/disable", None),
            ("POST", f"{one}/enable", None),
            ("DELETE", one, None),
        ):
            stale = http.request(method, path, json=payload, headers={"If-Match": etag})
            assert stale.status_code == 412, (method, path, stale.text)
            assert stale.json()["type"].endswith("/precondition-failed")
    assert f.get(one).json()["description"] == "first"  # none of them applied
    assert w.get(one).headers["etag"] == '"2"'
    listed = f.post(f"{one}/disable", headers={"If-Match": 'W/"1", "2"'})
    assert listed.status_code == 200 and listed.json()["enabled"] is False
    assert f.delete(one, headers={"If-Match": "*"}).status_code == 204
    assert w.patch(one, json={"description": "x"}, headers={"If-Match": "*"}).status_code == 404
    # The replica counts what it forwarded under one route label; the writer by route.
    metrics = httpx.get(f"http://127.0.0.1:{follower.probe_port}/metrics", timeout=5).text
    forwarded = [
        line
        for line in metrics.splitlines()
        if line.startswith("dispatcher_api_requests_total{") and 'route="forwarded"' in line
    ]
    assert any('status="412"' in line for line in forwarded), forwarded


def test_a_new_writer_fences_the_old_one(ns: Namespace) -> None:
    """Kafka refuses the commit of a writer whose role was taken: nothing of it is seen."""
    view = ConfigView(ns.settings)
    view.start()
    try:
        old = make_producer_from(writer_producer_config(ns.settings))
        old.init_transactions(30)
        old.begin_transaction()
        old.produce(ns.settings.organizations_topic, b"{}", b"org_fenced")
        assert old.flush(30) == 0
        new = ConfigWriter(ns.settings, view)
        new.take_role()  # init_transactions: aborts the open transaction, fences `old`
        with pytest.raises(KafkaException) as refused:
            old.commit_transaction(30)
        assert refused.value.args[0].fatal()
        new.close()
        assert view.wait_until_end(time.monotonic() + 30)
        assert "org_fenced" not in view.plans
        records = ns.read_all(ns.settings.organizations_topic)
        assert [r.key() for r in records] == []  # aborted: invisible to read_committed
    finally:
        view.stop()


def test_writer_killed_while_a_second_takes_over(
    ns: Namespace, run_api: Callable[..., ApiProcess], receiver: HttpsReceiver
) -> None:
    """kill -9 of the writer with creates in flight: a new writer takes over; every keyed
    create exists exactly once, and a retry anywhere returns what the first answer said."""
    first = run_api(ns)
    with first.admin() as http:
        assert http.put(f"/v1/organizations/{ORG}/plan", json={"plan": "scale"}).status_code == 200
    answered: dict[str, dict[str, Any]] = {}
    stop = threading.Event()

    def keep_creating() -> None:
        with httpx.Client(
            base_url=first.url,
            headers={"Authorization": f"Bearer {first.admin_key}"},
            timeout=10,
        ) as http:
            n = 0
            while not stop.is_set():
                key = f"k{n}"
                try:
                    made = http.post(
                        HOOKS, json={"url": receiver.url("/hook")}, headers={"Idempotency-Key": key}
                    )
                except httpx.HTTPError:
                    answered.setdefault(key, {})  # sent, no answer: outcome unknown
                    return
                if made.status_code == 201:
                    answered[key] = made.json()
                n += 1

    creator = threading.Thread(target=keep_creating)
    creator.start()
    wait_until(lambda: len(answered) >= 5, 60, "creates through the first writer")
    first.kill()
    stop.set()
    creator.join(30)
    second = run_api(ns, same_keys_as=first)  # takes the role: fences whatever was left
    with second.admin() as http:
        for key, body in answered.items():
            retry = http.post(
                HOOKS, json={"url": receiver.url("/hook")}, headers={"Idempotency-Key": key}
            )
            assert retry.status_code == 201, retry.text
            if body:  # answered before the kill: replayed exactly, secret included
                assert retry.json() == body
            else:  # unknown outcome: now known, and made once
                answered[key] = retry.json()
        hooks = http.get(HOOKS).json()["data"]
    ids = [h["id"] for h in hooks]
    assert len(ids) == len(set(ids)) == len(answered)  # none lost, none doubled
    assert set(ids) == {b["id"] for b in answered.values()}
    for body in answered.values():
        assert get_subscription(ns.settings, body["id"]).secret == body["secret"]


def test_plan_downgrade_racing_a_create(
    ns: Namespace, pair: tuple[ApiProcess, ApiProcess], receiver: HttpsReceiver
) -> None:
    """A create is checked against the plan in force when it is applied: after a downgrade
    no webhook of the organization is left on an entitled plan."""
    writer, follower = pair
    w, f = writer.admin(), follower.admin()
    plan = f"/v1/organizations/{ORG}/plan"
    for _ in range(ROUNDS):
        made, down = at_once(
            lambda: f.post(HOOKS, json={"url": receiver.url("/hook")}),
            lambda: w.put(plan, json={"plan": "growth"}),
        )
        assert down.status_code == 200
        assert made.status_code in (201, 409), made.text  # before the downgrade, or refused
        if made.status_code == 409:
            assert made.json()["type"].endswith("/plan-not-entitled")
        assert {s.plan for s in list_all(ns.settings, ORG)} <= {"growth"}
        assert w.put(plan, json={"plan": "scale"}).status_code == 200


def test_a_replica_without_its_writer_answers_503_and_applies_nothing(
    ns: Namespace, pair: tuple[ApiProcess, ApiProcess], receiver: HttpsReceiver
) -> None:
    writer, follower = pair
    hook = create(follower, receiver)
    writer.stop()
    with follower.admin() as f:
        refused = f.patch(f"{HOOKS}/{hook['id']}", json={"description": "lost?"})
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"]
        assert refused.json()["type"].endswith("/writer-unreachable")
        assert f.get(f"{HOOKS}/{hook['id']}").json()["description"] is None  # reads go on
    writer.start()  # back: the change was never applied, and changes work again
    with follower.admin() as f:
        assert f.get(f"{HOOKS}/{hook['id']}").json()["description"] is None
        assert f.patch(f"{HOOKS}/{hook['id']}", json={"description": "now"}).status_code == 200
    assert get_subscription(ns.settings, hook["id"]).description == "now"


def test_changes_with_the_broker_down_are_not_applied_later(
    private_broker: PrivateBroker, run_api: Callable[..., ApiProcess], receiver: HttpsReceiver
) -> None:
    """A 503 'unavailable' never takes effect when Kafka returns; an 'outcome-unknown'
    create is settled by retrying it with the same Idempotency-Key."""
    ns = Namespace(kafka_bootstrap_servers=private_broker.bootstrap)
    try:
        api = run_api(ns, api_write_timeout_s=4)
        http = api.admin()
        assert http.put(f"/v1/organizations/{ORG}/plan", json={"plan": "scale"}).status_code == 200
        kept = create(api, receiver)
        private_broker.stop()

        made = http.post(
            HOOKS, json={"url": receiver.url("/ghost")}, headers={"Idempotency-Key": "ghost"}
        )
        deleted = http.delete(f"{HOOKS}/{kept['id']}")
        for answer in (made, deleted):
            assert answer.status_code == 503, answer.text
            assert answer.headers["retry-after"]
            assert answer.json()["type"].rsplit("/", 1)[1] in ("unavailable", "outcome-unknown")

        private_broker.start()
        # A change after the broker is back: the writer has taken the role again (its
        # init_transactions settled whatever was left open) and read to the end.
        wait_until(
            lambda: (
                http.put(f"/v1/organizations/{ORG}/plan", json={"plan": "enterprise"}).status_code
                == 200
            ),
            60,
            "a change to succeed once Kafka is back",
        )
        listed = {h["id"] for h in http.get(HOOKS).json()["data"]}
        if deleted.json()["type"].endswith("/unavailable"):
            assert kept["id"] in listed  # the refused delete never happened
        # A client retries a 503 with the same key, as the answer says, until it has the
        # real outcome: a broker just back may still refuse one more change in time.
        answers: list[httpx.Response] = []

        def retried() -> bool:
            answers.append(
                http.post(
                    HOOKS,
                    json={"url": receiver.url("/ghost")},
                    headers={"Idempotency-Key": "ghost"},
                )
            )
            return answers[-1].status_code != 503

        wait_until(retried, 60, "a retried create to get past 503", interval_s=1.0)
        retry = answers[-1]
        assert retry.status_code == 201, retry.text  # the real outcome: made once, with its secret
        ghost = retry.json()
        refused = [made, *answers[:-1]]
        if all(a.json()["type"].endswith("/unavailable") for a in refused):
            assert ghost["id"] not in listed  # not applied before this retry
            assert retry.headers.get("idempotent-replayed") is None
        assert get_subscription(ns.settings, ghost["id"]).secret == ghost["secret"]
    finally:
        ns.drop_topics()


def test_a_cli_change_racing_an_api_change_loses_neither(
    ns: Namespace, pair: tuple[ApiProcess, ApiProcess], receiver: HttpsReceiver
) -> None:
    """The command line takes the writer role for its change (fencing the API's writer,
    which takes it back for its next one): both changes stand."""
    writer, follower = pair
    f = follower.admin()
    for n in range(2):
        hook = create(writer, receiver)
        one = f"{HOOKS}/{hook['id']}"
        disabled, patched = at_once(
            lambda webhook_id=hook["id"]: run_subprocess(
                ns, "subscriptions", "disable", webhook_id
            ),
            lambda one=one, n=n: f.patch(one, json={"description": f"{n}"}),
        )
        assert disabled.code == 0, disabled.err
        assert patched.status_code == 200, patched.text
        shown = settled(f, one, 200, version=3).json()
        assert shown["enabled"] is False and shown["description"] == f"{n}"
        assert shown["version"] == 3
    assert "writer role was taken" in writer.logs()  # it was fenced, and took the role back


def test_an_unanswered_create_is_outcome_unknown_and_a_retry_returns_the_outcome(
    ns: Namespace, run_api: Callable[..., ApiProcess], receiver: HttpsReceiver
) -> None:
    """The writer is frozen (SIGSTOP) after taking the request: the replica cannot know
    whether it was applied, says so, and the same Idempotency-Key later tells."""
    writer = run_api(ns)
    follower = run_api(ns, same_keys_as=writer, api_writer_url=writer.url, api_write_timeout_s=1)
    f = follower.admin()
    assert f.put(f"/v1/organizations/{ORG}/plan", json={"plan": "scale"}).status_code == 200
    key = {"Idempotency-Key": "frozen-writer"}
    body = {"url": receiver.url("/hook")}
    assert writer.proc is not None
    writer.proc.send_signal(signal.SIGSTOP)
    try:
        unknown = f.post(HOOKS, json=body, headers=key)
    finally:
        writer.proc.send_signal(signal.SIGCONT)
    assert unknown.status_code == 503, unknown.text
    assert unknown.json()["type"].endswith("/outcome-unknown")
    assert unknown.headers["retry-after"]
    # The writer, thawed, applied the create it had been sent; the retry returns it.
    again = f.post(HOOKS, json=body, headers=key)
    assert again.status_code == 201, again.text
    made = again.json()
    assert get_subscription(ns.settings, made["id"]).secret == made["secret"]
    assert [s.webhook_id for s in list_all(ns.settings, ORG)] == [made["id"]]
