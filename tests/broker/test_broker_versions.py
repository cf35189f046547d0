"""Version resolution, pin/unpin and status through a real broker with fixed versions, and the rollout
coordinator fed worker events directly."""
from __future__ import annotations

import dataclasses

import msgpack
from broker_helpers import demo_models, fixed_manager, predict_header, recv, send, test_config

from sgserve.broker.rollout import Rollout
from sgserve.broker.worker_table import WorkerTable
from sgserve.models.tfs_config import parse_version_policy
from sgserve.protocol import W_LOAD, W_UNLOAD


def call(sock, header):
    send(sock, header)
    return recv(sock)[0]


def served_version(sock, rid, **extra) -> int:
    header, frames = predict_header(rid, **extra)
    send(sock, header, frames)
    reply, _ = recv(sock)
    assert reply["code"] == 200, reply
    return reply["version"]


def test_pin_unpin_and_labels_free_requests(start_broker) -> None:
    server = start_broker(workers=2, policy="rr")
    sock = server.socket()
    assert served_version(sock, 1) == 2  # the newest by default
    reply = call(sock, {"type": "pin", "id": 2, "model": "demo", "version": 1})
    assert reply["code"] == 200 and reply["pinned"] == 1 and reply["serving_version"] == 1
    assert reply["pinned_state"] == "AVAILABLE"
    assert [served_version(sock, i) for i in range(3, 7)] == [1, 1, 1, 1]
    assert served_version(sock, 7, version=2) == 2  # an explicit version still goes where it says
    st = call(sock, {"type": "status", "id": 8})
    demo = next(m for m in st["model_status"] if m["name"] == "demo")
    assert demo["pinned"] == 1 and demo["serving_version"] == 1
    assert {v["version"]: (v["state"], v["serving"]) for v in demo["versions"]} == \
        {1: ("AVAILABLE", True), 2: ("AVAILABLE", False)}
    reply = call(sock, {"type": "unpin", "id": 9, "model": "demo"})
    assert reply["code"] == 200 and reply["pinned"] is None and reply["serving_version"] == 2
    assert served_version(sock, 10) == 2


def test_pin_and_label_errors(start_broker) -> None:
    server = start_broker(workers=1)
    sock = server.socket()
    reply = call(sock, {"type": "pin", "id": 1, "model": "demo", "version": 9})
    assert reply["code"] == 404 and "no version 9" in reply["message"]
    reply = call(sock, {"type": "pin", "id": 2, "model": "nope", "version": 1})
    assert reply["code"] == 404 and "available models: demo, other" in reply["message"]
    reply = call(sock, {"type": "pin", "id": 3, "model": "demo", "version": "one"})
    assert reply["code"] == 400 and "'version' must be a version number" in reply["message"]
    header, frames = predict_header(4, version_label="stable")
    send(sock, header, frames)
    reply, _ = recv(sock)
    assert reply["code"] == 404 and "no version label 'stable'" in reply["message"]
    header, frames = predict_header(5, version=1, version_label="stable")
    send(sock, header, frames)
    reply, _ = recv(sock)
    assert reply["code"] == 400 and "not both" in reply["message"]


