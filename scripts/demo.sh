#!/usr/bin/env bash
# The demo: local broker, topics, a sample HTTPS receiver, the dispatcher, one
# signed delivery verified by the receiver; then everything it started is stopped.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

bash scripts/bootstrap.sh
started_broker=0
if ! bash scripts/kafka.sh status >/dev/null 2>&1; then
    bash scripts/kafka.sh start
    started_broker=1
fi
cleanup() {
    if [[ $started_broker == 1 ]]; then
        bash scripts/kafka.sh stop || true
    fi
}
trap cleanup EXIT
.venv/bin/python scripts/demo.py
