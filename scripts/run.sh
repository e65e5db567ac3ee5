#!/usr/bin/env bash
# Set up (first run only) and start one gateway on the embedded backend.
# Without a JWT secret it runs in dev mode and prints a ready token and curl examples.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/sync-gateway serve "$@"
