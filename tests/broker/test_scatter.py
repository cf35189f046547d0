"""Scatter-gather over wire frames (sgserve/broker/scatter.py): split parts are requests a worker
takes exactly as a client's, and the merged reply is what the unsplit request would have answered.

The parts and replies are built with sgserve's own encoder (protocol.pack / encode_tensor) and read
back with the client's decoder (protocol.decode_tensors); the last tests run the parts through the
worker's real runtime (a real SavedModel in a real shared segment) and compare with the unsplit run.

Cost, measured on the 2-core dev machine (test_split_and_merge_cost prints it): split_request +
Gather.add + merge for a text_cnn-like request, int32 [1000, 64] in and float32 [1000, 2] out, takes
about 25 us in 2 parts and 70 us in 8 (median of 200), against a 30-70 ms model call at 1000 rows:
under 0.2% of it.
"""
from __future__ import annotations

import time
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from sgserve import protocol
from sgserve.broker.scatter import Gather, row_bounds, rows_of, split_request
from sgserve.errors import INTERNAL, NOT_FOUND, Internal, InvalidArgument


def request(tensors: dict[str, Any], frames: str = "bytes", **fields: Any) -> tuple[dict[str, Any], list[Any]]:
    """(decoded header, payload frames) of a predict request as the broker receives it."""
    msg = protocol.pack({"type": "predict", "id": [7, 1], "model": "m", **fields}, tensors)
    header = protocol.decode_header(msg[1])
    payload = [bytes(f) for f in msg[2:]]
    if frames == "zmq":
        payload = [zmq.Frame(p) for p in payload]
    elif frames == "memoryview":
        payload = [memoryview(p) for p in payload]
    return header, payload


def decoded(header: dict[str, Any], payload: list[Any], key: str = "inputs") -> dict[str, np.ndarray]:
    """What the client (and the worker's slow path) reads from a header and its frames."""
    header = protocol.decode_header(msgpack.packb(header, use_bin_type=True))  # as it travels
    return protocol.decode_tensors(header.get(key), payload, key)


def assert_parts_equal_slices(tensors: dict[str, np.ndarray], parts: list, bounds: list[int]) -> None:
    assert len(parts) == len(bounds) - 1
    for (h, p), a, b in zip(parts, bounds, bounds[1:]):
        got = decoded(h, p)
        assert list(got) == list(tensors)
        for name, arr in tensors.items():
            want = arr[a:b]
            assert got[name].shape == want.shape
            if arr.dtype == object:
                assert got[name].tolist() == [[protocol._to_bytes(x) for x in r] if isinstance(r, list)
                                              else protocol._to_bytes(r) for r in want.tolist()]
            else:
                np.testing.assert_array_equal(got[name], want)


