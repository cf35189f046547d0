"""Server-side batching end to end: real servers started by the real CLI with --enable-batching.

Every reply must be the answer its own request would get unbatched, whatever it was batched with.
The varlen model (an embedding gather and a max over tokens) computes each row exactly the same
way in any batch, so its answers are compared bit for bit. The demo model's MLP is a matmul, and
TensorFlow's CPU matmul does not round a row identically at every batch size (stock TF, no sgserve:
16 rows in one call vs 16 calls of one row differ by up to ~1e-7), so the demo is compared with a
tolerance far below the distance between two different requests' answers.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys
import threading
from typing import Any, Iterator

import numpy as np
import pytest
import zmq

from sgserve import protocol
from sgserve.errors import InvalidArgument, NotFound
from tests.conftest import ServerProcess, group_alive, sgserve_segments

VOCAB, DIM = 50, 4
TABLE_SEED = 6


def build_varlen(base: str) -> np.ndarray:
    """tokens int64[batch, length] -> emb float32[batch, length, 4] (a gather), pooled float32[batch, 4] (max
    over tokens). Returns the table, from which the test computes the exact answers."""
    import tensorflow as tf

    table = np.random.default_rng(TABLE_SEED).normal(0, 1, (VOCAB, DIM)).astype("float32")

    class VarLen(tf.Module):
        def __init__(self) -> None:
            self.table = tf.Variable(table)

        @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int64, name="tokens")])
        def serve(self, tokens):
            emb = tf.gather(self.table, tf.math.floormod(tokens, VOCAB))
            return {"emb": emb, "pooled": tf.reduce_max(emb, axis=1)}

    m = VarLen()
    tf.saved_model.save(m, os.path.join(base, "1"), signatures={"serving_default": m.serve})
    return table


@contextlib.contextmanager
def serving(args: list[str], cache_dir: str) -> Iterator[ServerProcess]:
    """A server for a whole module; on the way out: stopped, its group gone, its segments unlinked."""
    before = sgserve_segments()
    server = ServerProcess(args, cache_dir=cache_dir)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
    assert not group_alive(server.proc.pid), "processes left in the server's group"
    left = {n for n in sgserve_segments() - before if n.startswith(f"sgserve_{server.proc.pid}_")}
    assert not left, f"shared memory left behind: {left}"


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


class RawClient:
    """One DEALER socket that can have many requests out at once, and sees the whole reply header
    (the Client hides batch_size). Not thread-safe: one per thread."""

    _ids = itertools.count(1)

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, model: str, inputs: dict[str, np.ndarray], timeout_ms: float | None = 30000.0) -> int:
        rid = next(self._ids)
        header: dict[str, Any] = {"type": protocol.PREDICT, "model": model, "id": rid}
        if timeout_ms is not None:
            header["timeout_ms"] = timeout_ms
        self.sock.send_multipart(protocol.pack(header, inputs), copy=False)
        return rid

    def recv(self, wait: float = 30.0) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        assert self.sock.poll(wait * 1000), f"no reply within {wait} s"
        header, payload = protocol.unpack_header(self.sock.recv_multipart())
        outputs = protocol.decode_tensors(header.get("outputs"), payload, "outputs") if header["code"] == 200 else {}
        return header, outputs

    def call(self, model: str, inputs: dict[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        self.send(model, inputs)
        return self.recv()

    def burst(self, model: str, feeds: list[dict[str, np.ndarray]]) -> list[tuple[dict[str, Any], dict[str, np.ndarray]]]:
        """Sends every feed before reading any reply (so they can batch); replies in feed order."""
        ids = [self.send(model, f) for f in feeds]
        got = dict((h["id"], (h, o)) for h, o in (self.recv() for _ in ids))
        return [got[i] for i in ids]

    def close(self) -> None:
        self.sock.close(0)


@pytest.fixture(scope="module")
def models(tmp_path_factory, cache_dir) -> dict[str, Any]:
    from sgserve.models.demo import ensure_demo_model

    d = tmp_path_factory.mktemp("batching-models")
    table = build_varlen(str(d / "varlen"))
    demo = ensure_demo_model(cache_dir)
    config = write(d / "models.config", f"""
model_config_list {{
  config {{ name: "demo" base_path: "{demo}" model_platform: "tensorflow" }}
  config {{ name: "varlen" base_path: "{d / 'varlen'}" model_platform: "tensorflow" }}
}}
""")
    return {"dir": d, "table": table, "demo": demo, "config": config}


@pytest.fixture(scope="module")
def batching_server(models, cache_dir) -> Iterator[ServerProcess]:
    """2 workers, batches of up to 16 rows, no padding, no splitting."""
    params = write(models["dir"] / "batching.txt", """\
max_batch_size { value: 16 }
batch_timeout_micros { value: 2000 }
max_enqueued_batches { value: 100 }
""")
    with serving(["--model-config-file", models["config"], "--workers", "2", "--enable-batching",
                  "--batching-parameters-file", params], cache_dir) as server:
        yield server


@pytest.fixture(scope="module")
def padding_server(models, cache_dir) -> Iterator[ServerProcess]:
    """1 worker; variable-length inputs share batches (padded); requests of up to 32 rows are split
    into batches of at most 8."""
    params = write(models["dir"] / "batching-pad.txt", """\
