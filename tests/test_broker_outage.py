"""A broker outage mid-delivery: deliveries resume soon after it returns, and /readyz says why not.

Two dispatchers share the outages, one per kind of group membership:

* ``dynamic``: the defaults (no instance id, a 45 s session, longer than the
  outage): the member keeps its session and its partitions through the outage;
* ``static``: an instance id and a 10 s session, shorter than the outage: each
  outage costs it its session, and it rejoins under the same instance id.

The broker is a private one (``private_broker``): stopping the shared broker would
break every other test running on the machine. Five rounds of a 30 s outage take
about 4 minutes.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest
from confluent_kafka import KafkaException, Producer

from tests.brokers import PrivateBroker
from tests.receiver import HttpsReceiver
from tests.streams import make_event, session_of
from tests.support import DispatcherProcess, Namespace, wait_until

#: What the README promises from the broker's return to the next delivery.
RESUME_WITHIN_S = 15.0
OUTAGE_S = 30.0
ROUNDS = 5
#: Events a second in the steady stream: enough to see a gap, far below capacity.
RATE = 20


class SteadyStream:
    """Publishes numbered events at a steady rate, through the outage too.

    The producer queues what it cannot send while the broker is away and sends
    it on its return; ``published`` holds the ids the broker acknowledged.
    """

    def __init__(self, ns: Namespace, prefix: str) -> None:
        self._ns = ns
        self._prefix = prefix
        self._producer = Producer(
            {
                "bootstrap.servers": ns.bootstrap,
                # Not idempotent: an idempotent producer waits, after the broker's
                # return, for a producer id from a coordinator still loading, and
                # the test would time that instead of the dispatcher. A duplicate
                # from a retry is harmless here: every event is counted once.
                "enable.idempotence": False,
                "acks": "all",
                "linger.ms": 5,
                # Back on the broker within 0.2 s of its return, so what the test
                # measures is the dispatcher's delay, not this producer's.
                "reconnect.backoff.max.ms": 200,
                # Far longer than the outages below: nothing expires in the queue.
                "message.timeout.ms": 600_000,
            }
        )
        self.sent: list[tuple[float, str]] = []
        self.acked: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="steady-stream", daemon=True)

    def start(self) -> SteadyStream:
        self._thread.start()
        return self

    def _run(self) -> None:
        partitions = self._ns.settings.topic_partitions
        i = 0
        while not self._stop.is_set():
            session = f"{self._prefix}-{i:06d}"
            value = json.dumps(make_event(session)).encode()

            def report(err: Any, _msg: Any, session: str = session) -> None:
                if err is None:
                    with self._lock:
                        self.acked.add(session)

            try:
                self._producer.produce(
                    self._ns.settings.input_topic,
                    value,
                    partition=i % partitions,
                    on_delivery=report,
                )
            except KafkaException:
                # Right after the broker's return its metadata can lack the topic for
                # a moment (_UNKNOWN_TOPIC): the same event again, a little later.
                self._producer.poll(0.1)
                continue
            with self._lock:
                self.sent.append((time.monotonic(), session))
            self._producer.poll(0)
            i += 1
            self._stop.wait(1 / RATE)

    def sent_after(self, moment: float) -> list[str]:
        with self._lock:
            return [session for at, session in self.sent if at >= moment]

    def stop(self) -> set[str]:
        self._stop.set()
        self._thread.join(10)
        assert self._producer.flush(60) == 0, "the stream's producer kept unsent events"
        with self._lock:
            assert len(self.acked) == len(self.sent)
            return set(self.acked)


@dataclass
class Watched:
    """One dispatcher under test, its event stream and the path its webhook receives on."""

    name: str
    ns: Namespace
    proc: DispatcherProcess
    stream: SteadyStream
    path: str

    def received(self, receiver: HttpsReceiver) -> set[str]:
        return {session_of(r) for r in receiver.requests_to(self.path)}

    def delivered_after(self, receiver: HttpsReceiver, moment: float) -> bool:
        """Whether an event handed to the producer after ``moment`` was delivered."""
        return not self.received(receiver).isdisjoint(self.stream.sent_after(moment))


# Five 30 s outages, and a broker that takes 10 to 25 s to start on a busy 2-core
# machine: about 5 minutes, above the suite's 300 s default.
@pytest.mark.timeout(600)
def test_deliveries_resume_soon_after_a_broker_outage(
    private_broker: PrivateBroker, receiver: HttpsReceiver, run_dispatcher: Any
) -> None:
    kinds = {
        "dynamic": {"kafka_consumer_extra_config": {}},
        "static": {
            "kafka_consumer_extra_config": {},
            "group_instance_id": "outage-static-0",
            "session_timeout_s": 10,
        },
    }
    made: list[Namespace] = []
    try:
        watched = []
        for name, overrides in kinds.items():
            ns = Namespace(
                kafka_bootstrap_servers=private_broker.bootstrap,
                http_ca_file=receiver.ca_file,
                **overrides,
            )
            made.append(ns)
            path = f"/{name}"
            ns.subscribe(receiver.url(path))
            proc = run_dispatcher(ns)
            watched.append(Watched(name, ns, proc, SteadyStream(ns, name).start(), path))
        _outage_rounds(watched, receiver, private_broker)
    finally:
        for ns in made:
            ns.drop_topics()


def _not_ready_throughout(watched: list[Watched], round_no: int, stopped_at: float) -> bool:
    """Checks every /readyz once; True once the outage has lasted long enough."""
    for w in watched:
        asked = time.monotonic()
        status, reason = w.proc.readyz()
        # Never waiting on the broker: answered well within a probe's timeout.
        assert time.monotonic() - asked < 1.0, (w.name, reason)
        assert status == 503 and reason.strip(), (round_no, w.name, status, reason)
    return time.monotonic() - stopped_at >= OUTAGE_S


def _outage_rounds(watched: list[Watched], receiver: HttpsReceiver, broker: PrivateBroker) -> None:
    for w in watched:
        wait_until(
            lambda w=w: len(w.received(receiver)) >= RATE, 30, f"{w.name}: the stream delivered"
        )
    for round_no in range(ROUNDS):
        broker.stop()
        stopped_at = time.monotonic()
        # While it is away, /readyz says so at once (from memory) and why.
        for w in watched:
            _status, reason = wait_until(
                lambda w=w: (r := w.proc.readyz())[0] == 503 and r,
                5,
                f"round {round_no}, {w.name}: /readyz to report the outage ({w.proc.readyz()})",
            )
            assert "broker unreachable since" in reason, reason
        wait_until(
            lambda stopped_at=stopped_at, round_no=round_no: _not_ready_throughout(
                watched, round_no, stopped_at
            ),
            OUTAGE_S + 5,
            "the outage to last",
            interval_s=0.5,
        )
        started = time.monotonic()
        broker.start()
        back_at = time.monotonic()
        # Consuming again: an event published after the stop (written only once the
        # broker was back, so never in a dispatcher's memory before) is delivered,
        # within the bound; each dispatcher timed on its own.
        resumed: dict[str, float] = {}

        def all_resumed(
            stopped_at: float = stopped_at, resumed: dict[str, float] = resumed
        ) -> bool:
            for w in watched:
                if w.name not in resumed and w.delivered_after(receiver, stopped_at):
                    resumed[w.name] = time.monotonic()
            return len(resumed) == len(watched)

        wait_until(
            all_resumed,
            RESUME_WITHIN_S - (time.monotonic() - back_at),
            f"round {round_no}: a delivery within {RESUME_WITHIN_S:g} s of the broker's "
            f"return by each dispatcher (resumed: {resumed})",
        )
        print(
            f"round {round_no}: delivering again "
            + ", ".join(f"{name} {at - back_at:.1f} s" for name, at in resumed.items())
            + f" after the broker's return ({back_at - started:.1f} s to start it)"
        )
        for w in watched:
            wait_until(
                lambda w=w: w.proc.readyz()[0] == 200,
                RESUME_WITHIN_S,
                f"round {round_no}, {w.name}: /readyz ready again ({w.proc.readyz()})",
            )
    for w in watched:
        published = w.stream.stop()
        assert len(published) > ROUNDS * OUTAGE_S * RATE / 2
        wait_until(
            lambda w=w, published=published: published <= w.received(receiver),
            60,
            f"{w.name}: every published event delivered "
            f"({len(published - w.received(receiver))} missing)",
        )
