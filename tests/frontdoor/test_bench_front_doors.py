"""`sgserve bench` loads all three front doors of one server in one run: native ZeroMQ, REST, gRPC."""
from __future__ import annotations

from tests.bench.test_bench_cli import assert_sane, bench_json


def test_bench_compares_the_three_front_doors(tfs_server):
    endpoints = [tfs_server.endpoint, tfs_server.rest, f"grpc://127.0.0.1:{tfs_server.grpc_port}"]
    rep, r = bench_json("hpt", "--endpoint", ",".join(endpoints), "-c", "2", "-d", "1.5", "--slice", "0.5",
                        "--warmup", "0.2")
    points = rep["points"]
    assert sorted(p["endpoint_index"] for p in points) == [0, 1, 2]
    for p in points:
        assert_sane(p)
    assert len(rep["comparisons"]) == 2, rep["comparisons"]
