"""Operator input from the field report: each case is one line and exit 2 or 1, never a
traceback, never a credential echoed, never a success reported for a write that was lost.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from confluent_kafka import Producer

from tests.cli_support import Cli, Result, put_args, run_subprocess
from tests.hostile import subscription_record
from tests.receiver import HttpsReceiver
from tests.support import BOOTSTRAP, REPO, Namespace
from tests.test_cli_deadletter import dead_letter

UNREACHABLE = "127.0.0.1:1"  # loopback, nothing listens: connection refused at once
PASSWORD = "hunter2-very-secret"


def _no_client_lines(result: Result) -> None:
    """librdkafka's own lines look like ``%3|1700000000.123|FAIL|...``."""
    assert not [line for line in result.err.splitlines() if line.startswith("%")], result.err


# --- accepted means deliverable ----------------------------------------------------------

UNDELIVERABLE_URLS = {
    "port too high": "https://127.0.0.1:99999/x",
    "port not a number": "https://127.0.0.1:abc/x",
    "negative port": "https://127.0.0.1:-1/x",
    "port zero": "https://127.0.0.1:0/x",
    "control character": "https://127.0.0.1:8443/a\x01b",
    "not IDNA-valid": "https://☃_.example/hook",
}


@pytest.mark.parametrize("url", UNDELIVERABLE_URLS.values(), ids=list(UNDELIVERABLE_URLS))
def test_put_refuses_a_url_the_http_client_cannot_send_to(
    cli: Cli, shared_ns: Namespace, url: str
) -> None:
    result = cli(shared_ns, *put_args(url=url))
    result.assert_one_line_error(2, "url")
    assert result.out == ""


@pytest.mark.parametrize(
    "url", ["HTTPS://127.0.0.1:8443/hooks", " https://127.0.0.1:8443/hooks"], ids=["upper", "space"]
)
def test_put_stores_the_url_as_the_dispatcher_will_call_it(
    cli: Cli, ns: Namespace, url: str
) -> None:
    created = cli(ns, *put_args(url=url), "--json").json()
    assert created["url"] == "https://127.0.0.1:8443/hooks"
    shown = cli(ns, "subscriptions", "get", created["webhook_id"], "--json").json()
    assert shown["url"] == "https://127.0.0.1:8443/hooks"


def test_a_stored_undeliverable_subscription_is_explained_and_can_be_deleted(
    cli: Cli, ns: Namespace
) -> None:
    producer = Producer({"bootstrap.servers": BOOTSTRAP})
    record = subscription_record("wh_bad", "https://127.0.0.1:99999/x")
    producer.produce(ns.settings.subscriptions_topic, record, b"wh_bad")
    assert producer.flush(30) == 0
    cli(ns, "subscriptions", "get", "wh_bad").assert_one_line_error(2, "ignored", "Port")
    assert cli(ns, "subscriptions", "list", "--json").json() == []
    deleted = cli(ns, "subscriptions", "delete", "wh_bad")
    assert deleted.code == 0, deleted.err
    cli(ns, "subscriptions", "get", "wh_bad").assert_one_line_error(
        2, "no subscription with webhook id 'wh_bad'"
    )


def test_put_with_50000_event_flags_is_refused_at_once(cli: Cli, shared_ns: Namespace) -> None:
    argv = [*put_args(), *["--event", "visitor.identified"] * 50_000]
    cli(shared_ns, *argv).assert_one_line_error(2, "100008 command-line arguments")


def test_put_with_a_repeated_event_flag_stores_the_event_once(cli: Cli, ns: Namespace) -> None:
    argv = [*put_args(), *["--event", "visitor.identified"] * 100, "--json"]
    created = cli(ns, *argv).json()
    assert created["events"] == ["visitor.identified"]


# --- writes are confirmed ------------------------------------------------------------------


def test_put_to_a_missing_topic_fails_and_shows_no_secret(cli: Cli, shared_ns: Namespace) -> None:
    result = cli(shared_ns, *put_args(), subscriptions_topic=f"{shared_ns.values['group_id']}.gone")
    result.assert_one_line_error(1, "does not exist")
    assert result.out == ""
    assert "whsec_" not in result.err


def test_put_with_the_broker_unreachable_fails_in_one_line(shared_ns: Namespace) -> None:
    result = run_subprocess(shared_ns, *put_args(), kafka_bootstrap_servers=UNREACHABLE)
    result.assert_one_line_error(1, "cannot reach Kafka")
    assert result.out == ""
    _no_client_lines(result)


def test_client_log_lines_shown_with_verbose(shared_ns: Namespace) -> None:
    # Without --verbose there are none (the test above); with it, they are the
    # operator's to read.
    result = run_subprocess(
        shared_ns, "--verbose", "subscriptions", "list", kafka_bootstrap_servers=UNREACHABLE
    )
    assert result.code == 1
    assert any(line.startswith("%") for line in result.err.splitlines()), result.err
    assert result.err.splitlines()[-1].startswith("dispatcher: error: cannot reach Kafka")


