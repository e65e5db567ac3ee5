#!/usr/bin/env bash
# Create .venv (Python 3.11+) and install the gateway with its test and dev tools and uvloop.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed-$(cat setup.cfg pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[test,dev,fast]"
    rm -f .venv/.installed-*
    touch "$stamp"
fi
