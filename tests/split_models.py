"""Small real SavedModels for the split check (sgserve/worker/split_check.py): one that is safe to
split (a text CNN), ones that are not (a cross-row op, a fixed first dimension, an output without
rows) and one with integer outputs. TF Serving layout, BASE/1/saved_model.pb."""
from __future__ import annotations

import os

import numpy as np

TEXT_CNN_VOCAB = 1000
TEXT_CNN_LEN = 32


def build_text_cnn(base: str, vocab: int = TEXT_CNN_VOCAB, length: int = TEXT_CNN_LEN) -> str:
    """Issue #13's benchmark model: embedding, conv1d with widths 3/4/5, max-pool, softmax."""
    import keras

    keras.utils.set_random_seed(13)
    tokens = keras.Input(shape=(length,), dtype="int64", name="tokens")
    x = keras.layers.Embedding(vocab, 64)(tokens)
    pooled = [keras.layers.GlobalMaxPooling1D()(keras.layers.Conv1D(64, k, activation="relu")(x)) for k in (3, 4, 5)]
    h = keras.layers.Dense(64, activation="relu")(keras.layers.Concatenate()(pooled))
    out = keras.layers.Dense(4, activation="softmax", name="probs")(h)
    keras.Model(tokens, out).export(os.path.join(base, "1"), verbose=False)
    return base


def build_cross_row(base: str) -> str:
    """Signatures whose answer for a row depends on the other rows of the request.

    ``centered``: {centered: x - mean(x over the batch), doubled: 2x} (only ``centered`` is
    cross-row); ``batch_softmax``: {p: softmax over the rows}; ``row_count``: {rows: tf.shape(x)[0]}
    (an output with no leading batch dimension); ``fixed``: x of shape [3, 2]."""
    import tensorflow as tf

    m = tf.Module()
    m.w = tf.Variable(np.array([[1.0, -1.0], [0.5, 2.0]], np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="x")])
    def centered(x):
        h = tf.matmul(x, m.w)
        return {"centered": h - tf.reduce_mean(h, axis=0, keepdims=True), "doubled": 2.0 * h}

    @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="x")])
    def batch_softmax(x):
        return {"p": tf.nn.softmax(tf.matmul(x, m.w), axis=0)}

    @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="x")])
    def row_count(x):
        return {"rows": tf.shape(x)[0], "y": tf.matmul(x, m.w)}

    @tf.function(input_signature=[tf.TensorSpec([3, 2], tf.float32, name="x")])
    def fixed(x):
        return {"y": tf.matmul(x, m.w)}

    tf.saved_model.save(m, os.path.join(base, "1"), signatures={
        "centered": centered, "batch_softmax": batch_softmax, "row_count": row_count, "fixed": fixed})
    return base


def build_int_outputs(base: str) -> str:
    """x: float32[None, 5] -> {label: int64 argmax, positives: int32 count, score: float32 max},
    plus ``tags`` (ids: int64[None]) -> {tag: string, bucket: int64}: row-wise integer and string
    outputs, which the check compares exactly; and ``stamp`` (ids) -> {stamp: ids * 1e9 + the batch
    size}, which differs split by a few units in 1e9: within any float tolerance, not equal."""
    import tensorflow as tf

    m = tf.Module()
    m.w = tf.Variable(np.linspace(-1.0, 1.0, 25, dtype=np.float32).reshape(5, 5))
    m.words = tf.Variable(["red", "green", "blue"])

    @tf.function(input_signature=[tf.TensorSpec([None, 5], tf.float32, name="x")])
    def classify(x):
        h = tf.matmul(x, m.w)
        return {"label": tf.argmax(h, axis=1), "positives": tf.reduce_sum(tf.cast(h > 0, tf.int32), axis=1),
                "score": tf.reduce_max(h, axis=1)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64, name="ids")])
    def tags(ids):
        bucket = tf.math.floormod(ids * 7 + 1, 3)
        return {"tag": tf.gather(m.words, bucket), "bucket": bucket}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64, name="ids")])
    def stamp(ids):
        return {"stamp": ids * 1_000_000_000 + tf.cast(tf.shape(ids)[0], tf.int64)}

    tf.saved_model.save(m, os.path.join(base, "1"),
                        signatures={"serving_default": classify, "tags": tags, "stamp": stamp})
    return base
