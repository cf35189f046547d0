"""TF Serving's REST JSON (rest_json.py, and examples.py's classify / regress half): every form,
every error with TF Serving's wording, the exact bytes written."""
from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from sgserve.errors import InvalidArgument
from sgserve.frontdoor import examples, protos, rest_json
from sgserve.frontdoor.rest_json import COLUMNAR, ROW
from tests.conftest import import_required

PB = protos.load()


def sig(**inputs: str) -> dict:
    return {"method": "tensorflow/serving/predict", "outputs": {},
            "inputs": {name: {"dtype": dt, "shape": None} for name, dt in inputs.items()}}


WIDE = sig(age="int64", city="string", dense="float32")


def parse(body: object, signature: dict) -> tuple[dict, str, object]:
    return rest_json.parse_predict(json.dumps(body).encode() if not isinstance(body, bytes) else body, signature)


def error_of(fn, *args) -> str:
    with pytest.raises(InvalidArgument) as info:
        fn(*args)
    assert info.value.code == 400
    return info.value.message


def check(arrays: dict, want: dict) -> None:
    assert sorted(arrays) == sorted(want)
    for name, expected in want.items():
        got = arrays[name]
        assert got.dtype == expected.dtype and got.shape == expected.shape, (name, got, expected)
        assert got.tolist() == expected.tolist(), name


# -- parse_predict ---------------------------------------------------------------------------------

def test_row_and_columnar_forms_decode_to_the_same_arrays() -> None:
    rows = {"signature_name": "serving_default", "instances": [
        {"age": 31, "city": "paris", "dense": [0.5, 1, -2]},
        {"age": -4, "city": {"b64": base64.b64encode(b"\xff\x00").decode()}, "dense": [3, 4, 5.25]},
    ]}
    columns = {"signature_name": "serving_default", "inputs": {
        "age": [31, -4], "city": ["paris", {"b64": "/wA="}], "dense": [[0.5, 1, -2], [3, 4, 5.25]],
        "ignored": [1]}}
    want = {"age": np.array([31, -4], np.int64), "city": np.array([b"paris", b"\xff\x00"], object),
            "dense": np.array([[0.5, 1, -2], [3, 4, 5.25]], np.float32)}
    r_arrays, r_fmt, r_sig = parse(rows, WIDE)
    c_arrays, c_fmt, c_sig = parse(columns, WIDE)
    assert (r_fmt, r_sig, c_fmt, c_sig) == (ROW, "serving_default", COLUMNAR, "serving_default")
    check(r_arrays, want)
    check(c_arrays, want)


def test_one_input_rows_are_bare_values_and_every_dtype_converts() -> None:
    cases = [
        ("float32", [1, 2.0, 5.003, 1e300, -1e300], np.array([1, 2, 5.003, np.inf, -np.inf], np.float32)),
        ("float64", [0.1, 7], np.array([0.1, 7.0])),
        ("float16", [0.5, 2], np.array([0.5, 2], np.float16)),
        ("int8", [-128, 127], np.array([-128, 127], np.int8)),
        ("uint8", [0, 255], np.array([0, 255], np.uint8)),
        ("int16", [-32768, 5], np.array([-32768, 5], np.int16)),
        ("uint16", [65535, 0], np.array([65535, 0], np.uint16)),
        ("int32", [-(2 ** 31), 2 ** 31 - 1], np.array([-(2 ** 31), 2 ** 31 - 1], np.int32)),
        ("int64", [-(2 ** 63), 2 ** 63 - 1], np.array([-(2 ** 63), 2 ** 63 - 1], np.int64)),
        ("uint32", [2 ** 32 - 1], np.array([2 ** 32 - 1], np.uint32)),
        ("uint64", [2 ** 64 - 1, 0], np.array([2 ** 64 - 1, 0], np.uint64)),
        ("bool", [True, False], np.array([True, False])),
        ("string", ["caf\u00e9", "", {"b64": "YQ"}], np.array(["caf\u00e9".encode(), b"", b"a"], object)),
    ]
    for dtype, values, want in cases:
        arrays, fmt, name = parse({"instances": values}, sig(x=dtype))
        assert (fmt, name) == (ROW, None)
        check(arrays, {"x": want})
        check(parse({"inputs": values}, sig(x=dtype))[0], {"x": want})


