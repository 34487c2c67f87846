#!/usr/bin/env bash
# Create the project's virtualenv and install the package with its test tools.
# Idempotent: does nothing when .venv is already up to date with pyproject.toml.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
python="${PYTHON_BIN:-python3}"
marker=.venv/.installed
if [[ -x .venv/bin/python && -f $marker && $marker -nt pyproject.toml ]]; then
    exit 0
fi
if [[ ! -x .venv/bin/python ]]; then
    echo "bootstrap: creating .venv with $($python --version)"
    "$python" -m venv .venv
fi
echo "bootstrap: installing the dispatcher and its test tools into .venv"
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
touch "$marker"
