"""Stats, the broker's request counters: fed calls, read back exactly through snapshot()."""
from __future__ import annotations

import msgpack
import pytest

from sgserve.broker.stats import BATCH_BOUNDS, LATENCY_BOUNDS_US, Stats, exponential_bounds


def test_bounds_are_tf_servings_exponential_layouts() -> None:
    # Buckets::Exponential(10, 1.8, 33) (request latency, us) and (1, 2, 14) (batch sizes):
    # bound i is scale * growth**i, built by repeated multiplication as TF does.
    assert len(LATENCY_BOUNDS_US) == 33
    assert LATENCY_BOUNDS_US[:5] == [10.0, 18.0, 32.4, 58.32, 104.976]
    assert LATENCY_BOUNDS_US[-1] == pytest.approx(10 * 1.8 ** 32)
    assert "%.6g" % LATENCY_BOUNDS_US[-1] == "1.47476e+09"  # what TF Serving's page prints
    assert BATCH_BOUNDS == [float(2 ** i) for i in range(14)]
    assert exponential_bounds(100, 1.2, 3) == [100.0, 120.0, 144.0]


def test_counts_per_model_api_entrypoint_code() -> None:
    stats = Stats()
    for _ in range(3):
        stats.request("a", "predict", "ZMQ", 200, 0.0002)
    stats.request("a", "predict", "GRPC", 200, 0.0002)
    stats.request("a", "predict", "ZMQ", 429, 0.00001)
    stats.request("b", "classify", "REST", 404, 0.00001)
    stats.request("", "predict", "ZMQ", 400, 0.00001)
    assert stats.snapshot()["requests"] == [
        {"model": "", "api": "predict", "entrypoint": "ZMQ", "code": 400, "count": 1},
        {"model": "a", "api": "predict", "entrypoint": "GRPC", "code": 200, "count": 1},
        {"model": "a", "api": "predict", "entrypoint": "ZMQ", "code": 200, "count": 3},
        {"model": "a", "api": "predict", "entrypoint": "ZMQ", "code": 429, "count": 1},
        {"model": "b", "api": "classify", "entrypoint": "REST", "code": 404, "count": 1},
    ]


def test_latency_histogram_counts_successes_only_in_microseconds() -> None:
    stats = Stats()
    stats.request("a", "predict", "ZMQ", 200, 5e-6)  # 5 us: first bucket (<= 10)
    stats.request("a", "predict", "ZMQ", 200, 10e-6)  # exactly on a bound: that bucket (le)
    stats.request("a", "predict", "ZMQ", 200, 100e-6)  # 100 us: <= 104.976, the 5th bucket
    stats.request("a", "predict", "ZMQ", 200, 3600.0)  # an hour: past every bound, +Inf
    stats.request("a", "predict", "ZMQ", 504, 2.0)  # an error: counted, not timed (as TF Serving)
    latency = stats.snapshot()["latency"]
    assert latency["bounds_us"] == LATENCY_BOUNDS_US
    (series,) = latency["series"]
    assert (series["model"], series["api"], series["entrypoint"]) == ("a", "predict", "ZMQ")
    expected = [0] * 34
    expected[0], expected[4], expected[33] = 2, 1, 1
    assert series["buckets"] == expected
    assert series["sum_us"] == pytest.approx(5 + 10 + 100 + 3600e6)


def test_no_latency_series_for_a_model_that_only_failed() -> None:
    stats = Stats()
    stats.request("a", "predict", "REST", 503, 0.1)
    assert stats.snapshot()["latency"]["series"] == []


def test_batch_size_histogram_per_model() -> None:
    stats = Stats()
    for size in (1, 1, 3, 8, 9, 16384):
        stats.batch("a", size)
    stats.batch("b", 2)
    batch = stats.snapshot()["batch"]
    assert batch["bounds"] == BATCH_BOUNDS
    a, b = batch["series"]
    assert a["model"] == "a" and b["model"] == "b"
    # <=1: 2; <=4: the 3; <=8: the 8; <=16: the 9; +Inf: 16384 (past 8192)
    expected = [0] * 15
    expected[0], expected[2], expected[3], expected[4], expected[14] = 2, 1, 1, 1, 1
    assert a["buckets"] == expected
    assert a["sum"] == 1 + 1 + 3 + 8 + 9 + 16384
    assert b["buckets"] == [0, 1] + [0] * 13 and b["sum"] == 2.0


def test_snapshot_is_plain_msgpack_data_and_a_copy() -> None:
    stats = Stats()
    stats.request("a", "predict", "ZMQ", 200, 0.001)
    stats.batch("a", 4)
    snap = stats.snapshot()
    assert msgpack.unpackb(msgpack.packb(snap, use_bin_type=True), raw=False) == snap
    stats.request("a", "predict", "ZMQ", 200, 0.001)
    stats.batch("a", 4)
    assert snap["requests"][0]["count"] == 1  # later calls do not reach an earlier snapshot
    assert sum(snap["latency"]["series"][0]["buckets"]) == 1
    assert sum(snap["batch"]["series"][0]["buckets"]) == 1
    assert stats.snapshot()["requests"][0]["count"] == 2


def test_empty_snapshot() -> None:
    assert Stats().snapshot() == {"requests": [], "latency": {"bounds_us": LATENCY_BOUNDS_US, "series": []},
                                  "batch": {"bounds": BATCH_BOUNDS, "series": []}}
