"""The dispatcher under measurement: ``dispatcher run`` as a child process, and its metrics."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from types import TracebackType

from bench.harness import REPO, BenchError, Namespace, memory_mb, process_cpu_s, wait_for


def metric_in(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples (with these labels) in a /metrics page."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric == name and all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            total += float(value)
    return total


class Dispatcher:
    """``dispatcher run`` as a child process, as it runs in production."""

    def __init__(self, ns: Namespace, log_path: Path) -> None:
        self.port = int(ns.values["http_port"])
        self._log = log_path
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dispatcher.commands.cli", "run"],
                env=ns.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )

    def __enter__(self) -> Dispatcher:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def alive(self) -> None:
        if self.proc.poll() is not None:
            tail = self._log.read_text(errors="replace")[-3000:]
            raise BenchError(f"the dispatcher exited ({self.proc.returncode}):\n{tail}")

    def wait_ready(self, timeout_s: float = 90) -> None:
        def ready() -> bool:
            self.alive()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        wait_for(ready, timeout_s, "the dispatcher to be ready", every_s=0.1)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            return str(r.read().decode())

    def metric(self, name: str, **labels: str) -> float:
        return metric_in(self.metrics(), name, **labels)

    def cpu_s(self) -> float:
        """CPU time (user + system, every thread) the process has used so far."""
        return process_cpu_s(self.proc.pid)

    def open_files(self) -> int:
        """File descriptors the process holds (sockets among them)."""
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def memory_mb(self) -> dict[str, float]:
        """Peak (VmHWM) and current (VmRSS) resident memory, in MB."""
        return memory_mb(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
