"""What docs/protocol.md promises a client author on points a client written from it had to guess,
checked with raw ZeroMQ sockets and hand-made msgpack against a real server."""
from __future__ import annotations

import time
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from sgserve.errors import INTERNAL

MAGIC = b"SGS1"
IDS = np.array([1, 2], "<i8").tobytes()
INPUTS = [{"name": "user_id", "dtype": "int64", "shape": [2]}, {"name": "item_id", "dtype": "int64", "shape": [2]}]


def ask(endpoint: str, header: Any, *payload: bytes, raw: bytes | None = None) -> tuple[dict[str, Any], int]:
    """Sends one request from a fresh DEALER; returns (reply header, number of reply payload frames)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(endpoint)
        sock.send_multipart([MAGIC, raw if raw is not None else msgpack.packb(header, use_bin_type=True), *payload])
        assert sock.poll(15_000), "no reply within 15 s"
        frames = sock.recv_multipart()
    finally:
        sock.close()
    assert frames[0] == MAGIC
    return msgpack.unpackb(frames[1], raw=False, strict_map_key=False), len(frames) - 2


def predict(rid: int, **fields: Any) -> dict[str, Any]:
    return {"type": "predict", "id": rid, "model": "demo", "inputs": INPUTS, **fields}


def assert_ok(reply: tuple[dict[str, Any], int], rid: int) -> None:
    header, frames = reply
    assert (header["id"], header["code"], header["message"], frames) == (rid, 200, "", 2), header
    assert [o["name"] for o in header["outputs"]] == ["logit", "score"]


# --------------------------------------------------------------------------- section 2: frames and keys
@pytest.mark.parametrize("header", [
    {"type": "ping", "id": 1},
    {"type": "status", "id": 1},
    {"type": "metadata", "id": 1, "model": "demo"},
    {"type": "pin", "id": 1, "model": "demo", "version": 1},
    {"type": "unpin", "id": 1, "model": "demo"},
], ids=lambda h: h["type"])
def test_payload_frames_on_a_request_without_tensors_are_ignored(demo_server, header):
    with_junk = ask(demo_server.endpoint, header, b"junk", b"\x00" * 8)
    without = ask(demo_server.endpoint, header)
    assert with_junk[0]["code"] == without[0]["code"] == 200
    assert with_junk[1] == without[1] == 0
    assert with_junk[0].keys() == without[0].keys()


def test_a_predict_without_inputs_but_with_payload_frames_is_a_400(demo_server):
    for rid, inputs in ((1, None), (2, [])):
        header = {"type": "predict", "id": rid, "model": "demo"}
        if inputs is not None:
            header["inputs"] = inputs
        reply, frames = ask(demo_server.endpoint, header, IDS)
        assert (reply["id"], reply["code"], frames) == (rid, 400, 0)
        assert reply["message"] == "header lists 0 inputs but the message carries 1 payload frames"


def test_non_string_keys_are_ignored_like_unknown_keys(demo_server):
    header = predict(1, **{"extra": 1})
    header.update({7: "x", 1.5: "y", None: "z", True: "t"})
    entry = {**INPUTS[0], 3: "x", None: 1}
    assert_ok(ask(demo_server.endpoint, header, IDS, IDS), 1)
    assert_ok(ask(demo_server.endpoint, predict(2, inputs=[entry, INPUTS[1]]), IDS, IDS), 2)


def test_a_bin_key_is_not_the_str_key(demo_server):
    reply, _ = ask(demo_server.endpoint, None, raw=msgpack.packb({b"type": "ping", "id": 3}, use_bin_type=True))
    assert (reply["id"], reply["code"]) == (3, 400)
    assert reply["message"].startswith("request has no 'type'; expected one of ")


@pytest.mark.parametrize("key", [b"\x91\x01", b"\x81\x01\x02"], ids=["array key", "map key"])
def test_an_array_or_map_key_makes_the_header_undecodable(demo_server, key):
    raw = b"\x82" + msgpack.packb("type") + msgpack.packb("ping") + key + msgpack.packb(1)
    reply, _ = ask(demo_server.endpoint, None, raw=raw)
    assert (reply["id"], reply["code"]) == (None, 400)
    assert reply["message"] == "header frame is not valid msgpack (TypeError)"


def test_a_key_given_twice_takes_the_last_value(demo_server):
    raw = (b"\x83" + msgpack.packb("type") + msgpack.packb("status") + msgpack.packb("id") + msgpack.packb(4)
           + msgpack.packb("type") + msgpack.packb("ping"))
    reply, _ = ask(demo_server.endpoint, None, raw=raw)
    assert reply == {"id": 4, "code": 200, "message": "pong"}


def test_a_client_sent_deadline_or_attempt_changes_nothing(demo_server):
    past = time.time() - 3600
    assert_ok(ask(demo_server.endpoint, predict(5, deadline=past, attempt=1), IDS, IDS), 5)
    assert_ok(ask(demo_server.endpoint, predict(6, deadline="soon", attempt="x"), IDS, IDS), 6)


# --------------------------------------------------------------------------- sections 4 and 6: versions
def test_version_label_nil_is_the_same_as_no_label(demo_server):
    assert_ok(ask(demo_server.endpoint, predict(7, version_label=None), IDS, IDS), 7)
    assert_ok(ask(demo_server.endpoint, predict(8, version=None, version_label=None), IDS, IDS), 8)


@pytest.mark.parametrize("rtype", ["predict", "metadata"])
def test_version_and_version_label_together_is_a_400(demo_server, rtype):
    header = {"type": rtype, "id": 9, "model": "demo", "version": 1, "version_label": "stable"}
    payload = []
    if rtype == "predict":
        header["inputs"], payload = INPUTS, [IDS, IDS]
    reply, frames = ask(demo_server.endpoint, header, *payload)
    assert reply == {"id": 9, "code": 400, "message": "give 'version' or 'version_label', not both"}
    assert frames == 0


def test_a_version_label_that_is_not_a_string_is_a_400(demo_server):
    reply, _ = ask(demo_server.endpoint, predict(10, version_label=3), IDS, IDS)
    assert reply == {"id": 10, "code": 400, "message": "'version_label' must be a string, got 3"}


def test_pin_and_unpin_answer_an_empty_message(demo_server):
    pin, frames = ask(demo_server.endpoint, {"type": "pin", "id": 11, "model": "demo", "version": 1})
    assert frames == 0
    assert pin == {"id": 11, "code": 200, "message": "", "model": "demo", "pinned": 1, "pinned_state": "AVAILABLE",
                   "serving_version": 1}
    unpin, _ = ask(demo_server.endpoint, {"type": "unpin", "id": 12, "model": "demo"})
    assert unpin == {"id": 12, "code": 200, "message": "", "model": "demo", "pinned": None, "pinned_state": None,
                     "serving_version": 1}


# --------------------------------------------------------------------------- sections 6 and 7: messages
def test_timeout_ms_zero_is_a_504_whose_message_says_reached_the_server(demo_server):
    reply, frames = ask(demo_server.endpoint, predict(13, timeout_ms=0), IDS, IDS)
    assert frames == 0
    assert reply == {"id": 13, "code": 504,
                     "message": "deadline exceeded before the request reached the server (timeout_ms=0)"}


def test_a_shape_error_writes_a_dimension_of_any_size_as_a_question_mark(demo_server):
    meta, _ = ask(demo_server.endpoint, {"type": "metadata", "id": 14, "model": "demo"})
    assert meta["signatures"]["serving_default"]["inputs"]["user_id"]["shape"] == [-1]
    wrong = [{**INPUTS[0], "shape": [1, 2]}, INPUTS[1]]
    reply, _ = ask(demo_server.endpoint, predict(15, inputs=wrong), IDS, IDS)
    assert (reply["code"], reply["message"]) == (400, "input 'user_id': expected shape [?], got [1, 2]")


# --------------------------------------------------------------------------- section 3: outputs the wire cannot carry
@pytest.fixture(scope="module")
def complex_model(tmp_path_factory) -> str:
    """A SavedModel whose signature returns y = 2x (float32) and z = x + xi (complex64)."""
    tf = pytest.importorskip("tensorflow")

    class WithComplexOutput(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
        def serve(self, x):
            return {"y": x * 2.0, "z": tf.complex(x, x)}

    base = tmp_path_factory.mktemp("complex") / "cplx"
    module = WithComplexOutput()
    tf.saved_model.save(module, str(base / "1"), signatures={"serving_default": module.serve})
    return str(base)


def test_an_output_the_wire_cannot_carry_is_a_500_from_the_worker(start_server, complex_model):
    server = start_server(["--workers", "1", "--model-name", "cplx", "--model-base-path", complex_model])
    x = np.array([1.0, 2.0], "<f4").tobytes()
    inputs = [{"name": "x", "dtype": "float32", "shape": [2]}]
    meta, _ = ask(server.endpoint, {"type": "metadata", "id": 1, "model": "cplx"})
    assert meta["signatures"]["serving_default"]["outputs"]["z"] == {"dtype": "complex64", "shape": [-1]}
    reply, frames = ask(server.endpoint, {"type": "predict", "id": 2, "model": "cplx", "inputs": inputs}, x)
    assert (reply["id"], reply["code"], frames) == (2, INTERNAL, 0)
    assert (reply["model"], reply["version"], reply["worker"]) == ("cplx", 1, 0)
    assert reply["message"].startswith("output cannot be sent: dtype complex64 is not supported on the wire "
                                       "(supported: float16, ")
    reply, frames = ask(server.endpoint, {"type": "predict", "id": 3, "model": "cplx", "inputs": inputs,
                                          "output_filter": ["y"]}, x)
    assert (reply["code"], frames, reply["outputs"]) == (200, 1, [{"name": "y", "dtype": "float32", "shape": [2]}])
