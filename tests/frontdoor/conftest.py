"""One server for the front-door tests, started with a TF Serving launch line, unchanged:

    sgserve start --model_config_file=F --port=P --rest_api_port=R --monitoring_config_file=M ...

F serves five models (TF2, TF1, Keras with strings, half_plus_two, a classify/regress TF1 export),
plus `slow` for deadline and overload cases and `complex` whose output cannot travel (500).
"""
from __future__ import annotations

import os
from typing import Iterator

import pytest

from tests.conftest import ServerProcess, free_port, group_alive, wait_until

METRICS_PATH = "/monitoring/prometheus/metrics"


def model_config(models: dict[str, str]) -> str:
    entries = "".join(f'  config {{ name: "{name}" base_path: "{path}" model_platform: "tensorflow" }}\n'
                      for name, path in models.items())
    return f"model_config_list {{\n{entries}}}\n"


@pytest.fixture(scope="package")
def frontdoor_models(tmp_path_factory, models_dir) -> dict[str, str]:
    from tests.frontdoor.models import build_classify, build_complex
    from tests.test_backpressure import build_slow

    d = tmp_path_factory.mktemp("frontdoor-models")
    paths = {name: os.path.join(models_dir, name) for name in ("tf2", "tf1", "keras", "hpt")}
    paths["cls"] = build_classify(str(d / "cls"))
    build_slow(str(d / "slow"))
    paths["slow"] = str(d / "slow")
    paths["complex"] = build_complex(str(d / "complex"))
    return paths


@pytest.fixture(scope="package")
def tfs_server(tmp_path_factory, frontdoor_models) -> Iterator[ServerProcess]:
    d = tmp_path_factory.mktemp("frontdoor")
    config = d / "models.config"
    config.write_text(model_config(frontdoor_models))
    monitoring = d / "monitoring.config"
    monitoring.write_text(f'prometheus_config {{ enable: true path: "{METRICS_PATH}" }}\n')
    grpc_port, rest_port = free_port(), free_port()
    s = ServerProcess([f"--model_config_file={config}", f"--port={grpc_port}", "--rest_api_port", str(rest_port),
                       f"--monitoring_config_file={monitoring}", "--enable_batching=false",
                       "--file_system_poll_wait_seconds=1", "--max_num_load_retries=0",
                       "--workers", "2", "--cpus-per-worker", "1", "--max-enqueued", "2", "--split-min-rows", "0"],
                      cache_dir=str(d / "cache"))
    s.grpc_port, s.rest_port, s.config_path = grpc_port, rest_port, str(config)
    s.rest = f"http://127.0.0.1:{rest_port}"
    try:
        s.wait_ready(240)
        import requests

        wait_until(lambda: _answers(requests, s.rest + "/healthz"), 30, "the REST front door to answer")
        yield s
    finally:
        s.stop()
    assert not group_alive(s.proc.pid)


def _answers(requests, url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False
