"""Property tests of the wire codecs: every input either decodes or raises InvalidArgument (a
ServeError, answered 400), never anything else, and every encode/decode round trip is exact.

Covers sgserve/protocol.py (the native wire), frontdoor/tensors.py (gRPC's TensorProto),
frontdoor/rest_json.py and frontdoor/examples.py (REST's JSON). Each property runs on inputs
hypothesis generates; the hostile values the issue names (negative and 2^40 dimensions, shape
products that overflow 64 bits, unknown dtypes, deep nesting, bad string counts) are mixed in on
purpose, since random bytes alone rarely reach them.
"""
from __future__ import annotations

import json
import math
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sgserve import protocol
from sgserve.errors import InvalidArgument, ServeError
from sgserve.frontdoor import examples, protos, rest_json, tensors

PB = protos.load()
NUMERIC = list(protocol.DTYPES)
HOSTILE_DIMS = [0, 1, 2, 3, -1, -(2**31), 2**31, 2**32, 2**40, 2**62, 2**63 - 1, 2**64 - 1]


def _settles(call: Any, *args: Any) -> Any:
    """``call(*args)``: its result, or None when it refused the input with a 400."""
    try:
        return call(*args)
    except InvalidArgument:
        return None
    except ServeError as exc:  # any other ServeError would not be a 400
        raise AssertionError(f"{call.__name__} answered {exc.code}, not 400: {exc}") from None


def huge_empty(shape: Any) -> bool:
    """A shape numpy cannot reshape to (the known 500, xfailed below): more than 64 dimensions, or
    zero elements with a dimension past 2^31."""
    if not isinstance(shape, (list, tuple)) or not all(type(d) is int for d in shape):
        return False
    return len(shape) > 64 or math.prod(shape) == 0 and any(abs(d) >= 2**31 for d in shape)


def _same(a: np.ndarray, b: np.ndarray) -> None:
    """Exactly equal: shape, dtype and bytes (NaN payloads too), or element lists for strings."""
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.dtype == object or b.dtype == object:
        assert a.tolist() == b.tolist()
    else:
        assert a.dtype == b.dtype, (a.dtype, b.dtype)
        assert a.tobytes() == b.tobytes()


# -- strategies --------------------------------------------------------------------------------

def numeric_arrays(dtypes: list[str] = NUMERIC) -> st.SearchStrategy[np.ndarray]:
    shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)
    return st.sampled_from(dtypes).flatmap(lambda d: hnp.arrays(protocol.DTYPES[d], shapes))


def string_arrays() -> st.SearchStrategy[np.ndarray]:
    def build(shape: tuple[int, ...], items: list[bytes]) -> np.ndarray:
        out = np.empty(math.prod(shape), dtype=object)
        out[:] = items
        return out.reshape(shape)

    shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)
    return shapes.flatmap(lambda s: st.lists(st.binary(max_size=20), min_size=math.prod(s),
                                             max_size=math.prod(s)).map(lambda items: build(s, items)))


dims = st.one_of(st.sampled_from(HOSTILE_DIMS), st.integers(0, 6))
shapes_any = st.one_of(st.lists(dims, max_size=5), st.lists(dims, min_size=60, max_size=80),
                       st.sampled_from([None, "3", 3, [1.0], [True], [[2]], {"a": 1}, [None]]))
dtype_names = st.one_of(st.sampled_from(protocol.ALL_DTYPES),
                        st.sampled_from(["bfloat16", "complex64", "qint8", "", "FLOAT32", None, 5]),
                        st.text(max_size=8))
msgpack_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
                         st.floats(allow_nan=True), st.text(max_size=10), st.binary(max_size=10))
msgpack_values = st.recursive(msgpack_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)), max_leaves=12)
entries = st.one_of(
    st.fixed_dictionaries({"name": st.one_of(st.sampled_from(["x", "y"]), st.text(max_size=300), msgpack_leaf),
                           "dtype": dtype_names, "shape": shapes_any}),
    msgpack_values)
payload_frames = st.lists(st.one_of(st.binary(max_size=64), st.sampled_from([b"\x90", b"\x92\xc4\x00", b"\xdc",
                                    b"\xdd\xff\xff\xff\xff", b"\x91" * 2000, b"\x92\x91\x91\xc0\xc0"])), max_size=4)


