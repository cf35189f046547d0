"""Server-side batching (sgserve/worker/batching.py): batches formed, padded, run by a real tf.function and
split back per request."""
from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from sgserve.worker.batching import (  # noqa: E402
    Batch,
    Batcher,
    BatchTask,
)
from sgserve.models.batching_params import BatchingParameters  # noqa: E402
from sgserve.errors import (  # noqa: E402
    DEADLINE_EXCEEDED,
    INTERNAL,
    INVALID_ARGUMENT,
    RESOURCE_EXHAUSTED,
    UNAVAILABLE,
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    ServeError,
    Unavailable,
)

KEY = ("m", 1, "serving_default", ())
FAR = 1e12  # a monotonic "now" after every batch timeout


@pytest.fixture(scope="module")
def tf():
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    return tf


def _to_tf(tf, arr):
    if arr.dtype == object:
        return tf.constant(arr.tolist() if arr.ndim else arr.item(), dtype=tf.string, shape=arr.shape)
    return tf.constant(arr)


def run_tf(tf, fn, inputs):
    """Calls a tf.function with numpy inputs and returns numpy outputs (strings as object arrays)."""
    out = fn(**{k: _to_tf(tf, v) for k, v in inputs.items()})
    result = {}
    for k, v in out.items():
        a = v.numpy()
        result[k] = a.astype(object) if a.dtype.kind == "S" else a
    return result


@pytest.fixture(scope="module")
def affine(tf):
    """x * 2 + 1, and a per-row value that depends on the whole row (so a row mix-up would show)."""
    @tf.function
    def model(x):
        flat = tf.reshape(x, [tf.shape(x)[0], -1])
        weights = tf.cast(tf.range(1, tf.shape(flat)[1] + 1), x.dtype)
        return {"y": x * 2 + 1, "score": tf.reduce_sum(flat * weights, axis=1)}

    return model


def values(rows, cols, start, dtype=np.float32):
    return (np.arange(rows * cols, dtype=dtype).reshape(rows, cols) + start).astype(dtype)


def ready(batcher: Batcher, now: float | None = None) -> list[Batch]:
    """Every batch that may run at monotonic time ``now`` (full, timed out, or any while stopping),
    taken as a batch thread's next_batch() would take them, for tests that drive one step at a time."""
    now = time.monotonic() if now is None else now
    batches = []
    with batcher._cond:
        while (batch := batcher._take_locked(now)) is not None:
            batches.append(batch)
    wall = time.time()
    for batch in batches:
        batch._drop_expired(wall)
    return [b for b in batches if b.tasks or b.expired]


def next_timeout(batcher: Batcher, now: float | None = None) -> float | None:
    """Seconds until a batch may run at monotonic time ``now`` (0.0: one may now); None: nothing queued."""
    with batcher._cond:
        return batcher._next_timeout_locked(time.monotonic() if now is None else now)


class BatchThreads:
    """``count`` threads that do what a worker's batch threads do (serve_batched.py): take a batch,
    run it, hand every request's answer to ``deliver``."""

    def __init__(self, batcher: Batcher, run_model, deliver, count: int | None = None) -> None:
        self.batcher = batcher
        self.threads = [threading.Thread(target=self._loop, args=(run_model, deliver), daemon=True)
                        for _ in range(count or batcher.num_batch_threads)]
        for thread in self.threads:
            thread.start()

    def _loop(self, run_model, deliver) -> None:
        while (batch := self.batcher.next_batch()) is not None:
            deliver(batch.run(lambda merged, key=batch.key: run_model(key, merged)))

    def stop(self, drain: bool = True, timeout: float = 10.0):
        """batcher.stop(drain), then the threads are joined; returns what stop() dropped."""
        dropped = self.batcher.stop(drain=drain)
        for thread in self.threads:
            thread.join(timeout)
        assert not any(t.is_alive() for t in self.threads), "a batch thread did not finish"
        return dropped


def results_by_tag(results):
    out = {}
    for tag, result in results:
        assert tag not in out, f"{tag} answered twice"
        out[tag] = result
    return out


# ---------------------------------------------------------------------------------------------------
# Forming, merging, splitting
# ---------------------------------------------------------------------------------------------------

