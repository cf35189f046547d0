"""The worker's call plan (sgserve/worker/call_plan.py) over real SavedModels and real segments.

run_wire takes a request's header entries and payload frames straight off the wire; it must refuse
exactly what protocol.check_tensors, decoding and SignatureRunner.validate refuse, with the same
messages, and return what stock TensorFlow returns, bit for bit.
"""
from __future__ import annotations

import gc
import os
import threading

import msgpack
import numpy as np
import pytest

from sgserve import protocol
from sgserve.models import loader, shared_segment
from sgserve.errors import InvalidArgument
from tests.models import test_model_formats

NUMERIC = tuple(protocol.DTYPES)


def build_all_dtypes(base: str) -> str:
    """One signature per wire dtype, id_<dtype>(x: dtype[None, 2]) -> {y: x, rows, w}, where w reads
    a float32 variable (so every graph has a shared tensor); strings(s: string[None]) joins and
    gathers a string variable; table() -> a variable itself; const() takes no input."""
    import tensorflow as tf

    m = tf.Module()
    m.w = tf.Variable(np.array([1.5, -2.0], np.float32))
    m.words = tf.Variable(["alpha", "beta", "gamma"])
    m.table = tf.Variable(np.arange(12, dtype=np.int64).reshape(6, 2))

    def identity_of(dt):
        @tf.function(input_signature=[tf.TensorSpec([None, 2], dt, name="x")])
        def f(x):
            rows = tf.shape(x)[0]
            return {"y": tf.identity(x), "rows": rows, "w": tf.gather(m.w, tf.zeros([rows], tf.int32))}
        return f

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="s")])
    def strings(s):
        n = tf.shape(s)[0]
        return {"joined": tf.strings.join([s, s], separator="|"), "len": tf.strings.length(s),
                "word": tf.gather(m.words, tf.math.floormod(tf.range(n), 3))}

    @tf.function(input_signature=[tf.TensorSpec([], tf.int64, name="i")])
    def table(i):
        return {"table": tf.identity(m.table), "row": tf.gather(m.table, i)}

    @tf.function(input_signature=[])
    def const():
        return {"w": m.w * 2.0}

    sigs = {f"id_{d}": identity_of(tf.as_dtype(d)) for d in NUMERIC}
    sigs.update({"strings": strings, "table": table, "const": const})
    tf.saved_model.save(m, os.path.join(base, "1"), signatures=sigs)
    return base


@pytest.fixture(scope="module")
def dtypes_dir(tmp_path_factory) -> str:
    return build_all_dtypes(str(tmp_path_factory.mktemp("dtypes") / "dtypes"))


@pytest.fixture(scope="module")
def runtime_of(models_dir, dtypes_dir):
    """name -> ModelRuntime over a segment the real loader wrote; the segments go at teardown."""
    from sgserve.worker.runtime import ModelRuntime

    made: dict[str, tuple[str, object]] = {}

    def get(name: str):
        if name not in made:
            base = dtypes_dir if name == "dtypes" else os.path.join(models_dir, name)
            spec = loader.load_version(name, base, 1, shared_segment.server_id())
            made[name] = (spec.segment, None)
            made[name] = (spec.segment, ModelRuntime(spec.segment))
        return made[name][1]

    yield get
    for seg, rt in made.values():
        if rt is not None:
            rt.close()
        shared_segment.unlink(seg)


_stock: dict[tuple[str, str], object] = {}


