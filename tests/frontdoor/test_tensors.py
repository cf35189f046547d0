"""TensorProto <-> numpy against TensorFlow's own make_tensor_proto / make_ndarray, TF Serving's
protos loaded without TensorFlow, and the gRPC halves of Classify / Regress (examples.py)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from sgserve.errors import InvalidArgument
from sgserve.frontdoor import examples, protos, tensors
from tests.conftest import import_required

tf = import_required("tensorflow")
PB = protos.load()
TensorProto = PB.tensor_pb2.TensorProto
DT = PB.types_pb2.DataType

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUMERIC = ["float16", "float32", "float64", "int8", "int16", "int32", "int64",
           "uint8", "uint16", "uint32", "uint64", "bool"]
SHAPES = [(), (1,), (5,), (2, 3), (0,), (3, 0, 2)]


def sample(dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Values that exercise each dtype's range (negative, large, fractional), in ``shape``."""
    n = int(np.prod(shape))
    if dtype == "bool":
        return (np.arange(n) % 3 == 0).reshape(shape)
    if dtype == "string":
        pool = [b"", b"a", "caf\u00e9".encode(), b"\xff\x00\xfe bin", b"x" * 300]
        out = np.empty(n, dtype=object)
        out[:] = [pool[i % len(pool)] for i in range(n)]
        return out.reshape(shape)
    dt = np.dtype(dtype)
    if dt.kind == "f":
        return (np.linspace(-3.5, 1e3, n) / 7).astype(dt).reshape(shape)
    info = np.iinfo(dt)
    edges = [info.min, info.max, 0, 1, info.max // 3]
    return np.array([edges[i % len(edges)] for i in range(n)], dtype=dt).reshape(shape)


def proto(dtype_name: str, shape: tuple[int, ...], **fields) -> TensorProto:
    t = TensorProto(dtype=DT.Value(dtype_name), **fields)
    for d in shape:
        t.tensor_shape.dim.add(size=d)
    return t


def same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
    assert a.tobytes() == b.tobytes() if a.dtype != object else a.tolist() == b.tolist()


# -- protos -------------------------------------------------------------------------------------

def test_load_does_not_import_tensorflow_and_a_later_import_gets_the_real_one() -> None:
    code = textwrap.dedent("""
        import sys, time
        t = time.perf_counter()
        from sgserve.frontdoor import protos
        p = protos.load()
        took = time.perf_counter() - t
        assert protos.load() is p
        assert "tensorflow.python" not in sys.modules and "tensorflow" not in sys.modules
        t = p.tensor_pb2.TensorProto(dtype=p.types_pb2.DT_FLOAT, float_val=[2.5])
        t.tensor_shape.dim.add(size=2)
        assert p.prediction_service_pb2_grpc.PredictionServiceStub is not None
        import tensorflow as tf
        print(took, tf.make_ndarray(t).tolist())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                         cwd=ROOT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    took, values = out.stdout.split(maxsplit=1)
    assert float(took) < 1.0, out.stdout
    assert values.strip() == "[2.5, 2.5]"


def test_load_uses_real_tensorflow_modules_when_imported() -> None:
    from tensorflow.core.framework import tensor_pb2  # noqa: PLC0415

    assert PB.tensor_pb2 is tensor_pb2
    assert isinstance(tf.make_tensor_proto(np.ones(3, np.float32)), TensorProto)


# -- to_numpy / from_numpy against TensorFlow ------------------------------------------------------

@pytest.mark.parametrize("dtype", NUMERIC + ["string"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trips_match_tensorflow(dtype: str, shape: tuple[int, ...]) -> None:
    arr = sample(dtype, shape)
    stock = tf.make_tensor_proto(arr)  # what a stock client sends: tensor_content or a typed field
    same(tensors.to_numpy(stock, "x"), tf.make_ndarray(stock))
    same(tensors.to_numpy(stock, "x"), arr)
    for typed in (False, True):
        ours = tensors.from_numpy(arr, typed_fields=typed)
        assert ours.dtype == stock.dtype and ours.tensor_shape == stock.tensor_shape
        same(tf.make_ndarray(ours), arr)
        same(tensors.to_numpy(ours), arr)
    # Byte for byte what make_tensor_proto writes: tensor_content for numeric arrays of more than
    # one element, the typed field for the rest (from_numpy's typed_fields=True).
    uses_content = bool(stock.tensor_content)
    if uses_content or dtype == "string" or arr.size:
        ours = tensors.from_numpy(arr, typed_fields=not uses_content)
        assert ours.SerializeToString() == stock.SerializeToString()


@pytest.mark.parametrize("dtype_name,field,values,want", [
    ("DT_FLOAT", "float_val", [1, 2.5], np.array([1, 2.5], np.float32)),
    ("DT_DOUBLE", "double_val", [0.1, -2], np.array([0.1, -2], np.float64)),
    ("DT_INT32", "int_val", [-(2 ** 31), 7], np.array([-(2 ** 31), 7], np.int32)),
    ("DT_INT16", "int_val", [-32768, 32767], np.array([-32768, 32767], np.int16)),
    ("DT_INT8", "int_val", [-128, 127], np.array([-128, 127], np.int8)),
    ("DT_UINT8", "int_val", [0, 255], np.array([0, 255], np.uint8)),
    ("DT_UINT16", "int_val", [0, 65535], np.array([0, 65535], np.uint16)),
    ("DT_INT64", "int64_val", [-(2 ** 63), 2 ** 63 - 1], np.array([-(2 ** 63), 2 ** 63 - 1], np.int64)),
    ("DT_UINT32", "uint32_val", [0, 2 ** 32 - 1], np.array([0, 2 ** 32 - 1], np.uint32)),
    ("DT_UINT64", "uint64_val", [0, 2 ** 64 - 1], np.array([0, 2 ** 64 - 1], np.uint64)),
    ("DT_BOOL", "bool_val", [True, False], np.array([True, False])),
    ("DT_HALF", "half_val", [0x3C00, 0xC000], np.array([1.0, -2.0], np.float16)),  # bit patterns
    ("DT_STRING", "string_val", [b"\xff\x01", b"ok"], np.array([b"\xff\x01", b"ok"], object)),
])
def test_typed_fields_built_by_hand(dtype_name: str, field: str, values: list, want: np.ndarray) -> None:
    t = proto(dtype_name, (2,), **{field: values})
    same(tensors.to_numpy(t, "x"), want)
    same(tf.make_ndarray(t), want)


def test_one_value_is_splat_and_fewer_values_pad_with_the_last_as_tensorflow() -> None:
    cases = [
        proto("DT_FLOAT", (2, 3), float_val=[7.5]),
        proto("DT_INT64", (4,), int64_val=[1, 2]),
        proto("DT_STRING", (3,), string_val=[b"a", b"b"]),
        proto("DT_HALF", (2,), half_val=[0x3C00]),
        proto("DT_BOOL", (3,), bool_val=[True]),
        proto("DT_INT32", (2, 2)),  # no values at all: zeros
    ]
    for t in cases:
        same(tensors.to_numpy(t, "x"), tf.make_ndarray(t))
    assert tensors.to_numpy(cases[0]).tolist() == [[7.5] * 3] * 2
    assert tensors.to_numpy(cases[1]).tolist() == [1, 2, 2, 2]
    # No strings at all: empty bytes (make_ndarray pads with the str "" here; TensorFlow's C++ with b"").
    assert tensors.to_numpy(proto("DT_STRING", (2,))).tolist() == [b"", b""]


def test_tensor_content_is_a_view_and_bool_bytes_normalise() -> None:
    t = tf.make_tensor_proto(np.arange(6, dtype=np.float32).reshape(2, 3))
    arr = tensors.to_numpy(t)
    assert not arr.flags.writeable and arr.tolist() == [[0, 1, 2], [3, 4, 5]]
    b = proto("DT_BOOL", (3,), tensor_content=b"\x00\x01\x07")
    assert tensors.to_numpy(b).tolist() == [False, True, True]


@pytest.mark.parametrize("tensor,message", [
    (proto("DT_COMPLEX64", (1,), scomplex_val=[1, 2]),
     "tensor 'x': dtype DT_COMPLEX64 is not supported (supported: DT_HALF, DT_FLOAT"),
    (proto("DT_BFLOAT16", (1,), half_val=[1]), "tensor 'x': dtype DT_BFLOAT16 is not supported"),
    (proto("DT_RESOURCE", ()), "tensor 'x': dtype DT_RESOURCE is not supported"),
    (proto("DT_FLOAT_REF", (1,)), "tensor 'x': dtype DT_FLOAT_REF is not supported"),
    (TensorProto(dtype=999), "tensor 'x': dtype DataType 999 is not supported"),
    (proto("DT_FLOAT", (2, -1), float_val=[1]),
     "tensor 'x': tensor_shape [2, -1] has a negative (unknown) dimension"),
    (TensorProto(dtype=DT.Value("DT_FLOAT"), tensor_shape={"unknown_rank": True}),
     "tensor 'x': tensor_shape has unknown_rank set"),
    (proto("DT_FLOAT", (2,), float_val=[1, 2, 3]), "tensor 'x': float_val has 3 values, float32[2] holds 2"),
    (proto("DT_FLOAT", (2, 2), tensor_content=b"\x00" * 12),
     "tensor 'x': tensor_content is 12 bytes, float32[2, 2] needs 16"),
    (proto("DT_FLOAT", (2 ** 40, 2 ** 40), float_val=[1]),
     "tensor 'x': tensor_shape [1099511627776, 1099511627776] holds 1208925819614629174706176 elements, "
     "more than the 67108864 allowed"),
    (proto("DT_INT8", (2,), int_val=[1, 300]), "tensor 'x': int_val value 300 is out of range for int8 [-128, 127]"),
    (proto("DT_UINT8", (1,), int_val=[-1]), "tensor 'x': int_val value -1 is out of range for uint8 [0, 255]"),
    (proto("DT_HALF", (1,), half_val=[70000]),
     "tensor 'x': half_val value 70000 is out of range for binary16 bit pattern [0, 65535]"),
    (proto("DT_FLOAT", (2,), int_val=[1, 2]),
     "tensor 'x': dtype DT_FLOAT carries its values in float_val or tensor_content, but the tensor has int_val"),
    (proto("DT_STRING", (1,), tensor_content=b"\x01a"),
     "tensor 'x': a DT_STRING tensor must carry its values in string_val, not tensor_content"),
])
def test_malformed_tensors_are_refused_with_a_message_naming_the_tensor(tensor: TensorProto, message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        tensors.to_numpy(tensor, "x")
    assert info.value.message.startswith(message), info.value.message
    assert info.value.code == 400


def test_max_elements_and_dimension_count() -> None:
    t = proto("DT_FLOAT", (10, 10), float_val=[1])
    assert tensors.to_numpy(t, "x", max_elements=100).shape == (10, 10)
    with pytest.raises(InvalidArgument, match="holds 100 elements, more than the 99 allowed"):
        tensors.to_numpy(t, "x", max_elements=99)
    with pytest.raises(InvalidArgument, match="tensor_shape has 255 dimensions, at most 254"):
        tensors.to_numpy(proto("DT_FLOAT", (1,) * 255))


def test_from_numpy_refuses_what_the_wire_cannot_carry() -> None:
    with pytest.raises(InvalidArgument, match="dtype complex64 is not supported"):
        tensors.from_numpy(np.ones(2, np.complex64))
    big_endian = np.arange(3, dtype=">i4")
    assert tf.make_ndarray(tensors.from_numpy(big_endian)).tolist() == [0, 1, 2]
    assert tensors.from_numpy(np.array(["caf\u00e9"], dtype=object)).string_val == ["caf\u00e9".encode()]


def test_dtype_names_and_enums() -> None:
    for name in NUMERIC + ["string"]:
        enum = tensors.dtype_enum(name)
        assert tensors.dtype_name(enum) == name
        if name != "string":
            assert tf.as_dtype(enum).as_numpy_dtype == np.dtype(name)
    assert tensors.dtype_enum("float32") == DT.Value("DT_FLOAT") == 1
    assert tensors.dtype_enum("float16") == DT.Value("DT_HALF")
    assert tensors.dtype_enum("complex64") == DT.Value("DT_COMPLEX64")
    assert tensors.dtype_enum("bfloat16") == DT.Value("DT_BFLOAT16")
    assert tensors.dtype_enum("object") == DT.Value("DT_INVALID")
    with pytest.raises(InvalidArgument, match="output 'y': dtype DT_BFLOAT16 is not supported"):
        tensors.dtype_name(DT.Value("DT_BFLOAT16"), "output 'y'")


# -- examples.py, gRPC side -----------------------------------------------------------------------

def example(**features) -> object:
    ex = PB.example_pb2.Example()
    for name, values in features.items():
        f = ex.features.feature[name]
        if isinstance(values[0], bytes):
            f.bytes_list.value.extend(values)
        elif isinstance(values[0], float):
            f.float_list.value.extend(values)
        else:
            f.int64_list.value.extend(values)
    return ex


def test_serialize_input_merges_context_as_tf_serving() -> None:
    rows = [example(age=[30], name=[b"ann"]), example(age=[40], score=[0.5])]
    plain = PB.input_pb2.Input()
    plain.example_list.examples.extend(rows)
    out = examples.serialize_input(plain)
    # Map fields serialize in no fixed order: compare the examples, not their bytes.
    assert out.dtype == object and [PB.example_pb2.Example.FromString(b) for b in out] == rows

    with_context = PB.input_pb2.Input()
    with_context.example_list_with_context.context.CopyFrom(example(age=[1], country=[b"fr"]))
    with_context.example_list_with_context.examples.extend(rows)
    parsed = tf.io.parse_example(examples.serialize_input(with_context), {
        "age": tf.io.FixedLenFeature([], tf.int64),
        "country": tf.io.FixedLenFeature([], tf.string),
    })
    assert parsed["age"].numpy().tolist() == [30, 40]  # the example's own value wins
    assert parsed["country"].numpy().tolist() == [b"fr", b"fr"]
    with pytest.raises(InvalidArgument, match=r": Input is empty\.$"):
        examples.serialize_input(PB.input_pb2.Input())


def test_classification_result_from_outputs() -> None:
    classes = np.array([[b"cat", b"dog"], [b"\xff", b"emu"]], dtype=object)
    scores = np.array([[0.25, 0.75], [1.0, 0.0]], np.float32)
    result = examples.classification_result(classes, scores, num_examples=2)
    got = [[(c.label, c.score) for c in cl.classes] for cl in result.classifications]
    assert got == [[("cat", 0.25), ("dog", 0.75)], [("\ufffd", 1.0), ("emu", 0.0)]]
    only_scores = examples.classification_result(None, scores)
    assert [[c.label for c in cl.classes] for cl in only_scores.classifications] == [["", ""], ["", ""]]
    only_classes = examples.classification_result(classes, None)
    assert [c.score for c in only_classes.classifications[0].classes] == [0.0, 0.0]


@pytest.mark.parametrize("classes,scores,message", [
    (None, None, "Expected classes or scores output from the classify signature, got neither"),
    (np.array([b"a"], object), None, "Expected Tensor shape: [batch_size num_classes] but got [1]"),
    (None, np.ones((1, 2), np.float64), "Expected scores Tensor of DT_FLOAT. Got: DT_DOUBLE"),
    (np.ones((1, 2), np.int32), None, "Expected classes Tensor of DT_STRING. Got: DT_INT32"),
    (np.array([[b"a", b"b"]] * 2, object), np.ones((2, 3), np.float32),
     "Tensors class and score should match in dim_size(1). Got 2 vs. 3"),
    (None, np.ones((3, 2), np.float32), "Expected scores output batch size of 2. Got: 3"),
])
def test_classification_result_errors(classes, scores, message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        examples.classification_result(classes, scores, num_examples=2)
    assert info.value.message == message


def test_regression_result_from_outputs() -> None:
    for shape in [(3,), (3, 1)]:
        result = examples.regression_result(np.array([0.5, -1, 2], np.float32).reshape(shape), 3)
        assert [r.value for r in result.regressions] == [0.5, -1.0, 2.0]
    for arr, message in [
        (np.ones((3, 2), np.float32),
         "Expected output Tensor shape to be either [batch_size] or [batch_size, 1] but got [3,2]"),
        (np.ones(2, np.float32), "Input batch size did not match output batch size: 3 vs. 2"),
        (np.ones(3, np.float64), "Expected output Tensor of DT_FLOAT.  Got: DT_DOUBLE"),
    ]:
        with pytest.raises(InvalidArgument) as info:
            examples.regression_result(arr, 3)
        assert info.value.message == message
