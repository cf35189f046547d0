"""Bad input, unknown names, overload and deadlines: every request gets a precise answer."""
from __future__ import annotations

import time

import msgpack
import numpy as np
import pytest
import zmq

from broker_helpers import predict_header, recv, send
from sgserve.protocol import MAGIC

SLEEP = [{"name": "sleep_s", "dtype": "float32", "shape": []}]


def sleeper(rid, seconds: float, **extra):
    header, _ = predict_header(rid, inputs=SLEEP, **extra)
    return header, [np.float32(seconds).tobytes()]


def assert_works(sock, rid=999) -> None:
    header, frames = predict_header(rid)
    send(sock, header, frames)
    reply, _ = recv(sock)
    assert reply["code"] == 200 and reply["id"] == rid


GARBAGE = [
    ([b"garbage"], None, "message has 1 frame(s)"),
    ([b"XXXX", b"\x80"], None, "first frame must be b'SGS1'"),
    ([MAGIC, b"\xc1"], None, "header frame is not valid msgpack"),
    ([MAGIC, msgpack.packb([1, 2])], None, "header frame must be a msgpack map"),
    ([MAGIC, msgpack.packb({"id": 1})], 1, "request has no 'type'; expected one of predict"),
    ([MAGIC, msgpack.packb({"id": 2, "type": "explode"})], 2, "unknown type 'explode'"),
    ([MAGIC, msgpack.packb({"id": 3, "type": "predict"})], 3, "request needs 'model'"),
    ([MAGIC, msgpack.packb({"id": 4, "type": "predict", "model": "demo", "version": "2"})], 4,
     "'version' must be an integer"),
    ([MAGIC, msgpack.packb({"id": 5, "type": "predict", "model": "demo", "inputs": "x"})], 5,
     "'inputs' must be a list"),
    ([MAGIC, msgpack.packb({"id": 6, "type": "predict", "model": "demo",
                            "inputs": [{"name": "x", "dtype": "float32", "shape": [3]}]})], 6,
     "header lists 1 inputs but the message carries 0 payload frames"),
    ([MAGIC, msgpack.packb({"id": 7, "type": "predict", "model": "demo",
                            "inputs": [{"name": "x", "dtype": "float32", "shape": [3]}]}), b"\x00" * 8], 7,
     "tensor 'x': payload is 8 bytes, float32[3] needs 12"),
    ([MAGIC, msgpack.packb({"id": 8, "type": "predict", "model": "demo",
                            "inputs": [{"name": "x", "dtype": "complex64", "shape": [1]}]}), b"\x00" * 8], 8,
     "unknown dtype 'complex64'"),
    ([MAGIC, msgpack.packb({"id": 9, "type": "predict", "model": "demo",
                            "inputs": [{"name": "x", "dtype": "float32", "shape": [-1]}]}), b""], 9,
     "shape must be a list of non-negative integers"),
    ([MAGIC, msgpack.packb({"id": 10, "type": "predict", "model": "demo",
                            "inputs": [{"name": "s", "dtype": "string", "shape": [3]}]}),
      msgpack.packb([b"a", b"b"])], 10, "string payload has 2 elements, shape [3] needs 3"),
    ([MAGIC, msgpack.packb({"id": 11, "type": "predict", "model": "demo",
                            "inputs": [{"name": "s", "dtype": "string", "shape": [1]}]}), b"\x01"], 11,
     "string payload has no array of elements"),
    ([MAGIC, msgpack.packb({"id": 12, "type": "predict", "model": "demo",
                            "inputs": [{"name": "x", "dtype": "int8", "shape": [1]},
                                       {"name": "x", "dtype": "int8", "shape": [1]}]}), b"\x01", b"\x02"], 12,
     "input 'x' is given twice"),
    ([MAGIC, msgpack.packb({"id": 13, "type": "predict", "model": "demo", "routing_key": 1.5})], 13,
     "'routing_key' must be an integer, string or bytes"),
    ([MAGIC, msgpack.packb({"id": 14, "type": "predict", "model": "demo", "timeout_ms": "soon"})], 14,
     "'timeout_ms' must be a number"),
    ([MAGIC, msgpack.packb({"id": 15, "type": "predict", "model": "demo", "output_filter": "x"})], 15,
     "'output_filter' must be a list"),
    ([MAGIC, msgpack.packb({"id": 16, "type": "predict", "model": "demo", "signature": 3})], 16,
     "'signature' must be a string"),
]


def test_garbage_gets_400_and_the_broker_keeps_going(start_broker) -> None:
    server = start_broker(workers=1)
    sock = server.socket()
    for frames, rid, message in GARBAGE:
        sock.send_multipart(frames)
        reply, payload = recv(sock)
        assert reply["code"] == 400, (frames, reply)
        assert reply["id"] == rid
        assert message in reply["message"], (message, reply["message"])
        assert payload == []
        assert_works(sock)


def test_req_client_garbage_is_answered_with_delimiter(start_broker) -> None:
    server = start_broker(workers=1)
    req = server.socket(zmq.REQ)
    req.send(b"nonsense")
    reply, _ = recv(req)
    assert reply["code"] == 400
    assert_works(req)
    req.send_multipart([b"SGS1"])  # MAGIC alone
    assert recv(req)[0]["code"] == 400
    assert_works(req)


