"""Run one delivery end to end and show the receiver's verdict.

Started by ``scripts/demo.sh`` once the broker is up. Uses the product's default
topic names; the demo's subscription is deleted again at the end.

``scripts/image-check.sh`` runs it with ``--dispatcher`` (a command that runs the
built image's ``dispatcher``) and ``--namespace`` (private topics and group, so
the check never meets another dispatcher on a shared broker).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trustme
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
SEED_EVENT = REPO / "tests" / "data" / "seed-event.json"
WEBHOOK_ID = "wh_demo"
BOOTSTRAP = os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092")
#: The dispatcher command line; ``--dispatcher`` replaces it.
DISPATCHER = [PYTHON, "-m", "dispatcher.commands.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dispatcher(*args: str, env: dict[str, str]) -> str:
    done = subprocess.run([*DISPATCHER, *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"demo: `dispatcher {' '.join(args)}` failed:\n{done.stderr}")
    return done.stdout


def wait_for(check, timeout_s: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    sys.exit(f"demo: timed out waiting for {what}")


def namespaced(namespace: str) -> dict[str, str]:
    """Settings that give the dispatcher its own topics and consumer group."""
    return {
        "DISPATCHER_GROUP_ID": f"{namespace}.dispatcher",
        "DISPATCHER_INPUT_TOPIC": f"{namespace}.visitor.identified",
        "DISPATCHER_SUBSCRIPTIONS_TOPIC": f"{namespace}.webhooks.subscriptions",
        "DISPATCHER_RETRY_TOPIC_PREFIX": f"{namespace}.webhooks.retry.",
        "DISPATCHER_DEAD_LETTER_TOPIC": f"{namespace}.webhooks.dead-letter",
        "DISPATCHER_INVALID_TOPIC": f"{namespace}.webhooks.invalid",
        "DISPATCHER_ATTEMPTS_TOPIC": f"{namespace}.webhooks.attempts",
        "DISPATCHER_ORGANIZATIONS_TOPIC": f"{namespace}.webhooks.organizations",
        "DISPATCHER_IDEMPOTENCY_TOPIC": f"{namespace}.webhooks.idempotency",
        "DISPATCHER_HEALTH_TOPIC": f"{namespace}.webhooks.health",
        "DISPATCHER_NOTIFICATIONS_TOPIC": f"{namespace}.webhooks.notifications",
        "DISPATCHER_BACKLOG_TOPIC": f"{namespace}.webhooks.backlog",
    }


def main() -> int:
    global DISPATCHER
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dispatcher", help="command that runs `dispatcher` (shell words)")
    parser.add_argument("--namespace", help="prefix of private topic names and group id")
    options = parser.parse_args()
    if options.dispatcher:
        DISPATCHER = shlex.split(options.dispatcher)
    tmp = Path(tempfile.mkdtemp(prefix="dispatcher-demo-"))
    if options.dispatcher:
        tmp.chmod(0o755)  # it may run as another user, who must read the CA certificate
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp / "key.pem"))
    receiver_port, health_port = free_port(), free_port()

    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    env.update(
        {
            "DISPATCHER_HTTP_CA_FILE": str(tmp / "ca.pem"),
            # The sample receiver listens on loopback, which the egress guard
            # blocks unless the operator allows it.
            "DISPATCHER_ALLOWED_NETWORKS": "127.0.0.0/8",
            "DISPATCHER_HTTP_PORT": str(health_port),
            "DISPATCHER_TOPIC_PARTITIONS": "3",
            "DISPATCHER_LOG_LEVEL": "WARNING",
            "DISPATCHER_KAFKA_BOOTSTRAP_SERVERS": BOOTSTRAP,
        }
    )
    if options.namespace:
        env.update(namespaced(options.namespace))
    print("1. topics")
    print(dispatcher("topics", "ensure", env=env), end="")

    print("2. a subscription for org_abc123 at the sample receiver")
    put = dispatcher(
        "subscriptions",
        "put",
        "--id",
        WEBHOOK_ID,
        "--organization",
        "org_abc123",
        "--plan",
        "scale",
        "--url",
        f"https://localhost:{receiver_port}/webhooks",
        "--json",
        env=env,
    )
    secret = json.loads(put).get("new_secret")
    if not secret:  # the subscription existed from an earlier run: give it a new secret
        secret = json.loads(
            dispatcher("subscriptions", "rotate-secret", WEBHOOK_ID, "--json", env=env)
        )["new_secret"]
    print(f"   webhook {WEBHOOK_ID}, secret generated (shown once): {secret}")

    secret_file = tmp / "secret"
    secret_file.touch(mode=0o600)
    secret_file.write_text(secret)
    receiver = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "dispatcher.sample_receiver",
            "--port",
            str(receiver_port),
            "--cert",
            str(tmp / "cert.pem"),
            "--key",
            str(tmp / "key.pem"),
            "--secret-file",
            str(secret_file),
            "--exit-after",
            "1",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    service = subprocess.Popen([*DISPATCHER, "run"], env=env)
    try:
        print("3. dispatcher started; waiting until it is ready")

        def ready() -> bool:
            if service.poll() is not None:
                sys.exit(f"demo: the dispatcher stopped with exit code {service.returncode}")
            check = subprocess.run([*DISPATCHER, "check"], env=env, capture_output=True)
            return check.returncode == 0

        wait_for(
            ready,
            60,
            "the dispatcher to be ready",
        )
        print(f"   `dispatcher check` answers: {dispatcher('check', env=env).strip()}")
        print("4. publishing the example visitor.identified event")
        event = json.loads(SEED_EVENT.read_text())
        producer = Producer({"bootstrap.servers": BOOTSTRAP})
        producer.produce(
            env.get("DISPATCHER_INPUT_TOPIC", "visitor.identified"), json.dumps(event).encode()
        )
        producer.flush(30)

        assert receiver.stdout is not None
        receiver.stdout.readline()  # the "listening" line
        line = wait_for(receiver.stdout.readline, 60, "the delivery")
        got = json.loads(line)
        print("5. the receiver got:")
        print(json.dumps(got, indent=2))
        if not got["verified"]:
            print("demo: FAILED: the delivery did not verify", file=sys.stderr)
            return 1
        print("\nDelivered and verified: X-Bullseye-Signature and webhook-signature both match.")
        return 0
    finally:
        service.send_signal(signal.SIGTERM)
        print(f"6. SIGTERM: the dispatcher drained and exited with {service.wait(60)}")
        receiver.kill()
        receiver.wait(10)
        dispatcher("subscriptions", "delete", WEBHOOK_ID, env=env)
        if options.namespace:
            drop_topics(options.namespace)


def drop_topics(namespace: str) -> None:
    """Delete the private topics of a namespaced run, so repeated runs leave nothing."""
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    prefix = f"{namespace}."
    topics = [t for t in admin.list_topics(timeout=15).topics if t.startswith(prefix)]
    for future in admin.delete_topics(topics, operation_timeout=30).values():
        future.result()


if __name__ == "__main__":
    sys.exit(main())
