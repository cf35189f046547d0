"""The worker's error replies, from a real worker process (``python -m sgserve.worker``) over real
ZeroMQ sockets, with the test in the broker's place on the backend socket.

The broker refuses a client header it cannot decode before any worker sees it (tests/broker/
test_broker_errors.py), so these requests cannot reach a worker through the broker: the test sends
the W_REQUESTs itself, exactly as docs/protocol.md section 11 frames them. Both request paths are
covered, one request at a time and server-side batching. The worker serves no model: every request
here fails before a model would run.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any, Iterator

import msgpack
import pytest
import zmq

from sgserve import protocol
from sgserve.config import WorkerSpec
from sgserve.models.batching_params import BatchingParameters

BOOT_TIMEOUT = 120.0  # a worker imports TensorFlow before READY: seconds on a busy machine
REPLY_TIMEOUT = 10.0


class BackendEnd:
    """The broker's end of the backend for one real worker process: a ROUTER it connects to."""

    def __init__(self, batching: bool) -> None:
        self.path = os.path.join(tempfile.gettempdir(), f"sgs-worker-test-{uuid.uuid4().hex[:12]}.sock")
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(f"ipc://{self.path}")
        spec = WorkerSpec(index=3, cores=sorted(os.sched_getaffinity(0))[:1], backend=f"ipc://{self.path}",
                          models=[], intra_op_threads=1, inter_op_threads=1, heartbeat_interval=2.0,
                          batching=BatchingParameters(max_batch_size=4).to_dict() if batching else None)
        self.proc = subprocess.Popen([sys.executable, "-m", "sgserve.worker", spec.to_json()])
        self.identity: bytes | None = None
        self._rids = iter(range(1, 1 << 30))

    def wait_ready(self) -> None:
        command, body = self._next(BOOT_TIMEOUT, "READY")
        assert command == protocol.W_READY and msgpack.unpackb(body[0])["index"] == 3

    def ask(self, header_frame: bytes, version: int = 1, deadline: float | None = None) -> dict[str, Any]:
        """Sends one W_REQUEST with this header frame and no payload; returns the reply's header."""
        rid = next(self._rids)
        self.sock.send_multipart([self.identity, protocol.route_frame(rid, version, deadline, 0), header_frame])
        command, frames = self._next(REPLY_TIMEOUT, f"the reply to request {rid}")
        header = msgpack.unpackb(frames[0], raw=False)
        assert len(frames) == 1, "an error reply carries no payload frames"
        assert command == protocol.reply_frame(rid, header["code"]), "the command frame carries the reply's code"
        return header

    def stop(self) -> int:
        """W_STOP; the worker's exit code."""
        self.sock.send_multipart([self.identity, protocol.W_STOP])
        return self.proc.wait(REPLY_TIMEOUT)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(REPLY_TIMEOUT)
        self.sock.close(0)
        self.ctx.term()
        if os.path.exists(self.path):
            os.unlink(self.path)

    def _next(self, timeout: float, what: str) -> tuple[bytes, list[bytes]]:
        """The next message that is not a heartbeat: (command frame, the frames after it)."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            assert left > 0 and self.sock.poll(left * 1000), f"no {what} from the worker within {timeout:g} s"
            identity, command, *rest = self.sock.recv_multipart()
            self.identity = identity
            if command != protocol.W_HEARTBEAT:
                return command, rest


@pytest.fixture(scope="module")
def workers() -> Iterator[dict[str, BackendEnd]]:
    """One worker that runs requests one at a time and one that batches, booted side by side."""
    ends = {"unbatched": BackendEnd(batching=False), "batching": BackendEnd(batching=True)}
    try:
        for end in ends.values():
            end.wait_ready()
        yield ends
        for end in ends.values():
            assert end.stop() == 0
    finally:
        for end in ends.values():
            end.close()


PATHS = ["unbatched", "batching"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("frame,message", [
    (b"\xc1", "header frame is not valid msgpack (FormatError)"),
    (msgpack.packb({"id": 1, "model": "m"})[:-2], "header frame is not valid msgpack (ValueError)"),
    (msgpack.packb([1, 2]), "header frame must be a msgpack map"),
])
def test_a_header_that_cannot_be_decoded_is_a_400_saying_so(workers, path, frame, message) -> None:
    reply = workers[path].ask(frame, version=5)
    assert reply == {"id": None, "code": 400, "message": message, "model": None, "version": 5, "worker": 3}


@pytest.mark.parametrize("path", PATHS)
def test_a_header_without_a_model_is_a_400_not_model_none_is_not_loaded(workers, path) -> None:
    reply = workers[path].ask(msgpack.packb({"id": 7, "type": "predict"}))
    assert reply == {"id": 7, "code": 400, "model": None, "version": 1, "worker": 3,
                     "message": "request needs 'model', the name of a served model, got None"}


@pytest.mark.parametrize("path", PATHS)
def test_a_version_the_worker_lacks_is_a_404_naming_it(workers, path) -> None:
    reply = workers[path].ask(msgpack.packb({"id": 8, "type": "predict", "model": "m"}), version=2)
    assert reply == {"id": 8, "code": 404, "model": "m", "version": 2, "worker": 3,
                     "message": "model 'm' version 2 is not loaded in worker 3"}


@pytest.mark.parametrize("path", PATHS)
def test_a_deadline_passed_before_the_request_ran_is_a_504(workers, path) -> None:
    reply = workers[path].ask(msgpack.packb({"id": 9, "type": "predict", "model": "m"}), deadline=time.time() - 1)
    assert reply == {"id": 9, "code": 504, "model": "m", "version": 1, "worker": 3,
                     "message": "deadline exceeded before the request could run"}
