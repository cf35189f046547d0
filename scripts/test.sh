#!/usr/bin/env bash
# Installs what the tests need, then runs the whole suite (real TF, ZeroMQ, processes, shared memory).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
