"""Outputs through the shared-memory runtime equal tf.saved_model.load, for every export format."""
from __future__ import annotations

import os

import numpy as np
import pytest

from sgserve.models import loader, shared_segment
from sgserve.errors import InvalidArgument


@pytest.fixture(scope="module")
def runtime_of(models_dir):
    from sgserve.worker.runtime import ModelRuntime

    made = []

    def get(name: str):
        spec = loader.load_version(name, os.path.join(models_dir, name), 1, shared_segment.server_id())
        made.append(spec.segment)
        return spec, ModelRuntime(spec.segment)

    yield get
    for seg in made:
        shared_segment.unlink(seg)


def reference(models_dir: str, name: str, sig: str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import tensorflow as tf

    fn = tf.saved_model.load(os.path.join(models_dir, name, "1")).signatures[sig]
    args = {k: tf.constant(v.tolist() if v.dtype == object else v, dtype=tf.string if v.dtype == object else None)
            for k, v in feed.items()}
    return {k: v.numpy() for k, v in fn(**args).items()}


CASES = [
    ("tf2", "serving_default", {"ids": np.array([0, 7, 999, 7], np.int64),
                                "dense": np.arange(16, dtype=np.float32).reshape(4, 4)}),
    ("tf2", "embed", {"ids": np.array([3, 1], np.int64)}),
    ("keras", "serving_default", {"city": np.array([[b"tokyo"], [b"oslo"], [b"unknown"]], dtype=object),
                                  "num": np.ones((3, 3), np.float32)}),
    ("tf1", "serving_default", {"x": np.array([1.0, -2.0, 4.0], np.float32), "ids": np.array([0, 5, 99], np.int64)}),
]


@pytest.mark.parametrize("name,sig,feed", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_outputs_equal_stock_tensorflow(runtime_of, models_dir, name, sig, feed):
    spec, rt = runtime_of(name)
    got = rt.signatures[sig].run(feed)
    want = reference(models_dir, name, sig, feed)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype
        np.testing.assert_array_equal(got[k], want[k])


def test_metadata_describes_signatures(runtime_of):
    spec, _ = runtime_of("tf2")
    sig = spec.signatures["serving_default"]
    assert sig["inputs"] == {"dense": {"dtype": "float32", "shape": [-1, 4]}, "ids": {"dtype": "int64", "shape": [-1]}}
    assert sig["outputs"]["y"] == {"dtype": "float32", "shape": [-1, 4]}
    assert set(spec.signatures) == {"serving_default", "embed"}
    # Only the variables the graph reads, each once: emb 1000x16, w 16x4, b 4 (float32, 64-byte aligned).
    assert spec.segment_bytes == 64000 + 256 + 64


def test_tf1_reference_variables_read_from_segment(runtime_of):
    _, rt = runtime_of("tf1")
    out = rt.signatures["serving_default"].run({"x": np.array([2.0], np.float32), "ids": np.array([1], np.int64)})
    # 0.5 * 2 + 2 + sum(emb[1]) where emb = arange(400).reshape(100, 4): 4+5+6+7 = 22
    assert out["y"].tolist() == [25.0]


@pytest.mark.parametrize("feed,msg", [
    ({"ids": np.array([1], np.int64)}, "missing input(s) ['dense']"),
    ({"ids": np.array([1], np.int64), "dense": np.ones((1, 4), np.float32), "zz": np.ones(1)}, "no input(s) ['zz']"),
    ({"ids": np.array([1], np.int32), "dense": np.ones((1, 4), np.float32)}, "input 'ids': expected dtype int64, got int32"),
    ({"ids": np.array([1], np.int64), "dense": np.ones((1, 3), np.float32)}, "input 'dense': expected shape [?, 4], got [1, 3]"),
])
def test_bad_inputs_are_named(runtime_of, feed, msg):
    _, rt = runtime_of("tf2")
    with pytest.raises(InvalidArgument) as e:
        rt.signatures["serving_default"].run(feed)
    assert msg in e.value.message
    assert e.value.code == 400


def test_segment_is_read_only_in_workers(runtime_of):
    spec, rt = runtime_of("tf2")
    # The worker's view is a PROT_READ mapping: the manifest says where emb lives; writing it must fault.
    import subprocess
    import sys
    code = ("from sgserve.models.shared_segment import SegmentView; v = SegmentView(%r); "
            "a = v.array(0, 'float32', [16]); a[0] = 1.0" % spec.segment)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert r.returncode == -11  # SIGSEGV: the model cannot be corrupted by a worker bug


def test_corrupt_model_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad" / "1"
    bad.mkdir(parents=True)
    (bad / "saved_model.pb").write_bytes(b"\x00garbage" * 10)
    from sgserve.models.graph_rewrite import ModelFormatError

    before = {n for n in os.listdir("/dev/shm") if n.startswith("sgserve_")}
    with pytest.raises(ModelFormatError) as e:
        loader.load_version("bad", str(tmp_path / "bad"), 1, shared_segment.server_id())
    assert "corrupt" in e.value.message or "checkpoint" in e.value.message
    assert {n for n in os.listdir("/dev/shm") if n.startswith("sgserve_")} == before
