"""The split check (sgserve/worker/split_check.py) over real SavedModels, loaded by the real loader
into real segments and called through the worker's ModelRuntime, as a worker does at load."""
from __future__ import annotations

import os

import numpy as np
import pytest

from sgserve.models import loader, shared_segment
from sgserve.models.demo import build_demo_model
from sgserve.models.warmup import WarmupRequest
from sgserve.worker import split_check
from tests import model_builders, split_models
from tests.conftest import demo_inputs, sgserve_segments

BUILDERS = {
    "demo": lambda base: build_demo_model(os.path.join(base, "1")),
    "keras": model_builders.build_keras_strings,
    "cnn": split_models.build_text_cnn,
    "cross": split_models.build_cross_row,
    "ints": split_models.build_int_outputs,
}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """name -> (ModelSpec, ModelRuntime), built on first use; runtimes closed, segments unlinked."""
    from sgserve.worker.runtime import ModelRuntime

    root = tmp_path_factory.mktemp("split")
    made: dict[str, tuple] = {}

    def get(name: str):
        if name not in made:
            base = str(root / name)
            BUILDERS[name](base)
            spec = loader.load_version(name, base, 1, shared_segment.server_id())
            made[name] = (spec, None)
            made[name] = (spec, ModelRuntime(spec.segment))
        return made[name]

    yield get
    for spec, rt in made.values():
        if rt is not None:
            rt.close()
        shared_segment.unlink(spec.segment)
    left = {s.segment.lstrip("/") for s, _ in made.values()} & sgserve_segments()
    assert not left, f"segments left in /dev/shm: {left}"


# -- (1) the leading batch dimension, from the metadata --------------------------------------------
def test_batched_signatures_have_a_leading_batch_dim(loaded):
    spec, _ = loaded("demo")
    assert split_check.leading_batch_dim(spec.signatures["serving_default"]) is None
    spec, _ = loaded("keras")
    assert split_check.leading_batch_dim(spec.signatures["serving_default"]) is None


def test_fixed_first_dimension_fails_the_leading_dim_check(loaded):
    spec, rt = loaded("cross")
    want = "input 'x' has a fixed first dimension 3 (shape [3, 2]): no batch dimension"
    assert split_check.leading_batch_dim(spec.signatures["fixed"]) == want
    # check_signature refuses it before running anything, even with good warmup rows.
    assert split_check.check_signature(rt, "fixed", {"x": np.ones((3, 2), np.float32)}) == want


def test_output_without_rows_fails_the_leading_dim_check(loaded):
    spec, rt = loaded("cross")
    want = "output 'rows' is a scalar: no leading batch dimension"
    assert split_check.leading_batch_dim(spec.signatures["row_count"]) == want
    assert split_check.check_signature(rt, "row_count", None) == want


@pytest.mark.parametrize("sig,want", [
    ({"inputs": {"x": {"dtype": "float32", "shape": None}}, "outputs": {}},
     "input 'x' has an unknown rank: no leading batch dimension"),
    ({"inputs": {"x": {"dtype": "float32", "shape": [-1]}}, "outputs": {"y": {"dtype": "float32", "shape": [4, -1]}}},
     "output 'y' has a fixed first dimension 4 (shape [4, ?]): no batch dimension"),
    ({"inputs": {}, "outputs": {"y": {"dtype": "float32", "shape": [-1]}}},
     "the signature takes no inputs: no rows to split"),
])
def test_leading_dim_reasons(sig, want):
    assert split_check.leading_batch_dim(sig) == want


# -- (2) split answers equal unsplit answers -------------------------------------------------------
def test_demo_model_passes(loaded):
    _, rt = loaded("demo")
    # A 1-row warmup record (tiled to CHECK_ROWS), several records, and synthetic inputs.
    assert split_check.check_signature(rt, "serving_default", demo_inputs(1)) is None
    assert split_check.check_signature(rt, "serving_default", [demo_inputs(3, seed=s) for s in range(4)]) is None
    assert split_check.check_signature(rt, "serving_default", None) is None


@pytest.mark.parametrize("parts", [2, 3, 7, 64])
def test_demo_model_1000_rows_within_tolerance(loaded, parts):
    """What the broker will do to a 1000-row request: the measured kernel differences between batch
    sizes stay inside the documented tolerance."""
    _, rt = loaded("demo")
    assert split_check.check_split(rt.signatures["serving_default"].run, demo_inputs(1000, seed=7), parts) is None


def test_keras_string_feature_model_passes(loaded):
    _, rt = loaded("keras")
    one_row = {"city": np.array([[b"tokyo"]], dtype=object), "num": np.array([[0.5, -1.0, 2.0]], np.float32)}
    assert split_check.check_signature(rt, "serving_default", one_row) is None
    assert split_check.check_signature(rt, "serving_default", None) is None
    many = {"city": np.array([[c] for c in (b"paris", b"lima", b"oslo", b"nowhere") * 5], dtype=object),
            "num": np.random.default_rng(2).normal(size=(20, 3)).astype(np.float32)}
    assert split_check.check_split(rt.signatures["serving_default"].run, many, 3) is None


def test_text_cnn_passes(loaded):
    _, rt = loaded("cnn")
    tokens = np.random.default_rng(4).integers(0, split_models.TEXT_CNN_VOCAB, (1, split_models.TEXT_CNN_LEN))
    assert split_check.check_signature(rt, "serving_default", {"tokens": tokens}) is None
    assert split_check.check_signature(rt, "serving_default", None) is None


