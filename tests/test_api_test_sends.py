"""Test sends through ``dispatcher api`` to an endpoint that never answers, against the
real broker: bounded per organization and in all, ended by their own timeout, and
never in the way of another organization's reads or of the probes."""

from __future__ import annotations

import json
import multiprocessing
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import Queue
from multiprocessing.synchronize import Event as EventType
from queue import Empty

import httpx
import pytest
import trustme

from tests.api_support import ApiProcess
from tests.receiver import HttpsReceiver, Reply
from tests.support import Namespace, wait_until

PROBLEM = "application/problem+json"
TIMEOUT_S = 5
PER_ORGANIZATION = 4
IN_ALL = 10
SENDERS = ("org_send_a", "org_send_b", "org_send_c")
SENDS_EACH = 20  # 60 in all
QUIET = "org_quiet"
#: The bound the API promises for a read and a probe, whatever test sends do.
ANSWER_S = 0.100


@dataclass(frozen=True)
class Answer:
    org: str
    status: int
    headers: dict[str, str]
    body: dict[str, object]
    elapsed_s: float


def make_webhook(http: httpx.Client, org: str, url: str) -> str:
    assert http.put(f"/v1/organizations/{org}/plan", json={"plan": "scale"}).status_code == 200
    made = http.post(f"/v1/organizations/{org}/webhooks", json={"url": url})
    assert made.status_code == 201, made.text
    return str(made.json()["id"])


def send_path(org: str, webhook_id: str) -> str:
    return f"/v1/organizations/{org}/webhooks/{webhook_id}/test"


def send_all(
    port: int, key: str, targets: list[tuple[str, str]], out: Queue[Answer | None], go: EventType
) -> None:
    """Every test send at once, each on a connection of its own; answers put as they come.

    Run in a process of its own, connected beforehand, one thread writing 60 ready
    requests and reading the answers as they come: the senders' own work must not
    compete with the calls being measured. Puts ``None`` once connected, and sends
    when ``go`` is set.
    """
    pending: dict[socket.socket, tuple[str, bytearray]] = {}
    requests: dict[socket.socket, bytes] = {}
    for org, webhook_id in targets:
        sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        sock.setblocking(False)
        pending[sock] = (org, bytearray())
        requests[sock] = (
            f"POST {send_path(org, webhook_id)} HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\nAuthorization: {key}\r\n"
            "Content-Length: 0\r\nConnection: close\r\n\r\n"
        ).encode()
    out.put(None)
    go.wait(60)
    started = time.perf_counter()
    with selectors.DefaultSelector() as selector:
        for sock, request in requests.items():
            sock.sendall(request)  # a few hundred bytes: never more than the socket takes
            selector.register(sock, selectors.EVENT_READ)
        while pending:
            for ready, _ in selector.select(60):
                sock = ready.fileobj
                assert isinstance(sock, socket.socket)
                org, data = pending[sock]
                chunk = sock.recv(65536)
                if chunk:
                    data += chunk
                    continue
                # The server closed the connection: the answer is whole.
                took = time.perf_counter() - started
                selector.unregister(sock)
                sock.close()
                del pending[sock]
                head, _, body = bytes(data).partition(b"\r\n\r\n")
                status_line, *lines = head.decode("latin-1").split("\r\n")
                headers = {
                    name.strip().lower(): value.strip()
                    for name, _, value in (line.partition(":") for line in lines)
                }
                out.put(Answer(org, int(status_line.split()[1]), headers, json.loads(body), took))


def hang_endpoint(ca_cert: bytes, ca_key: bytes, out: Queue[str | None], stop: EventType) -> None:
    """A real HTTPS endpoint that accepts, reads every request and never answers.

    In a process of its own: its TLS handshakes and threads would otherwise compete
    with the measured calls for the test's interpreter. Puts its URL, then the
    ``X-Bullseye-Test`` header of each request as it arrives, until ``stop``.
    """
    with HttpsReceiver(ca=trustme.CA.from_pem(ca_cert, ca_key)) as receiver:
        receiver.respond("/hang", Reply(200, delay_s=600))
        out.put(receiver.url("/hang"))
        seen = 0
        while not stop.is_set():
            try:
                got = receiver.wait_for_requests(seen + 1, path="/hang", timeout_s=0.1)
            except TimeoutError:
                continue
            for request in got[seen:]:
                out.put(request.header("x-bullseye-test"))
            seen = len(got)