def reference(path: str, sig: str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What stock TensorFlow returns: tf.saved_model.load(path).signatures[sig](**feed)."""
    import tensorflow as tf

    key = (path, sig)
    if key not in _stock:
        _stock[key] = tf.saved_model.load(os.path.join(path, "1")).signatures[sig]
    args = {k: tf.constant(v.tolist() if v.dtype == object else v, dtype=tf.string if v.dtype == object else None)
            for k, v in feed.items()}
    return {k: v.numpy() for k, v in _stock[key](**args).items()}


def wire(feed: dict[str, np.ndarray], frames: str = "bytes") -> tuple[list, list]:
    """(header 'inputs' entries, payload frames) as a client sends them, decoded as the worker sees them."""
    metas, payload = [], []
    for name, arr in feed.items():
        meta, frame = protocol.encode_tensor(name, arr)
        metas.append(meta)
        payload.append(bytes(frame))
    metas = msgpack.unpackb(msgpack.packb(metas, use_bin_type=True), raw=False)  # as the header decodes
    if frames == "zmq":
        import zmq

        payload = [zmq.Frame(p) for p in payload]
    elif frames == "memoryview":
        payload = [memoryview(p) for p in payload]
    return metas, payload


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == sorted(want)
    for k, v in want.items():
        g = np.asarray(got[k])
        assert g.dtype == v.dtype, k
        assert g.shape == v.shape, k
        assert g.tobytes() == v.tobytes() if v.dtype != object else g.tolist() == v.tolist(), k


def sample(dtype: str, rows: int = 3) -> np.ndarray:
    if dtype == "bool":
        return (np.arange(rows * 2) % 3 == 0).reshape(rows, 2)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    if info is not None:
        return np.array([info.min, info.max, 0, 1, 7, info.max - 1][:rows * 2] * 2, dtype)[:rows * 2].reshape(rows, 2)
    return np.array([-1.5, 0.0, np.inf, 3.25, -0.0, 65504.0][:rows * 2], dtype).reshape(rows, 2)


# -- every dtype, strings, stock equality ----------------------------------------------------------
@pytest.mark.parametrize("dtype", NUMERIC)
@pytest.mark.parametrize("frames", ["bytes", "zmq"])
def test_every_numeric_dtype_round_trips(runtime_of, dtypes_dir, dtype, frames):
    runner = runtime_of("dtypes").signatures[f"id_{dtype}"]
    feed = {"x": sample(dtype)}
    want = reference(dtypes_dir, f"id_{dtype}", feed)
    assert want["y"].dtype == np.dtype(dtype)
    assert runner.plan.bind_wire(*wire(feed, frames)) is not None  # the one-pass path, not the fallback
    assert_same(runner.run_wire(*wire(feed, frames), None), want)
    assert_same(runner.run(feed), want)
    assert_same(runner.execute(feed), want)
    empty = {"x": sample(dtype)[:0]}
    assert_same(runner.run_wire(*wire(empty, frames), None), reference(dtypes_dir, f"id_{dtype}", empty))


def test_string_inputs_and_outputs(runtime_of, dtypes_dir):
    runner = runtime_of("dtypes").signatures["strings"]
    feed = {"s": np.array([b"", b"x", "h\u00e9".encode(), b"\x00\xff", b"long" * 100], dtype=object)}
    want = reference(dtypes_dir, "strings", feed)
    for frames in ("bytes", "zmq", "memoryview"):
        assert runner.plan.bind_wire(*wire(feed, frames)) is not None
        assert_same(runner.run_wire(*wire(feed, frames), None), want)
    assert_same(runner.run(feed), want)
    empty = {"s": np.empty(0, dtype=object)}
    assert_same(runner.run_wire(*wire(empty), None), reference(dtypes_dir, "strings", empty))


def test_keras_string_model_off_the_wire(runtime_of, models_dir):
    runner = runtime_of("keras").signatures["serving_default"]
    feed = {"city": np.array([[b"tokyo"], [b"oslo"], [b"unknown"], [b""]], dtype=object),
            "num": np.arange(12, dtype=np.float32).reshape(4, 3)}
    want = reference(os.path.join(models_dir, "keras"), "serving_default", feed)
    assert_same(runner.run_wire(*wire(feed, "zmq"), None), want)


CASES = test_model_formats.CASES  # the same models, signatures and inputs as the formats test


@pytest.mark.parametrize("name,sig,feed", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_outputs_bit_equal_stock_tensorflow(runtime_of, models_dir, name, sig, feed):
    runner = runtime_of(name).signatures[sig]
    want = reference(os.path.join(models_dir, name), sig, feed)
    assert_same(runner.run_wire(*wire(feed, "zmq"), None), want)
    assert_same(runner.run(feed), want)
    for batch in (1, 5):  # other shapes than the first call's
        part = {k: np.repeat(v[:1], batch, axis=0) for k, v in feed.items()}
        assert_same(runner.run_wire(*wire(part), None), reference(os.path.join(models_dir, name), sig, part))


def test_output_filter_fetches_only_those(runtime_of, models_dir):
    runner = runtime_of("tf2").signatures["serving_default"]
    feed = CASES[0][2]
    want = reference(os.path.join(models_dir, "tf2"), "serving_default", feed)
    for flt in (["norm"], ["y"], ["y", "norm"], ["norm", "norm"], []):
        got = runner.run_wire(*wire(feed), flt)
        names = sorted(set(flt)) if flt else sorted(want)
        assert_same(got, {k: want[k] for k in names})
        assert_same(runner.run(feed, flt), {k: want[k] for k in names})


def test_scalar_and_no_input_signatures(runtime_of, dtypes_dir):
    rt = runtime_of("dtypes")
    want = reference(dtypes_dir, "table", {"i": np.array(4, np.int64)})
    assert_same(rt.signatures["table"].run_wire(*wire({"i": np.array(4, np.int64)}), None), want)
    want = reference(dtypes_dir, "const", {})
    assert_same(rt.signatures["const"].run_wire(None, [], None), want)
    assert_same(rt.signatures["const"].run_wire([], [], None), want)


def test_outputs_never_alias_the_shared_tables(runtime_of):
    """An output that is a table itself comes back as a private, read-only copy: the mapping is
    read-only, and a write through a view of it would kill the worker."""
    rt = runtime_of("dtypes")
    out = rt.signatures["table"].run_wire(*wire({"i": np.array(1, np.int64)}), None)
    table = out["table"]
    assert table.tolist() == np.arange(12).reshape(6, 2).tolist()
    lo, hi = rt.view.address, rt.view.address + rt.view.size
    assert not lo <= table.ctypes.data < hi
    assert not table.flags.writeable
    with pytest.raises(ValueError):
        table[0, 0] = 5


# -- refusals: the same 400s as check_tensors + decode + validate -----------------------------------
def old_sequence_error(runner, metas, payload, output_filter) -> str:
    """The message today's path gives: protocol.check_tensors, decode_tensors, runner.validate."""
    with pytest.raises(InvalidArgument) as e:
        protocol.check_tensors(metas, payload)
        arrays = protocol.decode_tensors(metas, payload)
        runner.validate(arrays, output_filter)
    return e.value.message


def _bad_tf2():
    ids_m = {"name": "ids", "dtype": "int64", "shape": [2]}
    dense_m = {"name": "dense", "dtype": "float32", "shape": [2, 4]}
    ids_f, dense_f = np.array([1, 2], np.int64).tobytes(), np.ones((2, 4), np.float32).tobytes()
    return {
        "wrong dtype": ([dict(ids_m, dtype="int32"), dense_m], [np.array([1, 2], np.int32).tobytes(), dense_f], None),
        "wrong shape": ([ids_m, dict(dense_m, shape=[2, 3])], [ids_f, np.ones((2, 3), np.float32).tobytes()], None),
        "wrong rank": ([dict(ids_m, shape=[1, 2]), dense_m], [ids_f, dense_f], None),
        "missing input": ([ids_m], [ids_f], None),
        "extra input": ([ids_m, dense_m, {"name": "zz", "dtype": "float64", "shape": [1]}],
                        [ids_f, dense_f, b"\0" * 8], None),
        "extra instead of one": ([ids_m, {"name": "zz", "dtype": "float32", "shape": [2, 4]}], [ids_f, dense_f], None),
        "given twice": ([ids_m, ids_m], [ids_f, ids_f], None),
        "bad frame size": ([ids_m, dense_m], [ids_f, dense_f[:-1]], None),
        "frame count": ([ids_m, dense_m], [ids_f], None),
        "inputs not a list": ({"ids": 1}, [], None),
        "entry not a map": ([ids_m, ["dense"]], [ids_f, dense_f], None),
        "no name": ([ids_m, dict(dense_m, name=None)], [ids_f, dense_f], None),
        "unhashable name": ([ids_m, dict(dense_m, name=["dense"])], [ids_f, dense_f], None),
        "unknown dtype": ([ids_m, dict(dense_m, dtype="complex64")], [ids_f, dense_f], None),
        "negative dim": ([ids_m, dict(dense_m, shape=[-2, -4])], [ids_f, dense_f], None),
        "bool dim": ([dict(ids_m, shape=[True, True]), dense_m], [ids_f, dense_f], None),
        "float dim": ([dict(ids_m, shape=[2.0]), dense_m], [ids_f, dense_f], None),
        "shape not a list": ([dict(ids_m, shape=2), dense_m], [ids_f, dense_f], None),
        "string for numeric": ([dict(ids_m, dtype="string"), dense_m], [msgpack.packb([b"a", b"b"]), dense_f], None),
        "unknown output": ([ids_m, dense_m], [ids_f, dense_f], ["y", "nope"]),
        "output filter not names": ([ids_m, dense_m], [ids_f, dense_f], [["y"]]),
        "ok then bad size": ([dict(dense_m, shape=[2, 4]), dict(ids_m, shape=[3])], [dense_f, ids_f], None),
    }


@pytest.mark.parametrize("case", list(_bad_tf2()))
def test_refusals_match_the_old_sequence(runtime_of, case):
    runner = runtime_of("tf2").signatures["serving_default"]
    metas, payload, flt = _bad_tf2()[case]
    want = old_sequence_error(runner, metas, payload, flt)
    with pytest.raises(InvalidArgument) as e:
        runner.run_wire(metas, payload, flt)
    assert e.value.code == 400
    assert e.value.message == want
    with pytest.raises(InvalidArgument) as e:
        runner.validate_wire(metas, payload, flt)
    assert e.value.message == want


def _bad_strings():
    m = {"name": "s", "dtype": "string", "shape": [2]}
    two = msgpack.packb([b"a", b"b"], use_bin_type=True)
    return {
        "not an array": ([m], [b"\x01"]),
        "count mismatch": ([m], [msgpack.packb([b"a"], use_bin_type=True)]),
        "broken body": ([m], [b"\x92\xc4\x05ab"]),
        "trailing bytes": ([m], [two + b"\x00"]),
        "empty frame, two needed": ([m], [b""]),
        "numeric for string": ([dict(m, dtype="float32")], [np.ones(2, np.float32).tobytes()]),
        "wrong rank": ([dict(m, shape=[1, 2])], [two]),
    }


@pytest.mark.parametrize("case", list(_bad_strings()))
def test_string_refusals_match_the_old_sequence(runtime_of, case):
    runner = runtime_of("dtypes").signatures["strings"]
    metas, payload = _bad_strings()[case]
    want = old_sequence_error(runner, metas, payload, None)
    with pytest.raises(InvalidArgument) as e:
        runner.run_wire(metas, payload, None)
    assert (e.value.code, e.value.message) == (400, want)


def test_str_elements_decode_and_other_elements_are_refused(runtime_of, dtypes_dir):
    """A msgpack str element is text: both paths use its UTF-8 bytes. An int element is neither bin
    nor str: both paths refuse it (it used to become b"42")."""
    runner = runtime_of("dtypes").signatures["strings"]
    metas = [{"name": "s", "dtype": "string", "shape": [3]}]
    payload = [msgpack.packb(["t\u00e9xt", b"42", b"raw"], use_bin_type=True)]
    want = runner.run(protocol.decode_tensors(metas, payload))
    assert_same(runner.run_wire(metas, payload, None), want)
    assert want["joined"].tolist() == ["t\u00e9xt|t\u00e9xt".encode(), b"42|42", b"raw|raw"]
    bad = [msgpack.packb(["t\u00e9xt", 42, b"raw"], use_bin_type=True)]
    with pytest.raises(InvalidArgument) as e:
        runner.run_wire(metas, bad, None)
    assert (e.value.code, e.value.message) == (400, "string element 1 of input 's' is an int, expected bin or str")


def test_no_input_signature_refuses_a_stray_frame(runtime_of):
    runner = runtime_of("dtypes").signatures["const"]
    want = old_sequence_error(runner, [], [b"x"], None)
    with pytest.raises(InvalidArgument) as e:
        runner.run_wire([], [b"x"], None)
    assert e.value.message == want


def test_runtime_errors_are_400_and_the_same_on_every_path(runtime_of):
    runner = runtime_of("tf2").signatures["serving_default"]
    feed = {"ids": np.array([1, 5000], np.int64), "dense": np.ones((2, 4), np.float32)}
    messages = []
    for call in (lambda: runner.run_wire(*wire(feed), None), lambda: runner.run(feed), lambda: runner.execute(feed)):
        with pytest.raises(InvalidArgument) as e:
            call()
        assert e.value.code == 400
        messages.append(e.value.message)
    assert len(set(messages)) == 1
    assert messages[0].startswith("signature 'serving_default': ")
    assert "5000" in messages[0] and "\n" not in messages[0]


def test_run_checks_arrays_like_validate(runtime_of):
    """run() takes a fast path for exact arrays; anything else gets validate()'s message."""
    runner = runtime_of("tf2").signatures["serving_default"]
    bad = [
        {"ids": np.array([1], np.int64)},
        {"ids": np.array([1], np.int32), "dense": np.ones((1, 4), np.float32)},
        {"ids": np.array([1], np.int64), "dense": np.ones((1, 3), np.float32)},
        {"ids": np.array([1], np.int64), "dense": np.ones((1, 4), np.float32), "zz": np.ones(1)},
        {"ids": [1], "dense": np.ones((1, 4), np.float32)},
    ]
    for feed in bad:
        with pytest.raises(Exception) as want:
            runner.validate(feed)
        with pytest.raises(type(want.value)) as got:
            runner.run(feed)
        assert str(got.value) == str(want.value)
    # a big-endian float32 passes validate() (its name is float32); run() must feed its value, not its bytes
    feed = {"ids": np.array([3], np.int64), "dense": np.arange(4, dtype=">f4").reshape(1, 4)}
    native = {"ids": feed["ids"], "dense": feed["dense"].astype("<f4")}
    assert_same(runner.run(feed), runner.run(native))


def test_concurrent_callers_get_their_own_results(runtime_of):
    """Batch threads call execute() while the serve loop calls run_wire()."""
    runner = runtime_of("tf2").signatures["serving_default"]
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            rng = np.random.default_rng(seed)
            for _ in range(100):
                feed = {"ids": rng.integers(0, 1000, 3).astype(np.int64),
                        "dense": rng.random((3, 4)).astype(np.float32)}
                a = runner.run_wire(*wire(feed), None)
                b = runner.execute(feed)
                assert_same(a, {k: np.asarray(v) for k, v in b.items()})
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


# -- zero copy --------------------------------------------------------------------------------------
def _mapped(segment: str) -> bool:
    with open("/proc/self/maps") as f:
        return segment.lstrip("/") in f.read()


def test_dropping_a_version_unmaps_its_segment(models_dir):
    """serve.py unloads a version by dropping it and collecting: the session lets go of the tables
    then, not at some later TensorFlow call, so the segment's memory goes with the unlink."""
    from sgserve.worker.runtime import ModelRuntime

    spec = loader.load_version("tf2", os.path.join(models_dir, "tf2"), 1, shared_segment.server_id())
    try:
        rt = ModelRuntime(spec.segment)
        rt.signatures["embed"].run_wire(*wire({"ids": np.array([1, 2], np.int64)}), None)
        assert _mapped(spec.segment)
        del rt
        gc.collect()
        assert not _mapped(spec.segment)
    finally:
        shared_segment.unlink(spec.segment)


def test_big_table_stays_shared(tmp_path):
    """A 256 MiB table mapped from a segment: building the runtime and 1,000 requests add no private
    copy of it (USS; a copy would add 256 MiB)."""
    import psutil

    from sgserve.worker.runtime import ModelRuntime
    from tests import model_builders

    base = model_builders.build_big(str(tmp_path / "big"), mib=256)
    spec = loader.load_version("big", base, 1, shared_segment.server_id())
    try:
        gc.collect()
        proc = psutil.Process()
        before = proc.memory_full_info().uss
        rt = ModelRuntime(spec.segment)
        runner = rt.signatures["serving_default"]
        ids = np.array([0, 17, 1000, 500000, 1048575, 3], np.int64)
        metas, payload = wire({"ids": ids})
        first = runner.run_wire(metas, payload, None)["y"]
        for _ in range(1000):
            out = runner.run_wire(metas, payload, None)["y"]
        gc.collect()
        grown = (proc.memory_full_info().uss - before) / 2**20
        assert np.array_equal(out, first)
        assert grown < 64, f"USS grew {grown:.0f} MiB"
        rt.close()
        del rt, runner
    finally:
        shared_segment.unlink(spec.segment)
