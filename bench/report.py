"""The benchmark's results as one table, each scenario next to its baseline and target."""

from __future__ import annotations

from typing import Any

Row = tuple[str, str, str]


def _engines(results: dict[str, Any]) -> list[Row]:
    return [
        (
            f"0 engines: {e['kind']} on {e['loop']}",
            f"{e['per_s']:.0f} req/s",
            f"{e['cpu_ms_per_request']:.3f} CPU ms each",
        )
        for e in results.get("engines", [])
    ]


def _throughput(t: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for name, title in (
        ("same_engine", "bare loop, same engine and client"),
        ("ceiling", "bare aiohttp loop (ceiling)"),
        ("httpx", "stock httpx loop, a pool per endpoint"),
    ):
        b = t["baseline"][name]
        rows.append(
            (
                f"1 hot: {title}",
                f"{b['per_s']:.0f} req/s",
                f"{b['cpu_ms_per_request']:.3f} CPU ms each",
            )
        )
    d = t["dispatcher"]
    return [
        *rows,
        (
            "1 hot: dispatcher, 10 endpoints",
            f"{d['per_s']:.0f} /s",
            f"{d['cpu_ms_per_delivery']:.3f} CPU ms each (target <= 0.4), "
            f"{d['deferred']:.0f} deferred",
        ),
        ("1 hot: ratio to the same engine", f"{t['ratio_same_engine']:.3f}", "target >= 0.85"),
        ("1 hot: ratio to the ceiling", f"{t['ratio_ceiling']:.3f}", "target >= 0.3"),
        ("1 hot: ratio to stock httpx", f"{t['ratio_httpx']:.3f}", ""),
    ]


def _origins(o: dict[str, Any]) -> list[Row]:
    handshake = o.get("handshake_cpu_ms")
    return [
        (
            "2 many origins: dispatcher",
            f"{o['per_s']:.0f} /s",
            f"{o['cpu_ms_per_delivery']:.3f} CPU ms each, "
            f"{o['connections_per_delivery']:.2f} new TLS connections each",
        ),
        (
            "2 many origins: a TLS handshake",
            "n/a" if handshake is None else f"{handshake:.2f} CPU ms",
            "vs the hot endpoints' whole delivery",
        ),
        (
            "2 many origins: open connections, files",
            f"{o['open_after_drain']} then {o['open_after_idle']}",
            f"idle closed after {o['seconds_until_idle_closed']:.0f} s; files "
            f"{o['files_after_drain']} then {o['files_when_idle']}; "
            f"RSS {o['rss_mb']['VmHWM']:.0f} MB peak",
        ),
    ]


def _slow(s: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for label in ("default", "raised"):
        r = s[label]
        rows.append(
            (
                f"3 slow: max_in_flight {r['max_in_flight']}",
                f"{r['per_s']:.0f} /s",
                f"ratio {r['ratio']:.3f} to {r['bound_per_s']:.0f}/s (target >= 0.8); "
                f"{r['cpu_ms_per_delivery']:.2f} CPU ms and "
                f"{r['connections_per_delivery']:.2f} new connections each; "
                f"{r['kb_per_in_flight']:.0f} KB per in-flight delivery "
                f"(peak {r['peak_in_flight_sampled']:.0f})",
            )
        )
    return rows


def _latency(lat: dict[str, Any]) -> list[Row]:
    return [
        (
            f"4 latency at {lat['rate_per_s']:.0f} events/s",
            f"p99 {lat['p99_ms']:.1f} ms",
            f"p50 {lat['p50_ms']:.1f}, p95 {lat['p95_ms']:.1f}, max {lat['max_ms']:.1f} "
            "(target p99 <= 50)",
        )
    ]


def _table(t: dict[str, Any]) -> list[Row]:
    return [
        (
            f"5 table: {t['subscriptions']} subscriptions",
            f"ready in {t['ready_seconds']:.1f} s",
            f"RSS {t['rss_mb']:.0f} MB (targets < 10 s, < 300 MB)",
        )
    ]


def _isolation(iso: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for variant, title in (("endpoints", "10 endpoints"), ("same_host", "one origin")):
        v = iso.get(variant)
        if v is None:
            continue
        rows += [
            (
                f"6 isolation, {title}: 9 healthy",
                f"{v['unstalled']['per_s']:.0f} /s",
                f"with a 10th stalled {v['stalled']['per_s']:.0f} /s, "
                f"{v['stalled']['deferred']:.0f} deferred",
            ),
            (f"6 isolation, {title}: ratio", f"{v['ratio']:.3f}", "target >= 0.9"),
        ]
    return rows


def _memory(m: dict[str, Any]) -> list[Row]:
    return [
        (
            f"7 memory: {m['events']} backlog + stall, {m['wall_seconds']:.0f} s",
            f"{m['peak_rss_mb']:.0f} MB",
            "peak RSS (target <= 250 MB)",
        )
    ]


def _history(h: dict[str, Any]) -> list[Row]:
    rows: list[Row] = [
        (
            f"8 history: rebuild of {h['attempts']} attempts",
            f"{h['rebuild_ready_s']:.1f} s to ready",
            f"fold {h['fold_per_s']} attempts/s, {h['rebuild_cpu_us_per_attempt']} CPU us each, "
            f"RSS {h['rebuilt_rss_mb'].get('VmHWM')} MB peak",
        ),
        (
            "8 history: restart on the same file",
            f"{h['restart_ready_s']:.1f} s to ready",
            f"disk {h['disk_bytes_per_attempt']} bytes/attempt",
        ),
    ]
    for load in h["load"]:
        rows.append(
            (
                f"8 history: {load['clients']} clients",
                f"{load['list']['per_s'] + load['detail']['per_s']:.0f} req/s",
                f"list p50/p99 {load['list']['p50_ms']}/{load['list']['p99_ms']} ms, detail "
                f"{load['detail']['p50_ms']}/{load['detail']['p99_ms']} ms, /healthz p99 "
                f"{load['healthz']['p99_ms']} ms, API CPU {load['api_cpu_ms_per_request']} ms "
                f"per request, errors {load['errors']}",
            )
        )
    return rows


def _writes(w: dict[str, Any]) -> list[Row]:
    return [
        (
            f"9 writes: PATCH at the {where}",
            f"p50 {w[where]['p50_ms']:.1f} ms",
            f"p99 {w[where]['p99_ms']:.1f}, max {w[where]['max_ms']:.1f} ({w['changes']} changes)",
        )
        for where in ("writer", "replica")
    ]


def _neighbours(nb: dict[str, Any]) -> list[Row]:
    alone, beside, slow = nb["fast_alone"], nb["fast_beside_slow"], nb["slow"]
    ratio = "n/a" if nb["ratio"] is None else f"{nb['ratio']:.3f}"
    return [
        (
            f"10 neighbours: F's {nb['fast_events']} beside slow S",
            f"{beside['per_s']:.0f} /s",
            f"p99 {beside.get('p99_ms', 0):.0f} ms; F alone {alone['per_s']:.0f} /s, "
            f"p99 {alone.get('p99_ms', 0):.0f} ms",
        ),
        ("10 neighbours: ratio", ratio, "target >= 0.9"),
        (
            "10 neighbours: S's requests",
            f"{slow['delivered']:.0f} of {nb['slow_events']}",
            f"the last after {slow['last_request_s']:.0f} s (at the earliest "
            f"{slow['earliest_last_request_s']:.0f} s), {slow['later_attempts']} later "
            f"attempts, {slow['deferred']:.0f} deferred",
        ),
    ]


def table(results: dict[str, Any]) -> str:
    rows = _engines(results)
    for key, part in (
        ("throughput", _throughput),
        ("origins", _origins),
        ("slow", _slow),
        ("latency", _latency),
        ("table", _table),
        ("isolation", _isolation),
        ("memory", _memory),
        ("history", _history),
        ("writes", _writes),
        ("neighbours", _neighbours),
    ):
        if key in results:
            rows += part(results[key])
    width = max((len(r[0]) for r in rows), default=0)
    value_w = max((len(r[1]) for r in rows), default=0)
    return "\n".join(f"  {a:<{width}}  {b:>{value_w}}  {c}" for a, b, c in rows)


def print_report(results: dict[str, Any]) -> None:
    m = results["machine"]
    print()
    print(
        f"Machine: {m['cpus']} CPUs, {m['cpu_model']}, {m['ram_gib']} GiB RAM, "
        f"Python {m['python']}; load average {results['load_average_before']} before, "
        f"{results['load_average_after']} after"
    )
    print(table(results))
    nb = results.get("neighbours", {})
    for label, key in (("F alone", "fast_alone"), ("F beside S", "fast_beside_slow")):
        prof = nb.get(key, {}).get("profile")
        if prof:
            print(
                f"\nNeighbours, {label}: where the dispatcher's time went (py-spy, "
                f"{prof['samples']} samples holding the GIL at 200/s):"
            )
            for name, pct in prof["components"][:12]:
                print(f"  {pct:5.1f}%  {name}")
    profile = results.get("throughput", {}).get("profile")
    if profile:
        print("\nWhere the dispatcher's time went (py-spy, samples holding the GIL):")
        for name, pct in profile["components"][:15]:
            print(f"  {pct:5.1f}%  {name}")
