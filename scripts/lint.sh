#!/usr/bin/env bash
# Byte-compiles everything and lists duplicated code, if the tools are present.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m compileall -q sgserve tests bench
command -v duplicates >/dev/null && duplicates sgserve || true
