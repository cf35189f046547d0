"""The broker's routing core fed frames directly: no sockets, no processes.

Each test builds a RoutingCore over a real WorkerTable, a real dispatch policy and a real
ModelManager serving fixed versions, with send functions that record what the core sends.
"""
from __future__ import annotations

import time
import types
from typing import Any

import msgpack
import pytest
import zmq

from sgserve.broker.core import HELD_GRACE, RoutingCore
from sgserve.models.manager import ModelManager
from sgserve.models.tfs_config import ModelConfig
from sgserve.broker.policies import load_policy
from sgserve.broker.worker_table import WorkerTable
from sgserve.protocol import MAGIC, W_HEARTBEAT, W_READY, W_REQUEST, parse_route, reply_frame
from tests.broker.broker_helpers import demo_models, test_config


class Harness:
    """A RoutingCore with ``workers`` READY slots (identities w0, w1, ...) and recording sends."""

    def __init__(self, workers: int = 2, policy: str = "rr", split_refused: str | None = None, **config: Any) -> None:
        self.config = test_config(workers=workers, policy=policy, **config)
        self.table = WorkerTable(workers, self.config.worker_pipeline)
        specs = demo_models()
        configs = {s.name: ModelConfig(s.name, s.base_path) for s in specs}
        self.manager = ModelManager(self.config, server_id="core-test", models=list(configs.values()),
                                    initial=specs)
        for s in specs:  # what a worker reports when it has loaded a version (worker/split_check.py)
            self.manager.note_warmup(s.name, s.version, {"requests": 0, "source": "test",
                                                         "split": {sig: split_refused for sig in s.signatures}})
        self.to_clients: list[list[Any]] = []
        self.to_workers: list[tuple[bytes, list[Any]]] = []
        self.unreachable: set[bytes] = set()
        self.lost: list[tuple[int, str]] = []
        self.control: list[tuple[bytes, int]] = []
        policy_obj = load_policy(policy)
        if hasattr(policy_obj, "bind"):
            policy_obj.bind(self.table)
        self.core = RoutingCore(self.config, self.table, policy_obj, resolve=self.manager.resolve,
                                to_client=self.to_clients.append, to_worker=self._to_worker,
                                admin=lambda rtype, header: {"message": f"admin {rtype}"},
                                on_control=lambda ident, cmd, rest, now: self.control.append((ident, cmd)),
                                on_lost=lambda slot, why: self.lost.append((slot.index, why)),
                                split_verdict=self.manager.split_verdict)
        for i in range(workers):
            slot = self.table.add(i, [i])
            self.table.spawned(slot, types.SimpleNamespace(pid=100 + i), now=0.0)
            self.table.mark_ready(slot, f"w{i}".encode(), 100 + i, now=time.monotonic())

    def _to_worker(self, identity: bytes, frames: list[Any]) -> bool:
        if identity in self.unreachable:
            return False
        self.to_workers.append((identity, frames))
        return True

    def close(self) -> None:
        self.manager.close()

    # -- feeding -------------------------------------------------------------------------------
    def request(self, client: bytes, header: dict[str, Any], payload: list[bytes] = (), req: bool = False) -> bytes:
        header_frame = msgpack.packb(header, use_bin_type=True)
        frames = [client] + ([b""] if req else []) + [MAGIC, header_frame, *payload]
        self.core.from_client([zmq.Frame(f) for f in frames])
        return header_frame

    def reply(self, worker: bytes, rid: int, header: dict[str, Any], payload: list[bytes] = ()) -> None:
        frames = [worker, reply_frame(rid, header.get("code", 200)), msgpack.packb(header, use_bin_type=True), *payload]
        self.core.from_worker([zmq.Frame(f) for f in frames])

    # -- reading -------------------------------------------------------------------------------
    def sent(self) -> list[tuple[bytes, tuple[int, int, float | None, int], bytes, list[bytes]]]:
        """(worker, route fields, header frame, payload) of each W_REQUEST sent, oldest first."""
        out = []
        for identity, frames in self.to_workers:
            assert frames[0][:1] == W_REQUEST
            out.append((identity, parse_route(frames[0]), _bytes(frames[1]), [_bytes(f) for f in frames[2:]]))
        return out

    def replies(self) -> list[tuple[list[bytes], dict[str, Any], list[bytes]]]:
        """(routing prefix, header, payload) of each message sent to a client."""
        out = []
        for frames in self.to_clients:
            raw = [_bytes(f) for f in frames]
            at = raw.index(MAGIC)
            out.append((raw[:at], msgpack.unpackb(raw[at + 1], raw=False), raw[at + 2:]))
        return out


