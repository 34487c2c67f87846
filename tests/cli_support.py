"""Running the ``dispatcher`` command in tests: in-process (fast) or as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from dispatcher.commands import cli
from tests.support import REPO, Namespace, to_env, wait_for_leaders


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        """The JSON printed by a command that succeeded."""
        assert self.code == 0, (self.code, self.out, self.err)
        return json.loads(self.out)

    def assert_one_line_error(self, code: int = 2, *needles: str) -> None:
        """A refusal: the given exit code, one ``dispatcher: error:`` line, no traceback."""
        assert self.code == code, (self.code, self.out, self.err)
        lines = self.err.strip().splitlines()
        assert len(lines) == 1, self.err
        assert lines[0].startswith("dispatcher: error: "), self.err
        assert "Traceback" not in self.err
        for needle in needles:
            assert needle in lines[0], (needle, lines[0])


Cli = Callable[..., Result]


def make_inprocess(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    """``cli(ns, *argv, **setting_overrides)`` runs ``dispatcher.commands.cli.main`` here."""

    def run(ns: Namespace, *argv: str, **extra: Any) -> Result:
        for key in list(os.environ):
            if key.startswith("DISPATCHER_"):
                monkeypatch.delenv(key)
        for key, value in to_env({**ns.values, **extra}).items():
            monkeypatch.setenv(key, value)
        capsys.readouterr()
        try:
            code = cli.main(list(argv))
        except SystemExit as exc:  # argparse's usage errors
            code = int(exc.code or 0)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def run_subprocess(ns: Namespace, *argv: str, timeout_s: float = 120, **extra: Any) -> Result:
    """``python -m dispatcher.commands.cli ...`` as a child process with the settings."""
    proc = subprocess.run(
        [sys.executable, "-m", "dispatcher.commands.cli", *argv],
        env=ns.env(**extra),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def wait_topics_ready(ns: Namespace, timeout_s: float = 30.0) -> Namespace:
    """The namespace, once every partition of its topics has a leader."""
    wait_for_leaders(ns.settings, timeout_s)
    return ns


# Written with a URL on the receiver, which the test namespaces allow (loopback).
PUT_URL = "https://127.0.0.1:8443/hooks/bullseye"


def put_args(**changes: str | None) -> list[str]:
    """``subscriptions put`` with valid values, except those changed (None leaves one out)."""
    fields: dict[str, str | None] = {"organization": "org_1", "url": PUT_URL, "plan": "scale"}
    fields.update(changes)
    args = ["subscriptions", "put"]
    for flag, value in fields.items():
        if value is not None:
            args += [f"--{flag}", value]
    return args
