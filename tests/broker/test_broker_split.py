"""Scatter-gather in the routing core, fed frames: a big predict request runs as parts on the idle
workers and is answered exactly once (the merge, or the first part's error)."""
from __future__ import annotations

import time
from typing import Any

import msgpack
import numpy as np
import pytest

from sgserve.protocol import decode_tensors
from tests.broker.test_broker_core import Harness, harness  # noqa: F401 - the fixture


def big(rid: Any, rows: int, **extra: Any) -> tuple[dict[str, Any], list[bytes]]:
    header = {"type": "predict", "id": rid, "model": "demo",
              "inputs": [{"name": "x", "dtype": "float32", "shape": [rows]}]}
    header.update(extra)
    return header, [np.arange(rows, dtype=np.float32).tobytes()]


def echo_reply(h: Harness, worker: bytes, rid: int, header_frame: bytes, payload: list[bytes],
               scale: float = 2.0) -> None:
    """What a worker running y = scale * x answers to the part it was sent."""
    header = msgpack.unpackb(header_frame, raw=False)
    x = np.frombuffer(payload[0], dtype=np.float32) * scale
    h.reply(worker, rid, {"id": header["id"], "code": 200, "message": "", "model": "demo", "version": 2,
                          "worker": int(worker[1:]),
                          "outputs": [{"name": "x", "dtype": "float32", "shape": [len(x)]}]}, [x.tobytes()])


def outputs(reply: tuple[list[bytes], dict[str, Any], list[bytes]]) -> dict[str, np.ndarray]:
    _, header, payload = reply
    return decode_tensors(header["outputs"], payload)


def test_a_big_request_runs_in_parts_on_the_idle_workers_and_is_merged_in_order(harness) -> None:
    h = harness(workers=2, split_min_rows=4)
    header, payload = big(1, 9)
    h.request(b"c", header, payload)
    sent = h.sent()
    assert [s[0] for s in sent] == [b"w0", b"w1"], "one part per idle worker"
    rows = [msgpack.unpackb(s[2], raw=False)["inputs"][0]["shape"][0] for s in sent]
    assert sorted(rows) == [4, 5] and sum(rows) == 9
    assert h.replies() == [], "no answer before every part has replied"
    for worker, route, header_frame, part_payload in reversed(sent):  # answered out of order
        echo_reply(h, worker, route[0], header_frame, part_payload)
    [reply] = h.replies()
    assert reply[1]["code"] == 200 and reply[1]["parts"] == 2
    np.testing.assert_array_equal(outputs(reply)["x"], np.arange(9, dtype=np.float32) * 2)
    assert h.core.split_requests == 1 and h.core.split_parts == 2


def test_small_requests_busy_workers_and_split_off_are_not_split(harness) -> None:
    off = harness(workers=2, split_min_rows=0)
    off.request(b"c", *big(1, 1000))
    assert len(off.sent()) == 1, "split_min_rows 0: never split"
    h = harness(workers=2, split_min_rows=8)
    h.request(b"c", *big(1, 7))
    assert len(h.sent()) == 1, "under split_min_rows"
    h.request(b"c", *big(2, 100))
    assert len(h.sent()) == 2, "one worker busy: only one is idle, the request runs whole"


def test_mod_keeps_a_routing_keys_stickiness(harness) -> None:
    h = harness(workers=2, policy="mod", split_min_rows=4)
    h.request(b"c", *big(1, 100, routing_key=5))
    assert len(h.sent()) == 1
    h.request(b"c", *big(2, 100))  # no key: may be split (one worker is busy now, so it is not)
    assert len(h.sent()) == 2


def test_the_first_failing_part_is_the_answer_and_later_replies_are_dropped(harness) -> None:
    h = harness(workers=2, split_min_rows=4)
    h.request(b"c", *big(7, 10))
    (w0, r0, f0, p0), (w1, r1, f1, p1) = h.sent()
    h.reply(w1, r1[0], {"id": 7, "code": 400, "message": "bad part", "worker": 1})
    echo_reply(h, w0, r0[0], f0, p0)
    [reply] = h.replies()
    assert reply[1]["code"] == 400 and reply[1]["message"] == "bad part" and reply[1]["parts"] == 2


