"""Warmup files: TF Serving's TFRecord of PredictionLog protos, and sgserve's JSON lines."""
from __future__ import annotations

import base64
import json
import logging
import os

import numpy as np
import pytest

from sgserve.models.warmup import (MAX_WARMUP_RECORDS, WarmupFormatError, read_sgserve_warmup,
                                   read_tfserving_warmup, tfserving_warmup_path)

from tests.conftest import import_required

# Required, not skipped: a broken install must fail the suite (scripts/setup.sh installs them).
tf = import_required("tensorflow")
prediction_log_pb2 = import_required("tensorflow_serving.apis.prediction_log_pb2")
classification_pb2 = import_required("tensorflow_serving.apis.classification_pb2")
predict_pb2 = import_required("tensorflow_serving.apis.predict_pb2")


def predict_log(signature: str, inputs: dict[str, np.ndarray], model: str = "ranker") -> bytes:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    return prediction_log_pb2.PredictionLog(
        predict_log=prediction_log_pb2.PredictLog(request=request)).SerializeToString()


def classify_log() -> bytes:
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = "ranker"
    request.input.example_list.examples.add()
    return prediction_log_pb2.PredictionLog(
        classify_log=prediction_log_pb2.ClassifyLog(request=request)).SerializeToString()


def write_records(path: str, records: list[bytes]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for record in records:
            writer.write(record)


def test_tfserving_warmup_file(tmp_path, caplog):
    path = tfserving_warmup_path(str(tmp_path / "7"))
    assert path == os.path.join(str(tmp_path), "7", "assets.extra", "tf_serving_warmup_requests")
    write_records(path, [
        predict_log("", {"dense": np.array([[0.5, -1.25, 3.0]], dtype=np.float32),
                         "ids": np.array([[1, 2 ** 40]], dtype=np.int64),
                         "query": np.array([b"shoes", "caf\u00e9".encode(), b"\x00\xff"], dtype=object)}),
        classify_log(),
        predict_log("by_item", {"item": np.array(9, dtype=np.int64)}),
    ])
    with caplog.at_level(logging.WARNING, logger="sgserve.models.warmup"):
        requests = read_tfserving_warmup(path)
    assert len(requests) == 2
    first, second = requests
    assert first.signature == "serving_default"  # empty signature_name
    assert first.model is None  # the file belongs to its version directory, whatever model_spec says
    assert sorted(first.inputs) == ["dense", "ids", "query"]
    dense, ids, query = first.inputs["dense"], first.inputs["ids"], first.inputs["query"]
    assert dense.dtype == np.float32 and dense.shape == (1, 3)
    np.testing.assert_array_equal(dense, [[0.5, -1.25, 3.0]])
    assert ids.dtype == np.int64 and ids.tolist() == [[1, 2 ** 40]]
    assert query.dtype == object and query.shape == (3,)
    assert query.tolist() == [b"shoes", "caf\u00e9".encode(), b"\x00\xff"]
    assert second.signature == "by_item"
    assert second.inputs["item"].dtype == np.int64 and second.inputs["item"].shape == ()
    assert second.inputs["item"] == 9
    skipped = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 1 and "1 classify_log" in skipped[0].getMessage()


def test_tfserving_warmup_over_the_limit(tmp_path):
    path = str(tmp_path / "1" / "assets.extra" / "tf_serving_warmup_requests")
    record = predict_log("serving_default", {"x": np.zeros(1, dtype=np.float32)})
    write_records(path, [record] * MAX_WARMUP_RECORDS)
    assert len(read_tfserving_warmup(path)) == MAX_WARMUP_RECORDS
    write_records(path, [record] * (MAX_WARMUP_RECORDS + 1))
    with pytest.raises(WarmupFormatError, match=r"Number of warmup records exceeds the maximum \(1000\) at .*"
                                                r"tf_serving_warmup_requests"):
        read_tfserving_warmup(path)
    with pytest.raises(WarmupFormatError, match=r"maximum \(3\)"):
        read_tfserving_warmup(path, limit=3)


def test_tfserving_warmup_truncated(tmp_path):
    path = str(tmp_path / "assets.extra" / "tf_serving_warmup_requests")
    record = predict_log("serving_default", {"x": np.arange(8, dtype=np.float32)})
    write_records(path, [record, record])
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:-10])
    with pytest.raises(WarmupFormatError) as info:
        read_tfserving_warmup(path)
    message = str(info.value)
    assert "record 2 of " + path in message and "TFRecord format" in message


def test_tfserving_warmup_not_tfrecord_or_not_predictionlog(tmp_path):
    garbage = str(tmp_path / "garbage")
    with open(garbage, "wb") as f:
        f.write(b"this is not a TFRecord file at all")
    with pytest.raises(WarmupFormatError, match=r"record 1 of .*garbage.*TFRecord format"):
        read_tfserving_warmup(garbage)
    not_a_log = str(tmp_path / "d" / "not_a_log")
    write_records(not_a_log, [b"\xff\xff\xff"])
    with pytest.raises(WarmupFormatError, match=r"Failed to parse warmup record 1 from .*not_a_log"):
        read_tfserving_warmup(not_a_log)
    with pytest.raises(WarmupFormatError, match="does not exist"):
        read_tfserving_warmup(str(tmp_path / "missing"))


