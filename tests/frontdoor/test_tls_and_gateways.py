"""TLS on the gRPC port from TF Serving's --ssl_config_file, with client certificates, and several
gateway processes sharing the ports (--rest_api_num_threads), one of which dies and comes back."""
from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess

import grpc
import numpy as np
import psutil
import pytest
import requests

from tests.conftest import free_port, wait_until
from tests.frontdoor.conftest import model_config

tf = pytest.importorskip("tensorflow")
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc  # noqa: E402


def openssl(*args: str, cwd: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d: str) -> dict[str, bytes]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, both signed by the CA."""
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "ca.key",
            "-out", "ca.pem", "-days", "2", "-subj", "/CN=test-ca", cwd=d)
    for name, san in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", "")):
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", f"{name}.key",
                "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        ext = ["-extfile", f"{name}.ext"] if san else []
        if san:
            with open(os.path.join(d, f"{name}.ext"), "w") as f:
                f.write(san + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", *ext, cwd=d)
    return {n: open(os.path.join(d, n), "rb").read() for n in
            ("ca.pem", "server.key", "server.pem", "client.key", "client.pem")}


def pem_field(name: str, pem: bytes) -> str:
    return f"{name}:\n" + "".join(f'  "{line}\\n"\n' for line in pem.decode().splitlines())


def request(x: float) -> predict_pb2.PredictRequest:
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "hpt"
    req.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([x], np.float32)))
    return req


def test_tls_with_client_certificates_and_two_gateways(start_server, frontdoor_models, tmp_path):
    """Also --rest_api_timeout_in_ms: a REST request that waits longer in the queue gets 504, unrun."""
    pki = make_pki(str(tmp_path))
    ssl = tmp_path / "ssl.config"
    ssl.write_text(pem_field("server_key", pki["server.key"]) + pem_field("server_cert", pki["server.pem"])
                   + pem_field("custom_ca", pki["ca.pem"]) + "client_verify: true\n")
    grpc_port, rest_port = free_port(), free_port()
    config = tmp_path / "models.config"
    config.write_text(model_config({name: frontdoor_models[name] for name in ("hpt", "slow")}))
    server = start_server([f"--model_config_file={config}", f"--port={grpc_port}", f"--rest_api_port={rest_port}",
                           f"--ssl_config_file={ssl}", "--rest_api_num_threads=2", "--rest_api_timeout_in_ms=500",
                           "--workers", "1"])
    rest = f"http://127.0.0.1:{rest_port}"

    def gateways() -> list[int]:
        with server.client(5) as c:
            return c.status()["gateways"]

    wait_until(lambda: len(gateways()) == 2, 30, "two gateway processes")
    good = grpc.ssl_channel_credentials(pki["ca.pem"], pki["client.key"], pki["client.pem"])
    with grpc.secure_channel(f"127.0.0.1:{grpc_port}", good) as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        y = prediction_service_pb2_grpc.PredictionServiceStub(ch).Predict(request(4.0), 30).outputs["y"]
        assert tf.make_ndarray(y).tolist() == [4.0]

    no_client_cert = grpc.ssl_channel_credentials(pki["ca.pem"])
    for channel in (grpc.secure_channel(f"127.0.0.1:{grpc_port}", no_client_cert),
                    grpc.insecure_channel(f"127.0.0.1:{grpc_port}")):
        with channel, pytest.raises(grpc.RpcError) as err:
            prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request(1.0), 5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    # The one worker busy with two slow requests: a REST predict waits past its 500 ms and gets 504.
    with server.client(60) as native, concurrent.futures.ThreadPoolExecutor(2) as pool:
        slow = {"x": np.array([1.0], np.float32), "n": np.array([40_000], np.int32)}
        busy = [pool.submit(native.predict, "slow", slow) for _ in range(2)]
        wait_until(lambda: native.status()["workers"][0]["inflight"] == 2, 30, "the worker to hold both")
        served = native.status()["workers"][0]["served"]
        late = requests.post(rest + "/v1/models/hpt:predict", json={"instances": [1.0]}, timeout=30)
        assert late.status_code == 504 and "deadline exceeded" in late.json()["error"], late.text
        assert [f.result()["y"].tolist() for f in busy] == [[2.0], [2.0]]
        assert native.status()["workers"][0]["served"] == served + 2, "the expired request must not run"

    # One gateway killed: once it has exited (its listening sockets closed; a connection the kernel
    # had queued on them is reset), the other serves the port alone until the broker replaces it.
    first, second = gateways()
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: _exited(first), 10, "the killed gateway to exit")
    # (A connection racing the kill may still be reset: the check is that the port serves, within seconds.)
    assert wait_until(lambda: _predict(rest), 10, "the port to answer with one gateway") == {"predictions": [3.0]}
    wait_until(lambda: len(gateways()) == 2 and first not in gateways(), 30, "the killed gateway to be replaced")
    assert second in gateways()
    wait_until(lambda: _ok(rest), 30, "REST to answer after the restart")


def _ok(rest: str) -> bool:
    try:
        return requests.get(rest + "/v1/models/hpt", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _exited(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _predict(rest: str) -> dict | None:
    try:
        return requests.post(rest + "/v1/models/hpt:predict", json={"instances": [2.0]}, timeout=10).json()
    except requests.ConnectionError:
        return None
