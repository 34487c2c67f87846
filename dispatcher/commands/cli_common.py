"""Pieces shared by the operator commands: one-line usage errors, tables, time options."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

from dispatcher.errors import ConfigError
from dispatcher.models import as_utc

PROG = "dispatcher"


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, like every other error.

    Unknown arguments are refused here too, by the subcommand that got them, so
    they never reach the top-level parser's two-line usage message.
    """

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix(PROG).strip()
        where = f"{command}: " if command else ""
        self.exit(2, f"{PROG}: error: {where}{message} (see `{self.prog} --help`)\n")

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


def missing_action(name: str, actions: Sequence[str]) -> Any:
    """A handler for a command group called without its action."""

    def handler(args: argparse.Namespace, settings: object) -> int:
        raise ConfigError(f"{name}: choose an action: {', '.join(actions)}")

    return handler


def printable(value: object) -> str:
    """``value`` as text safe to print on a terminal: a control character (ESC, CR,
    NUL...), a bidirectional override or a line separator is written as its escape
    (``\\x1b``), so stored text can neither move the cursor nor reorder a line."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in text)


def print_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Columns padded to their widest cell; the last column is never padded."""
    text = [[printable(cell) for cell in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in text) for i in range(len(header))]
    for row in text:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def parse_time_option(value: str, flag: str) -> datetime:
    """An ISO 8601 date or time from the command line; without a zone, UTC."""
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ConfigError(
            f"{flag}: {value!r} is not an ISO 8601 time (e.g. 2025-01-15T10:30:00Z)"
        ) from None
    try:
        return as_utc(parsed)
    except ValueError as exc:
        raise ConfigError(f"{flag}: {value!r}: {exc}") from None


def add_secret_options(group: Any, what: str, default: str) -> None:
    """``--secret-file`` and ``--secret`` on a parser or mutually exclusive group."""
    group.add_argument(
        "--secret-file",
        metavar="PATH",
        help=f"read {what} from PATH, or from standard input with `-` ({default})",
    )
    group.add_argument(
        "--secret",
        help=f"{what} on the command line: visible in `ps` and shell history, prefer --secret-file",
    )


def read_secret(args: argparse.Namespace) -> str | None:
    """The secret given by ``--secret-file`` (one line) or ``--secret``; None if neither.

    A file's line ending is dropped, nothing else: the secret's own checks see
    exactly what the file holds. ``-`` reads standard input, without echo when it
    is a terminal.
    """
    if args.secret is not None:
        return str(args.secret)
    if args.secret_file is None:
        return None
    source = "standard input" if args.secret_file == "-" else args.secret_file
    try:
        if args.secret_file != "-":
            text = Path(args.secret_file).read_text(encoding="utf-8")
        elif sys.stdin.isatty():
            text = getpass.getpass("secret: ")
        else:
            text = sys.stdin.read()
    except UnicodeDecodeError:
        raise ConfigError(f"--secret-file: {source} is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"--secret-file: cannot read {source}: {exc.strerror or exc}") from None
    secret = text.removesuffix("\n").removesuffix("\r")
    if not secret:
        raise ConfigError(f"--secret-file: {source} is empty")
    if "\n" in secret or "\r" in secret:
        raise ConfigError(f"--secret-file: {source} must hold the secret on a single line")
    return secret


def warn_of_secret_option(args: argparse.Namespace) -> None:
    """After a command took ``--secret``: it is kept working, but said to be unsafe.

    Given once the command has succeeded, so a refusal stays a single line.
    """
    if args.secret is not None:
        warn(
            "--secret is visible to other users in `ps` and stays in shell history; "
            "use --secret-file PATH or --secret-file - (standard input)"
        )


def print_json(value: object) -> None:
    """A command's ``--json`` output: indented, times and other values as text."""
    print(json.dumps(value, indent=2, default=str))


def warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)
