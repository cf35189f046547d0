"""Faults with real processes: killed workers, a killed server, bad model directories, too many cores."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import numpy as np
import psutil
import pytest

from sgserve.errors import ServeError
from tests.conftest import demo_inputs, group_alive, sgserve_segments, wait_until


def cli(*args: str, cache: str | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if cache:
        env["SGSERVE_CACHE_DIR"] = cache
    return subprocess.run([sys.executable, "-m", "sgserve.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_kill_9_worker_under_load(start_server):
    srv = start_server(["--workers", "2", "--cpus-per-worker", "1"])
    old_pids = srv.worker_pids()
    results: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def load(seed: int) -> None:
        with srv.client(timeout=20.0) as c:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    c.predict("demo", demo_inputs(64, seed * 100000 + i))
                    code = "200"
                except ServeError as exc:
                    code = str(exc.code)
                with lock:
                    results.append(code)

    threads = [threading.Thread(target=load, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    wait_until(lambda: len(results) >= 10, 60, "requests answered before the kill")
    os.kill(old_pids[0], signal.SIGKILL)
    at_kill = len(results)
    wait_until(lambda: len(results) >= at_kill + 20, 60, "requests answered after the kill")
    stop.set()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a client was left waiting"
    assert len(results) > 20
    # Every request got an answer; those held by the dead worker were retried on the other one.
    assert results.count("200") == len(results), {c: results.count(c) for c in set(results)}
    def worker_0_back() -> dict | None:
        with srv.client(5.0) as c:
            w = c.status()["workers"][0]
        return w if w["state"] == "READY" and w["pid"] not in old_pids else None

    w0 = wait_until(worker_0_back, 60, "worker 0 to come back", interval=0.5)
    assert w0["restarts"] >= 1 and w0["cores"] == [0]
    with srv.client() as c:
        seen = {c.predict_full("demo", demo_inputs(1, i)).worker for i in range(6)}
    assert seen == {0, 1}


def test_kill_9_server_leaves_nothing_the_next_start_cannot_clean(start_server, models_dir, tmp_path):
    hpt = os.path.join(models_dir, "hpt")
    a = start_server(["--model-base-path", hpt, "--workers", "2"])
    workers = a.worker_pids()
    mine = sgserve_segments()
    a_segs = {n for n in mine if n.startswith(f"sgserve_{a.proc.pid}_")}
    assert len(a_segs) == 1
    os.kill(a.proc.pid, signal.SIGKILL)  # the server only: its workers must follow it
    def live_workers() -> list[int]:
        return [p for p in workers if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]

    wait_until(lambda: not live_workers(), 15, f"workers {workers} to follow the killed server", interval=0.2)
    assert a_segs <= sgserve_segments()  # left behind by the killed server...
    b = start_server(["--model-base-path", hpt, "--workers", "1"])
    assert not (a_segs & sgserve_segments())  # ...and removed by the next start
    b_segs = {n for n in sgserve_segments() if n.startswith(f"sgserve_{b.proc.pid}_")}
    # A start that fails (corrupt model) still must not touch a live server's segment.
    bad = tmp_path / "bad" / "1"
    bad.mkdir(parents=True)
    (bad / "saved_model.pb").write_bytes(b"not a protobuf")
    r = cli("start", "--model-base-path", str(tmp_path / "bad"), "--endpoint", "tcp://127.0.0.1:1")
    assert r.returncode != 0
    assert b_segs <= sgserve_segments()
    with b.client() as c:
        np.testing.assert_allclose(c.predict("hpt", {"x": np.array([2.0, 4.0], np.float32)})["y"], [3.0, 4.0])


@pytest.mark.parametrize("setup,fragment", [
    ("missing", "does not exist"),
    ("empty", "no version directories"),
    ("garbage_pb", "corrupt SavedModel"),
    ("no_variables", "checkpoint"),
])
def test_bad_model_directory_at_start(tmp_path, models_dir, setup, fragment):
    base = tmp_path / "m"
    if setup == "empty":
        base.mkdir()
    elif setup == "garbage_pb":
        (base / "1").mkdir(parents=True)
        (base / "1" / "saved_model.pb").write_bytes(b"\x08\x01garbage")
    elif setup == "no_variables":
        import shutil

        shutil.copytree(os.path.join(models_dir, "tf2", "1"), base / "1")
        (base / "1" / "variables" / "variables.index").write_bytes(b"truncated")
    before = sgserve_segments()
    r = cli("start", "--model-base-path", str(base), "--endpoint", "tcp://127.0.0.1:1")
    assert r.returncode == 2, r.stderr
    assert fragment in r.stderr, r.stderr
    # Only this start's model ("m"): other servers may run on the machine meanwhile.
    assert not {n for n in sgserve_segments() - before if "_m_" in n}, "a failed start left a segment"


def test_more_cores_than_the_machine_is_refused():
    n = len(os.sched_getaffinity(0))
    r = cli("start", "--workers", str(n + 1), "--cpus-per-worker", "1", "--endpoint", "tcp://127.0.0.1:1", timeout=30)
    assert r.returncode == 2
    assert f"this machine has {n} available" in r.stderr and "--allow-oversubscribe" in r.stderr


def test_oversubscribe_when_allowed_and_sigterm_stops_cleanly(start_server, models_dir):
    n = len(os.sched_getaffinity(0))
    srv = start_server(["--model-base-path", os.path.join(models_dir, "hpt"), "--workers", str(n + 1),
                        "--allow-oversubscribe"])
    with srv.client() as c:
        st = c.status()
        assert len(st["workers"]) == n + 1
        assert st["workers"][n]["cores"] == [0]  # wrapped around
        assert c.predict("hpt", {"x": np.array([1.0], np.float32)})["y"].tolist() == [2.5]
    pids = srv.worker_pids()
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(30) == 0
    assert not group_alive(srv.proc.pid)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)
