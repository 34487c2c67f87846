"""The chart's alert rules, proven on the rules the chart renders (never a copy).

- ``promtool test rules`` runs the cases of ``tests/alerts/cases.yaml``: for every
  alert, series that make it fire (silent just before its ``for:`` has elapsed,
  firing just after, with its labels and annotations) and series that keep it silent.
- A real ``dispatcher run``, scraped by a real Prometheus server: every series each
  rule selects must exist, with the labels the rule groups by, and the rules
  must fire on the dead letters, the invalid subscription record and the failing
  attempts it is made to produce, and stay silent on its healthy lag, readiness
  and partitions. A metric or label renamed in the code breaks this test, naming
  the rule.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka import Producer

from tests.receiver import HttpsReceiver, Reply
from tests.support import BOOTSTRAP, Namespace, wait_until
from tests.test_chart import REQUIRED, one, render
from tests.test_observability import PrometheusServer, event, prometheus_binary

#: The rules come from ``helm template`` (helm in .tools/).
pytestmark = pytest.mark.chart

CASES = Path(__file__).resolve().parent / "alerts" / "cases.yaml"
#: The rules file cases.yaml names; the test writes the chart's rules under this name.
RULES_FILE = "rules.yaml"
ENABLED = {"prometheusRule": {"enabled": True}}
#: Labels the Prometheus Operator's scrape of a pod adds; a plain scrape has only ``job``.
TARGET_LABELS = {"namespace", "job", "pod"}

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def seconds(duration: str) -> float:
    """A Prometheus duration (``15m``, ``1h30m``, ``0s``) in seconds."""
    parts = re.findall(r"(\d+)(ms|s|m|h|d|w|y)", duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"not a Prometheus duration: {duration!r}")
    return sum(int(n) * _UNITS[u] for n, u in parts)


def chart_alerts(tmp: Path, *values: dict[str, Any]) -> list[dict[str, Any]]:
    """The alert rules of the chart's PrometheusRule, rendered with ``values``."""
    docs = render(REQUIRED, ENABLED, *values, tmp=tmp)
    groups = one(docs, "PrometheusRule")["spec"]["groups"]
    return [rule for group in groups for rule in group["rules"]]


def promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail(
            "`promtool` is not installed; scripts/test.sh installs it with the Debian "
            "package `prometheus`",
            pytrace=False,
        )
    return binary


# --- promtool test rules ----------------------------------------------------------