def _bytes(frame: Any) -> bytes:
    return frame.bytes if isinstance(frame, zmq.Frame) else bytes(frame)


def predict(rid: Any, **extra: Any) -> dict[str, Any]:
    header = {"type": "predict", "id": rid, "model": "demo",
              "inputs": [{"name": "x", "dtype": "float32", "shape": [1]}]}
    header.update(extra)
    return header


X = b"\x00\x00\x80?"


@pytest.fixture
def harness():
    made: list[Harness] = []

    def make(**kw: Any) -> Harness:
        h = Harness(**kw)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def test_forwards_the_clients_header_and_payload_untouched_behind_one_route_frame(harness) -> None:
    h = harness()
    header_frame = h.request(b"c1", predict(1, timeout_ms=5000), [X])
    [(worker, (rid, version, deadline, attempt), header, payload)] = h.sent()
    assert worker == b"w0" and version == 2 and attempt == 0
    assert abs(deadline - (time.time() + 5.0)) < 1.0
    assert header == header_frame and payload == [X]
    h.reply(b"w0", rid, {"id": 1, "code": 200, "message": "", "outputs": []}, [b"out"])
    [(prefix, reply, out)] = h.replies()
    assert prefix == [b"c1"] and reply["id"] == 1 and reply["code"] == 200 and out == [b"out"]
    assert h.table.inflight_count() == 0


def test_req_client_reply_keeps_the_delimiter_and_no_deadline_is_nan(harness) -> None:
    h = harness()
    h.request(b"c1", predict(1, version=1), [X], req=True)
    [(_, (rid, version, deadline, _), _, _)] = h.sent()
    assert version == 1 and deadline is None
    h.reply(b"w0", rid, {"id": 1, "code": 200, "message": ""})
    assert h.replies()[0][0] == [b"c1", b""]


def test_round_robin_alternates_workers(harness) -> None:
    h = harness(worker_pipeline=4)
    for i in range(4):
        h.request(b"c", predict(i), [X])
    assert [w for w, *_ in h.sent()] == [b"w0", b"w1", b"w0", b"w1"]


def test_mod_keeps_a_routing_key_on_one_worker(harness) -> None:
    h = harness(policy="mod", worker_pipeline=8)
    for i in range(3):
        h.request(b"c", predict(i, routing_key=3), [X])  # 3 % 2 = worker 1
        h.request(b"c", predict(i, routing_key=4), [X])  # worker 0
    assert [w for w, *_ in h.sent()] == [b"w1", b"w0"] * 3


def test_least_loaded_picks_the_idler_worker(harness) -> None:
    h = harness(policy="least-loaded", worker_pipeline=4)
    h.request(b"c", predict(1), [X])
    h.request(b"c", predict(2), [X])
    h.request(b"c", predict(3), [X])
    first = h.sent()[0][1][0]
    h.reply(b"w0", first, {"id": 1, "code": 200, "message": ""})  # w0: 1 in flight, w1: 1
    h.request(b"c", predict(4), [X])
    assert [w for w, *_ in h.sent()] == [b"w0", b"w1", b"w0", b"w0"]


