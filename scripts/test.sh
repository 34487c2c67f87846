#!/usr/bin/env bash
# Every check in one command: lint, types, the chart, the tests against a real
# local Kafka broker (started here if it is not running, and stopped again after)
# and, when no pytest arguments are given, the container image built and run
# (scripts/image-check.sh; SKIP_IMAGE_CHECK=1 leaves it out) and the benchmark at
# its smoke size.
#
# Sets up what the tests need: .venv (scripts/bootstrap.sh), the broker, and the
# Prometheus server the observability tests scrape the dispatcher with (the
# Debian package, installed when missing and this user may; otherwise it stops
# at once with one line saying how).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

source scripts/debian-package.sh
need_debian_package prometheus prometheus || exit 1
bash scripts/bootstrap.sh
# openapi-typescript and tsc, for the test that compiles types generated from the API.
if [[ ! -f tests/clients/node_modules/.installed || tests/clients/package-lock.json -nt tests/clients/node_modules/.installed ]]; then
    command -v npm >/dev/null || { echo "test: npm (Node.js) is needed for the TypeScript client test: install nodejs and npm" >&2; exit 1; }
    npm ci --prefix tests/clients --no-audit --no-fund --loglevel=error
    touch tests/clients/node_modules/.installed
fi

source scripts/broker-lease.sh
# The tests talk to the broker this script manages, on whatever port it uses.
export KAFKA_BOOTSTRAP="127.0.0.1:${KAFKA_PORT:-9092}"

echo "== ruff"
.venv/bin/ruff check dispatcher tests scripts bench
.venv/bin/ruff format --check dispatcher tests scripts bench
echo "== mypy"
.venv/bin/mypy
if [[ -f scripts/check-chart.sh ]]; then
    echo "== chart and compose"
    bash scripts/check-chart.sh
fi
echo "== pytest"
if [[ $# == 0 ]]; then
    # Most tests wait on Kafka, a receiver or a process far more than they compute:
    # TEST_WORKERS (3) run side by side (pytest-xdist; tests that start a broker of
    # their own share one worker). Then the few that bound a time or a pace run
    # alone, so that nothing else on the machine stands in their measure.
    .venv/bin/pytest -n "${TEST_WORKERS:-3}" --dist loadgroup -m "not alone"
    .venv/bin/pytest -m alone
else
    .venv/bin/pytest "$@"
fi
if [[ $# == 0 && ${SKIP_IMAGE_CHECK:-0} != 1 ]]; then
    echo "== image"
    bash scripts/image-check.sh
fi
if [[ $# == 0 ]]; then
    # Every benchmark phase at a tiny size: it must run, its figures mean nothing.
    echo "== benchmark (smoke size)"
    bash scripts/bench.sh --smoke --out "$repo/bench/.build/smoke-results.json"
fi
