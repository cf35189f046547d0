"""TF Serving's tf.Example APIs (Classify, Regress, MultiInference) in sgserve's terms.

A classify or regress signature takes one string input, a batch of serialized tf.Examples, so a
request becomes an ordinary predict with that batch: ``serialize_input`` (gRPC's ``Input``) and
``parse_examples`` (REST's JSON) make it. The signature's output arrays become TF Serving's
results: ``classification_result`` / ``regression_result`` (protos, for gRPC) and
``format_classify`` / ``format_regress`` (JSON, for REST). The checks and their messages are TF
Serving's (servables/tensorflow/{util,classifier,regressor}.cc and util/json_tensor.cc).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from sgserve.errors import InvalidArgument
from sgserve.frontdoor import protos, rest_json, tensors

_PB = protos.load()
_INT64 = (-(1 << 63), (1 << 63) - 1)
_KIND_NAMES = {"bytes_list": "bytes", "float_list": "float", "int64_list": "int64", None: "UNKNOWN"}


def serialize_input(input_pb: Any) -> np.ndarray:
    """The serialized tf.Example of each row of an ``Input`` (object array of bytes).

    With ``example_list_with_context`` each row is the context's bytes followed by the example's,
    as TF Serving builds it: parsed, that is the context merged into the example, the example's own
    value winning for a feature both have.
    """
    kind = input_pb.WhichOneof("kind")
    if kind == "example_list":
        rows = [e.SerializeToString() for e in input_pb.example_list.examples]
    elif kind == "example_list_with_context":
        given = input_pb.example_list_with_context
        context = given.context.SerializeToString()
        rows = [context + e.SerializeToString() for e in given.examples]
    else:
        rows = []
    if not rows:
        raise InvalidArgument("Input is empty.")
    out = np.empty(len(rows), dtype=object)
    out[:] = rows
    return out


def classification_result(classes: np.ndarray | None, scores: np.ndarray | None,
                          num_examples: int | None = None) -> Any:
    """A ClassificationResult from a classify signature's ``classes`` ([batch, k] string) and
    ``scores`` ([batch, k] float32) outputs; either may be absent, not both."""
    if classes is None and scores is None:
        raise InvalidArgument("Expected classes or scores output from the classify signature, got neither")
    for name, arr, want in (("classes", classes, "DT_STRING"), ("scores", scores, "DT_FLOAT")):
        if arr is not None:
            _check_classify_output(name, arr, want, num_examples)
    if classes is not None and scores is not None and classes.shape[1] != scores.shape[1]:
        raise InvalidArgument(f"Tensors class and score should match in dim_size(1). "
                              f"Got {classes.shape[1]} vs. {scores.shape[1]}")
    some = classes if classes is not None else scores
    rows, k = some.shape
    labels = [_label(x) for x in classes.reshape(-1).tolist()] if classes is not None else [""] * (rows * k)
    values = scores.reshape(-1).tolist() if scores is not None else [0.0] * (rows * k)
    result = _PB.classification_pb2.ClassificationResult()
    for i in range(rows):
        classes_pb = result.classifications.add().classes
        for j in range(i * k, (i + 1) * k):
            classes_pb.add(label=labels[j], score=values[j])
    return result


def _check_classify_output(name: str, arr: np.ndarray, want: str, num_examples: int | None) -> None:
    if arr.ndim != 2:
        raise InvalidArgument(f"Expected Tensor shape: [batch_size num_classes] but got {rest_json.dims(arr.shape)}")
    got = _dtype_label(arr)
    if got != want:
        raise InvalidArgument(f"Expected {name} Tensor of {want}. Got: {got}")
    if num_examples is not None and arr.shape[0] != num_examples:
        raise InvalidArgument(f"Expected {name} output batch size of {num_examples}. Got: {arr.shape[0]}")


def _dtype_label(arr: np.ndarray) -> str:
    """The DT_ name of an array's dtype, for messages."""
    return tensors.DataType.Name(tensors.dtype_enum("string" if arr.dtype.kind in "OSU" else arr.dtype.name))


def _label(x: Any) -> str:
    """A class label: proto3 strings are text, so bytes that are not UTF-8 get U+FFFD."""
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)