def test_tfserving_warmup_session_run_log_is_refused(tmp_path):
    path = str(tmp_path / "d" / "w")
    write_records(path, [prediction_log_pb2.PredictionLog(
        session_run_log=prediction_log_pb2.SessionRunLog()).SerializeToString()])
    with pytest.raises(WarmupFormatError, match="Unsupported log_type for warmup: session_run_log"):
        read_tfserving_warmup(path)


BLOB = base64.b64encode(b"\x00\x01bin").decode()
SGSERVE_WARMUP = f"""\
# sgserve warmup requests: one JSON object per line
{{"inputs": {{"dense": [[0.5, 1]], "ids": [[3, 4]], "query": ["shoes", "caf\\u00e9"]}}}}

{{"signature": "by_item", "model": "ranker", "inputs": {{"item": [[1], [2]], "w": [1, 2]}}, \
"dtypes": {{"item": "int32", "w": "float64"}}}}
   # indented comment
{{"inputs": {{"blob": [{{"b64": "{BLOB}"}}], "flag": [true, false], "n": 5}}, "dtypes": {{"blob": "string"}}}}
"""


def test_sgserve_warmup_json_lines(tmp_path):
    path = tmp_path / "warmup.jsonl"
    path.write_text(SGSERVE_WARMUP)
    first, second, third = read_sgserve_warmup(str(path))
    assert first.signature == "serving_default" and first.model is None
    assert first.inputs["dense"].dtype == np.float32 and first.inputs["dense"].tolist() == [[0.5, 1.0]]
    assert first.inputs["ids"].dtype == np.int64 and first.inputs["ids"].tolist() == [[3, 4]]
    assert first.inputs["query"].dtype == object
    assert first.inputs["query"].tolist() == [b"shoes", "caf\u00e9".encode()]
    assert second.signature == "by_item" and second.model == "ranker"
    assert second.inputs["item"].dtype == np.int32 and second.inputs["item"].shape == (2, 1)
    assert second.inputs["w"].dtype == np.float64 and second.inputs["w"].tolist() == [1.0, 2.0]
    assert third.inputs["blob"].dtype == object and third.inputs["blob"].tolist() == [b"\x00\x01bin"]
    assert third.inputs["flag"].dtype == np.bool_ and third.inputs["flag"].tolist() == [True, False]
    assert third.inputs["n"].dtype == np.int64 and third.inputs["n"].shape == ()


@pytest.mark.parametrize("line, expected", [
    ('{"inputs": {"x": [1, 2]', "not valid JSON"),
    ('[1, 2]', "must be a JSON object"),
    ('{"input": {"x": [1]}}', "unknown key(s) 'input'"),
    ('{"signature": "s"}', '"inputs" must be an object'),
    ('{"inputs": {"x": [1]}, "dtypes": {"x": "float128"}}', "unknown dtype 'float128'"),
    ('{"inputs": {"x": [1]}, "dtypes": {"y": "int64"}}', "which \"inputs\" does not have"),
    ('{"inputs": {"x": [[1, 2], [3]]}}', "not a rectangular nested list"),
    ('{"inputs": {"x": [1, "a"]}}', "mixes strings and numbers"),
    ('{"inputs": {"x": [1.5]}, "dtypes": {"x": "int64"}}', "needs integers"),
    ('{"inputs": {"x": [300]}, "dtypes": {"x": "uint8"}}', "out of range for uint8"),
    ('{"inputs": {"x": ["a"]}, "dtypes": {"x": "float32"}}', "needs numbers"),
    ('{"inputs": {"x": [1]}, "dtypes": {"x": "string"}}', "needs JSON strings"),
    ('{"inputs": {"x": [{"b64": "!!"}]}}', "invalid base64"),
])
def test_sgserve_warmup_bad_line(tmp_path, line, expected):
    path = tmp_path / "warmup.jsonl"
    path.write_text('# ok so far\n{"inputs": {"x": [1]}}\n\n' + line + "\n")
    with pytest.raises(WarmupFormatError) as info:
        read_sgserve_warmup(str(path))
    assert f"{path}:4:" in str(info.value) and expected in str(info.value), str(info.value)


def test_sgserve_warmup_limit_and_missing(tmp_path):
    path = tmp_path / "warmup.jsonl"
    line = json.dumps({"inputs": {"x": [1.0]}}) + "\n"
    path.write_text("# header\n" + line * MAX_WARMUP_RECORDS)
    assert len(read_sgserve_warmup(str(path))) == MAX_WARMUP_RECORDS
    path.write_text(line * (MAX_WARMUP_RECORDS + 1))
    with pytest.raises(WarmupFormatError, match=r"exceeds the maximum \(1000\) .*line 1001"):
        read_sgserve_warmup(str(path))
    with pytest.raises(WarmupFormatError, match="does not exist"):
        read_sgserve_warmup(str(tmp_path / "missing.jsonl"))