def test_merge_and_split_round_trip_with_allowed_batch_sizes_and_strings():
    batcher = Batcher(BatchingParameters(max_batch_size=8, allowed_batch_sizes=(4, 8), batch_timeout_micros=10**9))
    a = {"x": np.array([[1, 2], [3, 4]], np.int64), "s": np.array([b"a0", b"a1"], dtype=object)}
    b = {"x": np.array([[5, 6]], np.int64), "s": np.array([b"b0"], dtype=object)}
    batcher.submit(BatchTask("a", KEY, a))
    batcher.submit(BatchTask("b", KEY, b))
    assert ready(batcher) == []  # neither full nor timed out
    [batch] = ready(batcher, now=FAR)
    assert batch.tags == ["a", "b"] and batch.size == 3 and batch.padded_size == 4
    merged = batch.merged_inputs()
    # Padding to the allowed size 4 repeats the first row of the last request (batching_session.cc).
    np.testing.assert_array_equal(merged["x"], [[1, 2], [3, 4], [5, 6], [5, 6]])
    assert merged["s"].dtype == object and merged["s"].tolist() == [b"a0", b"a1", b"b0", b"b0"]
    # Outputs that depend on the row: each request gets exactly its own rows back, padding dropped.
    outputs = {"x10": merged["x"] * 10, "tag": np.char.add(merged["s"].astype("S"), b"!").astype(object)}
    got = results_by_tag(batch.split(outputs))
    np.testing.assert_array_equal(got["a"]["x10"], [[10, 20], [30, 40]])
    np.testing.assert_array_equal(got["b"]["x10"], [[50, 60]])
    assert got["a"]["tag"].tolist() == [b"a0!", b"a1!"] and got["b"]["tag"].tolist() == [b"b0!"]


def test_strings_run_through_a_real_tf_function(tf):
    @tf.function
    def greet(name):
        return {"greeting": tf.strings.join(["hi ", name])}

    batcher = Batcher(BatchingParameters(max_batch_size=4, allowed_batch_sizes=(4,)))
    batcher.submit(BatchTask(1, KEY, {"name": np.array([b"ann", b"bob"], dtype=object)}))
    batcher.submit(BatchTask(2, KEY, {"name": np.array(["cy"])}))  # a numpy str array is taken as bytes
    [batch] = ready(batcher, now=FAR)
    got = results_by_tag(batch.run(lambda inputs: run_tf(tf, greet, inputs)))
    assert got[1]["greeting"].tolist() == [b"hi ann", b"hi bob"]
    assert got[2]["greeting"].tolist() == [b"hi cy"]


def test_different_shapes_and_dtypes_are_never_mixed(tf, affine):
    batcher = Batcher(BatchingParameters(max_batch_size=16, batch_timeout_micros=10**9))
    tasks = {
        "a3": values(2, 3, 0), "b4": values(1, 4, 100), "c3": values(3, 3, 200),
        "d4": values(2, 4, 300), "e3f64": values(1, 3, 400, np.float64), "f2d": values(2, 6, 500).reshape(2, 2, 3),
    }
    for tag, x in tasks.items():
        batcher.submit(BatchTask(tag, KEY, {"x": x}))
    batches = ready(batcher, now=FAR)
    layouts = sorted(sorted(b.tags) for b in batches)
    assert layouts == [["a3", "c3"], ["b4", "d4"], ["e3f64"], ["f2d"]]
    got = {}
    for batch in batches:
        got.update(results_by_tag(batch.run(lambda inputs: run_tf(tf, affine, inputs))))
    for tag, x in tasks.items():
        alone = run_tf(tf, affine, {"x": x})
        assert got[tag]["y"].dtype == x.dtype
        np.testing.assert_array_equal(got[tag]["y"], alone["y"])
        np.testing.assert_array_equal(got[tag]["score"], alone["score"])


def test_different_keys_and_input_names_are_separate_queues():
    batcher = Batcher(BatchingParameters(max_batch_size=8, batch_timeout_micros=10**9))
    batcher.submit(BatchTask(1, ("m", 1, "a", ()), {"x": values(1, 2, 0)}))
    batcher.submit(BatchTask(2, ("m", 2, "a", ()), {"x": values(1, 2, 0)}))
    batcher.submit(BatchTask(3, ("m", 1, "a", ()), {"z": values(1, 2, 0)}))
    batcher.submit(BatchTask(4, ("m", 1, "a", ()), {"x": values(1, 2, 0)}))
    assert sorted(b.tags for b in ready(batcher, now=FAR)) == [[1, 4], [2], [3]]


