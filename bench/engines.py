"""Phase 0: the HTTP engines side by side, each a bare POST loop to the same receiver.

Every engine of :mod:`bench.baseline` runs the same ``total`` POSTs of the event
body to the ten hot endpoints (``per_endpoint`` connections each), on asyncio's
own event loop and on uvloop. The rates come from the receiver's clock, the CPU
time from the loop's process. ``legacy`` optionally names a source tree holding
an earlier ``dispatcher`` package (with its ``bench``), whose ``dispatcher``
baseline is measured too, so that a replaced engine can be compared in one run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.harness import REPO, BenchError, Receiver, Window

LOOPS = ("asyncio", "uvloop")
#: Engines compared on both loops; the rest on asyncio's only.
BOTH_LOOPS = ("httpx_aiohttp", "dispatcher_direct", "aiohttp")
ENGINES = (
    "httpx_pool_per_endpoint",
    "httpx_aiohttp",
    "dispatcher",
    "dispatcher_direct",
    "aiohttp",
)


def window_of(receiver: Receiver, prefix: str, n: int, warmup: float, tail: float) -> Window:
    return receiver.window(prefix, int(n * warmup), int(n * tail))


def bare_loop(
    receiver: Receiver,
    ca_file: Path,
    kind: str,
    body: bytes,
    endpoints: int,
    per_endpoint: int,
    n: int,
    *,
    loop: str = "asyncio",
    cwd: Path = REPO,
    warmup: float = 0.1,
    tail: float = 0.05,
) -> dict[str, Any]:
    """One bare loop of ``kind`` in a child process; its rate and CPU per request."""
    receiver.reset()
    spec = {
        "urls": [receiver.url(i, f"/ok/b{i}") for i in range(endpoints)],
        "body_hex": body.hex(),
        "concurrency": per_endpoint,
        "total": n,
        "ca_file": str(ca_file),
        "kind": kind,
        "loop": loop,
    }
    done = subprocess.run(
        [sys.executable, "-m", "bench.baseline", json.dumps(spec)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode != 0:
        raise BenchError(f"baseline {kind} on {loop} failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout)
    if result["failures"]:
        raise BenchError(f"baseline {kind}: {result['failures']} requests failed")
    w = window_of(receiver, "/ok/b", n, warmup, tail)
    return {
        "kind": kind,
        "loop": loop,
        "requests": n,
        "per_s": round(w.rate, 1),
        "loop_seconds": round(result["seconds"], 3),
        "cpu_ms_per_request": round(1000 * result["cpu_seconds"] / n, 3),
    }


def compare(
    receiver: Receiver,
    ca_file: Path,
    body: bytes,
    endpoints: int,
    per_endpoint: int,
    n: int,
    legacy: Path | None,
    say: Any,
) -> list[dict[str, Any]]:
    """Every engine on asyncio (and the fast ones on uvloop too), plus a legacy tree's."""
    runs: list[tuple[str, str, Path]] = []
    if legacy is not None:
        runs.append(("dispatcher", "asyncio", legacy))
    for kind in ENGINES:
        for loop in LOOPS if kind in BOTH_LOOPS else LOOPS[:1]:
            runs.append((kind, loop, REPO))
    out = []
    for kind, loop, cwd in runs:
        # One shared httpcore pool is so slow that a tenth of the requests tells its rate.
        count = max(n // 10, min(n, 2000)) if kind == "httpx_one_pool" else n
        label = f"{kind} (legacy tree)" if cwd != REPO else kind
        say(f"engines: {label} on {loop}, {count} POSTs, {endpoints} x {per_endpoint}")
        row = bare_loop(
            receiver, ca_file, kind, body, endpoints, per_endpoint, count, loop=loop, cwd=cwd
        )
        if cwd != REPO:
            row["kind"] = "legacy_pool"
        out.append(row)
    return out