max_batch_size { value: 32 }
batch_timeout_micros { value: 20000 }
max_enqueued_batches { value: 100 }
pad_variable_length_inputs: true
enable_large_batch_splitting { value: true }
max_execution_batch_size { value: 8 }
""")
    with serving(["--model-config-file", models["config"], "--workers", "1", "--enable-batching",
                  "--batching-parameters-file", params], cache_dir) as server:
        yield server


def varlen_answer(table: np.ndarray, tokens: np.ndarray) -> dict[str, np.ndarray]:
    emb = table[np.mod(tokens, VOCAB)]
    return {"emb": emb, "pooled": emb.max(axis=1)}


def demo_reference(path: str):
    """The demo model in stock TensorFlow, called one request at a time: the unbatched answers."""
    import tensorflow as tf

    fn = tf.saved_model.load(os.path.join(path, "1")).signatures["serving_default"]
    return lambda feed: {k: v.numpy() for k, v in fn(user_id=tf.constant(feed["user_id"]),
                                                     item_id=tf.constant(feed["item_id"])).items()}


def test_concurrent_single_row_clients_each_get_their_own_answer(batching_server, models):
    demo = demo_reference(models["demo"])
    table = models["table"]
    results: list[tuple[str, dict, dict, dict]] = []  # (model, feed, header, outputs)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client(k: int) -> None:
        c = RawClient(batching_server.endpoint)
        rng = np.random.default_rng(k)
        try:
            for _ in range(8):
                if k % 2:
                    model, feed = "varlen", {"tokens": rng.integers(0, 10**6, (1, 3))}
                else:
                    model, feed = "demo", {"user_id": rng.integers(0, 10**6, 1), "item_id": rng.integers(0, 10**6, 1)}
                header, outputs = c.call(model, feed)
                with lock:
                    results.append((model, feed, header, outputs))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
        finally:
            c.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(48)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[0]
    assert len(results) == 48 * 8
    sizes = []
    for model, feed, header, outputs in results:
        assert header["code"] == 200, header
        assert header["model"] == model and header["version"] == 1 and header["worker"] in (0, 1)
        assert 1 <= header["batch_size"] <= 16
        sizes.append(header["batch_size"])
        if model == "varlen":
            want = varlen_answer(table, feed["tokens"])
            for name in ("emb", "pooled"):
                np.testing.assert_array_equal(outputs[name], want[name])  # exactly
        else:
            want = demo(feed)
            for name in ("score", "logit"):
                assert outputs[name].shape == (1,)
                np.testing.assert_allclose(outputs[name], want[name], rtol=1e-5, atol=1e-6)
    assert max(sizes) > 1, f"no request was batched with another: {sorted(set(sizes))}"


def test_inputs_of_different_lengths_are_never_mixed_without_padding(batching_server, models):
    lengths = [2, 3, 5] * 12
    rng = np.random.default_rng(7)
    feeds = [{"tokens": rng.integers(0, 10**6, (1, n))} for n in lengths]
    c = RawClient(batching_server.endpoint)
    try:
        replies = c.burst("varlen", feeds)
    finally:
        c.close()
    for feed, (header, outputs) in zip(feeds, replies):
        assert header["code"] == 200, header
        n = feed["tokens"].shape[1]
        assert outputs["emb"].shape == (1, n, DIM)  # not padded to another request's length
        want = varlen_answer(models["table"], feed["tokens"])
        np.testing.assert_array_equal(outputs["emb"], want["emb"])
        np.testing.assert_array_equal(outputs["pooled"], want["pooled"])
        assert header["batch_size"] <= lengths.count(n)  # only requests of its own length shared its batch


def test_more_rows_than_max_batch_size_is_400(batching_server):
    with batching_server.client() as c:
        ok = c.predict("demo", {"user_id": np.arange(16), "item_id": np.arange(16)})
        assert ok["score"].shape == (16,)
        with pytest.raises(InvalidArgument) as e:
            c.predict("demo", {"user_id": np.arange(17), "item_id": np.arange(17)})
    assert e.value.code == 400 and "max_batch_size" in e.value.message and "17" in e.value.message


def test_output_filter_and_unknown_names_with_batching(batching_server):
    feed = {"user_id": np.array([3]), "item_id": np.array([4])}
    with batching_server.client() as c:
        full = c.predict("demo", feed)
        only = c.predict("demo", feed, output_filter=["score"])
        assert list(only) == ["score"]
        np.testing.assert_allclose(only["score"], full["score"], rtol=1e-5, atol=1e-6)
        with pytest.raises(InvalidArgument, match="unknown output"):
            c.predict("demo", feed, output_filter=["nope"])
        with pytest.raises(NotFound, match="nosig"):
            c.predict("demo", feed, signature="nosig")


def test_one_bad_request_does_not_fail_the_batch_it_would_join(batching_server, models):
    good = [{"tokens": np.array([[i, i + 1]])} for i in range(6)]
    bad = {"tokens": np.array([[1.5, 2.5]], np.float32)}  # wrong dtype: refused before batching
    c = RawClient(batching_server.endpoint)
    try:
        replies = c.burst("varlen", good[:3] + [bad] + good[3:])
    finally:
        c.close()
    codes = [h["code"] for h, _ in replies]
    assert codes == [200] * 3 + [400] + [200] * 3, [h.get("message") for h, _ in replies]
    assert "expected dtype int64" in replies[3][0]["message"]
    for feed, (_, outputs) in zip(good, replies[:3] + replies[4:]):
        np.testing.assert_array_equal(outputs["pooled"], varlen_answer(models["table"], feed["tokens"])["pooled"])


def test_padding_lets_lengths_share_a_batch_and_keeps_each_answer(padding_server, models):
    """pad_variable_length_inputs: shorter inputs are padded (with their first element, as TF Serving
    does) to the longest in the batch. Outputs are not cut back (batching.py, as TF Serving): the
    emb rows past a request's own length are the padding's embedding; the max over tokens is the
    unbatched answer exactly, since the padding repeats a token the row already has."""
    lengths = [2, 3, 4, 5, 6] * 6
    rng = np.random.default_rng(8)
    feeds = [{"tokens": rng.integers(0, 10**6, (1, n))} for n in lengths]
    c = RawClient(padding_server.endpoint)
    try:
        replies = c.burst("varlen", feeds)
    finally:
        c.close()
    padded = 0
    for feed, (header, outputs) in zip(feeds, replies):
        assert header["code"] == 200, header
        tokens = feed["tokens"]
        n = tokens.shape[1]
        want = varlen_answer(models["table"], tokens)
        np.testing.assert_array_equal(outputs["pooled"], want["pooled"])
        emb = outputs["emb"]
        assert emb.shape[0] == 1 and emb.shape[1] >= n and emb.shape[2] == DIM
        np.testing.assert_array_equal(emb[:, :n], want["emb"])
        np.testing.assert_array_equal(emb[0, n:], np.broadcast_to(want["emb"][0, 0], (emb.shape[1] - n, DIM)))
        padded += emb.shape[1] > n
    assert padded, "no request shared a batch with a longer one"


def test_large_requests_are_split_and_joined_back(padding_server, models):
    tokens = np.random.default_rng(9).integers(0, 10**6, (30, 4))
    c = RawClient(padding_server.endpoint)
    try:
        header, outputs = c.call("varlen", {"tokens": tokens})
        assert header["code"] == 200, header
        assert header["batch_size"] <= 8  # the batch that completed it; 30 rows ran as 4 batches
        want = varlen_answer(models["table"], tokens)
        np.testing.assert_array_equal(outputs["emb"], want["emb"])
        np.testing.assert_array_equal(outputs["pooled"], want["pooled"])
        header, _ = c.call("varlen", {"tokens": np.zeros((33, 2), np.int64)})
    finally:
        c.close()
    assert header["code"] == 400 and "max_batch_size" in header["message"] and "33" in header["message"]


def start_cli(*args: str) -> subprocess.CompletedProcess:
    """``sgserve start`` that is expected to fail; the result's ``segment_prefix`` names the
    segments this server would have made (other tests may run servers meanwhile)."""
    proc = subprocess.Popen([sys.executable, "-m", "sgserve.cli", "start", "--endpoint", "tcp://127.0.0.1:1", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    result.segment_prefix = f"sgserve_{proc.pid}_"  # type: ignore[attr-defined]
    return result


@pytest.mark.parametrize("text,fragment", [
    ("max_batch_size { value: 16 }\nbatch_timeout_micros { value: 2000 }\nmax_enqueued_batches { value: -1 }\n",
     ":3: max_enqueued_batches must be positive; was -1"),
    ("max_batch_size { value: 16 }\nbatch_timeout_micros: 2000\n", ":2:"),
    ("max_batch_size { value: 16 }\n\nmax_batch_sise { value: 8 }\n", ":3:"),
])
def test_bad_batching_parameters_file_exits_2_naming_the_line(tmp_path, text, fragment):
    path = write(tmp_path / "batching.txt", text)
    before = sgserve_segments()
    r = start_cli("--enable-batching", "--batching-parameters-file", path)
    assert r.returncode == 2, r.stderr
    assert f"{path}{fragment}" in r.stderr, r.stderr
    made = {n for n in sgserve_segments() - before if n.startswith(r.segment_prefix)}
    assert "loaded model" not in r.stderr and not made  # refused before any model loads


def test_batching_file_without_enable_batching_or_unreadable_is_refused(tmp_path):
    path = write(tmp_path / "batching.txt", "max_batch_size { value: 16 }\n")
    r = start_cli("--batching-parameters-file", path)
    assert r.returncode == 2 and "--enable-batching" in r.stderr, r.stderr
    r = start_cli("--enable-batching", "--batching-parameters-file", str(tmp_path / "missing.txt"))
    assert r.returncode == 2 and "missing.txt" in r.stderr, r.stderr