def test_shapes_scalars_empty_lists_and_nan() -> None:
    check(parse({"inputs": 5}, sig(x="int32"))[0], {"x": np.array(5, np.int32)})
    check(parse({"inputs": {"b64": "AQI="}}, sig(x="string"))[0], {"x": np.array(b"\x01\x02", object)})
    check(parse({"inputs": []}, sig(x="float32"))[0], {"x": np.zeros(0, np.float32)})
    check(parse({"instances": [[], []]}, sig(x="int64"))[0], {"x": np.zeros((2, 0), np.int64)})
    check(parse({"instances": [[[1], [2]], [[3], [4]]]}, sig(x="uint8"))[0],
          {"x": np.array([[[1], [2]], [[3], [4]]], np.uint8)})
    arrays = parse(b'{"instances": [NaN, Infinity, -Infinity, 1]}', sig(x="float32"))[0]
    assert str(arrays["x"].tolist()) == "[nan, inf, -inf, 1.0]"


def test_exact_walk_gives_the_fast_path_results() -> None:
    """A true/false token anywhere (here inside a string) turns off the np.array shortcut."""
    body = {"instances": [{"age": 3, "city": "true", "dense": [1, 2.5]},
                          {"age": 4, "city": "x", "dense": [0, -1]}]}
    slow, _, _ = parse(body, WIDE)
    body["instances"][0]["city"] = "y"
    fast, _, _ = parse(body, WIDE)
    for name in ("age", "dense"):
        assert slow[name].dtype == fast[name].dtype and slow[name].tolist() == fast[name].tolist()


def test_signature_source_may_be_a_callable_of_the_signature_name() -> None:
    asked = []

    def lookup(name):
        asked.append(name)
        return sig(x="float32")

    request = rest_json.read_json(b'{"signature_name": "scores", "inputs": [1]}')
    assert request.signature_name == "scores"
    arrays, fmt, name = rest_json.parse_predict(request, lookup)
    assert (asked, fmt, name, arrays["x"].tolist()) == (["scores"], COLUMNAR, "scores", [1.0])
    rest_json.parse_predict(b'{"inputs": [1]}', lookup)
    assert asked[-1] is None


