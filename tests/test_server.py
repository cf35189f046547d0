"""The real server, started by the real CLI, serving the built-in demo model with 2 workers x 1 core."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import msgpack
import numpy as np
import pytest
import zmq

from sgserve import protocol
from sgserve.errors import InvalidArgument, NotFound
from tests.conftest import demo_inputs

pytestmark = pytest.mark.usefixtures("demo_server")


def test_predict_matches_stock_tensorflow(demo_server, tmp_path_factory):
    import tensorflow as tf

    feed = demo_inputs(8)
    with demo_server.client() as c:
        res = c.predict_full("demo", feed)
    assert res.model == "demo" and res.version == 1 and res.worker in (0, 1)
    path = str(tmp_path_factory.getbasetemp() / "sgserve-cache-demo" / "demo" / "1")
    want = tf.saved_model.load(path).signatures["serving_default"](
        user_id=tf.constant(feed["user_id"]), item_id=tf.constant(feed["item_id"]))
    for k in ("score", "logit"):
        np.testing.assert_array_equal(res.outputs[k], want[k].numpy())


def test_round_robin_uses_both_workers(demo_server):
    with demo_server.client() as c:
        seen = {c.predict_full("demo", demo_inputs(1, i)).worker for i in range(8)}
    assert seen == {0, 1}


def test_output_filter_and_version(demo_server):
    with demo_server.client() as c:
        out = c.predict("demo", demo_inputs(3), version=1, output_filter=["score"])
    assert list(out) == ["score"] and out["score"].shape == (3,)


@pytest.mark.parametrize("kwargs,fragment", [
    ({"model": "nope"}, "model 'nope'"),
    ({"model": "demo", "version": 7}, "7"),
    ({"model": "demo", "signature": "nosig"}, "nosig"),
])
def test_unknown_model_version_signature_is_404(demo_server, kwargs, fragment):
    model = kwargs.pop("model")
    with demo_server.client() as c:
        with pytest.raises(NotFound) as e:
            c.predict(model, demo_inputs(1), **kwargs)
    assert e.value.code == 404 and fragment in e.value.message


@pytest.mark.parametrize("feed,fragment", [
    ({"user_id": np.array([1], np.int64)}, "missing input(s) ['item_id']"),
    ({"user_id": np.array([1], np.int64), "item_id": np.array([1], np.int64), "x": np.array([1.0])}, "no input(s) ['x']"),
    ({"user_id": np.array([1.0], np.float32), "item_id": np.array([1], np.int64)}, "input 'user_id': expected dtype int64, got float32"),
    ({"user_id": np.array([[1]], np.int64), "item_id": np.array([1], np.int64)}, "input 'user_id': expected shape [?], got [1, 1]"),
])
def test_bad_inputs_are_400_naming_the_input(demo_server, feed, fragment):
    with demo_server.client() as c:
        with pytest.raises(InvalidArgument) as e:
            c.predict("demo", feed)
        assert e.value.code == 400 and fragment in e.value.message
        assert c.predict("demo", demo_inputs(1))["score"].shape == (1,)  # still serving


@pytest.mark.parametrize("frames,fragment", [
    ([b"hello"], "frame"),
    ([b"XXXX", b"\x80"], "SGS1"),
    ([protocol.MAGIC, b"\xc1\xc1"], "msgpack"),
    ([protocol.MAGIC, msgpack.packb([1, 2])], "map"),
    ([protocol.MAGIC, msgpack.packb({"type": "launch"})], "launch"),
    ([protocol.MAGIC, msgpack.packb({"type": "predict", "model": "demo",
                                     "inputs": [{"name": "user_id", "dtype": "int64", "shape": [2]}]}), b"\x00" * 3], "bytes"),
])
def test_garbage_frames_get_400_and_server_survives(demo_server, frames, fragment):
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(demo_server.endpoint)
    try:
        s.send_multipart(frames)
        assert s.poll(10000), "no answer to a malformed message"
        header, _ = protocol.unpack_header(s.recv_multipart())
        assert header["code"] == 400
        assert fragment in header["message"]
    finally:
        s.close()
    with demo_server.client() as c:
        assert c.predict("demo", demo_inputs(2))["score"].shape == (2,)


def test_oversized_payload_is_refused(demo_server):
    big = {"user_id": np.zeros(600_000, np.int64), "item_id": np.zeros(600_000, np.int64)}  # 9.6 MB > 4 MiB
    with demo_server.client() as c:
        with pytest.raises(InvalidArgument) as e:
            c.predict("demo", big)
        assert "limit" in e.value.message and "--max-request-bytes" in e.value.message
        assert c.predict("demo", demo_inputs(1))["score"].shape == (1,)


def test_metadata(demo_server):
    with demo_server.client() as c:
        meta = c.metadata("demo")
    sig = meta["signatures"]["serving_default"]
    assert sig["inputs"] == {"item_id": {"dtype": "int64", "shape": [-1]}, "user_id": {"dtype": "int64", "shape": [-1]}}
    assert sig["outputs"]["score"] == {"dtype": "float32", "shape": [-1]}


def run_cli(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sgserve.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, **(env or {})))


def test_status_cli(demo_server):
    r = run_cli("status", "--json", "--endpoint", demo_server.endpoint)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert [w["index"] for w in st["workers"]] == [0, 1]
    assert [w["cores"] for w in st["workers"]] == [[0], [1]]
    assert all(w["state"] == "READY" and w["pid"] for w in st["workers"])
    (m,) = st["models"]
    # user_emb + item_emb (100000 x 32 float32 each) + the MLP, once.
    assert m["name"] == "demo" and m["version"] == 1 and 25_600_000 * 1 <= m["bytes"] < 26_000_000
    r = run_cli("status", "--endpoint", demo_server.endpoint)
    assert r.returncode == 0 and "READY" in r.stdout and "demo" in r.stdout


def test_predict_cli(demo_server):
    r = run_cli("predict", "demo", "--json", '{"user_id": [1, 2], "item_id": [3, 4]}', "--endpoint", demo_server.endpoint)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["version"] == 1 and len(out["outputs"]["score"]) == 2
    r = run_cli("predict", "nope", "--json", "{}", "--endpoint", demo_server.endpoint)
    assert r.returncode == 1 and "404" in r.stderr


def test_bench_cli(demo_server, tmp_path):
    out = tmp_path / "b.json"
    r = run_cli("bench", "demo", "-n", "200", "-c", "4", "--warmup", "0.2", "--json", str(out),
                "--endpoint", demo_server.endpoint)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["ok"] >= 200 and res["errors"] == 0 and res["qps"] > 0
    assert 0 < res["p50_ms"] <= res["p90_ms"] <= res["p99_ms"] <= res["max_ms"]
    assert "QPS" in r.stdout and "[bench]" in r.stderr


def test_bench_against_a_down_endpoint_says_so():
    t0 = time.monotonic()
    r = run_cli("bench", "demo", "-n", "10", "--timeout", "2", "--endpoint", "tcp://127.0.0.1:9")
    assert r.returncode != 0
    assert "tcp://127.0.0.1:9" in r.stderr
    assert time.monotonic() - t0 < 30