# -- protocol.py -------------------------------------------------------------------------------

@given(st.one_of(numeric_arrays(), string_arrays()), st.booleans())
def test_encode_pack_unpack_decode_round_trip_is_exact(arr: np.ndarray, big_endian: bool) -> None:
    if big_endian and arr.dtype != object:
        arr = arr.astype(arr.dtype.newbyteorder(">"))
    frames = [protocol.frame_bytes(f) if not isinstance(f, bytes) else f
              for f in protocol.pack({"type": "predict", "id": [1, 2]}, {"t": arr})]
    header, payload = protocol.unpack_header(frames)
    assert header["id"] == [1, 2] and header["inputs"][0]["shape"] == list(arr.shape)
    out = protocol.decode_tensors(header["inputs"], payload)["t"]
    _same(out, arr.astype(arr.dtype.newbyteorder("<")) if arr.dtype != object else arr)


@given(st.lists(st.binary(max_size=40), max_size=5))
@example([b"SGS1", b"\x91" * 100_000])
@example([b"SGS1", b"\xdf\xff\xff\xff\xff"])
@example([b"SGS1", b"\xd9\x03\xff\xfe\xfd"])
def test_unpack_header_takes_any_frames(frames: list[bytes]) -> None:
    got = _settles(protocol.unpack_header, frames)
    if got is not None:
        header, payload = got
        assert isinstance(header, dict) and payload == frames[2:]


@given(st.binary(max_size=200))
def test_decode_header_takes_any_bytes(raw: bytes) -> None:
    got = _settles(protocol.decode_header, raw)
    assert got is None or isinstance(got, dict)


@given(st.one_of(st.lists(entries, max_size=4), msgpack_leaf), payload_frames)
def test_decode_tensors_takes_any_entries(metas: Any, payload: list[bytes]) -> None:
    """decode_tensors and check_tensors agree: the same inputs refused, with the same message."""
    assume(not any(isinstance(m, dict) and huge_empty(m.get("shape")) for m in metas or []) if isinstance(metas, list)
           else True)
    try:
        protocol.check_tensors(metas, payload)
        checked = None
    except InvalidArgument as exc:
        checked = exc.message
    try:
        out = protocol.decode_tensors(metas, payload)
    except InvalidArgument as exc:
        assert checked is None or exc.message == checked
        return
    assert checked is None
    for meta, frame in zip(metas or [], payload):
        assert list(out[meta["name"]].shape) == meta["shape"]
        if meta["dtype"] != protocol.STRING:
            assert out[meta["name"]].nbytes == len(frame)


@pytest.mark.parametrize("dtype", ["float32", "string"])
@pytest.mark.parametrize("shape", [[0, 2**63], [0, 2**64 - 1], [0, 2**40, 2**40], [0] + [1] * 70, [1] * 65])
def test_a_shape_numpy_cannot_hold_is_a_400(dtype: str, shape: list[int]) -> None:
    metas = [{"name": "x", "dtype": dtype, "shape": shape}]
    one = b"\0\0\0\0" if dtype == "float32" else b"\x91\xc4\x00"
    with pytest.raises(InvalidArgument):
        protocol.decode_tensors(metas, [one if math.prod(shape) else b""])


@pytest.mark.parametrize("element", [[[[1]]], {"a": 1}, 5, None, 1.5, True])
def test_string_element_that_is_not_bytes_or_text_is_a_400(element: Any) -> None:
    frame = msgpack.packb([b"ok", element], use_bin_type=True)
    with pytest.raises(InvalidArgument):
        protocol.decode_tensors([{"name": "s", "dtype": "string", "shape": [2]}], [frame])


