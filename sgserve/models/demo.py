"""The built-in demo model: a small recommender (two embedding tables + an MLP), as users serve.

Built on first use into the cache directory (TF Serving layout: ``<cache>/demo/1``), with fixed
seeds so every machine serves the same model. Ids are hashed into the tables with a modulo, so any
int64 id is a valid input.
"""
from __future__ import annotations

import os
import shutil
import tempfile

USERS = 100_000
ITEMS = 100_000
DIM = 32
HIDDEN = (128, 64)
DEMO_VERSION = 1


def build_demo_model(export_dir: str, users: int = USERS, items: int = ITEMS, dim: int = DIM) -> None:
    import numpy as np  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    rng = np.random.default_rng(20261122)

    class Recommender(tf.Module):
        def __init__(self) -> None:
            super().__init__(name="recommender")
            self.user_emb = tf.Variable(rng.normal(0, 0.1, (users, dim)).astype("float32"), name="user_emb")
            self.item_emb = tf.Variable(rng.normal(0, 0.1, (items, dim)).astype("float32"), name="item_emb")
            sizes = (2 * dim,) + HIDDEN + (1,)
            self.weights = [tf.Variable(rng.normal(0, (2.0 / a) ** 0.5, (a, b)).astype("float32"), name=f"w{i}")
                            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))]
            self.biases = [tf.Variable(np.zeros(b, "float32"), name=f"b{i}") for i, b in enumerate(sizes[1:])]

        @tf.function(input_signature=[tf.TensorSpec([None], tf.int64, name="user_id"),
                                      tf.TensorSpec([None], tf.int64, name="item_id")])
        def score(self, user_id, item_id):
            u = tf.nn.embedding_lookup(self.user_emb, tf.math.floormod(user_id, users))
            v = tf.nn.embedding_lookup(self.item_emb, tf.math.floormod(item_id, items))
            h = tf.concat([u, v], axis=1)
            for i, (w, b) in enumerate(zip(self.weights, self.biases)):
                h = tf.matmul(h, w) + b
                if i < len(self.weights) - 1:
                    h = tf.nn.relu(h)
            logit = tf.squeeze(h, axis=1)
            return {"score": tf.sigmoid(logit), "logit": logit}

    model = Recommender()
    tf.saved_model.save(model, export_dir, signatures={"serving_default": model.score})


def ensure_demo_model(cache_dir: str) -> str:
    """The demo model's base path, building it once (atomically) if it is not there yet."""
    base = os.path.join(cache_dir, "demo")
    final = os.path.join(base, str(DEMO_VERSION))
    if os.path.isfile(os.path.join(final, "saved_model.pb")):
        return base
    os.makedirs(base, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".building-", dir=base)
    try:
        build_demo_model(os.path.join(tmp, "m"))
        try:
            os.rename(os.path.join(tmp, "m"), final)
        except OSError:
            if not os.path.isfile(os.path.join(final, "saved_model.pb")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return base
