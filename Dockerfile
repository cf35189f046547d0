# syntax=docker/dockerfile:1
# sgserve on the CPU TensorFlow wheel, as a TF Serving drop-in: gRPC on 8500, REST on 8501, sgserve's
# native ZeroMQ endpoint on 8510. Build and run (deploy/README.md has the details):
#   docker build -t sgserve .
#   docker run --rm --shm-size=4g --cpuset-cpus=0-4 -p 8500:8500 -p 8501:8501 -p 8510:8510 \
#     -v "$PWD/models/recommender:/models/model:ro" sgserve
# --shm-size: Docker gives a container a 64 MiB /dev/shm, and every model version lives there.
# --cpuset-cpus: sgserve pins its workers inside the cpuset it is given (--cpus only throttles).

FROM python:3.11-slim AS build
ENV VIRTUAL_ENV=/opt/sgserve PATH=/opt/sgserve/bin:$PATH \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sgserve/ sgserve/
# The install commands of scripts/setup.sh (tests/test_deploy.py checks that they stay the same), into
# a virtual environment that the runtime stage copies: the CPU wheel, then the [serving-apis] extra
# with --no-deps (tensorflow-serving-api would replace tensorflow-cpu with the full tensorflow wheel),
# then setup.sh's check that TF Serving's protos are importable. Two differences, both on purpose: the
# install is not editable (-e), and the [test] extra is left out (the image serves; it runs no tests).
RUN <<'EOF'
set -eu
python -m venv "$VIRTUAL_ENV"
python -m pip install -q --upgrade pip
python -m pip install -q '.[cpu]'
serving_apis=$(python -c '
from importlib.metadata import requires
print(" ".join(r.split(";")[0].strip() for r in requires("sgserve") or () if "serving-apis" in r))')
if [ -z "$serving_apis" ]; then
  echo "Dockerfile: pyproject.toml declares no [serving-apis] extra" >&2
  exit 1
fi
python -m pip install -q --no-deps $serving_apis
python -c '
import importlib.util, sys
for name in ("tensorflow_serving.apis.prediction_log_pb2", "tensorflow_serving.config.model_server_config_pb2",
             "tensorflow_serving.apis.prediction_service_pb2_grpc"):
    try:
        found = importlib.util.find_spec(name)
    except ImportError:
        found = None
    if found is None:
        sys.exit(f"setup.sh: {name} is not installed; the [serving-apis] extra did not install")'
EOF

FROM python:3.11-slim
ENV VIRTUAL_ENV=/opt/sgserve PATH=/opt/sgserve/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# A fixed numeric uid, so that Kubernetes' runAsNonRoot can check it (deploy/kubernetes/deployment.yaml
# runs as the same uid).
RUN groupadd --system --gid 10001 sgserve \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/sgserve sgserve \
    && mkdir -p /models \
    && chown 10001:10001 /home/sgserve
COPY --from=build /opt/sgserve /opt/sgserve
COPY deploy/docker/monitoring.config /etc/sgserve/monitoring.config
USER 10001:10001
WORKDIR /home/sgserve
EXPOSE 8500 8501 8510
# Liveness: /healthz answers 200 while the broker loop does (readiness, a model AVAILABLE, is
# GET /v1/models/<name>). The start period covers mapping and warming a large model.
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8501/healthz', timeout=2)"]
ENTRYPOINT ["sgserve", "start"]
# TF Serving's image defaults: one model named "model" under /models/model. Arguments given to
# `docker run IMAGE ...` replace this whole list.
CMD ["--port=8500", "--rest_api_port=8501", "--endpoint=tcp://0.0.0.0:8510", \
     "--model_name=model", "--model_base_path=/models/model", \
     "--monitoring_config_file=/etc/sgserve/monitoring.config"]
