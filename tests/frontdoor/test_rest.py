"""TF Serving's REST API with `requests`, on every route, in both formats, with b64 strings."""
from __future__ import annotations

import base64
import os

import numpy as np
import pytest
import requests

from tests.frontdoor import models
from tests.frontdoor.conftest import METRICS_PATH

tf = pytest.importorskip("tensorflow")


def reference(path: str, inputs: dict, signature: str = "serving_default") -> dict[str, np.ndarray]:
    fn = tf.saved_model.load(os.path.join(path, "1")).signatures[signature]
    return {k: v.numpy() for k, v in fn(**{k: tf.constant(v) for k, v in inputs.items()}).items()}


def post(server, path: str, body) -> requests.Response:
    return requests.post(server.rest + path, json=body, timeout=30)


def test_model_status_is_the_readiness_probe(tfs_server):
    r = requests.get(tfs_server.rest + "/v1/models/hpt", timeout=10)
    assert r.status_code == 200
    assert r.json() == {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
    assert requests.get(tfs_server.rest + "/v1/models/hpt/versions/1", timeout=10).status_code == 200
    missing = requests.get(tfs_server.rest + "/v1/models/nope", timeout=10)
    assert missing.status_code == 404 and "nope" in missing.json()["error"]
    assert requests.get(tfs_server.rest + "/v1/models/hpt/versions/9", timeout=10).status_code == 404
    assert requests.get(tfs_server.rest + "/healthz", timeout=10).json() == {"status": "ok"}


def test_metadata(tfs_server):
    r = requests.get(tfs_server.rest + "/v1/models/tf2/metadata", timeout=10)
    assert r.status_code == 200
    body = r.json()
    assert body["model_spec"]["name"] == "tf2" and body["model_spec"]["version"] == "1"
    sigs = body["metadata"]["signature_def"]["signature_def"]
    assert sorted(sigs) == ["embed", "serving_default"]
    assert sigs["serving_default"]["inputs"]["ids"]["dtype"] == "DT_INT64"
    assert [d["size"] for d in sigs["serving_default"]["inputs"]["dense"]["tensor_shape"]["dim"]] == ["-1", "4"]


TF2 = {"ids": np.array([1, 5, 7], np.int64), "dense": np.arange(12, dtype=np.float32).reshape(3, 4)}


def test_predict_row_and_columnar_formats(tfs_server, frontdoor_models):
    want = reference(frontdoor_models["tf2"], TF2)
    rows = [{"ids": int(i), "dense": d.tolist()} for i, d in zip(TF2["ids"], TF2["dense"])]
    r = post(tfs_server, "/v1/models/tf2:predict", {"instances": rows})
    assert r.status_code == 200, r.text
    predictions = r.json()["predictions"]
    assert len(predictions) == 3
    np.testing.assert_allclose([p["y"] for p in predictions], want["y"], rtol=1e-5)
    np.testing.assert_allclose([p["norm"] for p in predictions], want["norm"], rtol=1e-5)

    cols = {"ids": TF2["ids"].tolist(), "dense": TF2["dense"].tolist()}
    r = post(tfs_server, "/v1/models/tf2/versions/1:predict", {"inputs": cols, "signature_name": "serving_default"})
    assert r.status_code == 200, r.text
    outputs = r.json()["outputs"]
    np.testing.assert_allclose(outputs["y"], want["y"], rtol=1e-5)
    np.testing.assert_allclose(outputs["norm"], want["norm"], rtol=1e-5)

    r = post(tfs_server, "/v1/models/tf2:predict", {"signature_name": "embed", "instances": [2, 9]})
    assert r.status_code == 200, r.text
    want_emb = reference(frontdoor_models["tf2"], {"ids": np.array([2, 9])}, "embed")["emb"]
    np.testing.assert_allclose(r.json()["predictions"], want_emb, rtol=1e-5)


def test_predict_strings_plain_and_b64(tfs_server, frontdoor_models):
    cities = np.array([[b"paris"], [b"lima"], [b"\xff\x00raw"]], dtype=object)
    num = np.ones((3, 3), np.float32)
    want = reference(frontdoor_models["keras"], {"city": cities, "num": num})
    out_key = next(iter(want))
    rows = [{"city": ["paris"], "num": [1, 1, 1]}, {"city": [{"b64": base64.b64encode(b"lima").decode()}],
                                                    "num": [1, 1, 1]},
            {"city": [{"b64": base64.b64encode(b"\xff\x00raw").decode()}], "num": [1.0, 1.0, 1.0]}]
    r = post(tfs_server, "/v1/models/keras:predict", {"instances": rows})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["predictions"], want[out_key], rtol=1e-5)


