#!/usr/bin/env bash
# Creates .venv (if needed) and installs sgserve with TensorFlow (CPU wheel) and the test tools.
# GPU users: install `tensorflow` into the venv instead of the [cpu] extra.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e '.[cpu,test]'