def demo_tensors(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(n)
    return {"user_id": rng.integers(-10**12, 10**12, n).astype(np.int64),
            "item_id": rng.integers(0, 10**6, n).astype(np.int64)}


# -- rows_of ----------------------------------------------------------------------------------------
def test_rows_of_demo_and_2d() -> None:
    assert rows_of(*request(demo_tensors(5))) == 5
    assert rows_of(*request({"x": np.zeros((9, 4, 2), np.float32), "k": np.zeros((9,), np.bool_)})) == 9
    assert rows_of(*request({"s": np.array([[b"a"], [b"b"]], dtype=object)}, "zmq")) == 2
    assert rows_of(*request({"x": np.zeros((0, 3), np.float32)})) == 0


def test_rows_of_none_when_rows_disagree_or_not_splittable() -> None:
    assert rows_of(*request({"user_id": np.arange(3), "item_id": np.arange(4)})) is None
    assert rows_of(*request({"x": np.zeros((3, 2), np.float32), "t": np.float32(1.0)})) is None  # a scalar
    assert rows_of(*request({})) is None  # no inputs
    header, payload = request(demo_tensors(4))
    assert rows_of(header, payload[:1]) is None  # frame count differs: the worker words the 400
    assert rows_of(header, [payload[0], payload[1][:-1]]) is None  # a frame of the wrong size
    assert rows_of({**header, "inputs": "x"}, payload) is None
    with pytest.raises(InvalidArgument) as err:
        split_request(*request({"a": np.arange(3), "b": np.arange(4)}), 2)
    assert err.value.code == 400


def test_row_bounds_near_equal_and_in_order() -> None:
    assert row_bounds(1000, 3) == [0, 334, 667, 1000]
    assert row_bounds(10, 2) == [0, 5, 10]
    assert row_bounds(3, 8) == [0, 1, 2, 3]  # never an empty part
    assert row_bounds(0, 4) == [0, 0]
    with pytest.raises(ValueError):
        row_bounds(10, 0)


# -- split_request ----------------------------------------------------------------------------------
@pytest.mark.parametrize("frames", ["bytes", "zmq", "memoryview"])
def test_split_demo_int64_round_trip_zero_copy(frames: str) -> None:
    tensors = demo_tensors(10)
    header, payload = request(tensors, frames, timeout_ms=250, output_filter=["score"], routing_key=b"k")
    parts = split_request(header, payload, 3)
    assert_parts_equal_slices(tensors, parts, [0, 4, 7, 10])
    for h, p in parts:
        assert {k: v for k, v in h.items() if k != "inputs"} == {k: v for k, v in header.items() if k != "inputs"}
        for frame, original in zip(p, payload):
            assert isinstance(frame, memoryview)
            source = np.frombuffer(original.buffer if frames == "zmq" else original, np.uint8)
            assert np.shares_memory(np.frombuffer(frame, np.uint8), source)  # a slice, not a copy
    assert [h["inputs"][0]["shape"] for h, _ in parts] == [[4], [3], [3]]
    assert header["inputs"][0]["shape"] == [10]  # the client's header is left alone


def test_split_float32_2d_uneven_1000_into_3() -> None:
    x = np.arange(1000 * 6, dtype=np.float32).reshape(1000, 2, 3) / 7
    tensors = {"x": x, "mask": (np.arange(1000) % 3 == 0)}
    parts = split_request(*request(tensors), 3)
    assert [h["inputs"][0]["shape"] for h, _ in parts] == [[334, 2, 3], [333, 2, 3], [333, 2, 3]]
    assert [h["inputs"][1]["shape"] for h, _ in parts] == [[334], [333], [333]]
    assert_parts_equal_slices(tensors, parts, [0, 334, 667, 1000])


def test_split_strings_reencoded_per_part() -> None:
    city = np.array([[b"paris"], [b"tokyo"], [b""], [b"lima"], [b"oslo"]] * 7, dtype=object)
    tensors = {"city": city, "num": np.arange(35 * 3, dtype=np.float32).reshape(35, 3)}
    parts = split_request(*request(tensors, "zmq"), 4)
    assert [len(p[0]) and protocol._msgpack_array_len(p[0]) for _, p in parts] == [9, 9, 9, 8]
    assert_parts_equal_slices(tensors, parts, [0, 9, 18, 27, 35])


def test_split_strings_sent_as_str_elements() -> None:
    """The server takes str elements as their UTF-8 bytes; a part carries them as bin."""
    header, payload = request({"q": np.zeros((3, 2), np.int8)})
    header["inputs"] = [{"name": "q", "dtype": "string", "shape": [3, 2]}]
    payload = [msgpack.packb(["a", "bé", b"c", "", "e", b"f"], use_bin_type=True)]
    parts = split_request(header, payload, 2)
    got = [decoded(h, p)["q"].tolist() for h, p in parts]
    assert got == [[[b"a", "bé".encode()], [b"c", b""]], [[b"e", b"f"]]]
    assert protocol.decode_tensors(header["inputs"], payload)["q"].tolist() == got[0] + got[1]


def test_split_broken_string_body_is_a_400() -> None:
    header = {"type": "predict", "inputs": [{"name": "s", "dtype": "string", "shape": [2]}]}
    with pytest.raises(InvalidArgument, match="string payload is not a msgpack array"):
        split_request(header, [b"\x92\xc4\x05ab"], 2)


def test_split_one_part_is_the_request_itself() -> None:
    header, payload = request(demo_tensors(6))
    [(h, p)] = split_request(header, payload, 1)
    assert h is header and p == payload
    assert len(split_request(header, payload, 50)) == 6  # no empty parts
    [(h0, p0)] = split_request(*request({"x": np.zeros((0, 3), np.float32)}), 4)
    assert h0["inputs"][0]["shape"] == [0, 3] and bytes(p0[0]) == b""


def test_part_is_accepted_by_the_worker_call_plan() -> None:
    """The worker's fast path (CallPlan.bind_wire) takes every part, as the frames travel."""
    from sgserve.worker.call_plan import CallPlan, InputSpec

    inputs = [InputSpec("city", "city:0", "string", [-1, 1]), InputSpec("num", "num:0", "float32", [-1, 3])]
    plan = CallPlan("serving_default", inputs, ["out"], lambda outputs: (lambda *feeds: feeds))
    tensors = {"num": np.arange(21, dtype=np.float32).reshape(7, 3),
               "city": np.array([[b"x%d" % i] for i in range(7)], dtype=object)}
    for h, p in split_request(*request(tensors), 3):
        wire_header = protocol.decode_header(msgpack.packb(h, use_bin_type=True))
        feeds = plan.bind_wire(wire_header["inputs"], [zmq.Frame(bytes(f)) for f in p])
        assert feeds is not None
        rows = wire_header["inputs"][0]["shape"][0]
        assert feeds[0].shape == (rows, 1) and feeds[1].shape == (rows, 3)


# -- Gather -----------------------------------------------------------------------------------------
def worker_reply(outputs: dict[str, np.ndarray], worker: int, **extra: Any) -> tuple[dict[str, Any], list[Any]]:
    """A worker's 200 reply to one part, encoded as the worker encodes it (sorted by output name)."""
    header = protocol.ok_header([7, 1], model="m", version=3, worker=worker, **extra)
    msg = protocol.pack(header, dict(sorted(outputs.items())), key="outputs")
    return protocol.unpack_header([bytes(f) for f in msg])


def gathered(g: Gather) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The merged reply as a client reads it off the wire."""
    header, payload = protocol.unpack_header([bytes(f) for f in g.reply()])
    return header, (protocol.decode_tensors(header["outputs"], payload, "outputs") if "outputs" in header else {})


def test_gather_merges_numeric_and_string_outputs_in_part_order() -> None:
    n = 1000
    outputs = {"probs": np.random.default_rng(1).random((n, 2), np.float32),
               "ids": np.arange(n, dtype=np.int64) * -3,
               "label": np.array([b"pos" if i % 2 else b"n%d" % i for i in range(n)], dtype=object),
               "grid": np.arange(n * 4, dtype=np.uint16).reshape(n, 2, 2)}
    bounds = row_bounds(n, 3)
    g = Gather([7, 1], 3, rows=[b - a for a, b in zip(bounds, bounds[1:])])
    for i in (2, 0, 1):  # completion order is not part order
        assert not g.done and g.failed is None
        g.add(i, *worker_reply({k: v[bounds[i]:bounds[i + 1]] for k, v in outputs.items()}, worker=i + 4))
    assert g.done and g.pending() == []
    header, got = gathered(g)
    assert header["id"] == [7, 1] and header["code"] == 200 and header["message"] == ""
    assert (header["model"], header["version"], header["parts"]) == ("m", 3, 3)
    assert header["worker"] == 4 and header["workers"] == [4, 5, 6]
    assert [m["name"] for m in header["outputs"]] == sorted(outputs)
    assert {m["name"]: m["shape"] for m in header["outputs"]} == {k: list(v.shape) for k, v in outputs.items()}
    for name, want in outputs.items():
        if want.dtype == object:
            assert got[name].tolist() == want.tolist()
        else:
            assert got[name].dtype == want.dtype
            np.testing.assert_array_equal(got[name], want)


@pytest.mark.parametrize("rows", [[3, 4], [7, 9], [20000, 20000, 30000]])
def test_gather_string_array_headers_across_sizes(rows: list[int]) -> None:
    """fixarray, array16 and array32 headers: the merged frame is what msgpack would write."""
    total = sum(rows)
    words = np.array([b"w%d" % i for i in range(total)], dtype=object)
    g = Gather(1, len(rows))
    start = 0
    for i, r in enumerate(rows):
        g.add(i, *worker_reply({"w": words[start:start + r]}, worker=i))
        start += r
    header, payload = g.merge()
    assert bytes(payload[0]) == protocol.encode_tensor("w", words)[1]
    assert header["outputs"] == [{"name": "w", "dtype": "string", "shape": [total]}]


def test_gather_batch_size_and_no_outputs() -> None:
    g = Gather("a", 2)
    g.add(0, *worker_reply({"y": np.zeros(2, np.float32)}, 0, batch_size=8))
    g.add(1, *worker_reply({"y": np.zeros(3, np.float32)}, 1, batch_size=32))
    assert g.merge()[0]["batch_size"] == 32
    empty = Gather("b", 2)
    empty.add(0, *worker_reply({}, 0))
    empty.add(1, *worker_reply({}, 1))
    header, got = gathered(empty)
    assert header["code"] == 200 and "outputs" not in header and got == {} and header["parts"] == 2


def test_gather_failed_part_answers_its_code() -> None:
    g = Gather([7, 1], 3)
    g.add(1, *worker_reply({"y": np.ones(2, np.float32)}, 1))
    failure = protocol.error_reply([7, 1], NOT_FOUND, "version 3 of model 'm' is UNLOADING",
                                   model="m", version=3, worker=0)
    g.add(0, *protocol.unpack_header(failure))
    assert g.failed == (NOT_FOUND, "version 3 of model 'm' is UNLOADING")
    assert not g.done and g.pending() == [2]
    late = protocol.error_reply([7, 1], INTERNAL, "later", worker=2)
    g.add(2, *protocol.unpack_header(late))
    assert g.failed[0] == NOT_FOUND  # the first failure counts
    frames = g.reply()
    assert len(frames) == 2  # error replies carry no payload
    header = protocol.decode_header(frames[1])
    assert header == {"id": [7, 1], "code": 404, "message": "version 3 of model 'm' is UNLOADING",
                      "model": "m", "version": 3, "worker": 0, "parts": 3}
    with pytest.raises(RuntimeError):
        g.merge()


def test_gather_counts_a_part_once() -> None:
    g = Gather(1, 2)
    g.add(0, *worker_reply({"y": np.array([1.0], np.float32)}, 0))
    g.add(0, *worker_reply({"y": np.array([9.0, 9.0], np.float32)}, 1))  # a duplicate: dropped
    assert not g.done and g.pending() == [1]
    with pytest.raises(RuntimeError):
        g.merge()
    g.add(1, *worker_reply({"y": np.array([2.0], np.float32)}, 1))
    np.testing.assert_array_equal(gathered(g)[1]["y"], [1.0, 2.0])
    with pytest.raises(IndexError):
        g.add(2, {"code": 200}, [])


MISMATCHES = [
    ({"y": np.zeros((2, 3), np.float32)}, {"z": np.zeros((2, 3), np.float32)}, "returned outputs"),
    ({"y": np.zeros((2, 3), np.float32)}, {"y": np.zeros((2, 3), np.float64)}, "has dtype float64"),
    ({"y": np.zeros((2, 3), np.float32)}, {"y": np.zeros((2, 4), np.float32)}, "has shape [2, 4]"),
    ({"y": np.zeros((2, 3), np.float32)}, {"y": np.zeros((2,), np.float32)}, "has shape [2]"),
    ({"n": np.int32(2)}, {"n": np.int32(2)}, "is a scalar"),
    ({"s": np.array([b"a"], dtype=object)}, {"s": np.array([1], np.int64)}, "has dtype int64"),
]


@pytest.mark.parametrize("first,second,words", MISMATCHES)
def test_gather_mismatched_parts_are_a_500(first: dict, second: dict, words: str) -> None:
    g = Gather([7, 1], 2)
    g.add(0, *worker_reply(first, 0))
    g.add(1, *worker_reply(second, 1))
    with pytest.raises(Internal) as err:
        g.merge()
    assert err.value.code == 500 and words in err.value.message
    assert "parts of a split request must agree" in err.value.message
    header = protocol.decode_header(g.reply()[1])
    assert (header["code"], header["id"], header["parts"]) == (500, [7, 1], 2)
    assert words in header["message"] and len(g.reply()) == 2


def test_gather_output_without_batch_dimension_is_a_500() -> None:
    g = Gather(1, 2, rows=[5, 5])
    g.add(0, *worker_reply({"w": np.zeros((2, 3), np.float32)}, 0))  # a weight table, not rows
    g.add(1, *worker_reply({"w": np.zeros((2, 3), np.float32)}, 1))
    with pytest.raises(Internal, match="has 2 rows for the part's 5 input rows"):
        g.merge()
    other = Gather(1, 2)
    other.add(0, *worker_reply({"y": np.zeros(2, np.float32)}, 0))
    header, payload = worker_reply({"y": np.zeros(2, np.float32)}, 1)
    other.add(1, {**header, "version": 4}, payload)  # a part that ran another version
    with pytest.raises(Internal, match="part 1 ran version 4"):
        other.merge()


# -- cost ---------------------------------------------------------------------------------------------
def test_split_and_merge_cost() -> None:
    """split_request + Gather for a text_cnn-like 1000-row request: microseconds, not milliseconds."""
    tokens = np.random.default_rng(0).integers(0, 20000, (1000, 64)).astype(np.int32)
    header, payload = request({"tokens": tokens}, "zmq")
    probs = np.random.default_rng(1).random((1000, 2), np.float32)
    for parts in (2, 8):
        bounds = row_bounds(1000, parts)
        replies = [worker_reply({"probs": probs[a:b]}, i) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
        times = []
        for _ in range(200):
            t0 = time.perf_counter()
            split = split_request(header, payload, parts)
            g = Gather(header["id"], len(split))
            for i, reply in enumerate(replies):
                g.add(i, *reply)
            merged, frames = g.merge()
            times.append(time.perf_counter() - t0)
        median_us = sorted(times)[len(times) // 2] * 1e6
        print(f"split_request + merge, int32[1000, 64] -> float32[1000, 2], {parts} parts: {median_us:.0f} us")
        np.testing.assert_array_equal(protocol.decode_tensors(merged["outputs"], frames, "outputs")["probs"], probs)
        assert median_us < 2000, f"{median_us:.0f} us for {parts} parts"  # vs a 30-70 ms model call


# -- through the worker's real runtime ----------------------------------------------------------------
@pytest.fixture(scope="module")
def runtime_of(tmp_path_factory: pytest.TempPathFactory):
    """name -> the worker's ModelRuntime over a segment the real loader wrote: "demo" (the built-in
    model with smaller tables) and "keras" (string and float features); segments unlinked at teardown."""
    import os

    from sgserve.models import demo, loader, shared_segment
    from sgserve.worker.runtime import ModelRuntime
    from tests import model_builders

    made: dict[str, tuple[str, Any]] = {}

    def get(name: str) -> Any:
        if name not in made:
            base = str(tmp_path_factory.mktemp(name) / name)
            if name == "demo":
                demo.build_demo_model(os.path.join(base, "1"), users=1000, items=1000)
            else:
                model_builders.build_keras_strings(base)
            spec = loader.load_version(name, base, 1, shared_segment.server_id())
            made[name] = (spec.segment, None)
            made[name] = (spec.segment, ModelRuntime(spec.segment))
        return made[name][1]

    yield get
    for segment, rt in made.values():
        if rt is not None:
            rt.close()
        shared_segment.unlink(segment)


def split_run_merge(runner: Any, tensors: dict[str, np.ndarray], parts: int) -> tuple[dict, dict, dict]:
    """(merged reply header, merged outputs, unsplit outputs): the parts run through the worker's
    own wire path and reply encoder, the merged reply read with the client's decoder."""
    from sgserve.worker import replies

    header, payload = request(tensors, "zmq")
    split = split_request(header, payload, parts)
    g = Gather(header["id"], len(split), rows=[h["inputs"][0]["shape"][0] for h, _ in split])
    for i, (h, p) in reversed(list(enumerate(split))):
        wire_header = protocol.decode_header(msgpack.packb(h, use_bin_type=True))
        arrays = runner.validate_wire(wire_header["inputs"], p)  # the worker's checks, over the part
        rows = slice(*row_bounds(rows_of(header, payload), parts)[i:i + 2])
        for name, arr in tensors.items():
            assert arrays[name].tolist() == arr[rows].tolist()
        outputs = runner.run_wire(wire_header["inputs"], p, wire_header.get("output_filter"))
        g.add(i, *protocol.unpack_header([protocol.MAGIC, *replies.succeeded(i + 1, h["id"], outputs, "m", 1, worker=i)[1:]]))
    merged_header, merged = gathered(g)
    whole = runner.run_wire(header["inputs"], payload, header.get("output_filter"))
    return merged_header, merged, whole