def test_variable_length_inputs_are_padded_with_each_requests_first_element(tf, affine):
    params = BatchingParameters(max_batch_size=4, allowed_batch_sizes=(4,), pad_variable_length_inputs=True,
                                batch_timeout_micros=10**9)
    batcher = Batcher(params)
    short = np.array([[7, 8]], np.int32)
    long = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.int32)
    words = {"short": np.array([[b"x"]], dtype=object), "long": np.array([[b"p", b"q", b"r"], [b"s", b"t", b"u"]],
                                                                          dtype=object)}
    batcher.submit(BatchTask("short", KEY, {"x": short, "w": words["short"]}))
    batcher.submit(BatchTask("long", KEY, {"x": long, "w": words["long"]}))
    [batch] = ready(batcher, now=FAR)
    merged = batch.merged_inputs()
    # padding_util semantics: pad at the end of each non-batch dim with the tensor's own first element,
    # then pad the batch to 4 with the first row of the last request.
    np.testing.assert_array_equal(merged["x"], [[7, 8, 7, 7], [1, 2, 3, 4], [5, 6, 7, 8], [1, 2, 3, 4]])
    assert merged["w"].tolist() == [[b"x", b"x", b"x"], [b"p", b"q", b"r"], [b"s", b"t", b"u"], [b"p", b"q", b"r"]]
    got = results_by_tag(batch.run(lambda inputs: run_tf(tf, affine, {"x": inputs["x"]})))
    # Outputs keep the padded length (TF Serving does not cut them back).
    np.testing.assert_array_equal(got["short"]["y"], [[15, 17, 15, 15]])
    np.testing.assert_array_equal(got["long"]["y"], long * 2 + 1)


def test_without_padding_variable_lengths_get_separate_batches():
    batcher = Batcher(BatchingParameters(max_batch_size=4, batch_timeout_micros=10**9))
    batcher.submit(BatchTask(1, KEY, {"x": np.zeros((1, 2), np.int32)}))
    batcher.submit(BatchTask(2, KEY, {"x": np.zeros((1, 4), np.int32)}))
    assert sorted(b.tags for b in ready(batcher, now=FAR)) == [[1], [2]]


def test_zero_size_inputs_are_not_padded_together_with_others():
    batcher = Batcher(BatchingParameters(max_batch_size=4, pad_variable_length_inputs=True,
                                         batch_timeout_micros=10**9))
    batcher.submit(BatchTask("empty", KEY, {"x": np.zeros((1, 0), np.int32)}))
    batcher.submit(BatchTask("full", KEY, {"x": np.ones((1, 3), np.int32)}))
    batcher.submit(BatchTask("other", KEY, {"x": np.ones((2, 5), np.int32)}))
    assert sorted(b.tags for b in ready(batcher, now=FAR)) == [["empty"], ["full", "other"]]


def test_a_request_that_would_overflow_starts_a_new_batch():
    batcher = Batcher(BatchingParameters(max_batch_size=4, batch_timeout_micros=10**9))
    for tag, rows in (("a", 2), ("b", 1), ("c", 2), ("d", 2)):
        batcher.submit(BatchTask(tag, KEY, {"x": values(rows, 1, 0)}))
    batches = ready(batcher, now=FAR)
    assert [b.tags for b in batches] == [["a", "b"], ["c", "d"]] and [b.size for b in batches] == [3, 4]


def test_a_full_batch_runs_without_waiting_for_the_timeout():
    batcher = Batcher(BatchingParameters(max_batch_size=3, batch_timeout_micros=10**9))
    batcher.submit(BatchTask("a", KEY, {"x": values(2, 1, 0)}))
    assert ready(batcher) == []
    batcher.submit(BatchTask("b", KEY, {"x": values(1, 1, 0)}))
    assert next_timeout(batcher) == 0.0
    assert [b.tags for b in ready(batcher)] == [["a", "b"]]
    assert next_timeout(batcher) is None


# ---------------------------------------------------------------------------------------------------
# Errors, backpressure, timeouts and deadlines
# ---------------------------------------------------------------------------------------------------

def test_queue_full_is_an_immediate_429():
    batcher = Batcher(BatchingParameters(max_batch_size=2, max_enqueued_batches=2, batch_timeout_micros=10**9))
    for tag in range(4):  # two full batches
        batcher.submit(BatchTask(tag, KEY, {"x": values(1, 1, tag)}))
    started = time.monotonic()
    with pytest.raises(ResourceExhausted) as info:
        batcher.submit(BatchTask(4, KEY, {"x": values(1, 1, 4)}))
    assert time.monotonic() - started < 1.0
    assert info.value.code == RESOURCE_EXHAUSTED == 429 and info.value.retryable
    assert "batching queue full" in info.value.message and "max_enqueued_batches is 2" in info.value.message
    # Other keys have their own queue.
    batcher.submit(BatchTask(5, ("other", 1, "serving_default", ()), {"x": values(1, 1, 5)}))
    # Once a batch is taken to run, there is room again.
    assert len(ready(batcher, now=0.0)) == 2  # the full batches of KEY; the other key's has not timed out
    batcher.submit(BatchTask(4, KEY, {"x": values(1, 1, 4)}))


