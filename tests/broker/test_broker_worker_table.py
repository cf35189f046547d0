"""WorkerTable: the one owner of worker state. Fed directly, no sockets or processes."""
from __future__ import annotations

import pytest

from sgserve.broker.policies import DispatchRequest
from sgserve.broker.worker_table import WorkerState, WorkerTable
from sgserve.protocol import Envelope


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid


def request(n: int, sent_at: float = 0.0) -> DispatchRequest:
    return DispatchRequest(rid=n, envelope=Envelope([b"c"], False), header={"id": n},
                           payload=[], model="m", version=1, signature="serving_default", routing_key=None,
                           client_id=b"c", deadline=None, received_at=0.0, sent_at=sent_at)


def ready_table(size: int = 3, pipeline: int = 2) -> WorkerTable:
    table = WorkerTable(size, pipeline)
    for i in range(size):
        slot = table.add(i, [i])
        table.spawned(slot, FakeProcess(100 + i), now=0.0)
        table.mark_ready(slot, f"w{i}-{100 + i}".encode(), 100 + i, now=1.0)
    return table


def test_lifecycle_and_free_list() -> None:
    table = WorkerTable(2, pipeline=2)
    s0, s1 = table.add(0, [0]), table.add(1, [1])
    assert table.free() == ()
    table.spawned(s0, FakeProcess(10), now=0.0)
    table.spawned(s1, FakeProcess(11), now=0.0)
    assert s0.state is WorkerState.STARTING and s0.pid == 10
    assert not table.all_ready()
    table.mark_ready(s1, b"w1-11", 11, now=0.5)
    assert table.free() == (s1,)
    table.mark_ready(s0, b"w0-10", 10, now=0.6)
    assert table.free() == (s0, s1), "free list is sorted by index"
    assert table.all_ready()
    assert table.by_identity(b"w0-10") is s0


def test_busy_until_pipeline_full_then_idle() -> None:
    table = ready_table(2, pipeline=2)
    s0 = table.get(0)
    table.mark_busy(s0, request(1))
    assert s0 in table.free() and s0.load == 1
    table.mark_busy(s0, request(2))
    assert table.free() == (table.get(1),)
    with pytest.raises(ValueError, match="cannot take a request"):
        table.mark_busy(s0, request(3))
    assert 1 in s0.inflight and 2 in s0.inflight
    assert table.inflight_count() == 2
    done = table.mark_idle(1, b"w0-100", now=2.0)
    assert done is not None and done.header["id"] == 1
    assert s0.served == 1 and s0.last_progress == 2.0
    assert table.free() == (s0, table.get(1))


def test_reply_for_unknown_rid_or_wrong_worker_is_refused() -> None:
    table = ready_table(2)
    table.mark_busy(table.get(0), request(1))
    assert table.mark_idle(99, b"w0-100", now=1.0) is None
    assert table.mark_idle(1, b"w1-101", now=1.0) is None, "only the holder may answer"
    assert table.inflight_count() == 1


def test_mark_dead_returns_orphans_and_forgets_them() -> None:
    table = ready_table(2)
    s0 = table.get(0)
    table.mark_busy(s0, request(1))
    table.mark_busy(s0, request(2))
    orphans = table.mark_dead(s0)
    assert [r.header["id"] for r in orphans] == [1, 2]
    assert s0.state is WorkerState.DEAD and not s0.inflight
    assert not any(1 in s.inflight for s in table) and table.inflight_count() == 0
    assert table.by_identity(b"w0-100") is None
    assert table.free() == (table.get(1),)
    # a late reply from the dead worker is not ours any more
    assert table.mark_idle(1, b"w0-100", now=3.0) is None
    # and the slot can be respawned at the same index with the same cores
    table.spawned(s0, FakeProcess(200), now=4.0)
    assert s0.restarts == 1 and s0.cores == [0] and s0.state is WorkerState.STARTING


