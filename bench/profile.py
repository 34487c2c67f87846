"""Attach py-spy to a running process, and boil its samples down to the hot functions."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

PY_SPY = Path(sys.executable).parent / "py-spy"


class Profiler:
    """``py-spy record`` of the GIL-holding thread (what limits a Python process)."""

    def __init__(self, pid: int, out: Path, rate: int = 200) -> None:
        self.out = out
        self._proc = subprocess.Popen(
            [
                str(PY_SPY),
                "record",
                "-p",
                str(pid),
                "-r",
                str(rate),
                "--gil",
                "--nolineno",
                "--full-filenames",
                "-f",
                "raw",
                "-o",
                str(out),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)


def _name(frame: str) -> str:
    """``func (path/to/module.py:123)`` -> ``func (module.py)``."""
    func, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = path.replace("\\", "/").split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else path
    for marker in ("site-packages/", "python3.11/"):
        if marker in path:
            short = path.split(marker, 1)[1]
    return f"{func} ({short})"


#: Where a sample's innermost frame lies, by path fragment, checked in order.
_COMPONENTS = (
    (("aiohttp/", "multidict/", "yarl/", "aiohappyeyeballs/"), "aiohttp (engine)"),
    (("httpx/",), "httpx (requests and responses)"),
    (("ssl.py", "sslproto.py"), "TLS"),
    (("httpcore/", "h11/", "anyio/"), "httpcore"),
    (("pydantic",), "pydantic"),
    (("json/", "orjson"), "json"),
    (("hmac.py", "hashlib"), "HMAC and hashing"),
    (("prometheus_client",), "prometheus_client"),
    (("logging/",), "logging"),
    (("confluent_kafka",), "confluent_kafka"),
    (("asyncio/", "selectors.py", "uvloop"), "event loop (asyncio, uvloop)"),
)


def component(frames: list[str]) -> str:
    """The library a sample was in, else the dispatcher function it was in."""
    leaf = frames[-1]
    for fragments, name in _COMPONENTS:
        if any(f in leaf for f in fragments):
            return name
    for frame in reversed(frames):
        if "(dispatcher/" in frame:
            return frame
    return "other"


def summarize(raw: Path, top: int = 20) -> dict[str, Any]:
    """Self and inclusive shares of the samples, per function, from collapsed stacks."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    components: Counter[str] = Counter()
    total = 0
    if not raw.exists():
        return {"samples": 0, "components": [], "self": [], "inclusive": []}
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_name(f) for f in stack.split(";") if not f.startswith("process ")]
        frames = [f for f in frames if not f.startswith("thread ")]
        if not frames:
            continue
        total += count
        self_time[frames[-1]] += count
        components[component(frames)] += count
        for name in set(frames):
            inclusive[name] += count

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100 * n / total, 1)) for name, n in counter.most_common(top)]

    return {
        "samples": total,
        "components": share(components),
        "self": share(self_time),
        "inclusive": share(inclusive),
    }
