"""Measure how long a restarted dispatcher takes to be ready after ``kill -9``.

    .venv/bin/python scripts/rejoin.py [--rounds 3]

In private topics and groups on the local broker, for each case: start the
dispatcher, wait until ``/readyz`` answers 200, stop it, start a replacement at
once, and time from the stop until the replacement's ``/readyz`` answers 200
(every stage's consumer group joined with partitions assigned). Cases:

* ``dynamic``: ``kill -9``, dynamic membership (no DISPATCHER_GROUP_INSTANCE_ID);
* ``static``: ``kill -9``, the replacement rejoins under the same
  DISPATCHER_GROUP_INSTANCE_ID (a container restarted in its pod);
* ``renamed``: SIGTERM, and the replacement has a new instance id (a pod
  replaced by a rolling update): a static member does not leave its group on
  shutdown, so its partitions wait for its session to time out.

DISPATCHER_SESSION_TIMEOUT_S, when set, is passed on. Prints one line per round
and the median per case.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from demo import DISPATCHER, dispatcher, drop_topics, free_port, namespaced

BOOTSTRAP = os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092")
READY_TIMEOUT_S = 180


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def wait_ready(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"rejoin: the dispatcher exited with {proc.returncode}")
        if ready(port):
            return
        time.sleep(0.05)
    sys.exit(f"rejoin: not ready within {READY_TIMEOUT_S} s")


def start(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([*DISPATCHER, "run"], env=env, stderr=out)


def measure(case: str, rounds: int, log: Path) -> list[float]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    namespace = f"rejoin.{case}.{os.getpid()}.{int(time.time())}"
    env.update(namespaced(namespace))
    env.update(
        {
            "DISPATCHER_KAFKA_BOOTSTRAP_SERVERS": BOOTSTRAP,
            "DISPATCHER_HTTP_PORT": str(port),
            "DISPATCHER_HTTP_HOST": "127.0.0.1",
            "DISPATCHER_TOPIC_PARTITIONS": "3",
            "DISPATCHER_LOG_LEVEL": "WARNING",
        }
    )
    if "DISPATCHER_SESSION_TIMEOUT_S" in os.environ:
        env["DISPATCHER_SESSION_TIMEOUT_S"] = os.environ["DISPATCHER_SESSION_TIMEOUT_S"]
    if case != "dynamic":
        env["DISPATCHER_GROUP_INSTANCE_ID"] = "rejoin-0"
    dispatcher("topics", "ensure", env=env)
    proc = start(env, log)
    wait_ready(port, proc)
    times = []
    for n in range(rounds):
        proc.send_signal(signal.SIGTERM if case == "renamed" else signal.SIGKILL)
        stopped = time.monotonic()
        proc.wait()
        if case == "renamed":
            env["DISPATCHER_GROUP_INSTANCE_ID"] = f"rejoin-{n + 1}"
        proc = start(env, log)
        wait_ready(port, proc)
        took = time.monotonic() - stopped
        times.append(took)
        how = "SIGTERM" if case == "renamed" else "kill -9"
        print(f"{case:7} round {n + 1}: {how} to ready in {took:5.1f} s", flush=True)
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    drop_topics(namespace)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--log", type=Path, default=Path("/tmp/dispatcher-rejoin.log"))
    options = parser.parse_args()
    session = os.environ.get("DISPATCHER_SESSION_TIMEOUT_S", "45 (default)")
    print(f"session timeout {session} s; dispatcher logs in {options.log}")
    cases = ("dynamic", "static", "renamed")
    results = {case: measure(case, options.rounds, options.log) for case in cases}
    for case, times in results.items():
        median, low, high = statistics.median(times), min(times), max(times)
        print(f"{case:7} median {median:5.1f} s (min {low:.1f}, max {high:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
