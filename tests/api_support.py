"""``dispatcher api`` as a real child process, and an HTTP client with its keys."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from dispatcher.api.auth import hash_key, new_key
from tests.support import REPO, Namespace, free_port, wait_until

ORG = "org_abc123"

#: The history store's secondary indexes, which a rebuild creates once caught up.
HISTORY_INDEXES = frozenset(
    {
        "deliveries_by_time",
        "deliveries_by_status",
        "deliveries_by_session",
        "attempts_by_time",
        "attempts_failed",
    }
)


def history_indexes(path: str | Path) -> set[str]:
    """The indexes a history store file holds (SQLite's own excepted)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT name FROM sqlite_schema WHERE type = 'index' AND sql NOT NULL")
        return {name for (name,) in rows}
    finally:
        conn.close()


class ApiProcess:
    """The API with one read-write key (``admin``) and one read-only key (``viewer``)."""

    def __init__(
        self, ns: Namespace, log_path: Path, same_keys_as: ApiProcess | None = None, **extra: Any
    ) -> None:
        self.ns = ns
        self.log_path = log_path
        self.port = free_port()
        self.probe_port = free_port()
        # Replicas of one deployment share their keys (a follower forwards the caller's).
        self.admin_key = same_keys_as.admin_key if same_keys_as else new_key()
        self.viewer_key = same_keys_as.viewer_key if same_keys_as else new_key()
        keys = [
            {"name": "admin", "sha256": hash_key(self.admin_key), "access": "read-write"},
            {"name": "viewer", "sha256": hash_key(self.viewer_key), "access": "read"},
        ]
        # Each API its own history file (beside its log), kept across restarts.
        extra.setdefault("api_history_path", str(log_path.with_suffix(".history.sqlite3")))
        self.history_path = Path(str(extra["api_history_path"]))
        self._env = ns.env(api_port=self.port, http_port=self.probe_port, api_keys=keys, **extra)
        self.proc: subprocess.Popen[bytes] | None = None
        self._clients: list[httpx.Client] = []
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, wait_ready: bool = True) -> ApiProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dispatcher.commands.cli", "api"],
                env=self._env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )

        if wait_ready:
            self.wait_ready()
        return self

    def readyz(self) -> tuple[int, str]:
        try:
            r = httpx.get(self.url + "/readyz", timeout=2)
        except httpx.HTTPError as exc:
            return 0, str(exc)
        return r.status_code, r.text

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"dispatcher api exited early:\n{self.logs()[-3000:]}")
            return self.readyz()[0] == 200

        wait_until(ready, 60, "the API to be ready", interval_s=0.1)

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {} if key is None else {"Authorization": f"Bearer {key}"}
        client = httpx.Client(base_url=self.url, headers=headers, timeout=30)
        self._clients.append(client)  # closed by stop(), whatever the test did
        return client

    def admin(self) -> httpx.Client:
        return self.client(self.admin_key)

    def viewer(self) -> httpx.Client:
        return self.client(self.viewer_key)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no shutdown, nothing flushed or closed."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        for client in self._clients:
            client.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
