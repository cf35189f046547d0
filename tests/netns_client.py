"""What a client on another host does, run inside a test namespace (tests/netns.py) by
tests/test_permissions.py; it prints one JSON object for the test to assert on.

    python -m tests.netns_client frame ENDPOINT
    python -m tests.netns_client admin ENDPOINT GRPC_ADDRESS PKI_DIR BASE_PATH
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable

import grpc
import zmq

from sgserve.client import Client
from sgserve.errors import ServeError
from sgserve.frontdoor import protos
from tests.conftest import demo_inputs

protos.load()
from tensorflow_serving.apis import model_management_pb2, model_service_pb2_grpc  # noqa: E402
from tensorflow_serving.config import model_server_config_pb2  # noqa: E402


def reload_config(address: str, base_path: str, pki_dir: str, who: str) -> dict[str, Any]:
    """TF Serving's HandleReloadConfigRequest over TLS with client certificate ``who`` (admin/other)."""
    config = model_server_config_pb2.ModelServerConfig()
    config.model_config_list.config.add(name="demo", base_path=base_path, model_platform="tensorflow")
    pem = {n: open(os.path.join(pki_dir, n), "rb").read() for n in ("ca.pem", f"{who}.key", f"{who}.pem")}
    credentials = grpc.ssl_channel_credentials(pem["ca.pem"], pem[f"{who}.key"], pem[f"{who}.pem"])
    # No proxy from the environment: the call must go straight to ``address``.
    with grpc.secure_channel(address, credentials, options=[("grpc.enable_http_proxy", 0)]) as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        try:
            response = stub.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(config=config), 60)
        except grpc.RpcError as exc:
            return {"code": exc.code().name, "details": exc.details()}
    return {"code": "OK", "error_code": response.status.error_code}


def outcome(call: Callable[[], Any]) -> dict[str, Any]:
    """The call's native status code (200 or the ServeError's) and its value or message."""
    try:
        return {"code": 200, "value": call()}
    except ServeError as exc:
        return {"code": exc.code, "message": exc.message}


def admin(endpoint: str, grpc_address: str, pki_dir: str, base_path: str) -> dict[str, Any]:
    """A predict, the three native admin commands, and a gRPC reload with each client certificate."""
    with Client(endpoint, timeout=10.0) as far:
        results = {"predict": outcome(lambda: list(far.predict("demo", demo_inputs(2))["score"].shape)),
                   "shutdown": outcome(far.shutdown),
                   "pin": outcome(lambda: far.pin("demo", 1)),
                   "unpin": outcome(lambda: far.unpin("demo"))}
    for who in ("other", "admin"):
        results[f"reload_{who}"] = reload_config(grpc_address, base_path, pki_dir, who)
    return results


def frame(endpoint: str) -> dict[str, Any]:
    """Sends one message from a DEALER and waits for the ROUTER's answer, so the test has read it."""
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    try:
        dealer.connect(endpoint)
        dealer.send(b"from the namespace")
        return {"reply": dealer.recv().decode() if dealer.poll(30_000) else None}
    finally:
        dealer.close(0)
        ctx.term()


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    print(json.dumps({"frame": frame, "admin": admin}[mode](*args), default=str))
