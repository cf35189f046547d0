"""checkpoint_index against real checkpoints written by TensorFlow (tf.train.Checkpoint, SavedModel, SaveV2)."""
from __future__ import annotations

import os
import random
import struct
import time

import numpy as np
import pytest

from sgserve.models import checkpoint_index
from tests.conftest import import_required
from sgserve.models.checkpoint_index import CheckpointIndexError, TensorEntry, changed_keys, read_index

tf = import_required("tensorflow")

COUNTER = "save_counter/.ATTRIBUTES/VARIABLE_VALUE"
OBJECT_GRAPH = "_CHECKPOINTABLE_OBJECT_GRAPH"


def wire_dtype(dt) -> str:
    """sgserve's dtype naming rule (graph_rewrite.dtype_name): "string", else the numpy name."""
    dt = tf.as_dtype(dt)
    return "string" if dt == tf.string else np.dtype(dt.as_numpy_dtype).name


def assert_matches_tf_reader(prefix: str, entries: dict[str, TensorEntry]) -> None:
    reader = tf.train.load_checkpoint(prefix)
    shapes = reader.get_variable_to_shape_map()
    dtypes = reader.get_variable_to_dtype_map()
    assert set(entries) == set(shapes)
    for key, entry in entries.items():
        assert entry.key == key
        assert entry.shape == tuple(shapes[key]), key
        assert entry.dtype == wire_dtype(dtypes[key]), key


def make_variables() -> dict[str, tf.Variable]:
    return {
        "emb": tf.Variable(np.arange(40, dtype=np.float32).reshape(10, 4)),
        "step": tf.Variable(7, dtype=tf.int64),  # a scalar
        "vocab": tf.Variable(b"hello"),  # a string
        "half": tf.Variable(np.ones(3, np.float16)),
        "flag": tf.Variable(True),
        "ids": tf.Variable(np.array([1, 2, 3], np.int32)),
    }


class Ranker(tf.Module):
    def __init__(self, scale: float = 1.0) -> None:
        self.emb = tf.Variable(np.full((8, 4), scale, np.float32))
        self.bias = tf.Variable(0.5)
        self.labels = tf.Variable(["a", "b", "c"])
        self.version = tf.Variable(1, dtype=tf.int64)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64)])
    def serve(self, ids):
        return tf.reduce_sum(tf.gather(self.emb, ids), axis=1) + self.bias


@pytest.fixture(scope="module")
def tf_checkpoints(tmp_path_factory):
    """save() twice unchanged, then once more after changing one variable; write() twice unchanged."""
    d = tmp_path_factory.mktemp("ckpt")
    variables = make_variables()
    ckpt = tf.train.Checkpoint(**variables)
    first = ckpt.save(str(d / "ck"))
    second = ckpt.save(str(d / "ck"))
    variables["ids"].assign([1, 2, 4])
    third = ckpt.save(str(d / "ck"))
    written = [ckpt.write(str(d / f"w{i}")) for i in (1, 2)]
    return first, second, third, written


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """Versions 1 and 2 of one unchanged module, version 3 with only `bias` changed, all in TF Serving layout."""
    base = tmp_path_factory.mktemp("models")
    model = Ranker()
    tf.saved_model.save(model, str(base / "1"))
    tf.saved_model.save(model, str(base / "2"))
    model.bias.assign(0.75)
    tf.saved_model.save(model, str(base / "3"))
    return [str(base / str(v) / "variables" / "variables") for v in (1, 2, 3)]


def test_checkpoint_entries_match_tf_reader(tf_checkpoints):
    first = tf_checkpoints[0]
    entries = read_index(first)
    assert_matches_tf_reader(first, entries)
    assert "" not in entries
    assert entries["step/.ATTRIBUTES/VARIABLE_VALUE"].shape == ()
    assert entries["step/.ATTRIBUTES/VARIABLE_VALUE"].dtype == "int64"
    assert entries["vocab/.ATTRIBUTES/VARIABLE_VALUE"].dtype == "string"
    emb = entries["emb/.ATTRIBUTES/VARIABLE_VALUE"]
    assert (emb.dtype, emb.shape, emb.size, emb.shard_id, emb.sliced) == ("float32", (10, 4), 160, 0, False)
    assert {COUNTER, OBJECT_GRAPH} <= set(entries)
    assert read_index(first + ".index") == entries