def test_respawn_requires_dead_slot() -> None:
    table = ready_table(1)
    with pytest.raises(ValueError, match="only a DEAD slot"):
        table.spawned(table.get(0), FakeProcess(5), now=0.0)


def test_expired_hung_and_overdue() -> None:
    table = ready_table(3)
    s0, s1, s2 = table.get(0), table.get(1), table.get(2)
    table.seen(s0, 10.0)
    table.seen(s1, 10.0)
    table.mark_busy(s2, request(1, sent_at=5.0))
    # s2 holds a request: never "expired" by silence, only hung by worker_timeout
    assert table.expired(now=10.5, silence=3.0) == []
    assert table.expired(now=14.0, silence=3.0) == [s0, s1]
    assert table.hung(now=10.0, timeout=6.0) == []
    assert table.hung(now=11.5, timeout=6.0) == [s2]
    # progress (a reply) restarts the hang clock for the next request held
    table.mark_busy(s2, request(2, sent_at=6.0))
    table.mark_idle(1, b"w2-102", now=11.0)
    assert table.hung(now=12.0, timeout=6.0) == []
    table.mark_dead(s1)
    table.spawned(s1, FakeProcess(300), now=20.0)
    assert table.overdue(now=25.0, boot_timeout=10.0) == []
    assert table.overdue(now=31.0, boot_timeout=10.0) == [s1]


def test_remove_and_bad_indexes() -> None:
    table = ready_table(2)
    with pytest.raises(ValueError):
        table.add(0, [0])
    with pytest.raises(ValueError):
        table.add(5, [0])
    removed = table.remove(1)
    assert removed.state is WorkerState.DEAD
    assert table.get(1) is None and len(table) == 1
    with pytest.raises(ValueError):
        WorkerTable(0, 1)


def test_model_versions_live_on_the_slot_and_change_through_the_table() -> None:
    table = WorkerTable(2, pipeline=2)
    s0, s1 = table.add(0, [0]), table.add(1, [1])
    table.spawning_with(s0, [("m", 1)])
    table.spawned(s0, FakeProcess(10), now=0.0)
    table.mark_ready(s0, b"w0-10", 10, now=1.0)
    assert s0.versions == {("m", 1)} and s0.booting == set(), "a worker maps what it was spawned with"
    table.spawned(s1, FakeProcess(11), now=0.0)
    table.mark_ready(s1, b"w1-11", 11, now=1.0)
    table.start_loading(s0, ("m", 2), now=5.0, out_of_rotation=True)
    assert s0.loading_version == ("m", 2) and s0.change_sent_at == 5.0
    assert table.free() == (s1,), "out of rotation while it loads"
    table.finish_loading(s0, loaded=True)
    assert s0.versions == {("m", 1), ("m", 2)} and s0.loading_version is None
    assert table.free() == (s0, s1)
    table.start_loading(s1, ("m", 2), now=6.0, out_of_rotation=False)
    assert table.free() == (s0, s1), "the only other worker keeps serving while it loads"
    table.finish_loading(s1, loaded=False)
    assert s1.versions == set()
    table.start_unloading(s0, ("m", 1), now=7.0, out_of_rotation=True)
    assert table.free() == (s1,)
    table.finish_unloading(s0, ("m", 1))
    assert s0.versions == {("m", 2)} and s0.unloading_version is None and table.free() == (s0, s1)
    table.forget_version(s0, ("m", 2))
    assert s0.versions == set()


def test_a_dead_worker_holds_no_versions() -> None:
    table = ready_table(1)
    s0 = table.get(0)
    table.start_loading(s0, ("m", 2), now=1.0, out_of_rotation=True)
    table.finish_loading(s0, loaded=True)
    table.start_unloading(s0, ("m", 2), now=2.0, out_of_rotation=False)
    table.spawning_with(s0, [("m", 3)])
    table.mark_dead(s0)
    assert (s0.versions, s0.booting, s0.loading_version, s0.unloading_version) == (set(), set(), None, None)
    assert not s0.loading
