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
# The [serving-apis] extra (pyproject.toml): TF Serving's config, warmup (PredictionLog), model and
# service protos and gRPC stubs. Its requirements are installed without their dependencies:
# tensorflow-serving-api requires the `tensorflow` wheel, which would replace `tensorflow-cpu`; its
# modules need only the protobuf, grpcio and tensorflow that are already installed.
serving_apis=$(.venv/bin/python -c '
from importlib.metadata import requires
print(" ".join(r.split(";")[0].strip() for r in requires("sgserve") or () if "serving-apis" in r))')
if [ -z "$serving_apis" ]; then
  echo "setup.sh: pyproject.toml declares no [serving-apis] extra" >&2
  exit 1
fi
# shellcheck disable=SC2086 # one word per requirement
.venv/bin/python -m pip install -q --no-deps $serving_apis
# A broken install fails here, not later in the tests (found, not imported: that would import TensorFlow).
.venv/bin/python -c '
import importlib.util, sys
for name in ("tensorflow_serving.apis.prediction_log_pb2", "tensorflow_serving.config.model_server_config_pb2",
             "tensorflow_serving.apis.prediction_service_pb2_grpc"):
    try:
        found = importlib.util.find_spec(name)
    except ImportError:
        found = None
    if found is None:
        sys.exit(f"setup.sh: {name} is not installed; the [serving-apis] extra did not install")'
