"""Refusing what will not fit (sgserve/models/capacity.py): a version larger than the room of its
tier fails with the sizes and a hint, never an OOM kill.

The cgroup tests make a real cgroup v1 memory controller group (the machine's, as root), start the
real CLI inside it and remove the group in teardown; they skip only when that controller is not
writable here.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from typing import Iterator

import numpy as np
import pytest

from sgserve.models import capacity, shared_segment
from tests.conftest import ServerProcess, free_port, group_alive, sgserve_segments, wait_until

MIB = 2**20
CGROUP_V1 = "/sys/fs/cgroup/memory"
LIMIT_MIB = 640  # the server's own processes (broker, loader, zygote, 2 workers) take about 400
SHARDS, SHARD_MIB, DIM = 4, 128, 64  # a 512 MiB table in 4 variables: the loader holds one at a time


def build_sharded(base: str, shards: int = SHARDS, shard_mib: int = SHARD_MIB) -> str:
    """An embedding table split in ``shards`` variables ("div" strategy); row i holds i, so y = DIM * id."""
    import tensorflow as tf

    rows = shard_mib * MIB // (DIM * 4)

    class Sharded(tf.Module):
        def __init__(self) -> None:
            self.emb = [tf.Variable(np.repeat(np.arange(s * rows, (s + 1) * rows, dtype="float32")[:, None], DIM, 1))
                        for s in range(shards)]

        @tf.function(input_signature=[tf.TensorSpec([None], tf.int64, name="ids")])
        def serve(self, ids):
            return {"y": tf.reduce_sum(tf.nn.embedding_lookup(self.emb, ids), axis=1)}

    m = Sharded()
    tf.saved_model.save(m, os.path.join(base, "1"), signatures={"serving_default": m.serve})
    return base


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[str]:
    """A cgroup v1 memory group with ``limit`` bytes; removed (once empty) afterwards."""
    path = os.path.join(CGROUP_V1, f"sgserve-test-{os.getpid()}")
    try:
        os.mkdir(path)
        with open(os.path.join(path, "memory.limit_in_bytes"), "w") as f:
            f.write(str(limit))
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.rmdir(path)
        pytest.skip(f"the cgroup v1 memory controller is not writable here ({exc})")
    try:
        yield path
    finally:
        wait_until(lambda: not _read(os.path.join(path, "cgroup.procs")), 15, "the cgroup to empty")
        os.rmdir(path)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def oom_kills(cgroup: str) -> int:
    stat = dict(line.split() for line in _read(os.path.join(cgroup, "memory.oom_control")).splitlines())
    return int(stat.get("oom_kill", 0))


class CgroupServer(ServerProcess):
    """`sgserve start` whose process joins ``cgroup`` before it execs (its children inherit it)."""

    def __init__(self, cgroup: str, args: list[str], cache_dir: str) -> None:  # noqa: D107 - see class
        self.port = free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.args = ["--endpoint", self.endpoint] + args
        env = dict(os.environ, SGSERVE_CACHE_DIR=cache_dir)
        script = f'echo $$ > {cgroup}/cgroup.procs && exec "$0" -m sgserve.cli start "$@"'
        self.proc = subprocess.Popen(["sh", "-c", script, sys.executable, *self.args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)
        self.output = ""


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> str:
    return build_sharded(str(tmp_path_factory.mktemp("sharded") / "m"))


def test_refused_on_dev_shm_under_the_cgroup_limit_and_served_from_disk(sharded, tmp_path, cache_dir):
    before = sgserve_segments()
    segdir = tmp_path / "segments"
    segdir.mkdir()
    with memory_cgroup(LIMIT_MIB * MIB) as cg:
        refused = CgroupServer(cg, ["--model-base-path", sharded, "--workers", "2"], cache_dir)
        _, err = refused.proc.communicate(timeout=180)
        assert refused.proc.returncode == 2, err[-2000:]
        assert "cannot load model 'm'" in err and "--segment-dir" in err, err[-2000:]
        assert "the version needs 512.0 MiB of shared memory" in err and f"limit {LIMIT_MIB}.0 MiB" in err, err[-2000:]
        assert oom_kills(cg) == 0
        assert not {n for n in sgserve_segments() - before if n.startswith(f"sgserve_{refused.proc.pid}_")}

        srv = CgroupServer(cg, ["--model-base-path", sharded, "--workers", "2", "--segment-dir", str(segdir)],
                           cache_dir)
        try:
            srv.wait_ready(timeout=180)
            rows = SHARDS * SHARD_MIB * MIB // (DIM * 4)
            ids = np.random.default_rng(1).integers(0, rows, 512).astype(np.int64)
            with srv.client(60.0) as c:
                for _ in range(4):
                    np.testing.assert_allclose(c.predict("m", {"ids": ids})["y"], DIM * ids.astype(np.float64), rtol=1e-6)
                v = c.status()["model_status"][0]["versions"][0]
            assert v["tier"] == str(segdir) and v["bytes"] == SHARDS * SHARD_MIB * MIB, v
            assert [os.path.dirname(s) for s in v["segments"]] == [str(segdir)]
            assert int(_read(os.path.join(cg, "memory.max_usage_in_bytes"))) <= LIMIT_MIB * MIB
        finally:
            srv.stop()
        assert not group_alive(srv.proc.pid)
        assert oom_kills(cg) == 0, srv.output[-2000:]
    assert os.listdir(segdir) == []


def test_cgroup_room_is_read_from_the_processes_own_group(tmp_path):
    code = ("from sgserve.models import capacity as c; m = c.cgroup_memory(); print(m.limit, m.room); "
            "c.check_fits('/sgserve_1_1_m_1_aaaaaa', 1 << 20)\n"
            "try:\n c.check_fits('/sgserve_1_1_m_1_aaaaaa', m.room + (1 << 20))\n"
            "except c.SegmentWontFit as e: print(e.message)")
    with memory_cgroup(256 * MIB) as cg:
        script = f'echo $$ > {cg}/cgroup.procs && exec "$0" -c "$1"'
        r = subprocess.run(["sh", "-c", script, sys.executable, code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    first, message = r.stdout.split("\n", 1)
    limit, room = first.split()
    assert int(limit) == 256 * MIB and 0 < int(room) <= 256 * MIB
    assert "of shared memory (/dev/shm is RAM)" in message and "--segment-dir DIR" in message
    assert "limit 256.0 MiB" in message


def test_unlimited_cgroup_is_no_limit():
    found = capacity.memory_cgroup_dir()
    mem = capacity.cgroup_memory(found)
    # This test process runs without a memory limit of its own on the machines we test on.
    assert mem is None or mem.limit < capacity.UNLIMITED


@pytest.fixture
def tiny_dir(tmp_path) -> Iterator[str]:
    """A 1 MiB tmpfs: a segment dir without room for the demo model (24.5 MiB)."""
    path = str(tmp_path / "tiny")
    os.mkdir(path)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", path], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", path], check=True)


def test_segment_dir_without_room_fails_the_start_with_the_sizes(tiny_dir, cache_dir):
    env = dict(os.environ, SGSERVE_CACHE_DIR=cache_dir)
    r = subprocess.run([sys.executable, "-m", "sgserve.cli", "start", "--endpoint", f"tcp://127.0.0.1:{free_port()}",
                        "--segment-dir", tiny_dir], capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"in {tiny_dir}, which has 1.0 MiB free" in r.stderr and "choose another --segment-dir" in r.stderr
    assert os.listdir(tiny_dir) == []


def test_check_fits_names_the_sizes_for_a_file_segment(tmp_path):
    name = shared_segment.segment_name("1_1", "m", 1, str(tmp_path))
    capacity.check_fits(name, MIB)
    with pytest.raises(capacity.SegmentWontFit, match=r"needs 1048576\.0 MiB in .* MiB free") as err:
        capacity.check_fits(name, 2**40)
    assert err.value.code == 429  # RESOURCE_EXHAUSTED
