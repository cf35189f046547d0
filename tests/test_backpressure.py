"""Overload and deadlines with real servers: a flood gets fast 429s (not timeouts) with bounded memory,
the server recovers, the batching queue has its own bound, and expired requests get 504 without
running.

The "slow" model costs about 37 us x max(n) on one core (a chain of matmuls over max(n) rows), so a
request's n says how long it keeps its worker busy, and whether an expired request ran shows in time.
"""
from __future__ import annotations

import itertools
import os
import threading
import time
from typing import Any, Iterator

import numpy as np
import psutil
import pytest
import zmq

from sgserve import protocol
from sgserve.errors import InvalidArgument, ResourceExhausted, ServeError, error_from_code
from tests.conftest import wait_until
from tests.worker.test_batching_e2e import serving, write

SLOW_N = 40_000  # about 1.5 s of one core


def build_slow(base: str) -> None:
    import tensorflow as tf

    class Slow(tf.Module):
        def __init__(self) -> None:
            self.w = tf.Variable(np.random.default_rng(5).normal(0, 0.05, (256, 256)).astype("float32"))

        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x"),
                                      tf.TensorSpec([None], tf.int32, name="n")])
        def serve(self, x, n):
            rows = tf.reduce_max(tf.concat([n, [0]], 0))
            m = tf.ones(tf.stack([rows, 256]))
            for _ in range(16):
                m = tf.tanh(tf.matmul(m, self.w))
            return {"y": x * 2.0 + 0.0 * tf.reduce_sum(m)}

    m = Slow()
    tf.saved_model.save(m, os.path.join(base, "1"), signatures={"serving_default": m.serve})


def feed(n: int, rows: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.arange(rows, dtype=np.float32), "n": np.full(rows, n, np.int32)}


class Flood:
    """Requests on many DEALER sockets from one thread, without waiting for replies; records when
    each was sent and answered."""

    _ids = itertools.count(1)

    def __init__(self, endpoint: str, sockets: int) -> None:
        ctx = zmq.Context.instance()
        self.socks = []
        for _ in range(sockets):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(endpoint)
            self.socks.append(s)
        self.sent: dict[int, float] = {}
        self.replies: dict[int, tuple[float, dict[str, Any]]] = {}

    def send(self, i: int, inputs: dict[str, np.ndarray], timeout_ms: float | None = 30000.0) -> int:
        rid = next(self._ids)
        header: dict[str, Any] = {"type": protocol.PREDICT, "model": "slow", "id": rid}
        if timeout_ms is not None:
            header["timeout_ms"] = timeout_ms
        frames = protocol.pack(header, inputs)
        self.sent[rid] = time.monotonic()
        self.socks[i % len(self.socks)].send_multipart(frames, copy=False)
        return rid

    def collect(self, wait_ms: float = 0) -> int:
        """Reads every reply that is there (waiting up to wait_ms for the first); returns how many."""
        got = 0
        poller = zmq.Poller()
        for s in self.socks:
            poller.register(s, zmq.POLLIN)
        for sock, _ in poller.poll(wait_ms):
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                header, _ = protocol.unpack_header(frames)
                self.replies[header["id"]] = (time.monotonic(), header)
                got += 1
        return got

    def wait_all(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while len(self.replies) < len(self.sent) and time.monotonic() < end:
            self.collect(100)

    def reply(self, rid: int, timeout: float = 30.0) -> tuple[float, dict[str, Any]]:
        """(seconds from send to reply, header) of one request, waiting for it."""
        end = time.monotonic() + timeout
        while rid not in self.replies:
            assert time.monotonic() < end, f"no reply to request {rid} within {timeout} s"
            self.collect(50)
        at, header = self.replies[rid]
        return at - self.sent[rid], header

    def close(self) -> None:
        for s in self.socks:
            s.close(0)


def tree_rss(pid: int) -> int:
    """Resident bytes of the server and all its descendants (broker + workers)."""
    total = 0
    root = psutil.Process(pid)
    for p in [root] + root.children(recursive=True):
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def served(server) -> list[int]:
    with server.client(5.0) as c:
        return [w["served"] for w in c.status()["workers"]]


def worker_status(server) -> dict[str, Any]:
    with server.client(5.0) as c:
        (worker,) = c.status()["workers"]
    return worker


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


class ModelRunning:
    """Waits until the only worker has spent ``cpu_s`` seconds of CPU since it was made: the slow
    model is running. Only running a model costs a worker that much; taking a request, batching it
    and heartbeating cost microseconds. On a busy machine a fixed sleep does not say that the
    worker (or its batch thread) has even started, and then a request sent next could join the
    slow one's batch and run."""

    def __init__(self, server, cpu_s: float = 0.2) -> None:
        self.pid = worker_status(server)["pid"]
        self.until = cpu_seconds(self.pid) + cpu_s

    def wait(self, timeout: float = 30.0) -> None:
        wait_until(lambda: cpu_seconds(self.pid) >= self.until, timeout, "the slow model to start running")


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory) -> str:
    base = str(tmp_path_factory.mktemp("backpressure") / "slow")
    build_slow(base)
    return base