@pytest.mark.parametrize("body,signature,message", [
    (b"", WIDE, "JSON Parse error: The document is empty"),
    (b"[1, 2]", WIDE, "JSON Value: [1, 2] Is not object"),
    (b'{"inputs": [1,', WIDE, "JSON Parse error: Expecting value at offset: 14"),
    (b'{"signature_name": 3, "inputs": []}', WIDE,
     "JSON Value: {\"signature_name\": 3, \"inputs\": []} not formatted correctly. "
     "'signature_name' key must be a string value."),
    (b'{"instance": []}', WIDE, "Missing 'inputs' or 'instances' key"),
    (b'{"inputs": [1], "instances": [1]}', sig(x="int32"),
     "JSON Value: {\"inputs\": [1], \"instances\": [1]} Not formatted correctly expecting only one of "
     "'inputs' or 'instances' keys to exist "),
    (b'{"instances": {"x": 1}}', sig(x="int32"),
     "JSON Value: {\"instances\": {\"x\": 1}} Expecting 'instances' to be an list/array"),
    (b'{"instances": []}', sig(x="int32"), "JSON Value: {\"instances\": []} No values in 'instances' array"),
    (b'{"inputs": [1]}', sig(), "Failed to get input map for signature: DEFAULT"),
    (b'{"inputs": [1]}', sig(x="complex64"),
     "input 'x' has dtype complex64, which JSON requests cannot carry (supported: float16, "),
    (b'{"inputs": [1.5]}', sig(x="int64"), "JSON Value: 1.5 Type: Number is not of expected type: int64"),
    (b'{"inputs": [1, 2.0]}', sig(x="int32"), "JSON Value: 2.0 Type: Number is not of expected type: int32"),
    (b'{"inputs": [300]}', sig(x="int8"), "JSON Value: 300 Type: Number is not of expected type: int8"),
    (b'{"inputs": [-1]}', sig(x="uint64"), "JSON Value: -1 Type: Number is not of expected type: uint64"),
    (b'{"inputs": [1, true]}', sig(x="float32"), "JSON Value: true Type: True is not of expected type: float"),
    (b'{"inputs": [1]}', sig(x="bool"), "JSON Value: 1 Type: Number is not of expected type: bool"),
    (b'{"inputs": ["1"]}', sig(x="float64"), "JSON Value: \"1\" Type: String is not of expected type: double"),
    (b'{"inputs": [null]}', sig(x="float16"), "JSON Value: null Type: Null is not of expected type: half"),
    (b'{"inputs": [{"a": 1}]}', sig(x="float32"),
     "JSON Value: {\"a\": 1} Type: Object is not of expected type: float"),
    (b'{"inputs": [5]}', sig(x="string"), "JSON Value: 5 Type: Number is not of expected type: string"),
    (b'{"inputs": [{"b64": 5}]}', sig(x="string"),
     "JSON Value: {\"b64\": 5} not formatted correctly for base64 data"),
    (b'{"inputs": [{"b64": "!!"}]}', sig(x="string"), "Unable to base64 decode"),
    (b'{"inputs": [[1, 2], 3]}', sig(x="int32"),
     "JSON Value: 3 found at incorrect level: 2 in the JSON DOM. Expected at level: 2"),
    (b'{"inputs": [1, [2]]}', sig(x="int32"), "Encountered list at unexpected level: 1 expected < 1"),
    (b'{"inputs": [[1, 2], [3]]}', sig(x="int32"),
     "Encountered list at unexpected size: 1 at level: 1 expected size: 2"),
    (b'{"inputs": [1]}', sig(a="int32", b="int32"),
     "inputs is a plain value/list, but expecting an object as multiple input tensors required as per "
     "tensorinfo_map"),
    (b'{"inputs": {"a": [1]}}', sig(a="int32", b="int32"), "Missing named input: b in 'inputs' object."),
    (b'{"instances": [1, 2]}', sig(a="int32", b="int32"),
     "instances is a plain list, but expecting list of objects as multiple input tensors required as "
     "per tensorinfo_map"),
    (b'{"instances": [{"a": 1, "b": 2}, [3]]}', sig(a="int32", b="int32"),
     "Expecting object but got list at item 1 of input list"),
    (b'{"instances": [[1], {"a": 1}]}', sig(a="int32"), "Expecting value/list but got object at item 1 of input list"),
    (b'{"instances": [[1, 2], [3]]}', sig(x="int32"),
     "Failed to process element: 1 of 'instances' list. Error: INVALID_ARGUMENT: Expecting tensor size: 2 but got: 1"),
    (b'{"instances": [[[1, 2]], [[1], [2]]]}', sig(x="int32"),
     "Failed to process element: 1 of 'instances' list. Error: INVALID_ARGUMENT: Expecting shape [1,2] but got: [2,1]"),
    (b'{"instances": [{"a": 1, "zz": 2}]}', sig(a="int32"),
     "Failed to process element: 0 key: zz of 'instances' list. Error: INVALID_ARGUMENT: JSON object: does "
     "not have named input: zz"),
    (b'{"instances": [{"a": 1, "b": [2]}, {"a": 1, "b": [2, 3]}]}', sig(a="int32", b="int32"),
     "Failed to process element: 1 key: b of 'instances' list. Error: INVALID_ARGUMENT: "
     "Expecting tensor size: 1 but got: 2"),
    (b'{"instances": [{"a": 1, "b": 2}, {"a": "x", "b": 2}]}', sig(a="int32", b="int32"),
     "Failed to process element: 1 key: a of 'instances' list. Error: INVALID_ARGUMENT: JSON Value: \"x\" "
     "Type: String is not of expected type: int32"),
    (b'{"instances": [{"a": 1, "b": "bad"}, {"a": "x", "b": 2}]}', sig(a="int32", b="int32"),  # TF's order
     "Failed to process element: 0 key: b of 'instances' list. Error: INVALID_ARGUMENT: JSON Value: \"bad\""),
    (b'{"instances": [{"a": 1}]}', sig(a="int32", b="int32"),
     "Failed to process element: 0 of 'instances' list. JSON object: {\"a\": 1} keys must be equal to: a,b"),
])
def test_predict_errors_use_tf_serving_wording(body: bytes, signature: dict, message: str) -> None:
    assert error_of(parse, body, signature).startswith(message)


def test_long_values_are_cut_in_messages() -> None:
    message = error_of(parse, json.dumps({"inputs": ["x" * 1000]}).encode(), sig(x="int32"))
    assert message.startswith('JSON Value: "xxx') and len(message) < 320


# -- format_predict --------------------------------------------------------------------------------

