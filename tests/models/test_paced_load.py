"""Paced loads (`--load-bandwidth`): the setting parses, the loader writes numeric tensors straight
from the checkpoint into the segment (crc32c checked) no faster than told, and a paced update
still completes and serves.

Real SavedModels (tests/lifecycle_models.py), the real loader and the real CLI; no mocks.
"""
from __future__ import annotations

import os
import subprocess
import sys

import click
import numpy as np
import pytest

from sgserve import settings
from sgserve.config import ByteRate
from tests import lifecycle_models as lm
from tests.conftest import wait_until

MiB = 2**20


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("paced"))
    for v in (1, 2):
        lm.build_version(d, v)
    return d


def parsed(args: list[str], env: dict[str, str] | None = None) -> int:
    """``load_bandwidth`` as `sgserve start`'s own options parse it (the same declared options)."""
    from click.testing import CliRunner

    @click.command()
    @settings.click_options
    def start(**values):
        return settings.config_from_options(values).load_bandwidth

    result = CliRunner().invoke(start, args, env=env, standalone_mode=False, catch_exceptions=False)
    return result.return_value


@pytest.mark.parametrize("text,value", [("200MiB", 200 * MiB), ("1GiB", 2**30), ("0", 0), ("500MB", 500 * 10**6),
                                        ("1.5GiB/s", 3 * 2**29), ("64 KiB", 64 * 1024)])
def test_load_bandwidth_parses_sizes(text, value):
    assert parsed(["--load-bandwidth", text]) == value
    assert ByteRate(text) == value


def test_load_bandwidth_defaults_to_unlimited_and_reads_its_env_var():
    assert parsed([]) == 0
    assert parsed([], env={"SGSERVE_LOAD_BANDWIDTH": "1GiB"}) == 2**30


@pytest.mark.parametrize("text", ["fast", "-5MiB", "200XB", "MiB"])
def test_garbage_load_bandwidth_is_a_usage_error(text, tmp_path):
    r = subprocess.run([sys.executable, "-m", "sgserve.cli", "start", "--load-bandwidth", text,
                        "--model-base-path", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "Invalid value for '--load-bandwidth'" in r.stderr
    assert "is not a byte rate: write e.g. 200MiB, 1GiB" in r.stderr


def test_pace_sleeps_only_what_keeps_it_under_the_rate():
    from sgserve.models.loader import LoadPace

    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    pace = LoadPace(100 * MiB, clock=lambda: now[0], sleep=sleep)
    for _ in range(25):  # 100 MiB in 4 MiB chunks, each written in 5 ms
        now[0] += 0.005
        pace.wrote(4 * MiB)
    assert now[0] == pytest.approx(1.0)  # exactly the rate: 100 MiB took 1 s
    assert pace.slept == pytest.approx(1.0 - 25 * 0.005)
    unlimited = LoadPace(0, clock=lambda: now[0], sleep=sleep)
    unlimited.wrote(10**9)
    assert unlimited.slept == 0.0


def test_direct_read_matches_tensorflow_and_checks_crc(store, tmp_path):
    """The loader's own read of the checkpoint gives TensorFlow's bytes, and a flipped byte in the data
    file fails the load with a clear message instead of serving garbage."""
    import shutil

    import tensorflow as tf

    from sgserve.models import graph_rewrite, loader, shared_segment

    sid = shared_segment.server_id()
    pace = loader.LoadPace(50 * MiB)
    spec = loader.load_version("m", store, 2, sid, pace=pace)
    try:
        view = shared_segment.SegmentView(spec.segment)
        ckpt = tf.train.load_checkpoint(os.path.join(store, "2", "variables", "variables"))
        for t in view.manifest["tensors"]:
            np.testing.assert_array_equal(view.array(t["offset"], t["dtype"], t["shape"]), ckpt.get_tensor(t["key"]))
        assert pace.done >= lm.EMB_BYTES
        assert spec.load_seconds >= lm.EMB_BYTES / (50 * MiB) * 0.9
        del view
    finally:
        shared_segment.unlink(spec.segment)

    bad = str(tmp_path / "bad")
    shutil.copytree(os.path.join(store, "2"), os.path.join(bad, "2"))
    data = [f for f in os.listdir(os.path.join(bad, "2", "variables")) if ".data-" in f][0]
    with open(os.path.join(bad, "2", "variables", data), "r+b") as f:  # a byte inside the table's bytes
        f.seek(lm.EMB_BYTES // 2)
        byte = f.read(1)
        f.seek(lm.EMB_BYTES // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    before = set(shared_segment.list_segments())
    with pytest.raises(graph_rewrite.ModelFormatError, match="corrupt checkpoint data for .*crc32c mismatch"):
        loader.load_version("m", bad, 2, sid)
    assert set(shared_segment.list_segments()) == before  # the half-written segment is gone


def test_paced_update_completes_and_serves(start_server, store, tmp_path):
    """A full update (incremental sharing off: every tensor is written again) at 1 MiB/s takes the
    time the rate says, and the new version then answers with its own values."""
    base = str(tmp_path / "m")
    lm.publish(store, base, 1)
    srv = start_server(["--model-base-path", base, "--workers", "2", "--cpus-per-worker", "1",
                        "--file-system-poll-wait-seconds", "0.2", "--no-incremental-updates",
                        "--load-bandwidth", "1MiB"])
    ids = np.array([0, 3, 19_999], dtype=np.int64)
    with srv.client(10.0) as c:
        assert c.predict_full("m", {"ids": ids}).version == 1
        lm.publish(store, base, 2)

        def v2_available():
            st = next(m for m in c.status()["model_status"] if m["name"] == "m")
            return next((v for v in st["versions"] if v["version"] == 2 and v["state"] == "AVAILABLE"), None)

        v2 = wait_until(v2_available, timeout=60, what="version 2 AVAILABLE")
        assert v2["own_bytes"] >= lm.EMB_BYTES  # written again, not shared
        assert v2["load_seconds"] >= lm.EMB_BYTES / MiB * 0.9, v2  # paced: 1.28 MB at 1 MiB/s
        r = wait_until(lambda: (lambda r: r if r.version == 2 else None)(c.predict_full("m", {"ids": ids})),
                       timeout=30, what="an answer from version 2")
        np.testing.assert_allclose(r.outputs["y"], lm.expected(ids, 2), rtol=1e-6)