def test_open_batches_of_other_layouts_count_against_the_queue():
    batcher = Batcher(BatchingParameters(max_batch_size=8, max_enqueued_batches=2, batch_timeout_micros=10**9))
    batcher.submit(BatchTask(1, KEY, {"x": np.zeros((1, 1), np.float32)}))
    batcher.submit(BatchTask(2, KEY, {"x": np.zeros((1, 2), np.float32)}))
    batcher.submit(BatchTask(3, KEY, {"x": np.zeros((1, 2), np.float32)}))  # joins an open batch
    with pytest.raises(ResourceExhausted):
        batcher.submit(BatchTask(4, KEY, {"x": np.zeros((1, 3), np.float32)}))


def test_more_rows_than_max_batch_size_is_400():
    batcher = Batcher(BatchingParameters(max_batch_size=2))
    with pytest.raises(InvalidArgument) as info:
        batcher.submit(BatchTask(1, KEY, {"x": values(3, 1, 0)}))
    assert info.value.code == INVALID_ARGUMENT and "max_batch_size" in info.value.message
    assert "Task size 3 is larger than maximum input batch size 2" in info.value.message


@pytest.mark.parametrize("inputs, message", [
    ({}, "at least one input"),
    ({"x": np.float32(1)}, "input 'x' is a scalar"),
    ({"x": np.zeros((2, 1)), "y": np.zeros((3, 1))}, "same size in dimension 0"),
])
def test_malformed_requests_are_400(inputs, message):
    with pytest.raises(InvalidArgument, match=message):
        Batcher(BatchingParameters()).submit(BatchTask(1, KEY, inputs))


def test_timeout_closes_a_batch():
    batcher = Batcher(BatchingParameters(max_batch_size=8, batch_timeout_micros=50_000))
    before = time.monotonic()
    batcher.submit(BatchTask("a", KEY, {"x": values(1, 1, 0)}))
    after = time.monotonic()
    assert ready(batcher, now=after) == []
    wait = next_timeout(batcher, now=after)
    assert wait is not None and 0.05 - (after - before) <= wait <= 0.05
    assert [b.tags for b in ready(batcher, now=after + 0.05)] == [["a"]]
    # And with the real clock: a thread blocked in next_batch gets it once the timeout passed.
    batcher.submit(BatchTask("b", KEY, {"x": values(1, 1, 0)}))
    batch = batcher.next_batch(timeout=10)
    assert batch is not None and batch.tags == ["b"] and time.monotonic() - before >= 0.05


def test_expired_requests_are_dropped_and_answered_504(tf, affine):
    batcher = Batcher(BatchingParameters(max_batch_size=8, batch_timeout_micros=10**9))
    with pytest.raises(DeadlineExceeded):
        batcher.submit(BatchTask("late", KEY, {"x": values(1, 2, 0)}, deadline=time.time() - 1))
    batcher.submit(BatchTask("soon", KEY, {"x": values(1, 2, 0)}, deadline=time.time() + 0.05))
    batcher.submit(BatchTask("fine", KEY, {"x": values(2, 2, 10)}, deadline=time.time() + 3600))
    time.sleep(0.1)
    [batch] = ready(batcher, now=FAR)
    assert batch.expired == ["soon"] and batch.tags == ["fine"] and batch.size == 2
    seen = []

    def model(inputs):
        seen.append(inputs["x"].shape[0])
        return run_tf(tf, affine, inputs)

    got = results_by_tag(batch.run(model))
    assert seen == [2]  # the expired request did not run
    assert isinstance(got["soon"], DeadlineExceeded) and got["soon"].code == DEADLINE_EXCEEDED
    np.testing.assert_array_equal(got["fine"]["y"], values(2, 2, 10) * 2 + 1)


