"""Fixtures: the real broker (started by scripts/kafka.sh), namespaces, receivers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from tests.brokers import PrivateBroker
from tests.cli_support import Cli, make_inprocess
from tests.receiver import HttpsReceiver
from tests.support import BOOTSTRAP, DispatcherProcess, Namespace


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that needs the broker (through any fixture) carries the ``kafka`` marker,
    so ``pytest -m 'not kafka'`` runs the in-process tests alone, in seconds."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "broker" in fixtures:
            item.add_marker(pytest.mark.kafka)
        if "private_broker" in fixtures:
            # Under pytest-xdist (--dist loadgroup) one worker runs these one after
            # another: each starts a JVM, and a port a stopped broker gave back must
            # not be taken by another test's broker while this one expects silence.
            item.add_marker(pytest.mark.xdist_group("private_broker"))


@pytest.fixture(scope="session")
def broker() -> str:
    """The local broker's address; the run fails (never skips) when it is down."""
    try:
        AdminClient({"bootstrap.servers": BOOTSTRAP}).list_topics(timeout=10)
    except KafkaException as exc:
        pytest.fail(
            f"no Kafka broker at {BOOTSTRAP} ({exc}); start it with `bash scripts/kafka.sh start`"
        )
    return BOOTSTRAP


@pytest.fixture
def private_broker(broker: str, tmp_path: Path) -> Iterator[PrivateBroker]:
    """A broker of this test's own, started; stopped at the end of the test.

    For tests that stop and restart the broker: never the shared one. Depends on
    ``broker`` so that it carries the ``kafka`` marker and the jars are known to be there.
    """
    made = PrivateBroker(tmp_path / "kafka").start()
    yield made
    if made.running():
        made.stop()


@pytest.fixture
def receiver() -> Iterator[HttpsReceiver]:
    with HttpsReceiver() as r:
        yield r


@pytest.fixture
def ns_factory(broker: str, receiver: HttpsReceiver):  # type: ignore[no-untyped-def]
    made: list[Namespace] = []

    def make(**overrides: object) -> Namespace:
        overrides.setdefault("http_ca_file", receiver.ca_file)
        ns = Namespace(**overrides)
        made.append(ns)
        return ns

    yield make
    # Keep the one test broker small: a whole suite would otherwise leave
    # thousands of partitions behind.
    for ns in made:
        ns.drop_topics()


@pytest.fixture
def ns(ns_factory) -> Namespace:  # type: ignore[no-untyped-def]
    return ns_factory()


@pytest.fixture
def dispatchers(tmp_path: Path) -> Iterator[list[DispatcherProcess]]:
    """Processes started by a test; any still running are killed at the end."""
    started: list[DispatcherProcess] = []
    yield started
    for proc in started:
        proc.stop()


@pytest.fixture
def run_dispatcher(dispatchers: list[DispatcherProcess], tmp_path: Path):  # type: ignore[no-untyped-def]
    def start(ns: Namespace, wait_ready: bool = True, **extra: object) -> DispatcherProcess:
        log = tmp_path / f"dispatcher-{len(dispatchers)}.log"
        proc = DispatcherProcess(ns, log, **extra)
        dispatchers.append(proc)
        return proc.start(wait_ready=wait_ready)

    return start


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    """The command line, run in-process."""
    return make_inprocess(monkeypatch, capsys)


@pytest.fixture(scope="module")
def shared_ns(broker: str) -> Iterator[Namespace]:
    """One namespace per module for the many refusals, which write nothing."""
    ns = Namespace()
    yield ns
    ns.drop_topics()


@pytest.fixture
def run_api(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Start ``dispatcher api`` processes for a test; stopped at its end."""
    from tests.api_support import ApiProcess

    started: list[ApiProcess] = []

    def start(ns: Namespace, wait_ready: bool = True, **extra: object) -> ApiProcess:
        api = ApiProcess(ns, tmp_path / f"api-{len(started)}.log", **extra)
        started.append(api)
        return api.start(wait_ready)

    yield start
    for api in started:
        api.stop()