def test_row_and_columnar_outputs() -> None:
    scores = np.array([[0.1, 1 / 3], [2, -0.0]], np.float32)
    ids = np.array([7, 2 ** 63 - 1], np.int64)
    assert rest_json.format_predict({"scores": scores}, ROW) == b'{"predictions":[[0.1,0.33333334],[2.0,-0.0]]}'
    assert rest_json.format_predict({"scores": scores}, COLUMNAR) == b'{"outputs":[[0.1,0.33333334],[2.0,-0.0]]}'
    both = {"scores": scores, "ids": ids}
    assert rest_json.format_predict(both, ROW) == (
        b'{"predictions":[{"ids":7,"scores":[0.1,0.33333334]},{"ids":9223372036854775807,"scores":[2.0,-0.0]}]}')
    assert rest_json.format_predict(both, COLUMNAR) == (
        b'{"outputs":{"ids":[7,9223372036854775807],"scores":[[0.1,0.33333334],[2.0,-0.0]]}}')


def test_every_dtype_and_several_dimensions() -> None:
    cube = np.arange(12, dtype=np.int16).reshape(2, 3, 2)
    outputs = {"b": np.array([[True], [False]]), "c": cube, "d": np.array([0.1, 2.5]),
               "h": np.array([0.5, 1], np.float16), "u": np.array([2 ** 64 - 1, 0], np.uint64)}
    got = json.loads(rest_json.format_predict(outputs, ROW))
    assert got == {"predictions": [
        {"b": [True], "c": [[0, 1], [2, 3], [4, 5]], "d": 0.1, "h": 0.5, "u": 2 ** 64 - 1},
        {"b": [False], "c": [[6, 7], [8, 9], [10, 11]], "d": 2.5, "h": 1.0, "u": 0}]}
    assert rest_json.format_predict({"c": cube[:, :, :0]}, COLUMNAR) == b'{"outputs":[[[],[],[]],[[],[],[]]]}'
    assert rest_json.format_predict({"s": np.array(3.5, np.float32)}, COLUMNAR) == b'{"outputs":3.5}'
    assert rest_json.format_predict({"a": np.zeros((0, 2)), "b": np.zeros(0)}, ROW) == b'{"predictions":[]}'


def test_non_finite_floats_are_written_as_tf_serving_tokens() -> None:
    arr = np.array([[np.nan, np.inf], [3, -np.inf]], np.float32)
    assert rest_json.format_predict({"x": arr}, ROW) == b'{"predictions":[[NaN,Infinity],[3.0,-Infinity]]}'
    two = rest_json.format_predict({"x": arr, "y": np.array([1, 2], np.int8)}, ROW)
    assert two == b'{"predictions":[{"x":[NaN,Infinity],"y":1},{"x":[3.0,-Infinity],"y":2}]}'
    assert rest_json.format_predict({"x": np.array(np.nan)}, COLUMNAR) == b'{"outputs":NaN}'
    assert str(json.loads(two)["predictions"][0]["x"]) == "[nan, inf]"  # Python's json reads them


def test_string_outputs_text_bytes_names_and_non_utf8() -> None:
    words = np.array([[b"caf\xc3\xa9"], [b"a\"b"]], object)
    raw = np.array([b"\xff\x00", b"ok"], object)
    assert rest_json.format_predict({"w": words}, ROW) == '{"predictions":[["café"],["a\\"b"]]}'.encode()
    assert rest_json.format_predict({"w_bytes": words}, COLUMNAR) == (
        b'{"outputs":[[{"b64":"Y2Fmw6k="}],[{"b64":"YSJi"}]]}')
    # Not UTF-8: the whole tensor goes out as b64 (valid JSON, one type per output).
    assert rest_json.format_predict({"raw": raw}, COLUMNAR) == b'{"outputs":[{"b64":"/wA="},{"b64":"b2s="}]}'


def test_b64_round_trip() -> None:
    payload = bytes(range(256))
    body = json.dumps({"instances": [{"b64": base64.b64encode(payload).decode()}]}).encode()
    arrays, fmt, _ = rest_json.parse_predict(body, sig(img_bytes="string"))
    assert arrays["img_bytes"].tolist() == [payload]
    out = json.loads(rest_json.format_predict(arrays, fmt))
    assert base64.b64decode(out["predictions"][0]["b64"]) == payload


@pytest.mark.parametrize("outputs,fmt,message", [
    ({}, ROW, "Cannot convert empty tensor map to JSON"),
    ({"x": np.array(1.0)}, ROW, "Tensor name: x has no shape information "),
    ({"a": np.zeros(2), "b": np.zeros(3)}, ROW, "Tensor name: b has inconsistent batch size: 3 expecting: 2"),
    ({"a": np.zeros(2)}, "csv", "Invalid request format"),
    ({"a": np.zeros(2, np.complex64)}, COLUMNAR, "dtype complex64 is not supported on the wire"),
])
def test_format_predict_errors(outputs: dict, fmt: str, message: str) -> None:
    assert error_of(rest_json.format_predict, outputs, fmt).startswith(message)