@given(st.data())
def test_mutated_valid_message_decodes_or_is_a_400(data: st.DataObject) -> None:
    arr = data.draw(st.one_of(numeric_arrays(), string_arrays()))
    frames = [bytes(f) if not isinstance(f, bytes) else f for f in
              protocol.pack({"type": "predict", "model": "m", "timeout_ms": 100}, {"t": arr})]
    i = data.draw(st.integers(0, len(frames) - 1))
    raw = bytearray(frames[i])
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, len(raw)))
        if op == "flip" and pos < len(raw):
            raw[pos] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del raw[pos:]
        else:
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=4))
    frames[i] = bytes(raw)
    got = _settles(protocol.unpack_header, frames)
    if got is not None:
        _settles(protocol.decode_tensors, got[0].get("inputs"), got[1])


# -- frontdoor/tensors.py (gRPC) ----------------------------------------------------------------

@given(st.one_of(numeric_arrays(), string_arrays()), st.booleans())
def test_tensor_proto_round_trip_is_exact(arr: np.ndarray, typed_fields: bool) -> None:
    proto = tensors.from_numpy(arr, typed_fields=typed_fields)
    wire = PB.tensor_pb2.TensorProto.FromString(proto.SerializeToString())
    _same(tensors.to_numpy(wire), arr)


_VAL_FIELDS = {"half_val": st.integers(-(2**31), 2**31 - 1), "float_val": st.floats(width=32),
               "double_val": st.floats(), "int_val": st.integers(-(2**31), 2**31 - 1),
               "int64_val": st.integers(-(2**63), 2**63 - 1), "uint32_val": st.integers(0, 2**32 - 1),
               "uint64_val": st.integers(0, 2**64 - 1), "bool_val": st.booleans(),
               "string_val": st.binary(max_size=8), "scomplex_val": st.floats(width=32)}


@st.composite
def tensor_protos(draw: st.DrawFn) -> Any:
    t = PB.tensor_pb2.TensorProto(dtype=draw(st.one_of(st.sampled_from([s.enum for s in tensors.BY_NAME.values()]),
                                                       st.integers(-5, 130))))
    if draw(st.integers(0, 20)) == 0:
        t.tensor_shape.dim.extend([PB.tensor_shape_pb2.TensorShapeProto.Dim(size=1)] * 300)  # > MAX_DIMS
    for _ in range(draw(st.integers(0, 4))):
        t.tensor_shape.dim.add(size=draw(st.one_of(st.integers(0, 4), st.sampled_from(
            [-1, -(2**62), 2**40, 2**62, 2**63 - 1]))))
    t.tensor_shape.unknown_rank = draw(st.booleans()) and draw(st.booleans())
    if draw(st.booleans()):
        t.tensor_content = draw(st.binary(max_size=64))
    for field in draw(st.lists(st.sampled_from(sorted(_VAL_FIELDS)), max_size=2, unique=True)):
        getattr(t, field).extend(draw(st.lists(_VAL_FIELDS[field], max_size=6)))
    return t


@given(tensor_protos())
def test_to_numpy_takes_any_tensor_proto(t: Any) -> None:
    dims = [d.size for d in t.tensor_shape.dim]
    assume(not huge_empty(dims) or len(dims) > tensors.MAX_DIMS or t.tensor_shape.unknown_rank)
    arr = _settles(tensors.to_numpy, t)
    if arr is not None:
        assert list(arr.shape) == [d.size for d in t.tensor_shape.dim]


@given(st.binary(max_size=120))
def test_to_numpy_takes_any_parsed_bytes(raw: bytes) -> None:
    from google.protobuf.message import DecodeError

    try:
        t = PB.tensor_pb2.TensorProto.FromString(raw)
    except DecodeError:
        return  # the gRPC layer refuses it before our code runs (see tests/fuzz/test_live_fuzz.py)
    _settles(tensors.to_numpy, t)


@pytest.mark.parametrize("dtype", ["DT_FLOAT", "DT_STRING"])
@pytest.mark.parametrize("shape", [[0, 2**62], [0, 2**40, 2**40], [0] + [1] * 70, [1] * 65])
def test_a_tensor_proto_shape_numpy_cannot_hold_is_a_400(dtype: str, shape: list[int]) -> None:
    t = PB.tensor_pb2.TensorProto(dtype=PB.types_pb2.DataType.Value(dtype))
    for d in shape:
        t.tensor_shape.dim.add(size=d)
    if math.prod(shape) and dtype == "DT_FLOAT":
        t.float_val.append(1.0)
    elif math.prod(shape):
        t.string_val.append(b"a")
    with pytest.raises(InvalidArgument):
        tensors.to_numpy(t)