def test_promtool_cases_pass_on_the_charts_rules(tmp_path: Path) -> None:
    docs = render(REQUIRED, ENABLED, tmp=tmp_path)
    groups = one(docs, "PrometheusRule")["spec"]["groups"]
    (tmp_path / RULES_FILE).write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    shutil.copyfile(CASES, tmp_path / CASES.name)

    check = subprocess.run(
        [promtool(), "check", "rules", RULES_FILE],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert check.returncode == 0, f"promtool check rules:\n{check.stdout}{check.stderr}"
    test = subprocess.run(
        [promtool(), "test", "rules", CASES.name],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert test.returncode == 0, f"promtool test rules {CASES}:\n{test.stdout}{test.stderr}"
    assert "SUCCESS" in test.stdout, test.stdout


def test_every_alert_has_a_firing_and_a_silent_case(tmp_path: Path) -> None:
    cases = yaml.safe_load(CASES.read_text())
    assert cases["rule_files"] == [RULES_FILE], "cases.yaml must test the rendered rules only"
    alerts = {rule["alert"]: rule for rule in chart_alerts(tmp_path)}
    firing: dict[str, list[str]] = {name: [] for name in alerts}
    silent: dict[str, list[str]] = {name: [] for name in alerts}
    problems: list[str] = []
    for group in cases["tests"]:
        name = group.get("name", "(unnamed)")
        times: dict[str, list[tuple[float, bool]]] = {}
        for check in group.get("alert_rule_test", []):
            alert = check["alertname"]
            if alert not in alerts:
                problems.append(f"{name!r} tests {alert}, which the chart does not have")
                continue
            fires = bool(check.get("exp_alerts"))
            times.setdefault(alert, []).append((seconds(check["eval_time"]), fires))
        for alert, evals in times.items():
            fire_times = [t for t, fires in evals if fires]
            if not fire_times:
                silent[alert].append(name)
                continue
            firing[alert].append(name)
            # The `for:` duration is checked only if the case shows the alert silent
            # less than `for:` before it first fires.
            first = min(fire_times)
            hold = seconds(alerts[alert]["for"])
            before = [t for t, fires in evals if not fires and t < first]
            if not before or (hold and first - max(before) >= hold):
                problems.append(
                    f"{name!r}: {alert} fires at {first:g} s but is not shown silent "
                    f"just before (within its for: {alerts[alert]['for']})"
                )
    for alert in alerts:
        if not firing[alert]:
            problems.append(f"{alert} has no case in which it fires")
        if not silent[alert]:
            problems.append(f"{alert} has no case in which it stays silent")
    assert not problems, f"{CASES.name}:\n" + "\n".join(problems)


def test_durations_are_read_as_prometheus_does() -> None:
    assert seconds("0m") == 0
    assert seconds("15m") == 900
    assert seconds("1h30m") == 5400
    assert seconds("250ms") == 0.25
    with pytest.raises(ValueError, match="not a Prometheus duration"):
        seconds("15 minutes")


# --- the rules on a real dispatcher's series ---------------------------------------

#: The rules this scenario must make fire; every other rule must stay silent.
FIRED_BY_THE_SCENARIO = {
    "WebhookDispatcherDeadLetters",
    "WebhookDispatcherInvalidSubscriptions",
    "WebhookDispatcherFailureRatioHigh",
}


def selectors(expr: str) -> list[str]:
    """Every series selector (``dispatcher_x{...}``) of a rule's expression."""
    return sorted(set(re.findall(r"\bdispatcher_[a-z_]+(?:\{[^}]*\})?", expr)))


def grouping_labels(expr: str) -> set[str]:
    labels: set[str] = set()
    for clause in re.findall(r"\bby\s*\(([^)]*)\)", expr):
        labels |= {label.strip() for label in clause.split(",") if label.strip()}
    return labels


def test_every_rule_finds_its_series_in_a_real_scrape(
    ns_factory: Any, receiver: HttpsReceiver, run_dispatcher: Any, tmp_path: Path
) -> None:
    binary = prometheus_binary()
    # Fast retries so a delivery is dead-lettered in a second; a circuit that never
    # opens, so every delivery to the failing endpoint is an attempt.
    ns: Namespace = ns_factory(retry_delays_s=[1], circuit_failure_threshold=1_000_000)
    # The chart's rules, selecting this test's scrape job and input topic. The API
    # writer's rules (webhook health) select the same job: every process exports the
    # one registry, so this scrape has their series too (at 0), and a renamed metric
    # breaks this test; tests/test_health_events.py checks the writer's own values.
    rules = chart_alerts(
        tmp_path,
        {
            "prometheusRule": {
                "metricSelector": 'job="dispatcher"',
                "writerMetricSelector": 'job="dispatcher"',
            },
            "config": {
                "input_topic": ns.settings.input_topic,
                "retry_topic_prefix": ns.settings.retry_topic_prefix,
            },
        },
    )
    assert {r["alert"] for r in rules} >= FIRED_BY_THE_SCENARIO
    ns.subscribe(receiver.url("/down"), organization_id="org_down")
    receiver.respond("/down", Reply(500, body=b"down"))
    proc = run_dispatcher(ns)

    prometheus = PrometheusServer(binary, tmp_path, proc.port)
    try:
        prometheus.wait_ready()
        # Scraped before anything fails: a counter must be seen before its first increase.
        scraped_after(prometheus, time.time())
        assert prometheus.scalar('up{job="dispatcher"}') == 1
        # The first dead letter and the first invalid subscription record since the
        # dispatcher started. Nothing here reads a metric by name: the rules do, below.
        _write_invalid_subscription(ns)
        ns.publish(event("org_down"))
        wait_until(
            lambda: ns.read_all(ns.settings.dead_letter_topic, timeout_s=2),
            60,
            "the delivery to the failing endpoint to be dead-lettered",
        )
        wait_until(lambda: "wh_broken" in proc.logs(), 30, "the invalid record to be skipped")
        scraped_after(prometheus, time.time())

        # Gauges such as the lag are set on the dispatcher's own schedule: give them
        # a few scrapes before naming what is missing.
        missing: list[str] = []

        def complete() -> bool:
            missing[:] = missing_series(prometheus, rules)
            return not missing

        with contextlib.suppress(AssertionError):
            wait_until(complete, 30, "every rule's series", interval_s=1)
        assert not missing, "\n".join(missing)
        # The lag rule selects the input topic and leaves the retry topics out.
        lag = next(r for r in rules if r["alert"] == "WebhookDispatcherConsumerLagHigh")
        (lag_selector,) = selectors(lag["expr"])
        lag_topics = {s["metric"]["topic"] for s in prometheus.query(lag_selector)}
        assert lag_topics == {ns.settings.input_topic}, f"{lag_selector} selects {lag_topics}"
        every_topic = {s["metric"]["topic"] for s in prometheus.query(lag_selector.split("{")[0])}
        assert every_topic > lag_topics, f"no retry topic's lag was scraped: {every_topic}"
        first = {"WebhookDispatcherDeadLetters", "WebhookDispatcherInvalidSubscriptions"}
        wait_for_rules(prometheus, rules, first, "after the first of their kind")

        # Then failing deliveries over several scrapes, enough attempts a second
        # for the failure ratio to count.
        for batch in range(1, 4):
            ns.publish(*[event("org_down") for _ in range(20)])
            dead = 1 + 20 * batch
            wait_until(
                lambda dead=dead: prometheus.scalar("sum(dispatcher_dead_letters_total)") == dead,
                60,
                f"Prometheus to see {dead} dead letters",
                interval_s=0.2,
            )
        # Every expression evaluates on the server; these three fire on what happened,
        # and none other does on a dispatcher whose lag, readiness and partitions are fine.
        got = wait_for_rules(prometheus, rules, FIRED_BY_THE_SCENARIO, "on the scenario")
        assert got == FIRED_BY_THE_SCENARIO, f"rules firing on a healthy dispatcher: {sorted(got)}"
    finally:
        prometheus.stop()


def scraped_after(prometheus: PrometheusServer, moment: float) -> None:
    """Wait until Prometheus holds a scrape of the dispatcher taken after ``moment``."""
    wait_until(
        lambda: (prometheus.scalar('timestamp(up{job="dispatcher"})') or 0) > moment,
        60,
        "Prometheus to scrape the dispatcher",
        interval_s=0.2,
    )


def missing_series(prometheus: PrometheusServer, rules: list[dict[str, Any]]) -> list[str]:
    """What each rule selects or groups by that the scraped series do not have."""
    missing: list[str] = []
    for rule in rules:
        name = rule["alert"]
        found: list[dict[str, str]] = []
        if not selectors(rule["expr"]):
            missing.append(f"{name}: its expression selects no dispatcher metric")
        for selector in selectors(rule["expr"]):
            series = prometheus.query(selector)
            if not series:
                exported = {s["metric"]["__name__"] for s in prometheus.query('{job="dispatcher"}')}
                missing.append(
                    f"{name}: no series for {selector} in the scrape of a real `dispatcher run` "
                    f"(it exports {', '.join(sorted(exported))})"
                )
            found += [s["metric"] for s in series]
        for label in sorted(grouping_labels(rule["expr"]) - TARGET_LABELS):
            if found and not any(label in labels for labels in found):
                missing.append(f"{name}: groups by {label!r}, which its series do not carry")
    return missing


def wait_for_rules(
    prometheus: PrometheusServer, rules: list[dict[str, Any]], expected: set[str], when: str
) -> set[str]:
    """Wait until the expressions of the rules ``expected`` return series; the firing set."""

    def firing() -> set[str]:
        return {r["alert"] for r in rules if prometheus.query(r["expr"])}

    try:
        wait_until(lambda: firing() >= expected, 30, f"{sorted(expected)} to fire {when}", 0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; firing: {sorted(firing())}") from None
    return firing()


def _write_invalid_subscription(ns: Namespace) -> None:
    """A subscription record that is not JSON: the table skips it and counts it."""
    producer = Producer({"bootstrap.servers": BOOTSTRAP})
    producer.produce(ns.settings.subscriptions_topic, b"{not a subscription", b"wh_broken")
    assert producer.flush(30) == 0