def test_a_part_whose_worker_dies_is_retried_and_the_request_answered_once(harness) -> None:
    h = harness(workers=2, split_min_rows=4)
    h.request(b"c", *big(3, 8))
    (w0, r0, f0, p0), (w1, r1, f1, p1) = h.sent()
    echo_reply(h, w0, r0[0], f0, p0)
    h.core.worker_lost(h.table.get(1), "test: killed")
    retried = h.sent()[2:]
    assert [(s[0], s[1][3]) for s in retried] == [(b"w0", 1)], "the part is retried on the other worker"
    assert retried[0][2] == f1 and retried[0][3] == p1, "the same part, rows unchanged"
    echo_reply(h, b"w0", retried[0][1][0], retried[0][2], retried[0][3])
    [reply] = h.replies()
    assert reply[1]["code"] == 200 and reply[1]["parts"] == 2
    np.testing.assert_array_equal(outputs(reply)["x"], np.arange(8, dtype=np.float32) * 2)


def test_a_retried_part_that_cannot_run_before_the_deadline_is_one_503_and_late_parts_are_dropped(harness) -> None:
    h = harness(workers=2, split_min_rows=4, worker_pipeline=1)
    h.request(b"c", *big(4, 8, timeout_ms=30))
    (w0, r0, f0, p0), (w1, r1, f1, p1) = h.sent()
    h.core.worker_lost(h.table.get(1), "test: killed")  # its part waits for a free worker
    time.sleep(0.05)  # holds time on purpose: the core reads the wall clock for the 30 ms deadline
    h.core.tick(time.monotonic(), silence=60.0, worker_timeout=60.0)
    echo_reply(h, w0, r0[0], f0, p0)  # the other part answers late: dropped
    assert [r[1]["code"] for r in h.replies()] == [503]
    assert "worker 1 died while serving the request" in h.replies()[0][1]["message"]
    assert h.replies()[0][1]["parts"] == 2


def test_a_part_past_its_deadline_in_the_worker_is_the_504_answer(harness) -> None:
    h = harness(workers=2, split_min_rows=4)
    h.request(b"c", *big(5, 8, timeout_ms=10_000))
    (w0, r0, f0, p0), (w1, r1, f1, p1) = h.sent()
    assert r0[2] == r1[2] is not None, "every part carries the request's deadline"
    h.reply(w0, r0[0], {"id": 5, "code": 504, "message": "deadline exceeded before the request could run"})
    echo_reply(h, w1, r1[0], f1, p1)
    assert [r[1]["code"] for r in h.replies()] == [504]


@pytest.mark.parametrize("parts", [2, 3])
def test_split_max_parts_caps_the_parts(harness, parts: int) -> None:
    h = harness(workers=3, split_min_rows=4, split_max_parts=parts)
    h.request(b"c", *big(1, 30))
    assert len(h.sent()) == parts


def test_a_signature_that_failed_the_load_time_check_is_never_split(harness) -> None:
    h = harness(workers=2, split_min_rows=4, split_refused="output 'x' split in 2 parts differs")
    h.request(b"c", *big(1, 100))
    h.request(b"c", *big(2, 100))
    assert [s[0] for s in h.sent()] == [b"w0", b"w1"], "two whole requests, one per worker"
    assert all(msgpack.unpackb(s[2], raw=False)["inputs"][0]["shape"] == [100] for s in h.sent())


@pytest.mark.parametrize("rule, split", [("all", True), ("demo", True), ("other,x", False), ("-demo", False),
                                         ("-other", True)])
def test_split_models_opts_models_in_or_out(harness, rule: str, split: bool) -> None:
    h = harness(workers=2, split_min_rows=4, split_models=rule)
    h.request(b"c", *big(1, 100))
    assert len(h.sent()) == (2 if split else 1)


def test_split_models_cannot_mix_names_and_exclusions() -> None:
    from sgserve.broker.core import split_models_rule
    with pytest.raises(ValueError, match="not both"):
        split_models_rule("a,-b")


def test_the_default_splits_from_64_rows_in_parts_of_at_least_32(harness) -> None:
    h = harness(workers=4)
    h.request(b"c", *big(1, 63))
    assert len(h.sent()) == 1
    h = harness(workers=4)
    h.request(b"c", *big(1, 100))
    assert len(h.sent()) == 3, "100 rows, parts of at least 32: 3 parts though 4 workers are idle"
