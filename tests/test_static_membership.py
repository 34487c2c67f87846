"""Static group membership: a restarted instance takes its partitions straight back.

The time this saves is measured by ``scripts/rejoin.py``, not here; these tests
check the configuration and the behaviour it buys.
"""

from __future__ import annotations

from typing import Any

import pytest

from dispatcher.kafka import consumer_config, table_consumer_config
from dispatcher.settings import Settings
from tests.receiver import HttpsReceiver
from tests.streams import publish_spread, session_of, stream
from tests.support import wait_until

# Far longer than the restart below may take: a replacement that had to wait for
# its dead predecessor's session to expire could not be ready in time.
SESSION_TIMEOUT_S = 300


def test_no_instance_id_by_default() -> None:
    conf = consumer_config(Settings(), "g")
    assert "group.instance.id" not in conf
    assert conf["session.timeout.ms"] == 10_000


def test_instance_id_and_session_timeout_reach_every_group_consumer() -> None:
    settings = Settings(group_instance_id="dispatcher-7d9f-abcde", session_timeout_s=90)
    for group in ("g", "g.1m", "g.30m"):
        conf = consumer_config(settings, group)
        assert conf["group.instance.id"] == "dispatcher-7d9f-abcde"
        assert conf["session.timeout.ms"] == 90_000
    # The private table reader joins no shared group: it must stay dynamic.
    assert "group.instance.id" not in table_consumer_config(settings)


@pytest.mark.parametrize("value", ["", "  "])
def test_blank_instance_id_means_dynamic_membership(value: str) -> None:
    assert Settings(group_instance_id=value).group_instance_id is None


def test_replacement_after_kill_9_is_ready_before_the_old_session_expires(
    ns_factory: Any, receiver: HttpsReceiver, run_dispatcher: Any
) -> None:
    ns = ns_factory(
        group_instance_id="static-0",
        session_timeout_s=SESSION_TIMEOUT_S,
        kafka_consumer_extra_config={},
    )
    ns.subscribe(receiver.url("/static"))
    first = run_dispatcher(ns)
    first.kill()

    # Same settings, so the same group.instance.id: the broker hands the dead
    # member's partitions to it without waiting for the session to time out.
    second = run_dispatcher(ns, wait_ready=False)
    second.wait_ready(timeout_s=SESSION_TIMEOUT_S / 3)

    events = stream("static", 0, 3 * ns.settings.topic_partitions)
    publish_spread(ns, events)
    expected = {event["session_id"] for event in events}
    wait_until(
        lambda: expected <= {session_of(r) for r in receiver.requests},
        SESSION_TIMEOUT_S / 3,
        "every partition's events delivered by the replacement",
    )