@pytest.mark.parametrize("rows,parts", [(1000, 3), (7, 2), (64, 8)])
def test_demo_model_split_equals_unsplit(runtime_of: Any, rows: int, parts: int) -> None:
    runner = runtime_of("demo").signatures["serving_default"]
    header, merged, whole = split_run_merge(runner, demo_tensors(rows), parts)
    assert header["code"] == 200 and header["parts"] == parts and header["workers"] == list(range(parts))
    assert sorted(merged) == ["logit", "score"]
    for name in merged:
        assert merged[name].shape == whole[name].shape == (rows,)
        np.testing.assert_allclose(merged[name], whole[name], rtol=1e-5, atol=1e-6)


def test_keras_string_features_split_equals_unsplit(runtime_of: Any) -> None:
    runner = runtime_of("keras").signatures["serving_default"]
    rng = np.random.default_rng(5)
    cities = np.array([b"paris", b"tokyo", b"lima", b"oslo", b"rome", b""], dtype=object)
    tensors = {"city": cities[rng.integers(0, 6, 301)].reshape(301, 1),
               "num": rng.normal(size=(301, 3)).astype(np.float32)}
    header, merged, whole = split_run_merge(runner, tensors, 4)
    assert header["code"] == 200 and header["parts"] == 4
    assert list(merged) == list(whole) and len(merged) == 1
    for name in merged:
        assert merged[name].shape == whole[name].shape == (301, 2)
        np.testing.assert_allclose(merged[name], whole[name], rtol=1e-5, atol=1e-6)
