"""Secrets off the command line: ``--secret-file PATH`` and ``--secret-file -`` (stdin)."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import trustme

from dispatcher.commands.subscriptions import get as get_subscription
from dispatcher.outbound.signing import signature_headers
from tests.cli_support import Cli
from tests.support import REPO, Namespace, free_port

URL = "https://127.0.0.1:8443/hooks/bullseye"
PUT = ["subscriptions", "put", "--organization", "org_1", "--url", URL, "--plan", "scale"]
FILE_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
STDIN_SECRET = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"
WARNING = "--secret is visible to other users"


def run_with_stdin(ns: Namespace, stdin: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dispatcher.commands.cli", *argv],
        env=ns.env(),
        cwd=REPO,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_put_reads_the_secret_from_a_file_without_echo(
    cli: Cli, ns: Namespace, tmp_path: Path
) -> None:
    path = tmp_path / "secret"
    path.write_text(FILE_SECRET + "\n")  # as `echo` writes it: the line ending is dropped
    result = cli(ns, *PUT, "--secret-file", str(path), "--json")
    view = result.json()
    assert get_subscription(ns.settings, view["webhook_id"]).secret == FILE_SECRET
    assert view["secret"] == "set" and "new_secret" not in view
    assert FILE_SECRET not in result.out + result.err
    assert WARNING not in result.err


def test_put_and_rotate_read_the_secret_from_stdin(ns: Namespace) -> None:
    put = run_with_stdin(ns, FILE_SECRET + "\n", *PUT, "--secret-file", "-", "--json")
    assert put.returncode == 0, put.stderr
    webhook_id = json.loads(put.stdout)["webhook_id"]
    assert get_subscription(ns.settings, webhook_id).secret == FILE_SECRET

    rotate = run_with_stdin(
        ns, STDIN_SECRET, "subscriptions", "rotate-secret", webhook_id, "--secret-file", "-"
    )
    assert rotate.returncode == 0, rotate.stderr
    sub = get_subscription(ns.settings, webhook_id)
    assert sub.secret == STDIN_SECRET
    assert [p.secret for p in sub.previous_secrets] == [FILE_SECRET]
    assert STDIN_SECRET not in rotate.stdout + rotate.stderr


def test_secret_on_the_command_line_still_works_with_a_warning(cli: Cli, ns: Namespace) -> None:
    result = cli(ns, *PUT, "--secret", FILE_SECRET, "--json")
    webhook_id = result.json()["webhook_id"]
    assert get_subscription(ns.settings, webhook_id).secret == FILE_SECRET
    warning = result.err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("dispatcher: warning: " + WARNING)
    assert "--secret-file" in warning[0] and FILE_SECRET not in warning[0]

    rotated = cli(ns, "subscriptions", "rotate-secret", webhook_id, "--secret", STDIN_SECRET)
    assert rotated.code == 0, rotated.err
    assert WARNING in rotated.err
    assert get_subscription(ns.settings, webhook_id).secret == STDIN_SECRET


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"", "is empty"),
        (b"\n", "is empty"),
        (b"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\nsecond line\n", "single line"),
        (b"\xff\xfe-not-utf-8-secret", "not UTF-8"),
        (b"whsec_abc!defghijklmnop\n", "base64"),  # the secret's own checks still apply
    ],
    ids=["empty", "blank line", "two lines", "not utf-8", "invalid secret"],
)
def test_bad_secret_file_is_one_line_and_never_echoed(
    cli: Cli, shared_ns: Namespace, tmp_path: Path, content: bytes, needle: str
) -> None:
    path = tmp_path / "secret"
    path.write_bytes(content)
    result = cli(shared_ns, *PUT, "--secret-file", str(path))
    result.assert_one_line_error(2, needle)
    assert result.out == ""
    for line in content.decode("utf-8", "replace").splitlines():
        if len(line) > 4:
            assert line not in result.err


def test_missing_secret_file_names_the_path(cli: Cli, shared_ns: Namespace, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    result = cli(shared_ns, *PUT, "--secret-file", str(missing))
    result.assert_one_line_error(2, str(missing), "No such file")


@pytest.mark.parametrize(
    "argv",
    [
        [*PUT, "--secret-file", "-", "--secret", FILE_SECRET],
        [*PUT, "--secret-file", "-", "--no-secret"],
        ["subscriptions", "rotate-secret", "wh_x", "--secret-file", "-", "--secret", FILE_SECRET],
    ],
    ids=["put file and secret", "put file and no secret", "rotate file and secret"],
)
def test_secret_sources_exclude_each_other(cli: Cli, shared_ns: Namespace, argv: list[str]) -> None:
    result = cli(shared_ns, *argv)
    result.assert_one_line_error(2, "not allowed with argument")
    assert FILE_SECRET not in result.err


def test_sample_receiver_verifies_with_a_secret_from_a_file(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    (tmp_path / "secret").write_text(FILE_SECRET + "\n")
    port = free_port()
    receiver = subprocess.Popen(
        [
            sys.executable, "-m", "dispatcher.sample_receiver", "--port", str(port),
            "--cert", str(tmp_path / "cert.pem"), "--key", str(tmp_path / "key.pem"),
            "--secret-file", str(tmp_path / "secret"), "--exit-after", "1",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert receiver.stdout is not None
        assert "listening" in receiver.stdout.readline()
        body = b'{"event":"visitor.identified"}'
        headers = signature_headers("dlv_file", int(time.time()), body, [FILE_SECRET])
        trust = ssl.create_default_context()
        ca.configure_trust(trust)
        url = f"https://127.0.0.1:{port}/"
        answer = httpx.post(url, content=body, headers=headers, verify=trust)
        assert answer.status_code == 200
        assert json.loads(receiver.stdout.readline())["verified"] is True
        assert receiver.wait(30) == 0
    finally:
        receiver.kill()
        receiver.wait(10)
        if receiver.stdout is not None:
            receiver.stdout.close()


def test_sample_receiver_refuses_a_missing_secret_file(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable, "-m", "dispatcher.sample_receiver", "--cert", "c.pem", "--key",
            "k.pem", "--secret-file", str(tmp_path / "nowhere"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--secret-file: cannot read" in done.stderr and "Traceback" not in done.stderr
