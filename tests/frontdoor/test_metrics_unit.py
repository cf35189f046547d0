"""The Prometheus page: a real Stats fed known calls plus the status of a real server, rendered
and parsed back with prometheus-client's own parser; and exact counts through a real broker."""
from __future__ import annotations

import copy
import os
from typing import Any

import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from sgserve.broker.stats import Stats
from sgserve.client import Client
from sgserve.errors import NotFound
from sgserve.frontdoor.metrics import render
from sgserve.protocol import pack, unpack_header
from tests.conftest import demo_inputs

LATENCY = ":tensorflow:serving:request_latency"
COUNT = ":tensorflow:serving:request_count"


def parse(page: bytes) -> dict[str, Any]:
    """Family name -> (type, {(sample name, sorted labels): value})."""
    out = {}
    for family in text_string_to_metric_families(page.decode()):
        out[family.name] = (family.type, {(s.name, tuple(sorted(s.labels.items()))): s.value
                                          for s in family.samples})
    return out


def value(families: dict[str, Any], family: str, sample: str, **labels: str) -> float:
    return families[family][1][(sample, tuple(sorted(labels.items())))]


def fetch_metrics(endpoint: str) -> dict[str, Any]:
    """The broker's ``metrics`` reply, over a plain REQ socket and the documented wire format."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    try:
        sock.connect(endpoint)
        sock.send_multipart(pack({"type": "metrics", "id": 1}))
        reply, _ = unpack_header(sock.recv_multipart())
    finally:
        sock.close()
    assert reply["code"] == 200, reply
    return {"stats": reply["stats"], "status": reply["status"]}


@pytest.fixture(scope="module")
def status(demo_server) -> dict[str, Any]:
    with demo_server.client(10.0) as c:
        return c.status()


def fed_stats() -> Stats:
    stats = Stats()
    for _ in range(3):
        stats.request("demo", "predict", "GRPC", 200, 300e-6)  # 300 us: the le="340.122" bucket
    stats.request("demo", "predict", "REST", 200, 1.5e-3)
    stats.request("demo", "predict", "ZMQ", 429, 1e-5)
    stats.request("demo", "predict", "REST", 429, 1e-5)
    stats.request("demo", "predict", "GRPC", 504, 2.0)
    stats.request("", "predict", "ZMQ", 404, 1e-5)
    stats.batch("demo", 3)
    stats.batch("demo", 8)
    return stats


def test_tf_serving_request_metrics(status: dict[str, Any]) -> None:
    page = render({"stats": fed_stats().snapshot(), "status": status})
    text = page.decode()
    # TF Serving's exact spelling: colon names, counters without _total.
    assert f"# TYPE {COUNT} counter\n" in text
    assert f'{COUNT}{{model_name="demo",status="OK"}} 4.0\n' in text
    assert f"# TYPE {LATENCY} histogram\n" in text
    m = parse(page)
    assert m[COUNT][0] == "counter"
    assert m[COUNT][1] == {  # the parser names counter samples NAME_total internally
        (f"{COUNT}_total", (("model_name", "demo"), ("status", "OK"))): 4.0,
        (f"{COUNT}_total", (("model_name", "demo"), ("status", "RESOURCE_EXHAUSTED"))): 2.0,
        (f"{COUNT}_total", (("model_name", "demo"), ("status", "DEADLINE_EXCEEDED"))): 1.0,
        (f"{COUNT}_total", (("model_name", ""), ("status", "NOT_FOUND"))): 1.0,
    }
    assert m[LATENCY][0] == "histogram"
    grpc = {"model_name": "demo", "API": "Predict", "entrypoint": "GRPC"}  # TF Serving's gRPC API label
    assert value(m, LATENCY, f"{LATENCY}_bucket", le="188.957", **grpc) == 0
    assert value(m, LATENCY, f"{LATENCY}_bucket", le="340.122", **grpc) == 3
    assert value(m, LATENCY, f"{LATENCY}_bucket", le="+Inf", **grpc) == 3
    assert value(m, LATENCY, f"{LATENCY}_count", **grpc) == 3  # the 504 is counted, not timed
    assert value(m, LATENCY, f"{LATENCY}_sum", **grpc) == pytest.approx(900)
    rest = {"model_name": "demo", "API": "predict", "entrypoint": "REST"}
    assert value(m, LATENCY, f"{LATENCY}_bucket", le="1102", **rest) == 0
    assert value(m, LATENCY, f"{LATENCY}_bucket", le="1983.59", **rest) == 1
    assert len([k for k in m[LATENCY][1] if k[0] == f"{LATENCY}_bucket"]) == 2 * 34


def test_sgserve_request_metrics(status: dict[str, Any]) -> None:
    m = parse(render({"stats": fed_stats().snapshot(), "status": status}))
    assert m["sgserve_requests"][0] == "counter"
    assert value(m, "sgserve_requests", "sgserve_requests_total", model="demo", api="predict", entrypoint="GRPC",
                 code="200") == 3
    assert value(m, "sgserve_requests", "sgserve_requests_total", model="", api="predict", entrypoint="ZMQ",
                 code="404") == 1
    assert m["sgserve_requests_rejected"][1] == {
        ("sgserve_requests_rejected_total", (("model", ""),)): 0.0,
        ("sgserve_requests_rejected_total", (("model", "demo"),)): 2.0}
    assert value(m, "sgserve_deadline_exceeded", "sgserve_deadline_exceeded_total", model="demo") == 1
    assert m["sgserve_batch_size"][0] == "histogram"
    assert value(m, "sgserve_batch_size", "sgserve_batch_size_bucket", model="demo", le="2.0") == 0
    assert value(m, "sgserve_batch_size", "sgserve_batch_size_bucket", model="demo", le="4.0") == 1
    assert value(m, "sgserve_batch_size", "sgserve_batch_size_bucket", model="demo", le="8.0") == 2
    assert value(m, "sgserve_batch_size", "sgserve_batch_size_count", model="demo") == 2
    assert value(m, "sgserve_batch_size", "sgserve_batch_size_sum", model="demo") == 11


def test_metrics_from_a_real_servers_status(status: dict[str, Any]) -> None:
    m = parse(render({"stats": Stats().snapshot(), "status": status}))
    (model,) = status["model_status"]
    (version,) = model["versions"]
    path = os.path.join(model["base_path"], str(version["version"]))
    load = ":tensorflow:cc:saved_model:load_latency"
    attempts = ":tensorflow:cc:saved_model:load_attempt_count"
    assert m[load][0] == "counter" and m[attempts][0] == "counter"
    assert value(m, load, f"{load}_total", model_path=path) == round(version["load_seconds"] * 1e6)
    assert value(m, attempts, f"{attempts}_total", model_path=path, status="success") == 1
    # The demo warms up on synthetic inputs: no warmup file, so no records read (as TF Serving), but
    # the warmup's time is one observation of the warmup latency.
    assert m[":tensorflow:serving:model_warmup_records_read"][1] == {}
    warm = ":tensorflow:serving:model_warmup_latency"
    assert value(m, warm, f"{warm}_count", model_path=path, status="OK") == 1
    assert value(m, warm, f"{warm}_sum", model_path=path, status="OK") == \
        pytest.approx(version["warmup"]["seconds"] * 1e6)
    assert m[COUNT][1] == {} and m[LATENCY][1] == {}

    key = {"model": "demo", "version": str(version["version"])}
    assert value(m, "sgserve_model_version_bytes", "sgserve_model_version_bytes", **key) == version["bytes"] > 0
    assert value(m, "sgserve_model_version_own_bytes", "sgserve_model_version_own_bytes", **key) == \
        version["own_bytes"]
    assert m["sgserve_model_version_state"][1] == {
        ("sgserve_model_version_state", (("model", "demo"), ("state", "AVAILABLE"), ("version", "1"))): 1.0}
    assert value(m, "sgserve_model_version_load_seconds", "sgserve_model_version_load_seconds", **key) == \
        version["load_seconds"]
    assert m["sgserve_worker_ready"][0] == "gauge" and m["sgserve_worker_restarts"][0] == "counter"
    for w in status["workers"]:
        index = str(w["index"])
        assert value(m, "sgserve_worker_ready", "sgserve_worker_ready", worker=index) == 1
        assert value(m, "sgserve_worker_inflight", "sgserve_worker_inflight", worker=index) == w["inflight"]
        assert value(m, "sgserve_worker_served", "sgserve_worker_served_total", worker=index) == w["served"]
        assert value(m, "sgserve_worker_restarts", "sgserve_worker_restarts_total", worker=index) == 0
    assert len(m["sgserve_worker_ready"][1]) == len(status["workers"]) == 2
    assert value(m, "sgserve_queue_depth", "sgserve_queue_depth") == status["queued"] == 0
    assert value(m, "sgserve_split_requests", "sgserve_split_requests_total") == status["split"]["requests"]
    assert value(m, "sgserve_split_parts", "sgserve_split_parts_total") == status["split"]["parts"]
    assert value(m, "sgserve_model_config_error", "sgserve_model_config_error") == 0


def test_warmup_file_and_failed_version(status: dict[str, Any]) -> None:
    status = copy.deepcopy(status)
    (model,) = status["model_status"]
    good = model["versions"][0]
    good["warmup"] = {"requests": 7, "source": "/m/1/assets.extra/tf_serving_warmup_requests", "seconds": 0.25}
    failed = dict(good, version=2, state="FAILED", error="bad checkpoint", load_seconds=None, warmup=None)
    model["versions"].insert(0, failed)
    m = parse(render({"stats": Stats().snapshot(), "status": status}))
    base = model["base_path"]
    attempts, records = ":tensorflow:cc:saved_model:load_attempt_count", ":tensorflow:serving:model_warmup_records_read"
    assert value(m, attempts, f"{attempts}_total", model_path=f"{base}/2", status="fail") == 1
    assert value(m, attempts, f"{attempts}_total", model_path=f"{base}/1", status="success") == 1
    assert value(m, records, f"{records}_total", model_path=f"{base}/1", status="OK") == 7
    warm = ":tensorflow:serving:model_warmup_latency"
    labels = {"model_path": f"{base}/1", "status": "OK"}
    assert value(m, warm, f"{warm}_bucket", le="218591", **labels) == 0  # 250000 us is past 218591
    assert value(m, warm, f"{warm}_bucket", le="393464", **labels) == 1
    assert value(m, warm, f"{warm}_count", **labels) == 1
    assert value(m, warm, f"{warm}_sum", **labels) == 250000
    assert value(m, "sgserve_model_version_state", "sgserve_model_version_state", model="demo", version="2",
                 state="FAILED") == 1


def test_counts_are_exact_through_the_broker(demo_server) -> None:
    n = 7
    before = parse(render(fetch_metrics(demo_server.endpoint)))
    ok = before[COUNT][1].get((f"{COUNT}_total", (("model_name", "demo"), ("status", "OK"))), 0)
    missing = before[COUNT][1].get((f"{COUNT}_total", (("model_name", ""), ("status", "NOT_FOUND"))), 0)
    served = served_by_workers(before)
    with Client(demo_server.endpoint, timeout=30.0) as c:
        for i in range(n):
            c.predict("demo", demo_inputs(2, seed=i))
        with pytest.raises(NotFound):
            c.predict("no-such-model", demo_inputs(2))
    m = parse(render(fetch_metrics(demo_server.endpoint)))
    assert value(m, COUNT, f"{COUNT}_total", model_name="demo", status="OK") == ok + n
    zmq_predict = {"model_name": "demo", "API": "predict", "entrypoint": "ZMQ"}
    assert value(m, LATENCY, f"{LATENCY}_count", **zmq_predict) == ok + n
    assert value(m, LATENCY, f"{LATENCY}_bucket", le="+Inf", **zmq_predict) == ok + n
    # an unknown model's name is not a label clients can grow: it counts under ""
    assert value(m, COUNT, f"{COUNT}_total", model_name="", status="NOT_FOUND") == missing + 1
    assert served_by_workers(m) == served + n


def served_by_workers(families: dict[str, Any]) -> float:
    return sum(families["sgserve_worker_served"][1].values())
