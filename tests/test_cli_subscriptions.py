"""``dispatcher subscriptions ...`` against the real broker: every command, every refusal."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from dispatcher.commands.subscriptions import get as get_subscription
from dispatcher.commands.subscriptions import write
from tests.cli_support import PUT_URL, Cli, put_args, run_subprocess
from tests.receiver import HttpsReceiver
from tests.support import Namespace, wait_until

URL = PUT_URL


# --- refusals ------------------------------------------------------------------

SECRET_TEXT = "whsec_abc!defghijklmnop"

INVALID_PUTS: list[tuple[str, list[str], dict[str, Any], str]] = [
    ("no organization", put_args(organization=None), {}, "--organization"),
    ("empty organization", put_args(organization=""), {}, "--organization"),
    ("organization too long", put_args(organization="o" * 129), {}, "organization_id"),
    ("no url", put_args(url=None), {}, "--url"),
    ("no plan", put_args(plan=None), {}, "--plan"),
    ("plain http", put_args(url="http://127.0.0.1:8443/x"), {}, "https://"),
    ("not a url", put_args(url="hooks.example.com/x"), {}, "url"),
    ("no host", put_args(url="https:///x"), {}, "no host"),
    ("credentials", put_args(url="https://user:pw@127.0.0.1/x"), {}, "credentials"),
    ("loopback", put_args(), {"allowed_networks": []}, "loopback"),
    ("private", put_args(url="https://10.1.2.3/x"), {"allowed_networks": []}, "private"),
    ("metadata", put_args(url="https://169.254.169.254/x"), {}, "metadata"),
    ("ipv6 loopback", put_args(url="https://[::1]:8443/x"), {"allowed_networks": []}, "loopback"),
    ("event name", [*put_args(), "--event", "Visitor Identified"], {}, "events"),
    ("unknown event", [*put_args(), "--event", "visitor.identifed"], {}, "unknown event"),
    ("short secret", [*put_args(), "--secret", "short"], {}, "secret"),
    ("secret not base64", [*put_args(), "--secret", SECRET_TEXT], {}, "base64"),
    ("secret bad length", [*put_args(), "--secret", "whsec_abcdefghi"], {}, "length"),
    ("secret url-safe", [*put_args(), "--secret", "whsec_ab-_cdefgh"], {}, "base64"),
    ("secret spaces", [*put_args(), "--secret", " a-long-secret "], {}, "spaces"),
    ("secret under 24", [*put_args(), "--secret", "twenty-three-characters"], {}, "at least 24"),
    ("growth plan", put_args(plan="Growth"), {}, "does not include webhooks"),
    ("starter plan", put_args(plan="starter"), {}, "does not include webhooks"),
    ("free trial plan", put_args(plan="Free Trial"), {}, "does not include webhooks"),
    ("unknown plan", put_args(plan="platinum"), {}, "does not include webhooks"),
    ("bad webhook id", [*put_args(), "--id", "no spaces allowed"], {}, "webhook_id"),
    ("two secrets", [*put_args(), "--secret", "a-long-secret", "--no-secret"], {}, "not allowed"),
    ("unknown option", [*put_args(), "--colour", "red"], {}, "unrecognized"),
    ("zero rate limit", [*put_args(), "--rate-limit", "0"], {}, "rate_limit_per_s"),
    ("negative rate limit", [*put_args(), "--rate-limit", "-5"], {}, "rate_limit_per_s"),
    ("rate limit not a number", [*put_args(), "--rate-limit", "five"], {}, "invalid float"),
    ("rate limit nan", [*put_args(), "--rate-limit", "nan"], {}, "rate_limit_per_s"),
    ("rate limit too high", [*put_args(), "--rate-limit", "1e6"], {}, "rate_limit_per_s"),
    (
        "rate limit set and removed",
        [*put_args(), "--rate-limit", "5", "--no-rate-limit"],
        {},
        "not allowed",
    ),
]


@pytest.mark.parametrize(
    ("argv", "settings", "needle"),
    [case[1:] for case in INVALID_PUTS],
    ids=[case[0] for case in INVALID_PUTS],
)
def test_put_refuses_invalid_input_with_one_line(
    cli: Cli, shared_ns: Namespace, argv: list[str], settings: dict[str, Any], needle: str
) -> None:
    result = cli(shared_ns, *argv, **settings)
    result.assert_one_line_error(2, needle)
    assert result.out == ""
    assert SECRET_TEXT not in result.err  # a refused secret is never echoed


@pytest.mark.parametrize(
    "argv",
    [
        ["subscriptions", "get", "wh_nope"],
        ["subscriptions", "delete", "wh_nope"],
        ["subscriptions", "enable", "wh_nope"],
        ["subscriptions", "disable", "wh_nope"],
        ["subscriptions", "rotate-secret", "wh_nope"],
        ["send-test", "wh_nope"],
    ],
    ids=lambda argv: argv[-2],
)
def test_unknown_webhook_id_is_one_line_exit_2(
    cli: Cli, shared_ns: Namespace, argv: list[str]
) -> None:
    cli(shared_ns, *argv).assert_one_line_error(2, "no subscription with webhook id 'wh_nope'")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["subscriptions"], "choose an action"),
        (["subscriptions", "get"], "required: WEBHOOK_ID"),
        (["subscriptions", "list", "--bogus"], "unrecognized arguments: --bogus"),
    ],
    ids=["no action", "missing id", "unknown option"],
)
def test_usage_errors_are_one_line(
    cli: Cli, shared_ns: Namespace, argv: list[str], needle: str
) -> None:
    cli(shared_ns, *argv).assert_one_line_error(2, needle)


def test_missing_topic_is_one_line_exit_1(cli: Cli, shared_ns: Namespace) -> None:
    result = cli(shared_ns, "subscriptions", "list", subscriptions_topic="no.such.topic.here")
    result.assert_one_line_error(1, "no.such.topic.here does not exist")


# --- the commands at work ------------------------------------------------------


def test_lifecycle_through_real_processes(ns: Namespace) -> None:
    created = run_subprocess(ns, *put_args(), "--json")
    assert created.code == 0, created.err
    view = created.json()
    webhook_id, secret = view["webhook_id"], view["new_secret"]
    # Generated: whsec_ and the standard base64 of 32 random bytes, shown this once.
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret[6:], validate=True)) == 32
    assert view["secret"] == "set"
    assert get_subscription(ns.settings, webhook_id).secret == secret

    shown = run_subprocess(ns, "subscriptions", "get", webhook_id)
    assert shown.code == 0 and webhook_id in shown.out and "org_1" in shown.out
    listed = run_subprocess(ns, "subscriptions", "list")
    assert listed.code == 0 and webhook_id in listed.out and "1 subscription(s)" in listed.out
    for output in (shown, listed):
        assert secret not in output.out + output.err
        assert secret[6:20] not in output.out

    disabled = run_subprocess(ns, "subscriptions", "disable", webhook_id, "--json")
    assert disabled.code == 0 and disabled.json()["enabled"] is False
    deleted = run_subprocess(ns, "subscriptions", "delete", webhook_id)
    assert deleted.code == 0 and f"deleted {webhook_id}" in deleted.out
    gone = run_subprocess(ns, "subscriptions", "get", webhook_id)
    gone.assert_one_line_error(2, "no subscription")


def test_every_command_in_process(cli: Cli, ns: Namespace) -> None:
    typed = "my-own-secret-value-of-28-chars"
    first = cli(ns, *put_args(), "--secret", typed, "--json")
    assert first.code == 0, first.err
    webhook_id = first.json()["webhook_id"]
    assert "new_secret" not in first.json() and typed not in first.out  # typed: never echoed
    other = cli(ns, *put_args(organization="org_2", url=URL + "/2"), "--no-secret", "--json")
    assert other.code == 0 and other.json()["secret"] == "none"

    # An update changes the given fields only.
    before = get_subscription(ns.settings, webhook_id)
    updated = cli(ns, "subscriptions", "put", "--id", webhook_id, "--url", URL + "/v2", "--json")
    assert updated.code == 0, updated.err
    after = get_subscription(ns.settings, webhook_id)
    assert after.url == URL + "/v2"
    assert (after.secret, after.created_at, after.plan) == (
        before.secret,
        before.created_at,
        "scale",
    )
    assert after.updated_at > before.updated_at

    only_org_1 = cli(ns, "subscriptions", "list", "--organization", "org_1", "--json").json()
    assert [s["webhook_id"] for s in only_org_1] == [webhook_id]
    assert len(cli(ns, "subscriptions", "list", "--json").json()) == 2
    table = cli(ns, "subscriptions", "list").out.splitlines()
    assert table[0].split()[:3] == ["WEBHOOK", "ID", "ORGANIZATION"]

    assert cli(ns, "subscriptions", "disable", webhook_id, "--json").json()["enabled"] is False
    assert cli(ns, "subscriptions", "enable", webhook_id, "--json").json()["enabled"] is True

    rotated = cli(ns, "subscriptions", "rotate-secret", webhook_id, "--json")
    assert rotated.code == 0, rotated.err
    new_secret = rotated.json()["new_secret"]
    assert len(rotated.json()["previous_secrets_until"]) == 1
    sub = get_subscription(ns.settings, webhook_id)
    assert sub.secret == new_secret and [p.secret for p in sub.previous_secrets] == [typed]
    assert "rotating" in cli(ns, "subscriptions", "list").out
    again = cli(ns, "subscriptions", "get", webhook_id)
    assert new_secret not in again.out and typed not in again.out

    # The current secret cannot be rotated to itself, and is not echoed when refused.
    same = cli(ns, "subscriptions", "rotate-secret", webhook_id, "--secret", new_secret)
    same.assert_one_line_error(2, "must differ")
    assert new_secret not in same.err

    deleted = cli(ns, "subscriptions", "delete", webhook_id, "--json")
    assert deleted.json() == {"deleted": webhook_id}
    assert [s["webhook_id"] for s in cli(ns, "subscriptions", "list", "--json").json()] == [
        other.json()["webhook_id"]
    ]


def test_rate_limit_is_set_kept_by_other_changes_and_removed(cli: Cli, ns: Namespace) -> None:
    made = cli(ns, *put_args(), "--rate-limit", "5", "--json")
    assert made.code == 0, made.err
    webhook_id = made.json()["webhook_id"]
    assert made.json()["rate_limit_per_s"] == 5.0
    assert get_subscription(ns.settings, webhook_id).rate_limit_per_s == 5.0
    changed = cli(ns, "subscriptions", "put", "--id", webhook_id, "--url", URL + "/v2")
    assert changed.code == 0, changed.err
    assert get_subscription(ns.settings, webhook_id).rate_limit_per_s == 5.0
    shown = cli(ns, "subscriptions", "get", webhook_id)
    assert any(line.split() == ["rate_limit_per_s:", "5.0"] for line in shown.out.splitlines())
    half = cli(ns, "subscriptions", "put", "--id", webhook_id, "--rate-limit", "0.5", "--json")
    assert half.json()["rate_limit_per_s"] == 0.5
    removed = cli(ns, "subscriptions", "put", "--id", webhook_id, "--no-rate-limit", "--json")
    assert removed.code == 0, removed.err
    assert removed.json()["rate_limit_per_s"] is None
    assert get_subscription(ns.settings, webhook_id).rate_limit_per_s is None


def test_rotation_without_grace_drops_the_old_secret(cli: Cli, ns: Namespace) -> None:
    webhook_id = cli(ns, *put_args(), "--json").json()["webhook_id"]
    result = cli(ns, "subscriptions", "rotate-secret", webhook_id, secret_rotation_grace_s=0)
    assert result.code == 0, result.err
    assert "Store this secret now" in result.out
    sub = get_subscription(ns.settings, webhook_id)
    assert sub.previous_secrets == () and sub.secret is not None


def test_plain_http_only_when_allowed_and_loudly(cli: Cli, ns: Namespace) -> None:
    url = "http://127.0.0.1:8080/hook"
    cli(ns, *put_args(url=url)).assert_one_line_error(2, "DISPATCHER_ALLOW_HTTP")
    allowed = cli(ns, *put_args(url=url), "--json", allow_http=True)
    assert allowed.code == 0, allowed.err
    assert "dispatcher: warning:" in allowed.err and "plain HTTP" in allowed.err
    assert allowed.json()["url"] == url


def test_disable_works_for_a_downgraded_organization_but_enable_does_not(
    cli: Cli, ns: Namespace
) -> None:
    # Written directly, as if the organization had been downgraded since.
    sub = ns.subscribe(URL, plan="growth")
    disabled = cli(ns, "subscriptions", "disable", sub.webhook_id)
    assert disabled.code == 0, disabled.err
    assert get_subscription(ns.settings, sub.webhook_id).enabled is False
    cli(ns, "subscriptions", "enable", sub.webhook_id).assert_one_line_error(2, "growth")
    assert get_subscription(ns.settings, sub.webhook_id).enabled is False


def test_growth_plan_refused_by_put(cli: Cli, ns: Namespace, receiver: HttpsReceiver) -> None:
    # One written bypassing put is refused by the dispatcher itself, and counted:
    # test_engine_decisions.py checks that in-process.
    refused = cli(ns, *put_args(url=receiver.url("/growth"), plan="growth"))
    refused.assert_one_line_error(2, "does not include webhooks")
    assert cli(ns, "subscriptions", "list", "--json").json() == []


def test_stored_control_characters_are_never_printed_raw(cli: Cli, ns: Namespace) -> None:
    """A description written before control characters were refused (or by another
    writer) is shown escaped: it can neither move the cursor nor reorder a line."""
    sub = ns.subscribe(PUT_URL).model_copy(
        update={"description": "ok\x1b[2J\r\nfake: line \u202eexe.txt\x00", "version": 5}
    )
    write(ns.settings, sub.webhook_id, sub)
    wait_until(lambda: get_subscription(ns.settings, sub.webhook_id).version == 5, 10, "the record")
    for args in (("get", sub.webhook_id), ("get", sub.webhook_id, "--json"), ("list",)):
        shown = cli(ns, "subscriptions", *args)
        assert shown.code == 0, shown.err
        output = shown.out + shown.err
        assert not any(ch in output for ch in "\x1b\r\x00\u202e"), repr(output)
    plain = cli(ns, "subscriptions", "get", sub.webhook_id).out
    assert "ok\\x1b[2J\\r\\nfake: line \\u202eexe.txt\\x00" in plain
