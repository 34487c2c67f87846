"""``dispatcher group start-at-end``: start a new consumer group at the end of its topics.

A consumer group without committed offsets starts at the earliest retained
offset (``auto.offset.reset=earliest``: nothing is ever skipped by accident), so
a new ``DISPATCHER_GROUP_ID`` re-delivers every retained input event, up to the
input retention (7 days). Where that is not wanted, this command commits the
current end of the input topic and of every retry topic for the new group's
consumer groups before the dispatcher first runs with it. It refuses a group that
already has committed offsets, and does nothing without ``--yes``.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition

from dispatcher.catalog import Catalog
from dispatcher.commands.cli_common import (
    OneLineParser,
    missing_action,
    print_json,
    print_table,
)
from dispatcher.errors import ConfigError, KafkaSetupError
from dispatcher.kafka import common_config
from dispatcher.settings import Settings
from dispatcher.stages import retry_stages

TIMEOUT_S = 15.0


@dataclass(frozen=True, slots=True)
class GroupEnd:
    """Where one consumer group of the dispatcher would start."""

    group: str
    topic: str
    #: The end offset of each partition, in partition order: what is committed.
    end_offsets: tuple[int, ...]
    #: Retained records the group would never deliver.
    skipped: int


def add_commands(sub: Any) -> None:
    group = sub.add_parser("group", help="manage the dispatcher's consumer groups")
    group.set_defaults(handler=missing_action("group", ("start-at-end",)))
    gsub = group.add_subparsers(
        title="group commands", metavar="ACTION", parser_class=OneLineParser
    )
    start = gsub.add_parser(
        "start-at-end",
        help="start a new DISPATCHER_GROUP_ID at the end of its topics (skips the backlog)",
        description="Commit the current end of the input topic and of every retry topic "
        "for a new DISPATCHER_GROUP_ID's consumer groups, so the dispatcher delivers only "
        "events published from now on. Refused for a group that has committed offsets. "
        "Without --yes, shows what would be skipped and changes nothing.",
    )
    start.add_argument(
        "--yes", action="store_true", help="skip the retained events (they are never delivered)"
    )
    start.add_argument("--json", action="store_true", help="print JSON")
    start.set_defaults(handler=cmd_start_at_end)


def cmd_start_at_end(args: argparse.Namespace, settings: Settings) -> int:
    # The groups of the input stage and of each retry stage, as the engine names them.
    consumers = [(settings.group_id, topic) for topic in Catalog.load(settings).input_topics]
    consumers += [(f"{settings.group_id}.{s.name}", s.topic) for s in retry_stages(settings)]
    plan = [_plan(settings, group, topic) for group, topic in consumers]
    if args.yes:
        for end in plan:
            _commit_end(settings, end)
    if args.json:
        print_json({"committed": bool(args.yes), "groups": [asdict(end) for end in plan]})
    else:
        print_table(
            ("GROUP", "TOPIC", "PARTITIONS", "SKIPPED"),
            [(e.group, e.topic, len(e.end_offsets), e.skipped) for e in plan],
        )
    total = sum(end.skipped for end in plan)
    if not args.yes:
        raise ConfigError(
            f"refused without --yes: group {settings.group_id} would start at the end, "
            f"and {total} retained record(s) would never be delivered"
        )
    if not args.json:
        print(f"\ngroup {settings.group_id} starts at the end: {total} record(s) skipped")
    return 0


def _consumer(settings: Settings, group: str) -> Consumer:
    conf = common_config(settings)
    conf.update({"group.id": group, "enable.auto.commit": False})
    try:
        return Consumer(conf)
    except KafkaException as exc:
        raise KafkaSetupError(f"cannot create a Kafka consumer: {exc}") from None


def _plan(settings: Settings, group: str, topic: str) -> GroupEnd:
    consumer = _consumer(settings, group)
    try:
        meta = consumer.list_topics(topic, timeout=TIMEOUT_S)
        tmeta = meta.topics.get(topic)
        if tmeta is None or tmeta.error is not None or not tmeta.partitions:
            raise KafkaSetupError(
                f"topic {topic} does not exist; run `dispatcher topics ensure` first"
            )
        partitions = [TopicPartition(topic, p) for p in sorted(tmeta.partitions)]
        committed = consumer.committed(partitions, timeout=TIMEOUT_S)
        if any(tp.offset >= 0 for tp in committed):
            raise ConfigError(
                f"group {group} already has committed offsets on {topic}: it is not new, "
                "and start-at-end only starts a new group"
            )
        skipped, ends = 0, []
        for tp in partitions:
            low, high = consumer.get_watermark_offsets(tp, timeout=TIMEOUT_S)
            skipped += high - low
            ends.append(high)
    except KafkaException as exc:
        raise KafkaSetupError(f"cannot read group {group} on {topic}: {exc.args[0]}") from None
    finally:
        consumer.close()
    return GroupEnd(group, topic, tuple(ends), skipped)


def _commit_end(settings: Settings, end: GroupEnd) -> None:
    """Commit exactly the ends that were shown, so the count skipped is the count told."""
    consumer = _consumer(settings, end.group)
    try:
        offsets = [TopicPartition(end.topic, p, high) for p, high in enumerate(end.end_offsets)]
        consumer.commit(offsets=offsets, asynchronous=False)
    except KafkaException as exc:
        # Refused by the broker while the group has members, for one.
        raise KafkaSetupError(
            f"cannot commit offsets for group {end.group}: {exc.args[0]}"
        ) from None
    finally:
        consumer.close()