def test_a_batch_of_only_expired_requests_runs_nothing():
    batcher = Batcher(BatchingParameters(max_batch_size=8, batch_timeout_micros=10**9))
    batcher.submit(BatchTask("soon", KEY, {"x": values(1, 2, 0)}, deadline=time.time() + 0.02))
    time.sleep(0.05)
    [batch] = ready(batcher, now=FAR)

    def never(inputs):
        raise AssertionError("must not run")

    [(tag, error)] = batch.run(never)
    assert tag == "soon" and error.code == DEADLINE_EXCEEDED


@pytest.mark.parametrize("outputs, message", [
    ({"y": np.float32(3.0)}, "output 'y' is a scalar"),
    ({"y": np.zeros((4, 1)), "n": np.zeros(2)}, "output 'n' has 2 rows but the batch has 4"),
])
def test_outputs_without_the_batch_dimension_fail_the_batch(outputs, message):
    batcher = Batcher(BatchingParameters(max_batch_size=4, allowed_batch_sizes=(4,)))
    batcher.submit(BatchTask(1, KEY, {"x": values(1, 1, 0)}))
    batcher.submit(BatchTask(2, KEY, {"x": values(2, 1, 0)}))
    [batch] = ready(batcher, now=FAR)
    with pytest.raises(ServeError, match=message):
        batch.split(outputs)
    results = batch.run(lambda inputs: outputs)
    assert sorted(tag for tag, _ in results) == [1, 2]
    assert all(isinstance(r, ServeError) and r.code == INTERNAL and "batch as dimension 0" in r.message
               for _, r in results)


def test_a_model_error_answers_every_request_in_the_batch():
    batcher = Batcher(BatchingParameters(max_batch_size=4))
    batcher.submit(BatchTask(1, KEY, {"x": values(1, 1, 0)}))
    batcher.submit(BatchTask(2, KEY, {"x": values(1, 1, 0)}))
    [batch] = ready(batcher, now=FAR)

    def broken(inputs):
        raise InvalidArgument("input 'x': expected dtype int64")

    assert [(t, r.code) for t, r in batch.run(broken)] == [(1, 400), (2, 400)]


# ---------------------------------------------------------------------------------------------------
# Large batch splitting
# ---------------------------------------------------------------------------------------------------

def test_large_requests_are_split_over_batches_and_joined_back(tf, affine):
    params = BatchingParameters(max_batch_size=6, enable_large_batch_splitting=True, max_execution_batch_size=2,
                                batch_timeout_micros=10**9, max_enqueued_batches=10)
    batcher = Batcher(params)
    small = values(1, 3, 0)
    big = values(5, 3, 100)
    batcher.submit(BatchTask("small", KEY, {"x": small}))
    batcher.submit(BatchTask("big", KEY, {"x": big}))  # fills the open batch, then 2 + 2 rows
    batches = ready(batcher, now=FAR)
    assert [b.size for b in batches] == [2, 2, 2] and [b.tags for b in batches][0] == ["small", "big"]
    got = {}
    for i, batch in enumerate(batches):
        answered = results_by_tag(batch.run(lambda inputs: run_tf(tf, affine, inputs)))
        assert ("big" in answered) == (i == len(batches) - 1)  # answered once, when the last piece ran
        got.update(answered)
    np.testing.assert_array_equal(got["small"]["y"], small * 2 + 1)
    np.testing.assert_array_equal(got["big"]["y"], big * 2 + 1)
    np.testing.assert_array_equal(got["big"]["score"], run_tf(tf, affine, {"x": big})["score"])


def test_a_failed_piece_answers_a_split_request_once():
    params = BatchingParameters(max_batch_size=4, enable_large_batch_splitting=True, max_execution_batch_size=2)
    batcher = Batcher(params)
    batcher.submit(BatchTask("big", KEY, {"x": values(4, 1, 0)}))
    first, second = ready(batcher, now=FAR)
    assert [(t, r.code) for t, r in first.run(lambda inputs: 1 / 0)] == [("big", 500)]
    assert second.run(lambda inputs: {"y": inputs["x"]}) == []


def test_splitting_respects_the_queue_bound():
    params = BatchingParameters(max_batch_size=8, enable_large_batch_splitting=True, max_execution_batch_size=2,
                                max_enqueued_batches=3, batch_timeout_micros=10**9)
    batcher = Batcher(params)
    with pytest.raises(ResourceExhausted):
        batcher.submit(BatchTask("too big for 3 batches", KEY, {"x": values(7, 1, 0)}))
    batcher.submit(BatchTask("fits", KEY, {"x": values(6, 1, 0)}))
    assert [b.size for b in ready(batcher, now=FAR)] == [2, 2, 2]