def test_queue_full_is_429_at_once(harness) -> None:
    h = harness(workers=1, worker_pipeline=1, max_enqueued=1)
    h.request(b"c", predict(1), [X])  # runs
    h.request(b"c", predict(2), [X])  # queued
    h.request(b"c", predict(3), [X])  # refused
    [(_, reply, payload)] = h.replies()
    assert reply == {"id": 3, "code": 429, "message": "server overloaded: 1 requests queued (--max-enqueued); "
                                                      "retry later"}
    assert payload == [] and len(h.sent()) == 1 and len(h.core.queue) == 1


def test_a_queued_request_expires_with_504_and_never_runs(harness) -> None:
    h = harness(workers=1, worker_pipeline=1)
    h.request(b"c", predict(1), [X])
    h.request(b"c", predict(2, timeout_ms=30), [X])
    time.sleep(0.05)  # holds time on purpose: the core reads the wall clock for the 30 ms deadline
    h.core.tick(time.monotonic(), silence=60.0, worker_timeout=60.0)
    [(_, reply, _)] = h.replies()
    assert reply["id"] == 2 and reply["code"] == 504 and "queued in the broker" in reply["message"]
    assert "was not run" in reply["message"]
    rid = h.sent()[0][1][0]
    h.reply(b"w0", rid, {"id": 1, "code": 200, "message": ""})
    assert len(h.sent()) == 1, "the expired request was never sent"


def test_a_request_held_by_a_dead_worker_is_retried_once_then_503(harness) -> None:
    h = harness()
    h.request(b"c", predict(1), [X])
    assert h.sent()[0][0] == b"w0"
    h.core.worker_lost(h.table.get(0), "test kill")
    assert h.lost == [(0, "test kill")]
    retry = h.sent()[1]
    assert retry[0] == b"w1" and retry[1][3] == 1, "retried on the other worker as attempt 1"
    h.core.worker_lost(h.table.get(1), "test kill again")
    [(_, reply, _)] = h.replies()
    assert reply["code"] == 503 and reply["id"] == 1 and "already a retry" in reply["message"]


def test_an_unreachable_worker_is_lost_and_the_request_goes_elsewhere(harness) -> None:
    h = harness()
    h.unreachable.add(b"w0")
    h.request(b"c", predict(1), [X])
    assert [w for w, *_ in h.sent()] == [b"w1"]
    assert h.lost == [(0, "disconnected from the broker")]


def test_a_hung_worker_is_lost_and_its_request_retried(harness) -> None:
    h = harness()
    h.request(b"c", predict(1), [X])
    h.core.tick(time.monotonic() + 10.0, silence=60.0, worker_timeout=5.0)
    assert h.lost and h.lost[0][0] == 0 and "without replying" in h.lost[0][1]
    assert h.sent()[-1][0] == b"w1"


def test_a_reply_from_a_worker_that_does_not_hold_the_request_is_dropped(harness) -> None:
    h = harness()
    h.request(b"c", predict(1), [X])
    rid = h.sent()[0][1][0]
    h.reply(b"w1", rid, {"id": 1, "code": 200, "message": ""})
    assert h.replies() == [] and h.table.inflight_count() == 1


def test_bad_requests_are_answered_by_the_core(harness) -> None:
    h = harness(max_request_bytes=100)
    h.request(b"c", predict(1, model="nope"), [X])
    h.request(b"c", predict(2, signature="zzz"), [X])
    h.request(b"c", predict(3, timeout_ms=0), [X])
    h.request(b"c", predict(4), [b"\x00" * 200])
    codes = [(r["id"], r["code"]) for _, r, _ in h.replies()]
    assert codes == [(1, 404), (2, 404), (3, 504), (4, 400)]
    assert h.sent() == []


def test_admin_requests_go_to_the_admin_handler_and_stopping_is_503(harness) -> None:
    h = harness()
    h.request(b"c", {"type": "status", "id": 1})
    assert h.replies()[0][1] == {"id": 1, "code": 200, "message": "admin status"}
    h.core.stopping = True
    h.request(b"c", predict(2), [X])
    assert h.replies()[1][1] == {"id": 2, "code": 503, "message": "server is shutting down"}


