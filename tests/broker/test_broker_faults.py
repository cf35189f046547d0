"""Worker deaths, hangs, boot failures and stopping: no client is left without an answer, and no
worker process outlives the broker."""
from __future__ import annotations

import os
import signal
import socket
import sys
import time
import uuid

import numpy as np
import pytest

import sgserve.broker.supervisor as supervisor_module
from broker_helpers import ECHO_WORKER, descendants, fixed_manager, predict_header, recv, send, test_config
from sgserve.broker.broker import BindError, Broker
from sgserve.process import EXIT_BOOT_ERROR, EXIT_MODEL_ERROR

SLEEP = {"name": "sleep_s", "dtype": "float32", "shape": []}


def sleeper(rid, seconds: float, **extra):
    x = np.arange(3, dtype=np.float32) + rid
    header, _ = predict_header(rid, inputs=[SLEEP, {"name": "x", "dtype": "float32", "shape": [3]}], **extra)
    return header, [np.float32(seconds).tobytes(), x.tobytes()]


def test_sigkill_with_requests_in_flight_retries_elsewhere_and_restarts(start_broker) -> None:
    server = start_broker(workers=2, policy="mod", worker_pipeline=2)
    socks = [server.socket() for _ in range(2)]
    for rid, sock in enumerate(socks):
        header, frames = sleeper(rid, 0.6, routing_key=0)  # both to worker 0
        send(sock, header, frames)
    slot0 = server.broker.table.get(0)
    server.wait_for(lambda: slot0.load == 2, what="worker 0 holding two requests")
    old_pid = slot0.pid
    os.kill(old_pid, signal.SIGKILL)
    for rid, sock in enumerate(socks):
        reply, payload = recv(sock)
        assert reply["code"] == 200, reply
        assert reply["worker"] == 1, "retried on the other worker"
        assert reply["broker"]["attempt"] == 1
        assert np.array_equal(np.frombuffer(payload[1], np.float32), np.arange(3, dtype=np.float32) + rid)
    server.wait_for(lambda: slot0.state.value == "READY" and slot0.pid != old_pid, what="worker 0 restarted")
    assert slot0.restarts == 1 and slot0.cores == [0] and slot0.index == 0
    # the restarted worker serves again at its index
    header, frames = predict_header(9, routing_key=0)
    send(socks[0], header, frames)
    assert recv(socks[0])[0]["worker"] == 0


def test_request_that_kills_every_worker_gets_503(start_broker) -> None:
    server = start_broker(workers=2)
    sock = server.socket()
    header, _ = predict_header(5, inputs=[{"name": "crash", "dtype": "uint8", "shape": [1]}])
    send(sock, header, [b"\x01"])
    reply = recv(sock)[0]
    assert reply["code"] == 503 and reply["id"] == 5
    assert "died while serving the request" in reply["message"] and "already a retry" in reply["message"]
    server.wait_for(lambda: server.broker.table.all_ready(), what="both workers restarted")
    assert sorted(s.restarts for s in server.broker.table) == [1, 1]


def test_hung_worker_is_killed_and_replaced(start_broker) -> None:
    server = start_broker(workers=2, worker_timeout=0.4, worker_pipeline=1)
    sock = server.socket()
    header, frames = sleeper(1, 30.0)
    started = time.monotonic()
    send(sock, header, frames)
    reply = recv(sock)[0]
    assert reply["code"] == 503 and "died while serving the request" in reply["message"]
    assert time.monotonic() - started < 3.0
    server.wait_for(lambda: server.broker.table.all_ready() and all(s.restarts == 1 for s in server.broker.table),
                    what="hung workers replaced")


def test_silent_worker_expires_and_is_replaced(start_broker) -> None:
    server = start_broker(workers=2, worker_args=["--silent", "--only-index", "1"])
    slot1 = server.broker.table.get(1)
    first = slot1.pid
    server.wait_for(lambda: slot1.restarts >= 1, timeout=5, what="silent worker replaced")
    assert slot1.pid != first
    assert server.broker.table.get(0).restarts == 0, "a worker that heartbeats is left alone"


def test_boot_error_exit_code_is_fatal_without_restarts(start_broker) -> None:
    started = time.monotonic()
    server = start_broker(workers=2, worker_args=["--boot-exit", str(EXIT_BOOT_ERROR), "--only-index", "1"],
                          wait_ready=False)
    server.thread.join(15)
    assert not server.thread.is_alive()
    assert server.rc == EXIT_BOOT_ERROR
    assert "worker 1" in server.broker.fatal_error and "exited with code 3" in server.broker.fatal_error
    assert "cannot boot" in server.broker.fatal_error
    assert server.broker.table.get(1).spawned == 1, "no restart loop"
    assert not server.ready.is_set()
    assert time.monotonic() - started < 5
    assert descendants() == []


def test_model_error_exit_code_is_fatal(start_broker) -> None:
    server = start_broker(workers=1, worker_args=["--boot-exit", str(EXIT_MODEL_ERROR)], wait_ready=False)
    server.thread.join(15)
    assert server.rc == EXIT_MODEL_ERROR
    assert "cannot load the model" in server.broker.fatal_error


def test_boot_timeout_is_fatal(start_broker) -> None:
    server = start_broker(workers=2, boot_timeout=0.5, worker_args=["--boot-delay", "20", "--only-index", "0"],
                          wait_ready=False)
    server.thread.join(15)
    assert not server.thread.is_alive()
    assert server.rc == EXIT_BOOT_ERROR
    assert "was not READY within 0.5 s (--boot-timeout)" in server.broker.fatal_error
    assert descendants() == []


