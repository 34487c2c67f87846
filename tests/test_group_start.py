"""``dispatcher group start-at-end``: a new group may skip the backlog, never by default."""

from __future__ import annotations

from typing import Any

from tests.cli_support import Cli
from tests.receiver import HttpsReceiver
from tests.streams import committed_events, publish_spread, session_of, stream
from tests.support import Namespace, wait_until


def test_refused_without_yes_and_nothing_committed(cli: Cli, ns: Namespace) -> None:
    publish_spread(ns, stream("old", 0, 5))
    result = cli(ns, "group", "start-at-end")
    result.assert_one_line_error(2, "refused without --yes", "5 retained record(s)")
    rows = [line.split() for line in result.out.splitlines()[1:]]
    assert rows[0] == [ns.settings.group_id, ns.settings.input_topic, "3", "5"]
    assert len(rows) == 1 + len(ns.settings.retry_delays_s)
    assert committed_events(ns) == 0
    # Still a new group: asking again gives the same answer.
    cli(ns, "group", "start-at-end").assert_one_line_error(2, "refused without --yes")


def test_new_group_delivers_only_what_is_published_after(
    cli: Cli, ns: Namespace, receiver: HttpsReceiver, run_dispatcher: Any
) -> None:
    ns.subscribe(receiver.url("/fresh"))
    old = stream("old", 0, 6)
    publish_spread(ns, old)

    started = cli(ns, "group", "start-at-end", "--yes", "--json").json()
    assert started["committed"] is True
    by_topic = {g["topic"]: g for g in started["groups"]}
    assert by_topic[ns.settings.input_topic]["skipped"] == 6
    assert by_topic[ns.settings.input_topic]["group"] == ns.settings.group_id
    assert committed_events(ns) == 6

    run_dispatcher(ns)
    new = stream("new", 0, 3)
    publish_spread(ns, new)
    # Offsets move past a message only once its deliveries are finished, so once
    # they reach the end, any old event the group had read would have been sent.
    wait_until(lambda: committed_events(ns) == 9, 60, "the group to commit past the new events")
    assert {session_of(r) for r in receiver.requests} == {e["session_id"] for e in new}


def test_refused_for_a_group_that_has_offsets(cli: Cli, ns: Namespace) -> None:
    assert cli(ns, "group", "start-at-end", "--yes").code == 0
    again = cli(ns, "group", "start-at-end", "--yes")
    again.assert_one_line_error(2, "already has committed offsets", ns.settings.group_id)


def test_missing_topic_is_one_line_exit_1(cli: Cli, shared_ns: Namespace) -> None:
    result = cli(shared_ns, "group", "start-at-end", input_topic="no.such.topic.here")
    result.assert_one_line_error(1, "no.such.topic.here does not exist")