def timed(call: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    response = call()
    return response, time.perf_counter() - started


@pytest.mark.alone
def test_hanging_test_sends_are_bounded_and_never_slow_others(
    ns: Namespace, run_api: Callable[..., ApiProcess], receiver: HttpsReceiver
) -> None:
    spawn = multiprocessing.get_context("spawn")
    hang_events: Queue[str | None] = spawn.Queue()
    hang_stop = spawn.Event()
    ca = (receiver.ca.cert_pem.bytes(), receiver.ca.private_key_pem.bytes())
    hang = spawn.Process(target=hang_endpoint, args=(*ca, hang_events, hang_stop))
    hang.start()
    try:
        hang_url = hang_events.get(timeout=60)
        assert isinstance(hang_url, str)
        sends_to_a_hanging_endpoint(receiver, hang_url, hang_events, run_api, ns, spawn)
    finally:
        hang_stop.set()
        hang.join(15)
        if hang.is_alive():
            hang.terminate()


def sends_to_a_hanging_endpoint(
    receiver: HttpsReceiver,
    hang_url: str,
    hang_events: Queue[str | None],
    run_api: Callable[..., ApiProcess],
    ns: Namespace,
    spawn: multiprocessing.context.SpawnContext,
) -> None:
    hung: list[str | None] = []  # X-Bullseye-Test of each request the endpoint got

    def hung_count() -> int:
        while True:
            try:
                hung.append(hang_events.get_nowait())
            except Empty:
                return len(hung)

    api = run_api(
        ns,
        api_test_send_timeout_s=TIMEOUT_S,
        api_test_sends_per_organization=PER_ORGANIZATION,
        api_test_sends_max=IN_ALL,
    )
    admin = api.admin()
    hooks = {org: make_webhook(admin, org, hang_url) for org in SENDERS}
    quiet_hooks = [make_webhook(admin, QUIET, receiver.url(f"/quiet{i}")) for i in range(3)]
    targets = [(org, hooks[org]) for _ in range(SENDS_EACH) for org in SENDERS]
    assert len(targets) == 60

    queue: Queue[Answer | None] = spawn.Queue()
    go = spawn.Event()
    answers: list[Answer] = []

    def collect() -> list[Answer]:
        while True:
            try:
                answer = queue.get_nowait()
            except Empty:
                return answers
            if answer is not None:
                answers.append(answer)

    quiet = api.viewer()  # another organization's dashboard, on a warm connection
    probe = api.client()
    listing = f"/v1/organizations/{QUIET}/webhooks"
    assert len(quiet.get(listing).json()["data"]) == 3
    assert probe.get("/healthz").status_code == 200
    timings: list[tuple[str, float]] = []

    def measure_round() -> None:
        r, took = timed(lambda: quiet.get(listing))
        assert r.status_code == 200 and len(r.json()["data"]) == 3, r.text
        timings.append(("list", took))
        h, took = timed(lambda: probe.get("/healthz"))
        assert h.status_code == 200 and h.text == "ok\n"
        timings.append(("healthz", took))

    def settled() -> bool:
        # Every send beyond the bounds answered, the admitted ones hanging at the endpoint.
        return len(collect()) >= 60 - IN_ALL and hung_count() >= IN_ALL

    bearer = f"Bearer {api.admin_key}"
    sends = spawn.Process(target=send_all, args=(api.port, bearer, targets, queue, go))
    sends.start()
    try:
        assert queue.get(timeout=60) is None  # connected: its start-up is not in the measures
        go.set()
        deadline = time.monotonic() + TIMEOUT_S
        # While the 60 arrive, then while the admitted ones hang.
        while not settled() and time.monotonic() < deadline:
            measure_round()
        during_burst = len(timings)
        for _ in range(20):
            measure_round()
        early = list(collect())
        assert len(early) == 60 - IN_ALL, "the sends were not all answered or hanging in time"
        assert all(a.status == 429 for a in early), [(a.status, a.body) for a in early]
        assert hung_count() == IN_ALL

        # Beyond the bounds, while those hang: an organization at its own bound is told
        # so, and one with nothing in flight is refused by the bound in all.
        in_flight = {org: SENDS_EACH - sum(a.org == org for a in early) for org in SENDERS}
        assert sum(in_flight.values()) == IN_ALL and max(in_flight.values()) <= PER_ORGANIZATION
        full = next(org for org, n in in_flight.items() if n == PER_ORGANIZATION)
        with api.admin() as more:
            own = more.post(send_path(full, hooks[full]))
            assert own.status_code == 429, own.text
            assert own.headers["retry-after"] == str(TIMEOUT_S)
            assert f"already has {PER_ORGANIZATION} test sends in flight" in own.json()["detail"]
            other = more.post(send_path(QUIET, quiet_hooks[0]))
            assert other.status_code == 429, other.text
            assert other.headers["content-type"] == PROBLEM
            assert other.headers["retry-after"] == str(TIMEOUT_S)
            assert other.json()["type"].endswith("/too-many-test-sends")
            assert f"{IN_ALL} test sends are in flight" in other.json()["detail"]
        assert len(collect()) == 60 - IN_ALL, "the admitted sends ended before the checks"
        assert receiver.requests_to("/quiet0") == []

        wait_until(lambda: len(collect()) == 60, TIMEOUT_S + 30, "every test send to be answered")
        sends.join(10)
        assert sends.exitcode == 0
    finally:
        if sends.is_alive():  # a failed check: its sends would wait up to a minute
            sends.terminate()

    # Reads and probes answered in < 100 ms each, all along.
    assert len(timings) >= 40
    slow = [(i, what, round(took * 1000, 1)) for i, (what, took) in enumerate(timings)]
    slow = [call for call in slow if call[2] >= ANSWER_S * 1000]
    assert not slow, f"answers of 100 ms or more (#, what, ms): {slow}; {during_burst} in the burst"
    for kind in ("list", "healthz"):
        worst = max(took for what, took in timings if what == kind)
        print(f"{kind}: {sum(w == kind for w, _ in timings)} calls, max {worst * 1000:.1f} ms")

    refused = [a for a in answers if a.status == 429]
    admitted = [a for a in answers if a.status == 200]
    assert len(refused) == 60 - IN_ALL and len(admitted) == IN_ALL
    for a in refused:
        assert a.headers["content-type"] == PROBLEM
        assert a.headers["retry-after"] == str(TIMEOUT_S)
        assert a.body["type"] == "https://docs.bullseye.example/problems/too-many-test-sends"
        assert a.body["status"] == 429
        assert a.elapsed_s < TIMEOUT_S  # refused at once, not queued for a slot

    # Each admitted send ended at the timeout, with a clear result.
    for a in admitted:
        assert a.body["ok"] is False and a.body["status_code"] is None
        assert a.body["error_class"] == "timeout"
        assert a.body["reason"] == (
            f"the endpoint did not answer in time: no answer within {TIMEOUT_S} s"
        )
        # The loop's clock and perf_counter differ by a fraction of a millisecond.
        assert (
            (TIMEOUT_S - 0.01) * 1000 <= float(str(a.body["duration_ms"])) < (TIMEOUT_S + 2) * 1000
        )
        assert a.elapsed_s >= TIMEOUT_S
    assert hung_count() == IN_ALL and hung == ["true"] * IN_ALL

    # The slots are free again: the next test send goes out and is answered.
    with api.admin() as http:
        ok = http.post(send_path(QUIET, quiet_hooks[1]))
    assert ok.status_code == 200, ok.text
    assert ok.json()["ok"] is True and ok.json()["status_code"] == 200
    assert len(receiver.requests_to("/quiet1")) == 1
