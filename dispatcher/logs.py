"""Structured JSON logs: one object a line, with the delivery id when there is one."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

#: Attributes of ``extra={...}`` copied into the JSON line; anything else is dropped,
#: so a careless ``extra`` can never leak a subscription (and its secret) into a log.
_FIELDS = (
    "delivery_id",
    "webhook_id",
    "attempt",
    "stage",
    "subscriptions",
    "reason",
    "api_key",
    "action",
    "organization_id",
)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in _FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class RepeatFilter(logging.Filter):
    """Drop a line identical to one let through less than ``window_s`` ago.

    librdkafka repeats a connection failure many times a second while a broker
    is down; one line per window says the same.
    """

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.window_s = window_s
        self._clock = clock
        self._last: dict[tuple[int, str], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        now = self._clock()
        key = (record.levelno, record.getMessage())
        last = self._last.get(key)
        if last is not None and now - last < self.window_s:
            return False
        if len(self._last) >= _REPEAT_MEMORY:
            self._last = {k: t for k, t in self._last.items() if now - t < self.window_s}
        self._last[key] = now
        return True


#: Distinct lines remembered by :class:`RepeatFilter` before old ones are pruned.
_REPEAT_MEMORY = 1000
#: librdkafka's own lines (see :func:`dispatcher.kafka.send_client_logs_to`).
KAFKA_CLIENT_LOGGER = "librdkafka"


def configure_logging(level: str) -> None:
    """Send JSON lines to stderr at ``level``; quiet the chatty libraries.

    Python warnings and uncaught exceptions in any thread become JSON lines too,
    so that nothing the service writes to stderr is anything but JSON.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    kafka_client = logging.getLogger(KAFKA_CLIENT_LOGGER)
    kafka_client.filters[:] = [RepeatFilter(10.0)]
    logging.captureWarnings(True)
    crash = logging.getLogger("dispatcher.crash")

    def thread_crashed(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit or args.exc_value is None:
            return
        name = args.thread.name if args.thread is not None else "?"
        exc_info = (args.exc_type, args.exc_value, args.exc_traceback)
        crash.error("uncaught exception in thread %s", name, exc_info=exc_info)

    def crashed(
        exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
    ) -> None:
        crash.error("uncaught exception", exc_info=(exc_type, exc, tb))

    threading.excepthook = thread_crashed
    sys.excepthook = crashed
