"""Hang detection (sgserve/broker/watchdog.py): a stopped or stuck worker holding a request is replaced
in seconds and its request retried; a starved or busy one, or time the broker itself did not run,
never kills a worker.

The first tests feed the watchdog times, over real processes in real states (SIGSTOPped, asleep,
spinning); the rest run a real Broker over real worker processes (hang_worker.py: the echo worker
plus a CPU-burning input).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from broker_helpers import RunningBroker, descendants, fixed_manager, predict_header, recv, send, test_config
from sgserve.broker.broker import Broker
from sgserve.broker.policies import DispatchRequest
from sgserve.broker.watchdog import LATE_SLACK, Watchdog
from sgserve.broker.worker_table import WorkerTable
from sgserve.protocol import Envelope
from tests.conftest import wait_until

HANG_WORKER = str(Path(__file__).with_name("hang_worker.py"))
TICK = 0.05
SPIN = {"name": "spin_s", "dtype": "float32", "shape": []}
SLEEP = {"name": "sleep_s", "dtype": "float32", "shape": []}


# -- the watchdog, fed times, over real processes ------------------------------------------------
@pytest.fixture
def child() -> Iterator[Any]:
    """child(code) -> a Python process running ``code``; killed (and continued) at teardown."""
    procs: list[subprocess.Popen] = []

    def start(code: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", code])
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(10)


def table_with(proc: subprocess.Popen, now: float, busy: bool) -> WorkerTable:
    table = WorkerTable(1, pipeline=2)
    slot = table.add(0, [0])
    table.spawned(slot, proc, now=now)
    table.mark_ready(slot, b"w0", proc.pid, now=now)
    if busy:
        table.mark_busy(slot, DispatchRequest(rid=1, envelope=Envelope([b"c"], False), header={"id": 1}, payload=[],
                                              model="m", version=1, signature="serving_default",
                                              routing_key=None, client_id=b"c", deadline=None, received_at=now,
                                              sent_at=now))
    return table


def run_ticks(dog: Watchdog, start: float, seconds: float) -> list[tuple[float, str]]:
    """Calls check() every TICK s of fed time from ``start``; (time, why) of each hang reported."""
    hung = []
    for i in range(1, round(seconds / TICK) + 1):
        now = start + i * TICK
        hung.extend((now, why) for _slot, why in dog.check(now))
    return hung


def wait_state(pid: int, states: str) -> None:
    def state() -> str:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    wait_until(lambda: state() in states, 5.0, f"process {pid} in state {states}")


def test_stopped_worker_holding_a_request_is_hung_after_the_timeout(child) -> None:
    proc = child("import time; time.sleep(60)")
    os.kill(proc.pid, signal.SIGSTOP)
    wait_state(proc.pid, "T")
    t0 = time.monotonic()
    dog = Watchdog(table_with(proc, t0, busy=True), hang_timeout=1.0, heartbeat_interval=0.4, tick=TICK)
    hung = run_ticks(dog, t0, 3.0)
    assert len(hung) >= 1
    when, why = hung[0]
    # suspected 0.2 s after it was last heard, first probed then, hung 1 s of no sign of life later
    assert 1.2 <= when - t0 <= 1.2 + dog.probe_interval + TICK, when - t0
    assert why.startswith("is stopped (SIGSTOP or a debugger) for 1.")
    assert "holding 1 request(s)" in why and "--hang-timeout 1 s" in why


def test_sleeping_worker_holding_a_request_is_hung(child) -> None:
    proc = child("import time; time.sleep(60)")
    wait_state(proc.pid, "S")
    t0 = time.monotonic()
    dog = Watchdog(table_with(proc, t0, busy=True), hang_timeout=1.0, heartbeat_interval=0.4, tick=TICK)
    hung = run_ticks(dog, t0, 2.0)
    assert hung and hung[0][1].startswith("used no CPU for 1."), hung


def test_idle_stopped_worker_is_left_to_the_silence_rule(child) -> None:
    proc = child("import time; time.sleep(60)")
    os.kill(proc.pid, signal.SIGSTOP)
    wait_state(proc.pid, "T")
    t0 = time.monotonic()
    table = table_with(proc, t0, busy=False)
    dog = Watchdog(table, hang_timeout=1.0, heartbeat_interval=0.4, tick=TICK)
    assert run_ticks(dog, t0, 2.0) == []  # holds nothing: not "hung"
    assert [s.index for s in table.expired(t0 + 2.0, silence=0.6)] == [0], "not vouched for: it expires"


def test_runnable_worker_holding_a_request_is_starved_not_hung(child) -> None:
    proc = child("while True: pass")
    wait_state(proc.pid, "R")
    t0 = time.monotonic()
    dog = Watchdog(table_with(proc, t0, busy=True), hang_timeout=0.5, heartbeat_interval=0.4, tick=TICK)
    assert run_ticks(dog, t0, 2.0) == []
    assert dog.probes >= 5


def checked_until(dog: Watchdog, predicate: Any, timeout: float, what: str) -> None:
    """Runs the watchdog on real time until ``predicate()`` holds."""
    def tick() -> Any:
        dog.check(time.monotonic())
        return predicate()
    wait_until(tick, timeout, what, interval=TICK)


def test_idle_worker_is_vouched_for_only_when_starved(child) -> None:
    core = min(os.sched_getaffinity(0))
    starved = child("while True: pass")
    hogs = [child("while True: pass") for _ in range(3)]
    for proc in (starved, *hogs):  # four busy loops on one core: each waits for it 3/4 of the time
        os.sched_setaffinity(proc.pid, {core})
    t0 = time.monotonic()
    table = table_with(starved, t0, busy=False)
    dog = Watchdog(table, hang_timeout=0.5, heartbeat_interval=0.2, tick=TICK)
    checked_until(dog, lambda: table.get(0).vouched_at > 0, 5.0, "the starved idle worker vouched for")
    assert table.expired(table.get(0).vouched_at + 0.1, silence=0.6) == [], "a starved idle worker is not expired"
    # a worker that runs (it wakes 100 times a second) but never heartbeats is not starved: it expires
    lively = child("import time\nwhile True: time.sleep(0.01)")
    t1 = time.monotonic()
    table = table_with(lively, t1, busy=False)
    dog = Watchdog(table, hang_timeout=0.5, heartbeat_interval=0.2, tick=TICK)
    checked_until(dog, lambda: dog.probes >= 4, 5.0, "four probes of the lively idle worker")
    assert table.get(0).vouched_at == 0.0
    assert [s.index for s in table.expired(time.monotonic() + 0.6, silence=0.6)] == [0]


def test_time_the_broker_did_not_run_counts_against_no_worker(child) -> None:
    proc = child("import time; time.sleep(60)")
    os.kill(proc.pid, signal.SIGSTOP)
    wait_state(proc.pid, "T")
    t0 = time.monotonic()
    table = table_with(proc, t0, busy=True)
    slot = table.get(0)
    dog = Watchdog(table, hang_timeout=1.0, heartbeat_interval=0.4, tick=TICK)
    assert run_ticks(dog, t0, 0.6) == []  # suspected, 0.4 s without a sign of life
    late = 10.0
    assert dog.check(t0 + 0.6 + TICK + late) == [], "the broker's own 10 s gap is nobody's fault"
    assert dog.absent == pytest.approx(late, abs=1e-6) and dog.late_ticks == 1
    assert slot.last_seen == pytest.approx(t0 + late) and slot.last_progress == pytest.approx(t0 + late)
    assert table.expired(t0 + 0.6 + late, silence=0.6) == [] and table.hung(t0 + 0.6 + late, 5.0) == []
    # after the gap, the stopped worker is still caught on the broker's own clock
    hung = run_ticks(dog, t0 + 0.6 + TICK + late, 1.5)
    assert hung and 0.5 <= hung[0][0] - (t0 + 0.6 + late) <= 0.5 + dog.probe_interval + 2 * TICK
    # a gap within the slack is not the broker's absence
    dog2 = Watchdog(table_with(proc, t0, busy=True), hang_timeout=1.0, heartbeat_interval=0.4, tick=TICK)
    dog2.check(t0)
    dog2.check(t0 + TICK + LATE_SLACK * 0.9)
    assert dog2.absent == 0.0 and dog2.late_ticks == 0


# -- a real broker over real worker processes ----------------------------------------------------
@pytest.fixture
def hang_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """hang_broker(**config) -> a RunningBroker whose workers are hang_worker.py processes."""
    started: list[RunningBroker] = []

    def start(**overrides: Any) -> RunningBroker:
        config = test_config(**{"hang_timeout": 1.0, "worker_timeout": 30.0, **overrides})
        ready = threading.Event()
        sid = f"test-{uuid.uuid4().hex[:6]}"
        broker = Broker(config, fixed_manager(config, str(tmp_path_factory.mktemp("models")), server_id=sid),
                        server_id=sid, backend_endpoint=f"ipc://{tempfile.gettempdir()}/sgs-test-{sid}.sock",
                        worker_command=[sys.executable, HANG_WORKER], on_ready=ready.set)
        thread = threading.Thread(target=broker.run, name="broker", daemon=True)
        running = RunningBroker(broker, thread, ready)
        started.append(running)
        thread.start()
        assert ready.wait(15), f"workers not READY: {broker.fatal_error or broker.status()['workers']}"
        return running

    yield start
    for running in started:
        for slot in running.broker.table:  # a stopped worker cannot hear W_STOP
            if slot.pid:
                try:
                    os.kill(slot.pid, signal.SIGCONT)
                except OSError:
                    pass
        running.stop()
        running.close()
        assert not running.thread.is_alive(), "Broker.run() did not return"
    leftovers = descendants()
    for p in leftovers:
        p.kill()
    assert not leftovers, f"worker processes survived the broker: {leftovers}"


def spinner(rid: int, seconds: float, **extra: Any) -> tuple[dict[str, Any], list[bytes]]:
    x = np.arange(3, dtype=np.float32) + rid
    header, _ = predict_header(rid, inputs=[SPIN, {"name": "x", "dtype": "float32", "shape": [3]}], **extra)
    return header, [np.float32(seconds).tobytes(), x.tobytes()]


def test_stopped_worker_holding_a_request_is_replaced_and_the_request_retried(hang_broker) -> None:
    server = hang_broker(workers=2, policy="mod", worker_pipeline=1)
    slot0 = server.broker.table.get(0)
    old_pid = slot0.pid
    sock = server.socket()
    header, frames = spinner(1, 0.3, routing_key=0)
    send(sock, header, frames)
    server.wait_for(lambda: slot0.load == 1, what="worker 0 holding the request")
    os.kill(old_pid, signal.SIGSTOP)
    stopped = time.monotonic()
    server.wait_for(lambda: slot0.state.value != "READY", what="worker 0 taken out of service")
    # 1 s stopped (--hang-timeout) from the first probe that saw its CPU time still, within a few
    # probes and ticks
    assert time.monotonic() - stopped < 2.0, time.monotonic() - stopped
    reply, payload = recv(sock, timeout=10)  # retried on worker 1 (where it spins 0.3 s again)
    assert reply["code"] == 200 and reply["worker"] == 1 and reply["broker"]["attempt"] == 1, reply
    assert np.array_equal(np.frombuffer(payload[1], np.float32), np.arange(3, dtype=np.float32) + 1)
    server.wait_for(lambda: slot0.state.value == "READY" and slot0.pid != old_pid, what="worker 0 replaced")
    assert slot0.restarts == 1 and server.broker.table.get(1).restarts == 0
    assert server.broker.status()["watchdog"]["hangs"] == 1


def test_stopped_idle_worker_is_replaced_before_the_worker_timeout(hang_broker) -> None:
    server = hang_broker(workers=2, worker_pipeline=1)
    slot1 = server.broker.table.get(1)
    old_pid = slot1.pid
    os.kill(old_pid, signal.SIGSTOP)
    stopped = time.monotonic()
    sock = server.socket()
    for rid in range(6):  # round robin: some go to the stopped worker and are held there
        header, frames = predict_header(rid)
        send(sock, header, frames)
    server.wait_for(lambda: slot1.state.value != "READY", what="worker 1 taken out of service")
    assert time.monotonic() - stopped < 2.5, time.monotonic() - stopped  # 0.1 s + 1 s, probes and ticks
    replies = [recv(sock, timeout=10)[0] for _ in range(6)]
    assert sorted(r["id"] for r in replies) == list(range(6))
    assert all(r["code"] == 200 for r in replies), replies
    server.wait_for(lambda: slot1.state.value == "READY" and slot1.pid != old_pid, what="worker 1 replaced")
    assert server.broker.table.get(0).restarts == 0


def test_busy_worker_whose_cpu_time_advances_is_never_killed(hang_broker) -> None:
    server = hang_broker(workers=2, policy="mod", hang_timeout=0.5)
    sock = server.socket()
    header, frames = spinner(3, 2.0, routing_key=0)  # silent 2 s of CPU: four hang timeouts
    send(sock, header, frames)
    reply = recv(sock, timeout=20)[0]
    assert reply["code"] == 200 and reply["worker"] == 0 and reply["broker"]["attempt"] == 0, reply
    status = server.broker.status()["watchdog"]
    assert status["probes"] >= 4 and status["hangs"] == 0
    assert [s.restarts for s in server.broker.table] == [0, 0]


def test_worker_that_sleeps_holding_a_request_counts_as_hung(hang_broker) -> None:
    server = hang_broker(workers=2, worker_pipeline=1, hang_timeout=0.5)
    sock = server.socket()
    x = np.arange(3, dtype=np.float32)
    header, _ = predict_header(4, inputs=[SLEEP, {"name": "x", "dtype": "float32", "shape": [3]}])
    send(sock, header, [np.float32(30.0).tobytes(), x.tobytes()])
    started = time.monotonic()
    reply = recv(sock, timeout=10)[0]  # it sleeps on the retry too: 503, from the watchdog, not after 30 s
    assert reply["code"] == 503 and "already a retry" in reply["message"], reply
    assert time.monotonic() - started < 4.0
    server.wait_for(lambda: server.broker.table.all_ready(), what="both workers replaced")
    assert sorted(s.restarts for s in server.broker.table) == [1, 1]


def test_hang_timeout_zero_leaves_it_to_the_worker_timeout(hang_broker) -> None:
    server = hang_broker(workers=1, hang_timeout=0.0, worker_timeout=1.5)
    sock = server.socket()
    x = np.arange(3, dtype=np.float32)
    header, _ = predict_header(5, inputs=[SLEEP, {"name": "x", "dtype": "float32", "shape": [3]}])
    send(sock, header, [np.float32(0.9).tobytes(), x.tobytes()])
    reply = recv(sock, timeout=10)[0]
    assert reply["code"] == 200 and reply["broker"]["attempt"] == 0, reply
    assert server.broker.status()["watchdog"]["hangs"] == 0
