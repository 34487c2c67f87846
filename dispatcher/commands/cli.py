"""The ``dispatcher`` command: run the service and manage topics and subscriptions.

Operator mistakes (bad settings, bad input, a missing topic) end with one line on
stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from dispatcher import __version__
from dispatcher.errors import DispatcherError
from dispatcher.kafka import check_client_config, send_client_logs_to
from dispatcher.settings import Settings, load_settings

Handler = Callable[[argparse.Namespace, Settings], int]


#: More arguments than any command needs; argparse slows quadratically beyond
#: (50,000 repeated flags took minutes), so such a command line is refused at once.
MAX_ARGUMENTS = 1000


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) > MAX_ARGUMENTS:
        print(
            f"dispatcher: error: {len(argv)} command-line arguments; at most {MAX_ARGUMENTS}",
            file=sys.stderr,
        )
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    # librdkafka prints every failed connection attempt (hundreds of lines while a
    # broker is down); a command reports the outcome in one line instead.
    send_client_logs_to(None if args.verbose else _QUIET)
    try:
        settings = load_settings()
        return handler(args, settings)
    except DispatcherError as exc:
        print(f"dispatcher: error: {_one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug, not an operator mistake: still one line unless asked
        if args.verbose:
            raise
        print(
            f"dispatcher: error: unexpected {type(exc).__name__}: {_one_line(str(exc))} "
            "(--verbose shows the traceback)",
            file=sys.stderr,
        )
        return 1


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= 1000 else text[:997] + "..."


#: Swallows librdkafka's own log lines unless ``--verbose``.
_QUIET = logging.getLogger("dispatcher.kafka-client.quiet")
_QUIET.propagate = False
_QUIET.addHandler(logging.NullHandler())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dispatcher",
        description="Deliver visitor.identified events from Kafka to customer webhooks.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show the Kafka client's own log lines, and a traceback on an unexpected error",
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    run = sub.add_parser("run", help="run the dispatcher service")
    run.set_defaults(handler=cmd_run)

    check = sub.add_parser("check", help="exit 0 when the local service is ready")
    check.add_argument("--url", help="readiness URL (default: this pod's /readyz)")
    check.add_argument("--live", action="store_true", help="check liveness instead")
    check.set_defaults(handler=cmd_check)

    topics = sub.add_parser("topics", help="create and check the topics")
    tsub = topics.add_subparsers(title="topics commands", metavar="ACTION", required=True)
    ensure = tsub.add_parser("ensure", help="create missing topics; report misconfigured ones")
    ensure.set_defaults(handler=cmd_topics_ensure)

    from dispatcher.commands import cli_deadletter, cli_group, cli_manage

    cli_manage.add_commands(sub)
    cli_deadletter.add_commands(sub)
    cli_group.add_commands(sub)
    from dispatcher.api import server

    server.add_commands(sub)
    return parser


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from dispatcher.core.service import serve
    from dispatcher.logs import configure_logging

    configure_logging(settings.log_level)
    run: Callable[[Coroutine[Any, Any, None]], None] = asyncio.run
    if settings.event_loop == "uvloop":
        import uvloop

        run = uvloop.run
    try:
        check_client_config(settings)
        run(serve(settings))
    except DispatcherError as exc:
        # Once logging is JSON, the reason for exiting is a JSON line too.
        logging.getLogger("dispatcher").error("exiting: %s", exc)
        return exc.exit_code
    return 0


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    path = "/healthz" if args.live else "/readyz"
    url = args.url or f"http://127.0.0.1:{settings.http_port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            print(response.read().decode().strip())
            return 0
    except urllib.error.HTTPError as exc:
        print(f"not ready: {exc.read().decode().strip()}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"not reachable: {url}: {exc}", file=sys.stderr)
        return 1


def cmd_topics_ensure(args: argparse.Namespace, settings: Settings) -> int:
    from dispatcher.commands.topics import ensure_topics

    report = ensure_topics(settings)
    for name in report.created:
        print(f"created  {name}")
    for name in report.ok:
        print(f"ok       {name}")
    for note in report.notes:
        print(f"note     {note}")
    for problem in report.problems:
        print(f"WRONG    {problem}", file=sys.stderr)
    if report.problems:
        print(f"dispatcher: error: {len(report.problems)} topic(s) misconfigured", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