# ---------------------------------------------------------------------------------------------------
# Batch threads
# ---------------------------------------------------------------------------------------------------

class Collector:
    def __init__(self, expected: int) -> None:
        self.results: dict = {}
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.expected = expected

    def deliver(self, results) -> None:
        with self.lock:
            for tag, result in results:
                assert tag not in self.results
                self.results[tag] = result
            if len(self.results) >= self.expected:
                self.done.set()


def test_batch_threads_run_many_requests_correctly(tf, affine):
    params = BatchingParameters(max_batch_size=8, allowed_batch_sizes=(2, 4, 8), num_batch_threads=3,
                                batch_timeout_micros=1000, max_enqueued_batches=1000)
    batcher = Batcher(params)
    rng = np.random.default_rng(0)
    tasks = {i: rng.normal(size=(int(rng.integers(1, 5)), 3 if i % 3 else 5)).astype(np.float32)
             for i in range(60)}
    sizes = []
    collector = Collector(len(tasks))

    def run_model(key, inputs):
        assert key == KEY
        sizes.append(inputs["x"].shape[0])
        return run_tf(tf, affine, inputs)

    threads = BatchThreads(batcher, run_model, collector.deliver)
    try:
        for tag, x in tasks.items():
            batcher.submit(BatchTask(tag, KEY, {"x": x}))
        assert collector.done.wait(15)
    finally:
        threads.stop()
    assert set(sizes) <= {2, 4, 8}
    for tag, x in tasks.items():
        alone = run_tf(tf, affine, {"x": x})
        np.testing.assert_allclose(collector.results[tag]["y"], alone["y"], rtol=1e-6)
        np.testing.assert_allclose(collector.results[tag]["score"], alone["score"], rtol=1e-5)


def test_requests_that_arrive_while_threads_are_busy_are_batched_together():
    # batch_timeout_micros 0 (the default): a batch runs as soon as a thread is free, so requests queue up
    # into one batch while the only thread is busy.
    batcher = Batcher(BatchingParameters(max_batch_size=8, num_batch_threads=1))
    running, release = threading.Event(), threading.Event()
    batch_sizes = []
    collector = Collector(4)

    def run_model(key, inputs):
        batch_sizes.append(inputs["x"].shape[0])
        running.set()
        assert release.wait(10)
        return {"y": inputs["x"] + 1}

    threads = BatchThreads(batcher, run_model, collector.deliver)
    try:
        batcher.submit(BatchTask(0, KEY, {"x": values(1, 1, 0)}))
        assert running.wait(10)
        for tag in (1, 2, 3):
            batcher.submit(BatchTask(tag, KEY, {"x": values(1, 1, tag * 10)}))
        release.set()
        assert collector.done.wait(10)
    finally:
        threads.stop()
    assert batch_sizes == [1, 3]
    assert {t: r["y"].tolist() for t, r in collector.results.items()} == {0: [[1]], 1: [[11]], 2: [[21]], 3: [[31]]}


def test_stop_drains_or_answers_503():
    batcher = Batcher(BatchingParameters(max_batch_size=8, batch_timeout_micros=10**9))
    batcher.submit(BatchTask(1, KEY, {"x": values(1, 1, 0)}))
    batcher.submit(BatchTask(2, KEY, {"x": values(1, 2, 0)}))
    dropped = batcher.stop(drain=False)
    assert sorted((t, r.code) for t, r in dropped) == [(1, UNAVAILABLE), (2, UNAVAILABLE)]
    with pytest.raises(Unavailable):
        batcher.submit(BatchTask(3, KEY, {"x": values(1, 1, 0)}))

    draining = Batcher(BatchingParameters(max_batch_size=8, batch_timeout_micros=10**9, num_batch_threads=2))
    draining.submit(BatchTask(1, KEY, {"x": values(1, 1, 0)}))
    collector = Collector(1)
    threads = BatchThreads(draining, lambda key, inputs: {"y": inputs["x"]}, collector.deliver)
    assert threads.stop(drain=True, timeout=10) == []  # the open batch runs at once on stop
    assert collector.done.is_set() and draining.next_batch(timeout=0) is None


def test_batch_repr_and_tasks():
    batcher = Batcher(BatchingParameters(max_batch_size=4))
    task = BatchTask("t", KEY, {"x": values(1, 1, 0)})
    batcher.submit(task)
    [batch] = ready(batcher, now=FAR)
    assert isinstance(batch, Batch) and batch.tasks == [task] and "rows=1" in repr(batch)
