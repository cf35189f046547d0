"""Fair admission and round-robin dequeuing (sgserve/broker/fair_queue.py): the queue on its own,
then inside the routing core fed frames (no sockets, no processes)."""
from __future__ import annotations

import time
from typing import Any

import pytest

from sgserve.broker.fair_queue import FairQueue, Refused
from sgserve.protocol import gateway_routing_id
from sgserve.broker.policies import DispatchRequest
from sgserve.protocol import Envelope
from tests.broker.test_broker_core import Harness, X, predict

TOKEN = "ab" * 16
PREFIX = b"gw" + bytes.fromhex(TOKEN)


def request(client: bytes, n: int, **header: Any) -> DispatchRequest:
    return DispatchRequest(n, Envelope([client], False), {"id": n, **header}, [], "m", 1, "serving_default",
                           None, client, None, time.monotonic())


def ids(queue: FairQueue) -> list[int]:
    out = []
    while queue:
        out.append(queue.pop().rid)
    return out


def test_round_robin_between_clients_oldest_first_within_each() -> None:
    q = FairQueue(100)
    for n in range(1, 5):
        q.push(request(b"flood", n))
    q.push(request(b"polite", 10))
    q.push(request(b"other", 20))
    q.push(request(b"polite", 11))
    assert len(q) == 7 and q.clients == 3
    assert ids(q) == [1, 10, 20, 2, 11, 3, 4]
    assert len(q) == 0 and q.clients == 0


def test_full_queue_pushes_out_the_longest_clients_newest_and_refuses_a_client_at_its_share() -> None:
    q = FairQueue(4)
    for n in range(1, 5):
        assert q.push(request(b"flood", n)) is None  # alone, a client may use the whole queue
    evicted = q.push(request(b"polite", 10))
    assert evicted is not None and evicted.rid == 4  # the flooder's newest, not its oldest
    with pytest.raises(Refused):
        q.push(request(b"flood", 5))  # the flooder holds 3, the most: over its share
    assert q.push(request(b"polite", 11)).rid == 3  # polite holds 1 < 3 - 1: still under its share
    with pytest.raises(Refused):
        q.push(request(b"polite", 12))  # 2 each: nobody holds two more than another
    assert len(q) == 4 and ids(q) == [1, 10, 2, 11]


def test_equal_holders_are_not_churned() -> None:
    q = FairQueue(2)
    q.push(request(b"a", 1))
    q.push(request(b"b", 2))
    with pytest.raises(Refused):
        q.push(request(b"c", 3))  # a and b hold one each: pushing one out would not be fairer
    assert ids(q) == [1, 2]


def test_retries_go_first_and_unpop_restores_the_order() -> None:
    q = FairQueue(10)
    q.push(request(b"a", 1))
    q.push(request(b"a", 2))
    q.push(request(b"b", 3))
    for r in reversed([request(b"c", 7), request(b"c", 8)]):  # as fail_over queues them
        q.push_front(r)
    first = q.pop()
    q.unpop(first)
    assert first.rid == 7 and len(q) == 5
    taken = q.pop()
    assert q.pop().rid == 8 and taken.rid == 7
    a = q.pop()
    q.unpop(a)  # no worker took it: a's request is next again, before b's
    assert a.rid == 1 and ids(q) == [1, 3, 2]


def test_unpop_after_a_nested_push_keeps_the_client_first() -> None:
    q = FairQueue(10)
    q.push(request(b"a", 1))
    q.push(request(b"a", 2))
    q.push(request(b"b", 3))
    r = q.pop()  # a's 1; ring: b, a
    q.push(request(b"c", 4))  # ring: b, a, c (a is no longer last)
    q.unpop(r)
    assert ids(q) == [1, 3, 4, 2]


def test_discard_answers_expired_requests_and_keeps_the_order_of_the_rest() -> None:
    q = FairQueue(10)
    for n, client in enumerate([b"a", b"a", b"b", b"a", b"b"], 1):
        q.push(request(client, n))
    q.push_front(request(b"c", 9))
    q.discard(lambda r: r.rid in (1, 3, 5, 9))
    assert len(q) == 2 and q.clients == 1 and list(q) and [r.rid for r in q] == [2, 4]
    q.discard(lambda r: True)
    assert len(q) == 0 and q.clients == 0 and list(q) == []


def test_only_the_gateways_identity_may_name_connections() -> None:
    gateway = gateway_routing_id(TOKEN, 4242)
    q = FairQueue(100, PREFIX)
    assert q.client_of(request(gateway, 1, connection="ipv4:10.0.0.1:5000")) != \
        q.client_of(request(gateway, 2, connection="ipv4:10.0.0.2:5000"))
    assert q.client_of(request(gateway, 3)) == gateway  # no connection named: the gateway is one client
    # A native client naming connections is one client, whatever it names.
    assert {q.client_of(request(b"native", n, connection=f"c{n}")) for n in range(5)} == {b"native"}
    # Nor can it pass for a gateway without the token.
    forged = gateway_routing_id("cd" * 16, 4242)
    assert q.client_of(request(forged, 6, connection="x")) == forged
    assert FairQueue(100).client_of(request(gateway, 7, connection="x")) == gateway  # no gateways: no trust


def test_core_flooder_gets_429_while_a_polite_clients_request_is_admitted_and_served_in_turn() -> None:
    h = Harness(workers=1, worker_pipeline=1, max_enqueued=4)
    try:
        for n in range(1, 6):
            h.request(b"flood", predict(n), [X])  # 1 runs, 4 queued: the whole queue
        h.request(b"polite", predict(100), [X])
        [(prefix, reply, _)] = h.replies()
        assert prefix == [b"flood"] and reply["id"] == 5 and reply["code"] == 429
        assert "--max-enqueued" in reply["message"] and "held the most" in reply["message"]
        h.request(b"flood", predict(6), [X])  # over its share: refused at once
        assert h.replies()[-1][0] == [b"flood"] and h.replies()[-1][1] == {
            "id": 6, "code": 429, "message": "server overloaded: 4 requests queued (--max-enqueued); retry later"}
        order = []
        for _ in range(4):
            rid = h.sent()[-1][1][0]
            order.append(h.sent()[-1][2])
            h.reply(b"w0", rid, {"id": 0, "code": 200, "message": ""})
        served = [_header_id(frame) for frame in order] + [_header_id(h.sent()[-1][2])]
        assert served == [1, 2, 100, 3, 4], "round robin: the polite request is the second taken from the queue"
        assert len(h.core.queue) == 0
    finally:
        h.close()


def test_core_gateway_connections_share_the_queue_like_clients() -> None:
    h = Harness(workers=1, worker_pipeline=1, max_enqueued=4)
    h.core.queue = FairQueue(4, PREFIX)
    gateway = gateway_routing_id(TOKEN, 7)
    try:
        for n in range(1, 6):
            h.request(gateway, predict(n, connection="ipv4:127.0.0.1:1111"), [X])
        h.request(gateway, predict(50, connection="ipv4:127.0.0.1:2222"), [X])  # another connection
        [(prefix, reply, _)] = h.replies()
        assert prefix == [gateway] and reply["id"] == 5 and reply["code"] == 429
        h.request(b"native", predict(60, connection="ipv4:127.0.0.1:3333"), [X])
        assert h.replies()[-1][1]["id"] == 4 and h.replies()[-1][1]["code"] == 429  # the busy connection's newest
        assert h.core.queue.clients == 3
    finally:
        h.close()


def _header_id(frame: bytes) -> int:
    import msgpack

    return msgpack.unpackb(frame, raw=False)["id"]
