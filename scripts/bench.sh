#!/usr/bin/env bash
# The benchmark in one command: builds the Go receiver (cached under bench/.build),
# makes sure the local broker runs (starting it, and stopping it again after, only
# if it was down), and runs bench/run.py. Flags go to bench/run.py (--help).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

bash scripts/bootstrap.sh >/dev/null

build="$repo/bench/.build"
mkdir -p "$build"
# The Go build cache stays inside the repository, next to the binary.
(cd bench/receiver && GOCACHE="$build/gocache" GOTOOLCHAIN=local GOFLAGS= GOPROXY=off \
    go build -trimpath -o "$build/receiver" .)
# The history phase's load generator, beside the receiver.
(cd bench/loadgen && GOCACHE="$build/gocache" GOTOOLCHAIN=local GOFLAGS= GOPROXY=off \
    go build -trimpath -o "$build/loadgen" .)

source scripts/broker-lease.sh

.venv/bin/python -m bench.run --receiver "$build/receiver" "$@"