def regression_result(outputs: np.ndarray, num_examples: int | None = None) -> Any:
    """A RegressionResult from a regress signature's ``outputs`` ([batch] or [batch, 1] float32)."""
    if not (outputs.ndim == 1 or (outputs.ndim == 2 and outputs.shape[1] == 1)):
        raise InvalidArgument(f"Expected output Tensor shape to be either [batch_size] or [batch_size, 1] "
                              f"but got {rest_json.dims(outputs.shape)}")
    if num_examples is not None and outputs.shape[0] != num_examples:
        raise InvalidArgument(f"Input batch size did not match output batch size: {num_examples} "
                              f"vs. {outputs.shape[0]}")
    if outputs.dtype != np.float32:
        raise InvalidArgument(f"Expected output Tensor of DT_FLOAT.  Got: {_dtype_label(outputs)}")
    result = _PB.regression_pb2.RegressionResult()
    for value in outputs.reshape(-1).tolist():
        result.regressions.add(value=value)
    return result


# -- REST JSON -------------------------------------------------------------------------------------

def parse_examples(body: bytes | rest_json.JsonRequest) -> tuple[np.ndarray, str | None]:
    """(serialized tf.Examples, signature_name or None) of a ``:classify`` or ``:regress`` body:
    ``{"signature_name": ..., "context": {...}, "examples": [{feature: value or list}, ...]}``.
    The context is merged into each example as ``serialize_input`` merges it."""
    req = rest_json.read_json(body)
    doc = req.doc
    context = _example_json(doc["context"]).SerializeToString() if "context" in doc else b""
    rows = doc.get("examples")
    if "examples" not in doc:
        raise rest_json.format_error(doc, "When method is classify, key 'examples' is expected and was not found")
    if not isinstance(rows, list):
        raise rest_json.format_error(doc, "Expecting 'examples' value to be an list/array")
    if not rows:
        raise rest_json.format_error(doc, "'examples' value is an empty array")
    out = np.empty(len(rows), dtype=object)
    out[:] = [context + _example_json(r).SerializeToString() for r in rows]
    return out, req.signature_name


def _example_json(value: Any) -> Any:
    """A tf.Example from a JSON object, by TF Serving's rules: ints and true/false -> int64_list,
    numbers with a fraction or exponent -> float_list, strings and {"b64": ...} -> bytes_list;
    one feature holds one kind."""
    if not isinstance(value, dict):
        raise InvalidArgument(f"Example must be JSON object but got JSON {rest_json.json_type(value)}")
    example = _PB.example_pb2.Example()
    features = example.features.feature
    for name, content in value.items():
        kind, values = None, []
        for item in content if isinstance(content, list) else [content]:
            item_kind, item = _feature_value(name, item)
            if kind is not None and item_kind != kind:
                raise InvalidArgument(f"Unexpected element type in feature: {name} expecting type: "
                                      f"{_KIND_NAMES[kind]}")
            kind = item_kind
            values.append(item)
        feature = features[name]
        if kind is not None:
            getattr(feature, kind).value.extend(values)
    return example


def _feature_value(name: str, item: Any) -> tuple[str, Any]:
    if isinstance(item, bool):
        return "int64_list", int(item)
    if isinstance(item, int):
        if item > _INT64[1]:
            raise InvalidArgument(f"Feature: {name} has uint64_t element. Only int64_t is supported.")
        return ("int64_list", item) if item >= _INT64[0] else ("float_list", float(item))
    if isinstance(item, float):
        return "float_list", item
    if isinstance(item, str):
        return "bytes_list", item.encode("utf-8")
    if rest_json.is_b64(item):
        return "bytes_list", rest_json.decode_b64(item)
    raise InvalidArgument(f"Feature: {name} has element with unexpected JSON type: {rest_json.json_type(item)}")


def format_classify(result: Any) -> bytes:
    """A ClassificationResult as ``{"results": [[["label", score], ...], ...]}``, one list per example."""
    if not len(result.classifications):
        raise InvalidArgument("Cannot convert empty ClassificationResults to JSON")
    return orjson.dumps({"results": [[[c.label, _float32(c.score)] for c in cl.classes]
                                     for cl in result.classifications]}, option=orjson.OPT_SERIALIZE_NUMPY)


def format_regress(result: Any) -> bytes:
    """A RegressionResult as ``{"results": [value, ...]}``."""
    if not len(result.regressions):
        raise InvalidArgument("Cannot convert empty RegressionResults to JSON")
    return orjson.dumps({"results": [_float32(r.value) for r in result.regressions]},
                        option=orjson.OPT_SERIALIZE_NUMPY)


def _float32(value: float) -> Any:
    """A proto float written as its float32's shortest repr; NaN and +-Infinity as TF Serving's tokens."""
    if value - value == 0:
        return np.float32(value)
    return orjson.Fragment(b"NaN" if value != value else b"Infinity" if value > 0 else b"-Infinity")
