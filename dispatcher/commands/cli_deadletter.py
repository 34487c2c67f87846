"""``dispatcher dead-letter list|replay``: look at dead letters and send them again."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, TextIO

from dispatcher.commands import deadletter, replay
from dispatcher.commands.cli_common import (
    OneLineParser,
    missing_action,
    parse_time_option,
    print_json,
    print_table,
)
from dispatcher.errors import ConfigError, DispatcherError
from dispatcher.models import format_timestamp
from dispatcher.settings import Settings

#: Replays of more records than this show a progress counter even without a terminal.
PROGRESS_MIN_RECORDS = 1000


def add_commands(sub: Any) -> None:
    group = sub.add_parser("dead-letter", help="list or replay dead-lettered deliveries")
    group.set_defaults(handler=missing_action("dead-letter", ("list", "replay")))
    dsub = group.add_subparsers(
        title="dead-letter commands", metavar="ACTION", parser_class=OneLineParser
    )

    lst = dsub.add_parser(
        "list",
        help="list dead letters",
        description="List the deliveries in the dead-letter topic, oldest first. Dead letters "
        "already replayed are left out unless --include-replayed.",
    )
    _add_filters(lst)
    lst.add_argument(
        "--include-replayed", action="store_true", help="show dead letters already replayed too"
    )
    lst.add_argument("--json", action="store_true", help="print JSON (records without bodies)")
    lst.add_argument("--with-body", action="store_true", help="with --json: include the bodies")
    lst.set_defaults(handler=cmd_list)

    rep = dsub.add_parser(
        "replay",
        help="send dead letters again, with a fresh attempt budget",
        description="Write the selected dead letters to the first retry stage, due now, as "
        "attempt 1 with a fresh budget, and record each replay so that running the same "
        "replay again sends nothing twice. Needs a filter, or --all.",
    )
    _add_filters(rep)
    rep.add_argument("--all", action="store_true", help="replay every dead letter not replayed")
    rep.add_argument("--dry-run", action="store_true", help="only show what would be replayed")
    rep.add_argument("--json", action="store_true", help="print JSON")
    rep.set_defaults(handler=cmd_replay)


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--webhook", metavar="WEBHOOK_ID", help="only this webhook's")
    parser.add_argument("--organization", metavar="ORG_ID", help="only this organization's")
    parser.add_argument(
        "--since", metavar="TIME", help="dead-lettered at or after (ISO 8601; UTC if no zone)"
    )
    parser.add_argument(
        "--until", metavar="TIME", help="dead-lettered before (ISO 8601; UTC if no zone)"
    )
    parser.add_argument(
        "--delivery",
        metavar="DELIVERY_ID",
        action="append",
        default=[],
        help="only this delivery (repeatable)",
    )


def _filters(args: argparse.Namespace) -> deadletter.Filters:
    since = parse_time_option(args.since, "--since") if args.since else None
    until = parse_time_option(args.until, "--until") if args.until else None
    if since and until and since >= until:
        raise ConfigError("--since must be before --until")
    return deadletter.Filters(
        webhook_id=args.webhook or None,
        organization_id=args.organization or None,
        since=since,
        until=until,
        delivery_ids=frozenset(args.delivery),
    )


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    if args.with_body and not args.json:
        raise ConfigError("--with-body goes with --json")
    scan = deadletter.read(settings, _filters(args), keep_body=args.with_body)
    shown = [letter for letter in scan.letters if args.include_replayed or letter.replayed is None]
    hidden = len(scan.letters) - len(shown)
    if args.json:
        print_json([letter.view(with_body=args.with_body) for letter in shown])
        return 0
    header = [
        "DELIVERY ID",
        "WEBHOOK",
        "ORGANIZATION",
        "DEAD-LETTERED AT",
        "ATTEMPTS",
        "LAST ERROR",
    ]
    if args.include_replayed:
        header.insert(-1, "REPLAYED AT")
    rows = []
    for letter in shown:
        record = letter.record
        row = [
            record.delivery_id,
            record.webhook_id,
            record.organization_id,
            format_timestamp(record.dead_lettered_at) if record.dead_lettered_at else "-",
            str(record.attempts_made),
            record.last_error() or "-",
        ]
        if args.include_replayed:
            replayed_at = letter.replayed.replayed_at if letter.replayed else None
            row.insert(-1, format_timestamp(replayed_at) if replayed_at else "-")
        rows.append(row)
    print_table(header, rows)
    summary = f"\n{len(shown)} dead letter(s)"
    if hidden:
        summary += f"; {hidden} already replayed not shown (--include-replayed shows them)"
    print(summary)
    if scan.unreadable:
        print(f"{scan.unreadable} record(s) in the topic could not be read", file=sys.stderr)
    return 0


def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from dispatcher.commands.subscriptions import load_table

    filters = _filters(args)
    if filters.empty and not args.all:
        raise ConfigError(
            "choose what to replay: --webhook, --organization, --since/--until, --delivery, "
            "or --all for every dead letter"
        )
    table = load_table(settings)
    bar = ProgressBar(sys.stderr)
    report = replay.replay(settings, filters, table.get, dry_run=args.dry_run, progress=bar.update)
    bar.finish()
    if args.json:
        print_json(
            {
                "dry_run": args.dry_run,
                "retry_topic": report.topic,
                "replayed": [letter.record.delivery_id for letter in report.replayed],
                "merged_duplicates": len(report.merged),
                "already_replayed": report.already_replayed,
                "skipped": {
                    reason: [letter.record.delivery_id for letter in letters]
                    for reason, letters in report.skipped.items()
                },
                "failed": {letter.record.delivery_id: error for letter, error in report.failed},
            }
        )
    else:
        verb = "would replay" if args.dry_run else "replayed"
        print(f"{verb} {len(report.replayed)} dead letter(s) to {report.topic}")
        if args.dry_run:
            for letter in report.replayed:
                print(f"  {letter.record.delivery_id}  {letter.record.webhook_id}")
        if report.merged:
            print(f"{len(report.merged)} older duplicate(s) of those deliveries marked as well")
        if report.already_replayed:
            print(f"{report.already_replayed} already replayed, left alone")
        for reason, letters in sorted(report.skipped.items()):
            print(f"skipped {len(letters)}: {reason}")
    if report.failed:
        raise DispatcherError(
            f"{len(report.failed)} dead letter(s) could not be written to {report.topic} "
            f"({report.failed[0][1]}); they stay unreplayed, run the replay again"
        )
    return 0


class ProgressBar:
    """A one-line ``\\r`` counter on stderr, for big replays or an operator watching."""

    def __init__(self, stream: TextIO, min_records: int = PROGRESS_MIN_RECORDS) -> None:
        self._stream = stream
        self._min = min_records
        self._tty = stream.isatty()
        self._shown = False
        self._last = 0.0

    def update(self, done: int, total: int) -> None:
        if not (self._tty or total > self._min):
            return
        now = time.monotonic()
        if done < total and now - self._last < 0.2:
            return
        self._last = now
        self._shown = True
        self._stream.write(f"\rreplaying {done}/{total} ({done * 100 // max(total, 1)}%)")
        self._stream.flush()

    def finish(self) -> None:
        if self._shown:
            self._stream.write("\n")
            self._stream.flush()
