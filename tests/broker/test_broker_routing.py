"""Routing through a real broker to real echo worker processes: which worker answered."""
from __future__ import annotations

import zlib

import numpy as np
import zmq

from broker_helpers import predict_header, recv, send


def ask(sock, rid, **extra):
    header, frames = predict_header(rid, **extra)
    send(sock, header, frames)
    reply, payload = recv(sock)
    assert reply["code"] == 200, reply
    assert reply["id"] == rid
    return reply, payload


def test_round_robin_and_echo(start_broker) -> None:
    server = start_broker(workers=3, policy="rr")
    sock = server.socket()
    workers = [ask(sock, i)[0]["worker"] for i in range(6)]
    assert workers == [0, 1, 2, 0, 1, 2]
    reply, payload = ask(sock, 41)
    assert np.array_equal(np.frombuffer(payload[0], np.float32), np.arange(3, dtype=np.float32) + 41)
    assert reply["outputs"] == [{"name": "x", "dtype": "float32", "shape": [3]}]
    # the broker resolved version and signature and stamped attempt/deadline for the worker
    assert reply["version"] == 2
    assert reply["broker"] == {"signature": "serving_default", "deadline": None, "attempt": 0, "routing_key": None}


def test_mod_routing_key_and_client_identity(start_broker) -> None:
    server = start_broker(workers=3, policy="mod")
    sock = server.socket()
    for key in (0, 1, 2, 5, 301):
        assert ask(sock, key, routing_key=key)[0]["worker"] == key % 3
    for key in ("user-1", "user-2", b"\x01\x02"):
        raw = key.encode() if isinstance(key, str) else key
        assert ask(sock, 1, routing_key=key)[0]["worker"] == zlib.crc32(raw) % 3
    # no routing key: a client's identity keeps it on one worker
    ident = b"client-A"
    named = server.socket(identity=ident)
    assert {ask(named, i)[0]["worker"] for i in range(4)} == {zlib.crc32(ident) % 3}


def test_mod_falls_to_next_index_when_target_is_full(start_broker) -> None:
    server = start_broker(workers=3, policy="mod", worker_pipeline=1)
    slow = server.socket()
    header, frames = predict_header(1, routing_key=1,
                                    inputs=[{"name": "sleep_s", "dtype": "float32", "shape": []}])
    send(slow, header, [np.float32(0.5).tobytes()])
    server.wait_for(lambda: server.broker.table.get(1).load == 1, what="worker 1 busy")
    assert ask(server.socket(), 2, routing_key=4)[0]["worker"] == 2  # 4 % 3 = 1 is full -> 2
    assert recv(slow)[0]["worker"] == 1


def test_least_loaded(start_broker) -> None:
    server = start_broker(workers=3, policy="least-loaded")
    sock = server.socket()
    assert [ask(sock, i)[0]["worker"] for i in range(3)] == [0, 0, 0]  # all idle: lowest index
    slow = server.socket()
    header, _ = predict_header(9, inputs=[{"name": "sleep_s", "dtype": "float32", "shape": []}])
    send(slow, header, [np.float32(0.5).tobytes()])
    server.wait_for(lambda: server.broker.table.get(0).load == 1, what="worker 0 busy")
    assert ask(sock, 10)[0]["worker"] == 1
    assert recv(slow)[0]["worker"] == 0


def test_example_plugin_routes_vip_to_worker_0(start_broker) -> None:
    server = start_broker(workers=3, policy="sgserve.broker.example_policy:vip_first")
    sock = server.socket()
    assert ask(sock, 1, routing_key="vip-42")[0]["worker"] == 0
    assert ask(sock, 2, routing_key="regular")[0]["worker"] == 1
    assert ask(sock, 3)[0]["worker"] == 1


def test_function_plugin_sees_resolved_signature(start_broker) -> None:
    server = start_broker(workers=2, policy="broker_plugins:by_signature")
    sock = server.socket()
    assert ask(sock, 1, signature="classify")[0]["worker"] == 1
    assert ask(sock, 2)[0]["worker"] == 0


def test_req_client_gets_delimited_replies(start_broker) -> None:
    server = start_broker(workers=1)
    req = server.socket(zmq.REQ)
    reply, payload = ask(req, 5)
    assert reply["worker"] == 0 and len(payload) == 1
    send(req, {"type": "ping", "id": "p"})
    assert recv(req)[0] == {"id": "p", "code": 200, "message": "pong"}


def test_metadata_status_ping(start_broker) -> None:
    server = start_broker(workers=2)
    sock = server.socket()
    send(sock, {"type": "metadata", "id": 1, "model": "demo"})
    meta, _ = recv(sock)
    assert meta["code"] == 200 and meta["model"] == "demo" and meta["version"] == 2
    assert meta["versions"] == [1, 2] and set(meta["signatures"]) == {"serving_default", "classify"}
    send(sock, {"type": "metadata", "id": 2, "model": "demo", "version": 1})
    assert recv(sock)[0]["version"] == 1
    ask(sock, 3)
    send(sock, {"type": "status", "id": 4})
    status, _ = recv(sock)
    assert status["code"] == 200
    assert status["server"]["endpoint"] == server.endpoint and status["server"]["policy"] == "rr"
    assert set(status["server"]) >= {"pid", "uptime_s", "server_id"}
    assert [w["index"] for w in status["workers"]] == [0, 1]
    assert all(w["state"] == "READY" and w["restarts"] == 0 and w["pid"] for w in status["workers"])
    assert sum(w["served"] for w in status["workers"]) == 1
    assert {(m["name"], m["version"]) for m in status["models"]} == {("demo", 1), ("demo", 2), ("other", 7)}
    assert all(m["state"] == "AVAILABLE" for m in status["models"])
    demo1 = next(m for m in status["models"] if m["version"] == 1)
    assert demo1["segment"] == "/sgs_test_demo_1" and demo1["bytes"] == 1024 and demo1["load_seconds"] == 0.5
    send(sock, {"type": "ping", "id": 5})
    assert recv(sock)[0]["message"] == "pong"


def test_version_pinning_and_output_filter(start_broker) -> None:
    server = start_broker(workers=1)
    sock = server.socket()
    reply, _ = ask(sock, 1, version=1)
    assert reply["version"] == 1
    # [] means all outputs (docs/protocol.md), as nil does; a named filter keeps only those
    header, frames = predict_header(2, output_filter=[])
    send(sock, header, frames)
    reply, payload = recv(sock)
    assert reply["outputs"] == [{"name": "x", "dtype": "float32", "shape": [3]}] and payload == frames
    header, frames = predict_header(3, inputs=[{"name": "x", "dtype": "float32", "shape": [3]},
                                               {"name": "y", "dtype": "float32", "shape": [3]}],
                                    output_filter=["y"])
    send(sock, header, frames * 2)
    reply, payload = recv(sock)
    assert reply["outputs"] == [{"name": "y", "dtype": "float32", "shape": [3]}] and payload == frames
    header, frames = predict_header(4, output_filter=["nope"])
    send(sock, header, frames)
    reply, payload = recv(sock)
    assert reply["code"] == 400 and "unknown output(s) ['nope']" in reply["message"] and payload == []