def test_replay_to_a_missing_retry_topic_fails_and_marks_nothing(cli: Cli, ns: Namespace) -> None:
    ns.subscribe("https://127.0.0.1:9/a", webhook_id="wh_a", organization_id="org_1")
    letter = dead_letter(ns, "wh_a", "org_1", datetime(2025, 1, 1, tzinfo=UTC))
    missing = f"{ns.values['group_id']}.missing.retry."
    result = cli(ns, "dead-letter", "replay", "--all", retry_topic_prefix=missing)
    result.assert_one_line_error(1, "does not exist")
    # Nothing was replayed, so nothing is marked: the same replay can run again.
    listed = cli(ns, "dead-letter", "list", "--include-replayed", "--json").json()
    assert [(row["delivery_id"], row["replayed"]) for row in listed] == [
        (letter.delivery_id, False)
    ]


# --- settings and Kafka client properties ----------------------------------------------------

BAD_CLIENT_SETTINGS: dict[str, tuple[dict[str, Any], str]] = {
    "unknown property": ({"kafka_extra_config": {"no.such.property": "1"}}, "no.such.property"),
    "bogus security protocol": ({"kafka_security_protocol": "BOGUS"}, "security.protocol"),
    "missing CA file": (
        {"kafka_security_protocol": "SSL", "kafka_ssl_ca_location": "/nonexistent/ca.pem"},
        "/nonexistent/ca.pem does not exist",
    ),
    "CA file not PEM": (
        {"kafka_security_protocol": "SSL", "kafka_ssl_ca_location": str(REPO / "README.md")},
        "ssl.ca.location",
    ),
}


@pytest.mark.parametrize(
    ("extra", "needle"), BAD_CLIENT_SETTINGS.values(), ids=list(BAD_CLIENT_SETTINGS)
)
@pytest.mark.parametrize("argv", [["subscriptions", "list"], ["send-test", "wh_x"]])
def test_bad_kafka_client_setting_is_one_line(
    cli: Cli, shared_ns: Namespace, argv: list[str], extra: dict[str, Any], needle: str
) -> None:
    cli(shared_ns, *argv, **extra).assert_one_line_error(2, needle)


def _run_exit(ns: Namespace, **extra: Any) -> tuple[int, str]:
    """``dispatcher run`` that must stop at once; its exit code and last log line."""
    result = run_subprocess(ns, "run", timeout_s=60, **extra)
    output = result.out + result.err
    assert "Traceback" not in output, output
    return result.code, output.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("extra", "needle"), BAD_CLIENT_SETTINGS.values(), ids=list(BAD_CLIENT_SETTINGS)
)
def test_run_with_a_bad_kafka_client_setting_exits_2_with_one_line(
    shared_ns: Namespace, extra: dict[str, Any], needle: str
) -> None:
    code, last = _run_exit(shared_ns, **extra)
    assert code == 2
    assert needle in last, last


def test_bad_http_ca_file_is_one_line_for_send_test_and_run(
    cli: Cli, ns: Namespace, receiver: HttpsReceiver
) -> None:
    sub = ns.subscribe(receiver.url("/hook"))
    result = cli(ns, "send-test", sub.webhook_id, http_ca_file="/nonexistent/receiver-ca.pem")
    result.assert_one_line_error(2, "DISPATCHER_HTTP_CA_FILE", "No such file")
    assert receiver.requests == []
    code, last = _run_exit(ns, http_ca_file="/nonexistent/receiver-ca.pem")
    assert code == 2
    assert "DISPATCHER_HTTP_CA_FILE" in last, last


def test_malformed_extra_config_never_echoes_the_password(cli: Cli, shared_ns: Namespace) -> None:
    text = '{"sasl.mechanism": "PLAIN", "sasl.password": "' + PASSWORD + '",'
    result = cli(shared_ns, "subscriptions", "list", kafka_extra_config=text)
    result.assert_one_line_error(2, "DISPATCHER_KAFKA_EXTRA_CONFIG")
    assert PASSWORD not in result.err
    wrong_type = json.dumps({"sasl.password": [PASSWORD]})
    result = cli(shared_ns, "subscriptions", "list", kafka_extra_config=wrong_type)
    result.assert_one_line_error(2, "DISPATCHER_KAFKA_EXTRA_CONFIG")
    assert PASSWORD not in result.err


def test_deeply_nested_retry_delays_is_one_line(cli: Cli, shared_ns: Namespace) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    result = cli(shared_ns, "subscriptions", "list", retry_delays_s=deep)
    result.assert_one_line_error(2, "DISPATCHER_RETRY_DELAYS_S", "nested too deeply")
    assert len(result.err) < 500


def test_dead_letter_since_before_year_one_in_utc_is_one_line(
    cli: Cli, shared_ns: Namespace
) -> None:
    result = cli(shared_ns, "dead-letter", "list", "--since", "0001-01-01T00:00:00+01:00")
    result.assert_one_line_error(2, "--since", "out of range")
