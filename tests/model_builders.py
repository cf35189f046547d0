"""Small real SavedModels in TF Serving layout (BASE/<version>/saved_model.pb), for the tests."""
from __future__ import annotations

import os

import numpy as np


def build_tf2(base: str, rows: int = 1000, dim: int = 16, seed: int = 1) -> str:
    import tensorflow as tf

    rng = np.random.default_rng(seed)

    class Ranker(tf.Module):
        def __init__(self) -> None:
            self.emb = tf.Variable(rng.random((rows, dim)).astype("float32"))
            self.w = tf.Variable(rng.random((dim, 4)).astype("float32"))
            self.b = tf.Variable(rng.random(4).astype("float32"))

        @tf.function(input_signature=[tf.TensorSpec([None], tf.int64, name="ids"),
                                      tf.TensorSpec([None, 4], tf.float32, name="dense")])
        def serve(self, ids, dense):
            e = tf.nn.embedding_lookup(self.emb, ids)
            return {"y": tf.matmul(e, self.w) + self.b + dense, "norm": tf.reduce_sum(e, axis=1)}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.int64, name="ids")])
        def embed(self, ids):
            return {"emb": tf.gather(self.emb, ids)}

    m = Ranker()
    path = os.path.join(base, "1")
    tf.saved_model.save(m, path, signatures={"serving_default": m.serve, "embed": m.embed})
    return base


def build_keras_strings(base: str) -> str:
    import keras

    keras.utils.set_random_seed(3)
    city = keras.Input(shape=(1,), dtype="string", name="city")
    x = keras.layers.StringLookup(vocabulary=["paris", "tokyo", "lima", "oslo"])(city)
    x = keras.layers.Embedding(8, 6)(x)
    x = keras.layers.Flatten()(x)
    num = keras.Input(shape=(3,), dtype="float32", name="num")
    x = keras.layers.Concatenate()([x, num])
    x = keras.layers.Dense(5, activation="relu")(x)
    out = keras.layers.Dense(2)(x)
    keras.Model([city, num], out).export(os.path.join(base, "1"), verbose=False)
    return base


def build_tf1(base: str) -> str:
    """TF1 Builder export with a reference (VariableV2) table, a resource variable and a gather."""
    import tensorflow as tf

    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None], name="x")
        ids = tf.compat.v1.placeholder(tf.int64, [None], name="ids")
        a = tf.compat.v1.Variable(0.5, name="a", use_resource=False)
        b = tf.compat.v1.get_variable("b", initializer=2.0, use_resource=True)
        emb = tf.compat.v1.Variable(np.arange(400, dtype="float32").reshape(100, 4), name="emb", use_resource=False)
        y = a * x + b + tf.reduce_sum(tf.gather(emb, ids), axis=1)
        with tf.compat.v1.Session() as s:
            s.run(tf.compat.v1.global_variables_initializer())
            builder = tf.compat.v1.saved_model.Builder(os.path.join(base, "1"))
            sig = tf.compat.v1.saved_model.predict_signature_def({"x": x, "ids": ids}, {"y": y})
            builder.add_meta_graph_and_variables(s, ["serve"], signature_def_map={"serving_default": sig})
            builder.save()
    return base


def build_half_plus_two(base: str) -> str:
    import tensorflow as tf

    class HalfPlusTwo(tf.Module):
        def __init__(self) -> None:
            self.a = tf.Variable(0.5)
            self.b = tf.Variable(2.0)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
        def serve(self, x):
            return {"y": self.a * x + self.b}

    m = HalfPlusTwo()
    tf.saved_model.save(m, os.path.join(base, "1"), signatures={"serving_default": m.serve})
    return base


def build_big(base: str, mib: int = 256) -> str:
    """One embedding table of about ``mib`` MiB (rows x 64 float32) + a dense layer."""
    import tensorflow as tf

    rows = mib * 1024 * 1024 // (64 * 4)

    class Big(tf.Module):
        def __init__(self) -> None:
            self.emb = tf.Variable(tf.random.stateless_normal([rows, 64], seed=[1, 2]))
            self.w = tf.Variable(tf.random.stateless_normal([64, 1], seed=[3, 4]))

        @tf.function(input_signature=[tf.TensorSpec([None], tf.int64, name="ids")])
        def serve(self, ids):
            return {"y": tf.matmul(tf.nn.embedding_lookup(self.emb, ids), self.w)}

    m = Big()
    tf.saved_model.save(m, os.path.join(base, "1"), signatures={"serving_default": m.serve})
    return base


def build_all(d: str) -> None:
    build_tf2(os.path.join(d, "tf2"))
    build_keras_strings(os.path.join(d, "keras"))
    build_tf1(os.path.join(d, "tf1"))
    build_half_plus_two(os.path.join(d, "hpt"))
