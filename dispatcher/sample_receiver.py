"""A sample HTTPS webhook receiver that verifies every delivery it gets.

    python -m dispatcher.sample_receiver --port 8443 --cert cert.pem --key key.pem \\
        --secret-file secret.txt

It checks ``X-Bullseye-Signature`` and the Standard Webhooks signature with the
helpers in :mod:`dispatcher.outbound.signing`, answers 200 to authentic deliveries and 401
to the rest, and prints one JSON line per delivery. It is the example receiver
of the README and of the demo; a real receiver does the same checks.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from dispatcher.commands.cli_common import add_secret_options, read_secret
from dispatcher.errors import ConfigError
from dispatcher.outbound.signing import (
    SignatureVerificationError,
    verify_bullseye,
    verify_standard_webhook,
)


def verify(secret: str | None, body: bytes, headers: dict[str, str]) -> tuple[bool, str]:
    """Check both signature schemes; returns (authentic, why)."""
    if not secret:
        return True, "no secret configured: signature not checked"
    given = headers.get("x-bullseye-signature", "")
    if not verify_bullseye(secret, body, given):
        return False, "X-Bullseye-Signature does not match"
    try:
        verify_standard_webhook(secret, body, headers)
    except SignatureVerificationError as exc:
        return False, f"webhook-signature: {exc}"
    return True, "both signatures verified"


def make_server(
    host: str, port: int, cert: str, key: str, secret: str | None, limit: int | None
) -> ThreadingHTTPServer:

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            headers = {k.lower(): v for k, v in self.headers.items()}
            ok, why = verify(secret, body, headers)
            self.send_response(200 if ok else 401)
            self.send_header("Content-Length", "0")
            self.end_headers()
            try:
                payload = json.loads(body)
            except ValueError:
                payload = None
            line = {
                "verified": ok,
                "detail": why,
                "delivery_id": headers.get("x-bullseye-delivery-id"),
                "attempt": headers.get("x-bullseye-attempt"),
                "event": payload.get("event") if isinstance(payload, dict) else None,
                "organization_id": (
                    payload.get("organization_id") if isinstance(payload, dict) else None
                ),
                "body": payload,
            }
            print(json.dumps(line), flush=True)
            if limit is not None and ok:
                handled[0] += 1
                if handled[0] >= limit:
                    threading.Thread(target=self.server.shutdown, daemon=True).start()

        def log_message(self, format: str, *args: object) -> None:
            pass

    handled = [0]
    server = ThreadingHTTPServer((host, port), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8443)
    parser.add_argument("--cert", required=True, help="PEM certificate chain")
    parser.add_argument("--key", required=True, help="PEM private key")
    add_secret_options(
        parser.add_mutually_exclusive_group(),
        "the webhook secret",
        "without one, signatures are not checked",
    )
    parser.add_argument("--exit-after", type=int, help="exit after this many verified deliveries")
    args = parser.parse_args(argv)
    try:
        secret = read_secret(args)
    except ConfigError as exc:
        parser.error(str(exc))
    server = make_server(args.host, args.port, args.cert, args.key, secret, args.exit_after)
    print(json.dumps({"listening": f"https://{args.host}:{server.server_address[1]}/"}), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
