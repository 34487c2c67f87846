"""Memory of the API's delivery history index, measured.

Fills a :class:`~dispatcher.api.history.HistoryIndex` as the attempts topic would
(``--webhooks`` webhooks with ``--deliveries`` deliveries each; one in ten
deliveries fails three times before it succeeds) and reports the resident memory
it added and the bytes per delivery kept::

    .venv/bin/python -m bench.history_memory --webhooks 10000 --deliveries 100
"""

from __future__ import annotations

import argparse
import gc
import resource
import time
from datetime import UTC, datetime, timedelta

from dispatcher.api.history import HistoryIndex
from dispatcher.attempts import AttemptRecord
from dispatcher.records import Source


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--webhooks", type=int, default=10_000)
    parser.add_argument("--deliveries", type=int, default=100)
    args = parser.parse_args()

    source = Source(topic="visitor.identified", partition=0, offset=0)
    start = datetime.now(UTC) - timedelta(hours=12)
    # One record reused as a template: what is measured is the index, not the records.
    template = AttemptRecord(
        delivery_id="x",
        webhook_id="x",
        organization_id="org",
        event="visitor.identified",
        event_timestamp=start,
        source=source,
        attempt=1,
        stage="input",
        at=start,
        duration_ms=42.0,
        ok=True,
        status_code=200,
    )
    gc.collect()
    before = rss_mb()
    index = HistoryIndex(per_webhook=args.deliveries)
    began = time.perf_counter()
    offset = 0
    attempts = 0
    for w in range(args.webhooks):
        webhook_id = f"wh_{w:020d}"
        for d in range(args.deliveries):
            delivery_id = f"msg_{w:016x}{d:016x}"
            at = start + timedelta(seconds=d * 30)
            tries = 4 if d % 10 == 0 else 1
            for attempt in range(1, tries + 1):
                ok = attempt == tries
                record = template.model_copy(
                    update={
                        "delivery_id": delivery_id,
                        "webhook_id": webhook_id,
                        "session_id": f"sess_{w}_{d}",
                        "attempt": attempt,
                        "at": at,
                        "ok": ok,
                        "status_code": 200 if ok else 503,
                        "error_class": "none" if ok else "http",
                        "next_retry_at": None if ok else at + timedelta(minutes=1),
                        "body": "{}" if attempt == 1 else None,
                    }
                )
                index.apply(record, offset % 12, offset)
                offset += 1
                attempts += 1
    elapsed = time.perf_counter() - began
    gc.collect()
    added = rss_mb() - before
    kept = args.webhooks * args.deliveries
    print(f"webhooks:            {args.webhooks}")
    print(f"deliveries kept:     {kept} ({attempts} attempts)")
    print(f"RSS added:           {added:.0f} MiB")
    print(f"per delivery:        {added * 2**20 / kept:.0f} bytes")
    print(f"fill time:           {elapsed:.1f} s ({attempts / elapsed:,.0f} attempts/s)")


if __name__ == "__main__":
    main()