def test_control_commands_go_to_the_control_handler_and_heartbeats_are_seen(harness) -> None:
    h = harness()
    slot = h.table.get(1)
    slot.last_seen = 0.0
    h.core.from_worker([zmq.Frame(b"w1"), zmq.Frame(W_HEARTBEAT)])
    assert slot.last_seen > 0.0
    h.core.from_worker([zmq.Frame(b"w9"), zmq.Frame(W_READY), zmq.Frame(b"{}")])
    assert h.control == [(b"w9", W_READY[0])]


def test_fail_all_answers_queued_and_in_flight_requests(harness) -> None:
    h = harness(workers=1, worker_pipeline=1)
    h.request(b"c", predict(1), [X])
    h.request(b"c", predict(2), [X])
    h.core.fail_all("server is shutting down")
    assert sorted((r["id"], r["code"]) for _, r, _ in h.replies()) == [(1, 503), (2, 503)]
    assert h.core.drained()


def _restart(h: Harness, index: int, identity: bytes) -> None:
    """The supervisor's part, by hand: a new process at ``index`` says READY as ``identity``."""
    slot = h.table.get(index)
    h.table.spawned(slot, types.SimpleNamespace(pid=200 + index), now=time.monotonic())
    h.table.mark_ready(slot, identity, 200 + index, now=time.monotonic())


def test_a_retry_avoids_the_index_whose_worker_just_died(harness) -> None:
    h = harness(workers=2, worker_pipeline=1)  # round robin
    h.request(b"c", predict(1), [X])  # w0
    h.request(b"c", predict(2), [X])  # w1
    h.core.worker_lost(h.table.get(0), "test kill")
    assert len(h.sent()) == 2 and len(h.core.queue) == 1, "no free worker: the retry waits in the queue"
    _restart(h, 0, b"w0-new")
    h.reply(b"w1", h.sent()[1][1][0], {"id": 2, "code": 200, "message": ""})
    # Both are free now; round robin alone would pick w0-new (after w1, it wraps around to index 0).
    worker, (_, _, _, attempt), _, _ = h.sent()[2]
    assert worker == b"w1" and attempt == 1, "the retry goes to the other worker, not the index that died"
    h.request(b"c", predict(3), [X])
    assert h.sent()[3][0] == b"w0-new", "first attempts still use the replacement"


def test_a_retry_takes_the_replacement_when_no_other_worker_is_free(harness) -> None:
    h = harness(workers=1, worker_pipeline=1)
    h.request(b"c", predict(1), [X])
    h.core.worker_lost(h.table.get(0), "test kill")
    assert len(h.core.queue) == 1
    _restart(h, 0, b"w0-new")
    h.core.tick(time.monotonic(), silence=60.0, worker_timeout=60.0)
    [_, (worker, (_, _, _, attempt), _, _)] = h.sent()
    assert worker == b"w0-new" and attempt == 1 and not h.core.queue


def test_a_request_held_past_its_deadline_is_answered_504_and_its_late_reply_dropped(harness) -> None:
    """A stopped or slow worker must not keep its client past the deadline: the broker answers 504
    HELD_GRACE after it; the worker's reply, when it comes, goes nowhere, and the slot is freed."""
    h = harness(workers=1)
    h.request(b"c", predict(1, timeout_ms=30), [X])
    [(worker, (rid, _, _, _), _, _)] = h.sent()
    time.sleep(0.03 + HELD_GRACE + 0.02)  # holds time on purpose: the deadline and the grace must pass
    h.core.tick(time.monotonic(), silence=60.0, worker_timeout=60.0)
    [(_, reply, _)] = h.replies()
    assert reply["id"] == 1 and reply["code"] == 504 and "held the request" in reply["message"]
    h.reply(worker, rid, {"id": 1, "code": 200, "message": ""})
    assert len(h.replies()) == 1, "the late reply must not reach the client"
    assert len(h.core.table.free()) == 1
