#!/usr/bin/env bash
# Every check in one command: lint, types, the chart, the tests against a real
# local Kafka broker (started here if it is not running, and stopped again after),
# and, when no pytest arguments are given, the benchmark at its smoke size.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

bash scripts/bootstrap.sh

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
.venv/bin/pytest "$@"
if [[ $# -eq 0 ]]; then
    # Every benchmark phase at a tiny size: it must run, its figures mean nothing.
    echo "== benchmark (smoke size)"
    bash scripts/bench.sh --smoke --out "$repo/bench/.build/smoke-results.json"
fi