# -- frontdoor/rest_json.py and examples.py (REST) ---------------------------------------------

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(),
                      st.text(max_size=8), st.fixed_dictionaries({"b64": st.text(max_size=8)}))
json_values = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(["a", "b", "x", "s", "b64"]), inner, max_size=3)),
    max_leaves=16)
signatures = st.dictionaries(st.sampled_from(["a", "b", "x", "s"]),
                             st.sampled_from(protocol.ALL_DTYPES + ("complex64",)),
                             min_size=0, max_size=3).map(
    lambda d: {"inputs": {n: {"dtype": t, "shape": None} for n, t in d.items()}})


def _json_body(doc: Any) -> bytes:
    return json.dumps(doc, allow_nan=True).encode()


@given(st.one_of(st.binary(max_size=80), json_values.map(_json_body)))
@example(b"[" * 100_000)
@example(b'{"instances": ' + b"[" * 5000 + b"]" * 5000 + b"}")
@example(b'{"signature_name": 3}')
@example(b"\xff\xfe{}")
def test_read_json_takes_any_body(body: bytes) -> None:
    req = _settles(rest_json.read_json, body)
    assert req is None or isinstance(req.doc, dict)


@pytest.mark.parametrize("form", ["inputs", "instances"])
def test_json_nested_past_64_levels_is_a_400(form: str) -> None:
    body = b'{"%s": ' % form.encode() + b"[" * 65 + b"1" + b"]" * 65 + b"}"
    with pytest.raises(InvalidArgument):
        rest_json.parse_predict(body, {"inputs": {"x": {"dtype": "float32", "shape": None}}})


@given(signatures, st.one_of(
    st.fixed_dictionaries({"instances": json_values}), st.fixed_dictionaries({"inputs": json_values}),
    st.dictionaries(st.sampled_from(["instances", "inputs", "signature_name"]), json_values, max_size=3)))
def test_parse_predict_takes_any_document(sig: dict[str, Any], doc: dict[str, Any]) -> None:
    got = _settles(rest_json.parse_predict, _json_body(doc), sig)
    if got is not None:
        inputs, fmt, _ = got
        assert fmt in (rest_json.ROW, rest_json.COLUMNAR) and set(inputs) == set(sig["inputs"])


@given(st.one_of(numeric_arrays([d for d in NUMERIC if d != "float16"]), string_arrays()), st.booleans())
def test_parse_predict_round_trip_is_exact(arr: np.ndarray, rows: bool) -> None:
    """An array written as TF Serving's JSON (floats as their repr, strings as b64) reads back exactly."""
    if arr.dtype.kind == "f":
        assume(np.isfinite(arr).all())
    assume(not rows or arr.ndim >= 1 and arr.shape[0] >= 1)
    assume(0 not in arr.shape[:-1])  # JSON's [] has no inner dimensions to carry (TF Serving's too)
    if arr.dtype == object:
        value = np.vectorize(lambda b: {"b64": __import__("base64").b64encode(b).decode()}, otypes=[object])(arr)
        value = value.tolist() if arr.ndim else value.item()
    else:
        value = arr.tolist()
    dtype = protocol.dtype_name(arr)
    doc = {"instances": value} if rows else {"inputs": value}
    inputs, _, _ = rest_json.parse_predict(_json_body(doc), {"inputs": {"x": {"dtype": dtype, "shape": None}}})
    _same(inputs["x"], arr)


@given(st.one_of(st.binary(max_size=60), json_values.map(_json_body),
                 st.fixed_dictionaries({"examples": json_values}, optional={"context": json_values}).map(_json_body)))
@example(b'{"examples": [{"f": 18446744073709551616}]}')
@example(b'{"examples": [{"f": [1, "a"]}]}')
def test_parse_examples_takes_any_body(body: bytes) -> None:
    got = _settles(examples.parse_examples, body)
    if got is not None:
        serialized, _ = got
        for row in serialized:
            PB.example_pb2.Example.FromString(row)  # every row is a real tf.Example