def test_checkpoint_save_changes_counter_and_the_changed_variable_only(tf_checkpoints):
    first, second, third, _ = tf_checkpoints
    v1, v2, v3 = read_index(first), read_index(second), read_index(third)
    assert changed_keys(v1, v2) == {COUNTER}  # save() bumps the counter; the object graph is stable
    assert changed_keys(v2, v3) == {COUNTER, "ids/.ATTRIBUTES/VARIABLE_VALUE"}
    assert v2[OBJECT_GRAPH] == v3[OBJECT_GRAPH]


def test_checkpoint_write_of_unchanged_variables_changes_nothing(tf_checkpoints):
    w1, w2 = tf_checkpoints[3]
    assert changed_keys(read_index(w1), read_index(w2)) == set()


def test_saved_model_entries_and_changes(saved_models):
    v1, v2, v3 = (read_index(p) for p in saved_models)
    assert_matches_tf_reader(saved_models[0], v1)
    assert v1["labels/.ATTRIBUTES/VARIABLE_VALUE"].dtype == "string"
    assert v1["labels/.ATTRIBUTES/VARIABLE_VALUE"].shape == (3,)
    assert v1["bias/.ATTRIBUTES/VARIABLE_VALUE"].shape == ()
    assert COUNTER not in v1  # SavedModels have no save counter
    assert changed_keys(v1, v2) == set()
    assert changed_keys(v2, v3) == {"bias/.ATTRIBUTES/VARIABLE_VALUE"}


def test_changed_keys_rules():
    base = TensorEntry("k", "float32", (2, 3), 0, 0, 24, 1234, False)
    old = {"k": base, "gone": base}
    assert changed_keys(old, {"k": base}) == set()  # removed keys are not "changed"
    assert changed_keys(old, {"new": base}) == {"new"}
    moved = TensorEntry("k", "float32", (2, 3), 1, 512, 24, 1234, False)
    assert changed_keys(old, {"k": moved}) == set()  # same bytes in another place
    for other in (TensorEntry("k", "int32", (2, 3), 0, 0, 24, 1234, False),
                  TensorEntry("k", "float32", (3, 2), 0, 0, 24, 1234, False),
                  TensorEntry("k", "float32", (2, 3), 0, 0, 28, 1234, False),
                  TensorEntry("k", "float32", (2, 3), 0, 0, 24, 4321, False)):
        assert changed_keys(old, {"k": other}) == {"k"}
    sliced = TensorEntry("k", "float32", (2, 3), 0, 0, 0, 0, True)
    assert changed_keys({"k": sliced}, {"k": sliced}) == {"k"}


def test_partitioned_variable_is_reported_once_as_sliced(tmp_path):
    prefix = str(tmp_path / "ck")
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=["emb", "emb", "w"],
                      shape_and_slices=["10 4 0,5:-", "10 4 5,5:-", ""],
                      tensors=[tf.zeros([5, 4]), tf.ones([5, 4]), tf.constant([1, 2, 3])])
    entries = read_index(prefix)
    assert_matches_tf_reader(prefix, entries)  # the per-slice entries are left out, as TF does
    assert entries["emb"].sliced and entries["emb"].shape == (10, 4)
    assert not entries["w"].sliced
    assert changed_keys(entries, read_index(prefix)) == {"emb"}


def test_merged_shards_keep_their_shard_ids(tmp_path):
    a, b, merged = (str(tmp_path / n) for n in ("a", "b", "merged"))
    tf.raw_ops.SaveV2(prefix=a, tensor_names=["x"], shape_and_slices=[""], tensors=[tf.constant([1.0, 2.0])])
    tf.raw_ops.SaveV2(prefix=b, tensor_names=["y"], shape_and_slices=[""], tensors=[tf.constant([3, 4, 5])])
    tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=[a, b], destination_prefix=merged)
    entries = read_index(merged)
    assert_matches_tf_reader(merged, entries)
    assert {k: e.shard_id for k, e in entries.items()} == {"x": 0, "y": 1}


def test_many_variables_over_several_blocks_read_fast(tmp_path):
    prefix = str(tmp_path / "big")
    n = 2000
    names = [f"tower_{i:04d}/{'dense_block_' * 12}/kernel" for i in range(n)]
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * n,
                      tensors=[tf.constant(np.full((2, 2), i, np.float32)) for i in range(n)])
    assert os.path.getsize(prefix + ".index") > 300_000  # more than one 256 KiB data block
    read_index(prefix)  # warm: the first call imports the protobuf module
    started = time.perf_counter()
    entries = read_index(prefix)
    elapsed = time.perf_counter() - started
    assert len(entries) == n
    assert_matches_tf_reader(prefix, entries)
    assert elapsed < 0.5, f"read_index took {elapsed:.3f} s for {n} entries"


