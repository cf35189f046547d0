"""Fair admission through the front doors: the gateway names each gRPC or REST connection to the
broker, so a flooding connection cannot take the queue from a polite one."""
from __future__ import annotations

import concurrent.futures
from typing import Callable

import grpc
import pytest
import requests

from tests.conftest import wait_until
from tests.frontdoor.test_grpc import BUSY_N, _inflight, _queued, slow_request

tf = pytest.importorskip("tensorflow")
from tensorflow_serving.apis import prediction_service_pb2_grpc  # noqa: E402


def own_connection(port: int) -> grpc.Channel:
    """A channel with its own TCP connection (grpc shares subchannels between channels by default)."""
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])


def flooded(server, polite: Callable[[], float]) -> list[grpc.StatusCode]:
    """Both workers busy and --max-enqueued 2 full with one gRPC connection's requests, then one
    polite request from another connection: its answer must be 2.0; returns the flooder's refusals."""
    with own_connection(server.grpc_port) as channel, concurrent.futures.ThreadPoolExecutor(8) as pool:
        flood = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        busy = [pool.submit(flood.Predict, slow_request(BUSY_N), 60) for _ in range(4)]
        wait_until(lambda: _inflight(server) == 4, 30, "both workers to hold two slow requests")
        queued = [pool.submit(flood.Predict, slow_request(1), 60) for _ in range(2)]
        wait_until(lambda: _queued(server) == 2, 30, "the flooder's two requests queued")
        assert polite() == 2.0
        refused = []
        for f in busy + queued:
            try:
                assert tf.make_ndarray(f.result().outputs["y"]).tolist() == [2.0]
            except grpc.RpcError as exc:
                refused.append(exc.code())
        return refused


def test_a_flooding_connection_cannot_refuse_a_polite_one(tfs_server):
    """The polite request gets in; the flooder's newest queued request is answered 429 instead."""
    with own_connection(tfs_server.grpc_port) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        polite_grpc = lambda: tf.make_ndarray(stub.Predict(slow_request(1), 60).outputs["y"]).tolist()[0]  # noqa: E731
        assert flooded(tfs_server, polite_grpc) == [grpc.StatusCode.RESOURCE_EXHAUSTED]

    def polite_rest() -> float:
        r = requests.post(tfs_server.rest + "/v1/models/slow:predict", json={"instances": [{"x": 1.0, "n": 1}]},
                          timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["predictions"][0]

    assert flooded(tfs_server, polite_rest) == [grpc.StatusCode.RESOURCE_EXHAUSTED]
