"""What /readyz reads about the Kafka clients: librdkafka's statistics, kept in memory."""

from __future__ import annotations

import json
import time
import weakref
from typing import Any

import pytest

from dispatcher.core import links
from dispatcher.core.links import ClientLink, first_problem
from dispatcher.kafka import RECONNECT_BACKOFF_MAX_MS, consumer_config, producer_config
from dispatcher.settings import Settings


@pytest.fixture(autouse=True)
def own_links(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test compares only the clients it made."""
    monkeypatch.setattr(links, "_LINKS", weakref.WeakSet())


def stats(*broker_states: str, group: tuple[str, str] | None = None) -> str:
    """librdkafka's statistics JSON, reduced to what the link reads."""
    doc: dict[str, Any] = {
        "brokers": {
            f"127.0.0.1:9092/{i}": {"state": state, "nodeid": i}
            for i, state in enumerate(broker_states)
        }
    }
    if group is not None:
        doc["cgrp"] = {"state": group[0], "join_state": group[1]}
    return json.dumps(doc)


def test_a_connected_member_has_no_problem() -> None:
    link = ClientLink("stage input", "g")
    link.on_stats(stats("UP", group=("up", "steady")))
    assert link.problem() is None


def test_no_problem_before_the_first_report() -> None:
    assert ClientLink("the producer").problem() is None


def test_all_brokers_down_is_reported_with_the_time_it_began() -> None:
    link = ClientLink("the producer")
    link.on_stats(stats("UP"))
    link.on_stats(stats("CONNECT", "DOWN"))
    why = link.problem()
    assert why is not None
    assert why.startswith("broker unreachable since 20")
    assert "the producer" in why
    link.on_stats(stats("DOWN", "UP"))
    assert link.problem() is None


def test_all_brokers_down_as_an_error_before_the_statistics_say_so() -> None:
    link = ClientLink("stage input", "g")
    link.on_stats(stats("UP", group=("up", "steady")))
    link.broker_down()
    assert "broker unreachable" in (link.problem() or "")


def test_outside_the_group_only_after_a_rebalance_would_have_ended() -> None:
    link = ClientLink("stage input", "g.input")
    link.on_stats(stats("UP", group=("up", "wait-join")))
    start = time.monotonic()
    assert link.problem(start) is None  # a rebalance passes through this
    why = link.problem(start + links.NOT_MEMBER_AFTER_S + 1)
    assert why is not None
    assert "not a member of the group g.input since" in why
    assert "wait-join" in why
    link.on_stats(stats("UP", group=("up", "steady")))
    assert link.problem() is None


def test_a_client_that_stops_reporting_is_not_ready() -> None:
    link = ClientLink("stage 2s", "g.2s")
    link.on_stats(stats("UP", group=("up", "steady")))
    assert link.reported_at is not None
    why = link.problem(link.reported_at + links.SILENT_AFTER_S + 1)
    assert why is not None and "no report from its Kafka client" in why


def test_garbled_statistics_change_nothing() -> None:
    link = ClientLink("the producer")
    link.on_stats("{not json")
    assert link.reported_at is None


def test_first_problem_names_the_first_client_with_one() -> None:
    good, bad = ClientLink("stage input", "g"), ClientLink("the producer")
    good.on_stats(stats("UP", group=("up", "steady")))
    bad.on_stats(stats("DOWN"))
    assert first_problem([good]) is None
    assert "the producer" in (first_problem([good, bad]) or "")


@pytest.mark.parametrize(
    ("other", "outside", "expected"),
    [
        ("UP", True, True),  # the broker is back for the others, not for this one
        ("DOWN", True, False),  # the broker is away for everyone: nothing to fix
        ("UP", False, False),  # still a member: it keeps its partitions
    ],
)
def test_cut_off_while_the_others_reach_the_broker(
    other: str, outside: bool, expected: bool
) -> None:
    this, peer = ClientLink("stage input", "g"), ClientLink("the producer")
    this.on_stats(
        stats("DOWN", group=("wait-coord" if outside else "up", "init" if outside else "steady"))
    )
    peer.on_stats(stats(other))
    later = time.monotonic() + 5
    assert this.cut_off(later, 4) is expected
    assert not this.cut_off(time.monotonic(), 4)  # not for a moment's difference


def test_every_client_reports_its_statistics_and_reconnects_within_a_second() -> None:
    link = ClientLink("the producer")
    for conf in (producer_config(Settings()), consumer_config(Settings(), "g")):
        assert conf["reconnect.backoff.max.ms"] == RECONNECT_BACKOFF_MAX_MS == 1000
    assert link.config()["statistics.interval.ms"] == links.STATS_INTERVAL_MS
    assert link.config()["stats_cb"] == link.on_stats


def test_records_nobody_waits_for_are_batched_unless_the_operator_set_linger() -> None:
    from dispatcher.core.producer import QUIET_LINGER_MS, quiet_producer_config

    conf = quiet_producer_config(Settings())
    assert conf["linger.ms"] == QUIET_LINGER_MS > producer_config(Settings())["linger.ms"]
    assert conf["delivery.report.only.error"] is True
    assert conf["enable.idempotence"] is True and conf["acks"] == "all"
    tuned = Settings(kafka_extra_config={"linger.ms": "7"})
    assert quiet_producer_config(tuned)["linger.ms"] == "7"
