"""sgserve.client.Client against a scripted fake server (a ROUTER in a thread): no broker, no workers."""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

import msgpack
import numpy as np
import pytest
import zmq

from sgserve import client as client_module
from sgserve.client import Client, PredictResult
from sgserve.errors import (DeadlineExceeded, Internal, InvalidArgument, NotFound, ResourceExhausted, ServeError,
                            Unavailable)
from sgserve.protocol import MAGIC, decode_tensors, pack

Handler = Callable[[dict[str, Any], list[bytes]], "list[list[Any]]"]


class FakeServer:
    """Answers each request with whatever ``handler(header, payload)`` returns (a list of replies)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.headers: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(20):
                continue
            ident, magic, raw, *payload = self.sock.recv_multipart()
            header = msgpack.unpackb(raw, raw=False)
            self.headers.append(header)
            for reply in self.handler(header, payload):
                self.sock.send_multipart([ident, *reply])

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.sock.close()
        self.ctx.term()


def reply(header: dict[str, Any], **fields: Any) -> list[Any]:
    out = {"id": header["id"], "code": 200, "message": ""}
    out.update(fields)
    return [MAGIC, msgpack.packb(out, use_bin_type=True)]


def echo(header: dict[str, Any], payload: list[bytes]) -> list[list[Any]]:
    if header["type"] == "predict":
        arrays = decode_tensors(header.get("inputs"), payload)
        frames = pack({"id": header["id"], "code": 200, "message": "", "model": header["model"],
                       "version": header.get("version", 3), "worker": 1}, arrays, key="outputs")
        return [frames]
    if header["type"] == "ping":
        return [reply(header, message="pong")]
    return [reply(header, server={"pid": 1}, workers=[], models=[])]


@pytest.fixture
def fake():
    servers: list[FakeServer] = []

    def make(handler: Handler = echo) -> FakeServer:
        server = FakeServer(handler)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


def test_predict_roundtrip_and_header(fake) -> None:
    server = fake()
    with Client(server.endpoint, timeout=2) as client:
        x = np.arange(6, dtype=np.int32).reshape(3, 2)
        result = client.predict_full("m", {"x": x}, version=3, signature="sig", output_filter=["x"],
                                     routing_key=b"k")
        assert isinstance(result, PredictResult)
        assert np.array_equal(result.outputs["x"], x) and result.worker == 1 and result.version == 3
        assert result.model == "m" and result.latency_s > 0
    sent = server.headers[0]
    assert sent["type"] == "predict" and sent["model"] == "m" and sent["version"] == 3
    assert sent["signature"] == "sig" and sent["output_filter"] == ["x"] and sent["routing_key"] == b"k"
    assert sent["timeout_ms"] == 2000.0
    assert sent["inputs"] == [{"name": "x", "dtype": "int32", "shape": [3, 2]}]


def test_optional_fields_left_out(fake) -> None:
    server = fake()
    with Client(server.endpoint) as client:
        client.predict("m", {"x": np.zeros(1, np.float32)})
    sent = server.headers[0]
    for key in ("version", "signature", "output_filter", "routing_key", "timeout_ms"):
        assert key not in sent


@pytest.mark.parametrize("code,cls", [(400, InvalidArgument), (404, NotFound), (429, ResourceExhausted),
                                      (500, Internal), (503, Unavailable), (504, DeadlineExceeded)])
def test_error_codes_raise_typed_errors(fake, code, cls) -> None:
    server = fake(lambda h, p: [[MAGIC, msgpack.packb({"id": h["id"], "code": code, "message": "why"})]])
    with Client(server.endpoint, timeout=2) as client:
        with pytest.raises(cls, match="why") as info:
            client.predict("m", {"x": np.zeros(1, np.float32)})
    assert info.value.code == code and info.value.message == "why"


def test_unknown_code_keeps_the_code(fake) -> None:
    server = fake(lambda h, p: [[MAGIC, msgpack.packb({"id": h["id"], "code": 418, "message": "teapot"})]])
    with Client(server.endpoint, timeout=2) as client:
        with pytest.raises(ServeError) as info:
            client.status()
    assert info.value.code == 418


def test_stale_replies_are_discarded(fake) -> None:
    def handler(h, p):
        stale = {"id": [0, 12345], "code": 200, "message": "stale"}
        return [[MAGIC, msgpack.packb(stale)], [MAGIC, msgpack.packb({"id": h["id"], "code": 200,
                                                                      "message": "pong"})]]
    server = fake(handler)
    with Client(server.endpoint, timeout=2) as client:
        assert client.ping()


def test_malformed_reply_is_internal(fake) -> None:
    server = fake(lambda h, p: [[b"XXXX", b"junk"]])
    with Client(server.endpoint, timeout=2) as client:
        with pytest.raises(Internal, match="malformed reply"):
            client.status()


def test_no_server_times_out_naming_endpoint(free_port_endpoint) -> None:
    with Client(free_port_endpoint, timeout=0.2) as client:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match=free_port_endpoint.replace(".", r"\.")):
            client.status()
        assert time.monotonic() - started < 1.0
        assert client.ping(timeout=0.1) is False


def test_no_timeout_still_bounded(free_port_endpoint, monkeypatch) -> None:
    monkeypatch.setattr(client_module, "DEFAULT_WAIT", 0.2)
    with Client(free_port_endpoint) as client:
        with pytest.raises(DeadlineExceeded):
            client.metadata("m")


def test_timeout_then_late_reply_is_not_mistaken(fake) -> None:
    calls = []

    def handler(h, p):
        calls.append(h)
        if len(calls) == 1:
            time.sleep(0.4)  # answer the first request late
        return echo(h, p)

    server = fake(handler)
    with Client(server.endpoint) as client:
        with pytest.raises(DeadlineExceeded):
            client.predict("m", {"x": np.zeros(2, np.float32)}, timeout=0.1)
        out = client.predict("m", {"x": np.ones(2, np.float32)}, timeout=2)
        assert np.array_equal(out["x"], np.ones(2, np.float32))


def test_threads_share_a_client(fake) -> None:
    server = fake()
    client = Client(server.endpoint, timeout=5)
    errors: list[BaseException] = []

    def run(t: int) -> None:
        try:
            for i in range(50):
                x = np.full(3, t * 100 + i, dtype=np.int64)
                assert np.array_equal(client.predict("m", {"x": x})["x"], x)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(20)
    client.close()
    assert not errors, errors[0]
    ids = [tuple(h["id"]) for h in server.headers]
    assert len(set(ids)) == len(ids) == 400


def test_bad_timeout_and_closed_client(fake) -> None:
    server = fake()
    client = Client(server.endpoint)
    with pytest.raises(InvalidArgument):
        client.ping(timeout=0)
    assert client.ping(timeout=2)  # this thread now has a socket
    client.close()
    client.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        client.status()


def test_default_endpoint_from_environment(monkeypatch) -> None:
    monkeypatch.setenv("SGSERVE_ENDPOINT", "tcp://127.0.0.1:1")
    with Client() as client:
        assert client.endpoint == "tcp://127.0.0.1:1"


@pytest.fixture
def free_port_endpoint() -> str:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"
