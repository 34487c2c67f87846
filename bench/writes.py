"""Phase 8: how long a change of a webhook takes, at the writer and through a replica.

Two ``dispatcher api`` processes on the phase's own topics: the writer, and a
replica forwarding changes to it (``DISPATCHER_API_WRITER_URL``). One client
sends PATCHes one after the other, first to the writer, then to the replica; each
answer comes after the change was committed (one Kafka transaction) and read
back by the process that answered.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.harness import REPO, BenchError, Namespace, free_port, wait_for
from dispatcher.api.auth import hash_key, new_key


class ApiServer:
    """``dispatcher api`` as a child process."""

    def __init__(self, ns: Namespace, log_path: Path, key: str, writer_url: str = "") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = log_path
        env = ns.env()
        env.update(
            {
                "DISPATCHER_API_PORT": str(self.port),
                "DISPATCHER_HTTP_PORT": "0",
                "DISPATCHER_API_KEYS": json.dumps(
                    [{"name": "bench", "sha256": hash_key(key), "access": "read-write"}]
                ),
                "DISPATCHER_API_WRITER_URL": writer_url,
                # Each process its own history store, beside its log, not in the checkout.
                "DISPATCHER_API_HISTORY_PATH": str(log_path.with_suffix(".history.sqlite3")),
            }
        )
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dispatcher.commands.cli", "api"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )

    def wait_ready(self) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                tail = self._log.read_text(errors="replace")[-3000:]
                raise BenchError(f"dispatcher api exited:\n{tail}")
            try:
                return httpx.get(self.url + "/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 90, "the API to be ready", every_s=0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _ms(samples: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return {
        "p50_ms": round(cuts[49] * 1000, 1),
        "p99_ms": round(cuts[98] * 1000, 1),
        "max_ms": round(max(samples) * 1000, 1),
    }


def write_latency(ns: Namespace, logs: Path, hook_url: str, count: int) -> dict[str, Any]:
    """``count`` PATCHes at the writer, then ``count`` through the replica."""
    key = new_key()
    writer = ApiServer(ns, logs / "api-writer.log", key)
    replica: ApiServer | None = None
    try:
        writer.wait_ready()
        replica = ApiServer(ns, logs / "api-replica.log", key, writer_url=writer.url)
        replica.wait_ready()
        headers = {"Authorization": f"Bearer {key}"}
        base = "/v1/organizations/org_bench"
        results: dict[str, Any] = {"changes": count}
        with httpx.Client(base_url=writer.url, headers=headers, timeout=60) as http:
            if http.put(f"{base}/plan", json={"plan": "scale"}).status_code != 200:
                raise BenchError("writes: setting the plan failed")
            made = http.post(f"{base}/webhooks", json={"url": hook_url})
            if made.status_code != 201:
                raise BenchError(f"writes: create failed: {made.text}")
        one = f"{base}/webhooks/{made.json()['id']}"
        for name, server in (("writer", writer), ("replica", replica)):
            with httpx.Client(base_url=server.url, headers=headers, timeout=60) as http:
                samples = []
                for n in range(count):
                    t0 = time.perf_counter()
                    answer = http.patch(one, json={"description": f"{name} {n}"})
                    samples.append(time.perf_counter() - t0)
                    if answer.status_code != 200:
                        raise BenchError(f"writes: PATCH at the {name}: {answer.text}")
            results[name] = _ms(samples)
        return results
    finally:
        if replica is not None:
            replica.stop()
        writer.stop()
