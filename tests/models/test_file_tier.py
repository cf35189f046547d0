"""The file-backed segment tier (`--segment-dir`) end to end, through the real CLI: serve, update
incrementally, roll back, `kill -9` the whole server, restart, and nothing left behind.

Responses carry the version that computed them and its bias (= the version number), so each check
is on real values (tests/lifecycle_models.py).
"""
from __future__ import annotations

import json
import os
import signal

import numpy as np
import psutil

from tests import lifecycle_models as lm
from tests.conftest import group_alive, sgserve_segments, wait_until
from tests.models.test_lifecycle import FAST, IDS, model_status, states, versions
from tests.test_faults import cli
from tests.test_memory import segment_mapping


def files(d: str) -> set[str]:
    return {os.path.join(d, n) for n in os.listdir(d)}


def predict_version(srv, **kw) -> int:
    with srv.client(10.0) as c:
        r = c.predict_full("m", {"ids": IDS}, **kw)
    np.testing.assert_allclose(r.outputs["y"], lm.expected(IDS, r.version), rtol=1e-6)
    return r.version


def test_file_tier_serves_updates_rolls_back_and_cleans_up_after_kill_9(start_server, tmp_path):
    store, base, segdir = str(tmp_path / "store"), str(tmp_path / "m"), str(tmp_path / "segments")
    os.mkdir(segdir)
    for v in (1, 2):
        lm.build_version(store, v)
    lm.publish(store, base, 1)
    args = ["--model-base-path", base, "--segment-dir", segdir, "--split-min-rows", "0"] + FAST
    shm_before = sgserve_segments()
    srv = start_server(args)

    v1 = versions(srv)[1]
    assert v1["tier"] == segdir and v1["bytes"] == lm.EMB_BYTES + 64, v1  # table + the 1-float bias (aligned)
    assert files(segdir) == set(v1["segments"])
    assert not {n for n in sgserve_segments() if n.startswith(f"sgserve_{srv.proc.pid}_")}  # none in /dev/shm
    # Both workers read every row through their read-only shared mapping of the file: no private copy.
    all_ids = np.arange(lm.ROWS, dtype=np.int64)
    with srv.client(10.0) as c:
        for _ in range(4):
            np.testing.assert_allclose(c.predict("m", {"ids": all_ids})["y"], lm.expected(all_ids, 1), rtol=1e-6)
        pids = [w["pid"] for w in c.status()["workers"]]
    for pid in pids:
        m = segment_mapping(pid, v1["segments"][0])
        assert m["Rss"] * 1024 >= lm.EMB_BYTES * 0.95, m
        assert m.get("Private_Clean", 0) + m.get("Private_Dirty", 0) + m.get("Anonymous", 0) < 64, m

    # An incremental update: version 2 maps version 1's file for the unchanged table.
    lm.publish(store, base, 2)
    wait_until(lambda: states(srv) == {2: "AVAILABLE", 1: "END"}, 60, "version 2 AVAILABLE, version 1 END")
    v2 = versions(srv)[2]
    assert v2["shared_bytes"] == lm.EMB_BYTES and v2["tier"] == segdir, v2
    assert set(v2["segments"]) >= set(v1["segments"]) and files(segdir) == set(v2["segments"])
    assert predict_version(srv) == 2

    # Roll back to version 1 (loaded again, sharing version 2's table), then forward.
    r = cli("rollback", "m", "--to", "1", "--endpoint", srv.endpoint)
    assert r.returncode == 0 and json.loads(r.stdout)["serving_version"] == 1, r.stderr
    assert predict_version(srv) == 1
    assert cli("unpin", "m", "--endpoint", srv.endpoint).returncode == 0
    wait_until(lambda: model_status(srv)["serving_version"] == 2 and states(srv)[1] == "END", 60, "version 2 again")
    assert predict_version(srv) == 2
    assert files(segdir) == set(versions(srv)[2]["segments"])
    r = cli("status", "--endpoint", srv.endpoint)
    assert r.returncode == 0 and "AVAILABLE" in r.stdout and segdir in r.stdout, r.stdout

    # kill -9 the whole server: its files stay until the next start removes them.
    left = files(segdir)
    os.killpg(srv.proc.pid, signal.SIGKILL)
    assert not group_alive(srv.proc.pid)
    assert files(segdir) == left and left
    again = start_server(args)
    assert not files(segdir) & left, "a killed server's segment files survived the next start"
    assert {versions(again)[2]["tier"]} == {segdir} and predict_version(again) == 2
    assert again.stop() == 0
    assert files(segdir) == set()
    assert not {n for n in sgserve_segments() - shm_before
                if n.startswith((f"sgserve_{srv.proc.pid}_", f"sgserve_{again.proc.pid}_"))}
    assert not [p for p in psutil.process_iter(["cmdline"]) if again.endpoint in " ".join(p.info["cmdline"] or [])]