def test_crash_loop_gives_up(start_broker, monkeypatch) -> None:
    monkeypatch.setattr(supervisor_module, "MAX_DEATHS", 2)
    server = start_broker(workers=1, worker_args=["--boot-exit", "1"], wait_ready=False)
    server.thread.join(15)
    assert not server.thread.is_alive()
    assert server.rc == 1
    assert "died 3 times in 60 s" in server.broker.fatal_error
    assert server.broker.table.get(0).spawned == 3


def test_graceful_stop_drains_then_leaves_no_process(start_broker) -> None:
    server = start_broker(workers=2)
    pids = [s.pid for s in server.broker.table]
    busy, late = server.socket(), server.socket()
    header, frames = sleeper(1, 0.4)
    send(busy, header, frames)
    server.wait_for(lambda: server.broker.table.inflight_count() == 1, what="request in flight")
    server.broker.request_stop()
    server.wait_for(lambda: server.broker.core.stopping, what="the broker draining")
    header, frames = predict_header(2)
    send(late, header, frames)
    assert recv(late)[0] == {"id": 2, "code": 503, "message": "server is shutting down"}
    assert recv(busy)[0]["code"] == 200, "in-flight request finished during the drain"
    started = time.monotonic()
    server.thread.join(10)
    assert not server.thread.is_alive() and server.rc == 0
    assert time.monotonic() - started < 2, "workers exited on W_STOP, not after SIGTERM/SIGKILL grace"
    assert server.broker.fatal_error is None
    assert descendants() == []
    for pid in pids:
        assert not _alive(pid)


def test_drain_timeout_answers_503(start_broker) -> None:
    server = start_broker(workers=1, drain_timeout=0.2)
    sock = server.socket()
    header, frames = sleeper(1, 1.0)
    send(sock, header, frames)
    server.wait_for(lambda: server.broker.table.inflight_count() == 1, what="request in flight")
    server.broker.request_stop()
    reply = recv(sock, timeout=3)[0]
    assert reply["code"] == 503 and reply["message"] == "server is shutting down"
    server.thread.join(10)
    assert server.rc == 0 and descendants() == []


def test_shutdown_request(start_broker) -> None:
    server = start_broker(workers=1)
    sock = server.socket()
    send(sock, {"type": "shutdown", "id": "bye"})
    assert recv(sock)[0] == {"id": "bye", "code": 200, "message": "shutting down"}
    server.thread.join(10)
    assert server.rc == 0 and descendants() == []


def test_stop_before_workers_are_ready(start_broker) -> None:
    server = start_broker(workers=2, worker_args=["--boot-delay", "20"], wait_ready=False)
    server.wait_for(lambda: all(s.pid for s in server.broker.table), what="both workers started")
    started = time.monotonic()
    server.broker.request_stop()
    server.thread.join(10)
    assert server.rc == 0
    assert time.monotonic() - started < 3, "booting workers get SIGTERM at once"
    assert descendants() == []


def test_port_in_use_raises_before_spawning(tmp_path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        endpoint = f"tcp://127.0.0.1:{s.getsockname()[1]}"
        with pytest.raises(BindError, match=f"cannot bind the frontend .* to {endpoint}"):
            Broker(test_config(endpoint=endpoint), fixed_manager(test_config(endpoint=endpoint), str(tmp_path)),
                   server_id="t",
                   backend_endpoint=f"ipc:///tmp/sgs-test-{uuid.uuid4().hex[:8]}.sock",
                   worker_command=[sys.executable, ECHO_WORKER])
    assert descendants() == []


def test_unknown_policy_fails_at_construction(tmp_path) -> None:
    with pytest.raises(ValueError, match="cannot load dispatch policy 'nowhere.mod:fn'"):
        Broker(test_config(policy="nowhere.mod:fn"), fixed_manager(test_config(), str(tmp_path)), server_id="t",
               backend_endpoint="tcp://127.0.0.1:*")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_retry_waits_for_the_restarted_worker_within_its_deadline(start_broker, tmp_path) -> None:
    server = start_broker(workers=1, worker_pipeline=2,
                          worker_args=["--state-dir", str(tmp_path), "--restart-delay", "0.8"])
    short, patient = server.socket(), server.socket()
    header, frames = sleeper(1, 5.0, timeout_ms=300)
    send(short, header, frames)
    slot = server.broker.table.get(0)
    # The two requests come on two connections: without this wait the quick one could arrive
    # first, be answered at once, and the worker would never hold both.
    server.wait_for(lambda: slot.load == 1, what="worker 0 holding the sleeper")
    header, frames = predict_header(2)
    send(patient, header, frames)
    server.wait_for(lambda: slot.load == 2, what="worker 0 holding both")
    os.kill(slot.pid, signal.SIGKILL)
    reply = recv(short)[0]
    assert reply["code"] == 503
    assert reply["message"] == ("worker 0 died while serving the request, and no other worker could take it "
                                "in time")
    reply = recv(patient)[0]
    assert reply["code"] == 200 and reply["worker"] == 0 and reply["broker"]["attempt"] == 1
    assert slot.restarts == 1


def test_broker_bug_stops_cleanly(start_broker, monkeypatch) -> None:
    server = start_broker(workers=2)
    sock = server.socket()

    def boom(now: float) -> None:
        raise RuntimeError("bug in purge")

    monkeypatch.setattr(server.broker, "_purge", boom)
    server.thread.join(10)
    assert not server.thread.is_alive()
    assert server.rc == 1
    assert server.broker.fatal_error == "internal error in the broker: RuntimeError: bug in purge"
    assert descendants() == []
    sock.close()
