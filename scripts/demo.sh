#!/usr/bin/env bash
# The demo: local broker, topics, a sample HTTPS receiver, the dispatcher, one
# signed delivery verified by the receiver; then everything it started is stopped.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

bash scripts/bootstrap.sh
source scripts/broker-lease.sh
export KAFKA_BOOTSTRAP="${KAFKA_BOOTSTRAP:-127.0.0.1:${KAFKA_PORT:-9092}}"
.venv/bin/python scripts/demo.py
