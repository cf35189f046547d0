"""The peer benchmark's models, built once into bench/.cache/models/ (TF Serving layout BASE/1/).

- ``demo``: sgserve's built-in recommender (sgserve/models/demo.py): two 100,000 x 32 embedding tables and a
  64 -> 128 -> 64 -> 1 MLP; serving_default(user_id int64[None], item_id int64[None]) -> score, logit.
  Memory- and overhead-bound: a request does little arithmetic.
- ``cnn``: a Keras CNN with random (seeded) weights on 32x32x3 images: Conv2D 32, Conv2D 64, pool,
  Conv2D 64, pool, Conv2D 128, global average pool, Dense 10 (about 68 MFLOP per image);
  serving_default(image float32[None, 32, 32, 3]) -> logits, probs. Compute-bound. Exported with
  Keras' ``model.export`` as users do; two named outputs, so TF Serving's REST answer is a map of
  outputs for both models.
- ``embedding``: bench/_models.py's single-table model at ``gib`` GiB (optional; makes the memory
  difference between the layouts visible at a realistic model size).
- ``widedeep``: a Keras wide & deep recommender (the classic of Cheng et al. 2016), random seeded
  weights: a wide linear part over hashed crosses (user x item, 100,000 bins; item x category,
  10,000 bins) and the category id, plus a deep part: embeddings of user_id (50,000 x 32), item_id
  (20,000 x 32) and category (1,000 x 8) concatenated with 8 numeric features through Dense
  256 -> 128 -> 64 -> 1. serving_default(user_id, item_id, category int64[None],
  numeric float32[None, 8]) -> logit, prob float32[None, 1]; about 9.5 MB of variables. Exported
  with ``model.export``; ids are taken modulo each table's size in the graph, so any int64 works.

Each build runs in a child process (``python bench/peers/models.py KIND --out DIR``), so the
benchmark driver never holds TensorFlow.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

PEERS_DIR = os.path.dirname(os.path.abspath(__file__))
BENCH_DIR = os.path.dirname(PEERS_DIR)
sys.path.insert(0, BENCH_DIR)
from _common import CACHE_DIR, REPO, log  # noqa: E402

MODELS = ("demo", "cnn", "embedding", "widedeep")
CNN_SEED = 7


def build_cnn(out: str) -> dict:
    import keras  # noqa: PLC0415

    keras.utils.set_random_seed(CNN_SEED)
    image = keras.Input(shape=(32, 32, 3), name="image")
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(image)
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(128, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    logits = keras.layers.Dense(10, name="logits")(x)
    probs = keras.layers.Softmax(name="probs")(logits)
    model = keras.Model(image, {"logits": logits, "probs": probs}, name="cnn")
    model.export(out, verbose=False)
    flops = 2 * (32 * 32 * 9 * (3 * 32 + 32 * 64) + 16 * 16 * 9 * 64 * 64 + 8 * 8 * 9 * 64 * 128 + 128 * 10)
    return {"variable_bytes": int(sum(int(w.numpy().size) * 4 for w in model.weights)), "flops_per_image": flops}


WD_USERS, WD_ITEMS, WD_CATEGORIES, WD_NUMERIC = 50_000, 20_000, 1_000, 8
WD_CROSS_UI, WD_CROSS_IC = 100_000, 10_000
WD_SEED = 11


def build_widedeep(out: str) -> dict:
    """Wide & deep over three int64 ids and 8 numeric features; see the module docstring."""
    import keras  # noqa: PLC0415
    from keras import layers, ops  # noqa: PLC0415

    keras.utils.set_random_seed(WD_SEED)
    user = keras.Input(shape=(), dtype="int64", name="user_id")
    item = keras.Input(shape=(), dtype="int64", name="item_id")
    cat = keras.Input(shape=(), dtype="int64", name="category")
    numeric = keras.Input(shape=(WD_NUMERIC,), dtype="float32", name="numeric")
    u, i, c = ops.mod(user, WD_USERS), ops.mod(item, WD_ITEMS), ops.mod(cat, WD_CATEGORIES)
    # Wide: linear weights (1-wide embeddings) of hashed crosses and of the category, + the numerics.
    cross_ui = ops.mod(u * 1_000_003 + i, WD_CROSS_UI)
    cross_ic = ops.mod(i * 1_009 + c, WD_CROSS_IC)
    wide = layers.Add(name="wide")([
        layers.Flatten()(layers.Embedding(WD_CROSS_UI, 1, name="wide_user_x_item")(cross_ui[:, None])),
        layers.Flatten()(layers.Embedding(WD_CROSS_IC, 1, name="wide_item_x_category")(cross_ic[:, None])),
        layers.Flatten()(layers.Embedding(WD_CATEGORIES, 1, name="wide_category")(c[:, None])),
        layers.Dense(1, name="wide_numeric")(numeric)])
    # Deep: embeddings + numerics through an MLP.
    deep = layers.Concatenate()([layers.Embedding(WD_USERS, 32, name="user_embedding")(u),
                                 layers.Embedding(WD_ITEMS, 32, name="item_embedding")(i),
                                 layers.Embedding(WD_CATEGORIES, 8, name="category_embedding")(c), numeric])
    for width in (256, 128, 64):
        deep = layers.Dense(width, activation="relu")(deep)
    deep = layers.Dense(1, name="deep")(deep)
    logit = layers.Add(name="logit")([wide, deep])
    prob = layers.Activation("sigmoid", name="prob")(logit)
    model = keras.Model([user, item, cat, numeric], {"logit": logit, "prob": prob}, name="widedeep")
    model.export(out, verbose=False)
    return {"variable_bytes": int(sum(int(w.numpy().size) * 4 for w in model.weights)), "users": WD_USERS,
            "items": WD_ITEMS, "categories": WD_CATEGORIES, "numeric": WD_NUMERIC,
            "cross_bins": [WD_CROSS_UI, WD_CROSS_IC], "mlp": [256, 128, 64, 1]}


BUILDERS = {"cnn": build_cnn, "widedeep": build_widedeep}


def _ensure_keras(kind: str) -> tuple[str, dict]:
    """A Keras model of BUILDERS, built once in a child process into bench/.cache/models/peers_KIND."""
    base = os.path.join(CACHE_DIR, "models", f"peers_{kind}")
    info_path = os.path.join(base, "build.json")
    if os.path.isfile(os.path.join(base, "1", "saved_model.pb")) and os.path.isfile(info_path):
        with open(info_path) as f:
            return base, json.load(f)
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    tmp = os.path.join(base, ".building")
    log(f"building model {kind} into {os.path.relpath(base)} ...")
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, os.path.abspath(__file__), kind, "--out", tmp], stdout=subprocess.PIPE,
                         text=True, check=False, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    if out.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        raise RuntimeError(f"building {kind} failed (exit {out.returncode})")
    info = json.loads(out.stdout.strip().splitlines()[-1])
    info["build_seconds"] = round(time.monotonic() - t0, 1)
    os.rename(tmp, os.path.join(base, "1"))
    with open(info_path, "w") as f:
        json.dump(info, f, indent=2)
    return base, info


def _ensure_demo() -> tuple[str, dict]:
    base = os.path.join(CACHE_DIR, "models", "peers_demo")
    if not os.path.isfile(os.path.join(base, "demo", "1", "saved_model.pb")):
        log("building the demo model ...")
        os.makedirs(base, exist_ok=True)
        code = f"import sys; sys.path.insert(0, {REPO!r}); from sgserve.models.demo import ensure_demo_model; " \
               f"ensure_demo_model({base!r})"
        subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    from sgserve.models import demo  # noqa: PLC0415 - constants only, no TensorFlow

    dims = (2 * demo.DIM,) + demo.HIDDEN + (1,)
    mlp = sum(a * b + b for a, b in zip(dims[:-1], dims[1:]))
    return os.path.join(base, "demo"), {"variable_bytes": 4 * ((demo.USERS + demo.ITEMS) * demo.DIM + mlp),
                                        "users": demo.USERS, "items": demo.ITEMS, "dim": demo.DIM}


def ensure(kind: str, embedding_gib: float = 1.0) -> tuple[str, dict]:
    """(base path, build info) of a model, building it in a child process if it is not cached."""
    if kind == "demo":
        return _ensure_demo()
    if kind in BUILDERS:
        return _ensure_keras(kind)
    if kind == "embedding":
        import _models  # noqa: PLC0415 - bench/_models.py

        return _models.ensure("embedding", gib=embedding_gib)
    raise ValueError(f"unknown model {kind!r}; known: {', '.join(MODELS)}")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=sorted(BUILDERS))
    p.add_argument("--out", required=True)
    a = p.parse_args()
    info = BUILDERS[a.kind](a.out)
    info["kind"] = a.kind
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