def test_error_body() -> None:
    assert rest_json.error_body('bad "x"\n') == b'{"error":"bad \\"x\\"\\n"}'


# -- classify and regress (examples.py) ------------------------------------------------------------

def test_parse_examples_types_features_and_merges_context() -> None:
    tf = import_required("tensorflow")
    body = json.dumps({"signature_name": "classify_x", "context": {"country": "fr", "age": 1},
                       "examples": [{"age": 30, "score": [0.5, 1e-3], "flag": True, "img": {"b64": "/w=="}},
                                    {"age": [40], "score": 2.5, "flag": [False, True], "img": []}]}).encode()
    serialized, name = examples.parse_examples(body)
    assert name == "classify_x" and serialized.dtype == object and serialized.shape == (2,)
    parsed = tf.io.parse_example(serialized, {
        "age": tf.io.FixedLenFeature([], tf.int64), "country": tf.io.FixedLenFeature([], tf.string),
        "score": tf.io.VarLenFeature(tf.float32), "flag": tf.io.VarLenFeature(tf.int64),
        "img": tf.io.VarLenFeature(tf.string)})
    assert parsed["age"].numpy().tolist() == [30, 40]
    assert parsed["country"].numpy().tolist() == [b"fr", b"fr"]
    assert tf.sparse.to_dense(parsed["score"]).numpy().tolist() == [[0.5, np.float32(1e-3)], [2.5, 0.0]]
    assert tf.sparse.to_dense(parsed["flag"]).numpy().tolist() == [[1, 0], [0, 1]]
    assert parsed["img"].values.numpy().tolist() == [b"\xff"]
    first = PB.example_pb2.Example.FromString(serialized[0])
    assert first.features.feature["age"].int64_list.value == [30]


@pytest.mark.parametrize("body,message", [
    (b'{"examples": [{"names": [null]}]}', "Feature: names has element with unexpected JSON type: Null"),
    (b'{"examples": [{"names": [1, "a"]}]}', "Unexpected element type in feature: names expecting type: int64"),
    (b'{"examples": [{"names": ["a", 1.5]}]}', "Unexpected element type in feature: names expecting type: bytes"),
    (b'{"examples": [{"names": [1.5, 2]}]}', "Unexpected element type in feature: names expecting type: float"),
    (b'{"examples": [{"names": {"a": 1}}]}', "Feature: names has element with unexpected JSON type: Object"),
    (b'{"examples": [{"names": [[1]]}]}', "Feature: names has element with unexpected JSON type: Array"),
    (b'{"examples": [{"n": 18446744073709551615}]}', "Feature: n has uint64_t element. Only int64_t is supported."),
    (b'{"examples": [[1]]}', "Example must be JSON object but got JSON Array"),
    (b'{"context": 1, "examples": [{}]}', "Example must be JSON object but got JSON Number"),
    (b'{"example": []}',
     "JSON Value: {\"example\": []} When method is classify, key 'examples' is expected and was not found"),
    (b'{"examples": {}}', "JSON Value: {\"examples\": {}} Expecting 'examples' value to be an list/array"),
    (b'{"examples": []}', "JSON Value: {\"examples\": []} 'examples' value is an empty array"),
    (b'{"signature_name": 1, "examples": []}', "JSON Value: {\"signature_name\": 1, \"examples\": []} not formatted"),
])
def test_parse_examples_errors(body: bytes, message: str) -> None:
    assert error_of(examples.parse_examples, body).startswith(message)


def test_format_classify_and_regress() -> None:
    classes = np.array([[b"cat", b"dog"], [b"emu", b"yak"]], object)
    scores = np.array([[0.1, np.nan], [1, 1 / 3]], np.float32)
    result = examples.classification_result(classes, scores)
    assert examples.format_classify(result) == (
        b'{"results":[[["cat",0.1],["dog",NaN]],[["emu",1.0],["yak",0.33333334]]]}')
    regress = examples.regression_result(np.array([[0.5], [np.inf]], np.float32))
    assert examples.format_regress(regress) == b'{"results":[0.5,Infinity]}'
    assert error_of(examples.format_classify, PB.classification_pb2.ClassificationResult()) == (
        "Cannot convert empty ClassificationResults to JSON")
    assert error_of(examples.format_regress, PB.regression_pb2.RegressionResult()) == (
        "Cannot convert empty RegressionResults to JSON")