def test_half_plus_two_as_in_tf_servings_docs(tfs_server):
    r = post(tfs_server, "/v1/models/hpt:predict", {"instances": [1.0, 2.0, 5.0]})
    assert r.status_code == 200
    assert r.json() == {"predictions": [2.5, 3.0, 4.5]}


def test_classify_and_regress(tfs_server):
    xs = [[1.0, 2.0], [-3.0, 0.5]]
    body = {"signature_name": "classify", "examples": [{"x": x} for x in xs]}
    r = post(tfs_server, "/v1/models/cls:classify", body)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    want = models.expected_scores(np.array(xs))
    for row, result in enumerate(results):
        assert [label for label, _ in result] == ["neg", "pos"]
        np.testing.assert_allclose([score for _, score in result], want[row], rtol=1e-5)
    r = post(tfs_server, "/v1/models/cls:regress", {"signature_name": "regress", "examples": [{"x": x} for x in xs]})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["results"], models.expected_regression(np.array(xs)), rtol=1e-5)


@pytest.mark.parametrize("path, body, code, words", [
    ("/v1/models/nope:predict", {"instances": [1.0]}, 404, "nope"),
    ("/v1/models/hpt:predict", {"signature_name": "nope", "instances": [1.0]}, 404, "no signature 'nope'"),
    ("/v1/models/hpt/versions/9:predict", {"instances": [1.0]}, 404, "version"),
    ("/v1/models/hpt:predict", {"instances": ["a"]}, 400, ""),
    ("/v1/models/hpt:predict", {"nothing": 1}, 400, "instances"),
    ("/v1/models/complex:predict", {"instances": [1.0]}, 500, "complex64"),
    ("/v1/models/hpt:explode", {"instances": [1.0]}, 400, "Malformed request"),
])
def test_error_codes(tfs_server, path, body, code, words):
    r = post(tfs_server, path, body)
    assert r.status_code == code, r.text
    assert words in r.json()["error"]


def test_malformed_json_is_400(tfs_server):
    r = requests.post(tfs_server.rest + "/v1/models/hpt:predict", data=b"{not json", timeout=10)
    assert r.status_code == 400 and "JSON" in r.json()["error"]


def test_metrics_count_exactly(tfs_server):
    """N predicts over REST, gRPC and the native protocol: the page reads N more for each."""
    from prometheus_client.parser import text_string_to_metric_families

    def counts() -> dict[tuple[str, str], float]:
        page = requests.get(tfs_server.rest + METRICS_PATH, timeout=10)
        assert page.status_code == 200
        out = {}
        for family in text_string_to_metric_families(page.text):
            if family.name == ":tensorflow:serving:request_count":
                for s in family.samples:
                    out[(s.labels["model_name"], s.labels["status"])] = s.value
        return out

    before = counts()
    for _ in range(7):
        assert post(tfs_server, "/v1/models/hpt:predict", {"instances": [1.0]}).status_code == 200
    for _ in range(3):  # a shape the model refuses: the worker answers 400
        assert post(tfs_server, "/v1/models/hpt:predict", {"instances": [[1.0, 2.0]]}).status_code == 400
    with tfs_server.client() as c:
        for _ in range(5):
            c.predict("hpt", {"x": np.array([1.0], np.float32)})
    after = counts()
    assert after.get(("hpt", "OK"), 0) - before.get(("hpt", "OK"), 0) == 12
    assert after.get(("hpt", "INVALID_ARGUMENT"), 0) - before.get(("hpt", "INVALID_ARGUMENT"), 0) == 3