# -- cross-row ops are detected ----------------------------------------------------------------
def test_batch_mean_fails_naming_the_output(loaded):
    _, rt = loaded("cross")
    why = split_check.check_signature(rt, "centered", {"x": np.array([[1.0, 2.0]], np.float32)})
    assert why is not None and why.startswith("output 'centered' split in 2 parts differs: max abs diff ")
    assert "doubled" not in why
    assert "tolerance rtol 0.0001" in why


def test_identical_rows_would_hide_a_batch_mean(loaded):
    """Why check_batch scales the tiled copies: x - mean(x) is zero for identical rows, split or not."""
    _, rt = loaded("cross")
    run = rt.signatures["centered"].run
    one_row = [{"x": np.array([[1.0, 2.0]], np.float32)}]
    plain = split_check.check_batch(one_row, perturb=False)
    assert plain["x"].shape == (8, 2) and np.all(plain["x"] == plain["x"][0])
    assert split_check.check_split(run, plain, 2) is None
    scaled = split_check.check_batch(one_row)
    np.testing.assert_array_equal(scaled["x"][:, 0], [1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 2.75])
    assert split_check.check_split(run, scaled, 2).startswith("output 'centered'")


def test_batch_softmax_fails_naming_the_output(loaded):
    _, rt = loaded("cross")
    why = split_check.check_signature(rt, "batch_softmax", None)
    assert why is not None and why.startswith("output 'p' split in 2 parts differs")
    # Even identical rows show it: each row gets 1/8 whole, 1/4 in a part of 4.
    plain = split_check.check_batch([{"x": np.ones((1, 2), np.float32)}], perturb=False)
    why = split_check.check_split(rt.signatures["batch_softmax"].run, plain, 2)
    assert why.startswith("output 'p' split in 2 parts differs: max abs diff 0.125 ")


# -- integer and string outputs compare exactly --------------------------------------------------
def test_integer_and_string_outputs_pass_exactly(loaded):
    _, rt = loaded("ints")
    x = np.random.default_rng(5).normal(size=(1, 5)).astype(np.float32)
    assert split_check.check_signature(rt, "serving_default", {"x": x}) is None
    assert split_check.check_signature(rt, "tags", {"ids": np.arange(10, dtype=np.int64)}) is None


def test_integer_output_is_compared_exactly(loaded):
    """stamp = ids * 1e9 + batch size: split, it is off by 4 in 8e9, far inside a float tolerance."""
    _, rt = loaded("ints")
    ids = np.arange(1, 9, dtype=np.int64)
    assert split_check.check_split(rt.signatures["stamp"].run, {"ids": ids}, 2) == (
        "output 'stamp' split in 2 parts differs in 8 element(s), first at row 0; int64 must be exact")
    # The same numbers as floats pass the float32 tolerance, which is why integers are exact.
    whole = rt.signatures["stamp"].run({"ids": ids})["stamp"]
    assert np.allclose(whole - 4, whole, rtol=1e-4, atol=0)


# -- rows that cannot be checked, and the whole version --------------------------------------------
def test_too_few_or_misaligned_rows_are_reasons(loaded):
    _, rt = loaded("demo")
    run = rt.signatures["serving_default"].run
    assert split_check.check_split(run, demo_inputs(1), 2) == "cannot be checked: 1 row(s) for 2 parts"
    odd = {"user_id": np.arange(3, dtype=np.int64), "item_id": np.arange(4, dtype=np.int64)}
    assert split_check.check_split(run, odd, 2) == (
        "cannot be checked: the inputs have different row counts {'item_id': 4, 'user_id': 3}")


def test_warmup_the_model_refuses_is_a_reason(loaded):
    _, rt = loaded("cross")
    why = split_check.check_signature(rt, "centered", {"x": np.ones((2, 3), np.float32)})
    assert why == "cannot be checked: the inputs fail unsplit (input 'x': expected shape [?, 2], got [8, 3])"


def test_row_ranges_cover_all_rows_in_order():
    assert split_check.row_ranges(8, 3) == [(0, 3), (3, 6), (6, 8)]
    assert split_check.row_ranges(1000, 3) == [(0, 334), (334, 667), (667, 1000)]
    assert split_check.row_ranges(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]


def test_check_version_gives_every_signature_a_verdict(loaded):
    _, rt = loaded("cross")
    requests = [WarmupRequest("centered", {"x": np.array([[1.0, 2.0], [0.0, -3.0]], np.float32)}),
                WarmupRequest("batch_softmax", {"x": np.array([[0.5, 0.5]], np.float32)})]
    verdicts = split_check.check_version(rt, requests)
    assert sorted(verdicts) == ["batch_softmax", "centered", "fixed", "row_count"]
    assert verdicts["centered"].startswith("output 'centered' split in 2 parts differs")
    assert verdicts["batch_softmax"].startswith("output 'p' split in 2 parts differs")
    assert verdicts["fixed"].startswith("input 'x' has a fixed first dimension 3")
    assert verdicts["row_count"] == "output 'rows' is a scalar: no leading batch dimension"
    _, demo = loaded("demo")
    assert split_check.check_version(demo, None) == {"serving_default": None}
