#!/usr/bin/env bash
# Quickstart: install (first run only) and serve. With no arguments, serves the built-in demo model.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/sgserve ] || scripts/setup.sh
exec .venv/bin/sgserve start "$@"