@pytest.fixture(scope="module")
def unbatched(slow_model, cache_dir) -> Iterator[Any]:
    """One worker without batching (it holds 2 requests), and at most 8 waiting in the broker."""
    with serving(["--model-base-path", slow_model, "--workers", "1", "--max-enqueued", "8"], cache_dir) as s:
        yield s


@pytest.fixture(scope="module")
def batched(slow_model, cache_dir, tmp_path_factory) -> Iterator[Any]:
    """One worker, one batch thread, batches of 4 rows, one batch may wait: the worker holds 8."""
    params = write(tmp_path_factory.mktemp("bp-batching") / "batching.txt", """\
max_batch_size { value: 4 }
batch_timeout_micros { value: 0 }
max_enqueued_batches { value: 1 }
num_batch_threads { value: 1 }
""")
    with serving(["--model-base-path", slow_model, "--workers", "1", "--max-enqueued", "8", "--enable-batching",
                  "--batching-parameters-file", params], cache_dir) as s:
        yield s


def test_flood_gets_fast_429s_with_bounded_memory_and_the_server_recovers(unbatched):
    with unbatched.client(30.0) as c:
        for _ in range(3):  # warm: the baseline includes what serving this model costs
            assert c.predict("slow", feed(500))["y"].tolist() == [0.0]
        # The baseline is the steady server: its loader service (started once the workers are
        # READY, for version updates) has finished importing TensorFlow.
        state = wait_until(lambda: c.status()["loader"]["state"] != "starting" and c.status()["loader"]["state"],
                           120, "the loader service to finish starting", interval=0.2)
        assert state == "ready"
    rss = [tree_rss(unbatched.proc.pid)]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.05):
            rss.append(tree_rss(unbatched.proc.pid))

    sampler = threading.Thread(target=sample)
    sampler.start()
    flood = Flood(unbatched.endpoint, 16)
    refusals: list[ServeError] = []
    flooding = threading.Event()

    def client() -> None:  # a Client in the flood: it can tell backpressure from real errors
        with unbatched.client(30.0) as c:
            while not flooding.is_set() and not refusals:
                try:
                    c.predict("slow", feed(500))
                except ResourceExhausted as exc:
                    refusals.append(exc)

    other = threading.Thread(target=client)
    try:
        started = time.monotonic()
        for i in range(3000):  # ~20 ms of work each: far beyond what 1 worker serves in the flood
            flood.send(i, feed(500))
            if i % 16 == 15:
                flood.collect()
            if i == 100:
                other.start()
        send_s = time.monotonic() - started
        flooding.set()
        other.join(60)
        flood.wait_all(60)
    finally:
        flooding.set()
        sampling.set()
        sampler.join()
        flood.close()
    after = tree_rss(unbatched.proc.pid)
    assert len(flood.replies) == len(flood.sent), "a flooded request got no answer"
    codes = [h["code"] for _, h in flood.replies.values()]
    assert set(codes) <= {200, 429}, {c: codes.count(c) for c in set(codes)}
    assert codes.count(429) >= 0.8 * len(codes) and codes.count(200) >= 10
    waits = sorted(flood.replies[r][0] - flood.sent[r] for r in flood.replies if flood.replies[r][1]["code"] == 429)
    # Refused at once, not after waiting: the client's timeout is 30 s.
    assert waits[len(waits) // 2] < 0.5 and waits[int(len(waits) * 0.95)] < 2.0, (send_s, waits[-10:])
    assert any("--max-enqueued" in h["message"] for _, h in flood.replies.values() if h["code"] == 429)
    assert refusals and refusals[0].code == 429 and refusals[0].retryable
    assert not error_from_code(400, "bad").retryable and not error_from_code(504, "late").retryable
    assert error_from_code(503, "stopping").retryable
    grew = (max(rss) - rss[0]) / 2**20
    assert grew < 50, f"server tree RSS grew {grew:.0f} MiB during the flood ({len(rss)} samples)"
    assert (after - rss[0]) / 2**20 < 50
    with unbatched.client(10.0) as c:  # recovered: serves normally, nothing left queued
        for i in range(5):
            assert c.predict("slow", {"x": np.array([i], np.float32), "n": np.array([10], np.int32)})["y"][0] == 2 * i
        st = c.status()
    assert st["queued"] == 0 and st["workers"][0]["inflight"] == 0 and st["workers"][0]["state"] == "READY"


def test_request_expiring_in_the_broker_queue_gets_504_and_never_runs(unbatched):
    before = served(unbatched)
    flood = Flood(unbatched.endpoint, 1)
    try:
        busy = [flood.send(0, feed(SLOW_N)) for _ in range(2)]  # the worker's whole pipeline
        wait_until(lambda: worker_status(unbatched)["inflight"] == 2, 30, "the worker to hold both slow requests")
        late = flood.send(0, feed(SLOW_N), timeout_ms=300)
        waited, header = flood.reply(late)
        for rid in busy:
            assert flood.reply(rid, 60)[1]["code"] == 200
        busy_s = max(flood.reply(rid)[0] for rid in busy)
    finally:
        flood.close()
    assert header["code"] == 504 and "not run" in header["message"], header
    assert waited < busy_s, "the 504 waited for the slow requests instead of coming at the deadline"
    assert served(unbatched)[0] == before[0] + 2  # the two slow requests; the expired one never reached it


@pytest.mark.parametrize("timeout_ms", [0, -5])
def test_deadline_already_past_on_arrival_is_504(unbatched, timeout_ms):
    flood = Flood(unbatched.endpoint, 1)
    try:
        _, header = flood.reply(flood.send(0, feed(1), timeout_ms=timeout_ms), 10)
    finally:
        flood.close()
    assert header["code"] == 504 and "before the request reached the server" in header["message"]
    with pytest.raises(InvalidArgument):  # the Python client refuses to send one at all
        with unbatched.client() as c:
            c.predict("slow", feed(1), timeout=0)


def test_full_batching_queue_is_429(batched):
    flood = Flood(batched.endpoint, 1)
    try:
        model = ModelRunning(batched)
        running = flood.send(0, feed(SLOW_N))  # takes the only batch thread
        model.wait()
        queued = flood.send(0, feed(1, rows=3))  # the one batch that may wait: 3 of 4 rows
        refused = flood.send(0, feed(1, rows=3))  # does not fit; a second batch may not wait
        waited, header = flood.reply(refused)
        assert flood.reply(running, 60)[1]["code"] == 200
        assert flood.reply(queued, 60)[1]["code"] == 200
    finally:
        flood.close()
    assert header["code"] == 429 and "max_enqueued_batches is 1" in header["message"], header
    assert error_from_code(header["code"], header["message"]).retryable
    assert waited < 1.0  # at once, not after the running batch


def test_request_expiring_in_the_batching_queue_gets_504_at_its_deadline_and_never_runs(batched):
    flood = Flood(batched.endpoint, 1)
    try:
        model = ModelRunning(batched)
        running = flood.send(0, feed(SLOW_N))  # takes the only batch thread for ~1.5 s of CPU
        model.wait()  # else the late request could join the running one's batch, and run
        late = flood.send(0, feed(SLOW_N), timeout_ms=400)  # would take another ~1.5 s if it ran
        after = flood.send(0, feed(1))  # joins the late request's batch
        waited, header = flood.reply(late)
        running_s, running_header = flood.reply(running, 60)
        after_s, after_header = flood.reply(after, 60)
    finally:
        flood.close()
    # Seconds from sending the late (and the after) request to the running batch's reply.
    late_gap, after_gap = (flood.sent[rid] - flood.sent[running] for rid in (late, after))
    assert header["code"] == 504 and "batching queue" in header["message"] and "not run" in header["message"], header
    assert waited < running_s - late_gap, "the 504 waited for the running batch instead of coming at the deadline"
    assert running_header["code"] == 200 and after_header["code"] == 200
    # The batch that ran held only the request that had not expired, and it was quick.
    assert after_header["batch_size"] == 1
    assert after_s - (running_s - after_gap) < 0.75 * (running_s - after_gap)
    with batched.client(5.0) as c:  # the worker went on heartbeating while its batch thread was busy
        (worker,) = c.status()["workers"]
    assert worker["restarts"] == 0 and worker["state"] == "READY"


def test_retries_after_429_are_served_once_the_burst_is_over(batched):
    with batched.client(10.0) as c:
        deadline = time.monotonic() + 10
        while True:
            try:
                assert c.predict("slow", feed(1))["y"].tolist() == [0.0]
                break
            except ServeError as exc:
                assert exc.retryable and time.monotonic() < deadline, exc
                time.sleep(0.1)  # a client's pause between retries, not an ordering of events
