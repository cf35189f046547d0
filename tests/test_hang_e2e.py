"""Hang detection end to end (`sgserve start`, demo model, 2 workers) under 6 CPU hogs on the
machine's cores: no healthy worker is killed under steady load, a SIGSTOPped worker that holds a
request is replaced in seconds, its requests answered by the other worker (none lost), and a pause
of the whole server (a frozen cgroup, a paused VM) kills no worker for the time nothing ran."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Iterator

from sgserve.errors import ServeError
from tests.conftest import demo_inputs, wait_until

HOGS = 6


@contextlib.contextmanager
def hogs(n: int) -> Iterator[None]:
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait(10)


class SteadyLoad:
    """Two closed-loop clients; every answer's code is kept."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.codes: list[int] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(2)]

    def _run(self, seed: int) -> None:
        inputs = demo_inputs(4, seed)
        with self.server.client(60.0) as client:
            while not self.stop.is_set():
                try:
                    client.predict("demo", inputs)
                    self.codes.append(200)
                except ServeError as exc:
                    self.codes.append(exc.code)

    def __enter__(self) -> "SteadyLoad":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


def test_stopped_worker_replaced_under_cpu_hogs_and_no_healthy_worker_killed(start_server) -> None:
    server = start_server(["--workers", "2", "--cpus-per-worker", "1"])
    with server.client(30.0) as admin, hogs(HOGS), SteadyLoad(server) as load:
        wait_until(lambda: len(load.codes) >= 300, 60, "300 answers under the hogs")
        workers = admin.status()["workers"]
        assert [w["restarts"] for w in workers] == [0, 0], "a healthy worker was killed under the hogs"
        held = wait_until(lambda: admin.status()["workers"][1]["inflight"] >= 1, 10, "worker 1 holding a request")
        old_pid = admin.status()["workers"][1]["pid"]
        os.kill(old_pid, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            wait_until(lambda: admin.status()["workers"][1]["pid"] != old_pid, 10, "the stopped worker killed")
            killed = time.monotonic() - stopped
            wait_until(lambda: (lambda w: w["pid"] != old_pid and w["state"] == "READY")(admin.status()["workers"][1]),
                       20, "the stopped worker replaced")
            replaced = time.monotonic() - stopped
        finally:
            with contextlib.suppress(OSError):
                os.kill(old_pid, signal.SIGCONT)
        answered = len(load.codes)
        wait_until(lambda: len(load.codes) >= answered + 100, 60, "100 more answers on the full pool")
        os.killpg(server.proc.pid, signal.SIGSTOP)  # broker, workers and loader: nothing of it runs
        try:
            time.sleep(4.0)  # the fault's length: longer than the silence limit and the hang timeout
        finally:
            os.killpg(server.proc.pid, signal.SIGCONT)
        answered = len(load.codes)
        wait_until(lambda: len(load.codes) >= answered + 100, 60, "100 answers after the pause")
        workers = admin.status()["workers"]
        watchdog = admin.status()["watchdog"]
    assert held
    assert killed <= 5.0, f"killed {killed:.1f} s after SIGSTOP"
    assert replaced <= 10.0, f"replaced {replaced:.1f} s after SIGSTOP"
    assert [w["restarts"] for w in workers] == [0, 1], workers
    assert watchdog["late_ticks"] >= 1 and watchdog["broker_absent_s"] >= 3.5, watchdog
    assert set(load.codes) == {200}, f"answers other than 200: {sorted(set(load.codes))}"
