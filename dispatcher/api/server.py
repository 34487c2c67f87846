"""``dispatcher api`` (the HTTP service) and ``dispatcher api-key`` (make a key)."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from dispatcher.errors import ConfigError
from dispatcher.settings import Settings


def add_commands(sub: Any) -> None:
    api = sub.add_parser(
        "api",
        help="run the webhooks management API",
        description="Serve the webhooks API on DISPATCHER_API_HOST:DISPATCHER_API_PORT, with "
        "/metrics, /healthz and /readyz also on DISPATCHER_HTTP_PORT.",
    )
    api.set_defaults(handler=cmd_api)
    key = sub.add_parser(
        "api-key",
        help="generate an API key and the entry that configures it",
        description="Print a new API key (shown once) and the JSON entry for "
        "DISPATCHER_API_KEYS or the keys file, which holds only its SHA-256 hash.",
    )
    key.add_argument("name", help="the key's name, shown in audit logs")
    key.add_argument(
        "--access", choices=("read", "read-write"), default="read", help="default: read"
    )
    key.set_defaults(handler=cmd_api_key)


def cmd_api_key(args: argparse.Namespace, settings: Settings) -> int:
    from dispatcher.api.auth import KeyEntry, hash_key, new_key

    try:
        entry = KeyEntry(name=args.name, sha256="0" * 64, access=args.access)
    except ValueError:
        raise ConfigError(f"invalid key name {args.name!r}: letters, digits, _ . -") from None
    key = new_key()
    entry = entry.model_copy(update={"sha256": hash_key(key)})
    print(f"key:   {key}")
    print(f"entry: {json.dumps(entry.model_dump())}")
    print("\nStore the key now: it is not shown again; configure only the entry.")
    return 0


def cmd_api(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from dispatcher.api.app import build_context, create_app
    from dispatcher.core.health import HealthServer
    from dispatcher.logs import configure_logging

    configure_logging(settings.log_level)
    ctx = build_context(settings)
    if not ctx.keys.count:
        logging.getLogger("dispatcher.api").warning(
            "no API keys configured: every /v1 request will be refused"
        )
    app = create_app(ctx)
    probes = None
    if settings.http_port:
        probes = HealthServer(settings.http_host, settings.http_port, app.state.health)
        probes.start()
    try:
        uvicorn.run(
            app,
            host=settings.api_host,
            port=settings.api_port,
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=int(settings.drain_timeout_s),
        )
    finally:
        if probes is not None:
            probes.stop()
    return 0
