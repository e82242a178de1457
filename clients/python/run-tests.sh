#!/usr/bin/env bash
# Runs the Python client's checks: mypy --strict over the package, its tests and
# examples/python, then the tests against the real server (BATON_BIN, default
# ../../target/debug/baton). Creates .venv on first use.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'

.venv/bin/python -m mypy --strict src tests ../../examples/python
.venv/bin/python -m pytest -q "$@"
