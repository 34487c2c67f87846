"""``dispatcher api`` over HTTP against the real broker: keys, errors, webhooks, plans."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import httpx

from dispatcher.outbound.signing import SECRET_PREFIX
from tests.api_support import ORG, ApiProcess
from tests.cli_support import Cli
from tests.receiver import HttpsReceiver, Reply
from tests.support import Namespace, namespace_settings, to_env, wait_until

PROBLEM = "application/problem+json"


def webhooks(api: ApiProcess, org: str = ORG) -> str:
    return f"/v1/organizations/{org}/webhooks"


def set_plan(api: ApiProcess, plan: str, org: str = ORG) -> None:
    with api.admin() as http:
        r = http.put(f"/v1/organizations/{org}/plan", json={"plan": plan})
        assert r.status_code == 200, r.text


def test_keys_health_and_problems(
    ns: Namespace, run_api: Callable[..., ApiProcess], receiver: HttpsReceiver
) -> None:
    api = run_api(ns)
    with api.client() as anon:
        assert anon.get("/healthz").status_code == 200
        doc = anon.get("/openapi.json").json()
        assert "/v1/organizations/{org}/webhooks" in doc["paths"]
        docs = anon.get("/docs")
        assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
        assert "/v1/organizations/{org}/webhooks</h3>" in docs.text
        assert "<script" not in docs.text  # self-contained: no Swagger UI from a CDN
        assert anon.get("/redoc").status_code == 404
        r = anon.get(webhooks(api))
        assert r.status_code == 401
        assert r.headers["content-type"] == PROBLEM
        assert r.headers["www-authenticate"] == "Bearer"
    with api.client("bsk_wrong") as wrong:
        r2 = wrong.get(webhooks(api))
        assert r2.status_code == 401
        assert r2.json()["detail"] == r.json()["detail"]  # nothing says what was wrong
    with api.viewer() as viewer:
        assert viewer.get(webhooks(api)).json() == {"data": [], "next_cursor": None}
        refused = viewer.post(webhooks(api), json={"url": receiver.url("/hook")})
        assert refused.status_code == 403
        assert refused.headers["content-type"] == PROBLEM

    with api.admin() as http:
        unset = http.post(webhooks(api), json={"url": receiver.url("/hook")})
        assert unset.status_code == 409 and unset.json()["type"].endswith("/plan-unset")
        bad_plan = http.put(f"/v1/organizations/{ORG}/plan", json={"plan": "platinum"})
        assert bad_plan.status_code == 422
        assert bad_plan.json()["errors"][0]["path"] == "body.plan"
        set_plan(api, "scale")

        cases = {
            "body.url": {"url": "https://10.1.2.3/hook"},
            "body.events": {"url": receiver.url("/hook"), "events": ["order.created"]},
            "body.secret": {"url": receiver.url("/hook"), "secret": "whsec_not base64!"},
            "body.extra": {"url": receiver.url("/hook"), "extra": 1},
        }
        for path, payload in cases.items():
            bad = http.post(webhooks(api), json=payload)
            assert bad.status_code == 422, (path, bad.text)
            assert bad.headers["content-type"] == PROBLEM
            assert path in [e["path"] for e in bad.json()["errors"]], bad.text
        short = http.post(webhooks(api), json={"url": receiver.url("/hook"), "secret": "s" * 23})
        assert short.status_code == 422 and "24" in short.json()["errors"][0]["message"]
        ftp = http.post(webhooks(api), json={"url": "ftp://example.com/x"})
        assert ftp.status_code == 422 and ftp.json()["errors"][0]["path"] == "body.url"
        malformed = http.post(
            webhooks(api), content=b"{not json", headers={"content-type": "application/json"}
        )
        assert malformed.status_code == 422 and malformed.headers["content-type"] == PROBLEM
        huge = http.post(webhooks(api), json={"url": receiver.url("/hook"), "x": "a" * 70_000})
        assert huge.status_code == 413 and huge.headers["content-type"] == PROBLEM
        chunked = http.post(
            webhooks(api),
            content=iter([b'{"url": "', b"a" * 40_000, b"b" * 40_000, b'"}']),
            headers={"content-type": "application/json"},
        )
        assert chunked.status_code == 413, chunked.text
        small_chunks = http.post(
            webhooks(api),
            content=iter([b'{"url": "ftp://x', b'.example.com"}']),
            headers={"content-type": "application/json"},
        )
        assert small_chunks.status_code == 422  # read whole, then validated as usual
        assert http.get(webhooks(api)).json() == {
            "data": [],
            "next_cursor": None,
        }  # nothing was written

    log_lines = [json.loads(line) for line in api.logs().splitlines() if line.startswith("{")]
    audit = [line for line in log_lines if line.get("logger") == "dispatcher.api.audit"]
    assert [(a["api_key"], a["action"]) for a in audit] == [("admin", "organization.plan=scale")]


def test_webhook_lifecycle(
    ns: Namespace, run_api: Callable[..., ApiProcess], receiver: HttpsReceiver, cli: Cli
) -> None:
    api = run_api(ns)
    set_plan(api, "scale")
    with api.admin() as http:
        made = http.post(
            webhooks(api), json={"url": receiver.url("/hook"), "description": "CRM sync"}
        )
        assert made.status_code == 201, made.text
        hook = made.json()
        secret = hook["secret"]
        assert secret.startswith(SECRET_PREFIX) and hook["secret_set"]
        one = f"{webhooks(api)}/{hook['id']}"

        # Read-your-writes: the next read already sees it, without the secret.
        got = http.get(one).json()
        assert got["description"] == "CRM sync" and got["secret"] is None
        assert secret not in http.get(webhooks(api)).text
        assert http.get(f"{webhooks(api, 'org_other')}/{hook['id']}").status_code == 404
        # One code path with the CLI: it reads what the API wrote, and the reverse.
        shown = cli(ns, "subscriptions", "get", hook["id"], "--json").json()
        assert shown["description"] == "CRM sync" and shown["secret"] == "set"
        changed = cli(ns, "subscriptions", "put", "--id", hook["id"], "--description", "by CLI")
        assert changed.code == 0, changed.err
        wait_until(lambda: http.get(one).json()["description"] == "by CLI", 10, "the CLI's change")

        patched = http.patch(one, json={"url": receiver.url("/hook2"), "description": ""})
        assert patched.status_code == 200
        assert patched.json()["url"] == receiver.url("/hook2")
        assert patched.json()["description"] is None
        assert http.post(f"{one}/disable").json()["enabled"] is False
        assert http.get(one).json()["enabled"] is False
        assert http.post(f"{one}/enable").json()["enabled"] is True

        rotated = http.post(f"{one}/rotate-secret")
        assert rotated.status_code == 200
        new_secret = rotated.json()["secret"]
        assert new_secret.startswith(SECRET_PREFIX) and new_secret != secret
        assert len(rotated.json()["previous_secrets_until"]) == 1

        receiver.respond("/hook2", Reply(200, body=b"thanks"))
        tested = http.post(f"{one}/test")
        assert tested.status_code == 200, tested.text
        result = tested.json()
        assert result["ok"] and result["status_code"] == 200 and result["response"] == "thanks"
        sent = receiver.wait_for_requests(1, path="/hook2")[0]
        assert sent.header("x-bullseye-test") == "true"
        assert len(sent.header("webhook-signature").split()) == 2  # old and new secret

        # Downgrade: the webhook is kept but no longer entitled; upgrade resumes it.
        with api.client(api.admin_key) as same:
            down = same.put(f"/v1/organizations/{ORG}/plan", json={"plan": "growth"})
        assert down.json() == {
            "organization_id": ORG,
            "plan": "growth",
            "entitled": False,
            "webhooks_updated": 1,
        }
        assert http.get(one).json()["entitled"] is False
        assert http.post(f"{one}/enable").status_code == 409
        set_plan(api, "enterprise")
        assert http.get(one).json()["plan"] == "enterprise"

        assert http.delete(one).status_code == 204
        assert http.get(one).status_code == 404
        assert http.get(webhooks(api)).json() == {"data": [], "next_cursor": None}

    # The dispatcher's own table reads what the API wrote: one code path, one topic.
    records = ns.read_all(ns.settings.subscriptions_topic)
    assert records[-1].key().decode() == hook["id"] and records[-1].value() is None


def test_webhook_rate_limit_is_set_shown_changed_and_removed(
    ns: Namespace, run_api: Callable[..., ApiProcess], receiver: HttpsReceiver
) -> None:
    api = run_api(ns)
    set_plan(api, "scale")
    with api.admin() as http:
        plain = http.post(webhooks(api), json={"url": receiver.url("/plain")})
        assert plain.status_code == 201 and plain.json()["rate_limit_per_s"] is None
        made = http.post(webhooks(api), json={"url": receiver.url("/hook"), "rate_limit_per_s": 5})
        assert made.status_code == 201, made.text
        one = f"{webhooks(api)}/{made.json()['id']}"
        assert http.get(one).json()["rate_limit_per_s"] == 5
        # Another field changed: the limit stays.
        kept = http.patch(one, json={"description": "small server"})
        assert kept.json()["rate_limit_per_s"] == 5
        assert http.patch(one, json={"rate_limit_per_s": 2.5}).json()["rate_limit_per_s"] == 2.5
        for bad in (0, -1, "fast", 1e9, True):
            refused = http.patch(one, json={"rate_limit_per_s": bad})
            assert refused.status_code == 422, (bad, refused.text)
            assert refused.headers["content-type"].startswith(PROBLEM)
        assert http.get(one).json()["rate_limit_per_s"] == 2.5
        removed = http.patch(one, json={"rate_limit_per_s": None})
        assert removed.status_code == 200 and removed.json()["rate_limit_per_s"] is None
        listed = {w["id"]: w for w in http.get(webhooks(api)).json()["data"]}
        assert listed[made.json()["id"]]["rate_limit_per_s"] is None
        doc = http.get("/openapi.json").json()["components"]["schemas"]
        for model in ("WebhookCreate", "WebhookPatch", "Webhook"):
            assert "rate_limit_per_s" in doc[model]["properties"], model
    # The record the dispatcher reads carries it while set, and not at all once removed.
    values = [
        json.loads(r.value())
        for r in ns.read_all(ns.settings.subscriptions_topic)
        if r.key().decode() == made.json()["id"]
    ]
    assert [v.get("rate_limit_per_s") for v in values] == [5, 5, 2.5, None]
    assert "rate_limit_per_s" not in values[-1]


def test_list_pages_methods_allowed_and_descriptions(
    ns: Namespace, run_api: Callable[..., ApiProcess], receiver: HttpsReceiver, cli: Cli
) -> None:
    api = run_api(ns)
    set_plan(api, "scale")
    with api.client() as anon:
        anon.headers["Authorization"] = f"bearer {api.admin_key}"  # the scheme in any case
        made = [anon.post(webhooks(api), json={"url": receiver.url(f"/h{i}")}) for i in range(5)]
        assert all(m.status_code == 201 for m in made), [m.text for m in made]
        ids = [m.json()["id"] for m in made]

    with api.viewer() as http:
        seen: list[str] = []
        cursor: str | None = None
        pages = 0
        while True:
            params: dict[str, str | int] = {"limit": 2} | ({"cursor": cursor} if cursor else {})
            page = http.get(webhooks(api), params=params)
            assert page.status_code == 200, page.text
            seen += [h["id"] for h in page.json()["data"]]
            pages += 1
            cursor = page.json()["next_cursor"]
            if cursor is None:
                break
        assert pages == 3 and sorted(seen) == sorted(ids) and len(set(seen)) == 5
        whole = http.get(webhooks(api)).json()
        assert [h["id"] for h in whole["data"]] == seen and whole["next_cursor"] is None
        for bad in ("not a cursor", "AAAA", "x" * 300):
            refused = http.get(webhooks(api), params={"cursor": bad})
            assert refused.status_code == 422, (bad, refused.text)
            assert refused.json()["errors"][0]["path"] == "query.cursor"

        # 405 names every method the path serves, not only one of them.
        one = f"{webhooks(api)}/{ids[0]}"
        for path, allowed in (
            (one, {"GET", "PATCH", "DELETE"}),
            (webhooks(api), {"GET", "POST"}),
            (f"{one}/rotate-secret", {"POST"}),
        ):
            wrong = http.put(path, json={})
            assert wrong.status_code == 405, wrong.text
            assert wrong.headers["content-type"] == PROBLEM
            assert {m.strip() for m in wrong.headers["allow"].split(",")} == allowed

    with api.admin() as http:
        for text in ("a\x00b", "red \x1b[31m", "line\r\nInjected: 1", "abc\u202egnp.exe", "x\n"):
            for answer in (
                http.post(webhooks(api), json={"url": receiver.url("/d"), "description": text}),
                http.patch(one, json={"description": text}),
            ):
                assert answer.status_code == 422, (text, answer.text)
                assert answer.json()["errors"][0]["path"] == "body.description"
        kept = http.patch(one, json={"description": "Ünïcode and emoji 🚀 are fine"})
        assert kept.status_code == 200, kept.text
        # A secret already in force is a conflict with the state, not bad input.
        chosen = "c" * 30
        assert http.post(f"{one}/rotate-secret", json={"secret": chosen}).status_code == 200
        again = http.post(f"{one}/rotate-secret", json={"secret": chosen})
        assert again.status_code == 409 and again.json()["errors"][0]["path"] == "body.secret"

    # The command line refuses the same descriptions, and never prints one raw.
    refused_cli = cli(ns, "subscriptions", "put", "--id", ids[1], "--description", "a\x1b[2Jb")
    assert refused_cli.code != 0 and "\x1b" not in refused_cli.err + refused_cli.out
    assert "description" in refused_cli.err


def test_idempotency_key_creates_one_webhook(
    ns: Namespace, run_api: Callable[..., ApiProcess], receiver: HttpsReceiver
) -> None:
    api = run_api(ns)
    set_plan(api, "scale")
    body = {"url": receiver.url("/hook")}
    with api.admin() as http:
        first = http.post(webhooks(api), json=body, headers={"Idempotency-Key": "k-1"})
        again = http.post(webhooks(api), json=body, headers={"Idempotency-Key": "k-1"})
        assert first.status_code == again.status_code == 201
        assert again.headers["idempotent-replayed"] == "true"
        assert again.json() == first.json()  # the generated secret too
        other = http.post(
            webhooks(api), json={"url": receiver.url("/x")}, headers={"Idempotency-Key": "k-1"}
        )
        assert other.status_code == 422
        assert len(http.get(webhooks(api)).json()["data"]) == 1
    # Another process (a restart, another replica) replays the recorded answer exactly,
    # the generated secret included: it is kept in Kafka, not in the process.
    api.stop()
    api2 = run_api(ns)
    with api2.client(api.admin_key) as http:
        assert http.get(webhooks(api2)).status_code == 401  # its own keys only
    with api2.admin() as http:  # a key with the same name, "admin"
        replay = http.post(webhooks(api2), json=body, headers={"Idempotency-Key": "k-1"})
        assert replay.status_code == 201 and replay.headers["idempotent-replayed"] == "true"
        assert replay.json() == first.json()
        reused = http.post(
            webhooks(api2), json={"url": receiver.url("/x")}, headers={"Idempotency-Key": "k-1"}
        )
        assert reused.status_code == 422  # another body: refused after a restart too
        fresh = http.post(webhooks(api2), json=body, headers={"Idempotency-Key": "k-2"})
        assert fresh.status_code == 201
        assert len(http.get(webhooks(api2)).json()["data"]) == 2
        # A key whose webhook was deleted since says so, rather than replaying a 201.
        assert http.delete(f"{webhooks(api2)}/{first.json()['id']}").status_code == 204
        gone = http.post(webhooks(api2), json=body, headers={"Idempotency-Key": "k-1"})
        assert gone.status_code == 404 and "has been deleted" in gone.json()["detail"]
        assert len(http.get(webhooks(api2)).json()["data"]) == 1  # and nothing was made


def test_waits_for_its_topics_alive_and_not_ready(
    broker: str, run_api: Callable[..., ApiProcess], tmp_path: Path
) -> None:
    values = namespace_settings()

    class Unensured:
        """A namespace whose topics do not exist yet."""

        def env(self, **extra: object) -> dict[str, str]:
            base = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
            base.update(to_env({**values, **extra}))
            return base

    api = run_api(Unensured(), wait_ready=False)

    def not_ready_saying_why() -> str | None:
        status, why = api.readyz()
        assert status in (0, 503), (status, why)  # never ready without its topics
        return why if "does not exist" in why else None

    why = wait_until(not_ready_saying_why, 30, "/readyz to name the missing topic")
    assert "topics ensure" in why
    assert httpx.get(api.url + "/healthz", timeout=5).status_code == 200
    ns = Namespace(**values)  # ensures the topics
    try:
        api.wait_ready()
        with api.viewer() as http:
            assert http.get(webhooks(api)).json() == {"data": [], "next_cursor": None}
    finally:
        api.stop()
        ns.drop_topics()
