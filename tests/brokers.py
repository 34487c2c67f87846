"""A Kafka broker of one test's own, for tests that stop and start it.

The shared broker (``BOOTSTRAP``) serves every other test at once, so a test that
takes the broker away (an outage, a restart mid-request) gets a second single-node
broker from the same jars (``scripts/kafka.sh`` with its own directory and ports),
stopped at the end of the test.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from tests.support import REPO, free_port, wait_until

KAFKA_SCRIPT = REPO / "scripts" / "kafka.sh"
SHARED_LIBS = Path(os.environ.get("KAFKA_LOCAL_DIR", REPO / ".kafka")) / "libs"


class PrivateBroker:
    """A single-node KRaft broker in ``directory`` on free loopback ports."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.controller_port = free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        directory.mkdir(parents=True, exist_ok=True)
        # The jars are the shared broker's (fetched once); data and logs are this one's.
        libs = directory / "libs"
        if not libs.exists():
            libs.symlink_to(SHARED_LIBS.resolve(), target_is_directory=True)

    def _script(self, command: str) -> None:
        env = {
            **os.environ,
            "KAFKA_LOCAL_DIR": str(self.directory),
            "KAFKA_PORT": str(self.port),
            "KAFKA_CONTROLLER_PORT": str(self.controller_port),
            "KAFKA_STOP_TIMEOUT": "20",
        }
        done = subprocess.run(
            ["bash", str(KAFKA_SCRIPT), command],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, f"kafka.sh {command} failed:\n{done.stdout}{done.stderr}"

    def start(self) -> PrivateBroker:
        """Start (or restart, keeping its data) and wait until it serves again: every
        partition has a leader and the group coordinator has read its groups back.

        After a restart the broker answers before it leads its partitions again
        (NOT_LEADER_FOR_PARTITION for a moment) and before its coordinator has
        loaded the groups (COORDINATOR_LOAD_IN_PROGRESS); a test timing what a
        client does once the broker is back should not count either window.
        """
        self._script("start")
        consumer = Consumer(
            {"bootstrap.servers": self.bootstrap, "group.id": "private-broker-probe"}
        )
        admin = AdminClient({"bootstrap.servers": self.bootstrap})

        def leading() -> bool:
            try:
                meta = consumer.list_topics(timeout=5)
                for name, topic in meta.topics.items():
                    if name.startswith("__"):
                        continue
                    for p in topic.partitions:
                        consumer.get_watermark_offsets(TopicPartition(name, p), timeout=5)
            except KafkaException:
                return False
            return True

        def groups_loaded() -> bool:
            try:
                listed = admin.list_consumer_groups(request_timeout=5).result()
            except KafkaException:
                return False
            return not listed.errors

        try:
            wait_until(leading, 60, "the private broker to lead its partitions", interval_s=0.2)
            wait_until(groups_loaded, 60, "the private broker to load its groups", interval_s=0.2)
        finally:
            consumer.close()
        return self

    def stop(self) -> None:
        """Stop it (SIGTERM, SIGKILL after 20 s); its data stays for a restart."""
        self._script("stop")

    def running(self) -> bool:
        env = {**os.environ, "KAFKA_LOCAL_DIR": str(self.directory), "KAFKA_PORT": str(self.port)}
        return (
            subprocess.run(
                ["bash", str(KAFKA_SCRIPT), "status"], env=env, capture_output=True, check=False
            ).returncode
            == 0
        )
