"""One HTTP port for ``/metrics``, ``/healthz`` (liveness) and ``/readyz`` (readiness)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dispatcher.errors import ConfigError
from dispatcher.metrics import REGISTRY

#: The event loop beats every second; this long without a beat means it is stuck.
STALL_AFTER_S = 15.0


class Health:
    """Liveness from the loop's heartbeat, readiness from a callback."""

    def __init__(self, is_ready: Callable[[], tuple[bool, str]]) -> None:
        self._is_ready = is_ready
        self.last_beat = time.monotonic()

    def beat(self) -> None:
        self.last_beat = time.monotonic()

    def alive(self) -> tuple[bool, str]:
        stalled = time.monotonic() - self.last_beat
        if stalled > STALL_AFTER_S:
            return False, f"event loop has not run for {stalled:.0f} s"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        return self._is_ready()


class HealthServer:
    """A small threaded HTTP server; started before Kafka so probes answer at once."""

    def __init__(self, host: str, port: int, health: Health) -> None:
        outer = health

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
                elif path in ("/healthz", "/readyz"):
                    ok, why = outer.alive() if path == "/healthz" else outer.ready()
                    self._send(200 if ok else 503, (why + "\n").encode(), "text/plain")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # probes every few seconds would drown the logs

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise ConfigError(
                f"DISPATCHER_HTTP_PORT: cannot listen on {host}:{port}: {exc.strerror or exc}"
            ) from None
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="health-http", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