def test_string_tensor_of_right_size_is_forwarded(start_broker) -> None:
    server = start_broker(workers=1)
    sock = server.socket()
    send(sock, {"type": "predict", "id": 1, "model": "demo",
                "inputs": [{"name": "s", "dtype": "string", "shape": [2]}]}, [msgpack.packb([b"a", b"bc"])])
    reply, payload = recv(sock)
    assert reply["code"] == 200 and msgpack.unpackb(payload[0]) == [b"a", b"bc"]


def test_oversized_request(start_broker) -> None:
    server = start_broker(workers=1, max_request_bytes=1000)
    sock = server.socket()
    header, _ = predict_header(7, inputs=[{"name": "x", "dtype": "uint8", "shape": [2000]}])
    send(sock, header, [b"\x00" * 2000])
    reply, _ = recv(sock)
    size = len(MAGIC) + len(msgpack.packb(header, use_bin_type=True)) + 2000
    assert reply == {"id": 7, "code": 400, "message": f"request is {size} bytes, over the server's limit of "
                                                     f"1000 bytes (--max-request-bytes)"}
    assert_works(sock)


@pytest.mark.parametrize("extra,message", [
    ({"model": "nope"}, "model 'nope' is not served here; available models: demo, other"),
    ({"version": 9}, "model 'demo' has no version 9; available versions: 1, 2"),
    ({"signature": "zzz"}, "model 'demo' version 2 has no signature 'zzz'; "
                           "available signatures: classify, serving_default"),
])
def test_unknown_names_404(start_broker, extra, message) -> None:
    server = start_broker(workers=1)
    sock = server.socket()
    header, frames = predict_header(3, **extra)
    send(sock, header, frames)
    assert recv(sock)[0] == {"id": 3, "code": 404, "message": message}
    send(sock, {"type": "metadata", "id": 4, "model": "nope"})
    reply = recv(sock)[0]
    assert reply["code"] == 404 and "available models: demo, other" in reply["message"]


def test_queue_full_429_then_all_served(start_broker) -> None:
    server = start_broker(workers=1, worker_pipeline=1, max_enqueued=2)
    socks = [server.socket() for _ in range(4)]
    header, frames = sleeper(0, 1.0)
    send(socks[0], header, frames)
    server.wait_for(lambda: server.broker.table.get(0).load == 1, what="worker busy")
    for i in (1, 2):
        header, frames = predict_header(i)
        send(socks[i], header, frames)
    server.wait_for(lambda: server.broker.status()["queued"] == 2, what="two queued")
    header, frames = predict_header(3)
    send(socks[3], header, frames)
    started = time.monotonic()
    reply, _ = recv(socks[3])
    assert time.monotonic() - started < 0.8, "refused at once, not after the queue drains"
    assert reply == {"id": 3, "code": 429,
                     "message": "server overloaded: 2 requests queued (--max-enqueued); retry later"}
    for i in (0, 1, 2):
        assert recv(socks[i])[0]["code"] == 200


def test_deadlines_504(start_broker) -> None:
    server = start_broker(workers=1, worker_pipeline=1)
    sock = server.socket()
    # already passed on arrival
    header, frames = predict_header(1, timeout_ms=0)
    send(sock, header, frames)
    reply = recv(sock)[0]
    assert reply["code"] == 504 and reply["id"] == 1
    # passes while queued behind a slow request: answered by the broker, never run
    slow = server.socket()
    header, frames = sleeper(2, 1.5)
    send(slow, header, frames)
    server.wait_for(lambda: server.broker.table.get(0).load == 1, what="worker busy")
    header, frames = predict_header(3, timeout_ms=150)
    started = time.monotonic()
    send(sock, header, frames)
    reply = recv(sock)[0]
    waited = time.monotonic() - started
    assert reply["code"] == 504 and reply["id"] == 3 and "was not run" in reply["message"]
    assert 0.1 < waited < 1.2, "answered at its deadline, not when the worker freed up"
    assert recv(slow)[0]["code"] == 200
    assert server.broker.table.get(0).served == 1
    # a generous deadline travels to the worker as an absolute time
    header, frames = predict_header(4, timeout_ms=5000)
    send(sock, header, frames)
    reply = recv(sock)[0]
    assert reply["code"] == 200 and abs(reply["broker"]["deadline"] - (time.time() + 5)) < 1


def test_policy_failures_answer_500(start_broker) -> None:
    server = start_broker(workers=1, policy="broker_plugins:broken")
    sock = server.socket()
    header, frames = predict_header(1)
    send(sock, header, frames)
    reply = recv(sock)[0]
    assert reply["code"] == 500 and "plugin bug" in reply["message"]
    send(sock, {"type": "ping", "id": 2})
    assert recv(sock)[0]["code"] == 200


def test_policy_returning_non_slot_answers_500(start_broker) -> None:
    server = start_broker(workers=1, policy="broker_plugins:returns_garbage")
    sock = server.socket()
    header, frames = predict_header(1)
    send(sock, header, frames)
    reply = recv(sock)[0]
    assert reply["code"] == 500 and "other than one of the free workers" in reply["message"]