def test_rollout_loads_one_worker_at_a_time_then_switches_and_unloads(tmp_path) -> None:
    """The rollout coordinator fed worker events directly: a real WorkerTable and ModelManager, frames recorded."""

    config = test_config(workers=2)
    v1 = demo_models()[0]
    manager = fixed_manager(config, str(tmp_path), [v1])
    table = WorkerTable(2, config.worker_pipeline)
    sent: list[tuple[bytes, bytes, dict]] = []
    requests = {("demo", 1): 1}
    rollout = Rollout(config, table, manager, send=lambda ident, frames: sent.append(
        (ident, frames[0], msgpack.unpackb(frames[1], raw=False))) or True,
        requests_for=lambda m, v: requests.get((m, v), 0))
    for i in range(2):
        slot = table.add(i, [i])
        assert rollout.specs_for_spawn(i) == [v1]
        table.spawned(slot, type("P", (), {"pid": 10 + i})(), now=0.0)
        table.mark_ready(slot, f"w{i}".encode(), 10 + i, now=0.0)
        rollout.on_worker_ready(slot, {"warmup": [["demo", 1, {"requests": 1}]]})
    assert sent == [] and manager.status(rollout.holders)[0]["versions"][0]["workers"] == [0, 1]
    # Version 2 appears and its segment is written (what the loader service would do); the model
    # now serves only its latest version.
    (tmp_path / "demo" / "2").mkdir()
    latest = dataclasses.replace(manager.models["demo"].config, version_policy=parse_version_policy("latest"))
    manager.versions.configure(latest)
    manager.versions.disk_scanned("demo", [1, 2])
    manager.versions.reconcile("demo", 1.0)
    v2 = dataclasses.replace(demo_models()[1], base_path=v1.base_path)
    assert manager.versions.segment_written(("demo", 2), v2)
    rollout.advance(2.0)
    assert [(i, cmd, f["version"]) for i, cmd, f in sent] == [(b"w0", W_LOAD, 2)]
    assert [s.index for s in table.free()] == [1], "worker 0 left the rotation to load"
    rollout.on_loaded(table.get(0), {"model": "demo", "version": 2, "ok": True})
    assert [(i, cmd) for i, cmd, _ in sent[1:]] == [(b"w1", W_LOAD)]
    assert manager.state(("demo", 2)).value == "LOADING"
    rollout.on_loaded(table.get(1), {"model": "demo", "version": 2, "ok": True})
    assert manager.state(("demo", 2)).value == "AVAILABLE" and manager.models["demo"].default == 2
    assert manager.state(("demo", 1)).value == "UNLOADING"
    assert len(sent) == 2, "version 1 still has a request in flight"
    requests.clear()
    rollout.advance(3.0)
    assert [(i, cmd, f) for i, cmd, f in sent[2:]] == [(b"w0", W_UNLOAD, {"model": "demo", "version": 1})]
    rollout.on_unloaded(table.get(0), {"model": "demo", "version": 1})
    assert [(i, cmd) for i, cmd, _ in sent[3:]] == [(b"w1", W_UNLOAD)]
    rollout.on_unloaded(table.get(1), {"model": "demo", "version": 1})
    assert manager.state(("demo", 1)).value == "END"
    assert [s.index for s in table.free()] == [0, 1]
    manager.close()


def test_rollout_fails_a_version_a_worker_cannot_load_in_time(tmp_path) -> None:

    config = test_config(workers=1, boot_timeout=5.0)
    v1 = demo_models()[0]
    manager = fixed_manager(config, str(tmp_path), [v1])
    table = WorkerTable(1, config.worker_pipeline)
    rollout = Rollout(config, table, manager, send=lambda ident, frames: True, requests_for=lambda m, v: 0)
    slot = table.add(0, [0])
    rollout.specs_for_spawn(0)
    table.spawned(slot, type("P", (), {"pid": 10})(), now=0.0)
    table.mark_ready(slot, b"w0", 10, now=0.0)
    (tmp_path / "demo" / "2").mkdir()
    manager.versions.disk_scanned("demo", [1, 2])
    manager.versions.reconcile("demo", 0.0)
    manager.versions.segment_written(("demo", 2), dataclasses.replace(demo_models()[1], base_path=v1.base_path))
    rollout.advance(1.0)
    assert slot.loading_version == ("demo", 2) and table.free() == (slot,), "the only worker keeps serving"
    rollout.advance(1.0 + 5.1)
    mv = manager.versions.get(("demo", 2))
    assert mv.state.value == "FAILED" and "did not finish loading it within 5 s (--boot-timeout)" in mv.error
    assert slot.loading_version is None and manager.models["demo"].default == 1
    manager.close()
