"""Settings: documented in the README, and a bad value is one clear line, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dispatcher import kafka
from dispatcher.commands.cli import main
from dispatcher.errors import ConfigError
from dispatcher.settings import Settings, load_settings

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
from settings_table import table  # noqa: E402


def test_readme_settings_table_is_complete_and_current() -> None:
    readme = (REPO / "README.md").read_text()
    assert table() in readme, "README settings table is stale: run scripts/settings_table.py"
    for name in Settings.model_fields:
        assert f"DISPATCHER_{name.upper()}" in readme


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("DISPATCHER_HTTP_TIMEOUT_S", "abc", "DISPATCHER_HTTP_TIMEOUT_S"),
        ("DISPATCHER_HTTP_TIMEOUT_S", "-1", "greater than 0"),
        ("DISPATCHER_RETRY_DELAYS_S", "60,0", "positive"),
        ("DISPATCHER_RETRY_DELAYS_S", "60,60", "distinct"),
        ("DISPATCHER_ALLOWED_NETWORKS", "10.0.0.0/33", "DISPATCHER_ALLOWED_NETWORKS"),
        ("DISPATCHER_LOG_LEVEL", "LOUD", "DEBUG, INFO, WARNING or ERROR"),
        ("DISPATCHER_KAFKA_EXTRA_CONFIG", "{not json", "DISPATCHER_KAFKA_EXTRA_CONFIG"),
        ("DISPATCHER_PARTITION_BUFFER_LOW", "5000", "DISPATCHER_PARTITION_BUFFER_LOW"),
        ("DISPATCHER_GROUP_INSTANCE_ID", "pod/0", "DISPATCHER_GROUP_INSTANCE_ID"),
        ("DISPATCHER_GROUP_INSTANCE_ID", "p" * 250, "1 to 249 of the characters"),
        ("DISPATCHER_SESSION_TIMEOUT_S", "3", "greater than or equal to 6"),
        ("DISPATCHER_SESSION_TIMEOUT_S", "301", "less than or equal to 300"),
    ],
)
def test_bad_setting_is_one_line_naming_it(
    variable: str,
    value: str,
    expected: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # In-process through the command line's entry point: the same path as a real
    # process (the test below runs one) at a fraction of the cost.
    # main() routes Kafka client logs; the test gives the process its routing back.
    monkeypatch.setattr(kafka, "_client_logger", kafka._client_logger)
    for name in [k for k in os.environ if k.startswith("DISPATCHER_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv(variable, value)
    assert main(["topics", "ensure"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dispatcher: error: invalid setting:")
    assert expected in lines[0]


def test_a_bad_setting_stops_a_real_process_with_one_line_and_exit_code_2() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    env["DISPATCHER_HTTP_TIMEOUT_S"] = "abc"
    done = subprocess.run(
        [sys.executable, "-m", "dispatcher.commands.cli", "topics", "ensure"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("dispatcher: error: invalid setting:")
    assert "DISPATCHER_HTTP_TIMEOUT_S" in lines[0]


def test_password_is_never_echoed_in_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISPATCHER_KAFKA_SASL_PASSWORD", "hunter2-secret")
    monkeypatch.setenv("DISPATCHER_HTTP_PORT", "99999")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "hunter2-secret" not in str(err.value)


def test_lists_accept_json_or_commas(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISPATCHER_RETRY_DELAYS_S", "[5, 10]")
    monkeypatch.setenv("DISPATCHER_ENTITLED_PLANS", "Scale, Enterprise, Custom")
    settings = load_settings()
    assert settings.retry_delays_s == [5, 10]
    assert settings.entitled_plans == ["scale", "enterprise", "custom"]