def test_missing_index_is_an_error(tmp_path):
    with pytest.raises(CheckpointIndexError, match="nothing.index: cannot read"):
        read_index(str(tmp_path / "nothing"))
    with pytest.raises(CheckpointIndexError):
        read_index(str(tmp_path))  # a directory, not a checkpoint


def corrupt_copy(src: str, dst: str, edit) -> str:
    with open(src + ".index", "rb") as f:
        data = bytearray(f.read())
    with open(dst + ".index", "wb") as f:
        f.write(edit(data))
    return dst


@pytest.mark.parametrize("case, edit, message", [
    ("empty", lambda d: b"", "shorter than the 48-byte table footer"),
    ("truncated", lambda d: d[:-10], "bad magic number"),
    ("cut in half", lambda d: d[:len(d) // 2], "bad magic number"),
    ("garbage", lambda d: bytes(random.Random(1).randbytes(len(d))), "bad magic number"),
    ("flipped byte", lambda d: d[:30] + bytes([d[30] ^ 0x40]) + d[31:], "checksum mismatch"),
    ("bad index handle", lambda d: d[:-48] + b"\x00\x00\xff\xff\xff\x0f" + d[-42:], "runs past the end"),
])
def test_corrupt_index_is_an_error(tf_checkpoints, tmp_path, case, edit, message):
    prefix = corrupt_copy(tf_checkpoints[0], str(tmp_path / "bad"), edit)
    with pytest.raises(CheckpointIndexError, match=message) as info:
        read_index(prefix)
    assert str(info.value).startswith(prefix + ".index: ")


def test_compressed_blocks_are_refused(tf_checkpoints, tmp_path):
    def mark_index_block_snappy(data: bytearray) -> bytearray:
        footer = len(data) - 48
        _, _, pos = checkpoint_index._block_handle(data, footer, len(data))
        offset, size, _ = checkpoint_index._block_handle(data, pos, len(data))
        data[offset + size] = 1
        crc = checkpoint_index._masked_crc32c(bytes(data[offset:offset + size + 1]))
        data[offset + size + 1:offset + size + 5] = struct.pack("<I", crc)
        return data

    prefix = corrupt_copy(tf_checkpoints[0], str(tmp_path / "snappy"), mark_index_block_snappy)
    with pytest.raises(CheckpointIndexError, match="snappy compression; only uncompressed"):
        read_index(prefix)


def test_dtype_names_follow_sgserve_naming():
    from tensorflow.core.framework import types_pb2

    for value, name in checkpoint_index._DTYPE_NAMES.items():
        assert name == wire_dtype(value), types_pb2.DataType.Name(value)
    assert types_pb2.DT_RESOURCE not in checkpoint_index._DTYPE_NAMES


def reference_crc32c(data: bytes) -> int:
    """crc32c from its bitwise definition (reflected polynomial 0x82F63B78), one table."""
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
        table.append(c)
    crc = 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def test_crc32c():
    assert checkpoint_index._crc32c(b"123456789") == 0xE3069283  # the standard check value
    assert checkpoint_index._crc32c(b"") == 0
    rng = random.Random(7)
    for n in (4, 5, 100, 16 * 1024 - 1, 16 * 1024, 16 * 1024 + 1, 70_001, 262_144):
        data = rng.randbytes(n)
        want = reference_crc32c(data)
        assert checkpoint_index._crc32c(data) == want, n


def test_masked_crc32c_matches_the_crc_tensorflow_recorded_for_each_tensor(tf_checkpoints, saved_models):
    """BundleEntryProto.crc32c is TF's masked crc32c of the tensor's bytes in its data shard."""
    checked = 0
    for prefix in (tf_checkpoints[0], saved_models[0]):
        for key, entry in read_index(prefix).items():
            if entry.dtype == "string":
                continue  # TF's string crc also covers the element lengths, not just the stored bytes
            with open(f"{prefix}.data-{entry.shard_id:05d}-of-00001", "rb") as f:
                f.seek(entry.offset)
                data = f.read(entry.size)
            assert len(data) == entry.size and entry.crc32c != 0, key
            assert checkpoint_index._masked_crc32c(data) == entry.crc32c, key
            checked += 1
    assert checked >= 8
