"""TF Serving's gRPC API, through TF Serving's own stubs, as its documentation uses them:
`tf.make_tensor_proto` in, `tf.make_ndarray` out, outputs equal to `tf.saved_model.load`'s."""
from __future__ import annotations

import concurrent.futures
import os
import time

import grpc
import numpy as np
import pytest

from tests.conftest import wait_until
from tests.frontdoor import models

tf = pytest.importorskip("tensorflow")
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, get_model_status_pb2,  # noqa: E402
                                     inference_pb2, model_management_pb2, model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc, regression_pb2)
from tensorflow_serving.config import model_server_config_pb2  # noqa: E402


@pytest.fixture(scope="module")
def channel(tfs_server):
    ch = grpc.insecure_channel(f"127.0.0.1:{tfs_server.grpc_port}")
    grpc.channel_ready_future(ch).result(timeout=30)
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def stub(channel):
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


@pytest.fixture(scope="module")
def model_stub(channel):
    return model_service_pb2_grpc.ModelServiceStub(channel)


def predict_request(model: str, inputs: dict, signature: str = "", **spec) -> predict_pb2.PredictRequest:
    req = predict_pb2.PredictRequest()
    req.model_spec.name = model
    req.model_spec.signature_name = signature
    for key, value in spec.items():
        if key == "version":
            req.model_spec.version.value = value
        else:
            setattr(req.model_spec, key, value)
    for name, arr in inputs.items():
        req.inputs[name].CopyFrom(tf.make_tensor_proto(arr))
    return req


def reference(path: str, inputs: dict, signature: str = "serving_default") -> dict[str, np.ndarray]:
    fn = tf.saved_model.load(os.path.join(path, "1")).signatures[signature]
    return {k: v.numpy() for k, v in fn(**{k: tf.constant(v) for k, v in inputs.items()}).items()}


CASES = {
    "tf2": {"ids": np.array([1, 5, 7], np.int64), "dense": np.arange(12, dtype=np.float32).reshape(3, 4)},
    "tf1": {"x": np.array([1.0, 2.0], np.float32), "ids": np.array([3, 4], np.int64)},
    "hpt": {"x": np.array([1.0, 2.0, 5.0], np.float32)},
    "keras": {"city": np.array([[b"paris"], [b"lima"], [b"\xff\x00raw"]], dtype=object),
              "num": np.ones((3, 3), np.float32)},
}


@pytest.mark.parametrize("model", sorted(CASES))
def test_predict_with_the_stock_stub_equals_the_saved_model(stub, frontdoor_models, model):
    inputs = CASES[model]
    response = stub.Predict(predict_request(model, inputs), 30)
    want = reference(frontdoor_models[model], inputs)
    got = {k: tf.make_ndarray(v) for k, v in response.outputs.items()}
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
        assert got[k].dtype == want[k].dtype
    assert (response.model_spec.name, response.model_spec.version.value) == (model, 1)
    assert response.model_spec.signature_name == "serving_default"


def test_typed_value_fields_signature_version_and_output_filter(stub, frontdoor_models):
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "tf2"
    req.model_spec.signature_name = "embed"
    req.model_spec.version.value = 1
    ids = req.inputs["ids"]
    ids.dtype = tf.int64.as_datatype_enum
    ids.tensor_shape.dim.add(size=2)
    ids.int64_val.extend([2, 9])  # typed field, not tensor_content
    got = tf.make_ndarray(stub.Predict(req, 30).outputs["emb"])
    np.testing.assert_allclose(got, reference(frontdoor_models["tf2"], {"ids": np.array([2, 9])}, "embed")["emb"])
    filtered = predict_request("tf2", CASES["tf2"])
    filtered.output_filter.append("norm")
    assert list(stub.Predict(filtered, 30).outputs) == ["norm"]
    splat = predict_pb2.PredictRequest()
    splat.model_spec.name = "hpt"
    x = splat.inputs["x"]
    x.dtype = tf.float32.as_datatype_enum
    x.tensor_shape.dim.add(size=3)
    x.float_val.append(4.0)  # one value for three elements: TensorFlow repeats it
    assert tf.make_ndarray(stub.Predict(splat, 30).outputs["y"]).tolist() == [4.0, 4.0, 4.0]


