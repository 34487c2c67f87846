"""A real webhook receiver for tests: HTTPS on 127.0.0.1, run in background threads.

It records every request it gets (method, path, headers, raw body, TLS server
name) and answers with replies chosen per path, so tests can script an endpoint
that fails twice and then succeeds, answers slowly, or asks for ``Retry-After``::

    with HttpsReceiver(hostnames=("localhost",)) as receiver:
        receiver.respond("/hook", Reply(503, retry_after="7"), Reply(200))
        ...  # POST to receiver.url("/hook"), trusting receiver.ca_file
        first, second = receiver.wait_for_requests(2, path="/hook")

The certificate comes from a private ``trustme`` CA whose PEM is at
``ca_file``; the dispatcher trusts it through ``DISPATCHER_HTTP_CA_FILE``. Names
other than ``localhost`` reach it only through a resolver that maps them to
127.0.0.1. With ``tls=False`` it speaks plain HTTP instead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import socketserver
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

import trustme

__all__ = ["HttpsReceiver", "ReceivedRequest", "Reply"]

#: Idle time after which the receiver drops a kept-alive or stalled connection.
CONNECTION_TIMEOUT_S = 30.0
_STOP_JOIN_S = 5.0


@dataclass(frozen=True)
class Reply:
    """One scripted answer.

    ``delay_s`` is waited before answering (cut short by :meth:`HttpsReceiver.stop`);
    ``retry_after`` becomes a ``Retry-After`` header; ``headers`` are added as is
    (for example ``{"Location": ...}`` with a 3xx status).
    """

    status: int = 200
    body: bytes = b""
    delay_s: float = 0.0
    retry_after: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ReceivedRequest:
    """One request as the receiver saw it, recorded when its body had arrived."""

    method: str
    #: Path with the query string, as sent.
    path: str
    #: Header names lower-cased; repeated headers joined with ", ".
    headers: Mapping[str, str]
    #: Headers in wire order, names as sent.
    raw_headers: tuple[tuple[str, str], ...]
    body: bytes
    #: Server name the client sent in its TLS hello (SNI); None over plain HTTP.
    sni: str | None
    #: Wall-clock time of arrival (``time.time()``).
    received_at: float

    def header(self, name: str) -> str | None:
        """The value of header ``name``, matched case-insensitively."""
        return self.headers.get(name.lower())


class HttpsReceiver:
    """A threaded HTTP/1.1 server on ``host`` with scripted replies; see the module doc.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. Unscripted
    paths get :attr:`default_reply` (200, empty body). Thread-safe.
    """

    def __init__(
        self,
        hostnames: Iterable[str] = ("localhost", "127.0.0.1"),
        *,
        tls: bool = True,
        ca: trustme.CA | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.hostnames = tuple(hostnames)
        if not self.hostnames:
            raise ValueError("at least one hostname is needed for the certificate")
        self.tls = tls
        self.ca = ca or trustme.CA()
        self.default_reply = Reply()
        self._host = host
        self._requested_port = port
        self._lock = threading.Condition()
        self._requests: list[ReceivedRequest] = []
        self._replies: dict[str, list[Reply]] = {}
        self._deciders: dict[str, Callable[[ReceivedRequest], Reply]] = {}
        self._handshake_failures = 0
        self._connections: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._stopping = threading.Event()
        self._local = threading.local()
        self._server: _Server | None = None
        self._serve_thread: threading.Thread | None = None
        self._tmpdir: str | None = None
        self._ssl_context: ssl.SSLContext | None = None

    # --- lifecycle ----------------------------------------------------------

    def start(self) -> HttpsReceiver:
        """Bind, and serve in a background thread. Returns ``self``."""
        if self._server is not None:
            raise RuntimeError("receiver already started")
        self._tmpdir = tempfile.mkdtemp(prefix="receiver-")
        self.ca.cert_pem.write_to_path(os.path.join(self._tmpdir, "ca.pem"))
        if self.tls:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.ca.issue_cert(*self.hostnames).configure_cert(context)
            context.sni_callback = self._on_sni
            self._ssl_context = context
        self._stopping.clear()
        self._server = _Server((self._host, self._requested_port), self)
        self._serve_thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"receiver-{self.port}",
            daemon=True,
        )
        self._serve_thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, drop open connections and wait for handler threads."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        with self._lock:
            connections = list(self._connections)
            threads = list(self._threads)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + _STOP_JOIN_S
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self._serve_thread is not None:
            self._serve_thread.join(max(0.0, deadline - time.monotonic()))
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> HttpsReceiver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- addresses ----------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound TCP port."""
        if self._server is None:
            raise RuntimeError("receiver not started")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        """``https://<first hostname>:<port>`` (``http://`` when ``tls=False``)."""
        return self.url("")

    def url(self, path: str = "/", hostname: str | None = None) -> str:
        """The URL of ``path`` under ``hostname`` (default: the first hostname)."""
        scheme = "https" if self.tls else "http"
        name = hostname or self.hostnames[0]
        if ":" in name:
            name = f"[{name}]"
        return f"{scheme}://{name}:{self.port}{path}"

    @property
    def ca_file(self) -> str:
        """Path of the CA certificate (PEM) to trust; valid until :meth:`stop`."""
        if self._tmpdir is None:
            raise RuntimeError("receiver not started")
        return os.path.join(self._tmpdir, "ca.pem")

    # --- scripting and inspection ------------------------------------------

    def respond(self, path: str, *replies: Reply) -> None:
        """Script the replies to ``path`` (without query): in order, the last one repeats."""
        if not replies:
            raise ValueError("at least one reply is needed")
        with self._lock:
            self._replies[path] = list(replies)

    def respond_with(self, path: str, decide: Callable[[ReceivedRequest], Reply]) -> None:
        """Answer each request to ``path`` with what ``decide`` says of it.

        For replies that depend on the request (its attempt number, a coin): it
        runs in the connection's thread, under the receiver's lock.
        """
        with self._lock:
            self._deciders[path] = decide

    def reset(self) -> None:
        """Forget recorded requests, scripted replies and handshake failures."""
        with self._lock:
            self._requests.clear()
            self._replies.clear()
            self._deciders.clear()
            self._handshake_failures = 0

    @property
    def requests(self) -> list[ReceivedRequest]:
        """A snapshot of every request received so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def requests_to(self, path: str) -> list[ReceivedRequest]:
        """The requests received for ``path`` (query string ignored)."""
        return [r for r in self.requests if _route(r.path) == path]

    @property
    def handshake_failures(self) -> int:
        """Connections whose TLS handshake failed (a client refusing our certificate)."""
        with self._lock:
            return self._handshake_failures

    def wait_for_requests(
        self, count: int, path: str | None = None, timeout_s: float = 10.0
    ) -> list[ReceivedRequest]:
        """Block until at least ``count`` requests (to ``path``, if given) arrived.

        Returns them; raises ``TimeoutError`` naming what did arrive otherwise.
        """

        def matching() -> list[ReceivedRequest]:
            return [r for r in self._requests if path is None or _route(r.path) == path]

        with self._lock:
            if self._lock.wait_for(lambda: len(matching()) >= count, timeout=timeout_s):
                return matching()
            seen = [(r.method, r.path) for r in self._requests]
        raise TimeoutError(f"wanted {count} request(s) to {path or 'any path'}, got {seen}")

    # --- called from the server threads --------------------------------------

    def _on_sni(self, _sock: Any, server_name: str | None, _context: ssl.SSLContext) -> None:
        # Runs during the handshake, in the connection's own thread.
        self._local.sni = server_name

    def _serve_connection(self, sock: socket.socket, address: Any, server: _Server) -> None:
        conn = sock
        with self._lock:
            self._connections.add(sock)
            self._threads.add(threading.current_thread())
        try:
            conn.settimeout(CONNECTION_TIMEOUT_S)
            self._local.sni = None
            if self._ssl_context is not None:
                try:
                    conn = self._ssl_context.wrap_socket(sock, server_side=True)
                except (ssl.SSLError, OSError):
                    with self._lock:
                        self._handshake_failures += 1
                    return
                with self._lock:
                    self._connections.add(conn)
            # A client that goes away mid-exchange is an expected case in tests.
            with contextlib.suppress(OSError):
                _Handler(conn, address, server)
        finally:
            with self._lock:
                self._connections.discard(sock)
                self._connections.discard(conn)
                self._threads.discard(threading.current_thread())
            conn.close()

    def _record(self, request: ReceivedRequest) -> Reply:
        with self._lock:
            self._requests.append(request)
            decide = self._deciders.get(_route(request.path))
            script = self._replies.get(_route(request.path))
            if decide is not None:
                reply = decide(request)
            elif script:
                reply = script.pop(0) if len(script) > 1 else script[0]
            else:
                reply = self.default_reply
            self._lock.notify_all()
        return reply


def _route(path: str) -> str:
    return path.split("?", 1)[0]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog of 5 overflows when a dispatcher opens a burst
    # of connections; the kernel then drops SYNs, and the client retries only after
    # 1 s, which would show up as a second of delivery latency that is not ours.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], owner: HttpsReceiver) -> None:
        self.owner = owner
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer's own server_bind looks the host up in DNS (getfqdn), which
        # can stall on a machine without a resolver; the name is only cosmetic.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def finish_request(self, request: Any, client_address: Any) -> None:
        self.owner._serve_connection(request, client_address, self)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def do_POST(self) -> None:
        self._answer()

    do_GET = do_PUT = do_PATCH = do_DELETE = do_POST

    def log_message(self, format: str, *args: Any) -> None:
        pass  # tests read requests from the receiver, not from stderr

    def _answer(self) -> None:
        owner = self.server.owner
        body = self._read_body()
        lowered: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            lowered[key] = f"{lowered[key]}, {value}" if key in lowered else value
        reply = owner._record(
            ReceivedRequest(
                method=self.command,
                path=self.path,
                headers=lowered,
                raw_headers=tuple(self.headers.items()),
                body=body,
                sni=getattr(owner._local, "sni", None),
                received_at=time.time(),
            )
        )
        if reply.delay_s > 0:
            owner._stopping.wait(reply.delay_s)
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if reply.retry_after is not None:
            self.send_header("Retry-After", reply.retry_after)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        self.wfile.write(reply.body)
        self.wfile.flush()

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _read_chunked(self) -> bytes:
        parts: list[bytes] = []
        while True:
            size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                break
            parts.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline().strip():
            pass  # trailers
        return b"".join(parts)
