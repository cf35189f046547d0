"""Fair admission and slow readers with a real server, real sockets and a slow model.

One worker running the "slow" model (tests/test_backpressure.py: about 37 us x n of one core) has a
capacity of a few dozen requests a second, so one DEALER flooding without waiting is far over it.
"""
from __future__ import annotations

import threading
import time
from typing import Iterator

import numpy as np
import psutil
import pytest
import zmq

from sgserve import protocol
from tests.conftest import wait_until
from tests.test_backpressure import Flood, build_slow, feed
from tests.worker.test_batching_e2e import serving

WORK_N = 500  # about 20 ms of one core per request
HWM = 8  # --client-hwm of the slow-reader server
REPLY_FLOATS = 256 * 1024  # 1 MiB replies


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory) -> str:
    base = str(tmp_path_factory.mktemp("fairness") / "slow")
    build_slow(base)
    return base


@pytest.fixture
def server(slow_model, cache_dir) -> Iterator:
    with serving(["--model-base-path", slow_model, "--workers", "1", "--max-enqueued", "32"], cache_dir) as s:
        yield s


@pytest.fixture
def small_hwm_server(slow_model, cache_dir) -> Iterator:
    """A tiny --client-hwm, so that a client that does not read hits it soon (and a flooder that
    reads a little late would lose replies: the flood test runs with the default)."""
    # --max-enqueued 32: the queue counts requests, not bytes; here it must not hold the 1 MiB requests.
    with serving(["--model-base-path", slow_model, "--workers", "1", "--max-enqueued", "32", "--client-hwm",
                  str(HWM)], cache_dir) as s:
        yield s


def test_a_flooder_gets_429s_while_a_polite_client_is_always_served(server):
    flood = Flood(server.endpoint, 1)  # one identity, far over capacity
    polite: list[tuple[float, str]] = []
    errors: list[BaseException] = []
    flooding = threading.Event()

    def polite_client() -> None:
        try:
            with server.client(30.0) as c:
                for i in range(10):
                    started = time.monotonic()
                    y = c.predict("slow", {"x": np.array([i], np.float32), "n": np.array([WORK_N], np.int32)})["y"]
                    polite.append((time.monotonic() - started, float(y[0])))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
        finally:
            flooding.set()

    for i in range(64):  # the queue is full of the flooder's requests before the polite client starts
        flood.send(0, feed(WORK_N))
    flood.collect(50)
    other = threading.Thread(target=polite_client)
    other.start()
    try:
        while not flooding.is_set():  # keep flooding until the polite client is done
            flood.send(0, feed(WORK_N))
            flood.collect(5)
        other.join(60)
        flood.wait_all(60)
    finally:
        flooding.set()
        flood.close()
    assert not errors, errors
    assert [y for _, y in polite] == [2.0 * i for i in range(10)], "every polite request answered, correctly"
    # Round robin: each waits for about one running and one pipelined flood request, not a 32-deep queue.
    assert max(s for s, _ in polite) < 2.0, polite
    codes = [h["code"] for _, h in flood.replies.values()]
    assert len(codes) == len(flood.sent) and set(codes) <= {200, 429}
    assert codes.count(429) > 0 and codes.count(200) > 0
    assert any("held the most" in h["message"] for _, h in flood.replies.values() if h["code"] == 429)


def test_a_client_that_never_reads_does_not_grow_broker_memory_and_others_are_served(small_hwm_server):
    server = small_hwm_server
    broker = psutil.Process(server.proc.pid)
    with server.client(30.0) as c:
        c.predict("slow", {"x": np.zeros(REPLY_FLOATS, np.float32), "n": np.array([1], np.int32)})
        before = c.status()["dropped_replies"]["unread"]
    base = broker.memory_info().rss
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 1)  # a reader that is stuck: backpressure reaches the broker at once
    sock.setsockopt(zmq.RCVBUF, 64 * 1024)
    sock.connect(server.endpoint)
    big = {"x": np.ones(REPLY_FLOATS, np.float32), "n": np.array([1], np.int32)}
    total = 200  # 200 MiB of replies, over 20x what --client-hwm 8 may hold
    peak = base
    try:
        for i in range(total):
            sock.send_multipart(protocol.pack({"type": "predict", "model": "slow", "id": i}, big), copy=False)
            if i % 10 == 0:
                peak = max(peak, broker.memory_info().rss)
        with server.client(30.0) as c:
            def dropped() -> int:
                nonlocal peak
                peak = max(peak, broker.memory_info().rss)
                st = c.status()
                return st["queued"] == 0 and st["workers"][0]["inflight"] == 0 and \
                    st["dropped_replies"]["unread"] - before
            dropped_n = wait_until(dropped, 60, "the slow reader's requests to be answered (and dropped)")
            # Another client is served meanwhile, at once.
            started = time.monotonic()
            assert c.predict("slow", {"x": np.array([3.0], np.float32), "n": np.array([1], np.int32)})["y"][0] == 6.0
            assert time.monotonic() - started < 2.0
    finally:
        sock.close(0)
    grew = (peak - base) / 2**20
    # What the broker may hold: HWM replies in the pipe, a few in flight; not the 200 MiB.
    assert grew < 64, f"broker RSS grew {grew:.0f} MiB for a client that never reads"
    # Each request was answered (200, or 429 when the queue of 32 was full); all but what the pipe, the
    # kernel's buffers and the client held were dropped.
    assert dropped_n >= total - 64, dropped_n