def test_get_model_metadata_gives_signature_defs(stub):
    req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    req.model_spec.name = "tf2"
    response = stub.GetModelMetadata(req, 30)
    sigmap = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(sigmap)
    assert sorted(sigmap.signature_def) == ["embed", "serving_default"]
    serve = sigmap.signature_def["serving_default"]
    assert serve.inputs["ids"].dtype == tf.int64.as_datatype_enum
    assert [d.size for d in serve.inputs["dense"].tensor_shape.dim] == [-1, 4]
    assert sorted(serve.outputs) == ["norm", "y"]
    assert response.model_spec.version.value == 1
    bad = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["graph"])
    bad.model_spec.name = "tf2"
    with pytest.raises(grpc.RpcError) as err:
        stub.GetModelMetadata(bad, 30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Metadata field graph is not supported" in err.value.details()


def examples(xs: np.ndarray) -> list:
    return [tf.train.Example(features=tf.train.Features(feature={
        "x": tf.train.Feature(float_list=tf.train.FloatList(value=row.tolist()))})) for row in xs]


XS = np.array([[1.0, 2.0], [-3.0, 0.5], [0.0, 0.0]], np.float32)


def test_classify_regress_and_multi_inference(stub):
    req = classification_pb2.ClassificationRequest()
    req.model_spec.name = "cls"
    req.model_spec.signature_name = "classify"
    req.input.example_list.examples.extend(examples(XS))
    result = stub.Classify(req, 30).result
    assert len(result.classifications) == 3
    want = models.expected_scores(XS)
    for row, classification in enumerate(result.classifications):
        assert [c.label for c in classification.classes] == ["neg", "pos"]
        np.testing.assert_allclose([c.score for c in classification.classes], want[row], rtol=1e-5)

    rreq = regression_pb2.RegressionRequest()
    rreq.model_spec.name = "cls"
    rreq.model_spec.signature_name = "regress"
    rreq.input.example_list.examples.extend(examples(XS))
    got = [r.value for r in stub.Regress(rreq, 30).result.regressions]
    np.testing.assert_allclose(got, models.expected_regression(XS), rtol=1e-5)

    mreq = inference_pb2.MultiInferenceRequest()
    for sig, method in (("classify", "tensorflow/serving/classify"), ("regress", "tensorflow/serving/regress")):
        task = mreq.tasks.add(method_name=method)
        task.model_spec.name = "cls"
        task.model_spec.signature_name = sig
    mreq.input.example_list.examples.extend(examples(XS[:2]))
    results = stub.MultiInference(mreq, 30).results
    assert len(results) == 2
    assert len(results[0].classification_result.classifications) == 2
    np.testing.assert_allclose([r.value for r in results[1].regression_result.regressions],
                               models.expected_regression(XS[:2]), rtol=1e-5)

    wrong = regression_pb2.RegressionRequest()
    wrong.model_spec.name = "cls"
    wrong.model_spec.signature_name = "classify"  # a classify signature asked to regress
    wrong.input.example_list.examples.extend(examples(XS))
    with pytest.raises(grpc.RpcError) as err:
        stub.Regress(wrong, 30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tensorflow/serving/regress" in err.value.details()


@pytest.mark.parametrize("build, code, words", [
    (lambda: predict_request("nope", CASES["hpt"]), grpc.StatusCode.NOT_FOUND, "model 'nope' is not served"),
    (lambda: predict_request("hpt", CASES["hpt"], signature="nope"), grpc.StatusCode.NOT_FOUND, "no signature 'nope'"),
    (lambda: predict_request("hpt", CASES["hpt"], version=9), grpc.StatusCode.NOT_FOUND, "no version 9"),
    (lambda: predict_request("hpt", {"x": np.array([1, 2], np.int32)}), grpc.StatusCode.INVALID_ARGUMENT, "int32"),
    (lambda: predict_request("hpt", {"q": np.array([1.0], np.float32)}), grpc.StatusCode.INVALID_ARGUMENT,
     "missing input(s) ['x']"),
    (lambda: predict_request("complex", {"x": np.array([1.0], np.float32)}), grpc.StatusCode.INTERNAL, "complex64"),
    (lambda: predict_request("", CASES["hpt"]), grpc.StatusCode.INVALID_ARGUMENT, "ModelSpec"),
])
def test_error_codes(stub, build, code, words):
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(build(), 30)
    assert err.value.code() == code, err.value.details()
    assert words in err.value.details()


def test_unsupported_tensor_dtype_is_invalid_argument(stub):
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "hpt"
    req.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([1 + 1j], np.complex64)))
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(req, 30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "DT_COMPLEX64" in err.value.details()


# Rows of work that keep a worker busy for about 2 s (37 us each on one core): long enough that all
# four busy requests are held at once even when the machine is loaded and their sends straggle.
BUSY_N = 60_000


def slow_request(n: int) -> predict_pb2.PredictRequest:
    return predict_request("slow", {"x": np.array([1.0], np.float32), "n": np.array([n], np.int32)})


def test_deadline_exceeded_and_the_request_is_not_run_then_overload_is_resource_exhausted(stub, tfs_server):
    """Both workers busy with slow requests: a request whose gRPC deadline passes while it waits
    gets DEADLINE_EXCEEDED and never reaches a worker; past --max-enqueued, RESOURCE_EXHAUSTED."""
    with tfs_server.client() as native:
        served_before = sum(w["served"] for w in native.status()["workers"])
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        busy = [pool.submit(stub.Predict, slow_request(BUSY_N), 60) for _ in range(4)]  # 2 per worker
        wait_until(lambda: _inflight(tfs_server) == 4, 30, "both workers to hold two slow requests")
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            stub.Predict(slow_request(1), 0.3)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 2.0
        wait_until(lambda: _queued(tfs_server) == 0, 10, "the broker to drop the expired request")
        queued = [pool.submit(stub.Predict, slow_request(1), 60) for _ in range(2)]  # fills --max-enqueued 2
        wait_until(lambda: _queued(tfs_server) == 2, 30, "two requests queued in the broker")
        with pytest.raises(grpc.RpcError) as err:
            stub.Predict(slow_request(1), 30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-enqueued" in err.value.details()
        for f in busy + queued:
            assert tf.make_ndarray(f.result().outputs["y"]).tolist() == [2.0]
    with tfs_server.client() as native:
        served_after = sum(w["served"] for w in native.status()["workers"])
    assert served_after - served_before == 6, "the request past its deadline must not run"


def _inflight(server) -> int:
    with server.client(5) as c:
        return sum(w["inflight"] for w in c.status()["workers"])


def _queued(server) -> int:
    with server.client(5) as c:
        return c.status()["queued"]


# Last in the module: the reload leaves the workers loading and unloading versions for a while,
# which the deadline test above must not run into.
def status_of(model_stub, name: str, **spec) -> list[tuple[int, int]]:
    req = get_model_status_pb2.GetModelStatusRequest()
    req.model_spec.name = name
    if "version" in spec:
        req.model_spec.version.value = spec["version"]
    response = model_stub.GetModelStatus(req, 30)
    return [(v.version, v.state) for v in response.model_version_status]


AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE


def test_model_status_and_a_live_config_reload(model_stub, stub, tfs_server, frontdoor_models, tmp_path):
    assert status_of(model_stub, "hpt") == [(1, AVAILABLE)]
    assert status_of(model_stub, "hpt", version=1) == [(1, AVAILABLE)]
    with pytest.raises(grpc.RpcError) as err:
        status_of(model_stub, "nope")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    # Serve the same models plus "hpt2" (half_plus_two under another name): the reload returns once
    # hpt2 is AVAILABLE, and it serves at once.
    config = model_server_config_pb2.ModelServerConfig()
    for name, path in {**frontdoor_models, "hpt2": frontdoor_models["hpt"]}.items():
        config.model_config_list.config.add(name=name, base_path=path, model_platform="tensorflow")
    reload = model_management_pb2.ReloadConfigRequest(config=config)
    response = model_stub.HandleReloadConfigRequest(reload, 120)
    assert response.status.error_code == 0
    assert status_of(model_stub, "hpt2") == [(1, AVAILABLE)]
    y = stub.Predict(predict_request("hpt2", {"x": np.array([2.0], np.float32)}), 30).outputs["y"]
    assert tf.make_ndarray(y).tolist() == [3.0]

    # A config whose label points at a version that does not exist is refused; nothing changes.
    bad = model_server_config_pb2.ModelServerConfig()
    bad.CopyFrom(config)
    bad.model_config_list.config[0].version_labels["stable"] = 7
    with pytest.raises(grpc.RpcError) as err:
        model_stub.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(config=bad), 30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "version label 'stable'" in err.value.details()

    # A model that cannot load: the reload answers its error, and predicting on it is UNAVAILABLE.
    broken = tmp_path / "broken"
    (broken / "1").mkdir(parents=True)
    (broken / "1" / "saved_model.pb").write_bytes(b"not a SavedModel")
    config.model_config_list.config.add(name="broken", base_path=str(broken), model_platform="tensorflow")
    with pytest.raises(grpc.RpcError) as err:
        model_stub.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(config=config), 120)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "broken" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(predict_request("broken", {"x": np.array([1.0], np.float32)}), 30)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no available version" in err.value.details()

    # Back to the launch configuration (the other tests' models, nothing more).
    original = model_server_config_pb2.ModelServerConfig()
    for name, path in frontdoor_models.items():
        original.model_config_list.config.add(name=name, base_path=path, model_platform="tensorflow")
    model_stub.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(config=original), 60)
    wait_until(lambda: _gone(model_stub, "hpt2"), 30, "hpt2 to be unloaded")


def _gone(model_stub, name: str) -> bool:
    try:
        return all(state == get_model_status_pb2.ModelVersionStatus.END for _, state in status_of(model_stub, name))
    except grpc.RpcError as exc:
        return exc.code() == grpc.StatusCode.NOT_FOUND
